"""What a comparison leaves behind: ``report.json``, ``comparison.png`` and a W&B run."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lightning_obq.cli.jobs import task_metric
from lightning_obq.core.measure import machine_info
from lightning_obq.model.report import QuantReport


def log_wandb(out: Path, name: str, rows: Sequence[dict[str, Any]], reports: dict[str, QuantReport],
              plot: Path | None, config: dict[str, Any]) -> Path | None:
    """One W&B run (offline unless ``WANDB_MODE`` says otherwise) with every job's metrics, the comparison
    table and the plot; returns the run's folder."""
    from lightning_obq.integrations.lightning.loggers import summary_metrics
    from lightning_obq.integrations.wandb import start_run

    run = start_run("lightning-obq", name, out, config)
    import wandb  # start_run checked the extra
    try:
        for key, report in reports.items():
            scalars = {k: float(v) for k, v in report.metrics.items()}
            scalars.update(summary_metrics(report))
            run.log({f"{key}/{k.removeprefix('obq/')}": v for k, v in scalars.items()})
        columns = ["label", "bits", "status", "accuracy", "top1_agreement", "kl_div", "seconds", "peak_rss_mb"]
        table = wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in rows])
        extras: dict[str, Any] = {"comparison": table}
        if plot is not None:
            extras["comparison_plot"] = wandb.Image(str(plot))
        run.log(extras)
        folder = Path(run.dir).parent
    finally:
        run.finish()
    return folder


def write_outputs(out: Path, name: str, command: str, rows: list[dict[str, Any]], reports: dict[str, QuantReport],
                  fp: dict[str, float], extra: dict[str, Any], plot_reports: dict[str, QuantReport],
                  wandb_on: bool, say: Callable[[str], None] = print) -> dict[str, Path]:
    """report.json, comparison.png and the W&B run of a comparison; returns their paths."""
    from lightning_obq.demo.plots import plot_comparison

    out.mkdir(parents=True, exist_ok=True)
    metric = task_metric(fp)
    paths: dict[str, Path] = {}
    data = {"command": command, "machine": machine_info(), **extra, "fp_metrics": fp, "rows": rows,
            "reports": {k: r.to_dict() for k, r in reports.items()}}
    paths["report"] = out / "report.json"
    paths["report"].write_text(json.dumps(data, indent=2, default=str))
    paths["plot"] = plot_comparison(rows, plot_reports, out / "comparison.png",
                                    fp_metric=fp.get(metric) if metric else None, metric="accuracy", title=name)
    if wandb_on:
        run_dir = log_wandb(out, name, rows, reports, paths["plot"], {"command": command, **extra})
        if run_dir is not None:
            paths["wandb"] = run_dir
    for what, path in paths.items():
        say(f"{what:>7}: {path}")
    if "wandb" in paths:
        say(f"         (sync with: wandb sync {paths['wandb']})")
    return paths
