"""The dataloaders `OBQCallback` calibrates and evaluates on, found where Lightning keeps them."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset

from lightning_obq.integrations.lightning.distributed import StrategyHooks
from lightning_obq.model.calibration import model_device

log = logging.getLogger("lightning_obq.integrations.lightning.callback")  # the callback's messages


def as_list(loaders: Any) -> list[Any]:
    """A Lightning dataloader collection (one loader, a list, or a dict) as a list."""
    if loaders is None:
        return []
    if isinstance(loaders, Mapping):
        return list(loaders.values())
    if isinstance(loaders, list | tuple):
        return list(loaders)
    return [loaders]


def call_loader(owner: Any, name: str) -> Any:
    """``owner.train_dataloader()`` (or val), calling the datamodule's ``setup`` first if it needs it."""
    try:
        return getattr(owner, name)()
    except (AttributeError, RuntimeError, TypeError):
        if not isinstance(owner, pl.LightningDataModule):
            raise
        owner.setup("fit")
        return getattr(owner, name)()


def shard(loader: Any, trainer: pl.Trainer, hooks: StrategyHooks) -> Any:
    """Under DDP, a plain map-style DataLoader re-made with a non-shuffling `DistributedSampler`."""
    if (not hooks.active or not isinstance(loader, DataLoader) or isinstance(loader.sampler, DistributedSampler)
            or isinstance(loader.dataset, IterableDataset) or loader.batch_size is None):
        return loader
    sampler = DistributedSampler(loader.dataset, shuffle=False, **trainer.strategy.distributed_sampler_kwargs)
    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler, num_workers=loader.num_workers,
                      collate_fn=loader.collate_fn, pin_memory=loader.pin_memory, drop_last=loader.drop_last)


def calibration_loader(trainer: pl.Trainer, pl_module: pl.LightningModule, given: Iterable[Any] | None,
                       last_fit: Iterable[Any] | None, hooks: StrategyHooks) -> tuple[Iterable[Any], Any]:
    """``(calibration batches, the running fit's train loader or None)``.

    In order: ``given`` (``OBQCallback(calib_dataloader=...)``, sharded under DDP), the running fit's train
    loader (prepared by Lightning: already sharded), the datamodule's or module's ``train_dataloader``, and
    ``last_fit`` (the train loader of an earlier fit in this process, for a later validate/test).
    """
    if given is not None:
        return shard(given, trainer, hooks), None
    train = as_list(trainer.train_dataloader)
    if train:
        return train[0], train[0]
    for owner in (trainer.datamodule, pl_module):
        if owner is not None and is_overridden("train_dataloader", owner):
            return shard(call_loader(owner, "train_dataloader"), trainer, hooks), None
    if last_fit is not None:
        return last_fit, None
    raise ValueError(
        "OBQCallback found no calibration data: pass OBQCallback(calib_dataloader=...) or give the trainer a "
        "train dataloader (datamodule or LightningModule.train_dataloader)"
    )


def evaluation_loaders(trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[Any]:
    """The validation loaders to measure FP and quantized metrics on after fit (``[]`` with a warning if none):
    the fit's own, else the datamodule's or module's ``val_dataloader`` (sharded under DDP)."""
    if trainer.limit_val_batches == 0:
        log.warning("OBQCallback: limit_val_batches=0, so FP vs quantized metrics are not measured")
        return []
    loaders = as_list(trainer.val_dataloaders)
    if loaders:
        return loaders
    hooks = StrategyHooks(trainer.strategy)
    for owner in (trainer.datamodule, pl_module):
        if owner is not None and is_overridden("val_dataloader", owner):
            return [shard(d, trainer, hooks) for d in as_list(call_loader(owner, "val_dataloader"))]
    log.warning("OBQCallback: no validation dataloader, so FP vs quantized metrics are not measured")
    return []


def strategy_forward(strategy: Any, forward_fn: Any) -> Any:
    """``forward_fn(model, batch)`` on batches moved to the model's device by the strategy, i.e. by the
    LightningModule's own batch-transfer hooks."""

    def forward(model: Any, batch: Any) -> Any:
        return forward_fn(model, strategy.batch_to_device(batch, model_device(model)))

    return forward
