"""Mixed precision vs uniform bit width at equal size, on CNNs trained here on real Fashion-MNIST.

For the ResNet-style CNN of the main job and a MobileNetV2-style CNN (inverted residuals with depthwise
3x3 convs, the kind that collapses at uniform 4 bits), for `fastobq` and `gptq`: uniform W4 and W3
against mixed precision at an average of 4.0 and 3.0 bits per weight (candidates 2/3/4/6/8), test
accuracy on the 10k Fashion-MNIST test images. Writes ``benchmarks/results/mixed.md``.

    python benchmarks/mixed.py --val-samples 5000 --out benchmarks/results/mixed.md
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
from common import RESULTS, command_line, fmt, markdown_table, write_markdown

from lightning_obq import QuantConfig
from lightning_obq.cli import quantize_and_evaluate
from lightning_obq.data import FashionMNISTDataModule
from lightning_obq.train import TrainSettings, train_default_model

MODELS = {
    "SmallResNet": TrainSettings(),
    "MobileNetV2-style": TrainSettings(arch="mobilenetv2", epochs=3, train_samples=20000),
}
SETTINGS = [
    ("uniform W4", {"bits": 4}),
    ("mixed 4.0 bits", {"bits": 4, "budget": 4.0}),
    ("uniform W3", {"bits": 3}),
    ("mixed 3.0 bits", {"bits": 3, "budget": 3.0}),
]


def run(args: argparse.Namespace) -> list[tuple[str, str]]:
    torch.manual_seed(0)
    dm = FashionMNISTDataModule(batch_size=256, val_samples=args.val_samples)
    dm.setup()
    calibration = [b for _, b in zip(range(args.calib_samples // 256), dm.calibration_dataloader(), strict=False)]
    sections = []
    for model_name, settings in MODELS.items():
        trained, info = train_default_model(settings, progress=False)
        rows = []
        for method in args.methods:
            uniform_acc: dict[int, float] = {}
            for label, kwargs in SETTINGS:
                module = copy.deepcopy(trained)
                config = QuantConfig(method=method, calib_samples=args.calib_samples, progress=False, **kwargs)
                report = quantize_and_evaluate(module, config, calibration, dm.val_dataloader())
                acc = report.metrics["obq/val_acc"]
                bits = report.allocation["average_bits"] if report.allocation else float(kwargs["bits"])
                if "budget" not in kwargs:
                    uniform_acc[kwargs["bits"]] = acc
                    gain = ""
                else:
                    gain = f"{100 * (acc - uniform_acc[kwargs['bits']]):+.2f}"
                chosen = sorted({s.bits for s in report.layers})
                rows.append([
                    method, label, fmt(bits), fmt(report.quant_size_mb, 4), f"{100 * report.metrics['val_acc']:.2f}",
                    f"{100 * acc:.2f}", gain, "/".join(map(str, chosen)),
                    fmt(report.allocation["predicted_loss"]) if report.allocation else "",
                    fmt(report.allocation["uniform_predicted_loss"]) if report.allocation else "",
                    fmt(report.total_seconds, 2),
                ])
                print(model_name, rows[-1], flush=True)
        table = markdown_table(
            ["method", "setting", "avg bits", "quantized MB", "FP acc %", "acc %", "vs uniform (points)",
             "widths used", "predicted loss", "uniform predicted loss", "seconds"],
            rows,
        )
        intro = (f"Trained here: {info['settings']}, test accuracy {100 * info['test_acc']:.2f}% "
                 f"({'cached' if info['cached'] else 'trained in this run'}).\n\n")
        sections.append((model_name, intro + table))
    return sections


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS / "mixed.md")
    parser.add_argument("--methods", nargs="+", default=["fastobq", "gptq"])
    parser.add_argument("--calib-samples", type=int, default=1024)
    parser.add_argument("--val-samples", type=int, default=None, help="test images (default: all 10k)")
    args = parser.parse_args()
    sections = run(args)
    write_markdown(
        args.out, "Mixed precision vs uniform at equal size (Fashion-MNIST)", command_line(), sections,
        intro=("Mixed precision picks each layer's width from {2, 3, 4, 6, 8} so that the predicted output "
               "loss (layer error x measured output gain) is least at the same average bits per weight as the "
               "uniform row above it. 'vs uniform' is the accuracy difference in points at equal size."),
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
