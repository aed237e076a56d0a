"""The ready LightningCLI config files in callbacks/ run with a real LightningCLI."""

from __future__ import annotations

from pathlib import Path

import pytest
from lightning.pytorch.cli import LightningCLI
from test_callback import TinyDataModule, TinyNet, assert_on_grid

from lightning_obq import OBQCallback

CONFIGS = Path(__file__).resolve().parents[1] / "callbacks"


def _common(tmp_path: Path) -> list[str]:
    return [
        "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.logger=false",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        "--trainer.enable_checkpointing=false", f"--trainer.default_root_dir={tmp_path}",
        "--trainer.num_sanity_val_steps=0",
    ]


def _callback(cli: LightningCLI) -> OBQCallback:
    (cb,) = [c for c in cli.trainer.callbacks if isinstance(c, OBQCallback)]
    return cb


@pytest.mark.parametrize(("name", "bits", "when"), [("obq_w4.yaml", 4, "fit_end"), ("obq_w8.yaml", 8, "fit_end"),
                                                     ("obq_validate.yaml", 4, "validation_start")])
def test_config_files_build_the_callback(tmp_path: Path, name: str, bits: int, when: str) -> None:
    cli = LightningCLI(TinyNet, TinyDataModule, run=False, args=["--config", str(CONFIGS / name), *_common(tmp_path)])
    cb = _callback(cli)
    assert (cb.config.bits, cb.config.method, cb.when) == (bits, "fastobq", when)


def test_fit_with_obq_w4_config(tmp_path: Path) -> None:
    cli = LightningCLI(
        TinyNet, TinyDataModule, seed_everything_default=0, save_config_kwargs={"overwrite": True},
        args=["fit", "--config", str(CONFIGS / "obq_w4.yaml"), *_common(tmp_path), "--trainer.max_epochs=2",
              "--trainer.callbacks.init_args.calib_samples=128"],
    )
    cb = _callback(cli)
    assert cb.quantized and cb.report is not None and cb.report.samples == 128
    assert {"val_acc", "obq/val_acc", "obq/val_acc_delta", "obq/top1_agreement", "obq/kl_div"} <= set(cb.report.metrics)
    assert_on_grid(cli.model, cb.report, bits=4)


def test_validate_with_obq_validate_config(tmp_path: Path) -> None:
    cli = LightningCLI(
        TinyNet, TinyDataModule, seed_everything_default=0, save_config_kwargs={"overwrite": True},
        args=["validate", "--config", str(CONFIGS / "obq_validate.yaml"), *_common(tmp_path),
              "--trainer.callbacks.init_args.calib_samples=64"],
    )
    cb = _callback(cli)
    assert cb.quantized and cb.report.samples == 64
    assert cb.report.metrics["obq/val_acc"] == pytest.approx(float(cli.trainer.callback_metrics["val_acc"]))
    assert_on_grid(cli.model, cb.report, bits=4)
