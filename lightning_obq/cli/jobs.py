"""A comparison's runs: one `Job` per method and bit width, each through `OBQCallback` in ``trainer.validate``,
and the rows and table they give."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from lightning_obq.core import kernels
from lightning_obq.core.config import DEFAULT_ORDER, REFINING_METHODS, QuantConfig
from lightning_obq.core.hessian import weight_matrix
from lightning_obq.model.report import QuantReport


@dataclass(frozen=True)
class Job:
    """One quantization run of a comparison: a method, a bit width and (fastobq/gptq) a column order."""

    method: str
    bits: int
    order: str | None = None
    budget: float | None = None  # mixed precision: average bits per weight

    @property
    def label(self) -> str:
        label = f"{self.method} ({self.order})" if self.order else self.method
        return f"{label} mixed {self.budget:g}b" if self.budget is not None else label

    def config(self, base: QuantConfig, refine_sweeps: int | None = None) -> QuantConfig:
        """``base`` set to this job; ``refine_sweeps`` (when given) applies to the methods that refine, the
        others keep none, so one comparison can ask for it and still run obq and rtn."""
        changes: dict[str, Any] = {"method": self.method, "bits": self.bits, "order": self.order,
                                   "budget": self.budget}
        if refine_sweeps is not None and self.method in REFINING_METHODS:
            changes["refine_sweeps"] = refine_sweeps
        return base.replace(**changes)


REPORTED_ORDERS = {"fastobq": DEFAULT_ORDER["fastobq"], "gptq": "act"}
"""Column order of each method in the demo and comparison tables (GPTQ's act order is its strongest)."""


def default_jobs(bits: int, obq: bool = True) -> list[Job]:
    """The demo's table: FastOBQ (its default order), GPTQ (act order), RTN, and OBQ."""
    jobs = [Job(m, bits, REPORTED_ORDERS.get(m)) for m in ("fastobq", "gptq", "rtn")]
    return jobs + [Job("obq", bits)] if obq else jobs


def compare_jobs(methods: Sequence[str], bits: Sequence[int], budget: float | None = None) -> list[Job]:
    """Every method at every bit width (fastobq in its default order, gptq in act order).

    With a ``budget`` (average bits per weight), each method except the slow exact OBQ also runs in
    mixed precision at that budget, next to its uniform run at the nearest whole width (added to the
    bit widths if missing), so uniform and mixed are compared at equal size.
    """
    if budget is not None:
        bits = sorted({*bits, min(8, max(2, round(budget)))})
    jobs = [Job(m, b, REPORTED_ORDERS.get(m)) for b in bits for m in methods]
    if budget is not None:
        jobs += [Job(m, min(8, max(2, round(budget))), REPORTED_ORDERS.get(m), budget) for m in methods if m != "obq"]
    return jobs


def task_metric(metrics: dict[str, float]) -> str | None:
    """The FP task metric to report: ``val_acc`` or ``test_acc`` if logged, else the first ``*acc*`` key."""
    fp = [k for k in metrics if not k.startswith("obq/")]
    for key in ("val_acc", "test_acc"):
        if key in fp:
            return key
    accs = sorted(k for k in fp if "acc" in k)
    return accs[0] if accs else (sorted(fp)[0] if fp else None)


def quantize_and_evaluate(
    module: L.LightningModule,
    config: QuantConfig,
    calibration: Iterable[Any],
    evaluation: DataLoader,
    progress: bool = False,
) -> QuantReport:
    """Quantize ``module`` in place with `OBQCallback` inside ``trainer.validate`` and return its report.

    The report's ``metrics`` hold the FP and quantized validation metrics and the output fidelity.
    """
    from lightning_obq.integrations.lightning.callback import OBQCallback

    callback = OBQCallback(config=config, when="validation_start", calib_dataloader=calibration)
    trainer = L.Trainer(
        accelerator="auto", devices=1, logger=False, callbacks=[callback], enable_checkpointing=False,
        enable_progress_bar=progress, enable_model_summary=False,
    )
    trainer.validate(module, dataloaders=evaluation, verbose=False)
    if callback.report is None:
        raise RuntimeError("OBQCallback did not quantize the module (no validation batch?)")
    return callback.report


def estimate_obq_seconds(model: nn.Module, config: QuantConfig) -> float:
    """Rough OBQ solve time for every selected layer, from timing OBQ on a few rows of a probe problem.

    OBQ costs ``O(d_col^3)`` per row, so one timed probe at the largest ``d_col`` (a random positive
    definite Hessian of that size, up to 16 rows) is scaled by ``rows * (d_col / d_probe)^3`` per layer.
    It decides whether the demo runs OBQ or marks it skipped, so a rough figure is enough.
    """
    from lightning_obq.core.grid import find_grid
    from lightning_obq.core.solvers import obq_row_batch, solve_obq
    from lightning_obq.model.capture import find_layers

    shapes = [weight_matrix(m).shape for m in find_layers(model, config).values()]
    d_probe = max(s[2] for s in shapes)
    rows = min(16, obq_row_batch(d_probe, config.obq_memory_mb), max(s[0] * s[1] for s in shapes))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(d_probe, 2 * d_probe, generator=gen)
    h = x @ x.T / x.shape[1] + config.damp * torch.eye(d_probe)
    w = torch.randn(1, rows, d_probe, generator=gen)
    grid = find_grid(w, config.bits, config.symmetric, "channel", config.group_size, "minmax")
    start = time.perf_counter()
    solve_obq(w, h.unsqueeze(0), grid.scale, grid.zero, 2**config.bits - 1, config.obq_memory_mb, outliers=True)
    per_row = (time.perf_counter() - start) / rows
    return sum(g * r * per_row * (d / d_probe) ** 3 for g, r, d in shapes)


def run_jobs(
    module: L.LightningModule,
    jobs: Sequence[Job],
    base: QuantConfig,
    make_calibration: Callable[[], Iterable[Any]],
    evaluation: DataLoader,
    progress: bool,
    obq_max_seconds: float | None,
    say: Callable[[str], None] = print,
    refine_sweeps: int | None = None,
) -> tuple[list[dict[str, Any]], dict[str, QuantReport], dict[str, float]]:
    """Run every job on a fresh copy of the FP ``module``; returns (rows, reports by key, FP metrics).

    OBQ jobs whose estimated time (`estimate_obq_seconds`) exceeds ``obq_max_seconds`` are recorded
    with ``status="skipped"`` and the estimate. Rows are JSON-safe dicts (see `job_row`). ``refine_sweeps``
    overrides the refining methods' default sweeps (`Job.config`).
    """
    rows: list[dict[str, Any]] = []
    reports: dict[str, QuantReport] = {}
    fp: dict[str, float] = {}
    kernels.load()  # before the first timed job, so no row carries the compiled kernels' one-time load
    for i, job in enumerate(jobs, 1):
        config = job.config(base, refine_sweeps)
        key = f"{job.method}_w{job.bits}" + (f"_{job.order}" if job.order else "")
        if job.budget is not None:
            key += f"_mixed{job.budget:g}"
        if job.method == "obq" and obq_max_seconds is not None:
            estimate = estimate_obq_seconds(module.model if hasattr(module, "model") else module, config)
            if estimate > obq_max_seconds:
                say(f"[{i}/{len(jobs)}] {job.label} W{job.bits}: skipped (estimated {estimate:.0f}s > "
                    f"--obq-max-seconds {obq_max_seconds:.0f})")
                rows.append(job_row(job, key, None, status="skipped", estimate=estimate))
                continue
        say(f"[{i}/{len(jobs)}] {job.label} W{job.bits} ...")
        quantized = copy.deepcopy(module)
        report = quantize_and_evaluate(quantized, config, make_calibration(), evaluation, progress)
        del quantized
        reports[key] = report
        if not fp:
            fp = {k: v for k, v in report.metrics.items() if not k.startswith("obq/")}
        rows.append(job_row(job, key, report))
    return rows, reports, fp


def job_row(job: Job, key: str, report: QuantReport | None, status: str = "ok",
            estimate: float | None = None) -> dict[str, Any]:
    """One JSON-safe result row: the job, the quantized task metric, fidelity, time and memory."""
    row: dict[str, Any] = {"key": key, "label": job.label, "method": job.method, "order": job.order,
                           "bits": job.bits, "budget": job.budget, "status": status}
    if report is None:
        row["estimated_seconds"] = estimate
        return row
    metric = task_metric(report.metrics)
    row.update({
        "metric": metric,
        "fp_accuracy": report.metrics.get(metric) if metric else None,
        "accuracy": report.metrics.get(f"obq/{metric}") if metric else None,
        "top1_agreement": report.metrics.get("obq/top1_agreement"),
        "kl_div": report.metrics.get("obq/kl_div"),
        "seconds": report.total_seconds,
        "solve_seconds": report.solve_seconds,
        "peak_rss_mb": report.peak_rss_mb,
        "error": report.total_error,
        "rtn_error": report.total_rtn_error,
        "solve_error": report.total_solve_error,
        "refine_seconds": report.total_refine_seconds,
        "layers": len(report.layers),
        "samples": report.samples,
        "size_mb": report.quant_size_mb,
        "average_bits": report.allocation["average_bits"] if report.allocation else float(job.bits),
        "bn": report.batchnorm.get("chosen"),
        "batchnorm": report.batchnorm,
    })
    return row


def _refined(row: dict[str, Any]) -> str:
    """The refinement stage's change of the summed layer error, e.g. ``-4.2%`` ("-" where it did not run)."""
    if not row.get("refine_seconds") or not row.get("solve_error"):
        return "-"
    return f"{100 * (row['error'] / row['solve_error'] - 1):+.1f}%"


def format_table(rows: Sequence[dict[str, Any]], fp_accuracy: float | None, metric: str = "accuracy") -> str:
    """The printed comparison: FP first, then one line per job."""
    head = (f"{'method':<22} {'bits':>4} {metric:>9} {'vs FP':>7} {'top-1 agree':>11} {'KL':>9} "
            f"{'seconds':>8} {'peak MB':>8} {'BN':>10} {'refined':>8}")
    lines = [head, "-" * len(head)]
    if fp_accuracy is not None:
        lines.append(f"{'FP32':<22} {32:>4} {100 * fp_accuracy:>8.2f}% {'':>7} {'':>11} {'':>9} {'':>8} {'':>8}")
    for r in rows:
        if r["status"] != "ok":
            est = r.get("estimated_seconds")
            note = f"skipped (est. {est:.0f}s)" if est is not None else "skipped"
            lines.append(f"{r['label']:<22} {r['bits']:>4} {note:>9}")
            continue
        acc = r.get("accuracy")
        delta = 100 * (acc - fp_accuracy) if acc is not None and fp_accuracy is not None else None
        lines.append(
            f"{r['label']:<22} {r['average_bits']:>4.3g} "
            + (f"{100 * acc:>8.2f}% " if acc is not None else f"{'-':>9} ")
            + (f"{delta:>+7.2f} " if delta is not None else f"{'-':>7} ")
            + f"{100 * r['top1_agreement']:>10.2f}% {r['kl_div']:>9.5f} {r['seconds']:>8.2f} {r['peak_rss_mb']:>8.0f}"
            + f" {r.get('bn') or '-':>10} {_refined(r):>8}"
        )
    if any(_refined(r) != "-" for r in rows if r["status"] == "ok"):
        lines.append("refined: change of the summed layer error made by the refinement stage after the column "
                     "solve (refine_sweeps)")
    modes = sorted({r["batchnorm"]["mode"] for r in rows if r.get("batchnorm")})
    if modes:
        lines.append(f"BN: the BatchNorm statistics each run ended with (bn_mode {', '.join(modes)}; auto keeps, "
                     "bias-corrects or re-estimates them, whichever is closest to FP on held-back calibration images)")
    return "\n".join(lines)
