"""OBQCallback added to an existing Hydra-configured Lightning project, only through Hydra overrides.

The project is written into the test's temporary folder the way the common Lightning + Hydra starter
templates lay it out: a ``configs/`` tree (``train.yaml``, ``eval.yaml`` and groups for data, model,
callbacks, logger, trainer and paths), a LightningModule with BatchNorm1d, torchmetrics ``Accuracy``, a
``MaxMetric`` best-so-far tracker (and a ``CatMetric`` history) updated in ``on_validation_epoch_end`` and
slash-named metrics (``val/acc``), a ``ModelCheckpoint`` on ``val/acc``, a ``train.py`` that fits and then
tests ``ckpt_path="best"``, and an ``eval.py`` that tests a saved checkpoint. The project knows nothing of
lightning_obq; the tests add ``+callbacks.obq._target_=lightning_obq.OBQCallback`` and nothing else.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from support import assert_each_name_once_per_step, assert_on_grid, read_csv_metrics

from lightning_obq import OBQCallback

hydra = pytest.importorskip("hydra")
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.errors import InstantiationException  # noqa: E402

FILES = {
    "starter/__init__.py": "",
    "starter/data.py": '''
        import lightning.pytorch as pl
        import torch
        from torch.utils.data import DataLoader, TensorDataset


        def blobs(n: int, seed: int) -> TensorDataset:
            """4 classes of 64 features: class c raises features 16c..16c+15, plus noise."""
            g = torch.Generator().manual_seed(seed)
            y = torch.randint(0, 4, (n,), generator=g)
            x = torch.randn(n, 64, generator=g)
            for c in range(4):
                x[y == c, 16 * c: 16 * c + 16] += 0.6
            return TensorDataset(x, y)


        class BlobsDataModule(pl.LightningDataModule):
            def __init__(self, train_samples: int = 256, val_samples: int = 128, test_samples: int = 128,
                         batch_size: int = 32) -> None:
                super().__init__()
                self.save_hyperparameters()

            def setup(self, stage: str) -> None:
                h = self.hparams
                self.train_set = blobs(h.train_samples, 0)
                self.val_set = blobs(h.val_samples, 1)
                self.test_set = blobs(h.test_samples, 2)

            def train_dataloader(self) -> DataLoader:
                return DataLoader(self.train_set, batch_size=self.hparams.batch_size, shuffle=True)

            def val_dataloader(self) -> DataLoader:
                return DataLoader(self.val_set, batch_size=self.hparams.batch_size)

            def test_dataloader(self) -> DataLoader:
                return DataLoader(self.test_set, batch_size=self.hparams.batch_size)
    ''',
    "starter/model.py": '''
        import lightning.pytorch as pl
        import torch
        import torch.nn as nn
        import torch.nn.functional as F
        from torchmetrics import CatMetric, MaxMetric, MeanMetric
        from torchmetrics.classification import Accuracy


        class MLPLitModule(pl.LightningModule):
            def __init__(self, hidden: int = 32, lr: float = 0.01) -> None:
                super().__init__()
                self.save_hyperparameters()
                self.net = nn.Sequential(nn.Linear(64, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
                                         nn.Linear(hidden, 4))
                self.train_acc = Accuracy(task="multiclass", num_classes=4)
                self.val_acc = Accuracy(task="multiclass", num_classes=4)
                self.test_acc = Accuracy(task="multiclass", num_classes=4)
                self.train_loss, self.val_loss, self.test_loss = MeanMetric(), MeanMetric(), MeanMetric()
                self.val_acc_best = MaxMetric()
                self.val_acc_history = CatMetric()  # every epoch's val/acc, in order

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.net(x)

            def on_train_start(self) -> None:
                self.val_loss.reset()
                self.val_acc.reset()
                self.val_acc_best.reset()
                self.val_acc_history.reset()

            def model_step(self, batch):
                x, y = batch
                logits = self(x)
                return F.cross_entropy(logits, y), logits.argmax(dim=1), y

            def training_step(self, batch, batch_idx):
                loss, preds, targets = self.model_step(batch)
                self.train_loss(loss)
                self.train_acc(preds, targets)
                self.log("train/loss", self.train_loss, on_step=False, on_epoch=True)
                self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
                return loss

            def validation_step(self, batch, batch_idx):
                loss, preds, targets = self.model_step(batch)
                self.val_loss(loss)
                self.val_acc(preds, targets)
                self.log("val/loss", self.val_loss, on_step=False, on_epoch=True, prog_bar=True)
                self.log("val/acc", self.val_acc, on_step=False, on_epoch=True, prog_bar=True)

            def on_validation_epoch_end(self) -> None:
                acc = self.val_acc.compute()
                self.val_acc_best(acc)
                self.val_acc_history.update(acc)
                self.log("val/acc_best", self.val_acc_best.compute(), sync_dist=True, prog_bar=True)

            def test_step(self, batch, batch_idx):
                loss, preds, targets = self.model_step(batch)
                self.test_loss(loss)
                self.test_acc(preds, targets)
                self.log("test/loss", self.test_loss, on_step=False, on_epoch=True)
                self.log("test/acc", self.test_acc, on_step=False, on_epoch=True)

            def configure_optimizers(self):
                return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
    ''',
    "utils.py": '''
        import hydra
        from omegaconf import DictConfig


        def instantiate_all(cfg: DictConfig | None) -> list:
            """Every `_target_` entry of a config group (callbacks, logger)."""
            return [hydra.utils.instantiate(c) for c in (cfg or {}).values() if "_target_" in c]


        def get_metric_value(metric_dict: dict, metric_name: str | None) -> float | None:
            if not metric_name:
                return None
            if metric_name not in metric_dict:
                raise Exception(f"Metric value not found! <metric_name={metric_name}>")
            return float(metric_dict[metric_name])


        def build(cfg: DictConfig):
            import lightning.pytorch as pl

            pl.seed_everything(cfg.seed, workers=True)
            datamodule = hydra.utils.instantiate(cfg.data)
            model = hydra.utils.instantiate(cfg.model)
            callbacks = instantiate_all(cfg.get("callbacks"))
            logger = instantiate_all(cfg.get("logger"))
            trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=logger)
            return datamodule, model, trainer
    ''',
    "train.py": '''
        import json
        from pathlib import Path

        import hydra
        from omegaconf import DictConfig

        from utils import build, get_metric_value


        def train(cfg: DictConfig):
            datamodule, model, trainer = build(cfg)
            trainer.fit(model=model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
            train_metrics = trainer.callback_metrics
            if cfg.get("test"):
                trainer.test(model=model, datamodule=datamodule, ckpt_path="best")
            test_metrics = trainer.callback_metrics
            metric_dict = {**train_metrics, **test_metrics}
            return metric_dict, {"model": model, "datamodule": datamodule, "trainer": trainer}


        @hydra.main(version_base="1.3", config_path="configs", config_name="train")
        def main(cfg: DictConfig) -> float | None:
            metric_dict, _ = train(cfg)
            value = get_metric_value(metric_dict, cfg.get("optimized_metric"))
            Path(cfg.paths.output_dir, "metrics.json").write_text(
                json.dumps({"optimized": value, **{k: float(v) for k, v in metric_dict.items()}}))
            return value


        if __name__ == "__main__":
            main()
    ''',
    "eval.py": '''
        import hydra
        from omegaconf import DictConfig

        from utils import build


        def evaluate(cfg: DictConfig):
            assert cfg.ckpt_path
            datamodule, model, trainer = build(cfg)
            trainer.test(model=model, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
            return dict(trainer.callback_metrics), {"model": model, "datamodule": datamodule, "trainer": trainer}


        @hydra.main(version_base="1.3", config_path="configs", config_name="eval")
        def main(cfg: DictConfig) -> None:
            evaluate(cfg)


        if __name__ == "__main__":
            main()
    ''',
    "configs/train.yaml": '''
        defaults:
          - _self_
          - data: blobs
          - model: mlp
          - callbacks: default
          - logger: csv
          - trainer: cpu
          - paths: default

        task_name: train
        seed: 0
        test: true
        ckpt_path: null
        optimized_metric: val/acc

        hydra:
          run:
            dir: ${paths.output_dir}
    ''',
    "configs/eval.yaml": '''
        defaults:
          - _self_
          - data: blobs
          - model: mlp
          - logger: csv
          - trainer: cpu
          - paths: default

        task_name: eval
        seed: 0
        ckpt_path: ???
        callbacks: {}

        hydra:
          run:
            dir: ${paths.output_dir}
    ''',
    "configs/data/blobs.yaml": '''
        _target_: starter.data.BlobsDataModule
        train_samples: 256
        val_samples: 128
        test_samples: 128
        batch_size: 32
    ''',
    "configs/model/mlp.yaml": '''
        _target_: starter.model.MLPLitModule
        hidden: 32
        lr: 0.01
    ''',
    "configs/callbacks/default.yaml": '''
        model_checkpoint:
          _target_: lightning.pytorch.callbacks.ModelCheckpoint
          dirpath: ${paths.output_dir}/checkpoints
          filename: epoch_{epoch:03d}
          monitor: val/acc
          mode: max
          save_last: true
          auto_insert_metric_name: false
    ''',
    "configs/logger/csv.yaml": '''
        csv:
          _target_: lightning.pytorch.loggers.csv_logs.CSVLogger
          save_dir: ${paths.output_dir}
          name: csv
    ''',
    "configs/trainer/cpu.yaml": '''
        _target_: lightning.pytorch.trainer.Trainer
        default_root_dir: ${paths.output_dir}
        accelerator: cpu
        devices: 1
        max_epochs: 3
        num_sanity_val_steps: 0
        enable_progress_bar: false
        enable_model_summary: false
        log_every_n_steps: 1
        deterministic: true
    ''',
    "configs/paths/default.yaml": '''
        output_dir: outputs/${task_name}
    ''',
}

OBQ = ["+callbacks.obq._target_=lightning_obq.OBQCallback", "+callbacks.obq.bits=4",
       "+callbacks.obq.calib_samples=128"]


@pytest.fixture()
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "starter-project"
    for name, text in FILES.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip())
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setenv("WANDB_MODE", "offline")
    return root


def _script(project: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"starter_{name}", project / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _compose(project: Path, config: str, overrides: list[str]) -> Any:
    with initialize_config_dir(config_dir=str(project / "configs"), version_base="1.3"):
        return compose(config_name=config, overrides=overrides)


def _accuracy(model: torch.nn.Module, loader: Any) -> float:
    model.eval()
    with torch.no_grad():
        hits = [(model(x).argmax(1) == y).float() for x, y in loader]
    return float(torch.cat(hits).mean())


def _obq(trainer: Any) -> OBQCallback:
    (cb,) = [c for c in trainer.callbacks if isinstance(c, OBQCallback)]
    return cb


def test_hydra_train_then_test_best_reports_the_quantized_model(project: Path, caplog: pytest.LogCaptureFixture
                                                                ) -> None:
    out = project / "outputs" / "train"
    cfg = _compose(project, "train", [*OBQ, "optimized_metric=obq/val/acc", f"paths.output_dir={out}"])
    train = _script(project, "train")
    utils = _script(project, "utils")
    with caplog.at_level("INFO", logger="lightning.pytorch"):
        metric_dict, objects = train.train(cfg)
    model, trainer, dm = objects["model"], objects["trainer"], objects["datamodule"]
    cb = _obq(trainer)
    report = cb.report

    # the test stage ran the quantized model: weights on the grid bitwise, test/acc is theirs
    assert cb.quantized and report is not None
    assert_on_grid(model, report, bits=4)
    best = Path(trainer.checkpoint_callback.best_model_path)
    fp = type(model)()
    fp.load_state_dict(torch.load(best, weights_only=True)["state_dict"])
    fp_acc, q_acc = _accuracy(fp, dm.test_dataloader()), _accuracy(model, dm.test_dataloader())
    assert float(metric_dict["test/acc"]) == pytest.approx(q_acc, abs=1e-6)
    assert float(metric_dict["obq/test/acc"]) == pytest.approx(q_acc, abs=1e-6)
    assert float(metric_dict["obq/fp/test/acc"]) == pytest.approx(fp_acc, abs=1e-6)
    assert report.metrics["test/acc"] == pytest.approx(fp_acc, abs=1e-6)
    assert any(line in caplog.text for line in (
        f"checkpoint {best} holds full-precision weights; quantizing them (W4 fastobq) before testing",
        f"checkpoint {best} holds the full-precision weights this callback quantized"))
    assert (out / "checkpoints" / "obq-w4-final.ckpt").is_file()
    assert (out / "checkpoints" / "last.ckpt").is_file() and best.is_file()  # the FP files are kept

    # the module's trackers saw the three training validations only, not the callback's evaluations
    logged = [r for r in _csv(out) if r.get("val/acc")]
    history = [float(r["val/acc"]) for r in logged]
    assert len(history) == 3
    assert model.val_acc_history.compute().tolist() == pytest.approx(history, abs=1e-6)
    assert float(model.val_acc_best.compute()) == pytest.approx(max(history), abs=1e-6)
    # ... and the trackers the callback reports cover its own evaluation only (honest best-so-far)
    fit_metrics = {k: v for k, v in report.metrics.items() if "val/" in k}
    if fit_metrics:  # the final weights were the best: the fit-end report is the one kept
        assert fit_metrics["obq/val/acc_best"] == fit_metrics["obq/val/acc"]
        assert fit_metrics["val/acc_best"] == fit_metrics["val/acc"]
    assert float(metric_dict["obq/val/acc_best"]) == pytest.approx(float(metric_dict["obq/val/acc"]))
    assert float(metric_dict["obq/fp/val/acc"]) == pytest.approx(history[-1], abs=1e-6)

    # the optimized metric (Hydra sweeps) is found in callback_metrics
    assert utils.get_metric_value(metric_dict, "obq/val/acc") == pytest.approx(float(metric_dict["obq/val/acc"]))
    assert 0.0 <= float(metric_dict["obq/top1_agreement"]) <= 1.0

    # eval.py on the FP best checkpoint, callback with when=validation_start: each name once per step
    eval_out = project / "outputs" / "eval"
    cfg = _compose(project, "eval", [*OBQ, "+callbacks.obq.when=validation_start", f"ckpt_path={best}",
                                     f"paths.output_dir={eval_out}"])
    evaluate = _script(project, "eval")
    caplog.clear()
    with caplog.at_level("INFO", logger="lightning.pytorch"):
        metrics, objects = evaluate.evaluate(cfg)
    assert "holds full-precision weights; quantizing them (W4 fastobq) before testing" in caplog.text
    assert_each_name_once_per_step(_csv_path(eval_out))
    csv = read_csv_metrics(_csv_path(eval_out))
    eval_acc = _accuracy(objects["model"], objects["datamodule"].test_dataloader())  # its own calibration draw
    assert csv["test/acc"] == pytest.approx(eval_acc, abs=1e-6)
    assert csv["obq/test/acc"] == pytest.approx(eval_acc, abs=1e-6)
    assert csv["obq/fp/test/acc"] == pytest.approx(fp_acc, abs=1e-6)
    assert csv["obq/test/acc_delta"] == pytest.approx(eval_acc - fp_acc, abs=1e-6)
    assert_on_grid(objects["model"], _obq(objects["trainer"]).report, bits=4)

    # eval.py on the quantized checkpoint: not quantized again, and said so
    quantized_ckpt = out / "checkpoints" / "obq-w4-final.ckpt"
    cfg = _compose(project, "eval", [*OBQ, f"ckpt_path={quantized_ckpt}", f"paths.output_dir={eval_out}-q"])
    caplog.clear()
    with caplog.at_level("INFO", logger="lightning.pytorch"):
        metrics, objects = evaluate.evaluate(cfg)
    assert f"checkpoint {quantized_ckpt} was saved after OBQCallback quantized it (W4 fastobq)" in caplog.text
    assert "OBQCallback report" not in caplog.text


def test_hydra_best_from_an_earlier_epoch_is_quantized_before_test(project: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """The best checkpoint is not the final weights (a monitor in min mode picks the first epoch's): the test
    stage quantizes the best checkpoint's weights, saves them beside it and reports them."""
    out = project / "outputs" / "train-min"
    cfg = _compose(project, "train", [*OBQ, "callbacks.model_checkpoint.mode=min", "trainer.max_epochs=2",
                                      f"paths.output_dir={out}"])
    with caplog.at_level("INFO", logger="lightning.pytorch"):
        metric_dict, objects = _script(project, "train").train(cfg)
    model, trainer, dm = objects["model"], objects["trainer"], objects["datamodule"]
    cb = _obq(trainer)
    best = Path(trainer.checkpoint_callback.best_model_path)
    assert best.name == "epoch_000.ckpt"
    assert f"checkpoint {best} holds full-precision weights; quantizing them (W4 fastobq) before testing" in caplog.text
    assert_on_grid(model, cb.report, bits=4)
    assert float(metric_dict["test/acc"]) == pytest.approx(_accuracy(model, dm.test_dataloader()), abs=1e-6)
    assert cb.checkpoint_files["epoch_000"] == best.parent / "obq-w4-epoch_000.ckpt"
    saved = torch.load(best.parent / "obq-w4-epoch_000.ckpt", weights_only=True)["state_dict"]
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    # fit end and the test-time quantization share a step: the second one's repeated names are obq/ckpt/...
    assert_each_name_once_per_step(_csv_path(out), prefix="obq/")
    assert float(metric_dict["obq/ckpt/error"]) == pytest.approx(cb.report.total_error, rel=1e-6)


def _csv_path(out: Path) -> Path:
    (path,) = (out / "csv").glob("version_*/metrics.csv")
    return path


def _csv(out: Path) -> list[dict[str, str]]:
    import csv

    with open(_csv_path(out)) as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize(("override", "match"), [
    ("+callbacks.obq.evalute=false", r"'evalute' \(did you mean 'evaluate'\?\)"),
    ("+callbacks.obq.bits=1", r"OBQCallback\(bits=1\)"),
])
def test_hydra_override_errors_name_the_callback_argument(project: Path, override: str, match: str) -> None:
    base = [o for o in OBQ if "bits" not in override or "bits" not in o]
    cfg = _compose(project, "train", [*base, override, f"paths.output_dir={project / 'outputs' / 'bad'}"])
    utils = _script(project, "utils")
    with pytest.raises(InstantiationException, match=match):
        utils.instantiate_all(cfg.callbacks)


@pytest.mark.slow
def test_hydra_train_script_from_the_command_line(project: Path) -> None:
    """``python train.py +callbacks.obq._target_=lightning_obq.OBQCallback ...``: the real Hydra entry point."""
    out = project / "outputs" / "cli"
    proc = subprocess.run(
        [sys.executable, "train.py", *OBQ, "optimized_metric=obq/val/acc", f"paths.output_dir={out}",
         "trainer.max_epochs=2"],
        cwd=project, capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["optimized"] == metrics["obq/val/acc"]
    assert metrics["test/acc"] == metrics["obq/test/acc"]
    assert "OBQCallback report" in proc.stderr + proc.stdout
    ckpt = torch.load(out / "checkpoints" / "obq-w4-final.ckpt", weights_only=True)
    (state,) = [v for k, v in ckpt["callbacks"].items() if k.startswith("OBQCallback")]
    assert state["quantized"] and state["report"]["config"]["bits"] == 4
