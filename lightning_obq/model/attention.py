"""The projections of ``nn.MultiheadAttention`` as layers the rest of the library can quantize.

torch computes an attention module's input and output projections inside ``F.multi_head_attention_forward``
from the raw weights: ``in_proj_weight`` is a bare parameter, and ``out_proj`` is a Linear whose own forward is
never called. So no hook on them ever sees an input. `AttentionProjection` stands in for each of them: a Linear
whose ``weight`` *is* the attention module's parameter (writing it writes the model), and whose forward hooks are
hooks on the attention module that hand over the projection's input:

* ``in_proj``: the weight's three row blocks as three groups, each with its own input and Hessian: the query for
  the query rows, the key and the value for theirs (the same tensor in self-attention; in DETR-style attention the
  query and key carry a positional embedding and the value does not; in cross-attention the key and value are
  the memory, of its own length);
* ``out_proj``: the heads' concatenated output, computed by running the attention module once more with an
  identity output projection (one extra attention forward per calibration batch).

Attention modules whose query, key and value have different widths (``kdim``/``vdim``, separate q/k/v weights)
keep their input projection in float; their output projection is quantized like the others.
"""

from __future__ import annotations

import inspect
import math
import threading
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
from torch.utils.hooks import RemovableHandle

from lightning_obq.core.hessian import real_positions

ROLES = ("in_proj", "out_proj")

_ARGUMENTS = inspect.signature(nn.MultiheadAttention.forward)
_replaying = threading.local()  # set while `_replay` runs the attention module again


class AttentionProjection(nn.Linear):
    """One projection of ``attention`` (``role`` in `ROLES`) as a Linear layer for calibration and quantization.

    It owns no parameters: ``weight`` and ``bias`` are the attention module's, so the model's ``state_dict`` is
    unchanged and a quantized weight written here is in the model. The input projection has ``input_groups = 3``: its
    query, key and value rows are solved as three matrices, each for its own input. It is never called;
    `register_forward_hook` hooks the attention module instead and passes the hook ``(self, (projection input,),
    output)``, with the projection's output for ``out_proj`` (the attention output) and None for ``in_proj``
    (nothing here needs it, and it would cost a product per call).
    """

    def __init__(self, attention: nn.MultiheadAttention, role: str) -> None:
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        if role == "in_proj" and not attention._qkv_same_embed_dim:
            raise ValueError("an attention module with kdim/vdim different from embed_dim has separate q/k/v "
                             "weights; its input projection is not supported")
        nn.Module.__init__(self)
        # Not a submodule: registering the attention module here would make it its own descendant.
        object.__setattr__(self, "attention", attention)
        self.role = role
        self.in_features = attention.embed_dim
        self.out_features = self.weight.shape[0]
        self.input_groups = 3 if role == "in_proj" else 1  # query, key and value rows: `layer_groups`

    @property
    def weight(self) -> nn.Parameter:  # type: ignore[override]
        a = self.attention
        return a.in_proj_weight if self.role == "in_proj" else a.out_proj.weight

    @property
    def bias(self) -> nn.Parameter | None:  # type: ignore[override]
        a = self.attention
        return a.in_proj_bias if self.role == "in_proj" else a.out_proj.bias

    @property
    def state_key(self) -> str:
        """The weight's key in the attention module's ``state_dict``."""
        return "in_proj_weight" if self.role == "in_proj" else "out_proj.weight"

    def register_forward_hook(self, hook: Callable[..., Any], **kwargs: Any) -> RemovableHandle:  # type: ignore[override]
        """Hook the attention module: ``hook(self, (x,), y)`` after each of its calls, with this projection's
        input ``x`` (see the class docstring for ``y``). The hook's return value is ignored (the attention
        module's output stays as it is); ``kwargs`` (``prepend``, ``always_call``) go to the attention module's
        `nn.Module.register_forward_hook`."""

        def on_attention(module: nn.Module, args: tuple[Any, ...], call_kwargs: dict[str, Any], output: Any) -> None:
            if replaying():
                return
            if self.role == "in_proj":
                hook(self, (_projection_inputs(module, _ARGUMENTS.bind(module, *args, **call_kwargs).arguments),), None)
            else:
                hook(self, (_heads_output(module, args, call_kwargs),), output[0])

        return self.attention.register_forward_hook(on_attention, with_kwargs=True, **kwargs)

    def response(self, args: tuple[Any, ...], kwargs: dict[str, Any], output: torch.Tensor,
                 delta: torch.Tensor) -> torch.Tensor:
        """How much the attention module's output of one call (``args``/``kwargs``, its output ``output``) moves
        when this projection's weight changes by ``delta``: exactly ``heads @ delta^T`` for ``out_proj`` (the
        output is linear in it), the call again with ``weight + delta`` minus ``output`` for ``in_proj``."""
        if self.role == "out_proj":
            return nn.functional.linear(_heads_output(self.attention, args, kwargs), delta)
        return _replay(self.attention, {"in_proj_weight": self.weight.detach() + delta}, args, kwargs) - output

    def register_forward_pre_hook(self, hook: Callable[..., Any], **kwargs: Any) -> RemovableHandle:  # type: ignore[override]
        raise TypeError("AttentionProjection is never called; use register_forward_hook, which hooks the "
                        "attention module and passes the projection's input")

    def extra_repr(self) -> str:
        return f"{self.role} of {type(self.attention).__name__}, " + super().extra_repr()


def _projection_inputs(attention: nn.MultiheadAttention, arguments: dict[str, Any]) -> torch.Tensor:
    """Query, key and value stacked as ``[..., 3, E]``: each row block's input (`layer_columns` of a grouped
    Linear). A key and value of another length than the query (cross-attention to a memory) are brought to the
    longer length with zero positions, and each input is scaled by ``sqrt(longer / own length)``: the Hessian's
    running mean over the padded positions is then exactly each block's mean over its own positions (for inputs
    of varying lengths, each call weighs in with the longer of its two lengths). A nested batch enters as its real
    positions (`real_positions`)."""
    query, key, value = (real_positions(arguments[k]) for k in ("query", "key", "value"))
    if key.shape == query.shape and value.shape == query.shape:
        return torch.stack([query, key, value], dim=-2)
    axis = 1 if attention.batch_first and query.dim() == 3 else 0  # the sequence axis
    longest = max(query.shape[axis], key.shape[axis])

    def padded(x: torch.Tensor) -> torch.Tensor:
        pad = [0, 0] * (x.dim() - 1 - axis) + [0, longest - x.shape[axis]]
        return nn.functional.pad(x * math.sqrt(longest / x.shape[axis]), pad)

    return torch.stack([padded(query), padded(key), padded(value)], dim=-2)


def replaying() -> bool:
    """Whether the current attention call is one of this module's own replays (hooks should let it pass)."""
    return getattr(_replaying, "active", False)


def _replay(attention: nn.MultiheadAttention, params: dict[str, torch.Tensor], args: tuple[Any, ...],
            kwargs: dict[str, Any]) -> torch.Tensor:
    """The attention output of one call made again with some parameters replaced (``need_weights=False``: the
    weights are not needed, and torch then takes its fused kernel), without gradients or our hooks."""
    call = _ARGUMENTS.bind(attention, *args, **kwargs)
    call.arguments["need_weights"] = False  # however the caller passed it
    _replaying.active = True
    try:
        with torch.no_grad():
            out, _ = torch.func.functional_call(attention, params, call.args[1:], call.kwargs)
    finally:
        _replaying.active = False
    return out


def _heads_output(attention: nn.MultiheadAttention, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    """The input of ``attention``'s output projection for one call: the call again with that projection set to
    the identity."""
    out = attention.out_proj
    params = {"out_proj.weight": torch.eye(out.in_features, dtype=out.weight.dtype, device=out.weight.device)}
    if out.bias is not None:
        params["out_proj.bias"] = torch.zeros_like(out.bias)
    return _replay(attention, params, args, kwargs)


def attention_layers(name: str, attention: nn.MultiheadAttention) -> dict[str, AttentionProjection]:
    """The quantizable projections of one attention module named ``name``: ``<name>.in_proj`` (when its query,
    key and value share one width) and ``<name>.out_proj``."""
    prefix = f"{name}." if name else ""
    roles = ROLES if attention._qkv_same_embed_dim else ("out_proj",)
    return {f"{prefix}{role}": AttentionProjection(attention, role) for role in roles}


def find_projection(model: nn.Module, name: str) -> AttentionProjection | None:
    """The `AttentionProjection` that `attention_layers` names ``name`` in ``model``, or None if there is none."""
    parent, _, role = name.rpartition(".")
    if role not in ROLES:
        return None
    try:
        attention = model.get_submodule(parent)
    except AttributeError:
        return None
    if not isinstance(attention, nn.MultiheadAttention):
        return None
    return attention_layers(parent, attention).get(name)
