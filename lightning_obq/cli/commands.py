"""``lightning-obq quantize`` (one method, one bit width, optional packed artifact) and ``compare`` (every
method at every bit width)."""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch.nn as nn

from lightning_obq.cli.arguments import calibration_batches, command_text, int_list, progress_wanted, str_list
from lightning_obq.cli.errors import CLIError
from lightning_obq.cli.jobs import (
    Job,
    compare_jobs,
    format_table,
    job_row,
    quantize_and_evaluate,
    run_jobs,
    task_metric,
)
from lightning_obq.cli.outputs import write_outputs
from lightning_obq.cli.user_models import base_config, prepare
from lightning_obq.core.config import COLUMN_PARALLEL_METHODS, METHODS, REFINING_METHODS
from lightning_obq.core.measure import machine_info
from lightning_obq.model.report import QuantReport


def run_quantize(args: argparse.Namespace) -> int:
    """``lightning-obq quantize``: one method at one bit width, optional packed artifact."""
    progress = progress_wanted(args)
    for flag, value in (("--order", args.order), ("--refine-sweeps", args.refine_sweeps)):
        if value is not None and args.method not in REFINING_METHODS:
            raise CLIError(f"{flag} applies to fastobq and gptq, not {args.method}")
    output = Path(args.output).expanduser() if args.output else None
    if output is not None and output.is_dir():
        raise CLIError(f"--output {output} is a folder; give a file name such as {output / 'model.safetensors'}")
    module, net, what, calib_loader, eval_loader, data_desc = prepare(args)
    config = base_config(args, progress, module, net).replace(bits=args.bits, method=args.method, order=args.order,
                                                              refine_sweeps=args.refine_sweeps)
    print(f"quantizing {what} to W{args.bits} with {config.method}"
          + (f" ({config.order})" if config.order else "") + f"; {data_desc}")
    job = Job(config.method, config.bits, config.order if config.method in COLUMN_PARALLEL_METHODS else None)
    calibration = calibration_batches(calib_loader, args, progress)
    report = quantize_and_evaluate(module, config, calibration, eval_loader, progress)
    row = job_row(job, "run", report)
    print(report.table())
    print()
    print(format_table([row], row.get("fp_accuracy")))
    if output is not None:
        from lightning_obq.export.artifact import save_quantized

        path = save_quantized(net, output, report_for(net, module, report))
        print(f"quantized model: {path}")
    if args.report:
        report_path = Path(args.report).expanduser()
        report_path.parent.mkdir(parents=True, exist_ok=True)
        report_path.write_text(json.dumps({"command": command_text(args), "machine": machine_info(), "row": row,
                                           "report": report.to_dict()}, indent=2, default=str))
        print(f"report: {report_path}")
    return 0


def report_for(net: nn.Module, module: nn.Module, report: QuantReport) -> QuantReport:
    """The report with layer names relative to ``net`` when ``module`` wraps it (``ImageClassifier.model``)."""
    if net is module:
        return report
    prefix = next(name for name, m in module.named_modules() if m is net) + "."
    renamed = copy.copy(report)
    renamed.results = {k.removeprefix(prefix): v for k, v in report.results.items()}
    return renamed


def run_compare(args: argparse.Namespace) -> int:
    """``lightning-obq compare``: every method at every bit width, one table, report.json and plot."""
    progress = progress_wanted(args)
    methods = str_list(args.methods, "--methods", METHODS)
    bits = int_list(args.bits, "--bits")
    if args.budget is not None and not 2 <= args.budget <= 8:
        raise CLIError(f"--budget must be an average bit width in [2, 8], got {args.budget}")
    module, net, what, calib_loader, eval_loader, data_desc = prepare(args)
    jobs = compare_jobs(methods, bits, args.budget)
    print(f"comparing {what}: {len(jobs)} runs ({', '.join(methods)} x W{'/'.join(map(str, bits))}); {data_desc}")
    base = base_config(args, progress, module, net)
    obq_limit = None if args.obq_max_seconds <= 0 else args.obq_max_seconds
    rows, reports, fp = run_jobs(module, jobs, base, lambda: calibration_batches(calib_loader, args, progress),
                                 eval_loader, progress, obq_limit, refine_sweeps=args.refine_sweeps)
    metric = task_metric(fp)
    print()
    print(format_table(rows, fp.get(metric) if metric else None))
    low = min(bits)
    plot_reports = {r["label"]: reports[r["key"]] for r in rows if r["bits"] == low and r["key"] in reports}
    write_outputs(Path(args.output_dir), f"compare {what}", command_text(args), rows, reports, fp,
                  {"model": what, "data": data_desc, "quant_config": base.to_dict()}, plot_reports,
                  not args.no_wandb)
    return 0
