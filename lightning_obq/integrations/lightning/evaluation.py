"""Evaluating a LightningModule for `OBQCallback`: its own validation/test metrics, output fidelity, and the
comparison of FP and quantized metrics.

`evaluate_module` runs the module's own ``validation_step``/``test_step`` on a copy, in a logger-less Trainer
of its own, so nothing of the user's Trainer (loops, loggers, checkpoints, early stopping) sees the extra
evaluation; `evaluate_fidelity` runs both models directly on the same batches.
"""

from __future__ import annotations

import copy
import hashlib
import logging
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torchmetrics import Metric

from lightning_obq.integrations.lightning.distributed import StrategyHooks
from lightning_obq.integrations.lightning.fidelity import OutputFidelity
from lightning_obq.model.calibration import ForwardFn, model_device
from lightning_obq.model.state import module_mode


def module_fingerprint(module: torch.nn.Module) -> str:
    """SHA-256 of the module's ``state_dict`` (names, dtypes, shapes, bytes): tells FP, quantized and
    other weights apart without keeping a copy of them."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        t = tensor.detach()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        digest.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def evaluating(trainer: pl.Trainer) -> bool:
    """A ``trainer.validate``/``trainer.test`` run (not fit's own validation or sanity check)."""
    return trainer.state.fn in (TrainerFn.VALIDATING, TrainerFn.TESTING) and not trainer.sanity_checking


def compare_metrics(fp: Mapping[str, float], quant: Mapping[str, float]) -> dict[str, float]:
    """FP metrics under their names, quantized as ``obq/<name>``, and ``obq/<name>_delta`` where both exist."""
    out = {k: float(v) for k, v in fp.items()}
    for k, v in quant.items():
        out[f"obq/{k}"] = float(v)
        if k in fp:
            out[f"obq/{k}_delta"] = float(v) - float(fp[k])
    return out


def evaluate_module(pl_module: pl.LightningModule, loaders: list[Any], stage: str = "validate",
                    like: pl.Trainer | None = None) -> dict[str, float]:
    """Run the module's own ``validation_step`` (or ``test_step``) over ``loaders``; return its epoch metrics.

    The loop runs on a deep copy of the module, so its weights, metrics, best-so-far trackers, counters and
    trainer reference stay exactly as they were (the module's own epoch-end hooks run on the copy). Every
    torchmetrics `Metric` of the copy is reset first: a ``MaxMetric`` tracker then reports the best over
    this one evaluation, not the training history. A separate Trainer without loggers, callbacks or
    checkpointing runs the loop, on the device, precision and batch limits of ``like`` (the user's
    trainer), so ``self.log`` and torchmetrics work as in a normal validation while nothing is logged or
    saved on the user's side; the global RNG state is forked. Keys from several dataloaders keep
    Lightning's ``/dataloader_idx_N`` suffix.
    """
    if stage not in ("validate", "test"):
        raise ValueError(f"stage must be 'validate' or 'test', got {stage!r}")
    device = like.strategy.root_device if like is not None else model_device(pl_module)
    accelerator = device.type if device.type in ("cpu", "cuda", "mps") else "auto"
    kwargs: dict[str, Any] = {}
    if like is not None:
        kwargs = {"precision": like.precision, "limit_val_batches": like.limit_val_batches,
                  "limit_test_batches": like.limit_test_batches, "default_root_dir": like.default_root_dir}
    copy_ = copy.deepcopy(pl_module)  # LightningModule.__getstate__ leaves the trainer reference out
    if hasattr(copy_, "_metric_attributes"):
        copy_._metric_attributes = None  # Lightning's id(metric) -> name cache: the copy's metrics have new ids
    for module in copy_.modules():
        if isinstance(module, Metric):
            module.reset()
    # The two pieces of Lightning-private state touched here, both forced by evaluating in a Trainer of its own
    # (the only public way to run the module's own validation_step with working self.log/torchmetrics):
    # a one-device Trainer sets the process-global rank_zero_only.rank to 0, which on rank k of a DDP run
    # must be put back, and the copy's `_metric_attributes` cache (above) would name the original's metrics.
    rank = rank_zero_only.rank
    quiet = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric")]
    levels = [lg.level for lg in quiet]
    for lg in quiet:
        lg.setLevel(logging.WARNING)
    try:
        with torch.random.fork_rng(devices=[device.index] if device.type == "cuda" and device.index is not None
                                   else []):
            evaluator = pl.Trainer(
                accelerator=accelerator, devices=[device.index] if device.index is not None else 1,
                logger=False, callbacks=[], enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, num_sanity_val_steps=0, use_distributed_sampler=False, **kwargs,
            )
            run = evaluator.validate if stage == "validate" else evaluator.test
            results = run(copy_, dataloaders=loaders, verbose=False)
    finally:
        rank_zero_only.rank = rank
        for lg, level in zip(quiet, levels, strict=True):
            lg.setLevel(level)
    return {k: float(v) for d in results for k, v in d.items()}


def evaluate_fidelity(reference: torch.nn.Module, quantized: torch.nn.Module, loaders: list[Any],
                      forward: ForwardFn, caps: list[float]) -> dict[str, float]:
    """`OutputFidelity` of ``quantized`` against ``reference`` on up to ``caps[i]`` batches of each loader.

    Both run in eval mode without gradients (modes restored afterwards); ``forward(model, batch)`` moves and
    runs a batch. Under DDP the metric's states are summed over ranks when computed.
    """
    metric = OutputFidelity()
    with module_mode(reference, quantized), torch.no_grad():
        for loader, cap in zip(loaders, caps, strict=True):
            for i, batch in enumerate(loader):
                if i >= cap:
                    break
                metric.update(forward(reference, batch), forward(quantized, batch))
    return metric.compute()


def batch_limit(trainer: pl.Trainer, stage: str, loaders: list[Any]) -> list[float]:
    """Batches per loader under the trainer's ``limit_val_batches``/``limit_test_batches`` (int or fraction)."""
    limit = trainer.limit_val_batches if stage == "validate" else trainer.limit_test_batches
    caps: list[float] = []
    for loader in loaders:
        if isinstance(limit, int):
            caps.append(float(limit))
        elif limit is None or limit >= 1.0 or not hasattr(loader, "__len__"):
            caps.append(float("inf"))
        else:
            caps.append(float(int(len(loader) * limit)))
    return caps


def evaluate_on_ranks(pl_module: pl.LightningModule, loaders: list[Any], stage: str, trainer: pl.Trainer,
                      hooks: StrategyHooks) -> dict[str, float]:
    """`evaluate_module` like ``trainer`` on every rank, averaged over ranks (like ``sync_dist=True``).

    Every rank must log the same metric names; otherwise a `RuntimeError` says which.
    """
    metrics = evaluate_module(pl_module, loaders, stage, like=trainer)
    keys = sorted(metrics)
    all_keys = hooks.broadcast(keys, src=0)
    if all_keys != keys:
        raise RuntimeError(f"ranks logged different validation metrics: {keys} vs rank 0 {all_keys}")
    return hooks.mean_metrics(metrics)
