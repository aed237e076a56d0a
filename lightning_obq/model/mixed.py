"""Mixed precision: choose each layer's bit width to minimise the predicted model loss under a size budget.

The FastOBQ layer objective ``err_l(b) = tr((W-Q_b) H (W-Q_b)^T)`` is measured in the layer's own output
units. Layers differ in how much an error at their output moves the model's output (a BN that scales
up, a residual branch, the classifier head), so each layer gets a gain measured on calibration data:

    gain_l = E||f(x; W_l -> Q_l) - f(x)||^2 / err_l(b_ref)

i.e. the model-output error caused by quantizing that layer alone, per unit of layer objective. The
predicted loss of a bit width is ``gain_l * derr_l(b)``, with ``derr`` the same objective with the solve's
damped ``H``: the undamped one is measured on the very samples the solve fitted, and where a layer sees fewer
samples than inputs (a classifier head after pooling) it is several times below the error on new data at every
width, so that layer got the fewest bits (EfficientNet-Lite1's 1280-input head at 2 bits under a 4.0-bit
budget); the damped one follows the error on new data much more closely there and equals the undamped one
on layers whose ``diag(H)`` is large against the damping. This output-perturbation measure was chosen over a
Hessian trace because it needs no labels and no backward pass, it uses the very quantized weights that
will be deployed, and its cost is one forward pass per layer over a few calibration batches.

Measuring every gain exactly costs one forward pass over the sensitivity samples per layer, which on a
depthwise network of 50-100 layers is most of a mixed-precision run. Above `EXACT_GAIN_LAYERS` layers
(``QuantConfig.gains="auto"``) the gains come from a first-order estimate instead: quantizing layer ``l``
moves the output by about ``J_l u_l`` (``u_l``: the layer's own output change, ``J_l``: the Jacobian of
the model output with respect to the layer output), and for a Gaussian probe ``r``,
``E[(r . J_l u_l)^2] = ||J_l u_l||^2`` with ``r . J_l u_l = (J_l^T r) . u_l``: one backward pass of ``r . f``
gives that product for every layer at once (Hutchinson's estimator). A few probes per batch cost a few
forward-equivalents whatever the number of layers. An attention module's projections have no output tensor of
their own in the graph (torch computes them inside the attention function), so for them ``u_l`` and ``J_l`` are
taken at the attention module's output (`AttentionProjection.response`). It ignores how the layer's error is
bent by the nonlinearities after it, so it is kept for networks where the exact measurement is too costly. The
allocation is still checked by measuring it against uniform (see `lightning_obq.model.quantize`), which does
not rely on this approximation.

The allocation itself is a multiple-choice knapsack solved exactly by dynamic programming over the
Pareto front of (size, predicted loss) pairs.
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from lightning_obq.model.attention import AttentionProjection, replaying
from lightning_obq.model.batchnorm import batchnorm_layers
from lightning_obq.model.calibration import (
    ForwardFn,
    batch_size,
    default_forward,
    draw_batches,
    flat_output,
    model_device,
    removed_after,
    slice_batch,
    squared_output_change,
    to_device,
)

GAIN_PROBES = 2
"""Gaussian probes per batch of the first-order gain estimate."""

LINEAR_GAIN_SAMPLES = 128
"""Sensitivity samples the first-order estimate uses at most: with `GAIN_PROBES` probes each, 256 probe-samples
(about 9 % relative noise per gain, far below the orders of magnitude between layers), at 6 forward-equivalents
per sample instead of 10 for four probes over all 256."""

EXACT_GAIN_LAYERS = 32
"""``gains="auto"`` measures exactly up to this many layers (one forward pass each), then estimates."""

GAIN_CHUNK = 16
"""Samples per forward/backward pass of the first-order estimate (bounds the autograd graph's memory)."""


def layer_size_bits(numel: int, n_scales: int, bits: int) -> float:
    """Storage of one quantized layer in bits: codes plus a float32 scale and zero point per grid."""
    return numel * bits + 2 * 32 * n_scales


def allocate_bits(
    sizes: Sequence[Sequence[float]],
    losses: Sequence[Sequence[float]],
    options: Sequence[Sequence[int]],
    budget_bits: float,
) -> tuple[list[int], float, float]:
    """Exact multiple-choice knapsack: one option per layer, total size <= budget, least total loss.

    ``sizes[l][k]``/``losses[l][k]`` describe option ``k`` (bit width ``options[l][k]``) of layer ``l``.
    The DP keeps, after each layer, only allocations that no other allocation beats in both size and
    loss (the Pareto front), which is exact and small in practice. Returns (chosen bits, size, loss).
    """
    front_size = np.zeros(1)
    front_loss = np.zeros(1)
    back: list[tuple[np.ndarray, np.ndarray]] = []
    for size_l, loss_l in zip(sizes, losses, strict=True):
        s = (front_size[:, None] + np.asarray(size_l)[None, :]).ravel()
        lo = (front_loss[:, None] + np.asarray(loss_l)[None, :]).ravel()
        parent = np.repeat(np.arange(front_size.size), len(size_l))
        choice = np.tile(np.arange(len(size_l)), front_size.size)
        keep = s <= budget_bits
        if not keep.any():
            return [], float("inf"), float("inf")
        s, lo, parent, choice = s[keep], lo[keep], parent[keep], choice[keep]
        order = np.lexsort((lo, s))
        s, lo, parent, choice = s[order], lo[order], parent[order], choice[order]
        best_so_far = np.minimum.accumulate(lo)
        pareto = np.ones(s.size, dtype=bool)
        pareto[1:] = lo[1:] < best_so_far[:-1]
        front_size, front_loss = s[pareto], lo[pareto]
        back.append((parent[pareto], choice[pareto]))
    best = int(np.argmin(front_loss))
    size, loss = float(front_size[best]), float(front_loss[best])
    picks = []
    for parent, choice in reversed(back):
        picks.append(int(choice[best]))
        best = int(parent[best])
    picks.reverse()
    return [options[layer][k] for layer, k in enumerate(picks)], size, loss


def pinned_bits(name: str, pins: Mapping[str, int]) -> int | None:
    """Bit width pinned for a layer by the first matching pattern, if any."""
    for pattern, bits in pins.items():
        if fnmatch.fnmatchcase(name, pattern):
            return bits
    return None


def _output_change(
    model: nn.Module,
    swaps: Mapping[nn.Module, torch.Tensor],
    batches: Sequence[Any],
    reference: Sequence[torch.Tensor],
    forward: ForwardFn,
    settle: Callable[[], Any] | None = None,
) -> float:
    """Mean squared change of the model output with each module's weight swapped in.

    ``settle()``, if given, runs after the swap (the BatchNorm step `quantize_model` gives the final
    model). Weights and BN buffers are restored afterwards.
    """
    originals = {m: m.weight.detach().clone() for m in swaps}
    bn_state = [(m, copy.deepcopy(m.state_dict())) for m in batchnorm_layers(model)] if settle else []
    try:
        for module, weight in swaps.items():
            module.weight.data.copy_(weight)
        if settle is not None:
            settle()
        diff, _ = squared_output_change(model, batches, reference, forward)
    finally:
        for module, weight in originals.items():
            module.weight.data.copy_(weight)
        for module, state in bn_state:
            module.load_state_dict(state)
    return diff / max(1, sum(r.numel() for r in reference))


def output_changes(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    assignments: Sequence[Mapping[str, torch.Tensor]],
    batches: Sequence[Any],
    forward_fn: ForwardFn | None = None,
    settle: Callable[[], Any] | None = None,
) -> list[float]:
    """Mean squared model-output change for each assignment of quantized weights (layer name -> weight).

    This is the measured counterpart of the predicted loss: all layers of an assignment are swapped in
    together, so interactions the additive prediction ignores are included, and ``settle()`` (if given)
    runs after each swap, so each assignment gets the BatchNorm step the final model would get. The
    model is left as it was.
    """
    forward = forward_fn or default_forward
    device = model_device(model)
    batches = [to_device(b, device) for b in batches]
    with torch.no_grad():
        reference = [flat_output(forward(model, b)) for b in batches]
        return [_output_change(model, {layers[n]: w for n, w in a.items()}, batches, reference, forward, settle)
                for a in assignments]


def output_gains(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    quantized: Mapping[str, torch.Tensor],
    layer_errors: Mapping[str, float],
    batches: Sequence[Any],
    forward_fn: ForwardFn | None = None,
    method: str = "exact",
) -> dict[str, float]:
    """Model-output squared error per unit of layer objective, quantizing one layer at a time.

    ``method="exact"`` measures each layer's output change with one forward pass per layer,
    ``"linear"`` estimates all of them from the same few passes (`linear_output_changes`), ``"auto"``
    takes ``"linear"`` above `EXACT_GAIN_LAYERS` layers.
    """
    names = list(layers)
    if method == "auto":
        method = "linear" if len(names) > EXACT_GAIN_LAYERS else "exact"
    if method == "linear":
        estimated = linear_output_changes(model, layers, quantized, draw_batches(batches, LINEAR_GAIN_SAMPLES),
                                          forward_fn)
        changes = [estimated[n] for n in names]
    else:
        changes = output_changes(model, layers, [{n: quantized[n]} for n in names], batches, forward_fn)
    return {n: change / layer_errors[n] if layer_errors[n] > 0 else 0.0
            for n, change in zip(names, changes, strict=True)}


def _layer_response(module: nn.Module, inputs: tuple[Any, ...], delta: torch.Tensor) -> torch.Tensor:
    """What a Conv/Linear layer adds to its output when its weight changes by ``delta``: the layer's own
    forward with weight ``delta`` and a zero bias, so a subclass that pads in its forward (TensorFlow-style
    'same' convs, as in EfficientNet-Lite) gets its own geometry. Forward hooks do fire for this call."""
    params = {"weight": delta}
    if getattr(module, "bias", None) is not None:
        params["bias"] = torch.zeros_like(module.bias)
    return torch.func.functional_call(module, params, inputs)


def linear_output_changes(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    quantized: Mapping[str, torch.Tensor],
    batches: Sequence[Any],
    forward_fn: ForwardFn | None = None,
    probes: int = GAIN_PROBES,
    seed: int = 0,
) -> dict[str, float]:
    """First-order estimate of each layer's `output_changes` entry when only that layer is quantized.

    Same units as `output_changes` (mean squared change per output element); see the module docstring
    for the estimator. Deterministic for a seed; the model, its weights and ``requires_grad`` flags are
    left as they were.
    """
    forward = forward_fn or default_forward
    device = model_device(model)
    generator = torch.Generator().manual_seed(seed)
    by_module = {m: n for n, m in layers.items()}
    deltas = {n: (quantized[n].to(m.weight.dtype) - m.weight.detach()).reshape(m.weight.shape)
              for n, m in layers.items()}
    totals = dict.fromkeys(layers, 0.0)
    elements = 0
    outputs: dict[str, torch.Tensor] = {}
    responses: dict[str, torch.Tensor] = {}

    responding = [False]

    def hook(module: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor | None:
        if responding[0]:  # the call from `_layer_response` itself
            return None
        name = by_module[module]
        responding[0] = True
        try:
            with torch.no_grad():
                responses[name] = _layer_response(module, inputs, deltas[name])
        finally:
            responding[0] = False
        outputs[name] = output
        return output.clone()  # later in-place ops (ReLU(inplace=True)) must not alter the tensor we differentiate

    def attention_hook(name: str, projection: AttentionProjection) -> Callable[..., Any]:
        def call(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
            if replaying():
                return None
            responses[name] = projection.response(args, kwargs, output[0].detach(), deltas[name])
            outputs[name] = output[0]
            return (output[0].clone(), *output[1:])

        return call

    def register(name: str, m: nn.Module) -> Any:
        if isinstance(m, AttentionProjection):  # hooked where its response shows: the attention module's output
            return m.attention.register_forward_hook(attention_hook(name, m), with_kwargs=True)
        return m.register_forward_hook(hook)

    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        with removed_after([register(n, m) for n, m in layers.items()]):
            for m in layers.values():
                m.weight.requires_grad_(True)  # so every layer output is part of the graph
            for batch in batches:
                n = batch_size(batch)
                for start in range(0, n, GAIN_CHUNK):
                    chunk = to_device(slice_batch(batch, start, start + GAIN_CHUNK), device)
                    outputs.clear()
                    responses.clear()
                    with torch.enable_grad():
                        flat = flat_output(forward(model, chunk), detach=False)
                        elements += flat.numel()
                        names = [k for k in outputs if outputs[k].requires_grad]
                        for k in range(probes):
                            r = torch.randn(flat.shape, generator=generator).to(flat.device)
                            grads = torch.autograd.grad((flat * r).sum(), [outputs[k2] for k2 in names],
                                                        retain_graph=k < probes - 1, allow_unused=True)
                            for name, g in zip(names, grads, strict=True):
                                if g is not None:
                                    per_sample = (g * responses[name]).reshape(g.shape[0], -1).sum(dim=1)
                                    totals[name] += float(per_sample.double().square().sum()) / probes
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
    return {n: t / max(1, elements) for n, t in totals.items()}
