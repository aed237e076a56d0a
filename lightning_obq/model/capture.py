"""Calibration: which layers are quantized, the order the forward pass reaches them, and their Hessians.

`capture_layers` hooks the selected layers and accumulates each one's Hessian from its inputs; `quantize_model`
calls it per memory chunk (`chunks_by_memory`), `capture_hessians` once for reuse across runs.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn

from lightning_obq.core.config import QuantConfig
from lightning_obq.core.hessian import HessianAccumulator, record_layer_inputs, weight_matrix
from lightning_obq.model.attention import attention_layers
from lightning_obq.model.calibration import (
    ForwardFn,
    batch_size,
    cut_batches,
    draw_batches,
    model_device,
    removed_after,
    run_batches,
    slice_batch,
)
from lightning_obq.model.state import module_mode

PIECE_BYTES = 16 * 2**20
"""Largest quantized-layer output one CPU forward pass should produce (see `forward_pieces`)."""

log = logging.getLogger(__name__)

MIN_PIECE_SAMPLES = 8
"""Fewest samples per piece `forward_pieces` cuts a batch into (BatchNorm re-estimation runs on the pieces)."""


class _StopForward(Exception):
    """Raised by a hook once the layers of interest have seen their inputs, to skip the rest."""


def find_layers(model: nn.Module, config: QuantConfig) -> dict[str, nn.Module]:
    """Conv/Linear layers selected by the config's types and include/exclude name patterns.

    The projections of each ``nn.MultiheadAttention`` are among them as Linear layers named ``<attention>.in_proj``
    and ``<attention>.out_proj`` (`lightning_obq.model.attention`): torch computes them from the raw weights,
    where no hook on a layer sees an input, so they stand in for them. An attention module whose key and value
    widths differ from the query's keeps its input projection in float, with a warning naming it.
    """
    separate = [name for name, m in model.named_modules()
                if isinstance(m, nn.MultiheadAttention) and not m._qkv_same_embed_dim]
    if separate:
        shown = ", ".join(repr(n) for n in separate[:4]) + (", ..." if len(separate) > 4 else "")
        log.warning("%d nn.MultiheadAttention module(s) with kdim/vdim different from embed_dim keep their separate "
                    "q/k/v input projections in float (%s); their output projections are quantized",
                    len(separate), shown)
    inside_attention = {m.out_proj for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    candidates: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            candidates.update(attention_layers(name, module))
        elif module not in inside_attention:
            candidates[name] = module
    layers = {}
    for name, module in candidates.items():
        if not isinstance(module, config.module_types) or getattr(module, "weight", None) is None:
            continue
        if not any(fnmatch.fnmatchcase(name, p) for p in config.include):
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in config.exclude):
            continue
        layers[name] = module
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no layer to quantize (layer_types={list(config.layer_types)}, "
            f"include={list(config.include)}, exclude={list(config.exclude)})"
        )
    for pattern in config.pin:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in layers):
            shown = ", ".join(list(layers)[:8]) + (", ..." if len(layers) > 8 else "")
            raise ValueError(f"QuantConfig.pin pattern {pattern!r} matches no layer to quantize ({shown})")
    for name, module in layers.items():
        if not torch.isfinite(module.weight).all():
            raise ValueError(f"layer {name!r}: weight contains NaN or Inf")
    return layers


def capture_layers(
    model: nn.Module,
    layers: dict[str, nn.Module],
    batches: list[Any],
    forward_fn: ForwardFn | None,
    calls: dict[str, int] | None = None,
    position_fraction: float = 1.0,
) -> dict[str, HessianAccumulator]:
    """Hessians of ``layers`` from one pass over ``batches``.

    With ``calls`` (calls per forward of each layer), the forward stops as soon as every layer of
    interest has seen all its inputs of the batch; the rest of the model is not run.
    """
    accs = {name: HessianAccumulator(m, name, position_fraction=position_fraction) for name, m in layers.items()}
    seen: dict[str, int] = {}

    def make_hook(name: str):
        def on_input(x: torch.Tensor) -> None:
            accs[name].update(x)
            if calls is not None:
                seen[name] = seen.get(name, 0) + 1
                if all(seen.get(n, 0) >= calls[n] for n in layers):
                    raise _StopForward

        return on_input

    with removed_after([h for name, m in layers.items() for h in record_layer_inputs(m, make_hook(name))]):
        for batch in batches:
            seen.clear()
            run_batches(model, [batch], forward_fn, stop=_StopForward if calls is not None else None)
    return accs


def capture_hessians(
    model: nn.Module,
    calibration: Iterable[Any],
    config: QuantConfig | None = None,
    forward_fn: ForwardFn | None = None,
) -> dict[str, HessianAccumulator]:
    """The Hessians `quantize_model` would capture in one-pass mode, to reuse with ``hessians=``.

    A sweep over methods, bit widths or budgets on one model then calibrates once instead of once per
    run (the Hessians depend only on the FP model, the calibration data and the config's layer
    selection and ``position_fraction``). All Hessians are held at once, whatever ``hessian_memory_mb``.
    """
    config = config or QuantConfig()
    layers = find_layers(model, config)
    with module_mode(model):
        batches = forward_pieces(model, layers, draw_batches(calibration, config.calib_samples), forward_fn,
                                 config.forward_batch)
        return capture_layers(model, layers, batches, forward_fn, None, config.position_fraction)


def forward_pieces(
    model: nn.Module,
    layers: dict[str, nn.Module],
    batches: list[Any],
    forward_fn: ForwardFn | None,
    forward_batch: int | None,
) -> list[Any]:
    """The calibration batches cut into the pieces every calibration pass runs (`QuantConfig.forward_batch`).

    ``None`` sizes the pieces on CPU so that the largest output of a quantized layer stays under `PIECE_BYTES`
    (at least `MIN_PIECE_SAMPLES` samples), measured on that many samples of the first batch: CPU convolutions over
    feature maps that overflow the caches run several times slower (EfficientNet-Lite2 at 260 px: a forward
    pass over 64 crops takes 13 s in batches of 32 and 5 s in pieces of 8). Other devices keep the loader's
    batches, which is what they run fastest.
    """
    if forward_batch is None:
        if model_device(model).type != "cpu" or batch_size(batches[0]) <= MIN_PIECE_SAMPLES:
            return batches
        largest = [1]

        def record(module: nn.Module, inputs: Any, output: Any) -> None:
            if isinstance(output, torch.Tensor):
                largest[0] = max(largest[0], output.numel() * output.element_size())

        # A piece of the smallest size, not one sample: some models only run on batches of several.
        with removed_after([m.register_forward_hook(record) for m in layers.values()]):
            run_batches(model, [slice_batch(batches[0], 0, MIN_PIECE_SAMPLES)], forward_fn)
        forward_batch = max(MIN_PIECE_SAMPLES, PIECE_BYTES * MIN_PIECE_SAMPLES // largest[0])
    return cut_batches(batches, forward_batch)


def execution_order(
    model: nn.Module, layers: dict[str, nn.Module], batch: Any, forward_fn: ForwardFn | None
) -> dict[str, int]:
    """Layers in the order the forward pass first calls them, with calls per forward (0 if never)."""
    calls: dict[str, int] = {}
    handles = []
    for name, module in layers.items():
        def hook(module: nn.Module, inputs: Any, output: Any, name: str = name) -> None:
            calls[name] = calls.get(name, 0) + 1
        handles.append(module.register_forward_hook(hook))
    with removed_after(handles):
        run_batches(model, [batch], forward_fn)
    ordered = dict(calls)
    ordered.update({name: 0 for name in layers if name not in calls})
    return ordered


def chunks_by_memory(layers: dict[str, nn.Module], budget_mb: float) -> list[list[str]]:
    """Consecutive groups of layers whose float32 Hessians fit in ``budget_mb`` together."""
    chunks: list[list[str]] = [[]]
    used = 0.0
    for name, m in layers.items():
        w = weight_matrix(m)
        mb = w.shape[0] * w.shape[2] ** 2 * 4 / 2**20
        if chunks[-1] and used + mb > budget_mb:
            chunks.append([])
            used = 0.0
        chunks[-1].append(name)
        used += mb
    return chunks
