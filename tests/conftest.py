"""Fixtures shared by every test folder (``tests/core``, ``model``, ``export``, ``integrations``, ``cli``,
``demo``). Plain helpers the tests import are in ``support.py``; this folder is on ``sys.path`` because
pytest inserts the directory of the root ``conftest.py``."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private cache (data unpacked there, models trained there) and no W&B network access."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("LIGHTNING_OBQ_CACHE", str(folder))
    monkeypatch.setenv("WANDB_MODE", "offline")
    return folder
