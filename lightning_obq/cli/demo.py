"""``lightning-obq`` with no arguments: train (or reuse) the demo CNN on Fashion-MNIST, quantize it with every
method through `OBQCallback`, print the table, write report, plot and W&B run."""

from __future__ import annotations

import argparse
from pathlib import Path

from lightning_obq.cli.arguments import calibration_batches, command_text, int_list, progress_wanted
from lightning_obq.cli.jobs import default_jobs, format_table, run_jobs
from lightning_obq.cli.outputs import write_outputs
from lightning_obq.core.config import QuantConfig


def run_default(args: argparse.Namespace) -> int:
    """The embedded default: trained CNN on Fashion-MNIST, W4 table of every method, a bits sweep, outputs."""
    from lightning_obq.demo.data import FashionMNISTDataModule
    from lightning_obq.demo.train import TrainSettings, train_default_model

    progress = progress_wanted(args)
    out = Path(args.output)
    command = command_text(args)
    settings = TrainSettings(epochs=args.epochs, train_samples=args.train_samples, width=args.width, seed=args.seed)
    print(f"lightning-obq demo: SmallResNet(width={settings.width}) on Fashion-MNIST, W{args.bits}, output {out}")
    print("step 1/3: full-precision model (trained once, then reused from the cache)")
    def epoch_done(epoch: int, epochs: int, metrics: dict[str, float]) -> None:
        loss = metrics.get("train_loss_epoch", metrics.get("train_loss"))
        print(f"  epoch {epoch}/{epochs} done" + (f", train loss {loss:.4f}" if loss is not None else ""), flush=True)

    module, info = train_default_model(settings, cache=not args.no_cache, progress=progress,
                                       on_epoch=None if progress else epoch_done)
    how = "reused cached model" if info["cached"] else f"trained in {info['train_seconds']:.0f}s"
    print(f"  {how}: {info['path']} (test accuracy {100 * info['test_acc']:.2f}%)")

    dm = FashionMNISTDataModule(batch_size=args.batch_size, val_samples=args.val_samples, seed=args.seed)
    dm.setup()
    calib_loader = dm.calibration_dataloader()
    evaluation = dm.val_dataloader()
    base = QuantConfig(bits=args.bits, calib_samples=args.calib_samples, bn_mode=args.bn_mode, progress=progress)
    jobs = default_jobs(args.bits, obq=not args.no_obq)
    sweep = [b for b in int_list(args.sweep_bits, "--sweep-bits") if b != args.bits]
    jobs += [j for b in sweep for j in default_jobs(b, obq=False)]
    print(f"step 2/3: quantize ({len(jobs)} runs: W{args.bits} table + bits sweep {sweep}) with OBQCallback, "
          f"{args.calib_samples} calibration images, {len(dm.val_set)} test images")
    rows, reports, fp = run_jobs(module, jobs, base, lambda: calibration_batches(calib_loader, args, progress),
                                 evaluation, progress, None if args.no_obq else args.obq_max_seconds,
                                 refine_sweeps=args.refine_sweeps)
    main = [r for r in rows if r["bits"] == args.bits]
    fp_acc = fp.get("val_acc")
    print(f"\nW{args.bits} on Fashion-MNIST test ({len(dm.val_set)} images), {args.calib_samples} calibration images:")
    print(format_table(main, fp_acc))
    if sweep:
        print("\nbits sweep:")
        print(format_table([r for r in rows if r["bits"] != args.bits], fp_acc))
    print("\nstep 3/3: outputs")
    plot_reports = {r["label"]: reports[r["key"]] for r in main if r["key"] in reports}
    write_outputs(out, f"demo W{args.bits}", command, rows, reports, fp,
                  {"train": info, "quant_config": base.to_dict()}, plot_reports, not args.no_wandb)
    return 0
