"""`lightning-obq`: the one-command demo, and `quantize` / `compare` for real models.

``lightning-obq`` with no arguments trains (or reuses a cached) `SmallResNet` on the real Fashion-MNIST,
quantizes it at 4 bits with `OBQCallback` using FastOBQ, GPTQ (act order), round-to-nearest and OBQ
(when its estimated time fits ``--obq-max-seconds``), sweeps the bit widths for the plot, and prints
a table. It writes ``report.json``, ``comparison.png`` and an offline W&B run into ``--output``.

``lightning-obq quantize`` quantizes a torchvision architecture (``resnet18``), one of the demo's networks
(``smallresnet``, ``mobilenetv2``, ``smallvit``), or a LightningModule/nn.Module given by class path
(``pkg.module:Class``), loaded from a checkpoint or state_dict (``torch.load(weights_only=True)`` or
safetensors), calibrated and evaluated on an ImageFolder or the built-in Fashion-MNIST. ``lightning-obq
compare`` runs every method at every bit width (2/3/4/8) in one go.

Every quantization goes through `OBQCallback` in ``trainer.validate``, so the accuracy, output fidelity
(`lightning_obq.model.fidelity`), timings and memory come from the same code the Lightning users run.
User errors (missing file, unknown architecture, checkpoint not fitting) exit with status 2 and a
one-line message; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import torch

from lightning_obq.cli.arguments import add_refine_sweeps
from lightning_obq.cli.commands import run_compare, run_quantize
from lightning_obq.cli.demo import run_default
from lightning_obq.cli.errors import DEFAULT_OUTPUT, EXIT_USAGE, CLIError
from lightning_obq.cli.yolo import add_yolo_subcommand
from lightning_obq.core.config import BN_MODES, METHODS, ORDERS


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true", help="no progress bars (they are off when not a terminal)")
    p.add_argument("--seed", type=int, default=0, help="seed of data subsets and training (default 0)")
    p.add_argument("--batch-size", type=int, default=256, help="loader batch size (default 256)")
    p.add_argument("--calib-samples", type=int, default=2048, help="calibration images (default 2048)")
    p.add_argument("--bn-mode", default="auto", choices=list(BN_MODES),
                   help="BatchNorm statistics after quantizing (default auto: keep, correct or re-estimate, "
                        "whichever measures closest to the FP model on held-back calibration images)")
    add_refine_sweeps(p)
    p.add_argument("--no-wandb", action="store_true", help="do not write the offline W&B run")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice); 1 is much faster when other jobs share the CPU")
    p.add_argument("--verbose", action="store_true", help="show Lightning's and the library's log messages")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")


def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="torchvision architecture (resnet18, mobilenet_v3_small, ...), a demo network "
                        "('smallresnet', 'mobilenetv2', 'smallvit'), or a class path 'package.module:Class' "
                        "(LightningModule or nn.Module)")
    p.add_argument("--checkpoint", help="state_dict or Lightning .ckpt (torch.load weights_only=True) or .safetensors")
    p.add_argument("--weights", help="torchvision weights name (e.g. DEFAULT, IMAGENET1K_V1); needs internet once")
    p.add_argument("--num-classes", type=int, help="classes of the architecture (torchvision or demo network)")
    p.add_argument("--init-args", help="JSON keyword arguments of the architecture or class")
    p.add_argument("--data", default="fashion-mnist",
                   help="'fashion-mnist' (built in) or an ImageFolder path (uses train/ and val/ if present)")
    p.add_argument("--calib-data", help="calibration data, if different from --data")
    p.add_argument("--eval-data", help="evaluation data, if different from --data")
    p.add_argument("--image-size", type=int, help="resize + centre-crop ImageFolder images to this size")
    p.add_argument("--eval-samples", type=int, help="evaluate on a deterministic subset of this many images")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers (default 0)")
    p.add_argument("--granularity", default="channel", choices=["channel", "tensor", "group"])
    p.add_argument("--kernel-row-grid", default="row", choices=["row", "granularity"],
                   help="grid of depthwise convs and image stems: one scale per kernel row (default) or as "
                        "--granularity")
    p.add_argument("--symmetric", action="store_true", help="symmetric grid")
    p.add_argument("--skip", action="append", default=[], metavar="PATTERN",
                   help="layer-name pattern kept in full precision (repeatable), e.g. 'fc' or 'layer4.*'")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-obq",
        description="Post-training weight quantization with FastOBQ. Without a command: the built-in demo "
                    "(train or reuse a CNN on Fashion-MNIST, quantize it with every method, print a table).",
    )
    _common(parser)
    parser.add_argument("--output", default=DEFAULT_OUTPUT, help=f"output folder (default {DEFAULT_OUTPUT})")
    parser.add_argument("--bits", type=int, default=4, help="bit width of the main table (default 4)")
    parser.add_argument("--sweep-bits", default="2,3", help="more bit widths for the plot, e.g. 2,3,8 ('' for none)")
    parser.add_argument("--epochs", type=int, default=3, help="training epochs of the demo CNN (default 3)")
    parser.add_argument("--train-samples", type=int, help="train on a subset of this many images")
    parser.add_argument("--width", type=int, default=32, help="SmallResNet width (default 32)")
    parser.add_argument("--val-samples", type=int, help="evaluate on a subset of the 10k test images")
    parser.add_argument("--no-cache", action="store_true", help="train again even if a cached model exists")
    parser.add_argument("--no-obq", action="store_true", help="leave out the slow exact OBQ baseline")
    parser.add_argument("--obq-max-seconds", type=float, default=240.0,
                        help="run OBQ only if its estimated time is below this (default 240)")
    parser.set_defaults(func=run_default)
    sub = parser.add_subparsers(dest="command", metavar="{quantize,compare,yolo}")

    q = sub.add_parser("quantize", help="quantize a model and evaluate it", description=run_quantize.__doc__)
    _model_options(q)
    _common(q)
    q.add_argument("--bits", type=int, default=4, help="weight bits, 2..8 (default 4)")
    q.add_argument("--method", default="fastobq", choices=list(METHODS))
    q.add_argument("--order", choices=list(ORDERS), help="column order (fastobq: any; gptq: none/act)")
    q.add_argument("--output", help="write the packed quantized model (safetensors) here")
    q.add_argument("--report", help="write the JSON report here")
    q.set_defaults(func=run_quantize)

    c = sub.add_parser("compare", help="every method at every bit width", description=run_compare.__doc__)
    _model_options(c)
    _common(c)
    c.add_argument("--bits", default="2,3,4,8", help="bit widths (default 2,3,4,8)")
    c.add_argument("--methods", default=",".join(METHODS), help=f"methods (default {','.join(METHODS)})")
    c.add_argument("--obq-max-seconds", type=float, default=240.0,
                   help="skip OBQ runs estimated above this (0: always run)")
    c.add_argument("--budget", type=float, help="also run mixed precision at this average bits per weight, "
                                                "next to uniform at the same size (e.g. 4.0)")
    c.add_argument("--output-dir", default=DEFAULT_OUTPUT + "-compare", help="folder for report.json and the plot")
    c.set_defaults(func=run_compare)
    add_yolo_subcommand(sub)
    return parser


def _quiet(verbose: bool) -> None:
    level = logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    for name in ("lightning.pytorch", "lightning.fabric", "lightning_obq"):
        logging.getLogger(name).setLevel(level)
    if not verbose:
        import warnings

        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*num_workers.*")
        warnings.filterwarnings("ignore", message=".*LeafSpec.*")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lightning-obq`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv
    _quiet(args.verbose)
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    try:
        return int(args.func(args) or 0)
    except CLIError as exc:
        if args.debug:
            raise
        print(f"lightning-obq: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (ValueError, TypeError, FileNotFoundError) as exc:
        # Validation errors of the library (QuantConfig fields, data paths) name the problem already.
        if args.debug:
            raise
        print(f"lightning-obq: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("lightning-obq: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
