"""Train the demo CNN on Fashion-MNIST once and reuse it: a cache keyed by a hash of the training settings.

The cached model is our own artifact, so it is stored as safetensors (weights) plus JSON (settings
and measured test accuracy), never pickle.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from safetensors.torch import load_file, save_file

from lightning_obq.core.measure import measure
from lightning_obq.demo.data import FashionMNISTDataModule, cache_dir
from lightning_obq.demo.models import ARCHITECTURES, ImageClassifier

log = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when the model or the training recipe changes in a way the settings do not show


@dataclass(frozen=True)
class TrainSettings:
    """Everything that decides the trained weights; its hash names the cached checkpoint."""

    epochs: int = 3
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 5e-4
    width: int = 32
    train_samples: int | None = None
    augment: bool = False
    seed: int = 0
    arch: str = "smallresnet"

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"TrainSettings.arch={self.arch!r} is not one of {sorted(ARCHITECTURES)}")
        for name in ("epochs", "batch_size", "width"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainSettings.{name} must be >= 1, got {getattr(self, name)}")
        if self.train_samples is not None and self.train_samples < 1:
            raise ValueError(f"TrainSettings.train_samples must be >= 1 or None, got {self.train_samples}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def key(self) -> str:
        """Short hash of the settings (and the cache format); the architecture is named in the file name."""
        fields = {k: v for k, v in self.to_dict().items() if k != "arch"}
        text = json.dumps({"format": CACHE_FORMAT, **fields}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def _new_module(settings: TrainSettings) -> ImageClassifier:
    return ImageClassifier(lr=settings.lr, weight_decay=settings.weight_decay, width=settings.width, arch=settings.arch)


def model_cache_paths(settings: TrainSettings, folder: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """(weights, metadata) paths of the cached model for these settings."""
    folder = Path(folder) if folder is not None else cache_dir() / "models"
    stem = folder / f"{settings.arch}-w{settings.width}-{settings.key()}"
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json")


def _load_cached(settings: TrainSettings, weights: Path, meta: Path) -> tuple[ImageClassifier, dict] | None:
    if not (weights.is_file() and meta.is_file()):
        return None
    try:
        info = json.loads(meta.read_text())
        module = _new_module(settings)
        module.model.load_state_dict(load_file(str(weights)))
    except (OSError, ValueError, RuntimeError) as exc:
        log.warning("ignoring unreadable cached model %s (%s); training again", weights, exc)
        return None
    info["cached"] = True
    return module.eval(), info


class _EpochReport(Callback):
    """Calls ``fn(epoch, epochs, metrics)`` after every training epoch (progress where there is no bar)."""

    def __init__(self, fn: Callable[[int, int, dict[str, float]], None]) -> None:
        self.fn = fn

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        self.fn(trainer.current_epoch + 1, trainer.max_epochs or 0, metrics)


def train_default_model(
    settings: TrainSettings | None = None,
    datamodule: FashionMNISTDataModule | None = None,
    cache: bool = True,
    cache_folder: str | os.PathLike | None = None,
    progress: bool | None = None,
    on_epoch: Callable[[int, int, dict[str, float]], None] | None = None,
) -> tuple[ImageClassifier, dict[str, Any]]:
    """The `SmallResNet` trained on real Fashion-MNIST: from the cache when these settings ran before.

    Training is a short CPU run with Lightning (one-cycle AdamW); the test-split accuracy is measured
    once after training and stored with the weights. Returns the module (eval mode) and an info dict
    (``settings``, ``test_acc``, ``train_seconds``, ``cached``, ``path``).

    Args:
        settings: training settings (default `TrainSettings()`).
        datamodule: the data (default: `FashionMNISTDataModule` with the settings' batch size/subset).
        cache: read and write the cache.
        cache_folder: cache location (default ``<cache_dir>/models``).
        progress: show Lightning's progress bar (default: when stderr is a terminal).
        on_epoch: called as ``on_epoch(epoch, epochs, metrics)`` after each training epoch.
    """
    settings = settings or TrainSettings()
    weights, meta = model_cache_paths(settings, cache_folder)
    if cache:
        hit = _load_cached(settings, weights, meta)
        if hit is not None:
            log.info("reusing cached model %s", weights)
            return hit
    if datamodule is None:
        datamodule = FashionMNISTDataModule(
            batch_size=settings.batch_size, train_samples=settings.train_samples,
            seed=settings.seed, augment=settings.augment,
        )
    show = sys.stderr.isatty() if progress is None else progress
    L.seed_everything(settings.seed, workers=True, verbose=False)
    module = _new_module(settings)
    trainer = L.Trainer(
        max_epochs=settings.epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=show, enable_model_summary=False, deterministic=True,
        num_sanity_val_steps=0, check_val_every_n_epoch=settings.epochs,  # one validation, after the last epoch
        callbacks=[_EpochReport(on_epoch)] if on_epoch is not None else [],
    )
    with measure("cpu") as m:
        trainer.fit(module, datamodule=datamodule)
    info = {
        "settings": settings.to_dict(), "key": settings.key(), "test_acc": float(trainer.callback_metrics["val_acc"]),
        "train_seconds": m.seconds, "path": str(weights), "cached": False,
    }
    module.eval()
    if cache:
        weights.parent.mkdir(parents=True, exist_ok=True)
        tmp = weights.with_name(f".{weights.name}.tmp{os.getpid()}")
        state = {k: v.detach().contiguous() for k, v in module.model.state_dict().items()}
        save_file(state, str(tmp))
        os.replace(tmp, weights)
        meta.write_text(json.dumps(info, indent=2))
        log.info("trained model cached in %s (test acc %.4f)", weights, info["test_acc"])
    return module, info
