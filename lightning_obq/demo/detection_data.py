"""A real object-detection set built from real images: Fashion-MNIST items pasted onto canvases.

No COCO can be downloaded here, so detectors are trained and quantized on this set instead. Each canvas
(a noisy, lightly tinted background) holds a few Fashion-MNIST items at random positions and scales, each
in a random colour; the box is the tight box of the item's visible pixels and the class is its
Fashion-MNIST label (10 classes). The set is written in the YOLO layout Ultralytics reads::

    <root>/images/{train,val}/*.png   <root>/labels/{train,val}/*.txt   <root>/data.yaml

Train canvases use items of the Fashion-MNIST train split, val canvases items of the test split, so no
item is shared. The same arguments and seed always give the same files; a finished set is reused (a
``meta.json`` records the arguments, and the folder is written under a temporary name and renamed, so a
half-written set is never picked up).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from lightning_obq.demo.data import cache_dir, fashion_mnist

log = logging.getLogger(__name__)

CLASS_NAMES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
"""Fashion-MNIST's class names, in label order."""

_INK = 40  # an item's pixel counts as visible (inside its box) above this grey level (0..255)


@dataclass(frozen=True)
class DetectionSetSpec:
    """What a generated detection set looks like; every field goes into the cache key.

    Args:
        train_images / val_images: canvases per split.
        canvas: (min, max) side length in pixels; width and height are drawn independently.
        objects: (min, max) items per canvas.
        item_size: (min, max) side of a pasted item in pixels (before cropping to its visible box).
        max_iou: items are placed so that no two boxes overlap more than this.
        seed: the random seed.
    """

    train_images: int = 400
    val_images: int = 100
    canvas: tuple[int, int] = (160, 256)
    objects: tuple[int, int] = (1, 4)
    item_size: tuple[int, int] = (40, 112)
    max_iou: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("train_images", "val_images"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name, low in (("canvas", 32), ("objects", 1), ("item_size", 8)):
            pair = getattr(self, name)
            if len(pair) != 2 or not all(isinstance(v, int) for v in pair) or not low <= pair[0] <= pair[1]:
                raise ValueError(f"{name} must be (min, max) ints with {low} <= min <= max, got {pair!r}")
        if self.item_size[1] > self.canvas[0]:
            raise ValueError(f"item_size max {self.item_size[1]} exceeds the smallest canvas side {self.canvas[0]}")
        if not 0.0 <= self.max_iou <= 1.0:
            raise ValueError(f"max_iou must be in [0, 1], got {self.max_iou!r}")

    def key(self) -> str:
        """A short hash of the fields, naming the cache folder."""
        return hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two boxes (x1, y1, x2, y2)."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def render_canvas(
    rng: np.random.Generator, items: np.ndarray, labels: np.ndarray, spec: DetectionSetSpec
) -> tuple[np.ndarray, list[tuple[int, float, float, float, float]]]:
    """One canvas (H, W, 3 uint8, RGB) and its YOLO labels ``(class, x_center, y_center, w, h)`` (normalised)."""
    import cv2  # opencv comes with ultralytics; only needed when a set is generated

    height, width = (int(v) for v in rng.integers(spec.canvas[0], spec.canvas[1] + 1, size=2))
    base = rng.uniform(0, 60, size=3)
    canvas = np.clip(base + rng.normal(0, 8, size=(height, width, 3)), 0, 255)
    boxes: list[np.ndarray] = []
    out: list[tuple[int, float, float, float, float]] = []
    for _ in range(int(rng.integers(spec.objects[0], spec.objects[1] + 1))):
        k = int(rng.integers(len(items)))
        side = int(rng.integers(spec.item_size[0], spec.item_size[1] + 1))
        item = cv2.resize(items[k], (side, side), interpolation=cv2.INTER_LINEAR).astype(np.float64)
        rows, cols = np.nonzero(item > _INK)
        if rows.size == 0:
            continue
        item = item[rows.min(): rows.max() + 1, cols.min(): cols.max() + 1]
        h, w = item.shape
        if h > height or w > width:
            continue
        for _attempt in range(20):
            y, x = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
            box = np.array([x, y, x + w, y + h], dtype=np.float64)
            if all(_iou(box, other) <= spec.max_iou for other in boxes):
                break
        else:
            continue
        tint = rng.uniform(0.55, 1.0, size=3)
        region = canvas[y: y + h, x: x + w]
        np.maximum(region, item[..., None] * tint, out=region)
        boxes.append(box)
        out.append((int(labels[k]), (x + w / 2) / width, (y + h / 2) / height, w / width, h / height))
    return canvas.round().astype(np.uint8), out


def _write_split(folder: Path, split: str, count: int, items: np.ndarray, labels: np.ndarray,
                 spec: DetectionSetSpec, seed: int) -> int:
    """Render and write ``count`` canvases; returns the number of boxes."""
    import cv2

    rng = np.random.default_rng(seed)
    images, label_dir = folder / "images" / split, folder / "labels" / split
    images.mkdir(parents=True)
    label_dir.mkdir(parents=True)
    boxes = 0
    for i in range(count):
        canvas, objects = render_canvas(rng, items, labels, spec)
        cv2.imwrite(str(images / f"{split}_{i:05d}.png"), canvas[..., ::-1])
        lines = [f"{c} {x:.6f} {y:.6f} {w:.6f} {h:.6f}" for c, x, y, w, h in objects]
        (label_dir / f"{split}_{i:05d}.txt").write_text("\n".join(lines) + ("\n" if lines else ""))
        boxes += len(objects)
    return boxes


def _data_yaml(root: Path) -> str:
    names = "\n".join(f"  {i}: {json.dumps(n)}" for i, n in enumerate(CLASS_NAMES))
    head = f"path: {json.dumps(str(root))}\ntrain: images/train\nval: images/val\nnc: {len(CLASS_NAMES)}\n"
    return f"{head}names:\n{names}\n"


def build_detection_dataset(
    root: str | os.PathLike | None = None,
    spec: DetectionSetSpec | None = None,
    source: str | os.PathLike | None = None,
    **spec_fields: object,
) -> Path:
    """Generate (or reuse) the Fashion-MNIST detection set and return the path of its ``data.yaml``.

    Args:
        root: parent folder; the set goes to ``<root>/fashion-det-<key>`` (default root:
            ``<cache>/detection``, see `lightning_obq.demo.data.cache_dir`).
        spec: the set's shape; or give its fields as keyword arguments (``train_images=200``).
        source: where the Fashion-MNIST files are (see `lightning_obq.demo.data.prepare_fashion_mnist`).
    """
    if spec is None:
        spec = DetectionSetSpec(**spec_fields)  # type: ignore[arg-type]
    elif spec_fields:
        raise TypeError("pass either spec or its fields, not both")
    parent = (Path(root).expanduser() if root is not None else cache_dir() / "detection").resolve()
    folder = parent / f"fashion-det-{spec.key()}"
    meta = folder / "meta.json"
    if meta.is_file() and json.loads(meta.read_text()).get("spec") == json.loads(json.dumps(asdict(spec))):
        yaml = folder / "data.yaml"
        if not yaml.is_file() or yaml.read_text() != _data_yaml(folder):  # the folder was moved or renamed
            yaml.write_text(_data_yaml(folder))
        return yaml

    log.info("building the Fashion-MNIST detection set in %s", folder)
    tmp = parent / f".{folder.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        counts = {}
        for split, train, count, offset in (("train", True, spec.train_images, 0),
                                            ("val", False, spec.val_images, 1)):
            ds = fashion_mnist(train=train, source=source, download=False)
            items, labels = ds.data.numpy(), ds.targets.numpy()
            counts[split] = _write_split(tmp, split, count, items, labels, spec, seed=spec.seed * 2 + offset)
        (tmp / "data.yaml").write_text(_data_yaml(folder))
        (tmp / "meta.json").write_text(json.dumps({"spec": asdict(spec), "boxes": counts}, indent=1))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("detection set ready: %s (%s boxes)", folder, counts)
    return folder / "data.yaml"
