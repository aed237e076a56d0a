"""`lightning-obq`: one-line errors for bad input, a reduced default run, `quantize`/`compare` on real files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from support import most_values_per_grid, read_wandb_history
from torchvision import datasets, models

from lightning_obq.cli import main
from lightning_obq.demo.data import prepare_fashion_mnist

REPO = Path(__file__).resolve().parents[2]


def _error(capsys, argv: list[str]) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    assert err.startswith("lightning-obq: error: ")
    return err


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory) -> Path:
    """A locally saved torchvision resnet18 (weights=None, 2 classes) state_dict."""
    path = tmp_path_factory.mktemp("ckpt") / "resnet18.pt"
    torch.manual_seed(0)
    torch.save(models.resnet18(weights=None, num_classes=2).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def fashion_folder(tmp_path_factory) -> Path:
    """An ImageFolder of real Fashion-MNIST test images saved as PNG: 2 classes x 12 images."""
    root = prepare_fashion_mnist(tmp_path_factory.mktemp("fm"), download=False)
    test = datasets.FashionMNIST(str(root), train=False, download=False)
    folder = tmp_path_factory.mktemp("images")
    for label, name in ((0, "tshirt"), (1, "trouser")):
        (folder / name).mkdir()
        idx = (test.targets == label).nonzero().flatten()[:12]
        for i in idx.tolist():
            Image.fromarray(test.data[i].numpy(), mode="L").save(folder / name / f"{i}.png")
    return folder


@pytest.mark.parametrize("command", ["quantize", "compare"])
def test_missing_checkpoint(capsys, tmp_path, command):
    missing = tmp_path / "nope.pt"
    err = _error(capsys, [command, "--model", "resnet18", "--checkpoint", str(missing)])
    assert f"checkpoint {missing} does not exist" in err


@pytest.mark.parametrize("command", ["quantize", "compare"])
def test_unknown_architecture(capsys, command):
    err = _error(capsys, [command, "--model", "resnet_nonexistent"])
    assert "unknown architecture 'resnet_nonexistent'" in err
    err = _error(capsys, [command, "--model", "no_such_package.models:Net"])
    assert "unknown architecture 'no_such_package.models:Net'" in err
    err = _error(capsys, [command, "--model", "lightning_obq.demo.models:NoSuchClass"])
    assert "has no attribute 'NoSuchClass'" in err


@pytest.mark.parametrize("command", ["quantize", "compare"])
def test_checkpoint_that_does_not_fit(capsys, resnet18_file, command):
    err = _error(capsys, [command, "--model", "resnet34", "--checkpoint", str(resnet18_file)])
    assert f"checkpoint {resnet18_file} does not fit resnet34" in err and "missing keys" in err
    err = _error(capsys, [command, "--model", "resnet18", "--num-classes", "10", "--checkpoint", str(resnet18_file)])
    assert "does not fit resnet18" in err and "size mismatch" in err


def test_unreadable_checkpoint_and_bad_options(capsys, tmp_path, resnet18_file):
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint")
    assert "cannot read checkpoint" in _error(capsys, ["quantize", "--model", "resnet18", "--checkpoint", str(junk)])
    err = _error(capsys, ["quantize", "--model", "resnet18", "--num-classes", "2", "--checkpoint", str(resnet18_file),
                          "--data", str(tmp_path / "no_images")])
    assert "no_images does not exist" in err
    assert "--bits: bit widths must be in 2..8" in _error(capsys, ["compare", "--model", "resnet18", "--bits", "4,9"])
    assert "--methods" in _error(capsys, ["compare", "--model", "resnet18", "--methods", "fastobq,magic"])
    assert "--budget must be" in _error(capsys, ["compare", "--model", "resnet18", "--budget", "9"])
    err = _error(capsys, ["quantize", "--model", "resnet18", "--method", "rtn", "--order", "act"])
    assert "--order applies to fastobq and gptq" in err
    err = _error(capsys, ["quantize", "--model", "resnet18", "--method", "obq", "--refine-sweeps", "2"])
    assert "--refine-sweeps applies to fastobq and gptq" in err


def test_console_entry_point_exit_status(tmp_path):
    """``python -m lightning_obq`` (the console script's code) exits non-zero with one line, no traceback."""
    missing = tmp_path / "missing.ckpt"
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_obq", "quantize", "--model", "resnet18", "--checkpoint", str(missing)],
        capture_output=True, text=True, cwd=REPO, timeout=300, env={**os.environ, "WANDB_MODE": "offline"},
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and str(missing) in proc.stderr


@pytest.mark.slow
def test_quantize_local_torchvision_model_on_image_folder(capsys, tmp_path, cache, resnet18_file, fashion_folder):
    from lightning_obq.export.artifact import load_quantized

    out = tmp_path / "resnet18_w4.safetensors"
    report = tmp_path / "report.json"
    code = main(["quantize", "--model", "resnet18", "--num-classes", "2", "--checkpoint", str(resnet18_file),
                 "--data", str(fashion_folder), "--calib-samples", "16", "--batch-size", "8", "--bits", "4",
                 "--skip", "layer3.*", "--skip", "layer4.*", "--output", str(out), "--report", str(report),
                 "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "fastobq (sensi_dyn)" in printed and out.is_file()
    data = json.loads(report.read_text())
    row = data["row"]
    # the BatchNorm decision: in the report table, in the comparison table's BN column and in the JSON
    bn = data["report"]["batchnorm"]
    assert bn["mode"] == "auto" and bn["chosen"] in bn["candidates"] and row["bn"] == bn["chosen"]
    assert f"BatchNorm ({bn['layers']} layers): auto -> {bn['chosen']} (kl_div on 4 held-back samples" in printed
    assert "BN: the BatchNorm statistics each run ended with (bn_mode auto" in printed
    assert row["status"] == "ok" and 0.0 <= row["accuracy"] <= 1.0 and 0.0 <= row["top1_agreement"] <= 1.0
    names = [layer["name"] for layer in data["report"]["layers"]]
    assert "model.conv1" in names and not any(n.startswith(("model.layer3", "model.layer4")) for n in names)
    # the artifact loads into a plain torchvision resnet18; its RGB stem conv1 is on a 4-bit grid per kernel row
    fp_state = torch.load(resnet18_file, weights_only=True)
    fresh = models.resnet18(weights=None, num_classes=2)
    load_quantized(out, fresh)
    w = fresh.conv1.weight.detach()
    assert not torch.equal(w, fp_state["conv1.weight"])
    assert most_values_per_grid(w, 7) <= 16 < most_values_per_grid(w, None)
    assert torch.equal(fresh.layer4[0].conv1.weight, fp_state["layer4.0.conv1.weight"])  # skipped: kept in FP


def test_kernel_row_grid_option_reaches_the_solver(capsys, tmp_path, cache, fashion_folder):
    """mobilenet_v3_small's depthwise convs and RGB stem get one grid per kernel row unless ``--kernel-row-grid
    granularity``: more scales in the size, less error in those layers, the 1x1 convs on their per-channel grid."""
    checkpoint = tmp_path / "mobilenet.pt"
    torch.manual_seed(0)
    torch.save(models.mobilenet_v3_small(weights=None, num_classes=2).state_dict(), checkpoint)
    reports = {}
    for grid in ("row", "granularity"):
        path = tmp_path / f"{grid}.json"
        code = main(["quantize", "--model", "mobilenet_v3_small", "--num-classes", "2", "--checkpoint", str(checkpoint),
                     "--data", str(fashion_folder), "--image-size", "32", "--calib-samples", "16", "--batch-size", "8",
                     "--bits", "4", "--kernel-row-grid", grid, "--report", str(path), "--no-progress"])
        assert code == 0, capsys.readouterr().err
        reports[grid] = json.loads(path.read_text())["report"]
    assert reports["row"]["config"]["kernel_row_grid"] == "row"
    assert reports["granularity"]["config"]["kernel_row_grid"] == "granularity"
    assert reports["row"]["quant_size_mb"] > reports["granularity"]["quant_size_mb"]
    rows = {"model.features.0.0", "model.features.1.block.0.0", "model.features.4.block.1.0"}  # stem, depthwise
    errors = {g: {la["name"]: la["error"] for la in r["layers"]} for g, r in reports.items()}
    assert rows <= set(errors["row"])
    assert all(errors["row"][n] < errors["granularity"][n] for n in rows)
    group_sizes = {g: {la["name"]: la["group_size"] for la in r["layers"]} for g, r in reports.items()}
    assert [group_sizes["row"][n] for n in sorted(rows)] == [3, 3, 5]  # one scale per kernel row: 3x3, 3x3, 5x5
    assert group_sizes["row"]["model.features.1.block.2.0"] is None
    assert set(group_sizes["granularity"].values()) == {None}


@pytest.fixture()
def keep_threads():
    """`--threads` sets torch's thread count for the process: restore it for the other tests."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_default_run_reduced(capsys, tmp_path, cache, keep_threads):
    out = tmp_path / "demo"
    common = ["--epochs", "1", "--train-samples", "1024", "--width", "8", "--val-samples", "256", "--calib-samples",
              "128", "--batch-size", "128", "--no-progress", "--threads", "1"]
    assert main([*common, "--sweep-bits", "2", "--output", str(out)]) == 0
    assert torch.get_num_threads() == 1
    printed = capsys.readouterr().out
    for label in ("FP32", "fastobq (sensi_dyn)", "gptq (act)", "rtn", "obq"):
        assert label in printed
    data = json.loads((out / "report.json").read_text())
    rows = {(r["method"], r["bits"]): r for r in data["rows"]}
    assert set(rows) == {("fastobq", 4), ("gptq", 4), ("rtn", 4), ("obq", 4), ("fastobq", 2), ("gptq", 2),
                         ("rtn", 2)}
    for r in rows.values():
        assert r["status"] == "ok" and r["samples"] == 128 and r["seconds"] > 0 and r["peak_rss_mb"] > 0
        assert r["bn"] in ("keep", "correct", "reestimate") and r["batchnorm"]["mode"] == "auto"
    assert data["train"]["cached"] is False and data["command"].startswith("lightning-obq --epochs 1")
    assert (out / "comparison.png").stat().st_size > 10_000
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    history = read_wandb_history(runs[0], require="comparison/nrows")  # waits for wandb-core's last flush
    assert any(row.get("comparison/nrows") == len(rows) for row in history)
    assert any(k.endswith("/top1_agreement") for row in history for k in row)
    # second run: the trained model comes from the cache; OBQ over a tiny time budget is marked skipped
    argv = [*common, "--sweep-bits", "", "--output", str(tmp_path / "demo2"), "--no-wandb",
            "--obq-max-seconds", "0.001"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "reused cached model" in printed and "skipped (est." in printed
    again = json.loads((tmp_path / "demo2" / "report.json").read_text())
    rows2 = {(r["method"], r["bits"]): r for r in again["rows"]}
    assert rows2[("obq", 4)]["status"] == "skipped"
    assert set(rows2) == {("fastobq", 4), ("gptq", 4), ("rtn", 4), ("obq", 4)}
    for key in (("fastobq", 4), ("gptq", 4), ("rtn", 4)):  # deterministic rerun
        assert rows2[key]["accuracy"] == rows[key]["accuracy"]
        assert rows2[key]["error"] == pytest.approx(rows[key]["error"], rel=1e-6)


def _compare_small_cnn(tmp_path, *options: str, arch: str = "smallresnet") -> list[dict]:
    """Run `compare` on an untrained width-4 demo network checkpoint with the built-in data; its rows."""
    from lightning_obq.demo.models import ImageClassifier

    torch.manual_seed(0)
    ckpt = tmp_path / "small.pt"
    torch.save(ImageClassifier(width=4, arch=arch).model.state_dict(), ckpt)
    out = tmp_path / "cmp"
    code = main(["compare", "--model", arch, "--init-args", '{"width": 4}', "--checkpoint", str(ckpt),
                 *options, "--calib-samples", "64", "--eval-samples", "128",
                 "--output-dir", str(out), "--no-wandb", "--no-progress"])
    assert code == 0
    assert (out / "comparison.png").is_file()
    return json.loads((out / "report.json").read_text())["rows"]


@pytest.mark.slow
def test_compare_builtin_data(capsys, tmp_path, cache):
    rows = _compare_small_cnn(tmp_path, "--bits", "3,8", "--methods", "fastobq,rtn")
    assert [(r["method"], r["bits"]) for r in rows] == [("fastobq", 3), ("rtn", 3), ("fastobq", 8), ("rtn", 8)]
    err = {(r["method"], r["bits"]): r["error"] for r in rows}
    assert err[("fastobq", 3)] < err[("rtn", 3)] and err[("fastobq", 8)] < err[("fastobq", 3)]


def test_compare_a_vision_transformer_by_its_demo_name(tmp_path, cache):
    """``--model smallvit``: the demo's VisionTransformer, attention projections included in every run."""
    rows = _compare_small_cnn(tmp_path, "--bits", "4", "--methods", "fastobq,rtn", arch="smallvit")
    err = {(r["method"], r["bits"]): r["error"] for r in rows}
    assert err[("fastobq", 4)] < err[("rtn", 4)]
    report = json.loads((tmp_path / "cmp" / "report.json").read_text())
    assert "in_proj" in json.dumps(report) and "out_proj" in json.dumps(report)


def test_refine_sweeps_reach_the_refining_methods_and_the_table(capsys, tmp_path, cache):
    """``--refine-sweeps`` sets the sweeps of fastobq and gptq in one comparison that also runs rtn; the table
    shows what the stage changed. By default only fastobq refines."""
    rows = _compare_small_cnn(tmp_path, "--bits", "3", "--methods", "fastobq,gptq,rtn", "--refine-sweeps", "2")
    printed = capsys.readouterr().out
    reports = json.loads((tmp_path / "cmp" / "report.json").read_text())["reports"]
    sweeps = {r["method"]: max(s["refine_sweeps"] for s in reports[r["key"]]["layers"]) for r in rows}
    assert 1 <= sweeps["fastobq"] <= 2 and 1 <= sweeps["gptq"] <= 2 and sweeps["rtn"] == 0
    for r in rows:
        if r["method"] != "rtn":
            assert r["refine_seconds"] > 0 and r["error"] < r["solve_error"]
            assert f"{100 * (r['error'] / r['solve_error'] - 1):+.1f}%" in printed
    assert "refined: change of the summed layer error" in printed
    default = _compare_small_cnn(tmp_path, "--bits", "3", "--methods", "fastobq,gptq")
    reports = json.loads((tmp_path / "cmp" / "report.json").read_text())["reports"]
    assert {r["method"]: max(s["refine_sweeps"] for s in reports[r["key"]]["layers"]) for r in default} == {
        "fastobq": 1, "gptq": 0}


@pytest.mark.slow
def test_compare_uniform_vs_mixed_at_equal_size(capsys, tmp_path, cache):
    rows = _compare_small_cnn(tmp_path, "--bits", "3", "--methods", "fastobq", "--budget", "3.0")
    assert [(r["method"], r["bits"], r["budget"]) for r in rows] == [("fastobq", 3, None), ("fastobq", 3, 3.0)]
    uniform, mixed = rows
    assert mixed["average_bits"] <= 3.0 and uniform["average_bits"] == 3.0
    assert "mixed 3b" in capsys.readouterr().out
