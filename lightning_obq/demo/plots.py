"""PNG plots of a comparison run: task accuracy vs bits per method, and the layer error per method."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning_obq.model.report import QuantReport


def plot_comparison(
    rows: Sequence[Mapping[str, Any]],
    reports: Mapping[str, QuantReport],
    path: str | os.PathLike,
    fp_metric: float | None = None,
    metric: str = "accuracy",
    title: str = "",
) -> Path:
    """Write a two-panel PNG and return its path.

    Left: ``metric`` against bit width, one line per method label (``rows`` items need ``label``,
    ``bits`` and ``metric``; rows whose metric is None, e.g. skipped runs, are left out), with the FP
    value as a dashed line. Right: each layer's error (``tr((W-Q) H (W-Q)^T)``, log scale) for every
    report in ``reports`` (label -> report), next to round-to-nearest on the same grid.
    Uses matplotlib's Agg backend, so it works without a display.
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    order = list(dict.fromkeys([*(r["label"] for r in rows), *reports]))
    color = {label: f"C{i % 10}" for i, label in enumerate(order)}  # the same colour for a method in both panels
    labels = [label for label in order if any(r["label"] == label and r.get(metric) is not None for r in rows)]
    for label in labels:
        pts = sorted((r["bits"], 100 * r[metric]) for r in rows if r["label"] == label and r.get(metric) is not None)
        left.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label, color=color[label])
    if fp_metric is not None:
        left.axhline(100 * fp_metric, color="black", linestyle="--", linewidth=1, label="FP32")
    bits = sorted({r["bits"] for r in rows})
    left.set_xticks(bits)
    left.set_xlabel("weight bits")
    left.set_ylabel(f"{metric} (%)")
    left.set_title("accuracy vs bits")
    left.grid(alpha=0.3)
    left.legend()

    if reports:
        names = [s.name for s in next(iter(reports.values())).layers]
        width = 0.8 / (len(reports) + 1)  # one slot more than needed when the rtn reference bar is drawn
        xs = range(len(names))
        first = next(iter(reports.values()))
        has_rtn = any(rep.config.get("method") == "rtn" for rep in reports.values())
        if not has_rtn:  # the RTN error on each solver's grid, unless an rtn run is plotted anyway
            right.bar([x - 0.4 + width / 2 for x in xs], [s.rtn_error for s in first.layers], width,
                      label="rtn (same grid)", color="lightgray")
        for k, (label, rep) in enumerate(reports.items(), start=0 if has_rtn else 1):
            errors = {s.name: s.error for s in rep.layers}
            right.bar([x - 0.4 + width / 2 + k * width for x in xs], [errors.get(n, 0.0) for n in names], width,
                      label=label, color=color[label])
        right.set_yscale("log")
        right.set_xticks(list(xs))
        right.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
        right.set_ylabel("layer error tr((W-Q) H (W-Q)^T)")
        right.set_title("error per layer")
        right.legend(fontsize=8)
    else:
        right.set_axis_off()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
