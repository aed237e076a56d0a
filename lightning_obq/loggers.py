"""Logging a `QuantReport` to Lightning loggers: flat metrics for every logger, table and plot for W&B.

Metric names (all floats, logged at the trainer's ``global_step``):

- task metrics: the module's own validation metrics before quantizing under their own names
  (``val_acc``), after quantizing as ``obq/<name>`` and the difference as ``obq/<name>_delta``;
- output fidelity: ``obq/top1_agreement``, ``obq/kl_div`` (see `lightning_obq.fidelity`);
- cost: ``obq/seconds_total``, ``obq/seconds_calibration``, ``obq/seconds_solve``, ``obq/seconds_bn``,
  ``obq/peak_rss_mb``, ``obq/cuda_peak_mb``;
- size and error: ``obq/size_fp_mb``, ``obq/size_quant_mb``, ``obq/error``, ``obq/rtn_error``,
  ``obq/bits``, ``obq/layers``, ``obq/samples``;
- per layer (optional): ``obq/layer/<name>/{error,rtn_error,seconds,bits}``.

A `WandbLogger` also gets the ``obq/layers_table`` `wandb.Table` (one row per layer) and the
``obq/layer_error_plot`` bar chart of the layer errors.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

from .report import QuantReport

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
    if per_layer:
        metrics.update(layer_metrics(report))
    return metrics


def _is_wandb(logger: Any) -> bool:
    try:
        from lightning.pytorch.loggers import WandbLogger
    except ImportError:  # pragma: no cover - wandb extra not installed
        return False
    return isinstance(logger, WandbLogger)


def default_wandb_offline() -> bool:
    """Make W&B runs created from now on offline unless the user chose a mode; True if it did so.

    Sets ``WANDB_MODE=offline`` when the variable is unset. It must happen before a `WandbLogger` creates
    its run, which Lightning does before any callback hook, so `OBQCallback` calls this in its constructor.
    ``WANDB_MODE=online`` (or ``WandbLogger(mode="online")``, which wandb ranks above the variable) keeps
    runs online.
    """
    if "WANDB_MODE" in os.environ:
        return False
    os.environ["WANDB_MODE"] = "offline"
    log.info("W&B runs are offline (set WANDB_MODE=online or pass OBQCallback(wandb_offline=False) to change it)")
    return True


def log_wandb_extras(logger: Any, report: QuantReport, step: int) -> None:
    """Per-layer `wandb.Table` and a bar chart of the layer errors on a `WandbLogger` (rank zero only)."""
    import wandb

    rows = layer_rows(report)
    logger.log_table(key="obq/layers_table", columns=LAYER_COLUMNS, data=rows, step=step)
    table = wandb.Table(columns=["layer", "error"], data=[[r[0], r[4]] for r in rows])
    plot = wandb.plot.bar(table, "layer", "error", title=f"layer error, W{report.config.get('bits')}")
    logger.experiment.log({"obq/layer_error_plot": plot, "trainer/global_step": step})


def log_report(loggers: Sequence[Any], report: QuantReport, step: int, per_layer: bool = True,
               is_global_zero: bool = True) -> dict[str, float]:
    """Log a report to every logger (W&B extras on rank zero) and return the scalars logged.

    Loggers handle rank zero themselves for scalars; the W&B table and plot are only made on rank zero.
    """
    metrics = report_metrics(report, per_layer)
    for logger in loggers:
        logger.log_metrics(metrics, step=step)
        if is_global_zero and _is_wandb(logger):
            log_wandb_extras(logger, report, step)
        logger.save()
    return metrics
