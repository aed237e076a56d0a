"""Training the demo's YOLO detectors from a model yaml, cached by their settings (tests, benchmarks, examples)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from lightning_obq.extras import require_extra

FINISHED = "finished.json"
"""Written into a run's directory by `train_detector` once its training returned: the settings it was trained with."""


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

    The run goes to ``<cache>/<yaml stem>-<hash of the arguments and yaml text>``; a finished run is reused, so
    tests, benchmarks and examples train each model only once. A run counts as finished only once training
    returned (`finished_run`): Ultralytics writes ``best.pt`` after every improving epoch, so a run that was cut
    short has one too, and reusing it gave a benchmark a yolov8n trained 24 of its 30 epochs (FP mAP50-95
    0.388 instead of 0.410); such a run is trained again from scratch. CPU, no AMP and no plots by default,
    which keeps Ultralytics from fetching fonts or AMP-check weights.
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
    run = cache / name
    best = run / "weights" / "best.pt"
    if finished_run(run):
        return best
    shutil.rmtree(run, ignore_errors=True)
    yolo = YOLO(str(yaml_path) if yaml_path.is_file() else model_yaml)
    yolo.train(data=str(data), project=str(cache), name=name, exist_ok=True, **args)
    if not best.is_file():
        raise RuntimeError(f"training {model_yaml} finished without writing {best}")
    (run / FINISHED).write_text(key_src)
    return best


def finished_run(run: str | os.PathLike) -> bool:
    """Whether the `train_detector` run in directory ``run`` trained to the end (its `FINISHED` marker and its
    ``weights/best.pt`` are there)."""
    run = Path(run)
    return (run / FINISHED).is_file() and (run / "weights" / "best.pt").is_file()
