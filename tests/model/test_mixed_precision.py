"""Mixed precision under a size budget: exact allocation, pins, budget respected, never worse than uniform."""

from __future__ import annotations

import copy
import itertools
import random

import pytest
import torch
import torch.nn as nn

from lightning_obq import QuantConfig, quantize_model
from lightning_obq.model.mixed import allocate_bits


@pytest.mark.parametrize("seed", range(20))
def test_allocation_equals_brute_force(seed: int) -> None:
    rng = random.Random(seed)
    n_layers = rng.randint(1, 5)
    options = [sorted(rng.sample([2, 3, 4, 6, 8], rng.randint(1, 4))) for _ in range(n_layers)]
    numel = [rng.randint(10, 1000) for _ in range(n_layers)]
    sizes = [[n * b for b in opts] for n, opts in zip(numel, options, strict=True)]
    losses = [[rng.random() * 2.0 ** (-b) * n for b in opts] for n, opts in zip(numel, options, strict=True)]
    budget = rng.uniform(sum(min(s) for s in sizes), sum(max(s) for s in sizes) + 1)
    best = (float("inf"), None)
    for pick in itertools.product(*(range(len(o)) for o in options)):
        size = sum(sizes[i][k] for i, k in enumerate(pick))
        loss = sum(losses[i][k] for i, k in enumerate(pick))
        if size <= budget and loss < best[0]:
            best = (loss, pick)
    bits, size, loss = allocate_bits(sizes, losses, options, budget)
    assert size <= budget
    assert loss == pytest.approx(best[0])
    assert bits == [options[i][k] for i, k in enumerate(best[1])]


def test_infeasible_budget_returns_nothing() -> None:
    assert allocate_bits([[10, 20]], [[1.0, 0.5]], [[2, 4]], 5)[0] == []


class TwoBranches(nn.Module):
    """Two equal conv branches whose outputs are summed with gains 30 and 1/30: very uneven sensitivity."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.loud = nn.Conv2d(3, 16, 3, padding=1)
        self.quiet = nn.Conv2d(3, 16, 3, padding=1)
        self.mix = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(30.0 * self.loud(x) + self.quiet(x) / 30.0)
        return self.head(torch.relu(self.mix(y)).mean((2, 3)))


def uneven_model() -> nn.Module:
    return TwoBranches().eval()


def calibration() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    x = torch.nn.functional.avg_pool2d(torch.randn(64, 3, 8, 8, generator=g), 3, 1, 1)
    return list(x.split(16))


def quantized_weights(model: nn.Module) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear))


@pytest.mark.parametrize("budget", [3.0, 4.0, 5.5])
def test_budget_is_respected_and_mixed_beats_uniform(budget: float) -> None:
    model = uneven_model()
    report = quantize_model(model, calibration(), QuantConfig(bits=4, budget=budget, progress=False))
    a = report.allocation
    assert a is not None and a["average_bits"] <= budget + 1e-9
    chosen = {s.name: s.bits for s in report.layers}
    assert {n: v["bits"] for n, v in a["layers"].items()} == chosen
    numel = {s.name: torch.Size(s.shape).numel() for s in report.layers}
    assert sum(numel[n] * b for n, b in chosen.items()) / quantized_weights(model) == pytest.approx(a["average_bits"])
    if budget == 4.0:
        assert a["predicted_loss"] <= a["uniform_predicted_loss"]
        assert a["predicted_loss"] < 0.5 * a["uniform_predicted_loss"]
        assert chosen["loud"] > chosen["quiet"]
    # Every layer's weights are on the grid of its own width.
    for name, r in report.results.items():
        assert r.bits == chosen[name] and int(r.codes.max()) < 2**r.bits


def test_predicted_loss_uses_the_damped_layer_error() -> None:
    """A layer's predicted loss is its gain times the damped objective the solve minimised, not the undamped
    one: on a head fed fewer samples than inputs the undamped error is near zero in the calibration samples'
    span whatever the width, and it would get the fewest bits for that."""
    model = uneven_model()
    report = quantize_model(model, calibration(), QuantConfig(bits=4, budget=4.0, progress=False))
    stats = {s.name: s for s in report.layers}
    head = stats["head"]
    assert head.damped_error > 2 * head.error  # 64 samples, 16 inputs of small scale: the damping dominates
    for name, entry in report.allocation["layers"].items():
        assert entry["predicted_loss"] == pytest.approx(entry["gain"] * stats[name].damped_error, rel=1e-9)


def test_pins_are_honoured_and_count_in_the_budget() -> None:
    model = uneven_model()
    config = QuantConfig(bits=4, budget=5.5, pin={"loud": 8, "head": 8}, progress=False)
    report = quantize_model(model, calibration(), config)
    chosen = {s.name: s.bits for s in report.layers}
    assert chosen["loud"] == 8 and chosen["head"] == 8
    assert report.allocation["average_bits"] <= 5.5


def test_budget_in_megabytes() -> None:
    model = uneven_model()
    # Between uniform W2 (quantized layers 0.00292 MB: the per-row grids of both RGB stems and the depthwise conv
    # put most of this tiny model's bytes in scales) and W4 (0.00320 MB).
    report = quantize_model(model, calibration(), QuantConfig(budget_mb=0.0030, progress=False))
    assert report.allocation["size_mb"] <= 0.0030
    assert 2 < report.allocation["average_bits"] < 4


def test_unreachable_budget_is_a_clear_error_and_the_model_is_unchanged() -> None:
    model = uneven_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="budget is below"):
        quantize_model(model, calibration(), QuantConfig(budget=2.5, pin={"head": 8, "mix": 8}, progress=False))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"budget": 1.5}, "budget"),
        ({"budget": 9.0}, "budget"),
        ({"budget": 4.0, "budget_mb": 1.0}, "budget_mb"),
        ({"candidate_bits": (1, 4)}, "candidate_bits"),
        ({"pin": {"conv1": 12}}, "pin"),
        ({"budget": 4.0, "calibration": "sequential"}, "budget"),
    ],
)
def test_bad_mixed_precision_settings(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        QuantConfig(**kwargs)


def output_change(model: nn.Module, reference: nn.Module, batches: list[torch.Tensor]) -> float:
    with torch.no_grad():
        return sum(float((model(x) - reference(x)).pow(2).sum()) for x in batches)


def test_mixed_output_change_is_measured_and_not_above_uniform() -> None:
    """With BN re-estimation off, the model output on the calibration data really moves less than uniform's."""
    batches = calibration()
    fp = uneven_model()
    mixed, uniform = uneven_model(), uneven_model()
    report = quantize_model(mixed, batches, QuantConfig(bits=4, budget=4.0, reestimate_bn=False, progress=False))
    quantize_model(uniform, batches, QuantConfig(bits=4, reestimate_bn=False, progress=False))
    a = report.allocation
    assert not a["kept_uniform"] and a["measured_loss"] < a["uniform_measured_loss"]
    assert output_change(mixed, fp, batches) < output_change(uniform, fp, batches)


class CancellingBranches(nn.Module):
    """``a(x) - b(x)`` with ``a == b`` cancels exactly when both get the same grid, plus a quiet wide branch.

    Judged one layer at a time, ``a`` and ``b`` look loud, so the additive prediction spends the budget on
    them and squeezes ``c``; measured together, uniform bits cancel ``a - b`` and only ``c`` matters.
    """

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(16, 16)
        self.b = nn.Linear(16, 16)
        self.b.load_state_dict(self.a.state_dict())
        self.c = nn.Linear(64, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) - self.b(x) + 0.01 * self.c(x.repeat(1, 4))


def test_uniform_is_kept_when_it_measures_better_than_the_allocation() -> None:
    g = torch.Generator().manual_seed(0)
    batches = list(torch.randn(128, 16, generator=g).split(32))
    model = CancellingBranches()
    report = quantize_model(model, batches, QuantConfig(bits=4, budget=4.0, progress=False))
    a = report.allocation
    assert a["kept_uniform"] and a["uniform_measured_loss"] < a["measured_loss"]
    assert {s.name: s.bits for s in report.layers} == {"a": 4, "b": 4, "c": 4}
    assert a["average_bits"] == pytest.approx(4.0) and a["predicted_loss"] == pytest.approx(a["uniform_predicted_loss"])
    with torch.no_grad():
        assert torch.equal(model.a.weight, model.b.weight)


def test_depthwise_convs_keep_more_bits_under_a_budget() -> None:
    """MobileNetV2-style: the tiny depthwise convs (9x9 Hessians) are where mixed precision spends bits on a
    per-channel grid; their default per-row grid (`QuantConfig.kernel_row_grid`) leaves uniform W4 closer to
    the FP model and gives the allocation a lower predicted loss (measured with all layers together, the two
    allocations of this untrained toy are within the additive prediction's error of each other: per-row ahead
    with widths (2, 3, 4, 6, 8), behind with every width 2-8)."""
    from lightning_obq.demo.models import MobileNetV2Small
    from lightning_obq.model.batchnorm import reestimate_batchnorm

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.avg_pool2d(torch.randn(128, 1, 28, 28, generator=g), 3, 1, 1)
    model = MobileNetV2Small(width=16)
    reestimate_batchnorm(model, [x])
    model.eval()
    allocations = {}
    for grid in ("granularity", "row"):
        config = QuantConfig(bits=4, budget=4.0, kernel_row_grid=grid, progress=False)
        report = quantize_model(copy.deepcopy(model), list(x.split(32)), config)
        allocations[grid] = report.allocation
    modules = dict(model.named_modules())
    channel = allocations["granularity"]
    depthwise = [a["bits"] for n, a in channel["layers"].items() if getattr(modules[n], "groups", 1) > 1]
    others = [a["bits"] for n, a in channel["layers"].items() if getattr(modules[n], "groups", 1) == 1]
    assert len(depthwise) == 6 and min(depthwise) >= 4
    assert sum(depthwise) / len(depthwise) > sum(others) / len(others)
    for key in ("predicted_loss", "uniform_measured_loss"):
        assert allocations["row"][key] < channel[key]
    assert all(a["average_bits"] <= 4.0 for a in allocations.values())


def test_measured_output_change_with_bn_reestimation_leaves_the_model_as_it_was() -> None:
    from lightning_obq.model.batchnorm import reestimate_batchnorm
    from lightning_obq.model.mixed import output_changes

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 4))
    reestimate_batchnorm(model, calibration())
    model.eval()
    layers = {"0": model[0], "4": model[4]}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    shifted = {n: m.weight.detach() + 0.05 for n, m in layers.items()}
    plain, with_bn = (output_changes(model, layers, [shifted], calibration(), settle=settle)[0]
                      for settle in (None, lambda: reestimate_batchnorm(model, calibration())))
    assert plain > 0 and with_bn > 0 and with_bn != plain  # re-estimated BN absorbs part of the shift
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class SamePadConv(nn.Conv2d):
    """TensorFlow-style 'same' conv that pads in its own forward (as EfficientNet-Lite's convs do)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(nn.functional.pad(x, [0, 1, 0, 1]))


def test_linear_gains_follow_layers_that_pad_in_their_forward() -> None:
    """The first-order estimate runs each layer's own forward: with a linear rest of the network it matches
    the measured output change of quantizing that layer alone."""
    from lightning_obq.model.mixed import linear_output_changes, output_changes

    torch.manual_seed(0)
    model = nn.Sequential(SamePadConv(3, 8, 3, stride=2), nn.Conv2d(8, 8, 1), nn.Flatten(), nn.Linear(8 * 4 * 4, 5))
    layers = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)}
    quantized = {n: m.weight.detach() + 0.05 * torch.randn_like(m.weight) for n, m in layers.items()}
    batches = calibration()
    estimated = linear_output_changes(model, layers, quantized, batches, probes=256)
    measured = output_changes(model, layers, [{n: w} for n, w in quantized.items()], batches)
    for (name, est), exact in zip(estimated.items(), measured, strict=True):
        assert est == pytest.approx(exact, rel=0.25), name


def test_budgeted_batchnorm_step_equals_a_fresh_settle_of_the_final_weights() -> None:
    """Mixed precision's measured check settles BatchNorm for the winner; the final model reuses that result,
    which must equal settling the final weights from scratch."""
    import copy

    from lightning_obq.demo.models import MobileNetV2Small
    from lightning_obq.model.batchnorm import batchnorm_layers, plan_batchnorm, settle_batchnorm

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.avg_pool2d(torch.randn(96, 1, 28, 28, generator=g), 3, 1, 1)
    model = MobileNetV2Small(width=16).eval()
    with torch.no_grad():  # trained statistics that are off for these inputs: the candidates differ
        for bn in batchnorm_layers(model):
            bn.running_mean.uniform_(-0.2, 0.2)
    fresh = copy.deepcopy(model)
    batches = list(x.split(32))
    config = QuantConfig(bits=3, budget=3.0, progress=False)
    report = quantize_model(model, batches, config)
    assert "uniform_measured_loss" in report.allocation  # the check against uniform W3 ran
    plan = plan_batchnorm(fresh, batches, "auto", holdout=config.bn_holdout, holdout_samples=config.bn_holdout_samples)
    for name, module in fresh.named_modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            module.weight.data.copy_(dict(model.named_modules())[name].weight)
    decision = settle_batchnorm(fresh, plan)
    assert decision["chosen"] == report.batchnorm["chosen"]
    for mode, scores in decision["candidates"].items():
        assert scores == pytest.approx(report.batchnorm["candidates"][mode])
    for ours, theirs in zip(batchnorm_layers(model), batchnorm_layers(fresh), strict=True):
        assert torch.allclose(ours.running_mean, theirs.running_mean) and torch.allclose(ours.running_var,
                                                                                         theirs.running_var)


class CancellingBranchesWithBatchNorm(CancellingBranches):
    """`CancellingBranches` followed by a BatchNorm (its statistics: re-estimate them on the data)."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(super().forward(x))


def test_kept_uniform_gets_the_batchnorm_mode_chosen_on_the_allocation() -> None:
    import copy
    import dataclasses

    from lightning_obq.model.batchnorm import plan_batchnorm, reestimate_batchnorm, settle_batchnorm

    g = torch.Generator().manual_seed(0)
    batches = list(torch.randn(128, 16, generator=g).split(32))
    model = CancellingBranchesWithBatchNorm()
    reestimate_batchnorm(model, batches)  # exact for the FP model: quantizing `c` shifts them
    model.eval()
    fresh = copy.deepcopy(model)
    config = QuantConfig(bits=4, budget=4.0, progress=False)
    report = quantize_model(model, batches, config)
    bn = report.batchnorm
    assert report.allocation["kept_uniform"] and bn["mode"] == "auto" and "candidates" in bn
    assert "allocation's weights" in bn["note"]
    # the final BatchNorm is that mode applied to the final (uniform) weights, from the trained statistics
    plan = plan_batchnorm(fresh, batches, "auto", holdout=config.bn_holdout, holdout_samples=config.bn_holdout_samples)
    for name in ("a", "b", "c"):
        fresh.get_submodule(name).weight.data.copy_(model.get_submodule(name).weight)
    settle_batchnorm(fresh, dataclasses.replace(plan, mode=bn["chosen"]))
    assert torch.allclose(model.bn.running_mean, fresh.bn.running_mean)
    assert torch.allclose(model.bn.running_var, fresh.bn.running_var)
