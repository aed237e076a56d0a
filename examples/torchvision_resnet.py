"""Quantize a torchvision ResNet-18 with `quantize_model`: plain PyTorch, no Lightning.

    python examples/torchvision_resnet.py                                # random init, Fashion-MNIST data
    python examples/torchvision_resnet.py --checkpoint resnet18.pt      # your state_dict (torch.save)
    python examples/torchvision_resnet.py --weights DEFAULT --data ~/imagenet --image-size 224
                                                                         # ImageNet weights (needs internet once)

Calibration images come from an ImageFolder (``--data``; its ``train/`` and ``val/`` sub-folders are used
when present) or, by default, from the built-in Fashion-MNIST (gray images repeated to 3 channels). The
script prints the per-layer report (error of the solver vs round-to-nearest on the same grid, time,
memory) and the label-free output fidelity of the quantized network against the FP one (top-1 agreement,
KL divergence), and can save the packed model (``--output``). A randomly initialised network is enough
to see the quantizers at work: the layer errors and the fidelity do not need a trained model.
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torchvision import models

from lightning_obq import QuantConfig, QuantReport, quantize_model
from lightning_obq.demo.data import fashion_mnist, image_folder, subset
from lightning_obq.model.fidelity import output_fidelity


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet18", help="torchvision architecture (default resnet18)")
    p.add_argument("--weights", default=None, help="torchvision weights name, e.g. DEFAULT (downloads once)")
    p.add_argument("--checkpoint", default=None, help="a state_dict saved with torch.save")
    p.add_argument("--num-classes", type=int, default=None, help="output classes when not using --weights")
    p.add_argument("--data", default="fashion-mnist", help="ImageFolder path or 'fashion-mnist'")
    p.add_argument("--image-size", type=int, default=None, help="resize + centre-crop ImageFolder images")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--method", default="fastobq", choices=["fastobq", "gptq", "obq", "rtn"])
    p.add_argument("--calib-samples", type=int, default=512)
    p.add_argument("--eval-samples", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--skip", action="append", default=[], help="layer-name pattern kept in FP, e.g. 'fc'")
    p.add_argument("--output", type=Path, default=None, help="save the packed quantized model (safetensors)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def load_data(args: argparse.Namespace) -> tuple[DataLoader, DataLoader]:
    """(calibration, evaluation) loaders of 3-channel images."""
    if args.data == "fashion-mnist":
        calib = subset(fashion_mnist(True, channels=3), args.calib_samples, args.seed)
        evaluation = subset(fashion_mnist(False, channels=3), args.eval_samples, args.seed)
    else:
        root = Path(args.data).expanduser()
        train, val = (root / "train", root / "val") if (root / "train").is_dir() else (root, root)
        calib = image_folder(train, args.image_size, samples=args.calib_samples, seed=args.seed)
        evaluation = image_folder(val, args.image_size, samples=args.eval_samples, seed=args.seed)
    return (DataLoader(calib, batch_size=args.batch_size, shuffle=False),
            DataLoader(evaluation, batch_size=args.batch_size, shuffle=False))


def main(argv: Sequence[str] | None = None) -> tuple[torch.nn.Module, QuantReport]:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    kwargs = {"num_classes": args.num_classes} if args.num_classes else {}
    model = models.get_model(args.arch, weights=args.weights, **kwargs).eval()
    if args.checkpoint:
        model.load_state_dict(torch.load(args.checkpoint, map_location="cpu", weights_only=True))
    calib, evaluation = load_data(args)

    reference = copy.deepcopy(model)  # FP copy, for the fidelity comparison
    config = QuantConfig(bits=args.bits, method=args.method, calib_samples=args.calib_samples, exclude=args.skip)
    report = quantize_model(model, calib, config)  # in place; BatchNorm re-estimated on the calibration images
    report.metrics.update(output_fidelity(reference, model, evaluation))

    print(report.table())
    print(f"top-1 agreement with FP: {100 * report.metrics['top1_agreement']:.2f}%   "
          f"KL(FP || W{args.bits}): {report.metrics['kl_div']:.5f}")
    if args.output is not None:
        from lightning_obq.export.artifact import save_quantized

        print(f"saved {save_quantized(model, args.output, report)}")
    return model, report


if __name__ == "__main__":
    main()
