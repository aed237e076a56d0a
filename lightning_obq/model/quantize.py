"""`quantize_model`: calibrate, solve every Conv/Linear layer, write back, re-estimate BatchNorm."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from lightning_obq.core.config import QuantConfig
from lightning_obq.core.hessian import HessianAccumulator, weight_matrix
from lightning_obq.core.layer import LayerResult, quantize_layer
from lightning_obq.core.measure import measure
from lightning_obq.model.batchnorm import (
    BatchNormPlan,
    BatchNormSync,
    SettledBatchNorm,
    plan_batchnorm,
    settle_and_record,
    settle_as_decided,
    settle_batchnorm,
)
from lightning_obq.model.calibration import ForwardFn, batch_size, draw_batches
from lightning_obq.model.capture import (
    capture_layers,
    chunks_by_memory,
    execution_order,
    find_layers,
    forward_pieces,
)
from lightning_obq.model.mixed import allocate_bits, layer_size_bits, output_changes, output_gains, pinned_bits
from lightning_obq.model.report import LayerStats, QuantReport
from lightning_obq.model.state import module_mode, restored_on_failure

log = logging.getLogger(__name__)

# Hooks for distributed calibration (see `quantize_model`): reduce a layer's Hessian across processes,
# and solve a chunk of layers (names, [G, d_row/G, d_col] weights, Hessians) into one LayerResult each.
HessianReducer = Callable[[str, HessianAccumulator], None]
LayerSolver = Callable[[list[str], list[torch.Tensor], list[torch.Tensor], QuantConfig], list[LayerResult]]


def model_size_mb(model: nn.Module, results: dict[str, LayerResult] | None = None,
                  layers: dict[str, nn.Module] | None = None) -> float:
    """Parameter and buffer size in MB; quantized layers count codes (bits each) plus float32 scale/zero."""
    quantized = {id(layers[n].weight): r for n, r in (results or {}).items()} if layers else {}
    total = 0.0
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    for key, t in tensors.items():
        r = quantized.get(key)
        if r is None:
            total += t.numel() * t.element_size()
        else:
            total += t.numel() * r.bits / 8 + 2 * r.scale.numel() * 4
    return total / 2**20


def quantize_model(
    model: nn.Module,
    calibration: Iterable[Any],
    config: QuantConfig | None = None,
    forward_fn: ForwardFn | None = None,
    hessian_reducer: HessianReducer | None = None,
    layer_solver: LayerSolver | None = None,
    batchnorm_sync: BatchNormSync | None = None,
    hessians: Mapping[str, HessianAccumulator] | None = None,
) -> QuantReport:
    """Quantize every selected Conv/Linear layer of ``model`` in place and report what happened.

    ``calibration`` is a DataLoader or any iterable of tensors, tuples/lists (first item is the input)
    or dicts (an ``input``/``image``/``x``-like key); ``forward_fn(model, batch)`` runs anything else.
    Up to ``config.calib_samples`` samples are drawn once and reused by every pass. The model runs on
    its own device, in eval mode. BatchNorm statistics are then handled as ``config.bn_mode`` says
    (default ``"auto"``: kept, bias-corrected or re-estimated, whichever measures closest to the FP
    model on held-back calibration samples; `lightning_obq.model.batchnorm`); ``report.batchnorm`` says which.

    If anything fails, every parameter and buffer is restored and the error propagates: the model is
    never left half-quantized.

    Distributed calibration (used by `OBQCallback` under DDP) plugs in through two optional hooks, both
    called in the same layer order on every process:

    - ``hessian_reducer(name, accumulator)`` runs after a layer's Hessian is captured and before it is
      solved; it may replace ``accumulator.hessian``, ``.columns`` and ``.samples`` in place (for example
      with the sample-weighted all-reduce over processes).
    - ``layer_solver(names, weights, hessians, config)`` replaces the per-layer `quantize_layer` calls
      for a chunk of layers (all layers at once in one-pass mode, one in sequential mode) and returns one
      `LayerResult` per name, in order (for example solving each layer on one process and broadcasting).
    - ``batchnorm_sync`` (`lightning_obq.model.batchnorm.BatchNormSync`) makes BatchNorm statistics and the
      ``auto`` decision global over processes.

    ``hessians`` (from `capture_hessians` on the same FP model and data) skips the Hessian capture; the
    calibration batches are still used for the BatchNorm step and mixed precision.
    """
    config = config or QuantConfig()
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a QuantConfig, got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    layers = find_layers(model, config)
    if hessians is not None:
        if config.calibration != "one_pass" or hessian_reducer is not None:
            raise ValueError("hessians= needs QuantConfig.calibration='one_pass' and no hessian_reducer "
                             "(they are the FP model's, captured once)")
        missing = sorted(set(layers) - set(hessians))
        if missing:
            raise ValueError(f"hessians= has no Hessian for layers {missing[:8]}: capture them with the same config")
    batches = draw_batches(calibration, config.calib_samples)
    report = QuantReport(config=config.to_dict(), samples=sum(batch_size(b) for b in batches))
    report.fp_size_mb = model_size_mb(model)
    device = next(iter(layers.values())).weight.device
    with restored_on_failure(model, "quantization failed; the model's original weights and buffers were restored"), \
            module_mode(model), measure(device, reset_peak=True) as total:
        batches = forward_pieces(model, layers, batches, forward_fn, config.forward_batch)
        with measure(device, reset_peak=False) as bn_plan:
            plan = plan_batchnorm(model, batches, config.bn_mode, forward_fn, config.bn_holdout,
                                  config.bn_holdout_samples, batchnorm_sync)
        settled = _calibrate_and_solve(model, layers, batches, config, forward_fn, report, plan, hessian_reducer,
                                       layer_solver, hessians)
        with measure(device, reset_peak=False) as bn:
            report.batchnorm = settled.restore(model) if settled else settle_batchnorm(model, plan, forward_fn)
        report.bn_seconds = bn_plan.seconds + bn.seconds
    report.total_seconds = total.seconds
    report.peak_rss_mb = max([total.peak_rss_mb] + [s.peak_rss_mb for s in report.layers])
    report.cuda_peak_mb = max([total.cuda_peak_mb] + [s.cuda_peak_mb for s in report.layers])
    report.quant_size_mb = model_size_mb(model, report.results, layers)
    log.info("quantized %d layers in %.2fs", len(report.layers), report.total_seconds)
    return report


def _calibrate_and_solve(
    model: nn.Module,
    layers: dict[str, nn.Module],
    batches: list[Any],
    config: QuantConfig,
    forward_fn: ForwardFn | None,
    report: QuantReport,
    bn_plan: BatchNormPlan,
    hessian_reducer: HessianReducer | None = None,
    layer_solver: LayerSolver | None = None,
    hessians: Mapping[str, HessianAccumulator] | None = None,
) -> SettledBatchNorm | None:
    """Capture, solve and write every layer; returns the BatchNorm step if mixed precision already settled it
    for the final weights."""
    device = next(iter(layers.values())).weight.device
    with measure(device, reset_peak=False) as m:
        calls = execution_order(model, layers, batches[0], forward_fn)
    report.calib_seconds += m.seconds
    report.skipped = [n for n, c in calls.items() if c == 0]
    for name in report.skipped:
        log.warning("layer %r received no input during calibration and is left unquantized", name)
    ordered = {n: layers[n] for n, c in calls.items() if c > 0}
    if not ordered:
        raise ValueError("no selected layer received input during calibration; check forward_fn")
    widths = {n: _candidate_widths(n, config) for n in ordered}
    show = config.progress and sys.stderr.isatty()
    solves = sum(len(w) * len(layer_configs(ordered[n], config)) for n, w in widths.items())
    bar = tqdm(total=solves, desc=f"{config.method} W{config.bits}", disable=not show, leave=False)

    def solve_serially(names: list[str], weights: list[torch.Tensor], hessians: list[torch.Tensor],
                       cfg: QuantConfig) -> list[LayerResult]:
        results = []
        for name, w, h in zip(names, weights, hessians, strict=True):
            bar.set_postfix_str(f"{name[-30:]} W{cfg.bits}")
            results.append(quantize_layer(w, h, cfg, name=name))
            bar.update(1)
        return results

    solve = layer_solver or solve_serially
    if config.calibration == "sequential":
        chunks = [[n] for n in ordered]
    else:
        chunks = chunks_by_memory(ordered, config.hessian_memory_mb)
    candidates: dict[str, dict[int, LayerResult]] = {n: {} for n in ordered}
    samples: dict[str, int] = {}
    try:
        for chunk in chunks:
            subset = {n: ordered[n] for n in chunk}
            stop_early = {n: calls[n] for n in chunk} if len(chunks) > 1 else None
            with measure(device, reset_peak=False) as m:
                if hessians is not None:
                    accs = {n: hessians[n] for n in chunk}
                else:
                    accs = capture_layers(model, subset, batches, forward_fn, stop_early, config.position_fraction)
                if hessian_reducer is not None:
                    for name in chunk:
                        hessian_reducer(name, accs[name])
            report.calib_seconds += m.seconds
            for bits in sorted({b for n in chunk for b in widths[n]}):
                for cfg, names in _by_layer_config([n for n in chunk if bits in widths[n]], ordered,
                                                   config.replace(bits=bits)):
                    results = solve(names, [weight_matrix(ordered[n]) for n in names],
                                    [accs[n].hessian for n in names], cfg)
                    if solve is layer_solver:
                        bar.update(len(names))
                    for name, result in zip(names, results, strict=True):
                        report.solve_seconds += result.seconds
                        earlier = candidates[name].get(bits)
                        candidates[name][bits] = kept_result([earlier, result] if earlier else [result])
            for name in chunk:
                samples[name] = accs.pop(name).samples
                if config.calibration == "sequential":
                    _write_weight(ordered[name], candidates[name][widths[name][0]])
    finally:
        bar.close()
    chosen = {n: widths[n][0] for n in ordered}  # uniform: `bits`, or the layer's pin
    settled = None
    if config.mixed_precision:
        chosen, settled = _allocate(model, ordered, candidates, batches, config, forward_fn, report, bn_plan)
    for name, module in ordered.items():
        result = candidates[name][chosen[name]]
        report.results[name] = result
        report.layers.append(LayerStats.from_result(name, module, result, config, samples[name]))
        # One-pass mode: every Hessian came from the FP model, so weights are written only at the end.
        _write_weight(module, result)
    return settled


def layer_configs(module: nn.Module, config: QuantConfig) -> list[QuantConfig]:
    """The configs ``module`` is solved with; the result with the lower damped layer objective is kept.

    ``config`` itself, and first, for a depthwise conv or an image stem under ``kernel_row_grid="row"``, its
    per-row grid (`QuantConfig.for_layer`): finer, so fastobq's result on it is nearly always the better one,
    but gptq keeps each group's range fixed while its updates move later weights, and on EfficientNet-Lite1's
    first depthwise conv at W4 its per-row result had 2.5x the per-channel one's error.
    """
    own = config.for_layer(module)
    return [config] if own is config else [own, config]


def kept_result(results: list[LayerResult]) -> LayerResult:
    """Of one layer's results on its `layer_configs`, the one kept: the lowest damped layer objective (what the
    solvers minimise), the earlier one on a tie."""
    return min(results, key=lambda r: r.damped_error)


def _by_layer_config(names: list[str], layers: dict[str, nn.Module], config: QuantConfig
                     ) -> list[tuple[QuantConfig, list[str]]]:
    """``names`` grouped by the configs each layer is solved with (`layer_configs`), in order of first
    appearance: one solver call per group."""
    groups: dict[tuple[str, int], tuple[QuantConfig, list[str]]] = {}
    for name in names:
        for cfg in layer_configs(layers[name], config):
            groups.setdefault((cfg.granularity, cfg.group_size), (cfg, []))[1].append(name)
    return list(groups.values())


def _shaped(module: nn.Module, result: LayerResult) -> torch.Tensor:
    """A result's weight in the module's own shape and dtype."""
    return result.weight.reshape(module.weight.shape).to(module.weight.dtype)


def _write_weight(module: nn.Module, result: LayerResult) -> None:
    module.weight.data.copy_(_shaped(module, result))


def _candidate_widths(name: str, config: QuantConfig) -> list[int]:
    """Bit widths to solve a layer at: its pin, else the config's, or every candidate under a budget."""
    pinned = pinned_bits(name, config.pin)
    if pinned is not None:
        return [pinned]
    if not config.mixed_precision:
        return [config.bits]
    widths = set(config.candidate_bits)
    widths.add(config.bits)  # the reference width: gains and the uniform comparison use it
    return sorted(widths)


def _allocate(
    model: nn.Module,
    layers: dict[str, nn.Module],
    candidates: dict[str, dict[int, LayerResult]],
    batches: list[Any],
    config: QuantConfig,
    forward_fn: ForwardFn | None,
    report: QuantReport,
    bn_plan: BatchNormPlan,
) -> tuple[dict[str, int], SettledBatchNorm | None]:
    """Per-layer bits minimising the predicted output loss within the config's budget (see `mixed`).

    The winner is then checked against uniform ``config.bits`` (when that fits the budget) by measuring
    both on the sensitivity batches with all layers quantized together, each after the BatchNorm step the
    final model gets (``bn_plan``: under ``auto`` the mode is chosen on the allocation's weights and uniform
    gets the same mode); if uniform changes the model output less, uniform is kept, so a budget never ends
    worse than uniform there. Returns the bits per layer and, when the check ran, the
    BatchNorm step it settled for the winner (the final model has the same weights: no second settle).
    """
    sensitivity_batches = draw_batches(batches, config.sensitivity_samples)
    reference = {n: c.get(config.bits) or next(iter(c.values())) for n, c in candidates.items()}
    gains = output_gains(
        model, layers, {n: _shaped(layers[n], r) for n, r in reference.items()},
        {n: r.error for n, r in reference.items()}, sensitivity_batches, forward_fn, config.gains,
    )
    names = list(layers)
    options = [[b for b in sorted(candidates[n]) if b in config.candidate_bits or len(candidates[n]) == 1]
               for n in names]
    sizes = {n: {b: layer_size_bits(layers[n].weight.numel(), candidates[n][b].scale.numel(), b) for b in opts}
             for n, opts in zip(names, options, strict=True)}
    losses = {n: {b: gains[n] * candidates[n][b].damped_error for b in opts}
              for n, opts in zip(names, options, strict=True)}
    numel = sum(layers[n].weight.numel() for n in names)
    scales_bits = sum(layer_size_bits(0, candidates[n][options[i][0]].scale.numel(), 0) for i, n in enumerate(names))
    if config.budget is not None:
        budget_bits = config.budget * numel + scales_bits
    else:
        budget_bits = config.budget_mb * 8 * 2**20
    bits, _, _ = allocate_bits([list(sizes[n].values()) for n in names], [list(losses[n].values()) for n in names],
                               options, budget_bits)
    if not bits:
        smallest = sum(min(s.values()) for s in sizes.values())
        raise ValueError(
            f"QuantConfig budget is below the smallest model the candidates and pins allow "
            f"({(smallest - scales_bits) / numel:.3f} bits per weight, {smallest / 8 / 2**20:.3f} MB)"
        )
    chosen = dict(zip(names, bits, strict=True))
    # Uniform `bits` (pinned layers at their pin) is the baseline a budget must not lose to.
    baseline = {n: config.bits if config.bits in sizes[n] else pinned_bits(n, config.pin) for n in names}
    uniform = baseline if None not in baseline.values() else None
    measured: dict[str, float] = {}
    kept_uniform = False
    settled: list[SettledBatchNorm] = []  # one per assignment measured, in order

    def settle() -> None:  # `auto` decides on the allocation; uniform gets the mode it chose
        settled.append(settle_as_decided(model, bn_plan, settled[0].decision, forward_fn) if settled
                       else settle_and_record(model, bn_plan, forward_fn))

    if uniform is not None and uniform != chosen and sum(sizes[n][b] for n, b in uniform.items()) <= budget_bits:
        mixed_change, uniform_change = output_changes(
            model, layers, [{n: _shaped(layers[n], candidates[n][b]) for n, b in c.items()} for c in (chosen, uniform)],
            sensitivity_batches, forward_fn, settle=settle,
        )
        measured = {"measured_loss": mixed_change, "uniform_measured_loss": uniform_change}
        if uniform_change < mixed_change:
            log.warning("mixed precision: the allocation changed the calibration outputs more than uniform W%d "
                        "(%.4g vs %.4g); keeping uniform W%d", config.bits, mixed_change, uniform_change, config.bits)
            chosen, kept_uniform = uniform, True
    size = sum(sizes[n][b] for n, b in chosen.items())
    report.allocation = {
        "budget_bits_per_weight": config.budget,
        "budget_mb": config.budget_mb,
        "average_bits": (size - scales_bits) / numel,
        "size_mb": size / 8 / 2**20,
        "predicted_loss": sum(losses[n][b] for n, b in chosen.items()),
        "uniform_bits": config.bits,
        "uniform_predicted_loss": None if uniform is None else sum(losses[n][b] for n, b in uniform.items()),
        **measured,
        "kept_uniform": kept_uniform,
        "layers": {n: {"bits": b, "gain": gains[n], "predicted_loss": losses[n][b]} for n, b in chosen.items()},
    }
    return chosen, (settled[1 if kept_uniform else 0] if settled else None)
