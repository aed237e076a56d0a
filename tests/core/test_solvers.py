"""Layer-level tests: grids, solvers against references, error ordering, bad input."""

from __future__ import annotations

import logging

import pytest
import torch
from support import correlated_problem

from lightning_obq import QuantConfig, quantize_layer
from lightning_obq.core import solvers
from lightning_obq.core.config import ORDERS
from lightning_obq.core.grid import dequantize_codes, fake_quantize, find_grid, quantize_codes
from lightning_obq.core.hessian import damp_hessian
from lightning_obq.core.solvers import reorder_block, solve_obq


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("granularity", ["channel", "tensor", "group"])
def test_grid_round_trip_is_exact(bits: int, symmetric: bool, granularity: str) -> None:
    w = torch.randn(3, 5, 40)
    grid = find_grid(w, bits, symmetric, granularity, group_size=16)
    scale, zero = grid.column_params(40)
    codes = quantize_codes(w, scale, zero, grid.maxq)
    assert codes.min() >= 0 and codes.max() <= grid.maxq
    assert torch.equal(codes, torch.round(codes))
    q = dequantize_codes(codes, scale, zero)
    assert torch.equal(quantize_codes(q, scale, zero, grid.maxq), codes)
    assert torch.equal(dequantize_codes(quantize_codes(q, scale, zero, grid.maxq), scale, zero), q)
    expected_groups = {"channel": 1, "tensor": 1, "group": 3}[granularity]
    assert grid.scale.shape == (3, 5, expected_groups)
    if granularity == "tensor":
        assert torch.unique(grid.scale).numel() == 1


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_mse_range_search_beats_minmax_per_channel(bits: int) -> None:
    w = torch.randn(64, 256)
    w[:, 0] = 8.0  # an outlier per row makes min/max wasteful
    errs = {}
    for search in ("minmax", "mse"):
        grid = find_grid(w, bits, range_search=search)
        errs[search] = (fake_quantize(w, grid.scale, grid.zero, grid.maxq) - w).pow(2).sum(1)
    assert torch.all(errs["mse"] <= errs["minmax"] + 1e-6)
    assert errs["mse"].sum() < 0.9 * errs["minmax"].sum()


def test_mse_range_search_finds_the_scanned_optimum() -> None:
    """The coarse + local search lands within a fine step of a dense scan of clipping ratios."""
    w = torch.randn(16, 128)
    grid = find_grid(w, 3, range_search="mse")
    best = (fake_quantize(w, grid.scale, grid.zero, grid.maxq) - w).pow(2).sum(1)
    dense = []
    for ratio in torch.linspace(0.2, 1.0, 801):
        lo, hi = (w.amin(1, keepdim=True) * ratio).clamp(max=0), (w.amax(1, keepdim=True) * ratio).clamp(min=0)
        scale = (hi - lo) / 7
        zero = torch.round(-lo / scale)
        dense.append((fake_quantize(w, scale, zero, 7) - w).pow(2).sum(1))
    dense_best = torch.stack(dense).amin(0)
    assert torch.all(best <= dense_best * 1.02)


def naive_obq_row(w: torch.Tensor, h: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int,
                  outliers: bool = False):
    """Greedy OBQ written literally: re-invert H over the remaining weights at every step.

    With ``outliers`` (the OBC reference rule), a remaining weight whose rounding error exceeds half a
    grid step is taken next, the worst first, instead of the greedy choice.
    """
    w = w.double().clone()
    remaining = list(range(w.numel()))
    q = torch.zeros_like(w)
    while remaining:
        hinv = torch.linalg.inv(h[remaining][:, remaining])
        wf = w[remaining]
        qf = fake_quantize(wf, scale.double(), zero.double(), maxq)
        k = int(((qf - wf) ** 2 / torch.diagonal(hinv)).argmin())
        if outliers and ((qf - wf) ** 2 > scale.double() ** 2 / 4).any():
            k = int(((qf - wf) ** 2).argmax())
        w[remaining] = wf - (wf[k] - qf[k]) / hinv[k, k] * hinv[:, k]
        q[remaining[k]] = qf[k]
        remaining.pop(k)
    return q


@pytest.mark.parametrize("outliers", [False, True])
def test_obq_equals_naive_greedy_reference(outliers: bool) -> None:
    w, h = correlated_problem(d_row=6, d_col=20)
    w[:, 3] *= 6  # weights beyond the MSE-clipped range: the outlier rule has work to do
    config = QuantConfig(bits=3, method="obq")
    grid = find_grid(w, 3)
    hd = damp_hessian(h.unsqueeze(0), config.damp, config.damp_mode)
    codes = solve_obq(w.unsqueeze(0), hd, grid.scale.unsqueeze(0), grid.zero.unsqueeze(0), 7, memory_mb=1.0,
                      outliers=outliers)
    got = dequantize_codes(codes, grid.scale.unsqueeze(0), grid.zero.unsqueeze(0))[0]
    expected = torch.stack([naive_obq_row(w[i], hd[0].double(), grid.scale[i], grid.zero[i], 7, outliers)
                            for i in range(6)])
    assert torch.allclose(got.double(), expected, atol=1e-6)
    if outliers:  # quantize_layer's obq is this variant, the one of the OBC paper
        assert torch.equal(quantize_layer(w, h, config).weight, got)
        plain = solve_obq(w.unsqueeze(0), hd, grid.scale.unsqueeze(0), grid.zero.unsqueeze(0), 7, outliers=False)
        assert not torch.equal(plain, codes)  # the rule changed some choices on this clipped grid


def test_obq_row_batches_do_not_change_the_result() -> None:
    w, h = correlated_problem(d_row=10, d_col=32)
    small = quantize_layer(w, h, QuantConfig(bits=3, method="obq", obq_memory_mb=1.0 * 32 * 32 * 12 / 2**20 + 1))
    large = quantize_layer(w, h, QuantConfig(bits=3, method="obq", obq_memory_mb=512.0))
    assert torch.equal(small.weight, large.weight)


@pytest.mark.parametrize("order", ["none", "act"])
@pytest.mark.parametrize("sweeps", [0, 3])
def test_fastobq_with_gptq_orders_equals_gptq(order: str, sweeps: int) -> None:
    """Same order and refinement: the same solve (fastobq refines by default, gptq does not)."""
    w, h = correlated_problem()
    config = QuantConfig(bits=3, method="fastobq", order=order, block_size=16, refine_sweeps=sweeps)
    fast = quantize_layer(w, h, config)
    gptq = quantize_layer(w, h, config.replace(method="gptq", order=order, refine_sweeps=sweeps))
    assert torch.equal(fast.weight, gptq.weight)


def test_gptq_matches_sequential_inverse_hessian_updates() -> None:
    """The lazy Cholesky-block solver equals the textbook per-column OBS update of H^-1 (eqs. 12-13)."""
    w, h = correlated_problem(d_row=8, d_col=24)
    config = QuantConfig(bits=3, method="gptq", block_size=5)
    result = quantize_layer(w, h, config)
    grid = find_grid(w, 3)
    hinv = torch.linalg.inv(damp_hessian(h.unsqueeze(0), config.damp, config.damp_mode)[0].double())
    ww = w.double().clone()
    for j in range(24):
        q = fake_quantize(ww[:, j], grid.scale[:, 0].double(), grid.zero[:, 0].double(), 7)
        err = (ww[:, j] - q) / hinv[j, j]
        ww -= err[:, None] * hinv[j][None, :]
        ww[:, j] = q
        hinv = hinv - hinv[:, j : j + 1] @ hinv[j : j + 1, :] / hinv[j, j]
    assert torch.allclose(result.weight.double(), ww, atol=1e-5)


@pytest.mark.parametrize("method", ["fastobq", "gptq", "obq", "rtn"])
@pytest.mark.parametrize("granularity", ["channel", "group"])
def test_every_solver_output_lies_on_its_grid(method: str, granularity: str) -> None:
    w, h = correlated_problem(d_row=8, d_col=40)
    r = quantize_layer(w, h, QuantConfig(bits=4, method=method, granularity=granularity, group_size=16))
    assert r.codes.dtype == torch.uint8 and int(r.codes.max()) <= 15
    index = torch.arange(40) // 16 if granularity == "group" else torch.zeros(40, dtype=torch.long)
    assert torch.equal(r.weight, dequantize_codes(r.codes.float(), r.scale[:, index], r.zero[:, index]))
    assert r.weight.shape == w.shape and r.weight.dtype == w.dtype


@pytest.mark.parametrize("order", ORDERS)
def test_fastobq_beats_rtn_on_correlated_inputs(order: str) -> None:
    w, h = correlated_problem()
    r = quantize_layer(w, h, QuantConfig(bits=3, method="fastobq", order=order))
    assert r.error < r.rtn_error
    assert r.perm is not None and sorted(r.perm.tolist()) == list(range(w.shape[1]))


def test_sensitivity_order_sorts_columns_by_aggregated_sensitivity() -> None:
    w, h = correlated_problem()
    config = QuantConfig(bits=3, method="fastobq", order="sensi_des")
    r = quantize_layer(w, h, config)
    grid = find_grid(w, 3)
    hinv = torch.linalg.inv(damp_hessian(h.unsqueeze(0), config.damp, config.damp_mode)[0])
    sens = ((fake_quantize(w, grid.scale, grid.zero, 7) - w) ** 2 / (2 * torch.diagonal(hinv))).sum(0)
    assert torch.equal(r.perm, torch.argsort(sens, descending=True, stable=True))


def naive_dynamic_order(w: torch.Tensor, h: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int):
    """``sensi_dyn`` written literally in float64: every ``reorder_block`` columns, rank the remaining columns
    by (current rounding error + scale^2/12) / [H_R^-1]_jj with H_R^-1 re-inverted over the remaining set R,
    then quantize the chosen ones one at a time with the textbook OBS update, re-inverting at every step."""
    w, h, scale, zero = w.double().clone(), h.double(), scale.double(), zero.double()
    remaining, order = list(range(w.shape[1])), []
    while remaining:
        hinv = torch.linalg.inv(h[remaining][:, remaining])
        cur = w[:, remaining]
        score = ((fake_quantize(cur, scale, zero, maxq) - cur) ** 2 + scale**2 / 12).sum(0) / hinv.diagonal()
        ranked = torch.argsort(score, descending=True, stable=True)[: reorder_block(w.shape[1])]
        for j in [remaining[k] for k in ranked.tolist()]:
            hinv = torch.linalg.inv(h[remaining][:, remaining])
            k = remaining.index(j)
            q = fake_quantize(w[:, j], scale[:, 0], zero[:, 0], maxq)
            err = (w[:, j] - q) / hinv[k, k]
            w[:, remaining] -= err[:, None] * hinv[k][None, :]
            w[:, j] = q
            remaining.remove(j)
            order.append(j)
    return w, order


def test_dynamic_sensitivity_order_equals_literal_reference() -> None:
    """The Schur-complement blocks of sensi_dyn equal re-inverting H over the remaining columns."""
    w, h = correlated_problem(d_row=8, d_col=100)
    config = QuantConfig(bits=3, method="fastobq", block_size=16, refine_sweeps=0)  # the column solve alone
    assert config.order == "sensi_dyn" and reorder_block(100) < 100  # several rankings happen
    result = quantize_layer(w, h, config)
    grid = find_grid(w, 3)
    hd = damp_hessian(h.unsqueeze(0), config.damp, config.damp_mode)[0]
    expected, order = naive_dynamic_order(w, hd, grid.scale, grid.zero, 7)
    assert result.perm.tolist() == order
    assert torch.allclose(result.weight.double(), expected, atol=1e-5)


def test_static_orders_reject_the_dynamic_one() -> None:
    w, h = correlated_problem(d_row=4, d_col=8)
    with pytest.raises(ValueError, match="sensi_dyn"):
        solvers.column_order("sensi_dyn", w[None], h[None], h[None], torch.ones(1, 4, 1), torch.zeros(1, 4, 1), 7)


@pytest.mark.parametrize("order", ["sensi_dyn", "sensi_des", "none"])
@pytest.mark.parametrize("granularity", ["channel", "group", "tensor"])
def test_compiled_kernels_equal_torch_path(order: str, granularity: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """On the CPU the column loop and sensi_dyn's re-ordering run compiled: bit for bit the torch path's."""
    w, h = correlated_problem(d_row=40, d_col=70)
    w = torch.stack([w, w.flip(0)])  # two groups, as for a grouped conv
    h = torch.stack([h, h.flip(0, 1)])
    config = QuantConfig(bits=3, method="fastobq", order=order, block_size=16, granularity=granularity,
                         group_size=24)
    compiled = quantize_layer(w, h, config)
    monkeypatch.setattr(solvers, "COMPILED_DEVICES", ())
    torch_path = quantize_layer(w, h, config)
    assert torch.equal(torch_path.codes, compiled.codes) and torch.equal(torch_path.perm, compiled.perm)


@pytest.mark.parametrize("columns", [1, 70])
def test_compiled_rounding_residual_equals_the_torch_formula(columns: int) -> None:
    """The residual the orders score, compiled, is bit for bit ``(fake_quantize(w) - w)^2``, clipping included."""
    w = torch.randn(2, 40, 70) * 3  # reaches well past the 8-step grids: weights clip at both ends
    scale = torch.rand(2, 40, columns) * 0.3 + 0.05
    zero = torch.randint(0, 8, (2, 40, columns)).float()
    scale[0, 0] = 0.25
    w[0, 0, :4] = torch.tensor([0.5, 1.5, 2.5, -0.5]) * 0.25  # exact halves of a step: round half to even
    expected = torch.sub(fake_quantize(w, scale, zero, 7), w).square_()
    assert torch.equal(solvers.squared_rounding_error(w, scale, zero, 7), expected)


def test_result_tensors_are_ordinary_tensors() -> None:
    """quantize_layer computes in inference mode; what it returns must still work with autograd and in place."""
    w, h = correlated_problem(d_row=8, d_col=24)
    r = quantize_layer(w, h, QuantConfig(bits=4))
    assert not any(t.is_inference() for t in (r.weight, r.codes, r.scale, r.zero, r.perm))
    p = torch.nn.Parameter(r.weight)
    (p * 2).sum().backward()
    assert torch.equal(p.grad, torch.full_like(p, 2.0))
    r.codes.add_(1)


def test_results_do_not_depend_on_the_default_dtype() -> None:
    w, h = correlated_problem(d_row=8, d_col=40)
    reference = quantize_layer(w, h, QuantConfig(bits=3))
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        result = quantize_layer(w, h, QuantConfig(bits=3))
    finally:
        torch.set_default_dtype(previous)
    assert torch.equal(result.codes, reference.codes)


def test_kernels_load_compiles_each_kernel_for_its_one_signature() -> None:
    from lightning_obq.core import kernels

    assert kernels.load() >= 0.0
    assert [loader.cache_info().currsize for loader in kernels._LOADERS] == [1, 1, 1, 1, 1]
    # Inputs may be any view (here transposed or expanded ones), scratch outputs must be C-contiguous: one
    # machine-code version.
    w = torch.arange(4.0).view(1, 4, 1).expand(1, 4, 3).contiguous()  # column i (transposed: row i) holds i
    codes, err = torch.empty(1, 4, 3).transpose(1, 2), torch.empty(1, 4, 3)
    u = torch.eye(4).expand(1, 4, 4).transpose(1, 2)
    grid = torch.ones(1, 1, 3).numpy(), torch.zeros(1, 1, 3).numpy()
    columns = torch.tensor([2, 0, 3, 1]).expand(1, 4)
    kernels.quantize_block_kernel(w.numpy(), u.numpy(), *grid, 7.0, columns.numpy(), codes.numpy(), err.numpy(), 0)
    # Column i's codes land in column columns[i] of the weight's order.
    assert codes.tolist() == [[[1.0, 3.0, 0.0, 2.0]] * 3] and torch.equal(err, torch.zeros(1, 4, 3))
    with pytest.raises(TypeError):
        kernels.quantize_block_kernel(w.numpy(), u.numpy(), *grid, 7.0, columns.numpy(), codes.numpy(),
                                      err.transpose(1, 2).numpy(), 0)


@pytest.mark.parametrize("d_col", [9, 70])
def test_grouped_problem_is_solved_in_one_batched_call_like_separate_calls(d_col: int) -> None:
    problems = [correlated_problem(d_row=4, d_col=d_col, seed=s) for s in range(5)]
    w = torch.stack([p[0] for p in problems])
    h = torch.stack([p[1] for p in problems])
    batched = quantize_layer(w, h, QuantConfig(bits=3))
    for i, (wi, hi) in enumerate(problems):
        single = quantize_layer(wi, hi, QuantConfig(bits=3))
        assert torch.equal(batched.weight[i], single.weight)


def test_dead_inputs_get_zero_weight() -> None:
    w, h = correlated_problem(d_row=4, d_col=12)
    h[3, :] = 0
    h[:, 3] = 0
    r = quantize_layer(w, h, QuantConfig(bits=4))
    assert torch.all(r.weight[:, 3] == 0)


def test_results_are_deterministic() -> None:
    w, h = correlated_problem()
    a = quantize_layer(w, h, QuantConfig(bits=3))
    b = quantize_layer(w, h, QuantConfig(bits=3))
    assert torch.equal(a.weight, b.weight)


@pytest.mark.parametrize(
    ("field", "value", "error"),
    [
        ("bits", 1, ValueError),
        ("bits", 9, ValueError),
        ("bits", 4.0, TypeError),
        ("method", "adaround", ValueError),
        ("order", "random", ValueError),
        ("granularity", "row", ValueError),
        ("range_search", "kl", ValueError),
        ("damp", -1.0, ValueError),
        ("calibration", "twice", ValueError),
        ("layer_types", ("Conv2d", "Embedding"), ValueError),
        ("refine_sweeps", -1, ValueError),
        ("refine_sweeps", 2.0, TypeError),
    ],
)
def test_config_rejects_bad_values_naming_the_field(field: str, value, error: type[Exception]) -> None:
    with pytest.raises(error, match=field):
        QuantConfig(**{field: value})


def test_config_rejects_orders_the_method_does_not_have() -> None:
    with pytest.raises(ValueError, match="order"):
        QuantConfig(method="gptq", order="sensi_des")
    with pytest.raises(ValueError, match="order"):
        QuantConfig(method="rtn", order="act")
    assert QuantConfig(method="gptq").order == "none"
    assert QuantConfig().replace(method="gptq").order == "none"


def test_nan_weight_or_hessian_is_rejected_naming_the_layer() -> None:
    w, h = correlated_problem()
    w[0, 0] = float("nan")
    with pytest.raises(ValueError, match="'conv9'.*NaN"):
        quantize_layer(w, h, name="conv9")
    w, h = correlated_problem()
    h[0, 0] = float("inf")
    with pytest.raises(ValueError, match="Hessian.*NaN or Inf"):
        quantize_layer(w, h)


def test_shape_mismatch_is_rejected() -> None:
    w, h = correlated_problem()
    with pytest.raises(ValueError, match="hessian shape"):
        quantize_layer(w, h[:-1, :-1])


def test_indefinite_hessian_retries_with_more_damping(caplog: pytest.LogCaptureFixture) -> None:
    w, h = correlated_problem()
    h[5, :] = 0
    h[:, 5] = 0
    h[5, 5] = -0.5  # fixed by damping 1.0 but not by 0.1
    with caplog.at_level(logging.WARNING):
        r = quantize_layer(w, h, QuantConfig(bits=4, damp=0.1), name="fc")
    assert r.damp == pytest.approx(1.0)
    assert "not positive definite" in caplog.text


def test_hopeless_hessian_raises_naming_the_layer() -> None:
    w, _ = correlated_problem()
    h = -1e6 * torch.eye(w.shape[1])
    with pytest.raises(ValueError, match="'fc'.*not positive definite"):
        quantize_layer(w, h, QuantConfig(bits=4), name="fc")
