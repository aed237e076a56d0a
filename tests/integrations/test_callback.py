"""OBQCallback in real Lightning runs: logging to offline W&B and CSV, weights on the grid, checkpoints, errors.

The tiny module, data and log readers live in tests/support.py (shared with the DDP, LightningCLI and CLI tests).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from support import (
    TinyNet,
    accuracy,
    assert_each_name_once_per_step,
    assert_on_grid,
    assert_same_state,
    grid_rows,
    make_trainer,
    read_csv_metrics,
    read_wandb_config,
    read_wandb_history,
    state,
    tiny_dataset,
    train_loader,
    val_loader,
)
from torch.utils.data import DataLoader

from lightning_obq import OBQCallback, QuantConfig
from lightning_obq.integrations.lightning.loggers import BN_CODES


class KeepFP(pl.Callback):
    """Copies the module's state at on_fit_end; placed before OBQCallback it sees the FP weights."""

    def __init__(self) -> None:
        self.state: dict[str, torch.Tensor] | None = None

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.state = state(pl_module)


# ---------------------------------------------------------------------------------------------- tests


def test_fit_logs_fp_and_quantized_metrics_to_wandb_and_csv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "unset-by-test")  # recorded, so the original value comes back afterwards
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    import wandb

    pl.seed_everything(0)
    model = TinyNet()
    keep, cb = KeepFP(), OBQCallback(bits=4, calib_samples=128)
    wandb_logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="obq-test")
    csv_logger = CSVLogger(tmp_path, name="csv")
    trainer = make_trainer(tmp_path, [keep, cb], logger=[wandb_logger, csv_logger])
    last_val: dict[str, float] = {}

    class LastVal(pl.Callback):
        def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            last_val.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val")})

    trainer.callbacks.append(LastVal())
    trainer.fit(model, train_loader(), val_loader())
    run_dir = Path(wandb_logger.experiment.dir).parent
    wandb.finish()

    report = cb.report
    assert report is not None and cb.quantized
    assert [s.name for s in report.layers] == ["features.0", "features.3", "head"]
    assert report.samples == 128
    # FP metrics = the module's own validation at the end of training (same weights); quantized = recomputed
    assert report.metrics["val_acc"] == pytest.approx(last_val["val_acc"], abs=1e-6)
    assert report.metrics["val_loss"] == pytest.approx(last_val["val_loss"], rel=1e-5)
    assert report.metrics["obq/val_acc"] == pytest.approx(accuracy(model, val_loader()), abs=1e-6)
    assert report.metrics["obq/val_acc_delta"] == pytest.approx(
        report.metrics["obq/val_acc"] - report.metrics["val_acc"], abs=1e-9)
    assert 0.0 <= report.metrics["obq/top1_agreement"] <= 1.0 and report.metrics["obq/kl_div"] >= 0.0
    fp_model = TinyNet()
    fp_model.load_state_dict(keep.state)
    q_pred = torch.cat([model(x).argmax(1) for x, _ in val_loader()])
    fp_pred = torch.cat([fp_model.eval()(x).argmax(1) for x, _ in val_loader()])
    assert report.metrics["obq/top1_agreement"] == pytest.approx((q_pred == fp_pred).float().mean().item(), abs=1e-6)
    assert_on_grid(model, report, bits=4)
    assert not torch.equal(model.head.weight, keep.state["head.weight"])

    expected = {
        "obq/fp/val_acc": report.metrics["val_acc"], "obq/fp/val_loss": report.metrics["val_loss"],
        "obq/val_acc": report.metrics["obq/val_acc"],
        "obq/val_acc_delta": report.metrics["obq/val_acc_delta"], "obq/top1_agreement": None, "obq/kl_div": None,
        "obq/seconds_total": report.total_seconds, "obq/seconds_calibration": report.calib_seconds,
        "obq/seconds_solve": report.solve_seconds, "obq/seconds_bn": report.bn_seconds,
        "obq/peak_rss_mb": report.peak_rss_mb, "obq/cuda_peak_mb": 0.0, "obq/size_fp_mb": report.fp_size_mb,
        "obq/size_quant_mb": report.quant_size_mb, "obq/error": report.total_error, "obq/bits": 4.0,
        "obq/samples": 128.0,
    }
    for s in report.layers:
        expected[f"obq/layer/{s.name}/error"] = s.error
        expected[f"obq/layer/{s.name}/rtn_error"] = s.rtn_error
        expected[f"obq/layer/{s.name}/seconds"] = s.seconds
        expected[f"obq/layer/{s.name}/bits"] = 4.0
    assert report.peak_rss_mb > 0 and report.total_seconds > 0 and report.solve_seconds > 0
    assert report.calib_seconds + report.solve_seconds + report.bn_seconds <= report.total_seconds * 1.01
    assert report.quant_size_mb < report.fp_size_mb

    # W&B: read the offline run's transaction log back
    history = read_wandb_history(run_dir)
    logged: dict[str, Any] = {}
    for row in history:
        logged.update(row)
    for key, value in expected.items():
        assert key in logged, key
        if value is not None:
            assert logged[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    assert logged["obq/layers_table/_type"] == "table-file" and logged["obq/layers_table/nrows"] == 3
    table_file = run_dir / "files" / logged["obq/layers_table/path"]
    table = json.loads(table_file.read_text())
    assert table["columns"][:2] == ["layer", "kind"] and [r[0] for r in table["data"]] == ["features.0",
                                                                                          "features.3", "head"]
    assert any(k.startswith("obq/layer_error_plot") for k in logged)
    bn = report.batchnorm  # the BatchNorm decision: scalars in the history, the modes in the run config
    assert logged["obq/bn/chosen"] == BN_CODES[bn["chosen"]] and bn["mode"] == "auto"
    assert logged["obq/bn/keep/kl_div"] == pytest.approx(bn["candidates"]["keep"]["kl_div"], rel=1e-6)
    config = read_wandb_config(run_dir)
    assert config["obq/bn_mode"] == "auto" and config["obq/bn_chosen"] == bn["chosen"]

    # CSV
    csv_metrics = read_csv_metrics(Path(csv_logger.log_dir) / "metrics.csv")
    for key, value in expected.items():
        assert key in csv_metrics, key
        if value is not None:
            assert csv_metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key

    saved = cb.state_dict()
    assert saved["quantized"] is True and saved["config"]["bits"] == 4
    assert saved["report"]["metrics"]["obq/val_acc"] == report.metrics["obq/val_acc"]
    json.dumps(saved)


def test_budget_logs_chosen_bits_predicted_loss_and_size(tmp_path: Path) -> None:
    pl.seed_everything(0)
    cb = OBQCallback(config=QuantConfig(bits=4, budget=3.5, calib_samples=64), evaluate=False)
    csv_logger = CSVLogger(tmp_path, name="csv")
    make_trainer(tmp_path, [cb], max_epochs=1, logger=csv_logger).fit(TinyNet(), train_loader(64), val_loader())
    a = cb.report.allocation
    logged = read_csv_metrics(Path(csv_logger.log_dir) / "metrics.csv")
    assert logged["obq/mixed/average_bits"] == pytest.approx(a["average_bits"]) and a["average_bits"] <= 3.5
    assert logged["obq/mixed/size_mb"] == pytest.approx(a["size_mb"], rel=1e-6)
    assert logged["obq/mixed/predicted_loss"] == pytest.approx(a["predicted_loss"], rel=1e-6)
    for s in cb.report.layers:
        assert logged[f"obq/layer/{s.name}/bits"] == s.bits == a["layers"][s.name]["bits"]
        assert logged[f"obq/layer/{s.name}/predicted_loss"] == pytest.approx(a["layers"][s.name]["predicted_loss"],
                                                                              rel=1e-6)


def test_without_loggers_the_report_is_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    pl.seed_everything(0)
    cb = OBQCallback(bits=3, method="gptq", evaluate=False, calib_samples=64, reestimate_bn=False)
    model = TinyNet()
    with caplog.at_level("INFO", logger="lightning.pytorch"):
        make_trainer(tmp_path, [cb], max_epochs=1).fit(model, train_loader(64), val_loader())
    assert "OBQCallback report" in caplog.text and "features.3" in caplog.text
    assert cb.report is not None and cb.report.metrics == {}  # evaluate=False: no task/fidelity metrics
    assert_on_grid(model, cb.report, bits=3)


def test_checkpoint_after_quantization_reloads_quantized_and_refuses_resume(tmp_path: Path) -> None:
    pl.seed_everything(0)
    model, cb = TinyNet(), OBQCallback(bits=4, calib_samples=64, skip="head")
    trainer = make_trainer(tmp_path, [cb], max_epochs=1)
    trainer.fit(model, train_loader(64), val_loader())
    assert [s.name for s in cb.report.layers] == ["features.0", "features.3"]  # skip -> exclude
    ckpt = tmp_path / "quantized.ckpt"
    trainer.save_checkpoint(ckpt)
    loaded = TinyNet.load_from_checkpoint(ckpt)
    assert_same_state(state(loaded), state(model))
    saved = torch.load(ckpt, weights_only=True)["callbacks"][cb.state_key]
    assert saved["quantized"] is True and saved["report"]["layers"][0]["name"] == "features.0"

    # resuming fit from it is refused with a clear message, and nothing is changed
    resumed = OBQCallback(bits=4, calib_samples=64, skip="head")
    with pytest.raises(RuntimeError, match="refused"):
        make_trainer(tmp_path, [resumed], max_epochs=2).fit(TinyNet(), train_loader(64), val_loader(),
                                                             ckpt_path=ckpt)
    # training the quantized module again in this process is refused too; a fit from FP weights is not
    with pytest.raises(RuntimeError, match="refused"):
        make_trainer(tmp_path, [cb], max_epochs=1).fit(model, train_loader(64), val_loader())
    refit = TinyNet()
    make_trainer(tmp_path, [cb], max_epochs=1).fit(refit, train_loader(64), val_loader())
    assert cb.quantized and cb.report.layers[0].name == "features.0"
    # validating it with a validation_start callback does not quantize again
    again = OBQCallback(bits=4, when="validation_start", calib_samples=64, skip="head")
    fresh = TinyNet()
    make_trainer(tmp_path, [again]).validate(fresh, val_loader(), ckpt_path=ckpt, verbose=False)
    assert again.quantized and again.report is not None and again.report.layers[1].name == "features.3"
    assert_same_state(state(fresh), state(model))


def test_validation_start_quantizes_once_before_validate(tmp_path: Path) -> None:
    pl.seed_everything(0)
    model = TinyNet()
    make_trainer(tmp_path, []).fit(model, train_loader(), val_loader())
    fp_acc = accuracy(model, val_loader())
    cb = OBQCallback(bits=2, when="validation_start", calib_dataloader=train_loader(128), calib_samples=128)
    trainer = make_trainer(tmp_path, [cb])
    (first,) = trainer.validate(model, val_loader(), verbose=False)
    report = cb.report
    assert report is not None and report.samples == 128
    assert report.metrics["val_acc"] == pytest.approx(fp_acc, abs=1e-6)
    assert report.metrics["obq/val_acc"] == pytest.approx(first["val_acc"], abs=1e-6)
    assert first["val_acc"] == pytest.approx(accuracy(model, val_loader()), abs=1e-6)
    assert_on_grid(model, report, bits=2)
    quantized = state(model)
    (test,) = trainer.test(model, val_loader(), verbose=False)  # no second quantization
    assert cb.report is report
    assert_same_state(state(model), quantized)
    assert test["test_acc"] == pytest.approx(first["val_acc"], abs=1e-6)
    with pytest.raises(ValueError, match="validation_start"):
        make_trainer(tmp_path, [OBQCallback(when="validation_start")]).fit(TinyNet(), train_loader(64))


def test_export_path_writes_a_loadable_artifact(tmp_path: Path) -> None:
    from lightning_obq.export.artifact import load_quantized

    pl.seed_everything(0)
    model = TinyNet()
    cb = OBQCallback(bits=4, calib_samples=64, evaluate=False, export_path=tmp_path / "tiny.safetensors")
    make_trainer(tmp_path, [cb], max_epochs=1).fit(model, train_loader(64))
    assert cb.export_file is not None and cb.export_file.exists()
    restored = load_quantized(cb.export_file, TinyNet())
    assert_same_state(state(restored), state(model))


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("bits", [1, 9])
def test_bad_bits(bits: int) -> None:
    with pytest.raises(ValueError, match="bits"):
        OBQCallback(bits=bits)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"when": "fit_start"}, ValueError, "when"),
        ({"method": "awq"}, ValueError, "method"),
        ({"calib_dataloader": []}, ValueError, "empty"),
        ({"calib_dataloader": 3}, TypeError, "calib_dataloader"),
        ({"forward_fn": "model"}, TypeError, "forward_fn"),
        ({"evaluate": "yes"}, TypeError, "evaluate"),
        ({"skip": 3}, TypeError, "skip"),
        ({"export_path": 3}, TypeError, "export_path"),
        ({"granularty": "group"}, TypeError, "granularty"),
        ({"calib_samples": 0}, ValueError, "calib_samples"),
        ({"config": QuantConfig(bits=3), "bits": 8}, ValueError, "config"),
        ({"config": {"bits": 3}}, TypeError, "config"),
    ],
)
def test_bad_arguments(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        OBQCallback(**kwargs)


def test_config_and_extra_fields() -> None:
    cb = OBQCallback(config=QuantConfig(bits=3, method="gptq", order="act"), skip=("head",))
    assert (cb.config.bits, cb.config.method, cb.config.order, cb.config.exclude) == (3, "gptq", "act", ("head",))
    cb = OBQCallback(bits=8, granularity="group", group_size=16, symmetric=True, exclude="stem")
    assert (cb.config.granularity, cb.config.group_size, cb.config.symmetric, cb.config.exclude) == (
        "group", 16, True, ("stem",))


class EmptyIterable:
    def __iter__(self):
        return iter(())


def test_empty_or_missing_calibration_leaves_weights(tmp_path: Path) -> None:
    model = TinyNet()
    before = state(model)
    trainer = make_trainer(tmp_path, [OBQCallback(when="validation_start", evaluate=False)])
    with pytest.raises(ValueError, match="no calibration data"):
        trainer.validate(model, val_loader(), verbose=False)
    assert_same_state(state(model), before)
    cb = OBQCallback(calib_dataloader=EmptyIterable(), evaluate=False)
    trainer = make_trainer(tmp_path, [KeepFP(), cb], max_epochs=1)
    with pytest.raises(ValueError, match="empty"):
        trainer.fit(model, train_loader(64))
    assert_same_state(state(model), trainer.callbacks[0].state)
    assert not cb.quantized and cb.report is None


class NoLayers(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, :4] * self.scale

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_module_without_conv_or_linear(tmp_path: Path) -> None:
    model = NoLayers()
    with pytest.raises(ValueError, match="no layer to quantize"):
        make_trainer(tmp_path, [OBQCallback(evaluate=False)], max_epochs=1).fit(model, train_loader(64))


def test_failing_validation_before_and_after_quantization(tmp_path: Path) -> None:
    # the callback evaluates copies of the module: the module's own counter only sees fit's validation
    pl.seed_everything(0)
    model, cb = TinyNet(), OBQCallback(bits=4, calib_samples=64)
    make_trainer(tmp_path, [cb], max_epochs=1, limit_val_batches=1).fit(model, train_loader(64), val_loader())
    assert cb.quantized and model.validation_calls == 1
    # the quantized evaluation raises: quantized, then restored to FP
    pl.seed_everything(0)
    model, keep, cb = TinyNet(fail_when_quantized=True), KeepFP(), OBQCallback(bits=4, calib_samples=64)
    with pytest.raises(RuntimeError, match="exploded on the quantized model"):
        make_trainer(tmp_path, [keep, cb], max_epochs=1, limit_val_batches=1).fit(
            model, train_loader(64), val_loader())
    assert_same_state(state(model), keep.state)
    assert not cb.quantized and cb.report is None
    # the FP evaluation raises (the copy's second call) before anything is quantized
    model, keep, cb = TinyNet(fail_on_validation_call=2), KeepFP(), OBQCallback(bits=4, calib_samples=64)
    with pytest.raises(RuntimeError, match="validation exploded"):
        make_trainer(tmp_path, [keep, cb], max_epochs=1, limit_val_batches=1).fit(
            model, train_loader(64), val_loader())
    assert_same_state(state(model), keep.state)
    assert not cb.quantized and cb.report is None


def test_quantization_failing_half_way_restores_fp(tmp_path: Path) -> None:
    calls = {"n": 0}

    def flaky_forward(model: nn.Module, batch: Any) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] > 4:  # sequential mode: features.0 is already written when this fires
            raise RuntimeError("forward failed half-way")
        return model(batch[0])

    pl.seed_everything(0)
    model, keep = TinyNet(), KeepFP()
    cb = OBQCallback(bits=4, calib_dataloader=DataLoader(tiny_dataset(64), batch_size=32), forward_fn=flaky_forward,
                     calibration="sequential", evaluate=False)
    with pytest.raises(RuntimeError, match="half-way"):
        make_trainer(tmp_path, [keep, cb], max_epochs=1).fit(model, train_loader(64))
    assert calls["n"] == 5
    assert_same_state(state(model), keep.state)
    assert not cb.quantized


@pytest.mark.slow
def test_example_script_runs_reduced(tmp_path: Path) -> None:
    """examples/lightning_callback.py on real Fashion-MNIST, shrunk to a few steps and batches."""
    script = Path(__file__).resolve().parents[2] / "examples" / "lightning_callback.py"
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, str(script), "--out", str(out), "--max-steps", "10", "--limit-batches", "3",
         "--train-samples", "256", "--val-samples", "128", "--batch-size", "32", "--width", "4",
         "--calib-samples", "64", "--export"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "W4 fastobq val_acc" in proc.stdout
    (metrics_csv,) = (out / "csv").glob("version_*/metrics.csv")
    logged = read_csv_metrics(metrics_csv)
    assert {"val_acc", "obq/val_acc", "obq/top1_agreement", "obq/seconds_total", "obq/samples"} <= set(logged)
    assert logged["obq/samples"] == 64
    assert (out / "model_w4.safetensors").exists()
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    logged_wandb: dict[str, Any] = {}
    for row in read_wandb_history(run_dir):
        logged_wandb.update(row)
    assert logged_wandb["obq/val_acc"] == pytest.approx(logged["obq/val_acc"], abs=1e-6)


def test_wandb_runs_offline_unless_the_user_chose_a_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import wandb

    monkeypatch.setenv("WANDB_MODE", "unset-by-test")  # recorded, so the original value comes back afterwards
    monkeypatch.delenv("WANDB_MODE")
    OBQCallback(wandb_offline=False)
    assert "WANDB_MODE" not in os.environ
    logger = WandbLogger(save_dir=str(tmp_path), project="obq-default-mode")  # no offline=True, no mode
    cb = OBQCallback(bits=4, calib_samples=32, evaluate=False, log_per_layer=False)
    assert os.environ["WANDB_MODE"] == "offline"
    make_trainer(tmp_path, [cb], max_epochs=1, logger=logger).fit(TinyNet(), train_loader(32))
    run_dir = Path(logger.experiment.dir).parent
    wandb.finish()
    assert os.environ["WANDB_MODE"] == "offline"
    assert run_dir.name.startswith("offline-run-")
    logged: dict[str, Any] = {}
    for row in read_wandb_history(run_dir):
        logged.update(row)
    assert logged.get("obq/bits") == 4, sorted(logged)
    assert "obq/layer/head/error" not in logged

    monkeypatch.setenv("WANDB_MODE", "disabled")  # a mode the user chose is kept
    make_trainer(tmp_path, [OBQCallback(bits=4, calib_samples=32, evaluate=False)], max_epochs=1,
                 logger=WandbLogger(save_dir=str(tmp_path))).fit(TinyNet(), train_loader(32))
    assert os.environ["WANDB_MODE"] == "disabled"


def test_output_fidelity_function() -> None:
    from lightning_obq.model.fidelity import class_scores, output_fidelity

    torch.manual_seed(0)
    reference = nn.Sequential(nn.Flatten(), nn.Linear(64, 5))
    candidate = nn.Sequential(nn.Flatten(), nn.Linear(64, 5))
    candidate.load_state_dict(reference.state_dict())
    loader = DataLoader(tiny_dataset(96), batch_size=32)
    same = output_fidelity(reference, candidate, loader)
    assert same["top1_agreement"] == 1.0 and same["kl_div"] == pytest.approx(0.0, abs=1e-12)
    with torch.no_grad():
        candidate[1].weight.add_(0.3 * torch.randn_like(candidate[1].weight))
    got = output_fidelity(reference, candidate, loader, forward_fn=lambda m, b: m(b[0]), max_batches=2)
    x = torch.cat([b[0] for b in list(loader)[:2]])
    with torch.no_grad():
        p, q = F.log_softmax(reference(x).double(), 1), F.log_softmax(candidate(x).double(), 1)
    expected_kl = (p.exp() * (p - q)).sum(1).mean().item()
    expected_agree = (p.argmax(1) == q.argmax(1)).double().mean().item()
    assert got["kl_div"] == pytest.approx(expected_kl, rel=1e-9)
    assert got["top1_agreement"] == pytest.approx(expected_agree, abs=1e-7) and expected_agree < 1.0
    assert class_scores(torch.zeros(2, 3, 4, 4)).shape == (32, 3)  # per-pixel class scores
    assert class_scores((torch.zeros(6), "aux")).shape == (6, 2)  # binary logit
    with pytest.raises(ValueError, match="max_batches"):
        output_fidelity(reference, candidate, loader, max_batches=0)
    with pytest.raises(ValueError, match="no data"):
        output_fidelity(reference, candidate, [])


# ---------------------------------------------------------------------------------------------- checkpoints after fit


def test_fit_then_test_or_validate_on_checkpoints_runs_the_quantized_model(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    pl.seed_everything(0)
    model = TinyNet()
    every = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, save_last=True)  # one file per epoch
    cb = OBQCallback(bits=4, calib_samples=64, log_per_layer=False)
    csv_logger = CSVLogger(tmp_path, name="csv")
    trainer = make_trainer(tmp_path, [every, cb], max_epochs=2, enable_checkpointing=True, logger=csv_logger)
    trainer.fit(model, train_loader(64), val_loader())
    final = cb.checkpoint_files["final"]
    assert final == tmp_path / "ckpt" / "obq-w4-final.ckpt" and final.is_file()
    assert torch.load(final, weights_only=True)["callbacks"][cb.state_key]["quantized"] is True
    fit_report, quantized = cb.report, state(model)
    fp_last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["state_dict"]
    assert not torch.equal(fp_last["head.weight"], quantized["head.weight"])  # last.ckpt stays FP
    assert trainer.callback_metrics["obq/val_acc"] == pytest.approx(fit_report.metrics["obq/val_acc"])

    # last.ckpt = the FP weights this callback quantized: they are put back, and said so
    with caplog.at_level("INFO", logger="lightning.pytorch"):
        (last,) = trainer.test(model, val_loader(), ckpt_path="last", verbose=False)
    assert "holds the full-precision weights this callback quantized" in caplog.text
    assert_same_state(state(model), quantized)
    assert_on_grid(model, fit_report, bits=4)
    assert last["test_acc"] == pytest.approx(accuracy(model, val_loader()), abs=1e-6)
    assert cb.report is fit_report and cb.quantized
    assert cb.report.metrics["obq/test_acc"] == pytest.approx(last["test_acc"], abs=1e-6)
    assert trainer.callback_metrics["obq/test_acc"] == pytest.approx(last["test_acc"], abs=1e-6)
    fp_test = cb.report.metrics["test_acc"]  # measured on the FP weights before putting the quantized back
    assert cb.report.metrics["obq/test_acc_delta"] == pytest.approx(last["test_acc"] - fp_test, abs=1e-6)

    # an earlier epoch's FP file: quantized before the loop, saved beside it
    (epoch0,) = (tmp_path / "ckpt").glob("epoch=0-*.ckpt")
    caplog.clear()
    with caplog.at_level("INFO", logger="lightning.pytorch"):
        (first,) = trainer.validate(model, val_loader(), ckpt_path=str(epoch0), verbose=False)
    assert "holds full-precision weights; quantizing them (W4 fastobq) before validating" in caplog.text
    assert cb.report is not fit_report and grid_rows(model)
    assert_on_grid(model, cb.report, bits=4)
    assert first["val_acc"] == pytest.approx(accuracy(model, val_loader()), abs=1e-6)
    assert cb.report.metrics["obq/val_acc"] == pytest.approx(first["val_acc"], abs=1e-6)
    epoch0_report = cb.report
    beside = tmp_path / "ckpt" / f"obq-w4-{epoch0.stem}.ckpt"
    assert cb.checkpoint_files[epoch0.stem] == beside and beside.is_file()

    # the module as it is, then the quantized file: evaluated as is; so by a fresh callback (another process)
    caplog.clear()
    with caplog.at_level("INFO", logger="lightning.pytorch"):
        trainer.test(model, val_loader(), verbose=False)
        assert "the module is already quantized (W4 fastobq); testing it as is" in caplog.text
        trainer.test(model, val_loader(), ckpt_path=str(final), verbose=False)
        assert f"checkpoint {final} was saved after OBQCallback quantized it" in caplog.text
        assert_same_state(state(model), quantized)
        fresh_cb, fresh = OBQCallback(bits=4, calib_samples=64), TinyNet()
        (again,) = make_trainer(tmp_path, [fresh_cb]).test(fresh, val_loader(), ckpt_path=str(final), verbose=False)
    assert caplog.text.count("was saved after OBQCallback quantized it (W4 fastobq); testing it as is") == 2
    assert_same_state(state(fresh), quantized)
    assert fresh_cb.report.metrics["obq/val_acc"] == fit_report.metrics["obq/val_acc"]
    assert again["test_acc"] == pytest.approx(last["test_acc"], abs=1e-6)

    # every obq name once per step in the CSV, although fit end and the epoch-0 quantization share a step
    # (the three test runs at one step each log Lightning's own test_acc, as they would without the callback)
    trainer.loggers[0].save()
    metrics_csv = Path(csv_logger.log_dir) / "metrics.csv"
    assert_each_name_once_per_step(metrics_csv, prefix="obq/")
    logged = read_csv_metrics(metrics_csv)
    assert logged["obq/fp/val_acc"] == pytest.approx(fit_report.metrics["val_acc"])
    assert logged["obq/ckpt/val_acc"] == pytest.approx(epoch0_report.metrics["obq/val_acc"])
    assert logged["obq/ckpt/error"] == pytest.approx(epoch0_report.total_error, rel=1e-6)
    assert logged["obq/error"] == pytest.approx(fit_report.total_error, rel=1e-6)


def test_batchnorm_decision_in_a_csv_logger_run(tmp_path: Path) -> None:
    """Issue 16: the chosen BatchNorm mode and the candidates' figures reach a real CSVLogger."""
    import yaml

    pl.seed_everything(0)
    cb = OBQCallback(bits=3, calib_samples=128, evaluate=False)
    assert cb.config.bn_mode == "auto"
    csv_logger = CSVLogger(tmp_path, name="csv")
    make_trainer(tmp_path, [cb], max_epochs=1, logger=csv_logger).fit(TinyNet(), train_loader(128))
    bn = cb.report.batchnorm
    assert bn["mode"] == "auto" and bn["chosen"] in ("keep", "correct", "reestimate") and bn["layers"] == 1
    assert set(bn["candidates"]) == {"keep", "correct", "reestimate"} and bn["holdout_samples"] == 32
    logged = read_csv_metrics(Path(csv_logger.log_dir) / "metrics.csv")
    assert logged["obq/bn/chosen"] == BN_CODES[bn["chosen"]]
    assert logged["obq/bn/holdout_samples"] == 32 and logged["obq/bn/fit_samples"] == 96
    for mode, scores in bn["candidates"].items():
        assert set(scores) == {"kl_div", "top1_agreement"}
        for metric, value in scores.items():
            assert logged[f"obq/bn/{mode}/{metric}"] == pytest.approx(value, rel=1e-6, abs=1e-12)
    best = min(bn["candidates"], key=lambda m: bn["candidates"][m]["kl_div"])
    assert bn["candidates"][bn["chosen"]]["kl_div"] == bn["candidates"][best]["kl_div"]
    hparams = yaml.safe_load((Path(csv_logger.log_dir) / "hparams.yaml").read_text())
    assert hparams["obq/bn_mode"] == "auto" and hparams["obq/bn_chosen"] == bn["chosen"]
    assert OBQCallback(reestimate_bn=False).config.bn_mode == "keep"  # the older spelling
    assert OBQCallback(reestimate_bn=True).config.bn_mode == "reestimate"
    with pytest.raises(ValueError, match=r"OBQCallback\(reestimate_bn=True\)"):
        OBQCallback(reestimate_bn=True, bn_mode="keep")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"evalute": False}, r"'evalute' \(did you mean 'evaluate'\?\).*OBQCallback arguments: bits, method"),
        ({"calib_sample": 64}, r"did you mean 'calib_samples'"),
        ({"bn_mod": "keep"}, r"did you mean 'bn_mode'"),
        ({"granularty": "group"}, r"did you mean 'granularity'"),
    ],
)
def test_misspelt_argument_suggests_the_closest(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(TypeError, match=match):
        OBQCallback(**kwargs)


def test_config_errors_name_the_callback_argument() -> None:
    with pytest.raises(ValueError, match=r"^OBQCallback\(bits=1\): QuantConfig.bits=1"):
        OBQCallback(bits=1)
    with pytest.raises(ValueError, match=r"^OBQCallback\(bn_mode='sometimes'\)"):
        OBQCallback(bn_mode="sometimes")
    with pytest.raises(ValueError, match=r"^OBQCallback\(damp=-1.0\)"):
        OBQCallback(damp=-1.0)


class LoopProbe(pl.Callback):
    """Records the trainer's loop states, step and non-obq callback metrics, and the module's metric states,
    at on_fit_end and at the end of a validate/test run (placed before and after OBQCallback)."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

    def _record(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.seen.append({
            "loops": [json.dumps(loop.state_dict(), sort_keys=True, default=str)
                      for loop in (trainer.fit_loop, trainer.validate_loop, trainer.test_loop)],
            "step": trainer.global_step, "epoch": trainer.current_epoch,
            "metrics": {k: float(v) for k, v in trainer.callback_metrics.items() if not k.startswith("obq/")},
            "val_acc": {k: v.clone() for k, v in pl_module.val_acc.metric_state.items()},
            "validation_calls": pl_module.validation_calls, "training": pl_module.training,
            "rng": torch.get_rng_state(),
        })

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._record(trainer, pl_module)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "validate":
            self._record(trainer, pl_module)


def _same(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if key == "val_acc":
            assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
        elif key == "rng":
            assert torch.equal(a[key], b[key])
        else:
            assert a[key] == b[key], key


def test_evaluations_leave_loops_module_metrics_and_rng_as_they_were(tmp_path: Path) -> None:
    pl.seed_everything(0)
    model, before, after = TinyNet(), LoopProbe(), LoopProbe()
    cb = OBQCallback(bits=4, calib_samples=64)
    trainer = make_trainer(tmp_path, [before, cb, after], max_epochs=1)
    trainer.fit(model, train_loader(64), val_loader())
    assert cb.quantized and "obq/val_acc" in trainer.callback_metrics and "obq/val_acc" in trainer.logged_metrics
    _same(before.seen[0], after.seen[0])
    # inside a running validate loop (validation_start): the loop, the module and the RNG as before
    fresh, before, after = TinyNet(), LoopProbe(), LoopProbe()
    cbv = OBQCallback(bits=4, when="validation_start", calib_dataloader=train_loader(64), calib_samples=64)
    make_trainer(tmp_path, [before, cbv, after]).validate(fresh, val_loader(), verbose=False)
    assert cbv.quantized and fresh.validation_calls == 2  # the loop's own two batches, none of the callback's
    _same(before.seen[0], after.seen[0])
