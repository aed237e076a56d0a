"""`QuantReport`: what a quantization run did, per layer and in total, as a table and as JSON."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch.nn as nn

from lightning_obq.core.config import QuantConfig
from lightning_obq.core.hessian import layer_groups, weight_matrix
from lightning_obq.core.layer import LayerOutcome, LayerResult
from lightning_obq.model.batchnorm import describe_batchnorm


@dataclass
class LayerStats(LayerOutcome):
    """Per-layer line of the report: which layer (name, kind, shapes), how it was quantized (method, order,
    calibration samples, ``group_size``: columns per grid, ``None`` for one grid per row or per tensor) and the
    `LayerOutcome` figures (errors, damping, cost, refinement)."""

    name: str
    kind: str
    shape: list[int]
    groups: int
    d_row: int
    d_col: int
    method: str
    order: str | None
    samples: int
    group_size: int | None = None

    @classmethod
    def from_result(cls, name: str, module: nn.Module, result: LayerResult, config: QuantConfig,
                    samples: int) -> LayerStats:
        """The stats of ``module`` (named ``name``) quantized to ``result`` under ``config`` from ``samples``.

        The `LayerOutcome` fields are copied from ``result``.
        """
        w = weight_matrix(module)
        shared = {f.name: getattr(result, f.name) for f in fields(LayerOutcome)}
        return cls(name=name, kind=type(module).__name__, shape=list(module.weight.shape),
                   groups=layer_groups(module), d_row=w.shape[1], d_col=w.shape[2], method=config.method,
                   order=config.order, samples=samples, group_size=result.group_size, **shared)

    @property
    def error_ratio_to_rtn(self) -> float:
        return self.error / self.rtn_error if self.rtn_error > 0 else math.nan


@dataclass
class QuantReport:
    """Result of `quantize_model`: per-layer stats, totals, and the integer codes for export.

    ``results`` holds each layer's `LayerResult` (codes, scales, zero points) and is left out of
    `to_dict`; ``metrics`` is filled by callers that evaluate the model (callback, CLI).
    ``allocation`` is set under a mixed-precision budget: the chosen bits, gain and predicted loss of
    every layer, the achieved average bits and size, the predicted loss of uniform ``bits`` (pinned layers
    at their pin), and, when that uniform model fits the budget, the measured output change of both, with
    ``kept_uniform`` set when uniform measured better and was kept. ``batchnorm`` says what the BatchNorm
    step did: the mode asked, the one chosen and, under ``auto``, every candidate's held-back fidelity
    (`lightning_obq.model.batchnorm.settle_batchnorm`).
    """

    config: dict[str, Any]
    layers: list[LayerStats] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    samples: int = 0
    calib_seconds: float = 0.0
    solve_seconds: float = 0.0
    bn_seconds: float = 0.0
    total_seconds: float = 0.0
    peak_rss_mb: float = 0.0
    cuda_peak_mb: float = 0.0
    fp_size_mb: float = 0.0
    quant_size_mb: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)
    allocation: dict[str, Any] | None = None
    batchnorm: dict[str, Any] = field(default_factory=dict)
    results: dict[str, LayerResult] = field(default_factory=dict, repr=False)

    @property
    def total_error(self) -> float:
        return sum(s.error for s in self.layers)

    @property
    def total_rtn_error(self) -> float:
        return sum(s.rtn_error for s in self.layers)

    @property
    def total_solve_error(self) -> float:
        """Summed layer error of the column-parallel solves before refinement (``total_error`` without it)."""
        return sum(s.solve_error for s in self.layers)

    @property
    def total_refine_seconds(self) -> float:
        return sum(s.refine_seconds for s in self.layers)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantReport:
        """Rebuild a report (without the tensors of ``results``) from its `to_dict`, e.g. from a checkpoint."""
        names = {f.name for f in fields(cls)} - {"results", "layers"}
        report = cls(**{k: v for k, v in data.items() if k in names})
        report.layers = [LayerStats(**s) for s in data.get("layers", [])]
        return report

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict of everything but the tensors."""
        out = {k: v for k, v in asdict(self).items() if k != "results"}
        out["total_error"] = self.total_error
        out["total_rtn_error"] = self.total_rtn_error
        out["total_solve_error"] = self.total_solve_error
        out["total_refine_seconds"] = self.total_refine_seconds
        return out

    def table(self) -> str:
        """A fixed-width table of the layers and the totals."""
        head = f"{'layer':<32} {'shape':>18} {'bits':>4} {'error':>11} {'rtn error':>11} {'ratio':>6} {'sec':>7}"
        lines = [head, "-" * len(head)]
        for s in self.layers:
            shape = "x".join(str(d) for d in s.shape)
            lines.append(
                f"{s.name[-32:]:<32} {shape:>18} {s.bits:>4} {s.error:>11.4g} {s.rtn_error:>11.4g} "
                f"{s.error_ratio_to_rtn:>6.3f} {s.seconds:>7.3f}"
            )
        lines.append("-" * len(head))
        method = self.config.get("method")
        lines.append(
            f"{len(self.layers)} layers, method={method}, bits={self.config.get('bits')}, "
            f"{self.samples} samples | error {self.total_error:.4g} (rtn {self.total_rtn_error:.4g})"
        )
        lines.append(
            f"time {self.total_seconds:.2f}s (calibration {self.calib_seconds:.2f}s, solve "
            f"{self.solve_seconds:.2f}s, BN {self.bn_seconds:.2f}s) | peak RSS {self.peak_rss_mb:.0f} MB"
            + (f", CUDA {self.cuda_peak_mb:.0f} MB" if self.cuda_peak_mb else "")
            + f" | size {self.fp_size_mb:.2f} MB -> {self.quant_size_mb:.2f} MB"
        )
        refined = [s for s in self.layers if s.refine_sweeps]
        if refined:
            before = self.total_solve_error
            lines.append(
                f"refinement ({len(refined)} layers, {min(s.refine_sweeps for s in refined)}-"
                f"{max(s.refine_sweeps for s in refined)} sweeps): error {before:.4g} -> {self.total_error:.4g} "
                f"({100 * (self.total_error / before - 1) if before > 0 else 0.0:+.1f} %) in "
                f"{self.total_refine_seconds:.2f}s of the solve"
            )
        if self.allocation:
            a = self.allocation
            uniform = a["uniform_predicted_loss"]
            lines.append(
                f"mixed precision: {a['average_bits']:.3f} bits/weight, {a['size_mb']:.3f} MB, predicted loss "
                f"{a['predicted_loss']:.4g}" + (f" (uniform W{a['uniform_bits']}: {uniform:.4g})" if uniform else "")
            )
            if "measured_loss" in a:
                lines.append(
                    f"measured output change on calibration data: allocation {a['measured_loss']:.4g}, uniform "
                    f"W{a['uniform_bits']} {a['uniform_measured_loss']:.4g}"
                    + (f" -> kept uniform W{a['uniform_bits']}" if a["kept_uniform"] else "")
                )
        if self.batchnorm:
            lines.append(describe_batchnorm(self.batchnorm))
        if self.skipped:
            lines.append(f"skipped (no calibration input): {', '.join(self.skipped)}")
        for key, value in sorted(self.metrics.items()):
            lines.append(f"{key}: {value:.4f}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()
