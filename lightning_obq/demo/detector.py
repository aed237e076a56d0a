"""Training the demo's YOLO detectors from a model yaml, cached by their settings (tests, benchmarks, examples)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from lightning_obq.extras import require_extra


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
    require_extra("ultralytics", "lightning_obq.demo.detector.train_detector")
    import ultralytics
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
