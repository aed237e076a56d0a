"""Ultralytics YOLO support: quantize detectors with FastOBQ, validate mAP, save a checkpoint YOLO() loads.

One call and one callback::

    from lightning_obq.ultralytics import quantize_yolo, obq_callback, save_quantized_yolo

    yolo, report = quantize_yolo("best.pt", data="data.yaml", bits=6, imgsz=640)
    save_quantized_yolo(yolo, "best-w6.pt", report)   # YOLO("best-w6.pt").predict(...) works

    model = YOLO("yolov8n.yaml")
    model.add_callback("on_train_end", obq_callback(bits=6))   # quantize best.pt after model.train()

How it works with Ultralytics:

- Calibration images are the dataset's train images, loaded by Ultralytics' own dataset builder
  (`ultralytics.data.build.build_yolo_dataset` in evaluation mode: letterbox to ``imgsz`` with the
  model's stride, no augmentation) and scaled like the validator does (``img.float() / 255``).
- Every Conv2d of backbone, neck and head is quantized from one set of Hessians (core `quantize_model`),
  except the DFL conv (``*.dfl.conv``: a fixed 0..15 projection, not a learned weight) unless
  ``quantize_dfl=True``. The model is quantized *unfused*, with its BatchNorm layers. Fusing
  afterwards (``model.fuse()``, which inference does on its model) folds BN into each conv by a
  per-output-channel scale, so a per-channel grid stays a grid.
- BatchNorm follows the core default, ``bn_mode="auto"``: the trained running statistics of a YOLO model
  come from its mosaic-augmented training distribution, and re-estimating them on a few hundred
  letterboxed calibration images can cost more mAP than quantization itself, so the candidates (keep,
  bias-correct, re-estimate) are measured on held-back calibration images by the mean squared change of
  the detection head's outputs against the FP model, and the closest wins (`lightning_obq.batchnorm`).
  ``bn_mode="keep"`` or ``"reestimate"`` force one.
- ``YOLO.val`` and ``YOLO.predict`` fuse the model they run (Ultralytics releases before 8.4 did so in
  place), so every evaluation here runs on a deep copy: the FP model is measured before quantization
  and the quantized one after, and the returned model is still unfused.

Everything Ultralytics is imported inside the functions, so ``import lightning_obq.ultralytics``
works (and fails only when called) without Ultralytics installed.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import random
import shutil
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from .config import QuantConfig
from .quantize import quantize_model
from .report import QuantReport
from .version import __version__

if TYPE_CHECKING:
    from ultralytics import YOLO

log = logging.getLogger(__name__)

DFL_PATTERN = "*.dfl.conv"
"""Name pattern of the Distribution Focal Loss projection conv (fixed weights 0..15), excluded by default."""

RECIPE_KEY = "lightning_obq"
"""Key of the quantization recipe inside a saved Ultralytics checkpoint."""

METRIC_KEYS = {"mAP50-95": "map", "mAP50": "map50"}
"""Report metric name -> attribute of Ultralytics' ``DetMetrics.box``."""


def _require_ultralytics() -> Any:
    try:
        import ultralytics
    except ImportError as exc:
        raise ImportError(
            "lightning_obq.ultralytics needs the 'ultralytics' package: pip install ultralytics"
        ) from exc
    return ultralytics


def load_yolo(model_or_path: Any) -> YOLO:
    """A detection ``YOLO`` from a ``YOLO`` object, a ``.pt`` checkpoint or a model ``.yaml``.

    Raises:
        FileNotFoundError: a local path that does not exist (bare names such as ``yolov8n.pt`` are
            left to Ultralytics, which downloads official weights when online).
        TypeError: anything else (e.g. a torchvision classifier, a bare ``nn.Module``).
        ValueError: a YOLO model whose task is not ``detect`` (classify, segment-only, ...).
    """
    _require_ultralytics()
    from ultralytics import YOLO
    from ultralytics.engine.model import Model

    if isinstance(model_or_path, Model):
        yolo = model_or_path
    elif isinstance(model_or_path, str | os.PathLike):
        path = Path(model_or_path).expanduser()
        if not path.exists() and (path.parent != Path(".") or path.suffix not in (".pt", ".yaml", ".yml")):
            raise FileNotFoundError(f"model_or_path: {str(model_or_path)!r} does not exist")
        yolo = YOLO(str(path) if path.exists() else str(model_or_path))
    else:
        raise TypeError(
            "model_or_path must be an ultralytics YOLO object or the path of a YOLO .pt/.yaml, got "
            f"{type(model_or_path).__module__}.{type(model_or_path).__name__}"
            + (" (a plain torch module; only Ultralytics detection models are supported here, use "
               "lightning_obq.quantize_model for other models)" if isinstance(model_or_path, nn.Module) else "")
        )
    if not isinstance(yolo.model, nn.Module):
        raise TypeError(f"model_or_path: {yolo.model!r} is not a PyTorch model (exported formats cannot be quantized)")
    if yolo.task != "detect":
        raise ValueError(
            f"model_or_path: {type(yolo.model).__name__} is a YOLO {yolo.task!r} model; quantize_yolo needs a "
            "detection model (task='detect')"
        )
    return yolo


def _image_count(folder: Path) -> int:
    from ultralytics.data.utils import IMG_FORMATS

    return sum(1 for p in folder.rglob("*") if p.suffix[1:].lower() in IMG_FORMATS)


def resolve_dataset(data: str | os.PathLike, splits: Sequence[str] = ("train", "val")) -> dict[str, Any]:
    """Ultralytics' checked dataset dict for ``data`` (a data.yaml), with each needed split holding images.

    Raises:
        FileNotFoundError: the data.yaml (a local path) or a split's folder does not exist.
        ValueError: a split's folder holds no image.
    """
    _require_ultralytics()
    from ultralytics.data.utils import check_det_dataset

    if not isinstance(data, str | os.PathLike):
        raise TypeError(f"data must be the path of a data.yaml, got {type(data).__name__}")
    path = Path(data).expanduser()
    if not path.is_file() and (path.parent != Path(".") or path.suffix not in (".yaml", ".yml")):
        raise FileNotFoundError(f"data: dataset file {str(data)!r} does not exist")
    info = check_det_dataset(str(path) if path.is_file() else str(data))
    for split in splits:
        entries = info.get(split)
        if not entries:
            raise ValueError(f"data: {data} has no {split!r} split")
        for entry in entries if isinstance(entries, list) else [entries]:
            entry = Path(entry)
            if not entry.exists():
                raise FileNotFoundError(f"data: {split!r} images of {data} not found at {entry}")
            if entry.is_dir() and _image_count(entry) == 0:
                raise ValueError(f"data: the {split!r} image folder {entry} of {data} holds no image")
    return info


def yolo_forward(model: nn.Module, batch: torch.Tensor) -> Any:
    """Run a batch of uint8 letterboxed images (N, 3, H, W) through a YOLO model, scaled as the validator does."""
    dtype = next(model.parameters()).dtype
    return model(batch.to(dtype) / 255)


def _check_calib_images(value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"calib_images must be a positive int, got {value!r}")


def calibration_images(
    data: str | os.PathLike,
    model: nn.Module,
    imgsz: int = 640,
    samples: int = 128,
    batch: int = 16,
    split: str = "train",
    seed: int = 0,
) -> list[torch.Tensor]:
    """Up to ``samples`` images of a split as uint8 batches (N, 3, H, W), preprocessed the Ultralytics way.

    The images are a deterministic random subset (``seed``), loaded by ``build_yolo_dataset`` in
    evaluation mode (letterboxed to ``imgsz`` with the model's stride, no augmentation). They stay uint8
    (4x smaller than float); `yolo_forward` scales them to [0, 1].
    """
    _require_ultralytics()
    from ultralytics.cfg import get_cfg
    from ultralytics.data.build import build_yolo_dataset
    from ultralytics.utils import DEFAULT_CFG

    _check_calib_images(samples)
    info = resolve_dataset(data, splits=(split,))
    stride = max(int(model.stride.max()), 32) if hasattr(model, "stride") else 32
    cfg = get_cfg(DEFAULT_CFG, {"imgsz": imgsz, "task": "detect", "rect": False, "cache": False, "fraction": 1.0})
    dataset = build_yolo_dataset(cfg, info[split], batch, info, mode="val", stride=stride, fraction=1.0)
    order = list(range(len(dataset)))
    random.Random(seed).shuffle(order)
    batches = []
    chosen = order[:samples]
    for start in range(0, len(chosen), batch):
        items = [dataset[i] for i in chosen[start: start + batch]]
        batches.append(torch.stack([item["img"] for item in items]))
    return batches


def evaluate_yolo(yolo: YOLO, data: str | os.PathLike, imgsz: int = 640, batch: int = 16,
                  **val_kwargs: Any) -> dict[str, float]:
    """mAP50-95 and mAP50 of ``yolo`` on the data's val split, measured on a deep copy.

    ``YOLO.val`` fuses the model it validates (in place in Ultralytics < 8.4); validating a copy leaves
    ``yolo`` unfused in every version, BatchNorm layers intact and still quantizable.
    """
    original = yolo.model
    yolo.model = copy.deepcopy(original)
    try:
        args = {"plots": False, "verbose": False, "save_json": False, **val_kwargs}
        metrics = yolo.val(data=str(data), imgsz=imgsz, batch=batch, **args)
    finally:
        yolo.model = original
    return {name: float(getattr(metrics.box, attr)) for name, attr in METRIC_KEYS.items()}


def _config(config: QuantConfig | None, quantize_dfl: bool, **fields: Any) -> QuantConfig:
    if config is None:
        config = QuantConfig(**fields)
    elif not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a QuantConfig, got {type(config).__name__}")
    if not quantize_dfl and DFL_PATTERN not in config.exclude:
        config = config.replace(exclude=(*config.exclude, DFL_PATTERN))
    return config


def quantize_yolo(
    model_or_path: Any,
    data: str | os.PathLike,
    bits: int = 6,
    method: str = "fastobq",
    calib_images: int = 128,
    imgsz: int = 640,
    batch: int = 16,
    include: Sequence[str] = ("*",),
    exclude: Sequence[str] = (),
    quantize_dfl: bool = False,
    config: QuantConfig | None = None,
    evaluate: bool = True,
    val_kwargs: dict[str, Any] | None = None,
    fp_metrics: dict[str, float] | None = None,
    wandb: bool = False,
    wandb_project: str = "lightning-obq",
    wandb_dir: str | os.PathLike | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    **config_fields: Any,
) -> tuple[YOLO, QuantReport]:
    """Quantize the weights of a YOLO detector in place and return it with a `QuantReport`.

    Args:
        model_or_path: a ``YOLO`` detection object, or the path of a ``.pt`` checkpoint / model ``.yaml``.
        data: the dataset's data.yaml; calibration uses its train images, evaluation its val split.
        bits, method: weight bits (2..8) and method (``fastobq``, ``gptq``, ``obq``, ``rtn``).
        calib_images: number of train images used for calibration (and BN re-estimation).
        imgsz, batch: image size and batch size for calibration and validation.
        include, exclude: ``fnmatch`` patterns on layer names (``model.22.*``), as in `QuantConfig`.
        quantize_dfl: also quantize the fixed DFL conv (excluded by default).
        config: a full `QuantConfig` instead of ``bits``/``method``/``include``/``exclude``/``config_fields``
            (``calib_images`` still sets ``calib_samples``).
        evaluate: validate FP and quantized models with ``YOLO.val``; mAPs go to ``report.metrics``
            as ``fp/mAP50-95``, ``fp/mAP50``, ``quant/mAP50-95``, ``quant/mAP50`` and ``delta/...``.
        val_kwargs: extra arguments for ``YOLO.val`` (``device``, ``conf``, ...).
        fp_metrics: the FP model's ``{"mAP50-95": ..., "mAP50": ...}`` when already measured with the same
            settings (a sweep over bits/methods), so it is not validated again.
        wandb: log config, metrics and per-layer stats to a W&B run (offline unless ``WANDB_MODE`` says otherwise).
        seed: picks the calibration images.
        device: where to calibrate, solve and validate (``"cpu"``, ``"cuda:0"`` or Ultralytics' ``"0"``);
            default: where the model is.
        config_fields: any other `QuantConfig` field (``damp=0.01``, ``granularity="group"``, ...).

    The model is never left half-quantized: if anything fails, its weights are restored and the error propagates.
    """
    _check_calib_images(calib_images)
    yolo = load_yolo(model_or_path)
    resolve_dataset(data, splits=("train", "val") if evaluate else ("train",))
    if config is not None and config_fields:
        raise TypeError(f"pass either config or QuantConfig fields, not both (got {sorted(config_fields)})")
    if config is not None:
        config = config.replace(calib_samples=calib_images)
    cfg = _config(config, quantize_dfl, bits=bits, method=method, include=tuple(include), exclude=tuple(exclude),
                  calib_samples=calib_images, **config_fields)
    model = yolo.model
    if device is not None:
        device = torch.device(f"cuda:{device}" if str(device).isdigit() else device)
        model.to(device)
    else:
        device = next(model.parameters()).device
    val_kwargs = {"device": str(device), **(val_kwargs or {})}
    if hasattr(model, "is_fused") and model.is_fused():
        log.warning("the YOLO model is already fused (BatchNorm folded): quantizing the folded weights")
    metrics: dict[str, float] = {}
    if evaluate:
        fp = fp_metrics if fp_metrics is not None else evaluate_yolo(yolo, data, imgsz, batch, **val_kwargs)
        metrics.update({f"fp/{k}": float(fp[k]) for k in METRIC_KEYS})
    batches = calibration_images(data, model, imgsz=imgsz, samples=cfg.calib_samples, batch=batch, seed=seed)
    report = quantize_model(model, batches, cfg, forward_fn=yolo_forward)
    yolo.predictor = None  # a cached predictor may hold a fused copy made before quantization
    if evaluate:
        metrics.update({f"quant/{k}": v for k, v in evaluate_yolo(yolo, data, imgsz, batch, **val_kwargs).items()})
        for key in METRIC_KEYS:
            metrics[f"delta/{key}"] = metrics[f"quant/{key}"] - metrics[f"fp/{key}"]
    report.metrics.update(metrics)
    log.info("YOLO %s W%d: %s", cfg.method, cfg.bits, ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    if wandb:
        log_to_wandb(report, project=wandb_project, directory=wandb_dir,
                     extra={"model": str(getattr(yolo, "ckpt_path", None) or yolo.model_name), "data": str(data),
                            "imgsz": imgsz, "calib_images": calib_images})
    return yolo, report


def log_to_wandb(report: QuantReport, project: str = "lightning-obq", directory: str | os.PathLike | None = None,
                 extra: dict[str, Any] | None = None, name: str | None = None) -> str:
    """Log a report to W&B the way `OBQCallback` does (`lightning_obq.loggers.log_report`); returns the run folder.

    The ``obq/...`` scalars, the per-layer table and error plot, plus the mAPs (``fp/mAP50``,
    ``quant/mAP50``, ...) and the config. Runs are offline unless ``WANDB_MODE`` is set, so nothing
    needs an account or network.
    """
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    from .loggers import default_wandb_offline, log_report

    default_wandb_offline()
    config = report.config
    # A run of its own even when another is active in this process (a WandbLogger, an earlier call).
    run = wandb.init(project=project, dir=str(directory) if directory else ".", reinit="create_new",
                     name=name or f"yolo-{config.get('method')}-w{config.get('bits')}")
    logger = WandbLogger(experiment=run)
    try:
        logger.log_hyperparams({**config, **(extra or {})})
        log_report([logger], report, step=0)
        for key, value in report.metrics.items():
            logger.experiment.summary[key] = value
        folder = logger.experiment.dir
    finally:
        logger.experiment.finish()
    return folder


def recipe(report: QuantReport | None) -> dict[str, Any]:
    """The JSON-safe description stored with a quantized checkpoint: library version, config, metrics, layers."""
    out: dict[str, Any] = {"library": "lightning-obq", "version": __version__}
    if report is not None:
        out.update(config=report.config, metrics=dict(report.metrics),
                   layers={s.name: {"bits": s.bits, "shape": s.shape, "error": s.error} for s in report.layers},
                   skipped=list(report.skipped), samples=report.samples)
    return json.loads(json.dumps(out))


def save_quantized_yolo(yolo: YOLO, path: str | os.PathLike, report: QuantReport | None = None) -> Path:
    """Write an Ultralytics checkpoint of the quantized model that ``YOLO(path)`` loads and predicts with.

    The file is what Ultralytics writes (a torch pickle of a dict whose ``"model"`` is the module, plus
    ``train_args``, date and version), with the weights kept in float32 (Ultralytics stores half precision,
    which would move the weights off the quantization grid) and no EMA, plus the recipe under
    ``"lightning_obq"`` (see `recipe`; read it back with `read_recipe`). Loading it needs no lightning-obq.
    """
    _require_ultralytics()
    from ultralytics import __version__ as ultralytics_version

    yolo = load_yolo(yolo)
    path = Path(path).expanduser()
    if path.suffix != ".pt":
        raise ValueError(f"path: {path} must end in .pt (Ultralytics picks the loader by suffix)")
    path.parent.mkdir(parents=True, exist_ok=True)
    model = copy.deepcopy(yolo.model).float().to("cpu", memory_format=torch.contiguous_format)
    for p in model.parameters():
        p.requires_grad_(False)
    ckpt = {k: v for k, v in (yolo.ckpt or {}).items() if k not in ("optimizer", "ema", "model", "updates")}
    if "train_args" not in ckpt and isinstance(getattr(yolo.model, "args", None), dict):
        ckpt["train_args"] = dict(yolo.model.args)
    ckpt.update(
        model=model, ema=None, optimizer=None, epoch=-1,
        date=datetime.now(timezone.utc).isoformat(), version=ultralytics_version,
        **{RECIPE_KEY: recipe(report)},
    )
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(ckpt, tmp)
    os.replace(tmp, path)
    log.info("saved the quantized YOLO checkpoint to %s", path)
    return path


def save_packed_yolo(yolo: YOLO, path: str | os.PathLike, report: QuantReport) -> Path:
    """Write the packed low-bit artifact (`lightning_obq.export.save_quantized`: safetensors, no pickle).

    It holds the integer codes, scales and every other tensor, not the architecture: load it with
    `load_packed_yolo` into the same architecture (the FP checkpoint or one with the same layers).
    Save before ``yolo.fuse()``: the artifact holds the unfused layers the codes were computed for.
    """
    from .export import save_quantized

    yolo = load_yolo(yolo)
    return save_quantized(yolo.model, path, report)


def load_packed_yolo(path: str | os.PathLike, architecture: Any, keep_packed: bool = False) -> YOLO:
    """A ``YOLO`` built from ``architecture`` (a YOLO, ``.pt`` or ``.yaml``) with the weights of a packed artifact.

    Everything is checked before any weight is written (`lightning_obq.export.load_quantized`);
    ``keep_packed=True`` keeps the codes packed in the layers and dequantizes at each forward.
    """
    from .export import load_quantized

    yolo = load_yolo(architecture)
    load_quantized(path, yolo.model, keep_packed=keep_packed)
    yolo.predictor = None
    return yolo


def read_recipe(path: str | os.PathLike) -> dict[str, Any]:
    """The recipe stored by `save_quantized_yolo` (empty dict for a plain Ultralytics checkpoint).

    The checkpoint is a pickle (Ultralytics' format): only read files you trust.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"path: {path} does not exist")
    _require_ultralytics()
    from ultralytics.nn.tasks import torch_safe_load

    ckpt, _ = torch_safe_load(str(path))
    return dict(ckpt.get(RECIPE_KEY) or {})


class YOLOQuantCallback:
    """Ultralytics ``on_train_end`` callback: quantize the trained model, validate it, save it.

    ``model.train()`` ends by reloading ``best.pt`` into the ``YOLO`` object, so quantizing
    ``trainer.model`` (or its EMA) in place would be lost. This callback instead loads the final
    weights (``trainer.best``, else ``trainer.last``: the EMA weights Ultralytics keeps), quantizes them
    with the trainer's dataset (``trainer.args.data``) and image size, runs ``val`` on FP and quantized
    models, and writes ``<weights dir>/best-w<bits>-<method>.pt``. The results are on the callback:
    ``.yolo`` (quantized YOLO), ``.report`` (with the mAPs) and ``.path``.

    Example::

        cb = obq_callback(bits=6)
        model.add_callback("on_train_end", cb)
        model.train(data="data.yaml", epochs=50)
        YOLO(cb.path).predict("image.png")
    """

    def __init__(self, bits: int = 6, method: str = "fastobq", calib_images: int = 128, save: bool = True,
                 evaluate: bool = True, wandb: bool = False, **quantize_kwargs: Any) -> None:
        QuantConfig(bits=bits, method=method, calib_samples=calib_images)  # fail now, not after training
        self.bits, self.method, self.calib_images = bits, method, calib_images
        self.save, self.evaluate, self.wandb = save, evaluate, wandb
        self.quantize_kwargs = quantize_kwargs
        self.yolo: YOLO | None = None
        self.report: QuantReport | None = None
        self.path: Path | None = None

    def __call__(self, trainer: Any) -> None:
        weights = Path(trainer.best) if Path(trainer.best).exists() else Path(trainer.last)
        if not weights.exists():
            raise FileNotFoundError(f"no trained weights to quantize: neither {trainer.best} nor {trainer.last} exists")
        imgsz = trainer.args.imgsz
        imgsz = max(imgsz) if isinstance(imgsz, list | tuple) else int(imgsz)
        kwargs = {"imgsz": imgsz, "batch": int(trainer.args.batch) if int(trainer.args.batch) > 0 else 16,
                  "device": trainer.device, **self.quantize_kwargs}
        log.info("quantizing %s to W%d with %s", weights, self.bits, self.method)
        self.yolo, self.report = quantize_yolo(
            str(weights), data=trainer.args.data, bits=self.bits, method=self.method,
            calib_images=self.calib_images, evaluate=self.evaluate, wandb=self.wandb, **kwargs,
        )
        if self.save:
            self.path = save_quantized_yolo(
                self.yolo, weights.with_name(f"{weights.stem}-w{self.bits}-{self.method}.pt"), self.report
            )


def obq_callback(bits: int = 6, method: str = "fastobq", calib_images: int = 128, **kwargs: Any) -> YOLOQuantCallback:
    """A `YOLOQuantCallback` for ``model.add_callback("on_train_end", ...)``; kwargs go to `quantize_yolo`."""
    return YOLOQuantCallback(bits=bits, method=method, calib_images=calib_images, **kwargs)


def train_detector(
    model_yaml: str | os.PathLike,
    data: str | os.PathLike,
    cache: str | os.PathLike,
    epochs: int = 30,
    imgsz: int = 160,
    batch: int = 16,
    seed: int = 0,
    **train_args: Any,
) -> Path:
    """Train a YOLO detector from a model yaml (no pretrained weights) once and return its ``best.pt``.

    The run goes to ``<cache>/<yaml stem>-<hash of the arguments and yaml text>``; a finished run (its
    ``best.pt``) is reused, so tests, benchmarks and examples train each model only once. CPU, no AMP
    and no plots by default, which keeps Ultralytics from fetching fonts or AMP-check weights.
    """
    ultralytics = _require_ultralytics()
    from ultralytics import YOLO

    model_yaml = str(model_yaml)
    yaml_path = Path(model_yaml).expanduser()
    source = yaml_path.read_text() if yaml_path.is_file() else model_yaml
    args = {"epochs": epochs, "imgsz": imgsz, "batch": batch, "seed": seed, "device": "cpu", "amp": False,
            "plots": False, "workers": 0, "deterministic": True, "verbose": False, **train_args}
    key_src = json.dumps({"yaml": source, "data": str(Path(data).resolve()), "args": args,
                          "ultralytics": ultralytics.__version__}, sort_keys=True, default=str)
    name = f"{yaml_path.stem}-{hashlib.sha1(key_src.encode()).hexdigest()[:10]}"
    cache = Path(cache).expanduser()
    best = cache / name / "weights" / "best.pt"
    if best.is_file():
        return best
    shutil.rmtree(cache / name, ignore_errors=True)
    yolo = YOLO(str(yaml_path) if yaml_path.is_file() else model_yaml)
    yolo.train(data=str(data), project=str(cache), name=name, exist_ok=True, **args)
    if not best.is_file():
        raise RuntimeError(f"training {model_yaml} finished without writing {best}")
    return best
