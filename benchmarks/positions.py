"""The `position_fraction` knob: calibration time against accuracy on the main job's CNN.

`QuantConfig(position_fraction=f)` feeds only a random share ``f`` of each layer's input columns (conv
output positions) into its Hessian. This script quantizes the trained Fashion-MNIST SmallResNet of the
main job (cached or trained here) with fastobq at W4 and W3 for several fractions and reports the
calibration seconds, the summed layer error and the test accuracy on all 10k test images.

    python benchmarks/positions.py --out benchmarks/results/positions.md
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
from common import RESULTS, command_line, fmt, markdown_table, write_markdown

from lightning_obq import QuantConfig
from lightning_obq.cli.jobs import quantize_and_evaluate
from lightning_obq.core import kernels
from lightning_obq.demo.data import FashionMNISTDataModule
from lightning_obq.demo.train import TrainSettings, train_default_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS / "positions.md")
    parser.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.5, 0.25, 0.1])
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    parser.add_argument("--calib-samples", type=int, default=2048)
    parser.add_argument("--val-samples", type=int, default=None, help="test images (default: all 10k)")
    args = parser.parse_args()
    kernels.load()  # before the first timed run, so its solve seconds do not carry the one-time load
    torch.manual_seed(0)
    dm = FashionMNISTDataModule(batch_size=256, val_samples=args.val_samples)
    dm.setup()
    calibration = dm.calibration_dataloader()  # QuantConfig.calib_samples caps what is drawn from it
    trained, info = train_default_model(TrainSettings(), progress=False)
    rows = []
    for bits in args.bits:
        for fraction in args.fractions:
            config = QuantConfig(bits=bits, position_fraction=fraction, calib_samples=args.calib_samples,
                                 progress=False)
            report = quantize_and_evaluate(copy.deepcopy(trained), config, calibration, dm.val_dataloader())
            m = report.metrics
            rows.append([bits, fraction, fmt(report.calib_seconds), fmt(report.solve_seconds),
                         fmt(report.total_error, 4), f"{100 * m['val_acc']:.2f}", f"{100 * m['obq/val_acc']:.2f}",
                         f"{100 * m['obq/top1_agreement']:.2f}"])
            print(rows[-1], flush=True)
    table = markdown_table(["bits", "position_fraction", "calibration s", "solve s", "layer error (sum)",
                            "FP acc %", "acc %", "top-1 agreement %"], rows)
    intro = (f"fastobq on the main job's SmallResNet ({info['settings']}, test accuracy "
             f"{100 * info['test_acc']:.2f}%), {args.calib_samples} calibration images, one-pass calibration, "
             "BN re-estimated. The layer error of each row is measured with that row's own (subsampled) "
             "Hessians. Calibration seconds include the forward passes, which subsampling does not shorten.")
    write_markdown(args.out, "position_fraction: calibration time vs accuracy", command_line(),
                   [("fastobq, Fashion-MNIST SmallResNet", table)], intro=intro)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
