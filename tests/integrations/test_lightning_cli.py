"""The ready LightningCLI config files in callbacks/ run with a real LightningCLI."""

from __future__ import annotations

from pathlib import Path

import pytest
from lightning.pytorch.cli import LightningCLI
from support import TinyDataModule, TinyNet, accuracy, assert_on_grid

from lightning_obq import OBQCallback

CONFIGS = Path(__file__).resolve().parents[2] / "callbacks"


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


def test_fit_then_test_best_with_obq_w4_config(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """``fit`` with callbacks/obq_w4.yaml and a ModelCheckpoint on val_acc, then ``test`` on the best checkpoint:
    on the fit's own trainer (``ckpt_path="best"``, what ``test --ckpt_path best`` resolves to) and in a fresh
    LightningCLI ``test --ckpt_path <best file>`` (a new process has no best path to resolve)."""
    common = [a for a in _common(tmp_path) if "enable_checkpointing" not in a]
    checkpoint = ["--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
                  "--trainer.callbacks.monitor=val_acc", "--trainer.callbacks.mode=max",
                  f"--trainer.callbacks.dirpath={tmp_path / 'ckpt'}", "--trainer.callbacks.save_last=true"]
    cli = LightningCLI(
        TinyNet, TinyDataModule, seed_everything_default=0, save_config_kwargs={"overwrite": True},
        args=["fit", "--config", str(CONFIGS / "obq_w4.yaml"), *common, "--trainer.max_epochs=3",
              "--trainer.callbacks.init_args.calib_samples=128", *checkpoint],
    )
    cb = _callback(cli)
    assert cb.config.bn_mode == "auto" and cb.quantized
    best = cli.trainer.checkpoint_callback.best_model_path
    with caplog.at_level("INFO", logger="lightning.pytorch"):
        (result,) = cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path="best", verbose=False)
    assert f"checkpoint {best} holds" in caplog.text  # the FP weights it quantized, or an earlier epoch's
    assert_on_grid(cli.model, cb.report, bits=4)
    test_loader = cli.datamodule.test_dataloader()
    assert result["test_acc"] == pytest.approx(accuracy(cli.model, test_loader), abs=1e-6)
    assert float(cli.trainer.callback_metrics["obq/test_acc"]) == pytest.approx(result["test_acc"], abs=1e-6)
    assert (tmp_path / "ckpt" / "obq-w4-final.ckpt").is_file()

    caplog.clear()
    with caplog.at_level("INFO", logger="lightning.pytorch"):
        fresh = LightningCLI(
            TinyNet, TinyDataModule, seed_everything_default=0, save_config_kwargs={"overwrite": True},
            args=["test", "--config", str(CONFIGS / "obq_w4.yaml"), *_common(tmp_path),
                  "--trainer.callbacks.init_args.calib_samples=128", f"--ckpt_path={best}"],
        )
    assert f"checkpoint {best} holds full-precision weights; quantizing them (W4 fastobq) before testing" in caplog.text
    fresh_cb = _callback(fresh)
    assert_on_grid(fresh.model, fresh_cb.report, bits=4)
    tested = float(fresh.trainer.callback_metrics["test_acc"])
    assert tested == pytest.approx(accuracy(fresh.model, test_loader), abs=1e-6)
    assert float(fresh.trainer.callback_metrics["obq/test_acc"]) == pytest.approx(tested, abs=1e-6)
    assert fresh_cb.report.metrics["obq/test_acc_delta"] == pytest.approx(
        tested - fresh_cb.report.metrics["test_acc"], abs=1e-6)
