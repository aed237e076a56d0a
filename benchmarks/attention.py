"""A vision transformer with its attention quantized, against the same model with attention left in float.

The demo's `SmallViT` (torchvision's `VisionTransformer`: four blocks of 4-head ``nn.MultiheadAttention`` and an
MLP, 64 wide, 7x7 patches) trained here on real Fashion-MNIST. For each method and bit width: every layer
quantized (the default, attention projections included, `lightning_obq.model.attention`) and the same run with
the projections kept in float (``exclude=["*.in_proj", "*.out_proj"]``, what the library did before), plus
fastobq under a mixed-precision budget. Test accuracy on the 10k test images, top-1 agreement and KL divergence
to the FP model, quantized size, seconds; every number is the mean over disjoint calibration sets. Writes
``benchmarks/results/attention.md``.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/attention.py
"""

from __future__ import annotations

import argparse
import copy
import fnmatch
from pathlib import Path

import torch
from common import RESULTS, command_line, fmt, markdown_table, write_markdown
from mixed import calibration_sets, mean

from lightning_obq import QuantConfig
from lightning_obq.cli.jobs import quantize_and_evaluate
from lightning_obq.demo.data import FashionMNISTDataModule
from lightning_obq.demo.train import TrainSettings, train_default_model
from lightning_obq.model.capture import find_layers

MODEL = TrainSettings(arch="smallvit", epochs=6, lr=1e-3)
FLOAT_ATTENTION = ("*.in_proj", "*.out_proj")
METHODS = {"fastobq": {"method": "fastobq"}, "gptq (act)": {"method": "gptq", "order": "act"},
           "rtn": {"method": "rtn"}, "obq": {"method": "obq"}}


def runs(args: argparse.Namespace) -> list[tuple[str, dict, bool]]:
    """(label, QuantConfig fields, attention quantized) of every row."""
    rows = []
    for bits in args.bits:
        for label, fields in METHODS.items():
            if label in args.methods:
                rows += [(label, {**fields, "bits": bits}, attention) for attention in (True, False)]
    for budget in args.budgets:
        rows += [("fastobq mixed", {"method": "fastobq", "bits": round(budget), "budget": budget}, attention)
                 for attention in (True, False)]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS / "attention.md")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--bits", nargs="+", type=int, default=[8, 4, 3])
    parser.add_argument("--budgets", nargs="*", type=float, default=[4.0, 3.0])
    parser.add_argument("--calib-samples", type=int, default=1024)
    parser.add_argument("--calib-sets", type=int, default=2, help="disjoint calibration sets; numbers are means")
    parser.add_argument("--val-samples", type=int, default=None, help="test images (default: all 10k)")
    args = parser.parse_args()

    torch.manual_seed(0)
    trained, info = train_default_model(MODEL, progress=False)
    dm = FashionMNISTDataModule(batch_size=256, val_samples=args.val_samples)
    dm.setup()
    sets = calibration_sets(dm, args.calib_samples, args.calib_sets)
    layers = find_layers(trained, QuantConfig())
    attention = {n for n in layers if any(fnmatch.fnmatchcase(n, p) for p in FLOAT_ATTENTION)}
    total = sum(m.weight.numel() for m in layers.values())
    share = sum(layers[n].weight.numel() for n in attention) / total

    rows = []
    for label, fields, quantized in runs(args):
        reports = []
        for calibration in sets:
            config = QuantConfig(calib_samples=args.calib_samples, progress=False,
                                 exclude=() if quantized else FLOAT_ATTENTION, **fields)
            reports.append(quantize_and_evaluate(copy.deepcopy(trained), config, calibration, dm.val_dataloader()))
        bits = [r.allocation["average_bits"] for r in reports if r.allocation]
        rows.append([
            label, fmt(mean(bits)) if bits else fields["bits"], "quantized" if quantized else "float",
            f"{len(reports[0].results)}/{len(layers)}", fmt(mean([r.quant_size_mb for r in reports]), 4),
            f"{100 * reports[0].metrics['val_acc']:.2f}",
            f"{100 * mean([r.metrics['obq/val_acc'] for r in reports]):.2f}",
            f"{100 * mean([r.metrics['obq/top1_agreement'] for r in reports]):.2f}",
            fmt(mean([r.metrics["obq/kl_div"] for r in reports]), 3),
            fmt(mean([r.total_seconds for r in reports]), 2),
        ])
        print(rows[-1], flush=True)
    table = markdown_table(["method", "bits", "attention projections", "layers quantized", "quantized MB",
                            "FP test acc %", "test acc %", "top-1 agreement with FP %", "KL(FP || quantized)",
                            "seconds"], rows)
    intro = (f"Trained here: {info['settings']}, test accuracy {100 * info['test_acc']:.2f}% "
             f"({'cached' if info['cached'] else 'trained in this run'}); {len(layers)} layers, of which "
             f"{len(attention)} attention projections holding {100 * share:.1f}% of the weights.")
    write_markdown(
        args.out, "Vision transformer: attention quantized vs left in float (Fashion-MNIST)", command_line(),
        [("SmallViT", intro + "\n\n" + table)],
        intro=("'attention projections: quantized' is the default (each nn.MultiheadAttention's in_proj and "
               "out_proj are layers); 'float' excludes them, so that row quantizes only the patch embedding, the "
               "MLPs and the head and keeps a larger model. 'bits' of a mixed row: the average the allocation "
               "reached (candidates "
               f"{{{', '.join(map(str, QuantConfig().candidate_bits))}}}; the float projections do not count in "
               "it). Each row is the mean over "
               f"{args.calib_sets} disjoint calibration sets of {args.calib_samples} training images; top-1 "
               "agreement and KL compare the quantized model's test outputs with the FP model's."),
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
