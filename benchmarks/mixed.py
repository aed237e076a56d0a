"""Mixed precision vs uniform bit width at equal size, on CNNs trained here on real Fashion-MNIST.

For the ResNet-style CNN of the main job and a MobileNetV2-style CNN (inverted residuals with depthwise
3x3 convs, the kind that collapses at uniform 4 bits), for `fastobq` and `gptq`: uniform W4 and W3
against mixed precision at an average of 4.0 and 3.0 bits per weight (candidates 2/3/4/6/8), test
accuracy on the 10k Fashion-MNIST test images, each setting repeated on disjoint calibration sets (a
difference of a few test images is within the noise of a single run). Writes
``benchmarks/results/mixed.md``.

    python benchmarks/mixed.py --out benchmarks/results/mixed.md
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
from common import RESULTS, command_line, fmt, markdown_table, write_markdown

from lightning_obq import QuantConfig
from lightning_obq.cli.jobs import quantize_and_evaluate
from lightning_obq.demo.data import FashionMNISTDataModule
from lightning_obq.demo.train import TrainSettings, train_default_model

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


def calibration_sets(dm: FashionMNISTDataModule, samples: int, count: int) -> list[list]:
    """``count`` disjoint calibration sets of ``samples`` training images (batches of 256)."""
    per = max(1, samples // 256)
    batches = [b for _, b in zip(range(per * count), dm.calibration_dataloader(), strict=False)]
    return [batches[i * per:(i + 1) * per] for i in range(count)]


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def run(args: argparse.Namespace) -> list[tuple[str, str]]:
    torch.manual_seed(0)
    dm = FashionMNISTDataModule(batch_size=256, val_samples=args.val_samples)
    dm.setup()
    sets = calibration_sets(dm, args.calib_samples, args.calib_sets)
    sections = []
    for model_name, settings in MODELS.items():
        trained, info = train_default_model(settings, progress=False)
        rows = []
        for method in args.methods:
            uniform_acc: dict[int, list[float]] = {}
            for label, kwargs in SETTINGS:
                reports = []
                for calibration in sets:
                    config = QuantConfig(method=method, calib_samples=args.calib_samples, progress=False, **kwargs)
                    reports.append(quantize_and_evaluate(copy.deepcopy(trained), config, calibration,
                                                         dm.val_dataloader()))
                accs = [r.metrics["obq/val_acc"] for r in reports]
                allocations = [r.allocation for r in reports if r.allocation]
                bits = mean([a["average_bits"] for a in allocations]) if allocations else float(kwargs["bits"])
                if "budget" not in kwargs:
                    uniform_acc[kwargs["bits"]] = accs
                    gain = ""
                else:
                    diffs = [100 * (a - u) for a, u in zip(accs, uniform_acc[kwargs["bits"]], strict=True)]
                    gain = f"{mean(diffs):+.2f}" + (f" ({', '.join(f'{d:+.2f}' for d in diffs)})" if len(diffs) > 1
                                                     else "")
                chosen = sorted({s.bits for r in reports for s in r.layers})
                bn = [r.batchnorm.get("chosen", "-") for r in reports]
                bn_text = bn[0] if len(set(bn)) == 1 else ", ".join(
                    f"{m} {bn.count(m)}/{len(bn)}" for m in sorted(set(bn)))
                rows.append([
                    method, label, fmt(bits), fmt(mean([r.quant_size_mb for r in reports]), 4),
                    f"{100 * reports[0].metrics['val_acc']:.2f}", f"{100 * mean(accs):.2f}", gain,
                    f"{100 * mean([r.metrics['obq/top1_agreement'] for r in reports]):.2f}",
                    fmt(mean([r.metrics["obq/kl_div"] for r in reports]), 3), "/".join(map(str, chosen)),
                    fmt(mean([a["predicted_loss"] for a in allocations])) if allocations else "",
                    fmt(mean([a["uniform_predicted_loss"] for a in allocations])) if allocations else "",
                    (f"{fmt(mean([a['measured_loss'] for a in allocations]))} / "
                     f"{fmt(mean([a['uniform_measured_loss'] for a in allocations]))}")
                    if allocations and all("measured_loss" in a for a in allocations) else "",
                    f"{sum(a['kept_uniform'] for a in allocations)}/{len(allocations)}" if allocations else "",
                    bn_text, fmt(mean([r.total_seconds for r in reports]), 2),
                ])
                print(model_name, rows[-1], flush=True)
        table = markdown_table(
            ["method", "setting", "avg bits", "quantized MB", "FP acc %", "acc %", "vs uniform (points)",
             "top-1 agreement with FP %", "KL(FP || quantized)", "widths used", "predicted loss",
             "uniform predicted loss", "measured calib. output change (mixed / uniform)", "kept uniform",
             "BN chosen", "seconds"],
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
    parser.add_argument("--calib-sets", type=int, default=3,
                        help="disjoint calibration sets; every number is their mean")
    args = parser.parse_args()
    sections = run(args)
    write_markdown(
        args.out, "Mixed precision vs uniform at equal size (Fashion-MNIST)", command_line(), sections,
        intro=("Mixed precision picks each layer's width from "
               f"{{{', '.join(map(str, QuantConfig().candidate_bits))}}} (`QuantConfig.candidate_bits`) so that "
               "the predicted output loss (layer error x measured output gain) is least at the same average bits per "
               "weight as the uniform row above it; the allocation is then measured against uniform on the calibration "
               "data (all layers quantized together, after the same BatchNorm step as the final model) and uniform "
               "is kept if it changes the output less ('kept uniform', out of the runs). 'BN chosen': what the "
               "default bn_mode='auto' picked after measuring keep / correct / reestimate on held-back "
               "calibration images (one mode, or each mode with its share of the runs). "
               "Each setting runs once per disjoint calibration set of "
               f"{args.calib_samples} training images ({args.calib_sets} sets): numbers are means over the "
               "runs, and 'vs uniform' (test accuracy difference in points at equal size, paired by "
               "calibration set) also lists each run's value. "
               "Top-1 agreement and KL divergence compare the quantized model's test outputs with the FP "
               "model's (labels not used): they show fidelity with less noise than accuracy."),
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
