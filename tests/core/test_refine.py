"""The refinement stage after the column-parallel solve: monotone sweeps, codes on the grid, below exact OBQ on a
brute-forced problem, the compiled and torch paths bit for bit, and its numbers in the report."""

from __future__ import annotations

import functools
import itertools

import pytest
import torch
import torch.nn as nn
from support import correlated_problem

from lightning_obq import QuantConfig, quantize_layer, quantize_model
from lightning_obq.core import refine, solvers
from lightning_obq.core.grid import dequantize_codes, find_grid
from lightning_obq.core.hessian import HessianAccumulator, damp_hessian, weight_matrix
from lightning_obq.core.layer import layer_error
from lightning_obq.demo.data import fashion_mnist


@functools.cache
def _real_problems() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Weights and Hessians of a plain and a grouped conv fed real Fashion-MNIST images (random-init net)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 12, 3), nn.ReLU(),
                        nn.Conv2d(12, 12, 3, groups=3))
    data = fashion_mnist(train=False, download=False)
    images = torch.stack([data[i][0] for i in range(256)])
    out = {}
    for name in ("2", "4"):
        acc = HessianAccumulator(net[int(name)], name)
        handles = acc.register()
        with torch.no_grad():
            net(images)
        for handle in handles:
            handle.remove()
        out[name] = (weight_matrix(net[int(name)]).detach(), acc.hessian)
    return out


def real_problems() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Fresh copies of `_real_problems` (computed once per session), so tests may edit them."""
    return {k: (w.clone(), h.clone()) for k, (w, h) in _real_problems().items()}


def random_problem(groups: int = 1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    ws, hs = zip(*(correlated_problem(d_row=12, d_col=70, seed=seed + i) for i in range(groups)), strict=True)
    return torch.stack(ws), torch.stack(hs)


PROBLEMS = {"random": lambda: random_problem(), "random grouped": lambda: random_problem(groups=3)}
PROBLEMS.update({f"real conv {k}": (lambda k=k: real_problems()[k]) for k in ("2", "4")})


def starting_point(w: torch.Tensor, h: torch.Tensor, bits: int, granularity: str):
    """The grid and the fastobq column solve the refinement starts from."""
    grid = find_grid(w, bits, granularity=granularity, group_size=24)
    scale, zero = grid.column_params(w.shape[-1])
    codes, _ = solvers.solve_column_parallel(w, damp_hessian(h, 0.1, "absolute"), scale, zero, grid.maxq)
    return grid, scale, zero, codes


@pytest.mark.parametrize("problem", list(PROBLEMS))
@pytest.mark.parametrize("granularity", ["channel", "group", "tensor"])
def test_no_sweep_raises_the_objective_and_codes_stay_on_the_grid(problem: str, granularity: str) -> None:
    w, h = PROBLEMS[problem]()
    grid, scale, zero, start = starting_point(w, h, 2, granularity)
    objectives = []
    for sweeps in range(6):
        codes, done, first, last = refine.refine_codes(w, h, start, scale, zero, grid.maxq, sweeps, block=8, tol=0.0)
        assert done == sweeps
        assert torch.equal(codes, codes.round()) and codes.min() >= 0 and codes.max() <= grid.maxq
        objectives.append(float(layer_error(w, dequantize_codes(codes, scale, zero), h.double())))
        assert last == pytest.approx(objectives[-1], rel=1e-5)  # the tracked objective is the product's
    assert first == pytest.approx(objectives[0], rel=1e-5)
    assert all(b <= a for a, b in itertools.pairwise(objectives)), objectives
    assert objectives[-1] < 0.99 * objectives[0]  # and it does lower it


@pytest.mark.parametrize("granularity", ["channel", "group", "tensor"])
def test_scale_refit_lowers_the_objective_and_keeps_codes(granularity: str) -> None:
    w, h = random_problem(groups=2)
    grid, scale, zero, codes = starting_point(w, h, 3, granularity)
    scale = scale * 1.2  # codes on a grid whose scale is off: the refit must find a better one
    off = grid.scale * 1.2
    new, gain = refine.refit_scales(w, h, codes, off, grid.zero, grid.group_size, granularity == "tensor")
    assert new.shape == grid.scale.shape and bool((new > 0).all()) and not torch.equal(new, off)
    if granularity == "tensor":
        assert torch.all(new == new.flatten()[0])
    expand = refine._expand_groups(new, 24, w.shape[-1]) if granularity == "group" else new
    before = layer_error(w, dequantize_codes(codes, scale, zero), h)
    after = layer_error(w, dequantize_codes(codes, expand, zero), h)
    assert after < before
    assert gain < 0 and before + gain == pytest.approx(after, rel=1e-4)  # the exact change it reports


def brute_force_error(w: torch.Tensor, h: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> float:
    """The exact optimum on the grid: every code combination of every row."""
    d_col = w.shape[-1]
    combos = torch.tensor(list(itertools.product(range(maxq + 1), repeat=d_col)), dtype=torch.float32)
    total = 0.0
    for r in range(w.shape[1]):
        e = scale[0, r] * (combos - zero[0, r]) - w[0, r]
        total += float(((e @ h[0]) * e).sum(-1).min())
    return total


@pytest.mark.parametrize(("bits", "d_col"), [(2, 7), (3, 5)])
@pytest.mark.parametrize("seed", range(4))
def test_refined_fastobq_is_at_or_below_exact_obq_on_a_brute_forced_problem(bits: int, d_col: int, seed: int) -> None:
    w, h = correlated_problem(d_row=5, d_col=d_col, seed=seed)
    w, h = w[None], h[None]
    config = QuantConfig(bits=bits, damp=1e-4, refine_sweeps=3)
    refined = quantize_layer(w, h, config)
    obq = quantize_layer(w, h, config.replace(method="obq"))
    assert refined.error <= obq.error and refined.error <= refined.solve_error
    # On the fixed grid the sweeps alone stay at or above the exact optimum there, and below their start.
    grid, scale, zero, start = starting_point(w, h, bits, "channel")
    codes, _, first, _ = refine.refine_codes(w, h, start, scale, zero, grid.maxq, 6, block=4)
    on_grid = layer_error(w, dequantize_codes(codes, scale, zero), h)
    assert brute_force_error(w, h, scale, zero, grid.maxq) <= on_grid * (1 + 1e-5) and on_grid <= first


@pytest.mark.parametrize("granularity", ["channel", "group", "tensor"])
def test_compiled_and_torch_refinement_agree_bit_for_bit(granularity: str, monkeypatch: pytest.MonkeyPatch) -> None:
    w, h = random_problem(groups=2)
    config = QuantConfig(bits=3, granularity=granularity, group_size=24, refine_sweeps=4)
    compiled = quantize_layer(w, h, config)
    monkeypatch.setattr(solvers, "COMPILED_DEVICES", ())
    torch_path = quantize_layer(w, h, config)
    assert compiled.refine_sweeps > 0 and compiled.error < compiled.solve_error
    assert torch.equal(torch_path.codes, compiled.codes) and torch.equal(torch_path.scale, compiled.scale)
    assert torch_path.error == compiled.error


def test_layer_result_reports_before_and_after_and_respects_the_switch() -> None:
    w, h = real_problems()["4"]
    h[:, 5, :] = 0  # a dead input column in every group
    h[:, :, 5] = 0
    on = quantize_layer(w, h, QuantConfig(bits=3, refine_sweeps=3))
    off = quantize_layer(w, h, QuantConfig(bits=3, refine_sweeps=0))
    assert off.error == off.solve_error and on.solve_error == pytest.approx(off.error, rel=1e-6)  # float rounding
    assert on.error < on.solve_error and on.damped_error < off.damped_error  # the objective it lowers is the damped one
    assert 0 < on.refine_seconds < on.seconds and 1 <= on.refine_sweeps <= 3
    assert off.refine_sweeps == 0 and off.refine_seconds == 0.0
    assert torch.all(on.weight[:, :, 5] == 0)
    assert torch.equal(on.weight, dequantize_codes(on.codes.float(), on.scale, on.zero))
    assert QuantConfig(method="gptq").refine_sweeps == 0 and QuantConfig().refine_sweeps == 1
    assert QuantConfig().replace(method="obq").refine_sweeps == 0
    with pytest.raises(ValueError, match="refine_sweeps"):
        QuantConfig(method="rtn", refine_sweeps=2)


def test_report_shows_refinement_per_layer_and_in_total() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 26 * 26, 10))
    data = fashion_mnist(train=False, download=False)
    loader = [torch.stack([data[i][0] for i in range(64)])]
    report = quantize_model(model, loader, QuantConfig(bits=3, refine_sweeps=3, progress=False))
    for s in report.layers:
        assert s.error <= s.solve_error and s.refine_sweeps >= 1 and s.refine_seconds > 0
    d = report.to_dict()
    assert d["total_solve_error"] == pytest.approx(sum(s.solve_error for s in report.layers))
    assert d["layers"][0]["refine_seconds"] == report.layers[0].refine_seconds
    assert "refinement" in report.table()


def test_fastobq_refines_one_row_per_group_layers_by_default() -> None:
    """Depthwise convs (one output row per group) get the single-row sweeps; other layers keep refine_sweeps."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 12, 3), nn.ReLU(), nn.Conv2d(12, 12, 3, groups=12))
    data = fashion_mnist(train=False, download=False)
    acc = {i: HessianAccumulator(net[i], str(i)) for i in (0, 2)}
    handles = [h for a in acc.values() for h in a.register()]
    with torch.no_grad():
        net(torch.stack([data[i][0] for i in range(64)]))
    for handle in handles:
        handle.remove()
    depthwise, dense = (weight_matrix(net[i]).detach() for i in (2, 0))
    result = quantize_layer(depthwise, acc[2].hessian, QuantConfig(bits=3))
    assert QuantConfig().single_row_refine_sweeps == 3 and QuantConfig(method="gptq").single_row_refine_sweeps == 0
    assert 1 <= result.refine_sweeps <= 3 and result.error < result.solve_error
    one = quantize_layer(depthwise, acc[2].hessian, QuantConfig(bits=3, single_row_refine_sweeps=0))
    assert one.refine_sweeps == 1 and one.solve_error == result.solve_error  # the larger of the two fields
    off = quantize_layer(depthwise, acc[2].hessian, QuantConfig(bits=3, refine_sweeps=0, single_row_refine_sweeps=0))
    assert off.refine_sweeps == 0 and off.error == pytest.approx(result.solve_error, rel=1e-6)
    assert quantize_layer(dense, acc[0].hessian, QuantConfig(bits=3)).refine_sweeps == 1  # refine_sweeps' default
    assert quantize_layer(depthwise, acc[2].hessian, QuantConfig(bits=3, method="gptq")).refine_sweeps == 0
    assert QuantConfig().replace(method="rtn").single_row_refine_sweeps == 0
    with pytest.raises(ValueError, match="single_row_refine_sweeps"):
        QuantConfig(method="obq", single_row_refine_sweeps=2)
