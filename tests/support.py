"""Helpers shared by test modules in several folders: the tiny Lightning module and data of the callback tests,
readers of CSV and offline W&B logs, state comparisons, and a correlated layer problem for the solver tests.

Fixtures live in ``conftest.py``; this is plain code the tests import (``tests/`` is on ``sys.path`` because
``conftest.py`` is there).
"""

from __future__ import annotations

import csv
import json
import struct
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from lightning_obq.core.grid import Grid, dequantize_codes
from lightning_obq.core.hessian import weight_matrix


def correlated_problem(d_row: int = 24, d_col: int = 48, n: int = 4000, seed: int = 0):
    """A weight and the Hessian of strongly correlated inputs (as in real conv layers)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d_col, d_col, generator=g) / d_col**0.5 + torch.eye(d_col)
    x = mix @ torch.randn(d_col, n, generator=g)
    x = x + 0.8 * x.roll(1, 0)
    h = 2 / n * x @ x.T
    w = torch.randn(d_row, d_col, generator=g) * 0.1
    return w, h





def tiny_dataset(n: int = 256, seed: int = 0) -> TensorDataset:
    """4-class 8x8 images: class c lights up rows 2c..2c+1, plus noise (learnable in a few steps)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    x = torch.randn(n, 1, 8, 8, generator=g) * 0.5
    for c in range(4):
        x[y == c, 0, 2 * c: 2 * c + 2, :] += 1.5
    return TensorDataset(x, y)


class TinyNet(pl.LightningModule):
    """Conv + BN + grouped conv + Linear classifier logging ``val_acc`` (torchmetrics) and ``val_loss``.

    ``fail_on_validation_call=k`` makes the k-th call of ``validation_step`` (1-based, counted on the object
    that runs it) raise, and ``fail_when_quantized`` makes it raise once the head's weights are on a 4-bit
    grid, to test how the callback handles an evaluation that breaks.
    """

    def __init__(self, fail_on_validation_call: int = 0, lr: float = 1e-2, fail_when_quantized: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
        )
        self.head = nn.Linear(32, 4)
        self.val_acc = MulticlassAccuracy(num_classes=4, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=4, average="micro")
        self.validation_calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.validation_calls += 1
        if self.validation_calls == self.hparams.fail_on_validation_call:
            raise RuntimeError("validation exploded")
        if self.hparams.fail_when_quantized and max(r.unique().numel() for r in self.head.weight) <= 16:
            raise RuntimeError("validation exploded on the quantized model")
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.log("val_acc", self.val_acc, on_epoch=True)
        self.log("val_loss", F.cross_entropy(logits, y), on_epoch=True, sync_dist=True)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.test_acc(self(x), y)
        self.log("test_acc", self.test_acc, on_epoch=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


class TinyDataModule(pl.LightningDataModule):
    """Train/val loaders over `tiny_dataset` (used by the LightningCLI test)."""

    def __init__(self, train_samples: int = 256, val_samples: int = 128, batch_size: int = 32) -> None:
        super().__init__()
        self.train_samples, self.val_samples, self.batch_size = train_samples, val_samples, batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(tiny_dataset(self.train_samples), batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(tiny_dataset(self.val_samples, seed=1), batch_size=self.batch_size)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(tiny_dataset(self.val_samples, seed=3), batch_size=self.batch_size)


def train_loader(n: int = 256) -> DataLoader:
    return DataLoader(tiny_dataset(n), batch_size=32, shuffle=True)


def val_loader(n: int = 128) -> DataLoader:
    return DataLoader(tiny_dataset(n, seed=1), batch_size=64)


def make_trainer(tmp_path: Path, callbacks: list[pl.Callback], **kwargs: Any) -> pl.Trainer:
    defaults: dict[str, Any] = dict(
        accelerator="cpu", devices=1, max_epochs=2, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path, num_sanity_val_steps=0,
    )
    defaults.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **defaults)


def state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def assert_on_grid(module: nn.Module, report: Any, bits: int) -> None:
    """Every quantized layer's weight equals scale * (codes - zero) bitwise, with codes in [0, 2^bits)."""
    layers = dict(module.named_modules())
    assert report.results
    for name, r in report.results.items():
        w = weight_matrix(layers[name]).detach()
        codes = r.codes.float()
        assert codes.min() >= 0 and codes.max() <= 2**bits - 1
        grid = Grid(r.scale, r.zero, r.bits, r.group_size)
        assert torch.equal(dequantize_codes(codes, *grid.column_params(w.shape[-1])), w), name
        # independent of the codes: each row (or group of a row) of the weight holds at most 2^bits distinct values
        assert most_values_per_grid(layers[name].weight, r.group_size) <= 2**bits, name


def most_values_per_grid(weight: torch.Tensor, group_size: int | None) -> int:
    """The most distinct values one grid of a conv or linear ``weight`` (the module's own shape) holds: one
    output channel's weights (a row), or each ``group_size`` of them in order (``LayerStats.group_size``; a
    conv's kernel rows when it equals the kernel width)."""
    rows = weight.detach().reshape(weight.shape[0], -1)
    return max(group.unique().numel() for columns in rows.split(group_size or rows.shape[-1], dim=-1)
               for group in columns)


def read_wandb_history(run_dir: Path, require: str = "obq/bits", timeout: float = 60.0) -> list[dict[str, Any]]:
    """History rows of an offline W&B run, read from its ``.wandb`` transaction log.

    ``wandb.finish()`` can return before the wandb-core process has flushed the last records, so the file
    is re-read until a row holds the ``require`` key (or ``timeout`` seconds pass); a record still being
    written at the end of the file is left for the next read.
    """
    deadline = time.monotonic() + timeout
    while True:
        rows = _wandb_history_once(run_dir)
        if any(require in row for row in rows) or time.monotonic() > deadline:
            return rows
        time.sleep(0.5)


def _wandb_history_once(run_dir: Path) -> list[dict[str, Any]]:
    """One read of the history rows of an offline run's ``.wandb`` file (nested keys joined with ``/``)."""
    return [{(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item}
            for record in _wandb_records(run_dir) if record.WhichOneof("record_type") == "history"]


def read_wandb_config(run_dir: Path) -> dict[str, Any]:
    """The run config of an offline W&B run (``wandb.config`` updates, e.g. from ``log_hyperparams``)."""
    config: dict[str, Any] = {}
    for record in _wandb_records(run_dir):
        if record.WhichOneof("record_type") == "config":
            config.update({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.config.update})
    return config


def _wandb_records(run_dir: Path) -> list[Any]:
    """The complete protobuf ``Record``s of an offline run's ``.wandb`` file, read once.

    The file is a ``:W&B`` header (7 bytes) followed by a LevelDB-style log of protobuf ``Record``s
    (32 KiB blocks; 7-byte record headers: crc32, length, type FULL/FIRST/MIDDLE/LAST); the records are
    decoded with wandb's own protobuf classes. A record still being written at the end is left out.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    paths = list(run_dir.glob("*.wandb"))
    if not paths:  # not created yet
        return []
    (path,) = paths
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, pending, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos: pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        if pos + 7 + length > len(data):  # the writer is still appending this record: read again later
            break
        chunk, pos = data[pos + 7: pos + 7 + length], pos + 7 + length
        if kind in (2, 3):  # FIRST, MIDDLE
            pending += chunk
            continue
        records.append(pb.Record.FromString(pending + chunk))
        pending = b""
    return records


def read_csv_metrics(path: Path) -> dict[str, float]:
    """Last non-empty value of every column of a CSVLogger metrics.csv."""
    out: dict[str, float] = {}
    with open(path) as f:
        for row in csv.DictReader(f):
            out.update({k: float(v) for k, v in row.items() if v not in ("", None)})
    return out


def accuracy(module: nn.Module, loader: DataLoader) -> float:
    metric = MulticlassAccuracy(num_classes=4, average="micro")
    module.eval()
    with torch.no_grad():
        for x, y in loader:
            metric.update(module(x), y)
    return float(metric.compute())


def csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def assert_each_name_once_per_step(metrics_csv: Path, prefix: str = "") -> None:
    """No metric column (starting with ``prefix``) holds two values at one step in a CSVLogger file
    (Lightning's own ``epoch`` column aside, which it writes with every row)."""
    seen: dict[tuple[str, str], int] = {}
    for row in csv_rows(metrics_csv):
        for key, value in row.items():
            if key not in ("step", "epoch") and key.startswith(prefix) and value not in ("", None):
                seen[(row["step"], key)] = seen.get((row["step"], key), 0) + 1
    repeated = {k: n for k, n in seen.items() if n > 1}
    assert not repeated, repeated


def grid_rows(module: nn.Module, bits: int = 4) -> bool:
    """True if every row of every quantized-layer weight holds at most 2^bits distinct values."""
    return all(r.unique().numel() <= 2**bits
               for w in (module.features[0].weight, module.features[3].weight, module.head.weight)
               for r in w.detach().reshape(w.shape[0], -1))


