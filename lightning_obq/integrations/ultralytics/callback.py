"""`YOLOQuantCallback`: quantize, validate and save a detector when Ultralytics' ``model.train()`` ends."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning_obq.core.config import QuantConfig
from lightning_obq.integrations.ultralytics.checkpoint import save_quantized_yolo
from lightning_obq.integrations.ultralytics.yolo import quantize_yolo
from lightning_obq.model.report import QuantReport

if TYPE_CHECKING:
    from ultralytics import YOLO

log = logging.getLogger(__name__)


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
