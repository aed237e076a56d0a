"""Ultralytics YOLO support, end to end on a real (tiny) detector trained here on real images.

A reduced YOLOv8 (width 1/8) is trained once per session on the Fashion-MNIST detection set and cached
in a temporary folder; every test quantizes copies of it. Nothing is mocked: real training, real
``YOLO.val``, real checkpoints, real W&B offline runs.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

os.environ.setdefault("YOLO_OFFLINE", "1")  # no network checks; set before Ultralytics is imported
os.environ.setdefault("WANDB_MODE", "offline")
pytest.importorskip("ultralytics")

from ultralytics import YOLO  # noqa: E402

from lightning_obq import QuantConfig  # noqa: E402
from lightning_obq.cli.yolo import add_yolo_subcommand  # noqa: E402
from lightning_obq.demo.detection_data import CLASS_NAMES, build_detection_dataset  # noqa: E402
from lightning_obq.demo.detector import FINISHED, finished_run, train_detector  # noqa: E402
from lightning_obq.integrations.ultralytics import (  # noqa: E402
    DFL_PATTERN,
    load_packed_yolo,
    load_yolo,
    obq_callback,
    quantize_yolo,
    read_recipe,
    save_packed_yolo,
    save_quantized_yolo,
)

IMGSZ = 128
TINY_YAML = """\
# YOLOv8n's layout (width 1/4, depth 1/3), trained small (128 px, 240 images) once per test session
nc: 10
depth_multiple: 0.33
width_multiple: 0.25
backbone:
  - [-1, 1, Conv, [64, 3, 2]]
  - [-1, 1, Conv, [128, 3, 2]]
  - [-1, 3, C2f, [128, True]]
  - [-1, 1, Conv, [256, 3, 2]]
  - [-1, 6, C2f, [256, True]]
  - [-1, 1, Conv, [512, 3, 2]]
  - [-1, 6, C2f, [512, True]]
  - [-1, 1, Conv, [1024, 3, 2]]
  - [-1, 3, C2f, [1024, True]]
  - [-1, 1, SPPF, [1024, 5]]
head:
  - [-1, 1, nn.Upsample, [None, 2, "nearest"]]
  - [[-1, 6], 1, Concat, [1]]
  - [-1, 3, C2f, [512]]
  - [-1, 1, nn.Upsample, [None, 2, "nearest"]]
  - [[-1, 4], 1, Concat, [1]]
  - [-1, 3, C2f, [256]]
  - [-1, 1, Conv, [256, 3, 2]]
  - [[-1, 12], 1, Concat, [1]]
  - [-1, 3, C2f, [512]]
  - [-1, 1, Conv, [512, 3, 2]]
  - [[-1, 9], 1, Concat, [1]]
  - [-1, 3, C2f, [1024]]
  - [[15, 18, 21], 1, Detect, [nc]]
"""


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    """A fresh temporary folder; ``$LIGHTNING_OBQ_TEST_CACHE`` keeps the data and trained weights between sessions."""
    work = tmp_path_factory.mktemp("yolo")
    keep = os.environ.get("LIGHTNING_OBQ_TEST_CACHE")
    if keep:
        for name in ("data", "runs"):
            (Path(keep) / "yolo" / name).mkdir(parents=True, exist_ok=True)
            (work / name).symlink_to(Path(keep) / "yolo" / name)
    return work


@pytest.fixture(scope="session")
def det_data(workdir) -> Path:
    return build_detection_dataset(workdir / "data", train_images=240, val_images=60, canvas=(96, 128),
                                   objects=(1, 3), item_size=(36, 72), seed=0)


@pytest.fixture(scope="session")
def tiny_yaml(workdir) -> Path:
    path = workdir / "yolov8-tiny.yaml"
    path.write_text(TINY_YAML)
    return path


@pytest.fixture(scope="session")
def tiny_weights(workdir, det_data, tiny_yaml) -> Path:
    """The tiny detector, trained once per session (cached by `train_detector`)."""
    return train_detector(tiny_yaml, det_data, cache=workdir / "runs", epochs=25, imgsz=IMGSZ, batch=16)


@pytest.fixture(scope="session")
def w8(tiny_weights, det_data, workdir):
    """The tiny detector at W8 (FastOBQ), its report, and W&B logging on."""
    return quantize_yolo(str(tiny_weights), data=det_data, bits=8, imgsz=IMGSZ, calib_images=64, batch=16,
                         wandb=True, wandb_dir=workdir / "wandb", progress=False)


def _conv_names(model: nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def test_detection_set_is_yolo_format_and_cached(det_data):
    root = det_data.parent
    images = sorted((root / "images" / "train").glob("*.png"))
    labels = sorted((root / "labels" / "train").glob("*.txt"))
    assert len(images) == len(labels) == 240
    assert len(list((root / "images" / "val").glob("*.png"))) == 60
    rows = [line.split() for f in labels[:50] for line in f.read_text().splitlines()]
    assert rows and all(len(r) == 5 and 0 <= int(r[0]) < len(CLASS_NAMES) for r in rows)
    assert all(0 < float(v) <= 1 for r in rows for v in r[1:])
    assert "Ankle boot" in det_data.read_text()
    before = images[0].stat().st_mtime_ns
    again = build_detection_dataset(root.parent, train_images=240, val_images=60, canvas=(96, 128),
                                    objects=(1, 3), item_size=(36, 72), seed=0)
    assert again == det_data and images[0].stat().st_mtime_ns == before  # reused, not rewritten


def test_detector_run_is_reused_only_when_its_training_finished(tiny_yaml, det_data, tmp_path):
    first = train_detector(tiny_yaml, det_data, cache=tmp_path, epochs=1, imgsz=IMGSZ, batch=16)
    run = first.parent.parent
    assert finished_run(run) and (run / FINISHED).is_file()
    stamp = first.stat().st_mtime_ns
    assert train_detector(tiny_yaml, det_data, cache=tmp_path, epochs=1, imgsz=IMGSZ, batch=16) == first
    assert first.stat().st_mtime_ns == stamp  # reused
    (run / FINISHED).unlink()  # what a run cut short leaves: Ultralytics' best.pt without the marker
    assert not finished_run(run)
    again = train_detector(tiny_yaml, det_data, cache=tmp_path, epochs=1, imgsz=IMGSZ, batch=16)
    assert again == first and finished_run(run) and first.stat().st_mtime_ns != stamp  # trained again


@pytest.mark.slow
def test_w8_keeps_map50_within_002(w8, tiny_weights):
    yolo, report = w8
    m = report.metrics
    assert m["fp/mAP50"] > 0.2, f"the tiny detector did not learn enough for a meaningful test: {m}"
    assert abs(m["quant/mAP50"] - m["fp/mAP50"]) <= 0.02, m
    assert abs(m["delta/mAP50-95"]) <= 0.02, m
    # every Conv2d of backbone, neck and head except the fixed DFL conv
    convs = _conv_names(yolo.model)
    dfl = {n for n in convs if n.endswith(".dfl.conv")}
    assert len(dfl) == 1 and DFL_PATTERN in report.config["exclude"]
    assert {s.name for s in report.layers} == convs - dfl
    assert any(n.startswith("model.0.") for n in convs - dfl) and any(n.startswith("model.22.") for n in convs)
    # the returned model is unfused (BatchNorm kept, re-estimated) and its weights sit on the grid
    assert not yolo.model.is_fused()
    layer = report.layers[0].name
    conv = dict(yolo.model.named_modules())[layer]
    assert torch.equal(conv.weight, report.results[layer].weight.reshape(conv.weight.shape))
    # the FP checkpoint is untouched
    fp_conv = dict(YOLO(str(tiny_weights)).model.named_modules())[layer]
    assert not torch.equal(fp_conv.weight, conv.weight)


@pytest.mark.slow
def test_w8_logged_to_wandb_offline(w8, workdir):
    runs = list((workdir / "wandb").rglob("offline-run-*"))
    assert runs, "no offline W&B run was written"
    assert any(f.suffix == ".wandb" for f in runs[0].iterdir())


@pytest.mark.slow
def test_w6_reports_both_and_saved_model_reloads_with_same_boxes(tiny_weights, det_data, workdir):
    yolo, report = quantize_yolo(str(tiny_weights), data=det_data, bits=6, imgsz=IMGSZ, calib_images=64,
                                 progress=False)
    for key in ("fp/mAP50-95", "fp/mAP50", "quant/mAP50-95", "quant/mAP50"):
        assert 0.0 <= report.metrics[key] <= 1.0
    assert report.metrics["quant/mAP50"] > 0.5 * report.metrics["fp/mAP50"], report.metrics
    assert "quant/mAP50" in report.table()

    path = save_quantized_yolo(yolo, workdir / "tiny-w6.pt", report)
    recipe = read_recipe(path)
    assert recipe["config"]["bits"] == 6 and recipe["config"]["method"] == "fastobq"
    assert recipe["metrics"]["quant/mAP50"] == pytest.approx(report.metrics["quant/mAP50"])
    assert set(recipe["layers"]) == {s.name for s in report.layers}

    reloaded = YOLO(str(path))
    state, saved = yolo.model.state_dict(), reloaded.model.state_dict()
    assert state.keys() == saved.keys() and all(torch.equal(state[k], saved[k]) for k in state)
    images = sorted(str(p) for p in (det_data.parent / "images" / "val").glob("*.png"))[:6]
    ours = yolo.predict(images, imgsz=IMGSZ, verbose=False)
    theirs = reloaded.predict(images, imgsz=IMGSZ, verbose=False)
    assert sum(len(r.boxes) for r in ours) > 0
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a.boxes.cls, b.boxes.cls)
        assert torch.allclose(a.boxes.xyxy, b.boxes.xyxy, atol=1e-4)
        assert torch.allclose(a.boxes.conf, b.boxes.conf, atol=1e-5)
    # the packed low-bit artifact (safetensors, no pickle) loads into the FP architecture and predicts the same
    packed = save_packed_yolo(yolo, workdir / "tiny-w6.safetensors", report)
    unpacked = load_packed_yolo(packed, str(tiny_weights))
    assert all(torch.equal(state[k], v) for k, v in unpacked.model.state_dict().items())
    for a, b in zip(ours, unpacked.predict(images, imgsz=IMGSZ, verbose=False), strict=True):
        assert torch.equal(a.boxes.cls, b.boxes.cls) and torch.allclose(a.boxes.xyxy, b.boxes.xyxy, atol=1e-4)
    # the quantized model still fuses (BatchNorm folded into the quantized convs) and predicts the same
    yolo.fuse()
    assert yolo.model.is_fused()
    fused = yolo.predict(images, imgsz=IMGSZ, verbose=False)
    for a, b in zip(ours, fused, strict=True):
        assert torch.equal(a.boxes.cls, b.boxes.cls)
        assert torch.allclose(a.boxes.xyxy, b.boxes.xyxy, atol=1e-3)


def test_include_exclude_and_dfl(tiny_yaml, det_data):
    yolo = YOLO(str(tiny_yaml))  # untrained: layer selection needs no training
    before = {k: v.clone() for k, v in yolo.model.state_dict().items()}
    yolo, report = quantize_yolo(yolo, data=det_data, bits=4, method="rtn", imgsz=IMGSZ,
                                 calib_images=8, include=("model.22.*",), exclude=("model.22.cv3.*",),
                                 evaluate=False, progress=False)
    names = {s.name for s in report.layers}
    assert names and all(n.startswith("model.22.cv2.") for n in names)
    assert report.metrics == {}
    after = {k: v.clone() for k, v in yolo.model.state_dict().items()}
    assert torch.equal(before["model.0.conv.weight"], after["model.0.conv.weight"])  # outside include: untouched
    assert not torch.equal(before["model.22.cv2.0.0.conv.weight"], after["model.22.cv2.0.0.conv.weight"])
    # BatchNorm: the default measures every candidate on held-back images (output MSE: a detector's
    # outputs are not class scores); keep leaves the trained statistics; re-estimation on request
    bn = report.batchnorm
    assert bn["mode"] == "auto" and bn["metric"] == "output_mse" and set(bn["candidates"]) == {"keep", "correct",
                                                                                                  "reestimate"}
    assert bn["candidates"][bn["chosen"]]["output_mse"] <= bn["candidates"]["keep"]["output_mse"]
    kept = YOLO(str(tiny_yaml))
    kept.model.load_state_dict(before)
    kept, _ = quantize_yolo(kept, data=det_data, bits=4, method="rtn", imgsz=IMGSZ, calib_images=8,
                            include=("model.22.*",), bn_mode="keep", evaluate=False, progress=False)
    assert torch.equal(before["model.22.cv2.0.0.bn.running_mean"],
                       kept.model.state_dict()["model.22.cv2.0.0.bn.running_mean"])
    _, reest = quantize_yolo(yolo, data=det_data, method="rtn", imgsz=IMGSZ, calib_images=8,
                             include=("model.22.*",), reestimate_bn=True, evaluate=False, progress=False)
    assert reest.bn_seconds > 0
    assert not torch.equal(after["model.22.cv2.0.0.bn.running_mean"],
                           yolo.model.state_dict()["model.22.cv2.0.0.bn.running_mean"])
    _, with_dfl = quantize_yolo(str(tiny_yaml), data=det_data, method="rtn", imgsz=IMGSZ, calib_images=8,
                                include=("*.dfl.*",), quantize_dfl=True, evaluate=False, progress=False)
    assert [s.name for s in with_dfl.layers] == ["model.22.dfl.conv"]
    with pytest.raises(ValueError, match="no layer to quantize"):  # DFL only, but excluded by default
        quantize_yolo(str(tiny_yaml), data=det_data, method="rtn", imgsz=IMGSZ, calib_images=8,
                      include=("*.dfl.*",), evaluate=False, progress=False)


def test_config_object_and_bad_fields(tiny_yaml, det_data):
    config = QuantConfig(bits=5, method="rtn", range_search="minmax", progress=False)
    yolo, report = quantize_yolo(str(tiny_yaml), data=det_data, config=config, imgsz=IMGSZ, calib_images=8,
                                 evaluate=False)
    assert report.config["bits"] == 5 and report.config["range_search"] == "minmax" and report.samples == 8
    assert DFL_PATTERN in report.config["exclude"]
    with pytest.raises(ValueError, match="bits"):
        quantize_yolo(str(tiny_yaml), data=det_data, bits=12, imgsz=IMGSZ, evaluate=False)
    with pytest.raises(TypeError, match="either config"):
        quantize_yolo(str(tiny_yaml), data=det_data, config=config, damp=0.2, evaluate=False)


def test_bad_model_inputs(tiny_yaml, det_data, tmp_path):
    torchvision = pytest.importorskip("torchvision")
    with pytest.raises(TypeError, match="ultralytics YOLO object.*ResNet.*plain torch module"):
        quantize_yolo(torchvision.models.resnet18(weights=None), data=det_data)
    with pytest.raises(ValueError, match="'classify' model"):
        quantize_yolo(YOLO("yolov8n-cls.yaml"), data=det_data)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        quantize_yolo(str(tmp_path / "missing" / "best.pt"), data=det_data)
    with pytest.raises(TypeError, match="ultralytics YOLO object"):
        load_yolo(42)


def test_bad_data_inputs(tiny_yaml, det_data, tmp_path):
    yolo = YOLO(str(tiny_yaml))
    with pytest.raises(FileNotFoundError, match="data.*missing.yaml.*does not exist"):
        quantize_yolo(yolo, data=tmp_path / "missing.yaml")
    empty = tmp_path / "empty"
    (empty / "images" / "train").mkdir(parents=True)
    (empty / "images" / "val").mkdir(parents=True)
    (empty / "data.yaml").write_text(f"path: {empty}\ntrain: images/train\nval: images/val\nnames:\n  0: a\n")
    with pytest.raises(ValueError, match="'train' image folder .*holds no image"):
        quantize_yolo(yolo, data=empty / "data.yaml", evaluate=False)
    image = next((det_data.parent / "images" / "train").glob("*.png"))
    (empty / "images" / "train" / image.name).write_bytes(image.read_bytes())
    with pytest.raises(ValueError, match="'val' image folder .*holds no image"):
        quantize_yolo(yolo, data=empty / "data.yaml")
    with pytest.raises(ValueError, match="calib_images"):
        quantize_yolo(yolo, data=det_data, calib_images=0, evaluate=False)


def test_failed_quantization_leaves_model_untouched(tiny_yaml, det_data):
    yolo = YOLO(str(tiny_yaml))
    before = {k: v.clone() for k, v in yolo.model.state_dict().items()}
    with pytest.raises(ValueError, match="no layer to quantize"):
        quantize_yolo(yolo, data=det_data, include=("no.such.layer",), imgsz=IMGSZ, evaluate=False)
    after = yolo.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.slow
def test_callback_after_real_training(tiny_yaml, det_data, workdir):
    yolo = YOLO(str(tiny_yaml))
    callback = obq_callback(bits=8, calib_images=8)
    yolo.add_callback("on_train_end", callback)
    yolo.train(data=str(det_data), epochs=1, imgsz=64, batch=16, device="cpu", amp=False, plots=False, workers=0,
               project=str(workdir / "cb-runs"), name="run", exist_ok=True, verbose=False)
    assert callback.report is not None and callback.path is not None and callback.path.is_file()
    assert callback.path.parent == Path(yolo.trainer.best).parent
    assert {"fp/mAP50", "quant/mAP50", "fp/mAP50-95", "quant/mAP50-95"} <= set(callback.report.metrics)
    assert callback.report.config["bits"] == 8 and len(callback.report.layers) > 50
    reloaded = YOLO(str(callback.path))
    assert read_recipe(callback.path)["config"]["bits"] == 8
    reloaded.predict(str(next((det_data.parent / "images" / "val").glob("*.png"))), imgsz=64, verbose=False)
    with pytest.raises(ValueError, match="bits"):
        obq_callback(bits=1)


def test_cli_subcommand(tiny_yaml, det_data, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="lightning-obq")
    add_yolo_subcommand(parser.add_subparsers(dest="command"))
    out = tmp_path / "cli.pt"
    args = parser.parse_args(["yolo", str(tiny_yaml), "--data", str(det_data), "--bits", "4", "--method", "rtn",
                              "--imgsz", str(IMGSZ), "--calib-images", "8", "--no-eval", "-o", str(out),
                              "--report", str(tmp_path / "r.json")])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "method=rtn, bits=4" in printed and str(out) in printed
    assert read_recipe(out)["config"]["bits"] == 4 and (tmp_path / "r.json").is_file()


def test_import_without_ultralytics():
    """Without Ultralytics the integration fails at its import, with an ImportError naming the extra."""
    code = (
        "import sys; sys.modules['ultralytics'] = None\n"
        "import lightning_obq\n"
        "try:\n    import lightning_obq.integrations.ultralytics\nexcept ImportError as e:\n"
        "    print('IMPORT-ERROR', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "IMPORT-ERROR" in out.stdout and "pip install 'lightning-obq[ultralytics]'" in out.stdout
