"""Quantized YOLO detectors on disk: an Ultralytics checkpoint ``YOLO(path)`` loads, or the packed artifact."""

from __future__ import annotations

import copy
import json
import logging
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lightning_obq.integrations.ultralytics.yolo import RECIPE_KEY, load_yolo
from lightning_obq.model.report import QuantReport
from lightning_obq.version import __version__

if TYPE_CHECKING:
    from ultralytics import YOLO

log = logging.getLogger(__name__)


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
    from lightning_obq.export.artifact import save_quantized

    yolo = load_yolo(yolo)
    return save_quantized(yolo.model, path, report)


def load_packed_yolo(path: str | os.PathLike, architecture: Any, keep_packed: bool = False) -> YOLO:
    """A ``YOLO`` built from ``architecture`` (a YOLO, ``.pt`` or ``.yaml``) with the weights of a packed artifact.

    Everything is checked before any weight is written (`lightning_obq.export.load_quantized`);
    ``keep_packed=True`` keeps the codes packed in the layers and dequantizes at each forward.
    """
    from lightning_obq.export.artifact import load_quantized

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
    from ultralytics.nn.tasks import torch_safe_load

    ckpt, _ = torch_safe_load(str(path))
    return dict(ckpt.get(RECIPE_KEY) or {})
