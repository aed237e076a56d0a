"""The ``lightning-obq yolo`` subcommand: quantize an Ultralytics detector, validate it, save it.

Wired into the main CLI with `add_yolo_subcommand`; `run_yolo` does the work and returns an exit code.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from lightning_obq.cli.arguments import add_refine_sweeps
from lightning_obq.core.config import BN_MODES, METHODS


def add_yolo_subcommand(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``yolo`` to an ``argparse`` subparsers object; the parser's ``func`` default is `run_yolo`."""
    p = subparsers.add_parser(
        "yolo",
        help="quantize an Ultralytics YOLO detector (FastOBQ/GPTQ/OBQ/RTN) and validate its mAP",
        description="Quantize the Conv2d weights of an Ultralytics YOLO detection model, calibrating on the "
        "dataset's train images, compare mAP50-95/mAP50 before and after on its val split, and save a "
        "checkpoint that YOLO(path) loads.",
    )
    p.add_argument("model", help="YOLO detection checkpoint (.pt) or model yaml")
    p.add_argument("--data", required=True, help="dataset data.yaml (train images calibrate, val images evaluate)")
    p.add_argument("--bits", type=int, default=6, help="weight bits, 2..8 (default 6)")
    p.add_argument("--method", choices=METHODS, default="fastobq")
    p.add_argument("--calib-images", type=int, default=128, help="train images used for calibration")
    p.add_argument("--imgsz", type=int, default=640)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--include", nargs="*", default=["*"], help="layer name patterns to quantize")
    p.add_argument("--exclude", nargs="*", default=[], help="layer name patterns to skip")
    p.add_argument("--quantize-dfl", action="store_true", help="also quantize the fixed DFL conv")
    p.add_argument("--damp", type=float, default=None, help="Hessian damping (default: the config's)")
    add_refine_sweeps(p)
    p.add_argument("--bn-mode", default="auto", choices=list(BN_MODES),
                   help="BatchNorm statistics after quantizing (default auto: measured on held-back images)")
    p.add_argument("--device", default=None,
                   help="device for calibration and validation: cpu, cuda:0 or 0 (default: the model's)")
    p.add_argument("--no-eval", action="store_true", help="skip the FP and quantized validation")
    p.add_argument("--output", "-o", default=None,
                   help="where to save the quantized checkpoint (default: <model>-w<bits>-<method>.pt)")
    p.add_argument("--report", default=None, help="also write the report as JSON to this path")
    p.add_argument("--wandb", action="store_true", help="log to W&B (offline unless WANDB_MODE is set)")
    p.add_argument("--seed", type=int, default=0, help="picks the calibration images")
    p.set_defaults(func=run_yolo)
    return p


def run_yolo(args: argparse.Namespace) -> int:
    """Run the ``yolo`` subcommand; prints the per-layer table and the mAPs, returns 0 on success."""
    from lightning_obq.integrations.ultralytics import quantize_yolo, save_quantized_yolo

    extra: dict[str, Any] = {}
    if args.damp is not None:
        extra["damp"] = args.damp
    if args.refine_sweeps is not None:
        extra["refine_sweeps"] = args.refine_sweeps
    yolo, report = quantize_yolo(
        args.model, data=args.data, bits=args.bits, method=args.method, calib_images=args.calib_images,
        imgsz=args.imgsz, batch=args.batch, include=tuple(args.include), exclude=tuple(args.exclude),
        quantize_dfl=args.quantize_dfl, evaluate=not args.no_eval, wandb=args.wandb, seed=args.seed,
        device=args.device, bn_mode=args.bn_mode, progress=False, **extra,
    )
    print(report.table())
    if report.metrics:
        print(f"\nmetric        FP        W{args.bits:<2}      delta")
        for key in ("mAP50-95", "mAP50"):
            fp, q = report.metrics[f"fp/{key}"], report.metrics[f"quant/{key}"]
            print(f"{key:<10} {fp:8.4f} {q:8.4f} {q - fp:+9.4f}")
    output = Path(args.output) if args.output else Path(
        f"{Path(args.model).with_suffix('')}-w{args.bits}-{args.method}.pt")
    save_quantized_yolo(yolo, output, report)
    print(f"\nsaved {output}")
    if args.report:
        Path(args.report).write_text(json.dumps(report.to_dict(), indent=1))
        print(f"report {args.report}")
    return 0
