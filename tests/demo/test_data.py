"""The data module reads the real Debian Fashion-MNIST files and fails clearly when they are absent."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_obq.demo.data import (
    FILES,
    SYSTEM_DIRS,
    FashionMNISTDataModule,
    image_folder,
    prepare_fashion_mnist,
    raw_folder,
)

DEBIAN = Path(SYSTEM_DIRS[0])
needs_debian = pytest.mark.skipif(
    not all((DEBIAN / f"{name}.gz").is_file() for name in FILES),
    reason="Debian package dataset-fashion-mnist is not installed",
)


@needs_debian
def test_reads_debian_files_into_torchvision_layout(tmp_path):
    root = prepare_fashion_mnist(tmp_path / "root", download=False)
    raw = raw_folder(root)
    for name in FILES:
        assert (raw / name).is_file()
    # the unpacked images equal the Debian gzip content byte for byte
    with gzip.open(DEBIAN / "t10k-labels-idx1-ubyte.gz", "rb") as f:
        assert (raw / "t10k-labels-idx1-ubyte").read_bytes() == f.read()
    dm = FashionMNISTDataModule(root=str(root), batch_size=64, train_samples=256, val_samples=128, download=False)
    dm.prepare_data()
    dm.setup()
    assert len(dm.train_set) == 256 and len(dm.val_set) == 128
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (64, 1, 28, 28) and x.dtype == torch.float32
    assert y.min() >= 0 and y.max() <= 9
    assert abs(x.mean().item()) < 0.3 and 0.7 < x.std().item() < 1.3  # normalised real images, not noise
    # the full test split is the real 10k
    full = FashionMNISTDataModule(root=str(root), download=False)
    full.setup()
    assert len(full.val_set) == 10000 and len(full.train_set) == 60000


@needs_debian
def test_subsets_are_deterministic(tmp_path):
    root = str(prepare_fashion_mnist(tmp_path / "root", download=False))
    a = FashionMNISTDataModule(root=root, train_samples=100, seed=3, download=False)
    b = FashionMNISTDataModule(root=root, train_samples=100, seed=3, download=False)
    c = FashionMNISTDataModule(root=root, train_samples=100, seed=4, download=False)
    for dm in (a, b, c):
        dm.setup()
    assert a.train_set.indices == b.train_set.indices
    assert a.train_set.indices != c.train_set.indices
    xa = next(iter(a.calibration_dataloader()))[0]
    xb = next(iter(b.calibration_dataloader()))[0]
    assert torch.equal(xa, xb)


@needs_debian
def test_user_folder_with_plain_files(tmp_path):
    user = tmp_path / "mine"
    user.mkdir()
    for name in FILES:
        with gzip.open(DEBIAN / f"{name}.gz", "rb") as fin, open(user / name, "wb") as fout:
            shutil.copyfileobj(fin, fout)
    root = prepare_fashion_mnist(tmp_path / "root", source=user, download=False)
    assert all((raw_folder(root) / name).is_file() for name in FILES)


def test_absent_files_and_no_download_name_the_paths(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    root = tmp_path / "root"
    with pytest.raises(FileNotFoundError) as info:
        prepare_fashion_mnist(root, source=empty, download=False)
    message = str(info.value)
    assert str(empty) in message and str(raw_folder(root)) in message
    assert "download=False" in message
    dm = FashionMNISTDataModule(root=str(root), source=str(empty), download=False)
    with pytest.raises(FileNotFoundError, match=str(empty)):
        dm.setup()


def test_truncated_file_is_rejected(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in FILES:
        (bad / name).write_bytes(b"\x00\x00\x08\x01" + b"\x00" * 4)  # wrong magic/count
    with pytest.raises(ValueError, match="not a valid Fashion-MNIST IDX file"):
        prepare_fashion_mnist(tmp_path / "root", source=bad, download=False)


def test_image_folder(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(3):
            pixels = rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "imgs" / cls / f"{i}.png")
    rgb = image_folder(tmp_path / "imgs", image_size=16)
    x, y = rgb[0]
    assert x.shape == (3, 16, 16) and y == 0 and len(rgb) == 6
    # colour is kept (channels differ), and the grayscale view has one channel
    assert not torch.allclose(x[0], x[1])
    gray = image_folder(tmp_path / "imgs", channels=1, samples=4)
    assert gray[0][0].shape == (1, 20, 24) and len(gray) == 4
    with pytest.raises(FileNotFoundError, match="nope"):
        image_folder(tmp_path / "nope")
    (tmp_path / "no_images" / "cls").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no_images"):
        image_folder(tmp_path / "no_images")
