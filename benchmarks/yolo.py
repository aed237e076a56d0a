"""YOLO benchmark: detectors trained here, FP vs W8/W6/W4 for fastobq, gptq, rtn (and obq where it fits).

Builds the Fashion-MNIST detection set (`lightning_obq.demo.detection_data`), trains each model from its
Ultralytics yaml (no pretrained weights exist offline; the run is cached), then quantizes a fresh copy of
the trained weights for every method and bit width with `quantize_yolo` and validates with ``YOLO.val``.
Writes a Markdown table with mAP50-95, mAP50, quantization seconds and peak RSS, plus the command and
the machine, to ``--out``.

    python benchmarks/yolo.py --out benchmarks/results/yolo.md
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")  # no network probes from Ultralytics (fonts, hub, checks)
import torch.nn as nn
import ultralytics
from common import command_line, load_note, machine_info

from lightning_obq import QuantConfig
from lightning_obq.core.hessian import weight_matrix
from lightning_obq.core.measure import measure
from lightning_obq.demo.data import cache_dir
from lightning_obq.demo.detection_data import DetectionSetSpec, build_detection_dataset
from lightning_obq.demo.detector import train_detector
from lightning_obq.integrations.ultralytics import DFL_PATTERN, evaluate_yolo, quantize_yolo
from lightning_obq.model.capture import find_layers


def obq_tflop(model: nn.Module) -> float:
    """Rough OBQ work in TFLOP: each row updates its own d_col x d_col inverse Hessian once per weight."""
    layers = find_layers(model, QuantConfig(exclude=(DFL_PATTERN,)))
    total = 0.0
    for module in layers.values():
        groups, rows, cols = weight_matrix(module).shape
        total += 2.0 * groups * rows * cols**3
    return total / 1e12


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["yolov8n", "yolov5s"], help="Ultralytics model yaml names")
    p.add_argument("--epochs", nargs="+", type=int, default=[30, 20], help="training epochs, one per model")
    p.add_argument("--bits", nargs="+", type=int, default=[8, 6, 4])
    p.add_argument("--methods", nargs="+", default=["fastobq", "gptq", "rtn", "obq"])
    p.add_argument("--imgsz", type=int, default=160)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--calib-images", type=int, default=128)
    p.add_argument("--train-images", type=int, default=400)
    p.add_argument("--val-images", type=int, default=100)
    p.add_argument("--bn-bits", nargs="*", type=int, default=[8, 4],
                   help="extra fastobq rows with BatchNorm re-estimation (off by default for YOLO) at these bits")
    p.add_argument("--obq-budget-tflop", type=float, default=2.0,
                   help="run obq only on models whose estimated OBQ work is below this")
    p.add_argument("--cache", default=str(cache_dir() / "yolo-bench"), help="dataset and trained weights")
    p.add_argument("--out", default="benchmarks/results/yolo.md")
    args = p.parse_args(argv)
    if len(args.epochs) == 1:
        args.epochs = args.epochs * len(args.models)
    if len(args.epochs) != len(args.models):
        p.error("--epochs needs one value, or one per model")

    cache = Path(args.cache).expanduser()
    spec = DetectionSetSpec(train_images=args.train_images, val_images=args.val_images)
    data = build_detection_dataset(cache / "data", spec)
    rows: list[dict] = []
    notes: list[str] = []
    trained: list[str] = []
    started = time.perf_counter()
    for name, epochs in zip(args.models, args.epochs, strict=True):
        with measure() as train_time:
            weights = train_detector(f"{name}.yaml", data, cache=cache / "runs", epochs=epochs, imgsz=args.imgsz,
                                     batch=args.batch)
        from ultralytics import YOLO

        fp_yolo = YOLO(str(weights))
        params = sum(p.numel() for p in fp_yolo.model.parameters()) / 1e6
        fp = evaluate_yolo(fp_yolo, data, args.imgsz, args.batch)
        trained.append(f"{name}: {params:.2f}M parameters, {epochs} epochs at imgsz {args.imgsz} from `{name}.yaml` "
                       f"(no pretrained weights); FP mAP50-95 {fp['mAP50-95']:.4f}, mAP50 {fp['mAP50']:.4f} "
                       f"(weights `{weights}`; {train_time.seconds:.0f}s in this run, 0 if cached)")
        rows.append({"model": name, "method": "FP", "bits": 32, **fp, "seconds": None, "peak_mb": None})
        print(f"{name}: FP {fp}", flush=True)
        obq_cost = obq_tflop(fp_yolo.model)
        runs = [(method, bits, "auto") for method in args.methods for bits in args.bits]
        runs += [("fastobq", bits, "reestimate") for bits in args.bn_bits]
        for method, bits, bn_mode in runs:
            if method == "obq" and obq_cost > args.obq_budget_tflop:
                if bits == args.bits[0]:
                    notes.append(f"{name} obq skipped: its layers need about {obq_cost:.1f} TFLOP of per-row "
                                 "inverse-Hessian updates per bit width (2 * rows * d_col^3 summed over layers), "
                                 f"above the --obq-budget-tflop {args.obq_budget_tflop} budget for shared 2-core "
                                 "CPU time.")
                continue
            yolo, report = quantize_yolo(str(weights), data=data, bits=bits, method=method,
                                         calib_images=args.calib_images, imgsz=args.imgsz, batch=args.batch,
                                         fp_metrics=fp, bn_mode=bn_mode, progress=False)
            m = report.metrics
            label = method + (" + BN re-estimation" if bn_mode == "reestimate" else "")
            rows.append({"model": name, "method": label, "bits": bits, "mAP50-95": m["quant/mAP50-95"],
                         "mAP50": m["quant/mAP50"], "seconds": report.total_seconds,
                         "solve_seconds": report.solve_seconds, "peak_mb": report.peak_rss_mb,
                         "layers": len(report.layers), "error": report.total_error,
                         "rtn_error": report.total_rtn_error, "bn": report.batchnorm.get("chosen", "-")})
            print(f"{name} {label} W{bits}: mAP50-95 {m['quant/mAP50-95']:.4f} mAP50 {m['quant/mAP50']:.4f} "
                  f"{report.total_seconds:.1f}s", flush=True)
    total = time.perf_counter() - started

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        "# YOLO: FastOBQ vs GPTQ vs RTN on detectors trained here",
        "",
        f"Command: `{command_line()}`",
        "",
        f"{machine_info()} Ultralytics {ultralytics.__version__}. {load_note()}",
        f"Date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; whole run {total:.0f}s.",
        "",
        "Data: the Fashion-MNIST detection set (`lightning_obq.demo.detection_data`): "
        f"{spec.train_images} train / {spec.val_images} val canvases of {spec.canvas[0]}-{spec.canvas[1]} px with "
        f"{spec.objects[0]}-{spec.objects[1]} items of {spec.item_size[0]}-{spec.item_size[1]} px, 10 classes, "
        f"seed {spec.seed}. Validation: `YOLO.val` on the val split at imgsz {args.imgsz} (rect batches, "
        "Ultralytics defaults otherwise).",
        "",
        "Models (trained from scratch on CPU by `lightning_obq.demo.detector.train_detector`):",
        "",
        *[f"- {t}" for t in trained],
        "",
        "Quantization: every Conv2d except the DFL conv, per-channel asymmetric grid with MSE range search, "
        f"damp 0.1 (config defaults), {args.calib_images} train images for calibration; BatchNorm by the default "
        "`bn_mode=\"auto\"` (column 'BN': what it chose by held-back output fidelity), except in the rows marked "
        "BN re-estimation (`bn_mode=\"reestimate\"`, the paper's step). "
        "Seconds = calibration + solve + BN re-estimation (`QuantReport.total_seconds`); peak MB = process "
        "peak RSS during quantization (includes the Python process, Ultralytics and the model).",
        "",
        "| model | method | bits | BN | mAP50-95 | mAP50 | seconds | solve s | peak MB | layer error / RTN |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r["method"] == "FP":
            lines.append(f"| {r['model']} | FP | 32 | - | {r['mAP50-95']:.4f} | {r['mAP50']:.4f} | - | - | - | - |")
        else:
            ratio = r["error"] / r["rtn_error"] if r["rtn_error"] else float("nan")
            lines.append(
                f"| {r['model']} | {r['method']} | {r['bits']} | {r['bn']} | {r['mAP50-95']:.4f} | {r['mAP50']:.4f} | "
                f"{r['seconds']:.1f} | {r['solve_seconds']:.1f} | {r['peak_mb']:.0f} | {ratio:.3f} |"
            )
    if notes:
        lines += ["", *[f"- {n}" for n in notes]]
    lines += ["", "Raw rows (JSON):", "", "```json", json.dumps(rows, indent=None), "```", ""]
    out.write_text("\n".join(lines))
    print(f"wrote {out} in {total:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
