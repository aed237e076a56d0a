"""Logging a `QuantReport` to Lightning loggers: flat metrics for every logger, table and plot for W&B.

Metric names (all floats, logged at the trainer's ``global_step``):

- task metrics: the module's own validation metrics before quantizing under their own names
  (``val_acc``; `OBQCallback` logs them as ``obq/fp/val_acc``), after quantizing as ``obq/<name>`` and
  the difference as ``obq/<name>_delta``;
- output fidelity: ``obq/top1_agreement``, ``obq/kl_div`` (see `lightning_obq.model.fidelity`);
- cost: ``obq/seconds_total``, ``obq/seconds_calibration``, ``obq/seconds_solve``, ``obq/seconds_bn``,
  ``obq/peak_rss_mb``, ``obq/cuda_peak_mb``;
- size and error: ``obq/size_fp_mb``, ``obq/size_quant_mb``, ``obq/error``, ``obq/rtn_error``,
  ``obq/solve_error`` (before the refinement stage) with ``obq/seconds_refine``,
  ``obq/bits``, ``obq/layers``, ``obq/samples``;
- per layer (optional): ``obq/layer/<name>/{error,rtn_error,seconds,bits}``;
- BatchNorm step (`lightning_obq.model.batchnorm`): ``obq/bn/chosen`` as a numeric code (`BN_CODES`: 0 none in
  the model, 1 keep, 2 correct, 3 reestimate), ``obq/bn/layers``, and under ``bn_mode="auto"`` every
  candidate's held-back figures ``obq/bn/<candidate>/<metric>`` (``kl_div`` and ``top1_agreement``, or
  ``output_mse``) with ``obq/bn/holdout_samples`` and ``obq/bn/fit_samples``. The mode asked and the
  mode chosen also go to every logger as text hyperparameters ``obq/bn_mode`` and ``obq/bn_chosen``
  (`batchnorm_hparams`: ``hparams.yaml`` of a `CSVLogger`, the run config of a `WandbLogger`).

`OBQCallback` logs every task metric under ``obq/`` (the FP values as ``obq/fp/<name>``) so that no name
is logged twice at one step next to the module's own ``self.log`` values; see its docstring.

A `WandbLogger` also gets the ``obq/layers_table`` `wandb.Table` (one row per layer) and the
``obq/layer_error_plot`` bar chart of the layer errors.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from lightning_obq.model.report import QuantReport

log = logging.getLogger(__name__)

LAYER_COLUMNS = ["layer", "kind", "shape", "bits", "error", "rtn_error", "error_ratio_to_rtn", "seconds",
                 "peak_rss_mb", "samples"]


def summary_metrics(report: QuantReport) -> dict[str, float]:
    """Totals of a report as flat ``obq/...`` metrics: timings, memory, size, error, bits, layers, samples."""
    return {
        "obq/seconds_total": report.total_seconds,
        "obq/seconds_calibration": report.calib_seconds,
        "obq/seconds_solve": report.solve_seconds,
        "obq/seconds_bn": report.bn_seconds,
        "obq/peak_rss_mb": report.peak_rss_mb,
        "obq/cuda_peak_mb": report.cuda_peak_mb,
        "obq/size_fp_mb": report.fp_size_mb,
        "obq/size_quant_mb": report.quant_size_mb,
        "obq/error": report.total_error,
        "obq/rtn_error": report.total_rtn_error,
        "obq/solve_error": report.total_solve_error,  # before the refinement stage (= obq/error without it)
        "obq/seconds_refine": report.total_refine_seconds,  # part of obq/seconds_solve
        "obq/bits": float(report.config.get("bits", 0)),
        "obq/layers": float(len(report.layers)),
        "obq/samples": float(report.samples),
        **allocation_metrics(report),
    }


def allocation_metrics(report: QuantReport) -> dict[str, float]:
    """Mixed precision totals (``obq/mixed/...``): achieved bits and size, predicted and measured loss."""
    a = report.allocation
    if not a:
        return {}
    keys = ("average_bits", "size_mb", "predicted_loss", "uniform_predicted_loss", "measured_loss",
            "uniform_measured_loss", "kept_uniform")
    return {f"obq/mixed/{k}": float(a[k]) for k in keys if a.get(k) is not None}


BN_CODES = {"none": 0, "keep": 1, "correct": 2, "reestimate": 3}
"""Numeric code of the chosen BatchNorm mode in ``obq/bn/chosen`` ("none": the model has no BatchNorm)."""


def batchnorm_metrics(report: QuantReport) -> dict[str, float]:
    """The BatchNorm decision as ``obq/bn/...`` scalars: chosen-mode code, layer count, candidate figures."""
    bn = report.batchnorm
    if not bn:
        return {}
    out = {"obq/bn/chosen": float(BN_CODES[bn["chosen"]]), "obq/bn/layers": float(bn["layers"])}
    for mode, scores in bn.get("candidates", {}).items():
        out.update({f"obq/bn/{mode}/{metric}": float(value) for metric, value in scores.items()})
    out.update({f"obq/bn/{k}": float(bn[k]) for k in ("holdout_samples", "fit_samples") if k in bn})
    return out


def batchnorm_hparams(report: QuantReport) -> dict[str, str]:
    """The BatchNorm mode asked and chosen as text (``obq/bn_mode``, ``obq/bn_chosen``), for log_hyperparams."""
    bn = report.batchnorm
    return {"obq/bn_mode": str(bn["mode"]), "obq/bn_chosen": str(bn["chosen"])} if bn else {}


def layer_metrics(report: QuantReport) -> dict[str, float]:
    """Per-layer ``obq/layer/<name>/{error,rtn_error,seconds,bits}`` metrics."""
    out: dict[str, float] = {}
    for s in report.layers:
        prefix = f"obq/layer/{s.name}"
        out[f"{prefix}/error"] = s.error
        out[f"{prefix}/rtn_error"] = s.rtn_error
        out[f"{prefix}/seconds"] = s.seconds
        out[f"{prefix}/bits"] = float(s.bits)
        if report.allocation:
            out[f"{prefix}/predicted_loss"] = report.allocation["layers"][s.name]["predicted_loss"]
    return out


def layer_rows(report: QuantReport) -> list[list[Any]]:
    """One row per layer, in `LAYER_COLUMNS` order."""
    return [
        [s.name, s.kind, "x".join(map(str, s.shape)), s.bits, s.error, s.rtn_error, s.error_ratio_to_rtn,
         s.seconds, s.peak_rss_mb, s.samples]
        for s in report.layers
    ]


def report_metrics(report: QuantReport, per_layer: bool = True) -> dict[str, float]:
    """Everything logged as scalars: ``report.metrics`` (task and fidelity), totals, and per-layer stats."""
    metrics = {k: float(v) for k, v in report.metrics.items()}
    metrics.update(summary_metrics(report))
    metrics.update(batchnorm_metrics(report))
    if per_layer:
        metrics.update(layer_metrics(report))
    return metrics


def _is_wandb(logger: Any) -> bool:
    try:
        from lightning.pytorch.loggers import WandbLogger
    except ImportError:  # pragma: no cover - wandb extra not installed
        return False
    return isinstance(logger, WandbLogger)


def log_wandb_extras(logger: Any, report: QuantReport, step: int) -> None:
    """Per-layer `wandb.Table` and a bar chart of the layer errors on a `WandbLogger` (rank zero only)."""
    import wandb

    rows = layer_rows(report)
    logger.log_table(key="obq/layers_table", columns=LAYER_COLUMNS, data=rows, step=step)
    table = wandb.Table(columns=["layer", "error"], data=[[r[0], r[4]] for r in rows])
    plot = wandb.plot.bar(table, "layer", "error", title=f"layer error, W{report.config.get('bits')}")
    logger.experiment.log({"obq/layer_error_plot": plot, "trainer/global_step": step})


def log_report(loggers: Sequence[Any], report: QuantReport, step: int, per_layer: bool = True,
               is_global_zero: bool = True, metrics: Mapping[str, float] | None = None,
               extras: bool = True) -> dict[str, float]:
    """Log a report to every logger (W&B extras on rank zero) and return the scalars logged.

    ``metrics`` replaces the scalars (default: `report_metrics`), for callers that rename them; with
    ``extras`` the BatchNorm hyperparameters go to every logger and the W&B table and plot to a
    `WandbLogger`. Loggers handle rank zero themselves for scalars; the W&B table and plot are only
    made on rank zero.
    """
    metrics = dict(report_metrics(report, per_layer) if metrics is None else metrics)
    hparams = batchnorm_hparams(report) if extras else {}
    for logger in loggers:
        if metrics:
            logger.log_metrics(metrics, step=step)
        if hparams:
            logger.log_hyperparams(hparams)
        if extras and is_global_zero and _is_wandb(logger):
            log_wandb_extras(logger, report, step)
        logger.save()
    return metrics


def unique_step_names(taken: set[str], scalars: Mapping[str, float]) -> dict[str, float]:
    """The names `OBQCallback` logs ``scalars`` under at one step, ``taken`` holding those already used there.

    FP task metrics go under ``obq/fp/``, the callback's own under ``obq/``; a name already logged at the step
    goes under ``obq/ckpt/`` (``obq/ckpt<n>/`` for the n-th), so no name gets two values at one step. Adds
    the new names to ``taken``.
    """
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


def log_to_trainer(trainer: Any, report: QuantReport, metrics: Mapping[str, float] | None, per_layer: bool,
                   logged: dict[int, set[str]]) -> None:
    """Log the whole ``report`` (``metrics=None``: its `report_metrics`, tables, table print-out) or just
    ``metrics`` to every logger of ``trainer`` and to its ``callback_metrics`` / ``logged_metrics``.

    ``logged`` maps a step to the names already logged at it (`unique_step_names`), and is updated.
    """
    from lightning.pytorch.utilities.rank_zero import rank_zero_info

    scalars = report_metrics(report, per_layer) if metrics is None else metrics
    step = trainer.global_step
    named = unique_step_names(logged.setdefault(step, set()), scalars)
    log_report(trainer.loggers, report, step=step, per_layer=per_layer, is_global_zero=trainer.is_global_zero,
               metrics=named, extras=metrics is None)
    values = {k: torch.tensor(v) for k, v in named.items()}
    trainer.callback_metrics.update(values)  # monitors and `optimized_metric` read these
    trainer.logged_metrics.update(values)
    if metrics is None:
        rank_zero_info(f"OBQCallback report\n{report.table()}")
