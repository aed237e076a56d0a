"""`OBQCallback`: post-training quantization inside any Lightning `Trainer`, single process or DDP."""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_only
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset

from .calibration import ForwardFn, default_forward, model_device
from .config import QuantConfig
from .distributed import StrategyHooks, shard_size
from .fidelity import OutputFidelity
from .loggers import default_wandb_offline, log_report
from .quantize import quantize_model
from .report import LayerStats, QuantReport

log = logging.getLogger(__name__)

WHEN = ("fit_end", "validation_start")
_CONFIG_FIELDS = {f.name for f in dataclasses.fields(QuantConfig)}
_EXPLICIT_DEFAULTS = {"bits": 4, "method": "fastobq", "order": None, "calib_samples": 2048, "reestimate_bn": True,
                      "skip": ()}


class OBQCallback(Callback):
    """Quantize the LightningModule's Conv/Linear weights with FastOBQ (or GPTQ/OBQ/RTN) from a Trainer.

    ``Trainer(callbacks=[OBQCallback(bits=4)]).fit(model)`` trains as usual, then at ``on_fit_end``:

    1. evaluates the FP module with its own ``validation_step`` on the validation dataloaders used by
       ``fit`` (or the datamodule's/module's ``val_dataloader``), in a separate logger-less Trainer on the
       same device and precision (so no checkpoint or early-stopping callback fires);
    2. draws calibration batches (``calib_dataloader``, else the fit's train dataloader, else the
       datamodule's or module's ``train_dataloader``), moved by the module's own batch-transfer hooks;
    3. quantizes the module in place with `quantize_model` (BatchNorm re-estimated unless disabled);
    4. evaluates the quantized module the same way and measures output fidelity against the FP module
       (top-1 agreement, KL divergence; `lightning_obq.fidelity`);
    5. logs everything to every logger of the trainer (`lightning_obq.loggers` lists the metric names;
       a `WandbLogger` also gets a per-layer table and an error plot) and prints the report table;
    6. saves the quantized model with `lightning_obq.export.save_quantized` if ``export_path`` is set.

    ``when="validation_start"`` is for ``trainer.validate(model)`` / ``trainer.test(model)`` in an existing
    repository: the module is quantized once, before the first validation or test loop, so every
    validation/test after it reports quantized metrics. The FP metrics are measured just before quantizing
    on that loop's dataloaders, and the quantized ones are read from the running loop when it ends.
    It is refused in ``trainer.fit`` (quantizing between training steps would move weights off the grid).

    After quantizing, ``callback.report`` is the `QuantReport`; ``report.metrics`` holds the FP task metrics
    under their own names (``val_acc``), the quantized ones as ``obq/val_acc``, their difference
    ``obq/val_acc_delta``, and ``obq/top1_agreement`` / ``obq/kl_div``.

    **DDP** (``strategy="ddp"``, one or many nodes): every rank calibrates on its shard (Lightning's
    ``DistributedSampler`` of the train loader; a given ``calib_dataloader`` is sharded the same way), with
    ``calib_samples`` split over the ranks; Hessians and sample counts are all-reduced, each layer is solved
    once on one rank and broadcast, and BatchNorm statistics are averaged, so every rank ends with identical
    weights equal (to float tolerance) to one process calibrating on the union of the shards. Validation
    metrics are averaged over ranks like ``self.log(..., sync_dist=True)``.

    **Checkpoints**: `state_dict` holds the config, ``quantized`` and the report (``to_dict``). A checkpoint
    saved after quantizing holds the quantized weights (on the grid) and reloads as the quantized model;
    the callback then does not quantize again. Resuming ``trainer.fit`` from such a checkpoint is refused
    with a `RuntimeError` (training would move the weights off the grid): load the weights with
    ``load_from_checkpoint`` and start a new fit if you really want to fine-tune.

    **Failures**: bad arguments raise at construction (`ValueError`/`TypeError` naming the argument). If
    quantization fails, `quantize_model` restores the FP weights; if anything after it fails (BN sync,
    the quantized evaluation, fidelity, logging), the callback restores the FP weights and buffers itself
    and re-raises, so the module is never left half-done. A failing export (the last step) leaves the
    module quantized and re-raises. Under DDP an error raised on only one rank inside a collective (for
    example a validation step failing on one rank only) can still stall the other ranks until the
    process-group timeout; quantization errors themselves are propagated to all ranks.

    **W&B**: runs are offline unless the user chose a mode: when ``WANDB_MODE`` is unset, the constructor
    sets ``WANDB_MODE=offline`` for the process (Lightning creates the `WandbLogger` run before any callback
    hook, so the constructor is the last moment that works). ``WANDB_MODE=online``,
    ``WandbLogger(mode="online")`` or ``OBQCallback(wandb_offline=False)`` keep runs online; upload an offline
    run later with ``wandb sync <run dir>``.

    Args:
        bits: weight bit width (2..8).
        method: ``"fastobq"``, ``"gptq"``, ``"obq"`` or ``"rtn"``.
        order: column order (``None``: the method's default); see `QuantConfig`.
        when: ``"fit_end"`` (default) or ``"validation_start"``.
        calib_dataloader: calibration batches (any iterable of batches); default: the train dataloader.
        calib_samples: maximum calibration samples (over all ranks).
        forward_fn: ``forward_fn(module, batch)`` for batches that are not a tensor, ``(input, ...)`` tuple
            or dict with an input key; batches reach it already moved by the module's transfer hooks.
        reestimate_bn: re-estimate BatchNorm running statistics after quantizing.
        skip: layer-name patterns (``fnmatch``) left in full precision, e.g. ``("fc", "stem.*")``.
        evaluate: measure FP and quantized validation metrics and output fidelity.
        export_path: file written by `lightning_obq.export.save_quantized` on rank zero (safetensors); ``None``: none.
        log_per_layer: also log per-layer scalars (``obq/layer/<name>/...``) to every logger.
        wandb_offline: set ``WANDB_MODE=offline`` when it is unset (see W&B above).
        config: a ready `QuantConfig` instead of the individual settings above (then leave those at
            their defaults); ``skip`` is still added to its ``exclude``.
        **quant_kwargs: any other `QuantConfig` field (``granularity``, ``symmetric``, ``damp``, ...).
    """

    def __init__(
        self,
        bits: int = 4,
        method: str = "fastobq",
        order: str | None = None,
        when: str = "fit_end",
        calib_dataloader: Iterable[Any] | None = None,
        calib_samples: int = 2048,
        forward_fn: ForwardFn | None = None,
        reestimate_bn: bool = True,
        skip: str | Sequence[str] = (),
        evaluate: bool = True,
        export_path: str | os.PathLike[str] | None = None,
        log_per_layer: bool = True,
        wandb_offline: bool = True,
        config: QuantConfig | None = None,
        **quant_kwargs: Any,
    ) -> None:
        super().__init__()
        if when not in WHEN:
            raise ValueError(f"OBQCallback.when={when!r} is not one of {list(WHEN)}")
        if calib_dataloader is not None:
            if isinstance(calib_dataloader, str | bytes) or not isinstance(calib_dataloader, Iterable):
                raise TypeError(
                    f"OBQCallback.calib_dataloader must be a DataLoader or an iterable of batches, "
                    f"got {type(calib_dataloader).__name__}"
                )
            if hasattr(calib_dataloader, "__len__") and len(calib_dataloader) == 0:  # type: ignore[arg-type]
                raise ValueError("OBQCallback.calib_dataloader is empty: it yields no batches")
        if forward_fn is not None and not callable(forward_fn):
            raise TypeError(f"OBQCallback.forward_fn must be callable, got {type(forward_fn).__name__}")
        for name, value in (("evaluate", evaluate), ("log_per_layer", log_per_layer), ("wandb_offline", wandb_offline)):
            if not isinstance(value, bool):
                raise TypeError(f"OBQCallback.{name} must be a bool, got {value!r}")
        if export_path is not None:
            if not isinstance(export_path, str | os.PathLike) or not str(export_path):
                raise TypeError(f"OBQCallback.export_path must be a non-empty path, got {export_path!r}")
            if importlib.util.find_spec("lightning_obq.export") is None:
                raise ValueError("OBQCallback.export_path needs lightning_obq.export, which is not available")
        skip = (skip,) if isinstance(skip, str) else skip
        if not isinstance(skip, Sequence) or not all(isinstance(p, str) for p in skip):
            raise TypeError(f"OBQCallback.skip must be a string or a sequence of strings, got {skip!r}")
        unknown = sorted(set(quant_kwargs) - _CONFIG_FIELDS)
        if unknown:
            raise TypeError(
                f"OBQCallback got unknown arguments {unknown}; QuantConfig fields are {sorted(_CONFIG_FIELDS)}"
            )
        if config is not None:
            if not isinstance(config, QuantConfig):
                raise TypeError(f"OBQCallback.config must be a QuantConfig, got {type(config).__name__}")
            given = {"bits": bits, "method": method, "order": order, "calib_samples": calib_samples,
                     "reestimate_bn": reestimate_bn}
            clash = [k for k, v in given.items() if v != _EXPLICIT_DEFAULTS[k]] + sorted(quant_kwargs)
            if clash:
                raise ValueError(f"OBQCallback: pass either config=QuantConfig(...) or {clash}, not both")
            self.config = config.replace(exclude=tuple(config.exclude) + tuple(skip)) if skip else config
        else:
            exclude = quant_kwargs.pop("exclude", ())
            exclude = (exclude,) if isinstance(exclude, str) else tuple(exclude)
            self.config = QuantConfig(bits=bits, method=method, order=order, calib_samples=calib_samples,
                                      reestimate_bn=reestimate_bn, exclude=exclude + tuple(skip), **quant_kwargs)
        self.when = when
        self.calib_dataloader = calib_dataloader
        self.forward_fn = forward_fn
        self.evaluate = evaluate
        self.export_path = Path(export_path) if export_path is not None else None
        self.log_per_layer = log_per_layer
        self.report: QuantReport | None = None
        self.quantized = False
        self.export_file: Path | None = None
        self._pending: dict[str, Any] | None = None  # validation_start mode: FP metrics awaiting quantized ones
        self.wandb_offline = wandb_offline
        if wandb_offline:
            default_wandb_offline()  # must precede the WandbLogger's run, created before any callback hook

    # ------------------------------------------------------------------ state
    @property
    def state_key(self) -> str:
        return self._generate_state_key(bits=self.config.bits, method=self.config.method)

    def state_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "when": self.when,
            "quantized": self.quantized,
            "report": self.report.to_dict() if self.report is not None else None,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.quantized = bool(state_dict.get("quantized", False))
        report = state_dict.get("report")
        self.report = report_from_dict(report) if report else None
        saved = state_dict.get("config")
        if self.quantized and saved and saved != self.config.to_dict():
            log.warning("the checkpoint was quantized with a different OBQCallback config: %s", saved)

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.when == "validation_start" and stage == "fit":
            raise ValueError(
                "OBQCallback(when='validation_start') quantizes before trainer.validate/test and cannot be used "
                "in trainer.fit (training would move the weights off the grid); use when='fit_end'"
            )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.quantized:
            raise RuntimeError(
                "OBQCallback: this checkpoint holds a quantized model; resuming trainer.fit from it is refused "
                "because training would move the weights off the quantization grid. Load it with "
                "load_from_checkpoint() for evaluation, or fit again from the full-precision checkpoint."
            )

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.when != "fit_end" or self.quantized:
            return
        loaders = self._eval_loaders(trainer, pl_module, "validate") if self.evaluate else []
        self._quantize(trainer, pl_module, "validate", loaders, evaluate_after=True)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._quantize_before_loop(trainer, pl_module, "validate")

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._quantize_before_loop(trainer, pl_module, "test")

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finish_loop(trainer, pl_module, "validate")

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finish_loop(trainer, pl_module, "test")

    # ------------------------------------------------------------------ validation_start mode
    def _quantize_before_loop(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.when != "validation_start" or self.quantized or trainer.sanity_checking:
            return
        loaders = _as_list(trainer.val_dataloaders if stage == "validate" else trainer.test_dataloaders)
        self._quantize(trainer, pl_module, stage, loaders if self.evaluate else [], evaluate_after=False)

    def _finish_loop(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        pending, self._pending = self._pending, None
        if pending is None or pending["stage"] != stage or self.report is None:
            return
        quant = {k: float(v) for k, v in trainer.callback_metrics.items() if k in pending["fp"]}
        self.report.metrics.update(compare_metrics(pending["fp"], quant))
        self._log(trainer)

    # ------------------------------------------------------------------ the work
    def _quantize(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str,
                  loaders: list[Any], evaluate_after: bool) -> None:
        """Evaluate FP, quantize, evaluate quantized, log; on the strategy's device, then export."""
        home = model_device(pl_module)
        try:
            self._quantize_on_device(trainer, pl_module, stage, loaders, evaluate_after)
        finally:
            if evaluate_after:  # after fit: leave the module where the trainer's teardown put it
                pl_module.to(home)
        self._export(trainer, pl_module)

    def _quantize_on_device(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str,
                            loaders: list[Any], evaluate_after: bool) -> None:
        hooks = StrategyHooks(trainer.strategy)
        device = trainer.strategy.root_device
        pl_module.to(device)
        forward = self._forward(trainer)
        calibration = self._calibration_loader(trainer, pl_module, hooks)
        config = self.config
        if hooks.active and config.mixed_precision:
            raise ValueError(
                "OBQCallback: a mixed-precision budget (QuantConfig.budget/budget_mb) is not supported under DDP "
                "yet (the bit allocation runs on each rank's own batches); run it on one process"
            )
        if hooks.active:  # calib_samples is a global budget: each rank draws its share of its shard
            config = config.replace(calib_samples=shard_size(config.calib_samples, hooks.world_size))
        fp_metrics: dict[str, float] = {}
        reference: pl.LightningModule | None = None
        if loaders:
            fp_metrics = self._run_eval(trainer, pl_module, stage, loaders, hooks, device)
            reference = copy.deepcopy(pl_module)  # the FP copy: fidelity reference and the backup
        backup = None if reference is not None else {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        distributed = {"hessian_reducer": hooks.reduce_hessian, "layer_solver": hooks.solve_layers} \
            if hooks.active else {}
        report = quantize_model(pl_module, calibration, config, forward_fn=forward, **distributed)
        try:
            if hooks.active:
                if config.reestimate_bn:
                    hooks.sync_batchnorm(pl_module)
                report.samples = hooks.sum_int(report.samples)
                report.config = self.config.to_dict()
            if loaders:
                assert reference is not None
                fidelity = self._fidelity(trainer, stage, reference, pl_module, loaders, forward)
                quant_metrics = self._run_eval(trainer, pl_module, stage, loaders, hooks, device) \
                    if evaluate_after else {}
                report.metrics.update(compare_metrics(fp_metrics, quant_metrics))
                report.metrics.update({f"obq/{k}": v for k, v in fidelity.items()})
            self.report = report
            self.quantized = True
            if evaluate_after or not loaders:
                self._log(trainer)
            else:
                self._pending = {"stage": stage, "fp": fp_metrics}
        except BaseException:
            pl_module.load_state_dict(reference.state_dict() if reference is not None else backup)
            self.report, self.quantized, self._pending = None, False, None
            log.error("OBQCallback failed after quantizing; the module's FP weights and buffers were restored")
            raise

    def _forward(self, trainer: pl.Trainer) -> ForwardFn:
        """The user's forward (or the default), on batches moved by the module's batch-transfer hooks."""
        user = self.forward_fn or default_forward
        strategy = trainer.strategy

        def forward(model: torch.nn.Module, batch: Any) -> Any:
            return user(model, strategy.batch_to_device(batch, model_device(model)))

        return forward

    def _calibration_loader(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                            hooks: StrategyHooks) -> Iterable[Any]:
        if self.calib_dataloader is not None:
            return _shard(self.calib_dataloader, trainer, hooks)
        train = _as_list(trainer.train_dataloader)
        if train:
            return train[0]  # prepared by Lightning: already sharded under DDP
        for owner in (trainer.datamodule, pl_module):
            if owner is not None and is_overridden("train_dataloader", owner):
                return _shard(_call_loader(owner, "train_dataloader"), trainer, hooks)
        raise ValueError(
            "OBQCallback found no calibration data: pass OBQCallback(calib_dataloader=...) or give the trainer a "
            "train dataloader (datamodule or LightningModule.train_dataloader)"
        )

    def _eval_loaders(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> list[Any]:
        if trainer.limit_val_batches == 0:
            log.warning("OBQCallback: limit_val_batches=0, so FP vs quantized metrics are not measured")
            return []
        loaders = _as_list(trainer.val_dataloaders)
        if loaders:
            return loaders
        hooks = StrategyHooks(trainer.strategy)
        for owner in (trainer.datamodule, pl_module):
            if owner is not None and is_overridden("val_dataloader", owner):
                return [_shard(d, trainer, hooks) for d in _as_list(_call_loader(owner, "val_dataloader"))]
        log.warning("OBQCallback: no validation dataloader, so FP vs quantized metrics are not measured")
        return []

    def _run_eval(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str, loaders: list[Any],
                  hooks: StrategyHooks, device: torch.device) -> dict[str, float]:
        """The module's own validation/test metrics on ``loaders``, averaged over ranks."""
        metrics = evaluate_module(pl_module, loaders, stage, like=trainer)
        pl_module.to(device)
        keys = sorted(metrics)
        all_keys = hooks.broadcast(keys, src=0)
        if all_keys != keys:
            raise RuntimeError(f"ranks logged different validation metrics: {keys} vs rank 0 {all_keys}")
        return hooks.mean_metrics(metrics)

    def _fidelity(self, trainer: pl.Trainer, stage: str, reference: torch.nn.Module, quantized: torch.nn.Module,
                  loaders: list[Any], forward: ForwardFn) -> dict[str, float]:
        """Output fidelity of the quantized module against the FP copy on the evaluation batches."""
        limit = _batch_limit(trainer, stage, loaders)
        metric = OutputFidelity()
        modes = [(m, m.training) for m in (reference, quantized)]
        try:
            reference.eval()
            quantized.eval()
            with torch.no_grad():
                for loader, cap in zip(loaders, limit, strict=True):
                    for i, batch in enumerate(loader):
                        if i >= cap:
                            break
                        metric.update(forward(reference, batch), forward(quantized, batch))
        finally:
            for m, training in modes:
                m.train(training)
        return metric.compute()

    def _log(self, trainer: pl.Trainer) -> None:
        assert self.report is not None
        log_report(trainer.loggers, self.report, step=trainer.global_step, per_layer=self.log_per_layer,
                   is_global_zero=trainer.is_global_zero)
        rank_zero_info(f"OBQCallback report\n{self.report.table()}")

    def _export(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.export_path is None or self.report is None:
            return
        from .export import save_quantized

        path = None
        if trainer.is_global_zero:
            path = save_quantized(pl_module, self.export_path, self.report)
            rank_zero_info(f"OBQCallback: quantized model saved to {path}")
        self.export_file = StrategyHooks(trainer.strategy).broadcast(path, src=0)


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

    A separate Trainer without loggers, callbacks or checkpointing runs the loop, on the device, precision
    and batch limits of ``like`` (the user's trainer), so the module's ``self.log`` and torchmetrics work as
    in a normal validation while nothing is logged or saved on the user's side. The module's trainer
    reference is restored afterwards. Keys from several dataloaders keep Lightning's
    ``/dataloader_idx_N`` suffix.
    """
    if stage not in ("validate", "test"):
        raise ValueError(f"stage must be 'validate' or 'test', got {stage!r}")
    device = like.strategy.root_device if like is not None else model_device(pl_module)
    accelerator = device.type if device.type in ("cpu", "cuda", "mps") else "auto"
    kwargs: dict[str, Any] = {}
    if like is not None:
        kwargs = {"precision": like.precision, "limit_val_batches": like.limit_val_batches,
                  "limit_test_batches": like.limit_test_batches, "default_root_dir": like.default_root_dir}
    outer = pl_module._trainer
    rank = rank_zero_only.rank
    quiet = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric")]
    levels = [lg.level for lg in quiet]
    for lg in quiet:
        lg.setLevel(logging.WARNING)
    try:
        evaluator = pl.Trainer(
            accelerator=accelerator, devices=[device.index] if device.index is not None else 1,
            logger=False, callbacks=[], enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, num_sanity_val_steps=0, use_distributed_sampler=False, **kwargs,
        )
        run = evaluator.validate if stage == "validate" else evaluator.test
        results = run(pl_module, dataloaders=loaders, verbose=False)
    finally:
        pl_module.trainer = outer
        rank_zero_only.rank = rank
        for lg, level in zip(quiet, levels, strict=True):
            lg.setLevel(level)
    return {k: float(v) for d in results for k, v in d.items()}


def report_from_dict(data: Mapping[str, Any]) -> QuantReport:
    """Rebuild a `QuantReport` (without the tensors) from its ``to_dict()``, e.g. from a checkpoint."""
    names = {f.name for f in dataclasses.fields(QuantReport)} - {"results", "layers"}
    report = QuantReport(**{k: v for k, v in data.items() if k in names})
    report.layers = [LayerStats(**s) for s in data.get("layers", [])]
    return report


def _as_list(loaders: Any) -> list[Any]:
    """A Lightning dataloader collection (one loader, a list, or a dict) as a list."""
    if loaders is None:
        return []
    if isinstance(loaders, Mapping):
        return list(loaders.values())
    if isinstance(loaders, list | tuple):
        return list(loaders)
    return [loaders]


def _call_loader(owner: Any, name: str) -> Any:
    """``owner.train_dataloader()`` (or val), calling the datamodule's ``setup`` first if it needs it."""
    try:
        return getattr(owner, name)()
    except (AttributeError, RuntimeError, TypeError):
        if not isinstance(owner, pl.LightningDataModule):
            raise
        owner.setup("fit")
        return getattr(owner, name)()


def _shard(loader: Any, trainer: pl.Trainer, hooks: StrategyHooks) -> Any:
    """Under DDP, a plain map-style DataLoader re-made with a non-shuffling `DistributedSampler`."""
    if (not hooks.active or not isinstance(loader, DataLoader) or isinstance(loader.sampler, DistributedSampler)
            or isinstance(loader.dataset, IterableDataset) or loader.batch_size is None):
        return loader
    sampler = DistributedSampler(loader.dataset, shuffle=False, **trainer.strategy.distributed_sampler_kwargs)
    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler, num_workers=loader.num_workers,
                      collate_fn=loader.collate_fn, pin_memory=loader.pin_memory, drop_last=loader.drop_last)


def _batch_limit(trainer: pl.Trainer, stage: str, loaders: list[Any]) -> list[float]:
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
