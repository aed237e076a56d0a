"""BatchNorm after the weights change: keep, re-estimate, bias-correct, or let a measurement decide.

Quantizing a layer moves the statistics of the activations after it, and the BatchNorm behind it still
normalises with the FP model's running statistics. Three ways to respond, none right everywhere:

- ``keep``: the trained statistics. Right whenever the change is small, which is most of the time at
  6-8 bits, and always safe against a calibration set that is small or not the training data.
- ``reestimate``: reset and re-estimate them on the calibration data (the FastOBQ paper's step). It
  follows the quantized activations exactly, but replaces the trained statistics by those of the
  calibration data: on a pretrained ImageNet network calibrated with a few hundred other photographs
  this alone destroys the model, quantization or not.
- ``correct``: keep the trained variances and shift each running mean by the change that quantization
  caused in that BatchNorm's input mean, both models measured on the same calibration samples
  (empirical bias correction, as in Nagel et al., *Data-Free Quantization*, 2019). The calibration data
  only enters through a difference of two models on the same images, so a mismatched set hurts little.

``auto`` chooses by measurement: part of the calibration data is held back, every candidate is fitted on
the rest and scored on the held-back samples against the FP model's outputs, which were recorded before
any weight changed (KL divergence of the softmax for a classifier's ``[N, C]`` output, mean squared
output difference otherwise). ``keep`` is the first candidate, and a later one replaces the best so far
only if its mean per-sample improvement (paired: the same held-back samples) is positive and at least
`SIGNIFICANCE` standard errors: so ``auto`` never ends worse than the trained statistics on that
measurement, and a difference within the noise of a few dozen held-back samples (a mean correction
estimated from few images at 8 bits, say) keeps the trained statistics instead of trusting it.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from lightning_obq.model.calibration import (
    ForwardFn,
    batch_size,
    default_forward,
    detached_output,
    model_device,
    output_tensors,
    removed_after,
    run_batches,
    sample_squared_change,
    split_batches,
    to_device,
)
from lightning_obq.model.fidelity import fidelity_from_terms, fidelity_terms, row_kl
from lightning_obq.model.state import module_mode

log = logging.getLogger(__name__)

CANDIDATES = ("keep", "correct", "reestimate")
"""The modes ``auto`` compares, in the order that breaks ties (earlier wins)."""

SIGNIFICANCE = 2.0
"""Standard errors by which a candidate's mean per-sample improvement over the best so far must exceed zero
(one-sided, about 98 %): on EfficientNet-Lite1 at W8 with 12 held-back crops, a mean correction that measured
7 % better there was 50 % worse on 64 other crops; re-estimation where the trained statistics are wrong wins
by many standard errors."""

@dataclass
class BatchNormSync:
    """How the BatchNorm step agrees across processes (`OBQCallback` under DDP): every rank measures on its
    own shard, and these make the statistics and the decision global.

    ``sum(t)`` returns the sum of a float64 tensor over processes; ``statistics(model)`` averages
    re-estimated running statistics over processes.
    """

    sum: Callable[[torch.Tensor], torch.Tensor]
    statistics: Callable[[nn.Module], Any]


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """Every BatchNorm module that tracks running statistics."""
    return [
        m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]


def reestimate_batchnorm(model: nn.Module, batches: Iterable[Any], forward_fn: ForwardFn | None = None) -> int:
    """Reset BN running stats and re-estimate them as exact averages over ``batches``.

    Only BN layers switch to train mode (dropout and the rest stay as they were); momentum is set to
    ``None`` for a cumulative average, then everything is restored. Returns how many BN layers were updated.
    """
    layers = batchnorm_layers(model)
    if not layers:
        return 0
    momenta = [(m, m.momentum) for m in layers]
    try:
        with module_mode(*layers, training=True):
            for m in layers:
                m.reset_running_stats()
                m.momentum = None
            run_batches(model, batches, forward_fn)
    finally:
        for m, momentum in momenta:
            m.momentum = momentum
    return len(layers)


def _channel_mean(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Per-channel (dim 1) mean of a BatchNorm input, as float64, and how many values each channel has.

    The mean itself is taken in float32 or better (float32's cascaded sum is accurate to about 1e-7 of the
    values, far below any shift worth correcting): casting a large feature map to float64 first cost 40x
    more, once per BatchNorm per batch per pass. The float64 result keeps the averages over batches exact.
    """
    x = x.detach()
    mean = x.mean(dim=[d for d in range(x.dim()) if d != 1], dtype=torch.promote_types(x.dtype, torch.float32))
    return mean.double(), x.numel() // x.shape[1]


def _each_batchnorm_input(
    model: nn.Module,
    batches: Sequence[Any],
    forward_fn: ForwardFn | None,
    visit: Callable[[int, int, nn.Module, torch.Tensor], None],
) -> None:
    """Run ``batches`` one by one, calling ``visit(layer index, batch index, module, input)`` just before each
    BatchNorm of `batchnorm_layers` runs (it may change the module's buffers for that call)."""
    current = [0]

    def hook(index: int) -> Callable[[nn.Module, tuple[torch.Tensor, ...]], None]:
        def call(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            visit(index, current[0], module, inputs[0])
        return call

    with removed_after([m.register_forward_pre_hook(hook(i)) for i, m in enumerate(batchnorm_layers(model))]):
        for i, batch in enumerate(batches):
            current[0] = i
            run_batches(model, [batch], forward_fn)


def batch_input_means(model: nn.Module, batches: Sequence[Any], forward_fn: ForwardFn | None = None
                      ) -> list[torch.Tensor]:
    """Per-channel mean of every BatchNorm's input on each batch: one ``[batches, C]`` float64 tensor per
    BatchNorm, in `batchnorm_layers` order (a BatchNorm called twice per forward keeps its last call)."""
    means = [torch.zeros(len(batches), m.num_features, dtype=torch.float64, device=m.running_mean.device)
             for m in batchnorm_layers(model)]

    def record(index: int, batch: int, module: nn.Module, x: torch.Tensor) -> None:
        means[index][batch] = _channel_mean(x)[0]

    _each_batchnorm_input(model, batches, forward_fn, record)
    return means


def correct_batchnorm(
    model: nn.Module,
    batches: Sequence[Any],
    fp_means: Sequence[torch.Tensor],
    forward_fn: ForwardFn | None = None,
    sync: BatchNormSync | None = None,
) -> int:
    """Shift each running mean by how much quantization moved its BatchNorm's input mean on ``batches``.

    ``fp_means`` are the FP model's `batch_input_means` on the same batches. During the pass each batch
    runs with every running mean shifted by that batch's own shift (quantized minus FP input mean on the
    same images), so every BatchNorm measures its shift with its predecessors already corrected, as
    the final model will run; correcting all of them from one uncorrected pass would count a shift
    again at every BatchNorm it propagates to. The final shift is the average over the batches (and
    processes, with ``sync``). Variances stay as trained. Returns how many BN layers were updated.
    """
    layers = batchnorm_layers(model)
    trained = [m.running_mean.detach().clone() for m in layers]
    shift_sums = [torch.zeros_like(fp[0]) for fp in fp_means]
    counts = [torch.zeros(1, dtype=torch.float64, device=fp.device) for fp in fp_means]

    def shift(index: int, batch: int, module: nn.Module, x: torch.Tensor) -> None:
        mean, n = _channel_mean(x)
        delta = mean - fp_means[index][batch]
        module.running_mean.copy_(trained[index] + delta.to(trained[index].dtype))
        shift_sums[index] += delta * n
        counts[index] += n

    _each_batchnorm_input(model, batches, forward_fn, shift)
    if sync is not None:
        shift_sums = [sync.sum(t) for t in shift_sums]
        counts = [sync.sum(c) for c in counts]
    for m, rm, total, n in zip(layers, trained, shift_sums, counts, strict=True):
        m.running_mean.copy_(rm + (total / n.clamp(min=1)).to(rm.dtype))
    return len(layers)


@dataclass
class BatchNormPlan:
    """What the BatchNorm step needs from the FP model, recorded before any weight changes.

    ``fit`` are the batches the statistics are fitted on (all calibration batches, or all but the
    held-back ones under ``auto``); ``holdout`` and ``reference`` the held-back batches and the FP outputs
    on them; ``fp_means`` the FP input means of every BatchNorm on each batch of ``fit`` (for ``correct``); ``sync``
    the cross-process hooks, if any.
    """

    mode: str
    fit: list[Any] = field(default_factory=list)
    holdout: list[Any] = field(default_factory=list)
    reference: list[Any] = field(default_factory=list)
    fp_means: list[torch.Tensor] = field(default_factory=list)
    metric: str = ""
    note: str = ""
    sync: BatchNormSync | None = None


def _is_classifier_output(output: Any) -> bool:
    """A plain ``[N, C]`` tensor with two or more classes: scored by KL of the softmax."""
    return isinstance(output, torch.Tensor) and output.dim() == 2 and output.shape[1] >= 2


def plan_batchnorm(
    model: nn.Module,
    batches: Sequence[Any],
    mode: str,
    forward_fn: ForwardFn | None = None,
    holdout: float = 0.25,
    holdout_samples: int = 256,
    sync: BatchNormSync | None = None,
) -> BatchNormPlan:
    """Record what ``mode`` will need from the FP ``model``, before its weights change.

    Nothing is recorded (and no forward pass run) for ``keep`` or for a model without BatchNorm.
    """
    if mode == "keep" or not batchnorm_layers(model):
        return BatchNormPlan(mode)
    if mode == "reestimate":
        return BatchNormPlan(mode, list(batches), sync=sync)
    if mode == "correct":
        return BatchNormPlan(mode, list(batches), fp_means=batch_input_means(model, batches, forward_fn),
                             sync=sync)
    total = sum(batch_size(b) for b in batches)
    held = min(holdout_samples, round(total * holdout))
    too_few = held < 1 or held >= total
    if sync is not None:  # every process must take the same path, or the collectives below would hang
        device = batchnorm_layers(model)[0].running_mean.device
        too_few = float(sync.sum(torch.tensor([float(too_few)], dtype=torch.float64, device=device))[0]) > 0
    if too_few:
        note = f"{total} calibration samples are too few to hold some back: trained statistics kept"
        log.warning("BatchNorm auto: %s", note)
        return BatchNormPlan(mode, note=note)
    fit, kept_back = split_batches(batches, held)
    forward = forward_fn or default_forward
    device = model_device(model)
    with torch.no_grad():
        reference = [detached_output(forward(model, to_device(b, device))) for b in kept_back]
    metric = "kl_div" if all(_is_classifier_output(r) for r in reference) else "output_mse"
    return BatchNormPlan(mode, fit, kept_back, reference, batch_input_means(model, fit, forward_fn), metric,
                         sync=sync)


def _score(model: nn.Module, plan: BatchNormPlan, forward_fn: ForwardFn | None
           ) -> tuple[dict[str, float], torch.Tensor]:
    """Fidelity of the model's current outputs on the held-back batches to the recorded FP outputs, and the loss
    of every held-back unit (a row's KL, or a sample's squared output change) for the paired comparison."""
    device = model_device(model)
    forward = forward_fn or default_forward
    units: list[torch.Tensor] = []
    terms = torch.zeros(3, dtype=torch.float64)
    with torch.no_grad():
        for batch, ref in zip(plan.holdout, plan.reference, strict=True):
            out = forward(model, to_device(batch, device))
            if plan.metric == "kl_div":
                terms += fidelity_terms(ref, out)
                units.append(row_kl(ref, out).cpu())
            else:
                units.append(sample_squared_change(out, ref, batch_size(batch)))
                terms += torch.tensor([0.0, float(sum(t.numel() for t in output_tensors(ref))), 0.0],
                                      dtype=torch.float64)
    losses = torch.cat(units)
    if plan.metric == "output_mse":
        terms[2] = losses.sum()
    if plan.sync is not None:
        terms = plan.sync.sum(terms.to(device)).cpu()
    if plan.metric == "kl_div":
        return fidelity_from_terms(terms), losses
    return {"output_mse": float(terms[2]) / max(1.0, float(terms[1]))}, losses


def _significantly_better(best: torch.Tensor, candidate: torch.Tensor, sync: BatchNormSync | None,
                          device: torch.device) -> bool:
    """Whether ``candidate``'s per-unit losses beat ``best``'s on the same units by `SIGNIFICANCE` standard errors."""
    gain = best - candidate
    sums = torch.stack([gain.sum(), gain.pow(2).sum(), torch.tensor(float(gain.numel()), dtype=torch.float64)])
    if sync is not None:
        sums = sync.sum(sums.to(device)).cpu()
    total, squares, n = (float(v) for v in sums)
    if n < 2:
        return False
    mean = total / n
    variance = max(0.0, (squares - n * mean**2) / (n - 1))
    return mean > 0 and mean >= SIGNIFICANCE * math.sqrt(variance / n)


def _apply(model: nn.Module, mode: str, plan: BatchNormPlan, forward_fn: ForwardFn | None) -> None:
    if mode == "reestimate":
        reestimate_batchnorm(model, plan.fit, forward_fn)
        if plan.sync is not None:
            plan.sync.statistics(model)
    elif mode == "correct":
        correct_batchnorm(model, plan.fit, plan.fp_means, forward_fn, plan.sync)


def settle_batchnorm(model: nn.Module, plan: BatchNormPlan, forward_fn: ForwardFn | None = None) -> dict[str, Any]:
    """Apply the planned BatchNorm step to the (quantized) model and say what was done.

    The returned dict (JSON-safe) has ``mode`` (asked), ``chosen`` (``"none"`` for a model without
    BatchNorm), ``layers`` (BatchNorm count) and, when ``auto`` measured, ``metric``, ``holdout_samples``,
    ``fit_samples`` and ``candidates``: the held-back fidelity of every candidate (``kl_div`` and
    ``top1_agreement``, or ``output_mse``); ``note`` when ``auto`` could not measure.
    """
    layers = batchnorm_layers(model)
    decision: dict[str, Any] = {"mode": plan.mode, "chosen": plan.mode if layers else "none", "layers": len(layers)}
    if not layers or plan.mode == "keep":
        return decision
    if plan.mode != "auto":
        _apply(model, plan.mode, plan, forward_fn)
        return decision
    if not plan.holdout:
        decision.update(chosen="keep", note=plan.note)
        return decision
    trained = [copy.deepcopy(m.state_dict()) for m in layers]
    states: dict[str, list[dict[str, torch.Tensor]]] = {}
    scores: dict[str, dict[str, float]] = {}
    losses: dict[str, torch.Tensor] = {}
    try:
        for mode in CANDIDATES:
            for m, state in zip(layers, trained, strict=True):
                m.load_state_dict(state)
            _apply(model, mode, plan, forward_fn)
            scores[mode], losses[mode] = _score(model, plan, forward_fn)
            states[mode] = [copy.deepcopy(m.state_dict()) for m in layers]
    except BaseException:
        for m, state in zip(layers, trained, strict=True):
            m.load_state_dict(state)
        raise
    chosen = CANDIDATES[0]
    device = model_device(model)
    for mode in CANDIDATES[1:]:
        if _significantly_better(losses[chosen], losses[mode], plan.sync, device):
            chosen = mode
    for m, state in zip(layers, states[chosen], strict=True):
        m.load_state_dict(state)
    decision.update(chosen=chosen, metric=plan.metric, candidates=scores,
                    holdout_samples=sum(batch_size(b) for b in plan.holdout),
                    fit_samples=sum(batch_size(b) for b in plan.fit))
    log.info("BatchNorm: auto chose %r (%s on %d held-back samples: %s)", chosen, plan.metric,
             decision["holdout_samples"], ", ".join(f"{k} {v[plan.metric]:.4g}" for k, v in scores.items()))
    return decision


@dataclass
class SettledBatchNorm:
    """What `settle_batchnorm` decided for one set of quantized weights and the BatchNorm buffers it left, so a
    model that ends with exactly those weights (mixed precision's measured check) takes them instead of
    measuring again."""

    decision: dict[str, Any]
    states: list[dict[str, torch.Tensor]]

    def restore(self, model: nn.Module) -> dict[str, Any]:
        """Load the settled buffers into ``model``'s BatchNorms and return the decision."""
        for m, state in zip(batchnorm_layers(model), self.states, strict=True):
            m.load_state_dict(state)
        return self.decision


def settle_and_record(model: nn.Module, plan: BatchNormPlan, forward_fn: ForwardFn | None = None
                      ) -> SettledBatchNorm:
    """`settle_batchnorm`, keeping the decision and the buffers it left."""
    decision = settle_batchnorm(model, plan, forward_fn)
    return SettledBatchNorm(decision, [copy.deepcopy(m.state_dict()) for m in batchnorm_layers(model)])


def settle_as_decided(model: nn.Module, plan: BatchNormPlan, decision: dict[str, Any],
                      forward_fn: ForwardFn | None = None) -> SettledBatchNorm:
    """Apply the mode an earlier `settle_batchnorm` chose (on other quantized weights of the same model)
    without measuring the candidates again: mixed precision's check gives the uniform assignment the step
    ``auto`` chose for the allocation, which saves one fit and score of every other candidate."""
    chosen = decision["chosen"]
    if chosen in CANDIDATES[1:]:
        _apply(model, chosen, plan, forward_fn)
    note = "mode chosen on the mixed-precision allocation's weights and applied as is"
    return SettledBatchNorm({**decision, "note": note} if "candidates" in decision else dict(decision),
                            [copy.deepcopy(m.state_dict()) for m in batchnorm_layers(model)])


def describe_batchnorm(decision: dict[str, Any]) -> str:
    """One line for tables and logs: what the BatchNorm step did and, under ``auto``, why."""
    if not decision["layers"]:
        return "BatchNorm: none in the model"
    text = f"BatchNorm ({decision['layers']} layers): {decision['mode']}"
    if "candidates" in decision:
        metric = decision["metric"]
        figures = ", ".join(f"{k} {v[metric]:.4g}" for k, v in decision["candidates"].items())
        text += f" -> {decision['chosen']} ({metric} on {decision['holdout_samples']} held-back samples: {figures})"
    elif decision.get("note"):
        text += f" -> {decision['chosen']} ({decision['note']})"
    return text
