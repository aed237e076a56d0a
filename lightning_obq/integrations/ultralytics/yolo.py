"""Ultralytics YOLO support: quantize detectors with FastOBQ, validate mAP, save a checkpoint YOLO() loads.

One call and one callback::

    from lightning_obq.integrations.ultralytics import quantize_yolo, obq_callback, save_quantized_yolo

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
  the detection head's outputs against the FP model, and the closest wins if it beats the trained statistics
  by more than the noise of those images (`lightning_obq.model.batchnorm`).
  ``bn_mode="keep"`` or ``"reestimate"`` force one.
- ``YOLO.val`` and ``YOLO.predict`` fuse the model they run (Ultralytics releases before 8.4 did so in
  place), so every evaluation here runs on a deep copy: the FP model is measured before quantization
  and the quantized one after, and the returned model is still unfused.

Needs the ``[ultralytics]`` extra: importing `lightning_obq.integrations.ultralytics` without it raises an
`ImportError` naming the extra. `checkpoint` saves and loads quantized detectors, `callback` quantizes after
``model.train()``.
"""

from __future__ import annotations

import copy
import logging
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from lightning_obq.core.config import QuantConfig
from lightning_obq.model.quantize import quantize_model
from lightning_obq.model.report import QuantReport

if TYPE_CHECKING:
    from ultralytics import YOLO

log = logging.getLogger(__name__)

DFL_PATTERN = "*.dfl.conv"
"""Name pattern of the Distribution Focal Loss projection conv (fixed weights 0..15), excluded by default."""

RECIPE_KEY = "lightning_obq"
"""Key of the quantization recipe inside a saved Ultralytics checkpoint."""

METRIC_KEYS = {"mAP50-95": "map", "mAP50": "map50"}
"""Report metric name -> attribute of Ultralytics' ``DetMetrics.box``."""


def load_yolo(model_or_path: Any) -> YOLO:
    """A detection ``YOLO`` from a ``YOLO`` object, a ``.pt`` checkpoint or a model ``.yaml``.

    Raises:
        FileNotFoundError: a local path that does not exist (bare names such as ``yolov8n.pt`` are
            left to Ultralytics, which downloads official weights when online).
        TypeError: anything else (e.g. a torchvision classifier, a bare ``nn.Module``).
        ValueError: a YOLO model whose task is not ``detect`` (classify, segment-only, ...).
    """
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
    """Log a report to W&B the way `OBQCallback` does (`lightning_obq.integrations.lightning.loggers.log_report`);
    returns the run folder.

    The ``obq/...`` scalars, the per-layer table and error plot, plus the mAPs (``fp/mAP50``,
    ``quant/mAP50``, ...) and the config. Runs are offline unless ``WANDB_MODE`` is set, so nothing
    needs an account or network (`lightning_obq.integrations.wandb.start_run`).
    """
    from lightning.pytorch.loggers import WandbLogger

    from lightning_obq.integrations.lightning.loggers import log_report
    from lightning_obq.integrations.wandb import start_run

    config = report.config
    run = start_run(project, name or f"yolo-{config.get('method')}-w{config.get('bits')}", directory or ".")
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
