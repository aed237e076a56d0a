"""nn.MultiheadAttention's projections are quantized: the right inputs, the model's own parameters, every path."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from lightning_obq import QuantConfig, capture_hessians, load_quantized, quantize_model, save_quantized
from lightning_obq.export.artifact import resident_weight_bytes
from lightning_obq.export.modules import PackedMixin
from lightning_obq.export.onnx import export_onnx
from lightning_obq.model.attention import find_projection
from lightning_obq.model.capture import find_layers
from lightning_obq.model.mixed import output_gains

E, HEADS = 32, 4


def encoder(batch_first: bool = True) -> nn.TransformerEncoder:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, HEADS, 64, dropout=0.0, batch_first=batch_first)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()


def tokens(batch_first: bool = True, batches: int = 4) -> list[torch.Tensor]:
    torch.manual_seed(1)
    return [torch.randn(8, 10, E) if batch_first else torch.randn(10, 8, E) for _ in range(batches)]


class MaskedAttention(nn.Module):
    """One attention module called with a causal mask, as a decoder-only block calls it; with ``position``, the way
    DETR calls it: the query and key carry a positional embedding, the value does not."""

    def __init__(self, position: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.attn = nn.MultiheadAttention(E, HEADS, batch_first=True)
        self.position = nn.Parameter(torch.randn(10, E)) if position else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = torch.triu(torch.full((x.shape[1], x.shape[1]), -math.inf), 1)
        q = x if self.position is None else x + self.position
        return self.attn(q, q, x, attn_mask=mask, need_weights=False)[0]


def heads_by_hand(model: MaskedAttention, x: torch.Tensor) -> torch.Tensor:
    """The input of the output projection, written out: per-head softmax(q k^T / sqrt(d) + causal mask) v."""
    attn = model.attn
    b, n, _ = x.shape
    d = E // HEADS
    positioned = x if model.position is None else x + model.position
    w, bias = attn.in_proj_weight.chunk(3), attn.in_proj_bias.chunk(3)
    q, k, v = (t @ w[i].T + bias[i] for i, t in enumerate((positioned, positioned, x)))
    q, k, v = (t.reshape(b, n, HEADS, d).transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-2, -1) / math.sqrt(d) + torch.triu(torch.full((n, n), -math.inf), 1)
    return (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, E)


def hessian_by_hand(inputs: list[torch.Tensor]) -> torch.Tensor:
    x = torch.cat([t.reshape(-1, E) for t in inputs]).double()
    return 2 * x.T @ x / x.shape[0]


def is_hessian_of(got: torch.Tensor, inputs: list[torch.Tensor]) -> bool:
    """Whether the captured ``[E, E]`` Hessian ``got`` is that of ``inputs`` (float32 accumulation)."""
    want = hessian_by_hand(inputs)
    return torch.allclose(got.double(), want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


@pytest.mark.parametrize("position", [False, True], ids=["self-attention", "detr-style"])
def test_projection_hessians_are_those_of_the_projection_inputs(position: bool) -> None:
    model = MaskedAttention(position).eval()
    data = tokens()
    layers = find_layers(model, QuantConfig())
    assert list(layers) == ["attn.in_proj", "attn.out_proj"]
    hessians = capture_hessians(model, data, QuantConfig(progress=False))
    with torch.no_grad():
        heads = [heads_by_hand(model, x) for x in data]
        positioned = [x if model.position is None else x + model.position for x in data]
    expected = {"attn.in_proj": [positioned, positioned, data], "attn.out_proj": [heads]}
    for name, inputs in expected.items():  # one Hessian per row block: query, key, value rows; the output rows
        got = hessians[name].hessian
        assert got.shape[0] == len(inputs), name
        for g, block in enumerate(inputs):
            assert is_hessian_of(got[g], block), (name, g)


def test_a_padding_mask_batch_counts_only_its_real_positions() -> None:
    """With a padding mask torch's encoder runs inference on nested tensors (no padding in them): every layer,
    attention projections included, gets the Hessian of the real positions."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, HEADS, 64, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).eval()
    x = tokens()[0]
    padding = torch.zeros(8, 10, dtype=torch.bool)
    padding[:, 7:] = True
    hessians = capture_hessians(model, [(x, padding)], QuantConfig(progress=False),
                                forward_fn=lambda m, batch: m(batch[0], src_key_padding_mask=batch[1]))
    got = hessians["layers.0.self_attn.in_proj"].hessian
    assert all(is_hessian_of(got[g], [x[:, :7]]) for g in range(3))
    assert hessians["layers.0.linear1"].columns == 8 * 7 and hessians["layers.0.linear1"].samples == 8


@pytest.mark.parametrize(("batch_first", "calibration"), [(True, "one_pass"), (False, "one_pass"),
                                                          (True, "sequential")])
def test_attention_projections_are_quantized_in_the_models_own_parameters(batch_first: bool, calibration: str) -> None:
    model = encoder(batch_first)
    data = tokens(batch_first)
    keys = list(model.state_dict())
    before = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        reference = [model(x) for x in data]
    report = quantize_model(model, data, QuantConfig(bits=4, calibration=calibration, progress=False))
    parts = ("self_attn.in_proj", "self_attn.out_proj", "linear1", "linear2")
    names = [f"layers.{i}.{p}" for i in (0, 1) for p in parts]
    assert [layer.name for layer in report.layers] == names and report.skipped == []
    assert list(model.state_dict()) == keys  # nothing added to or renamed in the model
    for i in (0, 1):
        attn = model.layers[i].self_attn
        for role, key in (("in_proj", "in_proj_weight"), ("out_proj", "out_proj.weight")):
            weight = attn.get_parameter(key)
            result = report.results[f"layers.{i}.self_attn.{role}"]
            assert torch.equal(weight, result.weight.reshape_as(weight))
            assert not torch.equal(weight, before[f"layers.{i}.self_attn.{key}"])
            assert result.error < result.rtn_error
    with torch.no_grad():
        change = sum(float((model(x) - r).square().mean()) for x, r in zip(data, reference, strict=True))
    assert 0 < change / len(data) < 0.01 * float(torch.stack(reference).var())


@pytest.mark.parametrize("memory_length", [10, 6, 13])
def test_cross_attention_rows_get_the_hessians_of_the_query_and_the_memory(memory_length: int) -> None:
    """A decoder's cross-attention reads a memory of its own length: the key and value rows get its Hessian."""
    torch.manual_seed(0)
    decoder = nn.TransformerDecoder(nn.TransformerDecoderLayer(E, HEADS, 64, dropout=0.0), 1).eval()  # seq-first
    queries = [torch.randn(10, 8, E) for _ in range(3)]
    memories = [torch.randn(memory_length, 8, E) for _ in range(3)]
    batches = list(zip(queries, memories, strict=True))
    config = QuantConfig(progress=False)
    hessians = capture_hessians(decoder, batches, config, forward_fn=lambda m, batch: m(*batch))
    with torch.no_grad():  # the cross-attention's query: the target after the self-attention block
        layer = decoder.layers[0]
        targets = [layer.norm1(x + layer._sa_block(x, None, None)) for x in queries]
    got = hessians["layers.0.multihead_attn.in_proj"].hessian
    for g, inputs in enumerate((targets, memories, memories)):
        assert is_hessian_of(got[g], inputs), g
    model = copy.deepcopy(decoder)
    report = quantize_model(model, batches, config, forward_fn=lambda m, batch: m(*batch))
    assert report.skipped == [] and {"layers.0.self_attn.in_proj", "layers.0.multihead_attn.in_proj"} <= set(
        report.results)
    cross = model.layers[0].multihead_attn.in_proj_weight
    assert not torch.equal(cross, decoder.layers[0].multihead_attn.in_proj_weight)


def test_separate_kv_widths_keep_their_input_projection_in_float(caplog: pytest.LogCaptureFixture) -> None:
    class Separate(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.keys = nn.Linear(E, 16)
            self.attn = nn.MultiheadAttention(E, HEADS, kdim=16, vdim=16, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            k = self.keys(x)
            return self.attn(x, k, k, need_weights=False)[0]

    with caplog.at_level("WARNING", logger="lightning_obq"):
        report = quantize_model(Separate().eval(), tokens(), QuantConfig(progress=False))
    assert "1 nn.MultiheadAttention module(s) with kdim/vdim different from embed_dim" in caplog.text
    assert set(report.results) == {"keys", "attn.out_proj"}


def test_output_projection_response_is_the_attention_output_change() -> None:
    model = MaskedAttention().eval()
    x = tokens()[0]
    projection = find_layers(model, QuantConfig())["attn.out_proj"]
    delta = 0.01 * torch.randn_like(projection.weight)
    captured = {}
    handle = model.attn.register_forward_hook(lambda m, a, k, o: captured.update(a=a, k=k, o=o[0]), with_kwargs=True)
    with torch.no_grad():
        before = model(x)
        handle.remove()
        response = projection.response(captured["a"], captured["k"], captured["o"], delta)
        model.attn.out_proj.weight += delta
        after = model(x)
    assert torch.allclose(response, after - before, atol=1e-6)


def test_first_order_gains_reach_the_attention_projections() -> None:
    model = encoder()
    data = tokens()
    report = quantize_model(copy.deepcopy(model), data, QuantConfig(bits=3, progress=False))
    layers = find_layers(model, QuantConfig())
    quantized = {n: r.weight.reshape(layers[n].weight.shape) for n, r in report.results.items()}
    errors = {n: r.error for n, r in report.results.items()}
    exact = output_gains(model, layers, quantized, errors, data, method="exact")
    linear = output_gains(model, layers, quantized, errors, data, method="linear")
    for name in layers:  # the projections' estimates are as close to the measurement as the other layers'
        assert 0.5 < linear[name] / exact[name] < 2, (name, linear[name], exact[name])
    mixed = quantize_model(copy.deepcopy(model), data, QuantConfig(bits=4, budget=3.5, gains="linear", progress=False))
    assert set(mixed.results) == set(layers) and mixed.allocation["average_bits"] <= 3.5


def test_quantized_attention_saves_loads_and_exports(tmp_path: Path) -> None:
    model = encoder()
    data = tokens()
    report = quantize_model(model, data, QuantConfig(bits=4, progress=False))
    path = save_quantized(model, tmp_path / "encoder.safetensors", report)
    for keep_packed in (False, True):
        fresh = load_quantized(path, encoder(), keep_packed=keep_packed)
        with torch.no_grad():
            assert all(torch.equal(fresh(x), model(x)) for x in data), keep_packed
    attention = fresh.layers[0].self_attn
    assert isinstance(attention, PackedMixin) and isinstance(attention, nn.MultiheadAttention)
    assert isinstance(attention.out_proj, PackedMixin) and "in_proj_weight" not in dict(fresh.named_parameters())
    assert resident_weight_bytes(fresh) < 0.4 * resident_weight_bytes(model)
    onnx = pytest.importorskip("onnx")
    for source, codes in ((model, report), (fresh, None)):  # from the report, and from the packed model alone
        out = export_onnx(source, data[0], tmp_path / "encoder.onnx", codes)  # checked against onnxruntime
        integer = [i for i in onnx.load(str(out)).graph.initializer
                   if i.data_type in (onnx.TensorProto.UINT4, onnx.TensorProto.UINT8)]
        assert len(integer) >= len(report.results)


def test_callback_quantizes_a_vision_transformer_after_fit(tmp_path: Path) -> None:
    """User path 1 on a transformer: the demo's SmallViT (torchvision's VisionTransformer) fitted by a real
    Trainer with OBQCallback; its attention weights end on the grid and the CSV log names the projections."""
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import CSVLogger
    from support import make_trainer, most_values_per_grid, read_csv_metrics, tiny_dataset
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_obq import OBQCallback
    from lightning_obq.demo.models import ImageClassifier

    def images(seed: int) -> DataLoader:
        x, y = tiny_dataset(128, seed).tensors
        return DataLoader(TensorDataset(nn.functional.interpolate(x, size=28), y), batch_size=32)

    pl.seed_everything(0)
    module = ImageClassifier(num_classes=4, arch="smallvit", width=8, lr=3e-3)
    callback = OBQCallback(config=QuantConfig(bits=4, budget=3.5, calib_samples=64))
    logger = CSVLogger(tmp_path, name="csv")
    make_trainer(tmp_path, [callback], max_epochs=1, logger=logger).fit(module, images(0), images(1))
    report = callback.report
    projections = [n for n in report.results if n.endswith(("in_proj", "out_proj"))]
    assert len(projections) == 8 and report.skipped == []
    logged = read_csv_metrics(Path(logger.log_dir) / "metrics.csv")
    for name in projections:
        assert logged[f"obq/layer/{name}/bits"] == report.allocation["layers"][name]["bits"]
        weight = find_projection(module, name).weight  # the attention module's own parameter
        assert torch.equal(weight, report.results[name].weight.reshape_as(weight))
        assert most_values_per_grid(weight, None) <= 2 ** report.results[name].bits
    assert "obq/val_acc" in logged and "val_acc" in logged


def test_small_vit_names_a_width_its_heads_cannot_share() -> None:
    from lightning_obq.demo.models import SmallViT

    assert SmallViT(width=4)(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(ValueError, match="width must be even"):
        SmallViT(width=3)


def test_a_linear_subclass_with_its_own_groups_attribute_stays_one_matrix() -> None:
    """Only the attention's input projection splits a Linear into row groups (``input_groups``); a user subclass
    that happens to carry a ``groups`` attribute is solved as the one matrix its forward applies."""
    from lightning_obq.core.hessian import layer_groups

    class Tagged(nn.Linear):
        groups = 2

    torch.manual_seed(0)
    model = nn.Sequential(Tagged(E, 16))
    report = quantize_model(model, [torch.randn(64, E)], QuantConfig(progress=False))
    assert layer_groups(model[0]) == 1 and report.results["0"].codes.shape == (1, 16, E)
