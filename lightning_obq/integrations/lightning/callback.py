"""`OBQCallback`: post-training quantization inside any Lightning `Trainer`, single process or DDP."""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_obq.core.config import QuantConfig
from lightning_obq.integrations.lightning.arguments import callback_config, check_arguments
from lightning_obq.integrations.lightning.distributed import StrategyHooks, shard_size
from lightning_obq.integrations.lightning.evaluation import (
    batch_limit,
    compare_metrics,
    evaluate_fidelity,
    evaluate_on_ranks,
    evaluating,
    module_fingerprint,
)
from lightning_obq.integrations.lightning.handoff import SpawnHandoff, SpawnResults
from lightning_obq.integrations.lightning.loaders import (
    as_list,
    calibration_loader,
    evaluation_loaders,
    strategy_forward,
)
from lightning_obq.integrations.lightning.loggers import log_to_trainer
from lightning_obq.integrations.wandb import default_wandb_offline
from lightning_obq.model.calibration import ForwardFn, default_forward, model_device
from lightning_obq.model.quantize import quantize_model
from lightning_obq.model.report import QuantReport
from lightning_obq.model.state import restored_on_failure

log = logging.getLogger(__name__)

_VERB = {"validate": "validating", "test": "testing"}


class OBQCallback(SpawnResults, Callback):
    """Quantize the LightningModule's Conv/Linear weights with FastOBQ (or GPTQ/OBQ/RTN) from a Trainer.

    ``Trainer(callbacks=[OBQCallback(bits=4)]).fit(model)`` trains as usual, then at ``on_fit_end``:

    1. evaluates the FP module with its own ``validation_step`` on the validation dataloaders used by
       ``fit`` (or the datamodule's/module's ``val_dataloader``), on a copy of the module in a separate
       logger-less Trainer on the same device and precision (`evaluate_module`), so no checkpoint or
       early-stopping callback fires and the module, its metrics and trackers and the trainer's loops
       stay exactly as they were;
    2. draws calibration batches (``calib_dataloader``, else the fit's train dataloader, else the
       datamodule's or module's ``train_dataloader``), moved by the module's own batch-transfer hooks;
    3. quantizes the module in place with `quantize_model`; BatchNorm as ``bn_mode`` says (default
       ``"auto"``: trained statistics kept, bias-corrected or re-estimated, whichever measures closest to
       the FP model on held-back calibration samples; ``report.batchnorm`` says which and why);
    4. evaluates the quantized module the same way and measures output fidelity against the FP module
       (top-1 agreement, KL divergence; `lightning_obq.model.fidelity`);
    5. logs everything to every logger of the trainer and to ``trainer.callback_metrics`` /
       ``trainer.logged_metrics`` (`lightning_obq.integrations.lightning.loggers` lists the names; a
       `WandbLogger` also gets a per-layer table and an error plot) and prints the report table;
    6. saves the quantized model as a checkpoint beside the ``ModelCheckpoint`` files,
       ``<dirpath>/obq-w<bits>-final.ckpt`` (``save_checkpoint``; the FP ``best``/``last`` files stay), and
       with `lightning_obq.export.save_quantized` if ``export_path`` is set.

    How it behaves in ``trainer.validate``/``trainer.test``, the names it logs under, DDP and spawn
    strategies, checkpoints, failures and W&B: see the `lightning_obq.integrations.lightning` package.

    **Settings**: the quantization settings are `QuantConfig`'s own, which owns their defaults and checks:
    ``bits``, ``method``, ``order``, ``calib_samples``, ``bn_mode`` and ``reestimate_bn`` are named here (so
    LightningCLI and Hydra configs can set them), any other field goes through ``**config_fields``, and
    ``None`` means "`QuantConfig`'s default". Or pass a ready ``config=QuantConfig(...)`` (then none of them).

    Args:
        bits: weight bit width (2..8; default `QuantConfig`'s, 4).
        method: ``"fastobq"`` (default), ``"gptq"``, ``"obq"`` or ``"rtn"``.
        order: column order (``None``: the method's default); see `QuantConfig`.
        when: ``"fit_end"`` (default) or ``"validation_start"`` (refuses ``fit``).
        calib_dataloader: calibration batches (any iterable of batches); default: the train dataloader (of
            the running fit, else the datamodule's or module's, else the one the last fit used).
        calib_samples: maximum calibration samples (over all ranks).
        forward_fn: ``forward_fn(module, batch)`` for batches that are not a tensor, ``(input, ...)`` tuple
            or dict with an input key; batches reach it already moved by the module's transfer hooks.
        reestimate_bn: the older spelling of ``bn_mode``: ``True`` is ``"reestimate"``, ``False`` ``"keep"``.
        bn_mode: BatchNorm after quantizing: ``"auto"`` (default), ``"keep"``, ``"correct"``, ``"reestimate"``.
        skip: layer-name patterns (``fnmatch``) left in full precision, e.g. ``("fc", "stem.*")``.
        evaluate: measure FP and quantized validation metrics and output fidelity.
        export_path: file written by `lightning_obq.export.save_quantized` on rank zero (safetensors); ``None``: none.
        save_checkpoint: save the quantized model as a Lightning checkpoint beside the ``ModelCheckpoint``
            files at the end of fit and beside a full-precision checkpoint quantized for validate/test.
        log_per_layer: also log per-layer scalars (``obq/layer/<name>/...``) to every logger.
        wandb_offline: set ``WANDB_MODE=offline`` when it is unset (see W&B above).
        config: a ready `QuantConfig` instead of the individual settings (then pass none of them); ``skip``
            is still added to its ``exclude``.
        **config_fields: any other `QuantConfig` field (``granularity``, ``symmetric``, ``damp``, ...).
    """

    def __init__(
        self,
        bits: int | None = None,
        method: str | None = None,
        order: str | None = None,
        when: str = "fit_end",
        calib_dataloader: Iterable[Any] | None = None,
        calib_samples: int | None = None,
        forward_fn: ForwardFn | None = None,
        reestimate_bn: bool | None = None,
        bn_mode: str | None = None,
        skip: str | Sequence[str] = (),
        evaluate: bool = True,
        export_path: str | os.PathLike[str] | None = None,
        save_checkpoint: bool = True,
        log_per_layer: bool = True,
        wandb_offline: bool = True,
        config: QuantConfig | None = None,
        **config_fields: Any,
    ) -> None:
        super().__init__()
        check_arguments(when, calib_dataloader, forward_fn, export_path, evaluate=evaluate,
                        log_per_layer=log_per_layer, wandb_offline=wandb_offline, save_checkpoint=save_checkpoint)
        fields = {"bits": bits, "method": method, "order": order, "calib_samples": calib_samples,
                  "bn_mode": bn_mode, "reestimate_bn": reestimate_bn, **config_fields}
        self.config = callback_config(config, skip, fields, type(self).__init__)
        self.when = when
        self.calib_dataloader = calib_dataloader
        self.forward_fn = forward_fn
        self.evaluate = evaluate
        self.export_path = Path(export_path) if export_path is not None else None
        self.save_checkpoint = save_checkpoint
        self.log_per_layer = log_per_layer
        self.export_file: Path | None = None
        self.checkpoint_files: dict[str, Path] = {}  # "final" or the source checkpoint's name -> quantized file
        self._report: QuantReport | None = None
        self._quantized = False
        self._pending: dict[str, Any] | None = None  # an evaluation loop whose quantized metrics are awaited
        self._loaded_state: dict[str, Any] | None = None  # this callback's state in the checkpoint just loaded
        self._fingerprints: dict[str, str | None] = {}  # "fp" / "quantized": digests of the module's state
        self._quantized_state: dict[str, torch.Tensor] | None = None  # CPU copy, to put back over FP weights
        self._logged_names: dict[int, set[str]] = {}  # step -> names this callback logged at it
        self._fit_calibration: Iterable[Any] | None = None  # the train loader of the last fit
        self._handoff = SpawnHandoff(self)
        self.wandb_offline = wandb_offline
        if wandb_offline:
            default_wandb_offline()  # must precede the WandbLogger's run, created before any callback hook

    # ------------------------------------------------------------------ state
    @property
    def state_key(self) -> str:
        return self._generate_state_key(bits=self.config.bits, method=self.config.method)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "when": self.when,
            "quantized": self.quantized,
            "report": self.report.to_dict() if self.report is not None else None,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Remember what the checkpoint says; a quantized one brings its report along.

        A checkpoint saved before quantizing (``best``/``last`` of the same fit) does not erase this
        process's quantization: `prepare_evaluation` decides what to do with its weights.
        """
        self._loaded_state = dict(state_dict)
        if not state_dict.get("quantized", False):
            return
        self.quantized = True
        report = state_dict.get("report")
        self.report = QuantReport.from_dict(report) if report else None
        saved = state_dict.get("config")
        if saved and saved != self.config.to_dict():
            log.warning("the checkpoint was quantized with a different OBQCallback config: %s", saved)

    # ------------------------------------------------------------------ hooks: thin, each calls a public method
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.when == "validation_start" and stage == "fit":
            raise ValueError(
                "OBQCallback(when='validation_start') quantizes before trainer.validate/test and cannot be used "
                "in trainer.fit (training would move the weights off the grid); use when='fit_end'"
            )
        self._loaded_state = None  # checkpoint states are restored after setup

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.check_trainable(pl_module)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.when == "fit_end":
            self.quantize_after_fit(trainer, pl_module)

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if evaluating(trainer):
            self.prepare_evaluation(trainer, pl_module, "validate")

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if evaluating(trainer):
            self.prepare_evaluation(trainer, pl_module, "test")

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if evaluating(trainer):
            self.finish_evaluation(trainer, "validate")

    @override
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if evaluating(trainer):
            self.finish_evaluation(trainer, "test")

    # ------------------------------------------------------------------ public steps
    def check_trainable(self, pl_module: pl.LightningModule) -> None:
        """Refuse to train quantized weights; a fit from full-precision weights starts afresh."""
        loaded_quantized = bool(self._loaded_state and self._loaded_state.get("quantized"))
        ours = self._fingerprints.get("quantized")
        if loaded_quantized or (ours is not None and ours == module_fingerprint(pl_module)):
            raise RuntimeError(
                "OBQCallback: this checkpoint holds a quantized model; resuming trainer.fit from it is refused "
                "because training would move the weights off the quantization grid. Load it with "
                "load_from_checkpoint() for evaluation, or fit again from the full-precision checkpoint."
            )
        self.quantized = False

    def quantize_after_fit(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Evaluate FP, quantize, evaluate quantized, log, save the quantized checkpoint and export."""
        loaders = evaluation_loaders(trainer, pl_module) if self.evaluate else []
        self._quantize(trainer, pl_module, "validate", loaders, evaluate_after=True)
        if self.save_checkpoint:
            self.save_quantized_checkpoint(trainer, None)
        self._send(trainer)

    def prepare_evaluation(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Before a validate/test loop: make sure the module the loop runs is quantized (see the class doc)."""
        ckpt = trainer.ckpt_path
        what = f"checkpoint {ckpt}" if ckpt else "the module"
        tag = f"W{self.config.bits} {self.config.method}"
        current = module_fingerprint(pl_module)
        if current == self._fingerprints.get("quantized"):
            rank_zero_info(f"OBQCallback: {what} is already quantized ({tag}); {_VERB[stage]} it as is, "
                           "no new quantization")
            self._pending = {"stage": stage, "fp": {}, "new": False} if self.evaluate else None
            return
        if self._loaded_state is not None and self._loaded_state.get("quantized"):
            rank_zero_info(f"OBQCallback: {what} was saved after OBQCallback quantized it ({tag}); "
                           f"{_VERB[stage]} it as is, no new quantization")
            self._fingerprints, self._quantized_state = {"fp": None, "quantized": current}, None
            self._pending = {"stage": stage, "fp": {}, "new": False} if self.evaluate else None
            return
        loaders = as_list(trainer.val_dataloaders if stage == "validate" else trainer.test_dataloaders)
        loaders = loaders if self.evaluate else []
        if current == self._fingerprints.get("fp") and self._quantized_state is not None:
            hooks = StrategyHooks(trainer.strategy)
            fp_metrics = evaluate_on_ranks(pl_module, loaders, stage, trainer, hooks) if loaders else {}
            pl_module.load_state_dict(self._quantized_state)
            self.quantized = True
            saved = self.checkpoint_files.get("final")
            rank_zero_info(f"OBQCallback: {what} holds the full-precision weights this callback quantized ({tag}); "
                           f"{_VERB[stage]} the quantized weights instead" + (f" (saved as {saved})" if saved else ""))
            self._pending = {"stage": stage, "fp": fp_metrics, "new": False} if self.evaluate else None
            return
        if ckpt:
            rank_zero_info(f"OBQCallback: {what} holds full-precision weights; quantizing them ({tag}) before "
                           f"{_VERB[stage]}")
        self._quantize(trainer, pl_module, stage, loaders, evaluate_after=False)
        if ckpt and self.save_checkpoint:
            self.save_quantized_checkpoint(trainer, Path(ckpt))

    def finish_evaluation(self, trainer: pl.Trainer, stage: str) -> None:
        """After a validate/test loop: compare its (quantized) metrics with the FP ones and log them."""
        pending, self._pending = self._pending, None
        if pending is None or pending["stage"] != stage or self.report is None:
            return
        quant = {k: float(v) for k, v in trainer.callback_metrics.items()
                 if not k.startswith("obq/") and (not pending["fp"] or k in pending["fp"])}
        metrics = compare_metrics(pending["fp"], quant)
        self.report.metrics.update(metrics)
        self._log(trainer, None if pending["new"] else metrics)
        self._send(trainer)

    def save_quantized_checkpoint(self, trainer: pl.Trainer, source: Path | None) -> Path | None:
        """Save the (quantized) module as a Lightning checkpoint next to the FP ones; return its path.

        ``source=None`` (end of fit): ``<ModelCheckpoint dirpath>/obq-w<bits>-final.ckpt``, nothing without a
        checkpoint callback. Otherwise ``obq-w<bits>-<source name>.ckpt`` beside ``source``. The name does not
        start with ``last``, so Lightning's ``ckpt_path="last"`` still finds the FP ``last.ckpt``.
        """
        if source is None:
            dirpath = getattr(trainer.checkpoint_callback, "dirpath", None)
            if not dirpath:
                return None
            key, path = "final", Path(dirpath) / f"obq-w{self.config.bits}-final.ckpt"
        else:
            key, path = source.stem, source.parent / f"obq-w{self.config.bits}-{source.stem}.ckpt"
        try:
            trainer.save_checkpoint(path)
        except OSError as exc:
            rank_zero_warn(f"OBQCallback: could not save the quantized checkpoint {path}: {exc}")
            return None
        self.checkpoint_files[key] = path
        rank_zero_info(f"OBQCallback: quantized checkpoint saved as {path} (full-precision checkpoints kept)")
        return path

    # ------------------------------------------------------------------ the work
    def _quantize(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str,
                  loaders: list[Any], evaluate_after: bool) -> None:
        """Evaluate FP, quantize, evaluate quantized, log; on the strategy's device, then export.

        Random number generators are forked, so drawing calibration batches and evaluating leave the
        global RNG where training/evaluation left it.
        """
        home = model_device(pl_module)
        before = module_fingerprint(pl_module)
        devices = sorted({d.index for d in (home, trainer.strategy.root_device)
                          if d.type == "cuda" and d.index is not None})
        try:
            with torch.random.fork_rng(devices=devices):
                self._quantize_on_device(trainer, pl_module, stage, loaders, evaluate_after)
        finally:
            if evaluate_after:  # after fit: leave the module where the trainer's teardown put it
                pl_module.to(home)
        self._quantized_state = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
        self._fingerprints = {"fp": before, "quantized": module_fingerprint(pl_module)}
        self._export(trainer, pl_module)

    def _quantize_on_device(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str,
                            loaders: list[Any], evaluate_after: bool) -> None:
        hooks = StrategyHooks(trainer.strategy)
        pl_module.to(trainer.strategy.root_device)
        forward = strategy_forward(trainer.strategy, self.forward_fn or default_forward)
        calibration = self._calibration(trainer, pl_module, hooks)
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
            fp_metrics = evaluate_on_ranks(pl_module, loaders, stage, trainer, hooks)
            reference = copy.deepcopy(pl_module)  # the FP copy: the fidelity reference
        distributed = {"hessian_reducer": hooks.reduce_hessian, "layer_solver": hooks.solve_layers,
                       "batchnorm_sync": hooks.batchnorm_sync()} if hooks.active else {}
        try:
            with restored_on_failure(pl_module, "OBQCallback failed; the module's FP weights and buffers were "
                                                "restored"):
                report = quantize_model(pl_module, calibration, config, forward_fn=forward, **distributed)
                self._evaluate_quantized(trainer, pl_module, stage, loaders, evaluate_after, report, fp_metrics,
                                         reference, forward, hooks)
        except BaseException:
            self.report, self.quantized, self._pending = None, False, None
            raise

    def _evaluate_quantized(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str,
                            loaders: list[Any], evaluate_after: bool, report: QuantReport,
                            fp_metrics: dict[str, float], reference: torch.nn.Module | None, forward: ForwardFn,
                            hooks: StrategyHooks) -> None:
        """Fidelity and (after fit) the quantized metrics into ``report``, then log it or await the loop's."""
        if hooks.active:
            report.samples = hooks.sum_int(report.samples)
            report.config = self.config.to_dict()
        if loaders:
            assert reference is not None
            fidelity = evaluate_fidelity(reference, pl_module, loaders, forward, batch_limit(trainer, stage, loaders))
            quant_metrics = evaluate_on_ranks(pl_module, loaders, stage, trainer, hooks) if evaluate_after else {}
            report.metrics.update(compare_metrics(fp_metrics, quant_metrics))
            report.metrics.update({f"obq/{k}": v for k, v in fidelity.items()})
        self.report = report
        self.quantized = True
        if evaluate_after or not loaders:
            self._log(trainer, None)
            self._pending = None
        else:
            self._pending = {"stage": stage, "fp": fp_metrics, "new": True}

    def _calibration(self, trainer: pl.Trainer, pl_module: pl.LightningModule, hooks: StrategyHooks) -> Iterable[Any]:
        """The calibration batches (`calibration_loader`); remembers a fit's train loader for later evaluations."""
        loader, from_fit = calibration_loader(trainer, pl_module, self.calib_dataloader, self._fit_calibration, hooks)
        self._fit_calibration = from_fit or self._fit_calibration
        return loader

    def _log(self, trainer: pl.Trainer, metrics: Mapping[str, float] | None) -> None:
        """Log the whole report (``metrics=None``) or just ``metrics`` (`log_to_trainer`)."""
        assert self.report is not None
        log_to_trainer(trainer, self.report, metrics, self.log_per_layer, self._logged_names)

    def _export(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.export_path is None or self.report is None:
            return
        from lightning_obq.export.artifact import save_quantized

        path = None
        if trainer.is_global_zero:
            path = save_quantized(pl_module, self.export_path, self.report)
            rank_zero_info(f"OBQCallback: quantized model saved to {path}")
        self.export_file = StrategyHooks(trainer.strategy).broadcast(path, src=0)

