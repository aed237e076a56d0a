"""The examples run end to end in a reduced size (examples/lightning_callback.py is tested with the callback)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest
import torch
from support import most_values_per_grid
from torchvision import models

from lightning_obq import OBQCallback
from lightning_obq.export.artifact import load_quantized

REPO = Path(__file__).resolve().parents[2]


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", REPO / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_torchvision_resnet_example(tmp_path, cache, capsys):
    example = _load("torchvision_resnet")
    out = tmp_path / "r18.safetensors"
    model, report = example.main(["--num-classes", "10", "--calib-samples", "32", "--eval-samples", "64",
                                  "--batch-size", "32", "--skip", "layer3.*", "--skip", "layer4.*",
                                  "--output", str(out)])
    printed = capsys.readouterr().out
    assert "top-1 agreement with FP" in printed and out.is_file()
    assert report.samples == 32 and 0.0 <= report.metrics["top1_agreement"] <= 1.0 and report.metrics["kl_div"] >= 0
    names = [s.name for s in report.layers]
    assert "conv1" in names and "fc" in names and not any(n.startswith(("layer3", "layer4")) for n in names)
    assert report.total_error < report.total_rtn_error  # the solver beats round-to-nearest on the same grid
    fresh = load_quantized(out, models.resnet18(num_classes=10))
    for name in ("conv1.weight", "layer1.0.conv1.weight", "fc.weight"):
        assert torch.equal(fresh.state_dict()[name], model.state_dict()[name])


@pytest.mark.slow
def test_lightning_cli_example_with_obq_w4_config(tmp_path, cache):
    example = _load("lightning_cli")
    cli = example.main([
        "fit", "--config", str(REPO / "callbacks" / "obq_w4.yaml"), "--trainer.accelerator=cpu",
        "--trainer.devices=1", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
        "--trainer.enable_checkpointing=false", f"--trainer.default_root_dir={tmp_path}",
        "--trainer.max_epochs=1", "--trainer.limit_train_batches=8", "--trainer.num_sanity_val_steps=0",
        "--model.width=8", "--data.train_samples=512", "--data.val_samples=256", "--data.batch_size=64",
        "--trainer.callbacks.init_args.calib_samples=128",
    ])
    (cb,) = [c for c in cli.trainer.callbacks if isinstance(c, OBQCallback)]
    assert cb.quantized and cb.report.samples == 128 and cb.report.config["bits"] == 4
    metrics = cb.report.metrics
    assert {"val_acc", "obq/val_acc", "obq/top1_agreement", "obq/kl_div"} <= set(metrics)
    assert 0.0 <= metrics["obq/val_acc"] <= 1.0
    assert metrics["obq/val_acc_delta"] == pytest.approx(metrics["obq/val_acc"] - metrics["val_acc"])
    conv = cli.model.model.layer1.conv1.weight.detach()
    assert most_values_per_grid(conv, None) <= 16
