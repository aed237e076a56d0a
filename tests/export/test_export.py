"""Low-bit artifacts: bit packing, safetensors save/load (dequantized and packed), ONNX in onnxruntime."""

from __future__ import annotations

import copy
import json
import pickle
import struct
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from lightning_obq import QuantConfig, QuantReport, quantize_model
from lightning_obq.export.artifact import (
    FORMAT_NAME,
    load_quantized,
    resident_weight_bytes,
    save_quantized,
)
from lightning_obq.export.modules import PackedWeightMixin
from lightning_obq.export.packing import pack_codes, packed_size, unpack_codes

# --------------------------------------------------------------------------------------------- models


def cnn(seed: int = 0, width: int = 16) -> nn.Module:
    """Plain, grouped, depthwise and 1x1 convs, BatchNorm, and a Linear head with an odd input size."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1, groups=4), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1, groups=width), nn.ReLU(),
        nn.Conv2d(width, 24, 1, bias=False), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 10),
    ).eval()


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(37, 64), nn.GELU(), nn.Linear(64, 29, bias=False), nn.Tanh(),
                         nn.Linear(29, 5)).eval()


class LitNet(L.LightningModule):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.net = cnn(seed, width=8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def images(n: int = 32, seed: int = 1, size: int = 10) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def features(n: int = 64, seed: int = 2) -> torch.Tensor:
    return torch.randn(n, 37, generator=torch.Generator().manual_seed(seed))


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


CONFIGS = {
    "w3-channel-fastobq": QuantConfig(bits=3, progress=False),
    "w5-group-gptq": QuantConfig(bits=5, method="gptq", granularity="group", group_size=16, progress=False),
    "w2-symmetric-rtn": QuantConfig(bits=2, method="rtn", symmetric=True, progress=False),
    "w4-tensor": QuantConfig(bits=4, granularity="tensor", range_search="minmax", progress=False),
    "w6-channel": QuantConfig(bits=6, method="gptq", order="act", progress=False),
    "w8-channel": QuantConfig(bits=8, progress=False),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def quantized_cnn(request) -> tuple[nn.Module, QuantReport, QuantConfig]:
    model = cnn()
    config = CONFIGS[request.param]
    report = quantize_model(model, [images()], config)
    return model, report, config


@pytest.fixture(scope="module")
def quantized_mlp() -> tuple[nn.Module, QuantReport]:
    model = mlp()
    report = quantize_model(model, [features()], QuantConfig(bits=3, progress=False))
    return model, report


@pytest.fixture()
def cnn_file(tmp_path: Path, quantized_mlp) -> Path:
    model = cnn()
    report = quantize_model(model, [images()], QuantConfig(bits=4, method="rtn", progress=False))
    return save_quantized(model, tmp_path / "cnn.safetensors", report)


# --------------------------------------------------------------------------------------------- packing


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (13,), (3, 5, 11), (2, 64)])
def test_pack_round_trip_is_exact_and_dense(bits: int, shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(bits * 100 + sum(shape))
    codes = torch.randint(0, 1 << bits, shape, generator=g)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (*shape[:-1], -(-shape[-1] * bits // 8))
    assert torch.equal(unpack_codes(packed, bits, shape[-1]), codes.to(torch.uint8))


def test_pack_layout_is_lsb_first_bit_stream() -> None:
    # 4-bit: first code in the low nibble (ONNX UINT4 layout); 3-bit codes run across byte borders.
    assert pack_codes(torch.tensor([1, 2, 3]), 4).tolist() == [0x21, 0x03]
    assert pack_codes(torch.tensor([5, 6, 7]), 3).tolist() == [5 | 6 << 3 | (7 & 3) << 6, 7 >> 2]
    assert packed_size(1000, 3) == 375


def test_pack_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match=r"\[0, 7\]"):
        pack_codes(torch.tensor([8]), 3)
    with pytest.raises(TypeError, match="integer"):
        pack_codes(torch.tensor([1.0]), 3)
    with pytest.raises(ValueError, match="bits"):
        pack_codes(torch.tensor([1]), 9)
    with pytest.raises(ValueError, match="need 2"):
        unpack_codes(torch.zeros(3, dtype=torch.uint8), 3, 5)


# --------------------------------------------------------------------------------------------- round trips


def test_cnn_round_trip_bitwise(quantized_cnn, tmp_path: Path) -> None:
    model, report, config = quantized_cnn
    x = images(8, seed=5)
    with torch.no_grad():
        ref = model(x)
    path = save_quantized(model, tmp_path / "model.safetensors", report)

    fresh = cnn(seed=123)  # different random weights: equality below cannot come from the init
    load_quantized(path, fresh)
    assert same_state(fresh.state_dict(), model.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(x), ref)

    packed = cnn(seed=321)
    load_quantized(path, packed, keep_packed=True)
    layers = [m for m in packed.modules() if isinstance(m, PackedWeightMixin)]
    assert len(layers) == len(report.results) == 5
    assert all(isinstance(m, nn.Conv2d | nn.Linear) and "weight" not in m._parameters for m in layers)
    with torch.no_grad():
        assert torch.equal(packed(x), ref)
    for name, module in packed.named_modules():
        if isinstance(module, PackedWeightMixin):
            assert torch.equal(module.weight, model.get_submodule(name).weight)
    # Resident weights: codes at `bits` bits plus scales/zero points instead of float32 weights.
    quantized_fp = sum(model.get_submodule(n).weight.numel() * 4 for n in report.results)
    saved = resident_weight_bytes(model) - resident_weight_bytes(packed)
    assert saved > quantized_fp * (1 - config.bits / 32) * (0.55 if config.granularity == "group" else 0.7)


def test_file_layout_and_header(quantized_cnn, tmp_path: Path) -> None:
    model, report, config = quantized_cnn
    path = save_quantized(model, tmp_path / "model.safetensors", report)
    with path.open("rb") as f:  # safetensors: u64 header length, then a JSON header; no pickle anywhere
        n = struct.unpack("<Q", f.read(8))[0]
        raw = json.loads(f.read(n))
    meta = raw["__metadata__"]
    assert meta["format"] == FORMAT_NAME and meta["format_version"] == "1"
    header = json.loads(meta["header"])
    assert header["config"]["bits"] == config.bits and header["library_version"]
    assert set(header["layers"]) == set(report.results)
    for name, layer in header["layers"].items():
        weight = model.get_submodule(name).weight
        assert layer["weight_shape"] == list(weight.shape) and layer["bits"] == config.bits
        assert raw[f"layers/{name}/codes"]["shape"] == [-(-weight.numel() * config.bits // 8)]
        assert raw[f"layers/{name}/zero"]["dtype"] == "U8"
    assert "state/1.running_mean" in raw and "state/0.bias" in raw
    assert "state/0.weight" not in raw  # quantized weights are stored only as codes
    for name, result in report.results.items():
        assert (f"layers/{name}/perm" in raw) == (result.perm is not None)
    assert ("layers/3/perm" in raw) == (config.method in ("fastobq", "gptq"))


def test_linear_model_round_trip(quantized_mlp, tmp_path: Path) -> None:
    model, report = quantized_mlp
    x = features(16, seed=7)
    path = save_quantized(model, tmp_path / "mlp.safetensors", report)
    fresh, packed = load_quantized(path, mlp(seed=9)), load_quantized(path, mlp(seed=10), keep_packed=True)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x)) and torch.equal(packed(x), model(x))
    assert same_state(fresh.state_dict(), model.state_dict())
    assert resident_weight_bytes(packed) < 0.25 * resident_weight_bytes(model)


def test_lightning_module_round_trip(tmp_path: Path) -> None:
    lit = LitNet()
    report = quantize_model(lit, [images(16)], QuantConfig(bits=4, progress=False))
    path = save_quantized(lit, tmp_path / "lit.safetensors", report)
    other = load_quantized(path, LitNet(seed=4), keep_packed=True)
    x = images(4, seed=3)
    lit.eval(), other.eval()
    with torch.no_grad():
        assert torch.equal(other(x), lit(x))
    assert isinstance(other.net[0], PackedWeightMixin)


@pytest.mark.slow
def test_ultralytics_detector_round_trip(tmp_path: Path) -> None:
    from ultralytics.nn.tasks import DetectionModel

    def build(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return DetectionModel("yolov8n.yaml", nc=10, verbose=False).eval()

    model = build(0)
    config = QuantConfig(bits=4, method="rtn", range_search="minmax", progress=False)
    calib = [torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))]
    report = quantize_model(model, calib, config, forward_fn=lambda m, batch: m(batch))
    assert len(report.results) > 50
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x)[0]
    path = save_quantized(model, tmp_path / "yolo.safetensors", report)
    fresh = load_quantized(path, build(1))
    packed = load_quantized(path, build(2), keep_packed=True)
    assert same_state(fresh.state_dict(), model.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(x)[0], ref)
        assert torch.equal(packed(x)[0], ref)
    assert resident_weight_bytes(packed) < 0.2 * resident_weight_bytes(model)
    assert path.stat().st_size < 0.2 * resident_weight_bytes(model)

    from lightning_obq.export.onnx import export_onnx

    onnx_path = export_onnx(packed, x, tmp_path / "yolo.onnx")  # checked in onnxruntime inside, too
    assert onnx_path.stat().st_size < 0.2 * resident_weight_bytes(model)
    detections = run_onnx(onnx_path, x)
    assert detections.shape == tuple(ref.shape)
    assert np.abs(detections - ref.numpy()).max() <= 1e-4 * np.abs(ref.numpy()).max()


# --------------------------------------------------------------------------------------------- bad input


def assert_load_fails(path: Path, model: nn.Module, match: str, keep_packed: bool = False) -> None:
    """The load raises a clear ValueError and leaves every parameter and buffer as it was."""
    before = state(model)
    with pytest.raises(ValueError, match=match):
        load_quantized(path, model, keep_packed=keep_packed)
    assert same_state(model.state_dict(), before)
    assert not any(isinstance(m, PackedWeightMixin) for m in model.modules())


@pytest.mark.parametrize("keep_packed", [False, True])
def test_truncated_file(cnn_file: Path, tmp_path: Path, keep_packed: bool) -> None:
    data = cnn_file.read_bytes()
    for cut in (len(data) - 1, len(data) // 2, 20):
        bad = tmp_path / f"cut{cut}.safetensors"
        bad.write_bytes(data[:cut])
        assert_load_fails(bad, cnn(seed=1), str(bad), keep_packed)


def test_corrupted_bytes(cnn_file: Path, tmp_path: Path) -> None:
    data = bytearray(cnn_file.read_bytes())
    n = struct.unpack("<Q", data[:8])[0]
    for where, match in ((8 + n + 10, "checksum"), (len(data) - 3, "checksum"), (9, "not a readable safetensors file")):
        bad = tmp_path / f"flip{where}.safetensors"
        corrupted = bytearray(data)
        corrupted[where] ^= 0x5A
        bad.write_bytes(bytes(corrupted))
        assert_load_fails(bad, cnn(seed=1), match)


def test_file_from_another_architecture(cnn_file: Path, quantized_mlp, tmp_path: Path) -> None:
    assert_load_fails(cnn_file, mlp(seed=1), r"does not exist in Sequential|is a .* in the model")
    model, report = quantized_mlp
    mlp_file = save_quantized(model, tmp_path / "mlp.safetensors", report)
    assert_load_fails(mlp_file, cnn(seed=1), r"layer '0' is a Conv2d in the model but a Linear")
    # Same layer names, one extra BatchNorm: the parameters and buffers do not match one to one.
    assert_load_fails(cnn_file, LitNet(seed=1), "does not exist")


def test_shape_mismatch(cnn_file: Path) -> None:
    assert_load_fails(cnn_file, cnn(seed=1, width=8), r"layer '0' has weight shape \(8, 3, 3, 3\)")


def rewrite_metadata(src: Path, dst: Path, edit) -> Path:
    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(meta, tensors)
    save_file(tensors, str(dst), metadata=meta)
    return dst


def test_unknown_format_version_and_foreign_files(cnn_file: Path, tmp_path: Path) -> None:
    future = rewrite_metadata(cnn_file, tmp_path / "v99.safetensors", lambda m, t: m.update(format_version="99"))
    assert_load_fails(future, cnn(seed=1), "unsupported format_version '99'")
    plain = tmp_path / "plain.safetensors"
    save_file(cnn().state_dict(), str(plain))
    assert_load_fails(plain, cnn(seed=1), f"not a {FORMAT_NAME} artifact")

    def bad_header(meta, tensors):
        meta["header"] = meta["header"][:-5]
    assert_load_fails(rewrite_metadata(cnn_file, tmp_path / "json.safetensors", bad_header), cnn(seed=1),
                      "malformed JSON header")

    def wrong_bits(meta, tensors):  # packed buffer size no longer consistent with bits x numel
        header = json.loads(meta["header"])
        header["layers"]["0"]["bits"] = 3
        meta["header"] = json.dumps(header)
    assert_load_fails(rewrite_metadata(cnn_file, tmp_path / "bits.safetensors", wrong_bits), cnn(seed=1),
                      "packed bytes")

    def swapped_tensor(meta, tensors):  # the digest catches a replaced tensor of the right shape
        tensors["state/1.running_mean"] = tensors["state/1.running_mean"] + 1
    assert_load_fails(rewrite_metadata(cnn_file, tmp_path / "swap.safetensors", swapped_tensor), cnn(seed=1),
                      "checksum")
    assert_load_fails(tmp_path / "missing.safetensors", cnn(seed=1), "no such file")


class _Exploit:
    marker: Path

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_loading_never_unpickles(tmp_path: Path) -> None:
    exploit = _Exploit()
    exploit.marker = tmp_path / "executed"
    bad = tmp_path / "evil.safetensors"
    bad.write_bytes(pickle.dumps({"weight": exploit}))
    assert_load_fails(bad, cnn(seed=1), "not a readable safetensors file")
    assert not exploit.marker.exists()


def test_save_rejects_bad_input(quantized_mlp, tmp_path: Path) -> None:
    model, report = quantized_mlp
    with pytest.raises(ValueError, match="report.results is empty"):
        save_quantized(model, tmp_path / "a.safetensors", QuantReport(config=report.config))
    with pytest.raises(TypeError, match="QuantConfig holds no integer codes"):
        save_quantized(model, tmp_path / "a.safetensors", QuantConfig())
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed[0].weight[0, 0] += 1e-3
    with pytest.raises(ValueError, match=r"layer '0' no longer equals its quantized codes"):
        save_quantized(changed, tmp_path / "a.safetensors", report)
    with pytest.raises(ValueError, match="layer '0' does not exist in LitNet"):
        save_quantized(LitNet(), tmp_path / "a.safetensors", report)
    with pytest.raises(ValueError, match=r"codes of shape \(1, 64, 37\) do not fit weight \(16, 3, 3, 3\)"):
        save_quantized(cnn(), tmp_path / "a.safetensors", report)
    assert not list(tmp_path.iterdir())  # nothing written, not even a temporary file


# --------------------------------------------------------------------------------------------- ONNX


def run_onnx(path: Path, x: torch.Tensor, exact: bool = True) -> np.ndarray:
    from lightning_obq.export.onnx import ort_session

    session = ort_session(path, exact)
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def weight_initializers(path: Path) -> dict[str, str]:
    import onnx

    graph = onnx.load(str(path)).graph
    return {i.name: onnx.TensorProto.DataType.Name(i.data_type) for i in graph.initializer}


@pytest.mark.parametrize("name", ["w3-channel-fastobq", "w5-group-gptq", "w8-channel"])
def test_onnx_matches_torch(name: str, tmp_path: Path) -> None:
    from lightning_obq.export.onnx import export_onnx

    model = cnn()
    config = CONFIGS[name]
    report = quantize_model(model, [images()], config)
    x = images(4, seed=11)
    path = export_onnx(model, x, tmp_path / "m.onnx", report)
    inits = weight_initializers(path)
    storage = "UINT4" if config.bits <= 4 else "UINT8"
    for layer in report.results:
        assert f"{layer}.weight" not in inits  # the float weight is gone
        assert inits[f"{layer}.weight_quantized"] == storage
    assert inits["1.weight"] == "FLOAT"  # BatchNorm is kept as is (not folded into the conv)
    with torch.no_grad():
        ref = model(x).numpy()
    np.testing.assert_allclose(run_onnx(path, x), ref, rtol=1e-4, atol=1e-5)

    uint8 = export_onnx(model, x, tmp_path / "u8.onnx", report, weight_type="uint8")
    assert set(weight_initializers(uint8)[f"{n}.weight_quantized"] for n in report.results) == {"UINT8"}
    np.testing.assert_allclose(run_onnx(uint8, x), ref, rtol=1e-4, atol=1e-5)
    if config.bits <= 4:
        assert path.stat().st_size < uint8.stat().st_size


@pytest.mark.parametrize("weight_type", ["uint4", "uint8"])
def test_onnx_dequantized_weights_are_bitwise_equal(weight_type: str, tmp_path: Path) -> None:
    """The weights onnxruntime computes from the integer initializers are exactly the torch weights."""
    import onnx
    import onnxruntime as ort

    from lightning_obq.export.onnx import export_onnx

    for model, data, config in (
        (mlp(), features(), QuantConfig(bits=3, progress=False)),  # incl. a MatMul fed with W^T
        (cnn(), images(), QuantConfig(bits=4, granularity="group", group_size=8, progress=False)),
    ):
        report = quantize_model(model, [data], config)
        path = export_onnx(model, data[:2], tmp_path / "m.onnx", report, weight_type=weight_type)
        graph = onnx.load(str(path))
        dq = [n for n in graph.graph.node if n.op_type in ("DequantizeLinear", "Reshape") and
              not n.output[0].endswith("_2d")]
        assert len(dq) == len(report.results)
        for node in dq:
            graph.graph.output.append(onnx.helper.make_tensor_value_info(node.output[0], onnx.TensorProto.FLOAT,
                                                                         None))
        session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
        outs = dict(zip([o.name for o in session.get_outputs()],
                        session.run(None, {"input": data[:2].numpy()}), strict=True))
        weights = {n: model.get_submodule(n).weight.detach().numpy() for n in report.results}
        matched = set()
        for node in dq:
            got = outs[node.output[0]]
            name = next(n for n, w in weights.items() if n not in matched and (
                np.array_equal(got, w) or np.array_equal(got, w.T)))
            matched.add(name)
        assert matched == set(weights)


def test_onnx_from_packed_model_with_dynamic_batch(quantized_mlp, tmp_path: Path) -> None:
    from lightning_obq.export.onnx import export_onnx

    model, report = quantized_mlp
    packed = load_quantized(save_quantized(model, tmp_path / "m.safetensors", report), mlp(seed=3),
                            keep_packed=True)
    path = export_onnx(packed, features(2), tmp_path / "m.onnx", dynamic_batch=True)
    assert isinstance(packed[0], PackedWeightMixin)  # the export worked on a copy
    x = features(9, seed=4)
    with torch.no_grad():
        ref = model(x).numpy()
    np.testing.assert_allclose(run_onnx(path, x), ref, rtol=1e-4, atol=1e-5)
    # onnxruntime's default session fuses DequantizeLinear+MatMul into MatMulNBits with int8 activations.
    np.testing.assert_allclose(run_onnx(path, x, exact=False), ref, rtol=0.05, atol=5e-3)


def test_onnx_check_catches_a_wrong_model(quantized_mlp, tmp_path: Path) -> None:
    from lightning_obq.export.onnx import check_onnx, export_onnx

    model, report = quantized_mlp
    x = features(3)
    path = export_onnx(model, x, tmp_path / "m.onnx", report)
    with torch.no_grad():
        ref = model(x).numpy()
    assert check_onnx(path, [x], [ref]) < 1e-5
    wrong = ref.copy()
    wrong[0, 0] += 0.01
    with pytest.raises(ValueError, match="output 0 differs from torch"):
        check_onnx(path, [x], [wrong])


def test_onnx_bad_input(quantized_mlp, tmp_path: Path) -> None:
    from lightning_obq.export.onnx import export_onnx

    model, report = quantized_mlp
    with pytest.raises(ValueError, match="no quantized layer"):
        export_onnx(mlp(), features(2), tmp_path / "a.onnx")
    with pytest.raises(ValueError, match="uint4' needs opset >= 21"):
        export_onnx(model, features(2), tmp_path / "a.onnx", report, opset=17, weight_type="uint4")
    grouped = cnn()
    rep = quantize_model(grouped, [images()], CONFIGS["w5-group-gptq"])
    with pytest.raises(ValueError, match="group-wise scales, which need blocked"):
        export_onnx(grouped, images(2), tmp_path / "b.onnx", rep, opset=17)
    with pytest.raises(ValueError, match="weight_type"):
        export_onnx(model, features(2), tmp_path / "a.onnx", report, weight_type="int3")
