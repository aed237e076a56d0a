"""Train a small ResNet on Fashion-MNIST and quantize it to 4 bits with OBQCallback at the end of fit.

The whole thing is an ordinary Lightning script: the only quantization-specific line is the callback.
After ``fit`` the callback evaluates the FP model, quantizes it with FastOBQ on training images, evaluates
the quantized model, and logs both (plus output fidelity, timings, memory and per-layer errors) to the
CSV logger and to an offline W&B run (``wandb sync <run dir>`` uploads it later).

    python examples/lightning_callback.py                        # 1 epoch on 12k images: minutes on 2 CPU cores
    python examples/lightning_callback.py --max-steps 20 --limit-batches 4 --train-samples 512 \
        --val-samples 256 --width 8                               # seconds (what the test runs)
    python examples/lightning_callback.py --devices 2 --strategy ddp   # the same on 2 processes

Fashion-MNIST is read from the local copy (``/usr/share/datasets/fashion-mnist`` or ``--data-root``),
see `lightning_obq.demo.data.FashionMNISTDataModule`.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.loggers import CSVLogger, WandbLogger

from lightning_obq import OBQCallback
from lightning_obq.demo.data import FashionMNISTDataModule
from lightning_obq.demo.models import ImageClassifier


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/lightning_callback"), help="logs and export folder")
    p.add_argument("--data-root", default=None, help="Fashion-MNIST root (default: the project cache)")
    p.add_argument("--max-epochs", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps (-1: epochs decide)")
    p.add_argument("--limit-batches", type=float, default=1.0,
                   help="limit train and val batches per epoch (int count if > 1, else a fraction)")
    p.add_argument("--train-samples", type=int, default=12000,
                   help="random subset of the 60k training images (0: all)")
    p.add_argument("--val-samples", type=int, default=5000, help="random subset of the 10k test images (0: all)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--width", type=int, default=16, help="SmallResNet width")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--method", default="fastobq", choices=["fastobq", "gptq", "obq", "rtn"])
    p.add_argument("--calib-samples", type=int, default=1024)
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--strategy", default="auto")
    p.add_argument("--export", action="store_true", help="also save the packed 4-bit model (safetensors)")
    p.add_argument("--no-wandb", action="store_true", help="log to CSV only")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> OBQCallback:
    args = parse_args(argv)
    pl.seed_everything(args.seed, workers=True)
    args.out.mkdir(parents=True, exist_ok=True)
    limit = int(args.limit_batches) if args.limit_batches > 1 else args.limit_batches

    data = FashionMNISTDataModule(root=args.data_root, batch_size=args.batch_size,
                                  train_samples=args.train_samples or None, val_samples=args.val_samples or None)
    model = ImageClassifier(width=args.width)
    loggers: list = [CSVLogger(args.out, name="csv")]
    if not args.no_wandb:
        os.environ.setdefault("WANDB_MODE", "offline")  # the callback would do the same; explicit here
        loggers.append(WandbLogger(project="lightning-obq-example", save_dir=str(args.out)))
    obq = OBQCallback(
        bits=args.bits, method=args.method, calib_samples=args.calib_samples,
        calib_dataloader=data.calibration_dataloader(),  # training images without augmentation, fixed order
        export_path=args.out / f"model_w{args.bits}.safetensors" if args.export else None,
    )
    trainer = pl.Trainer(
        accelerator="cpu", devices=args.devices, strategy=args.strategy, max_epochs=args.max_epochs,
        max_steps=args.max_steps, limit_train_batches=limit, limit_val_batches=limit, logger=loggers,
        callbacks=[obq], default_root_dir=args.out, enable_checkpointing=False, log_every_n_steps=10,
    )
    trainer.fit(model, datamodule=data)
    if trainer.is_global_zero and obq.report is not None:
        m = obq.report.metrics
        print(f"FP val_acc {m.get('val_acc', float('nan')):.4f} | W{args.bits} {args.method} val_acc "
              f"{m.get('obq/val_acc', float('nan')):.4f} (delta {m.get('obq/val_acc_delta', float('nan')):+.4f}) | "
              f"top-1 agreement {m.get('obq/top1_agreement', float('nan')):.4f} | "
              f"quantization {obq.report.total_seconds:.1f}s")
    if not args.no_wandb:
        import wandb

        wandb.finish()
    return obq


if __name__ == "__main__":
    main()
