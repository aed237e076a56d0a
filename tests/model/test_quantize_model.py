"""Whole-model tests for `quantize_model`: calibration inputs, modes, BN, report, failure handling."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_obq import QuantConfig, quantize_model
from lightning_obq.core.grid import Grid, dequantize_codes
from lightning_obq.model.batchnorm import reestimate_batchnorm
from lightning_obq.model.calibration import batch_size, cut_batches
from lightning_obq.model.capture import forward_pieces


def small_cnn() -> nn.Module:
    """A CNN with plain, grouped, depthwise and 1x1 convs whose BN statistics match its data."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=4), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU(),
        nn.Conv2d(16, 32, 1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.1), nn.Linear(32, 10),
    )
    reestimate_batchnorm(model, [images(256, seed=99)])
    return model.eval()


def images(n: int = 64, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 12, 12, generator=g)
    return torch.nn.functional.avg_pool2d(x, 3, 1, 1)  # smooth: neighbouring inputs correlate


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_eight_bits_barely_moves_outputs_and_weights_lie_on_grid() -> None:
    model, x = small_cnn(), images()
    ref = model(x)
    report = quantize_model(model, DataLoader(TensorDataset(x), batch_size=16), QuantConfig(bits=8, progress=False))
    out = model(x)
    assert (out - ref).abs().max() < 0.02 * ref.abs().max()
    assert len(report.layers) == 5 and not report.skipped
    for name, r in report.results.items():
        module = model.get_submodule(name)
        w = module.weight.detach().reshape(r.codes.shape)
        grid = Grid(r.scale, r.zero, r.bits, r.group_size)  # the depthwise conv's has a scale per kernel row
        assert torch.equal(w, dequantize_codes(r.codes.float(), *grid.column_params(w.shape[-1])))
    assert not model.training


@pytest.mark.parametrize("method", ["fastobq", "gptq", "obq", "rtn"])
def test_four_bits_every_method_and_report(method: str) -> None:
    model, x = small_cnn(), images()
    report = quantize_model(model, [x[:32], x[32:]], QuantConfig(bits=4, method=method, progress=False))
    d = report.to_dict()
    json.dumps(d)
    assert d["samples"] == 64 and len(d["layers"]) == 5
    assert report.total_seconds >= report.solve_seconds > 0 and report.peak_rss_mb > 0
    assert report.quant_size_mb < report.fp_size_mb
    table = report.table()
    for s in report.layers:
        assert s.name in table
        assert s.error >= 0 and s.rtn_error >= 0
        if method == "rtn":
            assert s.error == pytest.approx(s.rtn_error)
    if method in ("fastobq", "obq"):
        assert report.total_error < report.total_rtn_error


def test_fastobq_output_closer_than_rtn_at_three_bits() -> None:
    x = images(128)
    outs = {}
    for method in ("rtn", "fastobq"):
        model = small_cnn()
        ref = model(x)
        quantize_model(model, x, QuantConfig(bits=3, method=method, progress=False))
        outs[method] = (model(x) - ref).pow(2).mean().item()
    assert outs["fastobq"] < outs["rtn"]


def test_position_fraction_uses_fewer_columns_and_still_beats_rtn() -> None:
    x = images(128)
    model = small_cnn()
    ref = model(x)
    rtn = small_cnn()
    quantize_model(rtn, x, QuantConfig(bits=3, method="rtn", progress=False))
    report = quantize_model(model, x, QuantConfig(bits=3, position_fraction=0.25, progress=False))
    assert (model(x) - ref).pow(2).mean() < (rtn(x) - ref).pow(2).mean()
    assert report.samples == 128


@pytest.mark.parametrize(
    "calibration",
    [
        lambda x: DataLoader(TensorDataset(x, torch.zeros(len(x))), batch_size=16),
        lambda x: [(x[i : i + 16], torch.zeros(16)) for i in range(0, len(x), 16)],
        lambda x: [{"image": x[i : i + 16], "label": torch.zeros(16)} for i in range(0, len(x), 16)],
        lambda x: (x[i : i + 16] for i in range(0, len(x), 16)),
    ],
    ids=["dataloader", "tuples", "dicts", "generator"],
)
def test_calibration_sources_give_the_same_result(calibration) -> None:
    x = images()
    reference = small_cnn()
    quantize_model(reference, list(x.split(16)), QuantConfig(progress=False))
    model = small_cnn()
    quantize_model(model, calibration(x), QuantConfig(progress=False))
    for a, b in zip(reference.state_dict().values(), model.state_dict().values(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-5)


def test_forward_fn_for_custom_batches_and_calib_samples_limit() -> None:
    x = images(64)
    model = small_cnn()
    batches = [{"pixels": x[i : i + 16]} for i in range(0, 64, 16)]
    report = quantize_model(model, batches, QuantConfig(calib_samples=40, progress=False),
                            forward_fn=lambda m, b: m(b["pixels"]))
    assert report.samples == 40


def test_dict_batch_without_known_key_asks_for_forward_fn() -> None:
    model = small_cnn()
    with pytest.raises(TypeError, match="forward_fn"):
        quantize_model(model, [{"pixels": images(8)}], QuantConfig(progress=False))


def test_sequential_mode_and_memory_chunking() -> None:
    x = images()
    one = small_cnn()
    quantize_model(one, [x], QuantConfig(progress=False))
    chunked = small_cnn()
    report = quantize_model(chunked, [x], QuantConfig(hessian_memory_mb=1.0, progress=False))
    # Chunked one-pass calibration sees the FP model every pass, so it equals a single pass exactly.
    for a, b in zip(one.state_dict().values(), chunked.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    seq = small_cnn()
    rep_seq = quantize_model(seq, [x], QuantConfig(calibration="sequential", progress=False))
    assert len(rep_seq.layers) == len(report.layers)
    assert not torch.equal(seq[3].weight, one[3].weight)  # later layers saw quantized predecessors
    assert torch.equal(seq[0].weight, one[0].weight)  # the first layer sees the same inputs


def test_batchnorm_statistics_are_re_estimated() -> None:
    x = images()
    model = small_cnn()
    quantize_model(model, [x[:32], x[32:]], QuantConfig(bn_mode="reestimate", progress=False))
    feats = model[0](x)
    assert torch.allclose(model[1].running_mean, feats.mean((0, 2, 3)), atol=1e-5)
    # A cumulative average over the two batches of each batch's (unbiased) variance.
    batch_vars = torch.stack([f.var((0, 2, 3)) for f in feats.split(32)])
    assert torch.allclose(model[1].running_var, batch_vars.mean(0), rtol=1e-4)
    assert model[1].momentum == 0.1 and not model[1].training


def test_include_exclude_and_types() -> None:
    model = small_cnn()
    report = quantize_model(model, [images()], QuantConfig(exclude=("13",), layer_types=("Conv2d", "Linear"),
                                                           progress=False))
    assert [s.name for s in report.layers] == ["0", "3", "6", "8"]  # the Linear "13" is excluded
    with pytest.raises(ValueError, match="no layer to quantize"):
        quantize_model(small_cnn(), [images()], QuantConfig(include=("nothing*",)))


def test_unused_layer_is_skipped_and_reported() -> None:
    class WithUnused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = small_cnn()
            self.unused = nn.Linear(10, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x)

    model = WithUnused()
    before = model.unused.weight.clone()
    report = quantize_model(model, [images()], QuantConfig(progress=False))
    assert report.skipped == ["unused"] and torch.equal(model.unused.weight, before)


def test_model_without_layers_empty_calibration_and_bad_types() -> None:
    with pytest.raises(ValueError, match="no layer to quantize"):
        quantize_model(nn.Sequential(nn.ReLU()), [torch.randn(2, 3)])
    with pytest.raises(ValueError, match="empty"):
        quantize_model(small_cnn(), DataLoader(TensorDataset(torch.empty(0, 3, 12, 12)), batch_size=4))
    with pytest.raises(ValueError, match="empty"):
        quantize_model(small_cnn(), [])
    with pytest.raises(ValueError, match="None"):
        quantize_model(small_cnn(), None)
    with pytest.raises(TypeError, match="config"):
        quantize_model(small_cnn(), [images()], {"bits": 4})


def test_nan_weight_is_rejected_before_anything_changes() -> None:
    model = small_cnn()
    with torch.no_grad():
        model[8].weight[0, 0] = float("nan")
    before = state(model)
    with pytest.raises(ValueError, match="'8'.*NaN"):
        quantize_model(model, [images()])
    after = state(model)
    assert all(torch.equal(before[k], after[k]) or torch.isnan(before[k]).any() for k in before)


class NaNAfter(nn.Module):
    """Passes its input through, but turns it into NaN once armed (a layer that blows up mid-run)."""

    def __init__(self) -> None:
        super().__init__()
        self.armed = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * float("nan") if self.armed else x


def test_failure_half_way_restores_the_model_exactly() -> None:
    model = small_cnn()
    model.insert(8, NaNAfter())  # before the 1x1 conv
    model.train()
    before = state(model)
    calls = {"n": 0}

    def forward_fn(m: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        m[8].armed = calls["n"] > 2  # order pass + first sequential layer run clean, then NaN appears
        return m(batch)

    with pytest.raises(ValueError, match="NaN"):
        quantize_model(model, [images()], QuantConfig(calibration="sequential", progress=False),
                       forward_fn=forward_fn)
    after = state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.training  # mode restored too


@pytest.mark.parametrize("fail_at", [1, 2, 3, 5, 8, 13])
def test_a_pass_that_fails_leaves_no_hooks_behind(fail_at: int) -> None:
    """Whichever calibration pass a failure hits (order, capture, BatchNorm choice, mixed-precision gains and
    check), every hook is removed and the weights are restored."""
    model = small_cnn()
    before = state(model)
    calls = {"n": 0}

    def forward_fn(m: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise RuntimeError("the loader broke")
        return m(batch)

    config = QuantConfig(budget=5.0, candidate_bits=(4, 8), gains="linear", forward_batch=64, progress=False)
    try:
        quantize_model(model, [images(128)], config, forward_fn=forward_fn)
    except RuntimeError:
        assert all(torch.equal(before[k], v) for k, v in state(model).items())
    assert calls["n"] >= fail_at
    hooked = [n for n, m in model.named_modules() if m._forward_hooks or m._forward_pre_hooks]
    assert hooked == []


def test_train_modes_of_submodules_are_kept() -> None:
    model = nn.Sequential(small_cnn())  # a training wrapper around an eval-mode network
    model.training = True
    quantize_model(model, [images()], QuantConfig(progress=False))
    assert model.training and not model[0].training and not model[0][1].training


def test_same_inputs_give_bit_identical_weights() -> None:
    a, b = small_cnn(), small_cnn()
    quantize_model(a, [images()], QuantConfig(progress=False))
    quantize_model(b, [images()], QuantConfig(progress=False))
    for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y)


def test_linear_model_with_sequence_inputs() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.LayerNorm(32), nn.Linear(32, 8))
    x = torch.randn(8, 10, 16)
    ref = model(x)
    report = quantize_model(copy.deepcopy(model), [x], QuantConfig(bits=8, progress=False))
    assert report.samples == 8
    quantize_model(model, [x], QuantConfig(bits=8, progress=False))
    assert (model(x) - ref).abs().max() < 0.05


def test_pins_apply_to_uniform_runs_and_a_pattern_must_match_a_layer() -> None:
    x = images()
    model = small_cnn()
    report = quantize_model(model, [x], QuantConfig(bits=3, pin={"6": 8, "1?": 6}, progress=False))
    assert {s.name: s.bits for s in report.layers} == {"0": 3, "3": 3, "6": 8, "8": 3, "13": 6}
    assert report.results["6"].bits == 8 and int(report.results["6"].codes.max()) > 7
    with pytest.raises(ValueError, match=r"QuantConfig.pin pattern '\*_depthwise_conv' matches no layer"):
        quantize_model(small_cnn(), [x], QuantConfig(bits=4, pin={"*_depthwise_conv": 8}, progress=False))


def test_cut_batches_keeps_every_sample_in_order() -> None:
    x, y = images(20), torch.arange(20)
    pieces = cut_batches([(x, y), {"image": x[:6], "label": y[:6]}], 8)
    assert [batch_size(p) for p in pieces] == [8, 8, 4, 6]
    assert torch.equal(torch.cat([p[1] for p in pieces[:3]]), y)
    assert torch.equal(pieces[2][0], x[16:])
    mask = torch.ones(3)  # shared by every sample: slicing it would not split samples
    assert cut_batches([(x, mask)], 8) == [(x, mask)]
    with pytest.raises(ValueError, match="pieces of 0"):
        cut_batches([x], 0)


def test_forward_batch_pieces_give_the_same_quantized_model() -> None:
    x = images(48)
    whole, pieces = small_cnn(), small_cnn()
    config = QuantConfig(bits=4, bn_mode="keep", progress=False)  # Hessians are sums over samples: same
    quantize_model(whole, [x], config.replace(forward_batch=48))
    quantize_model(pieces, [x], config.replace(forward_batch=5))
    for a, b in zip(whole.state_dict().values(), pieces.state_dict().values(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-5)
    with pytest.raises(ValueError, match="forward_batch"):
        QuantConfig(forward_batch=0)


def test_cpu_pieces_are_sized_by_the_largest_layer_output() -> None:
    model = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 8, 1)).eval()
    layers = {"0": model[0], "2": model[2]}
    big = torch.randn(32, 3, 128, 128)  # conv 0 writes 4 MB per sample: 16 MB / 4 MB is under the floor of 8
    assert [batch_size(b) for b in forward_pieces(model, layers, [big], None, None)] == [8, 8, 8, 8]
    small = torch.randn(32, 3, 16, 16)  # 64 KB per sample: the loader's batch fits
    assert forward_pieces(model, layers, [small], None, None) == [small]
    assert [batch_size(b) for b in forward_pieces(model, layers, [small], None, 12)] == [12, 12, 8]


def test_depthwise_convs_and_stems_get_one_grid_per_kernel_row() -> None:
    """Layer "0" of `small_cnn` is its RGB stem, "6" depthwise (16 groups of one 3x3 channel), "3" grouped with four
    input channels per group: neither, like the 1x1 conv "8" and the linear head "13"."""
    x = images()

    def grids(**fields) -> dict[str, tuple[int | None, int, float]]:
        report = quantize_model(small_cnn(), [x], QuantConfig(bits=3, progress=False, **fields))
        assert {s.name: s.group_size for s in report.layers} == {n: r.group_size for n, r in report.results.items()}
        return {n: (r.group_size, r.scale.numel(), r.damped_error) for n, r in report.results.items()}

    rows, channels = grids(), grids(kernel_row_grid="granularity")
    assert rows["0"][:2] == (3, 16 * 9) and channels["0"][:2] == (None, 16)
    assert rows["6"][:2] == (3, 16 * 3) and channels["6"][:2] == (None, 16)
    assert rows["0"][2] < channels["0"][2] and rows["6"][2] < channels["6"][2]  # the finer grid leaves less
    row_layers = {"0", "6"}
    assert {n: g[:2] for n, g in rows.items() if n not in row_layers} == {
        n: g[:2] for n, g in channels.items() if n not in row_layers}
    assert rows["3"][:2] == (None, 16)
    # gptq keeps whichever of the two grids its solve did better on: never worse than the per-channel one
    gptq_rows, gptq_channels = grids(method="gptq"), grids(method="gptq", kernel_row_grid="granularity")
    assert gptq_rows["0"][2] <= gptq_channels["0"][2] and gptq_rows["6"][2] <= gptq_channels["6"][2]
    assert grids(granularity="tensor")["6"][:2] == (None, 16)  # one scale per tensor stays one (broadcast)
    assert grids(granularity="group", group_size=2)["6"][:2] == (2, 16 * 5)  # a finer group is kept
    assert grids(granularity="group", group_size=8)["6"][:2] == (3, 16 * 3)
    with pytest.raises(ValueError, match=r"QuantConfig.kernel_row_grid='rows' is not one of \['row', 'granularity'\]"):
        QuantConfig(kernel_row_grid="rows")
