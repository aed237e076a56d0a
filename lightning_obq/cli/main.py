"""`lightning-obq`: the one-command demo, and `quantize` / `compare` for real models.

``lightning-obq`` with no arguments trains (or reuses a cached) `SmallResNet` on the real Fashion-MNIST,
quantizes it at 4 bits with `OBQCallback` using FastOBQ, GPTQ (act order), round-to-nearest and OBQ
(when its estimated time fits ``--obq-max-seconds``), sweeps the bit widths for the plot, and prints
a table. It writes ``report.json``, ``comparison.png`` and an offline W&B run into ``--output``.

``lightning-obq quantize`` quantizes a torchvision architecture (``resnet18``), the built-in
``smallresnet``, or a LightningModule/nn.Module given by class path (``pkg.module:Class``), loaded from
a checkpoint or state_dict (``torch.load(weights_only=True)`` or safetensors), calibrated and evaluated
on an ImageFolder or the built-in Fashion-MNIST. ``lightning-obq compare`` runs every method at every
bit width (2/3/4/8) in one go.

Every quantization goes through `OBQCallback` in ``trainer.validate``, so the accuracy, output fidelity
(`lightning_obq.fidelity`), timings and memory come from the same code the Lightning users run.
User errors (missing file, unknown architecture, checkpoint not fitting) exit with status 2 and a
one-line message; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import logging
import math
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from . import kernels
from .config import BN_MODES, DEFAULT_ORDER, METHODS, ORDERS, QuantConfig
from .data import fashion_mnist, image_folder, subset
from .hessian import weight_matrix
from .models import ImageClassifier, SmallResNet
from .report import QuantReport
from .yolo_cli import add_yolo_subcommand

log = logging.getLogger(__name__)

EXIT_USAGE = 2
DEFAULT_OUTPUT = "outputs/lightning-obq"


class CLIError(Exception):
    """A problem with the user's input: printed as one line, exit status 2, no traceback."""


# ---------------------------------------------------------------------------------------------- jobs


@dataclass(frozen=True)
class Job:
    """One quantization run of a comparison: a method, a bit width and (fastobq/gptq) a column order."""

    method: str
    bits: int
    order: str | None = None
    budget: float | None = None  # mixed precision: average bits per weight

    @property
    def label(self) -> str:
        label = f"{self.method} ({self.order})" if self.order else self.method
        return f"{label} mixed {self.budget:g}b" if self.budget is not None else label

    def config(self, base: QuantConfig) -> QuantConfig:
        return base.replace(method=self.method, bits=self.bits, order=self.order, budget=self.budget)


REPORTED_ORDERS = {"fastobq": DEFAULT_ORDER["fastobq"], "gptq": "act"}
"""Column order of each method in the demo and comparison tables (GPTQ's act order is its strongest)."""


def default_jobs(bits: int, obq: bool = True) -> list[Job]:
    """The demo's table: FastOBQ (its default order), GPTQ (act order), RTN, and OBQ."""
    jobs = [Job(m, bits, REPORTED_ORDERS.get(m)) for m in ("fastobq", "gptq", "rtn")]
    return jobs + [Job("obq", bits)] if obq else jobs


def compare_jobs(methods: Sequence[str], bits: Sequence[int], budget: float | None = None) -> list[Job]:
    """Every method at every bit width (fastobq in its default order, gptq in act order).

    With a ``budget`` (average bits per weight), each method except the slow exact OBQ also runs in
    mixed precision at that budget, next to its uniform run at the nearest whole width (added to the
    bit widths if missing), so uniform and mixed are compared at equal size.
    """
    if budget is not None:
        bits = sorted({*bits, min(8, max(2, round(budget)))})
    jobs = [Job(m, b, REPORTED_ORDERS.get(m)) for b in bits for m in methods]
    if budget is not None:
        jobs += [Job(m, min(8, max(2, round(budget))), REPORTED_ORDERS.get(m), budget) for m in methods if m != "obq"]
    return jobs


def task_metric(metrics: dict[str, float]) -> str | None:
    """The FP task metric to report: ``val_acc`` or ``test_acc`` if logged, else the first ``*acc*`` key."""
    fp = [k for k in metrics if not k.startswith("obq/")]
    for key in ("val_acc", "test_acc"):
        if key in fp:
            return key
    accs = sorted(k for k in fp if "acc" in k)
    return accs[0] if accs else (sorted(fp)[0] if fp else None)


def quantize_and_evaluate(
    module: L.LightningModule,
    config: QuantConfig,
    calibration: Iterable[Any],
    evaluation: DataLoader,
    progress: bool = False,
) -> QuantReport:
    """Quantize ``module`` in place with `OBQCallback` inside ``trainer.validate`` and return its report.

    The report's ``metrics`` hold the FP and quantized validation metrics and the output fidelity.
    """
    from .callback import OBQCallback

    callback = OBQCallback(config=config, when="validation_start", calib_dataloader=calibration)
    trainer = L.Trainer(
        accelerator="auto", devices=1, logger=False, callbacks=[callback], enable_checkpointing=False,
        enable_progress_bar=progress, enable_model_summary=False,
    )
    trainer.validate(module, dataloaders=evaluation, verbose=False)
    if callback.report is None:
        raise RuntimeError("OBQCallback did not quantize the module (no validation batch?)")
    return callback.report


def estimate_obq_seconds(model: nn.Module, config: QuantConfig) -> float:
    """Rough OBQ solve time for every selected layer, from timing OBQ on a few rows of a probe problem.

    OBQ costs ``O(d_col^3)`` per row, so one timed probe at the largest ``d_col`` (a random positive
    definite Hessian of that size, up to 16 rows) is scaled by ``rows * (d_col / d_probe)^3`` per layer.
    It decides whether the demo runs OBQ or marks it skipped, so a rough figure is enough.
    """
    from .quantize import find_layers
    from .quantizer import find_grid
    from .solvers import obq_row_batch, solve_obq

    shapes = [weight_matrix(m).shape for m in find_layers(model, config).values()]
    d_probe = max(s[2] for s in shapes)
    rows = min(16, obq_row_batch(d_probe, config.obq_memory_mb), max(s[0] * s[1] for s in shapes))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(d_probe, 2 * d_probe, generator=gen)
    h = x @ x.T / x.shape[1] + config.damp * torch.eye(d_probe)
    w = torch.randn(1, rows, d_probe, generator=gen)
    grid = find_grid(w, config.bits, config.symmetric, "channel", config.group_size, "minmax")
    start = time.perf_counter()
    solve_obq(w, h.unsqueeze(0), grid.scale, grid.zero, 2**config.bits - 1, config.obq_memory_mb, outliers=True)
    per_row = (time.perf_counter() - start) / rows
    return sum(g * r * per_row * (d / d_probe) ** 3 for g, r, d in shapes)


def run_jobs(
    module: L.LightningModule,
    jobs: Sequence[Job],
    base: QuantConfig,
    make_calibration: Callable[[], Iterable[Any]],
    evaluation: DataLoader,
    progress: bool,
    obq_max_seconds: float | None,
    say: Callable[[str], None] = print,
) -> tuple[list[dict[str, Any]], dict[str, QuantReport], dict[str, float]]:
    """Run every job on a fresh copy of the FP ``module``; returns (rows, reports by key, FP metrics).

    OBQ jobs whose estimated time (`estimate_obq_seconds`) exceeds ``obq_max_seconds`` are recorded
    with ``status="skipped"`` and the estimate. Rows are JSON-safe dicts (see `job_row`).
    """
    rows: list[dict[str, Any]] = []
    reports: dict[str, QuantReport] = {}
    fp: dict[str, float] = {}
    kernels.load()  # before the first timed job, so no row carries the compiled kernels' one-time load
    for i, job in enumerate(jobs, 1):
        config = job.config(base)
        key = f"{job.method}_w{job.bits}" + (f"_{job.order}" if job.order else "")
        if job.budget is not None:
            key += f"_mixed{job.budget:g}"
        if job.method == "obq" and obq_max_seconds is not None:
            estimate = estimate_obq_seconds(module.model if hasattr(module, "model") else module, config)
            if estimate > obq_max_seconds:
                say(f"[{i}/{len(jobs)}] {job.label} W{job.bits}: skipped (estimated {estimate:.0f}s > "
                    f"--obq-max-seconds {obq_max_seconds:.0f})")
                rows.append(job_row(job, key, None, status="skipped", estimate=estimate))
                continue
        say(f"[{i}/{len(jobs)}] {job.label} W{job.bits} ...")
        quantized = copy.deepcopy(module)
        report = quantize_and_evaluate(quantized, config, make_calibration(), evaluation, progress)
        del quantized
        reports[key] = report
        if not fp:
            fp = {k: v for k, v in report.metrics.items() if not k.startswith("obq/")}
        rows.append(job_row(job, key, report))
    return rows, reports, fp


def job_row(job: Job, key: str, report: QuantReport | None, status: str = "ok",
            estimate: float | None = None) -> dict[str, Any]:
    """One JSON-safe result row: the job, the quantized task metric, fidelity, time and memory."""
    row: dict[str, Any] = {"key": key, "label": job.label, "method": job.method, "order": job.order,
                           "bits": job.bits, "budget": job.budget, "status": status}
    if report is None:
        row["estimated_seconds"] = estimate
        return row
    metric = task_metric(report.metrics)
    row.update({
        "metric": metric,
        "fp_accuracy": report.metrics.get(metric) if metric else None,
        "accuracy": report.metrics.get(f"obq/{metric}") if metric else None,
        "top1_agreement": report.metrics.get("obq/top1_agreement"),
        "kl_div": report.metrics.get("obq/kl_div"),
        "seconds": report.total_seconds,
        "solve_seconds": report.solve_seconds,
        "peak_rss_mb": report.peak_rss_mb,
        "error": report.total_error,
        "rtn_error": report.total_rtn_error,
        "layers": len(report.layers),
        "samples": report.samples,
        "size_mb": report.quant_size_mb,
        "average_bits": report.allocation["average_bits"] if report.allocation else float(job.bits),
        "bn": report.batchnorm.get("chosen"),
        "batchnorm": report.batchnorm,
    })
    return row


def format_table(rows: Sequence[dict[str, Any]], fp_accuracy: float | None, metric: str = "accuracy") -> str:
    """The printed comparison: FP first, then one line per job."""
    head = (f"{'method':<22} {'bits':>4} {metric:>9} {'vs FP':>7} {'top-1 agree':>11} {'KL':>9} "
            f"{'seconds':>8} {'peak MB':>8} {'BN':>10}")
    lines = [head, "-" * len(head)]
    if fp_accuracy is not None:
        lines.append(f"{'FP32':<22} {32:>4} {100 * fp_accuracy:>8.2f}% {'':>7} {'':>11} {'':>9} {'':>8} {'':>8}")
    for r in rows:
        if r["status"] != "ok":
            est = r.get("estimated_seconds")
            note = f"skipped (est. {est:.0f}s)" if est is not None else "skipped"
            lines.append(f"{r['label']:<22} {r['bits']:>4} {note:>9}")
            continue
        acc = r.get("accuracy")
        delta = 100 * (acc - fp_accuracy) if acc is not None and fp_accuracy is not None else None
        lines.append(
            f"{r['label']:<22} {r['average_bits']:>4.3g} "
            + (f"{100 * acc:>8.2f}% " if acc is not None else f"{'-':>9} ")
            + (f"{delta:>+7.2f} " if delta is not None else f"{'-':>7} ")
            + f"{100 * r['top1_agreement']:>10.2f}% {r['kl_div']:>9.5f} {r['seconds']:>8.2f} {r['peak_rss_mb']:>8.0f}"
            + f" {r.get('bn') or '-':>10}"
        )
    modes = sorted({r["batchnorm"]["mode"] for r in rows if r.get("batchnorm")})
    if modes:
        lines.append(f"BN: the BatchNorm statistics each run ended with (bn_mode {', '.join(modes)}; auto keeps, "
                     "bias-corrects or re-estimates them, whichever is closest to FP on held-back calibration images)")
    return "\n".join(lines)


def machine_info() -> dict[str, Any]:
    """CPU model, cores, load average, Python/torch versions: written next to every number we publish."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info: dict[str, Any] = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                            "python": platform.python_version(), "torch": torch.__version__,
                            "platform": platform.platform()}
    try:
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
    return info


def log_wandb(out: Path, name: str, rows: Sequence[dict[str, Any]], reports: dict[str, QuantReport],
              plot: Path | None, config: dict[str, Any]) -> Path | None:
    """One W&B run (offline unless ``WANDB_MODE`` says otherwise) with every job's metrics, the comparison
    table and the plot; returns the run's folder."""
    os.environ.setdefault("WANDB_SILENT", "true")
    import wandb

    from .loggers import summary_metrics

    mode = os.environ.get("WANDB_MODE", "offline")
    # A run of its own even when another is active in this process (a WandbLogger, an earlier job).
    run = wandb.init(project="lightning-obq", name=name, dir=str(out), mode=mode, config=config, reinit="create_new")
    try:
        for key, report in reports.items():
            scalars = {k: float(v) for k, v in report.metrics.items()}
            scalars.update(summary_metrics(report))
            run.log({f"{key}/{k.removeprefix('obq/')}": v for k, v in scalars.items()})
        columns = ["label", "bits", "status", "accuracy", "top1_agreement", "kl_div", "seconds", "peak_rss_mb"]
        table = wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in rows])
        extras: dict[str, Any] = {"comparison": table}
        if plot is not None:
            extras["comparison_plot"] = wandb.Image(str(plot))
        run.log(extras)
        folder = Path(run.dir).parent
    finally:
        run.finish()
    return folder


def write_outputs(out: Path, name: str, command: str, rows: list[dict[str, Any]], reports: dict[str, QuantReport],
                  fp: dict[str, float], extra: dict[str, Any], plot_reports: dict[str, QuantReport],
                  wandb_on: bool, say: Callable[[str], None] = print) -> dict[str, Path]:
    """report.json, comparison.png and the W&B run of a comparison; returns their paths."""
    from .plots import plot_comparison

    out.mkdir(parents=True, exist_ok=True)
    metric = task_metric(fp)
    paths: dict[str, Path] = {}
    data = {"command": command, "machine": machine_info(), **extra, "fp_metrics": fp, "rows": rows,
            "reports": {k: r.to_dict() for k, r in reports.items()}}
    paths["report"] = out / "report.json"
    paths["report"].write_text(json.dumps(data, indent=2, default=str))
    paths["plot"] = plot_comparison(rows, plot_reports, out / "comparison.png",
                                    fp_metric=fp.get(metric) if metric else None, metric="accuracy", title=name)
    if wandb_on:
        run_dir = log_wandb(out, name, rows, reports, paths["plot"], {"command": command, **extra})
        if run_dir is not None:
            paths["wandb"] = run_dir
    for what, path in paths.items():
        say(f"{what:>7}: {path}")
    if "wandb" in paths:
        say(f"         (sync with: wandb sync {paths['wandb']})")
    return paths


# ---------------------------------------------------------------------------------------------- demo


def run_default(args: argparse.Namespace) -> int:
    """The embedded default: trained CNN on Fashion-MNIST, W4 table of every method, a bits sweep, outputs."""
    from .data import FashionMNISTDataModule
    from .train import TrainSettings, train_default_model

    progress = _progress(args)
    out = Path(args.output)
    command = _command(args)
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
    sweep = [b for b in _int_list(args.sweep_bits, "--sweep-bits") if b != args.bits]
    jobs += [j for b in sweep for j in default_jobs(b, obq=False)]
    print(f"step 2/3: quantize ({len(jobs)} runs: W{args.bits} table + bits sweep {sweep}) with OBQCallback, "
          f"{args.calib_samples} calibration images, {len(dm.val_set)} test images")
    rows, reports, fp = run_jobs(module, jobs, base, lambda: _calibration(calib_loader, args, progress), evaluation,
                                 progress, None if args.no_obq else args.obq_max_seconds)
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


# ---------------------------------------------------------------------------------------------- user models


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """A state_dict (and Lightning hyper-parameters, if any) from a ``.ckpt``/``.pt`` or ``.safetensors`` file.

    Pickle files are read with ``torch.load(weights_only=True)``, so no code inside them runs.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise CLIError(f"checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling/safetensors errors have many types
        raise CLIError(f"cannot read checkpoint {path}: {str(exc).splitlines()[0]}") from exc
    hparams = None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        hparams = obj.get("hyper_parameters")
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CLIError(f"checkpoint {path} holds a {type(obj).__name__}, not a state_dict of tensors")
    return obj, dict(hparams) if isinstance(hparams, dict) else None


def _load_into(model: nn.Module, state: dict[str, torch.Tensor], path: str, what: str) -> None:
    """``load_state_dict(strict=True)`` with a one-line error naming the checkpoint and the model."""
    own = set(model.state_dict())
    if not own & set(state) and all(k.startswith("model.") for k in state):
        state = {k[len("model."):]: v for k, v in state.items()}  # ImageClassifier checkpoint into its network
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        missing = sorted(own - set(state))
        unexpected = sorted(set(state) - own)
        detail = []
        if missing:
            detail.append(f"{len(missing)} missing keys (e.g. {missing[0]!r})")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]!r})")
        if not detail:
            lines = [ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln]
            detail.append(lines[0] if lines else str(exc).splitlines()[0])
        raise CLIError(f"checkpoint {path} does not fit {what}: {'; '.join(detail)}") from exc


def build_model(args: argparse.Namespace) -> tuple[L.LightningModule, nn.Module, str]:
    """(LightningModule to run, network whose layers are exported, description) from the model options."""
    spec = args.model
    init_args = _json_arg(args.init_args, "--init-args")
    state, hparams = load_checkpoint(args.checkpoint) if args.checkpoint else (None, None)
    num_classes = args.num_classes
    if ":" in spec:
        cls = _import_class(spec)
        kwargs = init_args if init_args else (hparams or {})
        try:
            obj = cls(**kwargs)
        except TypeError as exc:
            raise CLIError(f"cannot build {spec} with arguments {kwargs}: {exc}") from exc
        if isinstance(obj, L.LightningModule):
            if state is not None:
                _load_into(obj, state, args.checkpoint, spec)
            return obj, obj, spec
        if not isinstance(obj, nn.Module):
            raise CLIError(f"{spec} is a {type(obj).__name__}, not a LightningModule or nn.Module")
        net, what = obj, spec
    elif spec.lower() == "smallresnet":
        width = int(init_args.get("width", (hparams or {}).get("width", 32)))
        net = SmallResNet(num_classes or 10, in_channels=int(init_args.get("in_channels", 1)), width=width)
        what = f"smallresnet(width={width})"
    else:
        net, what = _torchvision_model(spec, args.weights, num_classes, init_args), spec
    if state is not None:
        _load_into(net, state, args.checkpoint, what)
    outputs = _num_outputs(net)
    return ImageClassifier(model=net, num_classes=outputs), net, what


def _torchvision_model(name: str, weights: str | None, num_classes: int | None, init_args: dict) -> nn.Module:
    from torchvision import models

    available = models.list_models()
    if name not in available:
        close = [m for m in available if name.lower()[:4] in m][:6]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise CLIError(f"unknown architecture {name!r}: not a torchvision model, 'smallresnet', or a class path "
                       f"'package.module:Class'{hint}")
    kwargs = dict(init_args)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    try:
        return models.get_model(name, weights=weights, **kwargs)
    except KeyError as exc:
        raise CLIError(f"unknown weights {weights!r} for {name}") from exc
    except (ValueError, TypeError) as exc:
        raise CLIError(f"cannot build {name}: {exc}") from exc
    except OSError as exc:  # weight download without internet
        raise CLIError(f"cannot download the {weights} weights of {name}: {exc}") from exc


def _import_class(spec: str) -> type:
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise CLIError(f"unknown architecture {spec!r}: cannot import module {module_name!r} ({exc})") from exc
    obj = module
    for part in attr.split("."):
        if not part or not hasattr(obj, part):
            raise CLIError(f"unknown architecture {spec!r}: {module_name} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not isinstance(obj, type):
        raise CLIError(f"{spec} is not a class")
    return obj


def _num_outputs(net: nn.Module) -> int:
    """Classes of a classifier: the output features of its last Linear (or channels of its last conv)."""
    last = [m for m in net.modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    if not last:
        raise CLIError(f"{type(net).__name__} has no Linear/Conv2d layer to quantize")
    m = last[-1]
    return m.out_features if isinstance(m, nn.Linear) else m.out_channels


def _in_channels(net: nn.Module) -> int:
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    return 3


def build_data(args: argparse.Namespace, net: nn.Module) -> tuple[Dataset, Dataset, str]:
    """(calibration set, evaluation set, description): built-in Fashion-MNIST or ImageFolder(s)."""
    channels = _in_channels(net)
    if channels not in (1, 3):
        raise CLIError(f"the model takes {channels} input channels; image data gives 1 or 3")
    calib_src = args.calib_data or args.data
    eval_src = args.eval_data or args.data

    def load(src: str, train: bool, samples: int | None) -> Dataset:
        if src.lower() in ("fashion-mnist", "fashion_mnist", "fashionmnist"):
            return subset(fashion_mnist(train, channels=channels), samples, args.seed)
        folder = Path(src).expanduser()
        if not folder.exists():
            raise CLIError(f"data folder {folder} does not exist (or use 'fashion-mnist')")
        split = folder / ("train" if train else "val")
        if split.is_dir():
            folder = split
        try:
            return image_folder(folder, image_size=args.image_size, channels=channels, samples=samples, seed=args.seed)
        except FileNotFoundError as exc:
            raise CLIError(str(exc)) from exc

    calib = load(calib_src, True, None)
    evaluation = load(eval_src, False, args.eval_samples)
    return calib, evaluation, f"calibration {calib_src} ({len(calib)} images), evaluation {eval_src} " \
                              f"({len(evaluation)} images)"


def _dataset_classes(dataset: Dataset) -> list[str] | None:
    while not hasattr(dataset, "classes") and hasattr(dataset, "dataset"):
        dataset = dataset.dataset  # Subset
    return getattr(dataset, "classes", None)


def _prepare(args: argparse.Namespace) -> tuple[L.LightningModule, nn.Module, str, DataLoader, DataLoader, str]:
    module, net, what = build_model(args)
    calib, evaluation, data_desc = build_data(args, net)
    classes = _dataset_classes(evaluation)
    outputs = getattr(module, "hparams", {}).get("num_classes") if isinstance(module, ImageClassifier) else None
    if classes is not None and outputs is not None and len(classes) > outputs:
        raise CLIError(f"the evaluation data has {len(classes)} classes but {what} has {outputs} outputs; "
                       "pass --num-classes or data with matching classes")
    calib_loader = DataLoader(calib, batch_size=args.batch_size, shuffle=False, num_workers=args.workers)
    eval_loader = DataLoader(evaluation, batch_size=args.batch_size, shuffle=False, num_workers=args.workers)
    return module, net, what, calib_loader, eval_loader, data_desc


def _base_config(args: argparse.Namespace, progress: bool, module: nn.Module, net: nn.Module) -> QuantConfig:
    """Settings shared by every job; ``--skip`` patterns name layers of the network as the user knows it."""
    prefix = "" if net is module else next(name for name, m in module.named_modules() if m is net) + "."
    return QuantConfig(bits=4, calib_samples=args.calib_samples, bn_mode=args.bn_mode, granularity=args.granularity,
                       symmetric=args.symmetric, progress=progress, exclude=tuple(prefix + p for p in args.skip))


def run_quantize(args: argparse.Namespace) -> int:
    """``lightning-obq quantize``: one method at one bit width, optional packed artifact."""
    progress = _progress(args)
    if args.order is not None and args.method not in ("fastobq", "gptq"):
        raise CLIError(f"--order applies to fastobq and gptq, not {args.method}")
    output = Path(args.output).expanduser() if args.output else None
    if output is not None and output.is_dir():
        raise CLIError(f"--output {output} is a folder; give a file name such as {output / 'model.safetensors'}")
    module, net, what, calib_loader, eval_loader, data_desc = _prepare(args)
    config = _base_config(args, progress, module, net).replace(bits=args.bits, method=args.method, order=args.order)
    print(f"quantizing {what} to W{args.bits} with {config.method}"
          + (f" ({config.order})" if config.order else "") + f"; {data_desc}")
    job = Job(config.method, config.bits, config.order if config.method in ("fastobq", "gptq") else None)
    report = quantize_and_evaluate(module, config, _calibration(calib_loader, args, progress), eval_loader, progress)
    row = job_row(job, "run", report)
    print(report.table())
    print()
    print(format_table([row], row.get("fp_accuracy")))
    if output is not None:
        from .export import save_quantized

        path = save_quantized(net, output, _report_for(net, module, report))
        print(f"quantized model: {path}")
    if args.report:
        report_path = Path(args.report).expanduser()
        report_path.parent.mkdir(parents=True, exist_ok=True)
        report_path.write_text(json.dumps({"command": _command(args), "machine": machine_info(), "row": row,
                                           "report": report.to_dict()}, indent=2, default=str))
        print(f"report: {report_path}")
    return 0


def _report_for(net: nn.Module, module: nn.Module, report: QuantReport) -> QuantReport:
    """The report with layer names relative to ``net`` when ``module`` wraps it (``ImageClassifier.model``)."""
    if net is module:
        return report
    prefix = next(name for name, m in module.named_modules() if m is net) + "."
    renamed = copy.copy(report)
    renamed.results = {k.removeprefix(prefix): v for k, v in report.results.items()}
    return renamed


def run_compare(args: argparse.Namespace) -> int:
    """``lightning-obq compare``: every method at every bit width, one table, report.json and plot."""
    progress = _progress(args)
    methods = _str_list(args.methods, "--methods", METHODS)
    bits = _int_list(args.bits, "--bits")
    if args.budget is not None and not 2 <= args.budget <= 8:
        raise CLIError(f"--budget must be an average bit width in [2, 8], got {args.budget}")
    module, net, what, calib_loader, eval_loader, data_desc = _prepare(args)
    jobs = compare_jobs(methods, bits, args.budget)
    print(f"comparing {what}: {len(jobs)} runs ({', '.join(methods)} x W{'/'.join(map(str, bits))}); {data_desc}")
    base = _base_config(args, progress, module, net)
    obq_limit = None if args.obq_max_seconds <= 0 else args.obq_max_seconds
    rows, reports, fp = run_jobs(module, jobs, base, lambda: _calibration(calib_loader, args, progress), eval_loader,
                                 progress, obq_limit)
    metric = task_metric(fp)
    print()
    print(format_table(rows, fp.get(metric) if metric else None))
    low = min(bits)
    plot_reports = {r["label"]: reports[r["key"]] for r in rows if r["bits"] == low and r["key"] in reports}
    write_outputs(Path(args.output_dir), f"compare {what}", _command(args), rows, reports, fp,
                  {"model": what, "data": data_desc, "quant_config": base.to_dict()}, plot_reports,
                  not args.no_wandb)
    return 0


# ---------------------------------------------------------------------------------------------- parsing


def _progress(args: argparse.Namespace) -> bool:
    return not args.no_progress and sys.stderr.isatty()


def _command(args: argparse.Namespace) -> str:
    return "lightning-obq " + " ".join(shlex.quote(a) for a in args.argv)


def _calibration(loader: DataLoader, args: argparse.Namespace, progress: bool) -> Iterable[Any]:
    """The calibration loader behind a progress bar (as many steps as batches will be drawn)."""
    from tqdm.auto import tqdm

    steps = min(len(loader), math.ceil(args.calib_samples / (loader.batch_size or 1)))
    return tqdm(loader, total=steps, desc="calibration", disable=not progress, leave=False)


def _int_list(text: str, flag: str) -> list[int]:
    if not text.strip():
        return []
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise CLIError(f"{flag} must be comma-separated integers, got {text!r}") from exc
    bad = [v for v in values if not 2 <= v <= 8]
    if bad:
        raise CLIError(f"{flag}: bit widths must be in 2..8, got {bad}")
    return sorted(set(values), key=values.index)


def _str_list(text: str, flag: str, choices: Sequence[str]) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in values if v not in choices]
    if bad or not values:
        raise CLIError(f"{flag}: {bad or text!r} not in {list(choices)}")
    return values


def _json_arg(text: str | None, flag: str) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CLIError(f"{flag} is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise CLIError(f"{flag} must be a JSON object, got {text!r}")
    return value


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true", help="no progress bars (they are off when not a terminal)")
    p.add_argument("--seed", type=int, default=0, help="seed of data subsets and training (default 0)")
    p.add_argument("--batch-size", type=int, default=256, help="loader batch size (default 256)")
    p.add_argument("--calib-samples", type=int, default=2048, help="calibration images (default 2048)")
    p.add_argument("--bn-mode", default="auto", choices=list(BN_MODES),
                   help="BatchNorm statistics after quantizing (default auto: keep, correct or re-estimate, "
                        "whichever measures closest to the FP model on held-back calibration images)")
    p.add_argument("--no-wandb", action="store_true", help="do not write the offline W&B run")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice); 1 is much faster when other jobs share the CPU")
    p.add_argument("--verbose", action="store_true", help="show Lightning's and the library's log messages")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")


def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="torchvision architecture (resnet18, mobilenet_v3_small, ...), 'smallresnet', or a class "
                        "path 'package.module:Class' (LightningModule or nn.Module)")
    p.add_argument("--checkpoint", help="state_dict or Lightning .ckpt (torch.load weights_only=True) or .safetensors")
    p.add_argument("--weights", help="torchvision weights name (e.g. DEFAULT, IMAGENET1K_V1); needs internet once")
    p.add_argument("--num-classes", type=int, help="classes of the architecture (torchvision/smallresnet)")
    p.add_argument("--init-args", help="JSON keyword arguments of the architecture or class")
    p.add_argument("--data", default="fashion-mnist",
                   help="'fashion-mnist' (built in) or an ImageFolder path (uses train/ and val/ if present)")
    p.add_argument("--calib-data", help="calibration data, if different from --data")
    p.add_argument("--eval-data", help="evaluation data, if different from --data")
    p.add_argument("--image-size", type=int, help="resize + centre-crop ImageFolder images to this size")
    p.add_argument("--eval-samples", type=int, help="evaluate on a deterministic subset of this many images")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers (default 0)")
    p.add_argument("--granularity", default="channel", choices=["channel", "tensor", "group"])
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
