"""Real data without downloads: Fashion-MNIST from local files, and ImageFolder sets for users.

Fashion-MNIST is looked up, in order, in a folder the user gives, in ``$LIGHTNING_OBQ_FASHION_MNIST``,
and in the Debian package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``). The
gzipped IDX files found there are unpacked once into ``<root>/FashionMNIST/raw/``, the layout that
``torchvision.datasets.FashionMNIST(root, download=False)`` reads. Only when no local copy exists,
and ``download=True``, torchvision's own download is used (machines with internet).
"""

from __future__ import annotations

import gzip
import logging
import os
import shutil
import struct
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import datasets, transforms

log = logging.getLogger(__name__)

SYSTEM_DIRS: tuple[str, ...] = ("/usr/share/datasets/fashion-mnist",)
"""Where Debian's ``dataset-fashion-mnist`` package installs the gzipped IDX files."""

ENV_SOURCE = "LIGHTNING_OBQ_FASHION_MNIST"
ENV_CACHE = "LIGHTNING_OBQ_CACHE"

# file name -> (IDX magic number, number of items); checked so a truncated copy is never used.
FILES: dict[str, tuple[int, int]] = {
    "train-images-idx3-ubyte": (2051, 60000),
    "train-labels-idx1-ubyte": (2049, 60000),
    "t10k-images-idx3-ubyte": (2051, 10000),
    "t10k-labels-idx1-ubyte": (2049, 10000),
}

# Mean/std of the Fashion-MNIST training images (pixels in [0, 1]).
FASHION_MEAN = (0.2860,)
FASHION_STD = (0.3530,)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def cache_dir() -> Path:
    """The project's cache folder: ``$LIGHTNING_OBQ_CACHE`` or ``~/.cache/lightning_obq``."""
    env = os.environ.get(ENV_CACHE)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lightning_obq"


def default_root() -> Path:
    """Where the unpacked Fashion-MNIST lives by default (``<cache>/data``)."""
    return cache_dir() / "data"


def raw_folder(root: str | os.PathLike) -> Path:
    """The folder torchvision's ``FashionMNIST(root)`` reads: ``<root>/FashionMNIST/raw``."""
    return Path(root) / "FashionMNIST" / "raw"


def _idx_header_ok(path: Path, expected: tuple[int, int]) -> bool:
    """True if the (uncompressed) IDX file starts with the expected magic and item count."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError:
        return False
    return len(head) == 8 and struct.unpack(">II", head) == expected


def _locate(folder: Path, name: str) -> Path | None:
    """``name`` or ``name.gz`` in ``folder`` or in its ``FashionMNIST/raw`` sub-folder."""
    for base in (folder, raw_folder(folder)):
        for candidate in (base / name, base / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def _copy_into(files: dict[str, Path], dest: Path) -> None:
    """Unpack (or copy) each file into ``dest``; each one is written to a temp name then renamed."""
    dest.mkdir(parents=True, exist_ok=True)
    for name, src in files.items():
        tmp = dest / f".{name}.tmp{os.getpid()}"
        opener = gzip.open if src.suffix == ".gz" else open
        with opener(src, "rb") as fin, open(tmp, "wb") as fout:
            shutil.copyfileobj(fin, fout, length=1 << 20)
        if not _idx_header_ok(tmp, FILES[name]):
            tmp.unlink(missing_ok=True)
            raise ValueError(f"{src} is not a valid Fashion-MNIST IDX file (expected magic/count {FILES[name]})")
        os.replace(tmp, dest / name)


def prepare_fashion_mnist(
    root: str | os.PathLike | None = None,
    source: str | os.PathLike | None = None,
    download: bool = True,
) -> Path:
    """Make ``<root>/FashionMNIST/raw/`` hold the four uncompressed IDX files and return ``root``.

    Args:
        root: the dataset root handed to torchvision (default: `default_root`).
        source: a folder with the four files (gzipped or not, flat or in ``FashionMNIST/raw``). When
            given it is the only local place searched; otherwise ``$LIGHTNING_OBQ_FASHION_MNIST`` and
            `SYSTEM_DIRS` are.
        download: fall back to torchvision's download when no local copy is found.

    Raises:
        FileNotFoundError: no local copy and ``download=False``; the message names every path tried.
        RuntimeError: no local copy and the download failed (e.g. no internet); names the paths tried.
    """
    root = Path(root).expanduser() if root is not None else default_root()
    raw = raw_folder(root)
    if all(_idx_header_ok(raw / name, expected) for name, expected in FILES.items()):
        return root
    if source is not None:
        candidates = [Path(source).expanduser()]
    else:
        env = os.environ.get(ENV_SOURCE)
        candidates = ([Path(env).expanduser()] if env else []) + [Path(d) for d in SYSTEM_DIRS]
    for folder in candidates:
        found = {name: _locate(folder, name) for name in FILES}
        if all(found.values()):
            log.info("unpacking Fashion-MNIST from %s into %s", folder, raw)
            _copy_into(found, raw)  # type: ignore[arg-type]
            return root
    tried = [str(raw)] + [str(c) for c in candidates]
    hint = (
        "install the Debian package `dataset-fashion-mnist`, pass a folder holding "
        f"{sorted(f + '.gz' for f in FILES)}, or set ${ENV_SOURCE}"
    )
    if not download:
        raise FileNotFoundError(f"Fashion-MNIST not found (tried: {', '.join(tried)}) and download=False; {hint}")
    log.info("no local Fashion-MNIST found in %s; downloading with torchvision", tried)
    try:
        for train in (True, False):
            datasets.FashionMNIST(str(root), train=train, download=True)
    except Exception as exc:  # network errors come in many types (URLError, OSError, RuntimeError...)
        raise RuntimeError(
            f"Fashion-MNIST not found (tried: {', '.join(tried)}) and the download failed ({exc}); {hint}"
        ) from exc
    return root


def fashion_transform(augment: bool = False, channels: int = 1) -> transforms.Compose:
    """Tensor + normalisation with the training-set statistics; ``augment`` adds flips and small shifts.

    ``channels=3`` repeats the gray channel, for networks built for RGB input (torchvision models).
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    steps: list = []
    if augment:
        steps += [transforms.RandomHorizontalFlip(), transforms.RandomCrop(28, padding=2)]
    if channels == 3:
        steps.append(transforms.Grayscale(3))
    steps += [transforms.ToTensor(), transforms.Normalize(FASHION_MEAN * channels, FASHION_STD * channels)]
    return transforms.Compose(steps)


def fashion_mnist(
    train: bool,
    root: str | os.PathLike | None = None,
    source: str | os.PathLike | None = None,
    download: bool = True,
    augment: bool = False,
    channels: int = 1,
) -> datasets.FashionMNIST:
    """The real Fashion-MNIST train (60k) or test (10k) split, normalised, from local files when possible."""
    transform = fashion_transform(augment, channels)
    root = prepare_fashion_mnist(root, source, download)
    return datasets.FashionMNIST(str(root), train=train, download=False, transform=transform)


def subset(dataset: Dataset, samples: int | None, seed: int = 0) -> Dataset:
    """A deterministic random subset of ``samples`` items (the whole dataset when None or larger)."""
    n = len(dataset)  # type: ignore[arg-type]
    if samples is None or samples >= n:
        return dataset
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    gen = torch.Generator().manual_seed(seed)
    return Subset(dataset, torch.randperm(n, generator=gen)[:samples].tolist())


class FashionMNISTDataModule(L.LightningDataModule):
    """Fashion-MNIST for Lightning: the 60k train split for training and calibration, the 10k test split
    for validation and test.

    Args:
        root: dataset root (default: `default_root`, under ``$LIGHTNING_OBQ_CACHE``).
        batch_size: loader batch size.
        num_workers: DataLoader workers.
        train_samples / val_samples: optional deterministic random subsets (seeded by ``seed``) for
            short runs and tests.
        seed: seed of the subsets and of the training shuffle.
        source: a folder holding the IDX files (see `prepare_fashion_mnist`).
        download: allow torchvision's download when no local copy exists.
        augment: random flips/shifts on the training split.
    """

    def __init__(
        self,
        root: str | None = None,
        batch_size: int = 128,
        num_workers: int = 0,
        train_samples: int | None = None,
        val_samples: int | None = None,
        seed: int = 0,
        source: str | None = None,
        download: bool = True,
        augment: bool = False,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.save_hyperparameters()
        self.root = root
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.train_samples = train_samples
        self.val_samples = val_samples
        self.seed = seed
        self.source = source
        self.download = download
        self.augment = augment
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    def prepare_data(self) -> None:
        """Unpack (or download) the files once, on one process."""
        prepare_fashion_mnist(self.root, self.source, self.download)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            full = fashion_mnist(True, self.root, self.source, self.download, augment=self.augment)
            self.train_set = subset(full, self.train_samples, self.seed)
        if self.val_set is None:
            full = fashion_mnist(False, self.root, self.source, self.download)
            self.val_set = subset(full, self.val_samples, self.seed + 1)

    def _loader(self, dataset: Dataset | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            self.setup()
            return self._loader(self.train_set if shuffle else self.val_set, shuffle)
        gen = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(
            dataset, batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers, generator=gen,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def calibration_dataloader(self) -> DataLoader:
        """Training images in a fixed order (no augmentation): what post-training quantization calibrates on."""
        if self.train_set is None:
            self.setup()
        plain = fashion_mnist(True, self.root, self.source, self.download)
        return self._loader(subset(plain, self.train_samples, self.seed), shuffle=False)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)


class _ConvertMode:
    """PIL mode conversion as a picklable transform (``"RGB"`` keeps colour, ``"L"`` is grayscale)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def __call__(self, image):
        return image.convert(self.mode)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.mode!r})"


def image_folder(
    path: str | os.PathLike,
    image_size: int | None = None,
    channels: int = 3,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    samples: int | None = None,
    seed: int = 0,
) -> Dataset:
    """A user's ``ImageFolder`` (``path/<class>/<image>``) for calibration or evaluation.

    Images are converted to ``channels`` (1 or 3), resized (short side) and centre-cropped to
    ``image_size`` when given, and normalised (ImageNet statistics for 3 channels, Fashion-MNIST's for 1,
    unless ``mean``/``std`` are given). ``samples`` takes a deterministic random subset.
    """
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    steps: list = [_ConvertMode("RGB" if channels == 3 else "L")]
    if image_size is not None:
        steps += [transforms.Resize(image_size), transforms.CenterCrop(image_size)]
    if mean is None:
        mean = IMAGENET_MEAN if channels == 3 else FASHION_MEAN
    if std is None:
        std = IMAGENET_STD if channels == 3 else FASHION_STD
    steps += [transforms.ToTensor(), transforms.Normalize(tuple(mean), tuple(std))]
    try:
        dataset = datasets.ImageFolder(str(folder), transform=transforms.Compose(steps))
    except (FileNotFoundError, RuntimeError) as exc:
        raise FileNotFoundError(f"image folder {folder}: {exc}") from exc
    return subset(dataset, samples, seed)
