"""`OBQCallback`: post-training quantization inside any Lightning `Trainer`, single process or DDP."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import importlib.util
import inspect
import json
import logging
import os
import re
import tempfile
import weakref
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_only, rank_zero_warn
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset
from torchmetrics import Metric
from typing_extensions import override

from .calibration import ForwardFn, default_forward, model_device
from .config import QuantConfig
from .distributed import StrategyHooks, shard_size
from .fidelity import OutputFidelity
from .loggers import default_wandb_offline, log_report, report_metrics
from .quantize import quantize_model
from .report import LayerStats, QuantReport

log = logging.getLogger(__name__)

WHEN = ("fit_end", "validation_start")
_CONFIG_FIELDS = {f.name for f in dataclasses.fields(QuantConfig)}
_EXPLICIT_DEFAULTS = {"bits": 4, "method": "fastobq", "order": None, "calib_samples": 2048, "bn_mode": "auto",
                      "reestimate_bn": None, "skip": ()}
_VERB = {"validate": "validating", "test": "testing"}


class OBQCallback(Callback):
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
       (top-1 agreement, KL divergence; `lightning_obq.fidelity`);
    5. logs everything to every logger of the trainer and to ``trainer.callback_metrics`` /
       ``trainer.logged_metrics`` (`lightning_obq.loggers` lists the names; a `WandbLogger` also gets a
       per-layer table and an error plot) and prints the report table;
    6. saves the quantized model as a checkpoint beside the ``ModelCheckpoint`` files,
       ``<dirpath>/obq-w<bits>-final.ckpt`` (``save_checkpoint``; the FP ``best``/``last`` files stay), and
       with `lightning_obq.export.save_quantized` if ``export_path`` is set.

    **validate / test** (any ``when``): outside ``fit`` the callback makes sure the evaluated model is
    quantized, after Lightning has loaded any ``ckpt_path`` and before the first batch, and says what it
    did in one line whenever it does not quantize afresh:

    - the module already holds this callback's quantized weights (``trainer.test()`` after ``fit``, or the
      ``obq-w<bits>-final.ckpt`` file): evaluated as is;
    - the checkpoint was saved after OBQCallback quantized it (another process): evaluated as is;
    - the checkpoint holds exactly the FP weights this callback quantized (``ckpt_path="last"`` after
      ``fit``): its FP metrics are measured, then the quantized weights are put back;
    - any other full-precision weights (``ckpt_path="best"`` from an earlier epoch, a saved file in an
      evaluation script): FP metrics measured on that loop's dataloaders, then quantized, and the result
      saved as ``obq-w<bits>-<checkpoint name>.ckpt`` beside the loaded file.

    So ``trainer.fit(model); trainer.test(ckpt_path="best")`` reports the quantized model. The loop's own
    metrics are then the quantized ones under the module's names; the callback adds ``obq/<name>``,
    ``obq/fp/<name>`` and ``obq/<name>_delta``. ``when="validation_start"`` differs from the default only in
    refusing ``trainer.fit`` (quantizing between training steps would move weights off the grid).

    **Metric names**: everything this callback logs starts with ``obq/``, so it never logs a second value
    under a name the module logs at the same step: FP task metrics as ``obq/fp/<name>``, quantized ones as
    ``obq/<name>``. A second quantization logged at a step where this callback already logged one (fit,
    then ``test(ckpt_path="best")`` on another epoch's weights) puts each name it would repeat under
    ``obq/ckpt/...``. ``callback.report.metrics`` keeps the FP values under their own names (``val_acc``),
    the quantized ones as ``obq/val_acc``, the difference ``obq/val_acc_delta``, and ``obq/top1_agreement``
    / ``obq/kl_div``. Best-so-far trackers (torchmetrics ``MaxMetric``/``MinMetric`` ...) are reset in the
    evaluation copy, so ``obq/val/acc_best`` is the best over that one evaluation (equal to
    ``obq/val/acc``), never the training history.

    **DDP** (``strategy="ddp"``, one or many nodes): every rank calibrates on its shard (Lightning's
    ``DistributedSampler`` of the train loader; a given ``calib_dataloader`` is sharded the same way), with
    ``calib_samples`` split over the ranks; Hessians and sample counts are all-reduced, each layer is solved
    once on one rank and broadcast, and the BatchNorm step (fitting, ``auto``'s scores and choice) runs over
    all ranks' samples (`StrategyHooks.batchnorm_sync`), so every rank ends with identical weights.
    Validation metrics are averaged over ranks like ``self.log(..., sync_dist=True)``.
    **Spawn strategies** (``ddp_spawn``, ``ddp_fork``, ``ddp_notebook``): Lightning returns the weights and
    ``callback_metrics`` to the main process; rank zero also hands the report (without its tensors) and the
    checkpoint paths back through a temporary JSON file, read on first use of ``callback.report``.

    **Checkpoints**: `state_dict` holds the config, ``quantized`` and the report (``to_dict``). A checkpoint
    saved after quantizing holds the quantized weights (on the grid) and reloads as the quantized model.
    Resuming ``trainer.fit`` from it is refused with a `RuntimeError` (training would move the weights off
    the grid): load the weights with ``load_from_checkpoint`` and start a new fit to fine-tune.

    **Failures**: bad arguments raise at construction (`ValueError`/`TypeError` naming the ``OBQCallback``
    argument, with the closest valid name for a misspelt one). If quantization fails, `quantize_model`
    restores the FP weights; if anything after it fails (the quantized evaluation, fidelity, logging), the
    callback restores the FP weights and buffers itself and re-raises, so the module is never left half-done.
    A failing export (the last step) leaves the module quantized and re-raises. Under DDP an error raised on
    only one rank inside a collective (for example a validation step failing on one rank only) can still
    stall the other ranks until the process-group timeout; quantization errors themselves are propagated to
    all ranks.

    **W&B**: runs are offline unless the user chose a mode: when ``WANDB_MODE`` is unset, the constructor
    sets ``WANDB_MODE=offline`` for the process (Lightning creates the `WandbLogger` run before any callback
    hook, so the constructor is the last moment that works). ``WANDB_MODE=online``,
    ``WandbLogger(mode="online")`` or ``OBQCallback(wandb_offline=False)`` keep runs online; upload an offline
    run later with ``wandb sync <run dir>``.

    Args:
        bits: weight bit width (2..8).
        method: ``"fastobq"``, ``"gptq"``, ``"obq"`` or ``"rtn"``.
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
        reestimate_bn: bool | None = None,
        bn_mode: str = "auto",
        skip: str | Sequence[str] = (),
        evaluate: bool = True,
        export_path: str | os.PathLike[str] | None = None,
        save_checkpoint: bool = True,
        log_per_layer: bool = True,
        wandb_offline: bool = True,
        config: QuantConfig | None = None,
        **quant_kwargs: Any,
    ) -> None:
        super().__init__()
        if when not in WHEN:
            raise ValueError(f"OBQCallback(when={when!r}) is not one of {list(WHEN)}")
        if calib_dataloader is not None:
            if isinstance(calib_dataloader, str | bytes) or not isinstance(calib_dataloader, Iterable):
                raise TypeError(
                    f"OBQCallback(calib_dataloader=...) must be a DataLoader or an iterable of batches, "
                    f"got {type(calib_dataloader).__name__}"
                )
            if hasattr(calib_dataloader, "__len__") and len(calib_dataloader) == 0:  # type: ignore[arg-type]
                raise ValueError("OBQCallback(calib_dataloader=...) is empty: it yields no batches")
        if forward_fn is not None and not callable(forward_fn):
            raise TypeError(f"OBQCallback(forward_fn=...) must be callable, got {type(forward_fn).__name__}")
        for name, value in (("evaluate", evaluate), ("log_per_layer", log_per_layer), ("wandb_offline", wandb_offline),
                            ("save_checkpoint", save_checkpoint)):
            if not isinstance(value, bool):
                raise TypeError(f"OBQCallback({name}=...) must be a bool, got {value!r}")
        if export_path is not None:
            if not isinstance(export_path, str | os.PathLike) or not str(export_path):
                raise TypeError(f"OBQCallback(export_path=...) must be a non-empty path, got {export_path!r}")
            if importlib.util.find_spec("lightning_obq.export") is None:
                raise ValueError("OBQCallback(export_path=...) needs lightning_obq.export, which is not available")
        skip = (skip,) if isinstance(skip, str) else skip
        if not isinstance(skip, Sequence) or not all(isinstance(p, str) for p in skip):
            raise TypeError(f"OBQCallback(skip=...) must be a string or a sequence of strings, got {skip!r}")
        unknown = sorted(set(quant_kwargs) - _CONFIG_FIELDS)
        if unknown:
            raise unknown_argument_error(unknown)
        given = {"bits": bits, "method": method, "order": order, "calib_samples": calib_samples,
                 "bn_mode": bn_mode, "reestimate_bn": reestimate_bn}
        if config is not None:
            if not isinstance(config, QuantConfig):
                raise TypeError(f"OBQCallback(config=...) must be a QuantConfig, got {type(config).__name__}")
            clash = [k for k, v in given.items() if v != _EXPLICIT_DEFAULTS[k]] + sorted(quant_kwargs)
            if clash:
                raise ValueError(f"OBQCallback: pass either config=QuantConfig(...) or {clash}, not both")
            self.config = config.replace(exclude=tuple(config.exclude) + tuple(skip)) if skip else config
        else:
            exclude = quant_kwargs.pop("exclude", ())
            exclude = (exclude,) if isinstance(exclude, str) else tuple(exclude)
            given.update(quant_kwargs)
            try:
                self.config = QuantConfig(exclude=exclude + tuple(skip), **given)
            except (ValueError, TypeError) as exc:
                raise callback_argument_error(exc, given) from exc
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
        self._creator_pid = os.getpid()
        self._handoff = Path(tempfile.gettempdir()) / f"lightning_obq_{os.getpid()}_{id(self):x}.json"
        weakref.finalize(self, _unlink, self._handoff, self._creator_pid)
        self.wandb_offline = wandb_offline
        if wandb_offline:
            default_wandb_offline()  # must precede the WandbLogger's run, created before any callback hook

    # ------------------------------------------------------------------ results (also across spawned processes)
    @property
    def report(self) -> QuantReport | None:
        """The `QuantReport` of the last quantization (``None`` before any)."""
        self._receive()
        return self._report

    @report.setter
    def report(self, value: QuantReport | None) -> None:
        self._report = value

    @property
    def quantized(self) -> bool:
        """True once this callback quantized the module (or loaded a checkpoint it had quantized)."""
        self._receive()
        return self._quantized

    @quantized.setter
    def quantized(self, value: bool) -> None:
        self._quantized = value

    def __getstate__(self) -> dict[str, Any]:
        self._receive()  # a spawn launcher pickles the callback: take along what the last workers handed back
        return dict(self.__dict__)

    def _send(self, trainer: pl.Trainer) -> None:
        """In a process spawned/forked by the strategy, rank zero hands the results to the main process."""
        if os.getpid() == self._creator_pid or not trainer.is_global_zero:
            return
        data = {"report": self._report.to_dict() if self._report is not None else None,
                "quantized": self._quantized, "fingerprints": self._fingerprints,
                "checkpoint_files": {k: str(v) for k, v in self.checkpoint_files.items()},
                "export_file": str(self.export_file) if self.export_file is not None else None}
        partial = self._handoff.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(json.dumps(data))
        partial.replace(self._handoff)

    def _receive(self) -> None:
        """In the process that built the callback, read what spawned workers handed back (once)."""
        if os.getpid() != self._creator_pid or not self._handoff.exists():
            return
        data = json.loads(self._handoff.read_text())
        self._handoff.unlink()
        self._report = report_from_dict(data["report"]) if data["report"] else None
        self._quantized = bool(data["quantized"])
        self._fingerprints = data["fingerprints"]
        self._quantized_state = None  # the tensors stay in the workers; the weights came back via Lightning
        self.checkpoint_files = {k: Path(v) for k, v in data["checkpoint_files"].items()}
        self.export_file = Path(data["export_file"]) if data["export_file"] else None

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
        self.report = report_from_dict(report) if report else None
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
        if _evaluating(trainer):
            self.prepare_evaluation(trainer, pl_module, "validate")

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if _evaluating(trainer):
            self.prepare_evaluation(trainer, pl_module, "test")

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if _evaluating(trainer):
            self.finish_evaluation(trainer, "validate")

    @override
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if _evaluating(trainer):
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
        loaders = self._eval_loaders(trainer, pl_module) if self.evaluate else []
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
        loaders = _as_list(trainer.val_dataloaders if stage == "validate" else trainer.test_dataloaders)
        loaders = loaders if self.evaluate else []
        if current == self._fingerprints.get("fp") and self._quantized_state is not None:
            hooks = StrategyHooks(trainer.strategy)
            fp_metrics = self._run_eval(trainer, pl_module, stage, loaders, hooks) if loaders else {}
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
            fp_metrics = self._run_eval(trainer, pl_module, stage, loaders, hooks)
            reference = copy.deepcopy(pl_module)  # the FP copy: fidelity reference and the backup
        backup = None if reference is not None else {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        distributed = {"hessian_reducer": hooks.reduce_hessian, "layer_solver": hooks.solve_layers,
                       "batchnorm_sync": hooks.batchnorm_sync()} if hooks.active else {}
        report = quantize_model(pl_module, calibration, config, forward_fn=forward, **distributed)
        try:
            if hooks.active:
                report.samples = hooks.sum_int(report.samples)
                report.config = self.config.to_dict()
            if loaders:
                assert reference is not None
                fidelity = self._fidelity(trainer, stage, reference, pl_module, loaders, forward)
                quant_metrics = self._run_eval(trainer, pl_module, stage, loaders, hooks) if evaluate_after else {}
                report.metrics.update(compare_metrics(fp_metrics, quant_metrics))
                report.metrics.update({f"obq/{k}": v for k, v in fidelity.items()})
            self.report = report
            self.quantized = True
            if evaluate_after or not loaders:
                self._log(trainer)
                self._pending = None
            else:
                self._pending = {"stage": stage, "fp": fp_metrics, "new": True}
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
            self._fit_calibration = train[0]  # for a later validate/test of another checkpoint
            return train[0]  # prepared by Lightning: already sharded under DDP
        for owner in (trainer.datamodule, pl_module):
            if owner is not None and is_overridden("train_dataloader", owner):
                return _shard(_call_loader(owner, "train_dataloader"), trainer, hooks)
        if self._fit_calibration is not None:  # validate/test after fit(model, train_loader) in this process
            return self._fit_calibration
        raise ValueError(
            "OBQCallback found no calibration data: pass OBQCallback(calib_dataloader=...) or give the trainer a "
            "train dataloader (datamodule or LightningModule.train_dataloader)"
        )

    def _eval_loaders(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[Any]:
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
                  hooks: StrategyHooks) -> dict[str, float]:
        """The module's own validation/test metrics on ``loaders`` (on a copy), averaged over ranks."""
        metrics = evaluate_module(pl_module, loaders, stage, like=trainer)
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

    def _log(self, trainer: pl.Trainer, metrics: Mapping[str, float] | None = None) -> None:
        """Log the whole report (``metrics=None``) or just ``metrics``, to the loggers and the trainer's dicts."""
        assert self.report is not None
        scalars = report_metrics(self.report, self.log_per_layer) if metrics is None else metrics
        step = trainer.global_step
        named = self._step_names(step, scalars)
        log_report(trainer.loggers, self.report, step=step, per_layer=self.log_per_layer,
                   is_global_zero=trainer.is_global_zero, metrics=named, extras=metrics is None)
        values = {k: torch.tensor(v) for k, v in named.items()}
        trainer.callback_metrics.update(values)  # monitors and `optimized_metric` read these
        trainer.logged_metrics.update(values)
        if metrics is None:
            rank_zero_info(f"OBQCallback report\n{self.report.table()}")

    def _step_names(self, step: int, scalars: Mapping[str, float]) -> dict[str, float]:
        """Logged names: FP task metrics under ``obq/fp/``; a name this callback already logged at ``step``
        under ``obq/ckpt/`` (``obq/ckpt<n>/`` for the n-th), so no name gets two values at one step."""
        taken = self._logged_names.setdefault(step, set())
        out: dict[str, float] = {}
        for key, value in scalars.items():
            base = key.removeprefix("obq/") if key.startswith("obq/") else f"fp/{key}"
            name, n = f"obq/{base}", 1
            while name in taken:
                n += 1
                name = f"obq/ckpt{'' if n == 2 else n}/{base}"
            out[name] = float(value)
        taken.update(out)
        return out

    def _export(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.export_path is None or self.report is None:
            return
        from .export import save_quantized

        path = None
        if trainer.is_global_zero:
            path = save_quantized(pl_module, self.export_path, self.report)
            rank_zero_info(f"OBQCallback: quantized model saved to {path}")
        self.export_file = StrategyHooks(trainer.strategy).broadcast(path, src=0)


def unknown_argument_error(unknown: Sequence[str]) -> TypeError:
    """The error for misspelt/unknown ``OBQCallback`` keyword arguments, with the closest valid names."""
    own = [p for p in inspect.signature(OBQCallback.__init__).parameters if p not in ("self", "quant_kwargs")]
    fields = sorted(_CONFIG_FIELDS - set(own))
    parts = []
    for name in unknown:
        close = difflib.get_close_matches(name, own + fields, n=1, cutoff=0.6)
        parts.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return TypeError(
        f"OBQCallback got unknown argument(s) {', '.join(parts)}. OBQCallback arguments: {', '.join(own)}; "
        f"any other QuantConfig field is accepted too: {', '.join(fields)}"
    )


def callback_argument_error(exc: Exception, given: Mapping[str, Any]) -> Exception:
    """A `QuantConfig` validation error re-worded to name the ``OBQCallback(...)`` argument the user wrote."""
    match = re.search(r"QuantConfig\.(\w+)", str(exc))
    field = match.group(1) if match else None
    if field not in given:
        return exc
    return type(exc)(f"OBQCallback({field}={given[field]!r}): {exc}")


def module_fingerprint(module: torch.nn.Module) -> str:
    """SHA-256 of the module's ``state_dict`` (names, dtypes, shapes, bytes): tells FP, quantized and
    other weights apart without keeping a copy of them."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        t = tensor.detach()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        digest.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _evaluating(trainer: pl.Trainer) -> bool:
    """A ``trainer.validate``/``trainer.test`` run (not fit's own validation or sanity check)."""
    return trainer.state.fn in (TrainerFn.VALIDATING, TrainerFn.TESTING) and not trainer.sanity_checking


def _unlink(path: Path, owner: int) -> None:
    """Remove an unread handoff file, in the process that created the callback only (not a forked worker)."""
    if os.getpid() == owner:
        path.unlink(missing_ok=True)


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
