"""Layer Hessians ``H = 2/N X X^T`` captured from calibration inputs with forward hooks.

Every supported layer is seen as ``G`` independent matrices (``G`` = conv groups, 1 for Linear):
inputs become ``X`` of shape ``[G, d_col, N]`` with the same column order as
``weight.reshape(G, d_row / G, d_col)``, and the Hessian is ``[G, d_col, d_col]``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

ConvNd = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_FUNCTIONS = (F.conv1d, F.conv2d, F.conv3d)
_PLAIN_FORWARDS = (nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward, nn.Linear.forward)


def layer_groups(module: nn.Module) -> int:
    """Number of independent weight matrices of a layer: a conv's groups; for a Linear 1, or its ``input_groups``
    when it has row blocks with inputs of their own (an attention module's query, key and value rows). A Linear's
    own ``groups`` attribute, should a subclass have one, means nothing here."""
    return module.groups if isinstance(module, ConvNd) else getattr(module, "input_groups", 1)


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The layer weight as ``[G, d_row / G, d_col]`` (a view when possible)."""
    w = module.weight
    g = layer_groups(module)
    return w.reshape(g, w.shape[0] // g, -1)


def _conv_columns(
    module: nn.Conv1d | nn.Conv2d | nn.Conv3d, x: torch.Tensor, buffer: torch.Tensor | None = None
) -> torch.Tensor:
    """Patches of a conv input as ``[G, C_in/G * prod(kernel), B * prod(out)]``.

    Padding follows the module exactly (``'same'``, ``'valid'``, numbers, and non-zero padding modes);
    kernels are gathered by strided slicing, which serves 1d/2d/3d and dilation with one code path.

    Speed: the input is first made channel-major (``[C, B, *spatial]``, a copy of the small input), then
    each kernel offset is copied once into a preallocated ``[C, K, B, *out]`` buffer whose flat view is
    already the result, so the large patch tensor is written exactly once (no stack-then-permute). A
    1x1 conv needs no patches at all: its columns are the (strided) channel-major input itself. A flat
    ``buffer`` with room for the patches is written instead of a new tensor (the result is then a view of it).
    """
    nd = len(module.kernel_size)
    if x.dim() == nd + 1:  # unbatched input
        x = x.unsqueeze(0)
    if module.padding == "valid":
        pad = [0] * (2 * nd)
    elif module.padding == "same" or module.padding_mode != "zeros":
        pad = list(module._reversed_padding_repeated_twice)
    else:
        pad = [p for p in reversed(module.padding) for _ in range(2)]
    if any(pad):
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, pad, mode=mode)
    b, c = x.shape[:2]
    spatial = x.shape[2:]
    out = [
        (spatial[i] - module.dilation[i] * (module.kernel_size[i] - 1) - 1) // module.stride[i] + 1
        for i in range(nd)
    ]
    g = module.groups
    xc = x.transpose(0, 1)  # [C, B, *spatial], a view
    if all(k == 1 for k in module.kernel_size):
        index = tuple(slice(None, o * s, s) for o, s in zip(out, module.stride, strict=True))
        # reshape copies only when the view is not flat already (B > 1 or a stride); no im2col.
        return xc[(slice(None), slice(None), *index)].reshape(g, c // g, -1)
    offsets = list(itertools.product(*(range(k) for k in module.kernel_size)))
    shape = (c, len(offsets), b, *out)
    needed = c * len(offsets) * b * math.prod(out)
    if buffer is not None and buffer.numel() >= needed and buffer.dtype == x.dtype and buffer.device == x.device:
        patches = buffer[:needed].view(shape)
    else:
        patches = x.new_empty(shape)
    xc = xc.contiguous()  # channel-major once (free when B == 1), so each offset is a cheap strided read
    for k, offset in enumerate(offsets):
        index = tuple(
            slice(o * d, o * d + (n - 1) * s + 1, s)
            for o, d, n, s in zip(offset, module.dilation, out, module.stride, strict=True)
        )
        patches[:, k].copy_(xc[(slice(None), slice(None), *index)])
    return patches.view(g, (c // g) * len(offsets), -1)


def real_positions(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself, or for a nested tensor (torch's Transformer encoder runs a batch with a padding mask as one, in
    inference) its sequences' positions concatenated, ``[positions, features]``: the padding is not part of it."""
    return torch.cat(x.unbind()) if x.is_nested else x


def layer_columns(module: nn.Module, x: torch.Tensor, buffer: torch.Tensor | None = None) -> torch.Tensor:
    """Layer input as ``[G, d_col, N]`` columns such that the output is ``W @ X`` per group.

    A grouped Linear's input holds each group's own input stacked on the second-to-last axis, ``[..., G, d_col]``.

    ``buffer`` (flat, the input's dtype) may receive a conv's patches instead of a new tensor.
    """
    if isinstance(module, ConvNd):
        return _conv_columns(module, x, buffer)
    if isinstance(module, nn.Linear):
        g = layer_groups(module)
        if g == 1:
            return x.reshape(-1, x.shape[-1]).t().unsqueeze(0)
        return x.reshape(-1, g, x.shape[-1]).permute(1, 2, 0)  # [..., G, d_col]: each group's input, stacked
    raise TypeError(f"unsupported layer type {type(module).__name__}")


PATCH_BLOCK_BYTES = 64 * 2**20
"""Conv patches are built for this many bytes of batch items at a time (at least one item) and accumulated
block by block. Building a whole batch's patches at once wrote gigabytes per depthwise layer on
EfficientNet-sized maps (a fresh allocation each time, every page faulted in); blocks that reuse one buffer
made the Hessian capture of EfficientNet-Lite2 about twice as fast on the 2-core host."""


def _batch_blocks(module: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """``x`` split along the batch so that each block's conv patches take about `PATCH_BLOCK_BYTES`."""
    if not isinstance(module, ConvNd) or x.dim() != len(module.kernel_size) + 2:
        return [x]  # Linear columns and unbatched inputs are views or one small copy
    stride = math.prod(module.stride)
    per_item = x[0].numel() * math.prod(module.kernel_size) * x.element_size() // stride
    items = max(1, PATCH_BLOCK_BYTES // max(1, per_item))
    return list(x.split(items)) if items < x.shape[0] else [x]


SYMMETRIC_BLOCK = 576  # rows per block of the symmetric update; smaller matrices use one plain GEMM


def symmetric_update(
    h: torch.Tensor, x: torch.Tensor, beta: float, alpha: float, block: int | None = None
) -> torch.Tensor:
    """In place ``h <- beta * h + alpha * x x^T`` for ``h [G, d, d]`` and ``x [G, d, m]``, symmetric.

    Like BLAS ``syrk``, only the upper block triangle is computed: block row ``i`` gets
    ``x_i x_{i:}^T`` with one GEMM, so about half of the multiply-adds of ``x x^T`` are skipped for
    large ``d``; the strict lower triangle is then mirrored from the upper one (``O(d^2)``, negligible
    next to ``O(m d^2)``). Matrices with ``d < 2 * block`` use one plain GEMM, which is as fast there.
    ``block`` defaults to `SYMMETRIC_BLOCK` (576 was the fastest on the 2-core AVX-512 benchmark host).
    """
    block = SYMMETRIC_BLOCK if block is None else block
    d = h.shape[-1]
    if d < 2 * block:
        return h.baddbmm_(x, x.transpose(1, 2), beta=beta, alpha=alpha)
    starts = range(0, d, block)
    for i0 in starts:
        i1 = min(i0 + block, d)
        h[:, i0:i1, i0:].baddbmm_(x[:, i0:i1], x[:, i0:].transpose(1, 2), beta=beta, alpha=alpha)
    for i0 in starts:
        i1 = min(i0 + block, d)
        h[:, i1:, i0:i1] = h[:, i0:i1, i1:].transpose(1, 2)
    return h


class HessianAccumulator:
    """Running ``2/N X X^T`` of one layer, updated batch by batch without storing activations.

    The running mean is rescaled in the same fused GEMM as each update
    (``H <- H n/(n+m) + 2/(n+m) X X^T``, `symmetric_update`), which keeps every entry at the scale of
    one average term instead of a sum over all samples, so float32 stays accurate over long runs.
    ``position_fraction < 1`` keeps that share of each batch's input columns (a seeded random subset):
    an unbiased, cheaper, noisier Hessian.
    """

    def __init__(
        self, module: nn.Module, name: str = "", dtype: torch.dtype = torch.float32, position_fraction: float = 1.0,
        seed: int = 0,
    ) -> None:
        if not 0.0 < position_fraction <= 1.0:
            raise ValueError(f"position_fraction must be in (0, 1], got {position_fraction!r}")
        self.module = module
        self.name = name
        self.dtype = dtype
        self.position_fraction = position_fraction
        self._generator = torch.Generator().manual_seed(seed)
        self.hessian: torch.Tensor | None = None
        self.columns = 0  # N: input columns (positions) seen
        self.samples = 0  # batch items seen

    def update(self, x: torch.Tensor) -> None:
        """Add one batch of layer inputs (conv patches block by block, `_batch_blocks`)."""
        x = x.detach()
        items = x.size(0) if x.is_nested else None
        x = real_positions(x)
        blocks = _batch_blocks(self.module, x)
        buffer = None  # the first block's patches, rewritten by the later (never larger) blocks
        columns_before = self.columns
        for block in blocks:
            raw = layer_columns(self.module, block, buffer)
            if buffer is None and len(blocks) > 1 and raw.is_contiguous() \
                    and raw.untyped_storage().data_ptr() != x.untyped_storage().data_ptr():
                buffer = raw.view(-1)
            self._add_columns(raw.to(self.dtype))
        if self.columns == columns_before:
            return
        # A NaN or Inf input reaches H; checking the d x d Hessian is cheaper than every input of a big map.
        if not torch.isfinite(self.hessian).all():
            raise ValueError(f"layer {self.name!r}: calibration input contains NaN or Inf")
        is_batched = not (isinstance(self.module, ConvNd) and x.dim() == len(self.module.kernel_size) + 1)
        self.samples += items if items is not None else x.shape[0] if is_batched and x.dim() > 1 else 1

    def _add_columns(self, cols: torch.Tensor) -> None:
        """Fold ``[G, d_col, m]`` columns into the running mean (a seeded subset under ``position_fraction``)."""
        if self.position_fraction < 1.0 and cols.shape[-1] > 1:
            keep = max(1, round(cols.shape[-1] * self.position_fraction))
            index = torch.randperm(cols.shape[-1], generator=self._generator)[:keep].sort().values
            cols = cols.index_select(-1, index.to(cols.device))
        m = cols.shape[-1]
        if m == 0:
            return
        if self.hessian is None:
            g, d, _ = cols.shape
            self.hessian = torch.zeros(g, d, d, dtype=self.dtype, device=cols.device)
        n = self.columns
        symmetric_update(self.hessian, cols, beta=n / (n + m), alpha=2.0 / (n + m))
        self.columns = n + m

    def register(self) -> list[RemovableHandle]:
        """Hook the layer so every forward adds its input (`record_layer_inputs`); remove the handles to stop."""
        return record_layer_inputs(self.module, self.update)


class _ConvCallInput(TorchFunctionMode):
    """Catches the input of the first conv call with a weight shaped like ``weight``, inside one forward."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.shape = weight.shape
        self.input: torch.Tensor | None = None

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if self.input is None and func in _CONV_FUNCTIONS:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            if isinstance(weight, torch.Tensor) and weight.shape == self.shape:
                self.input = args[0] if args else kwargs["input"]
        return func(*args, **kwargs)


def record_layer_inputs(module: nn.Module, on_input: Callable[[torch.Tensor], None]) -> list[RemovableHandle]:
    """Forward hooks that call ``on_input(x)`` with the tensor the layer's weight is applied to.

    For `nn.Linear` and the plain convs that is the module's input. A conv subclass with its own ``forward`` may
    transform the input first: TF-style "same" convs (EfficientNet-Lite, timm's ``Conv2dSame``) pad it inside
    ``forward`` and call the conv with ``padding=0``. Their Hessian must see the padded input, or the border
    positions are missing from it, so for those the input of the conv call itself is caught during the forward
    (a `TorchFunctionMode` active only inside that module). Exceptions raised by ``on_input`` propagate.
    """
    if type(module).forward in _PLAIN_FORWARDS or not isinstance(module, ConvNd):
        return [module.register_forward_hook(lambda m, inputs, output: on_input(inputs[0]))]
    active: list[_ConvCallInput] = []

    def enter(m: nn.Module, inputs: tuple[Any, ...]) -> None:
        active.append(_ConvCallInput(m.weight))
        active[-1].__enter__()

    def leave(m: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        if not active:
            return
        mode = active.pop()
        mode.__exit__(None, None, None)
        on_input(inputs[0] if mode.input is None else mode.input)

    return [module.register_forward_pre_hook(enter), module.register_forward_hook(leave, always_call=True)]


def damp_hessian(h: torch.Tensor, damp: float, mode: str) -> torch.Tensor:
    """A damped copy: ``damp`` (absolute) or ``damp * mean(diag)`` (relative) added to each diagonal."""
    h = h.clone()
    diag = h.diagonal(dim1=-2, dim2=-1)
    if mode == "relative":
        diag.add_(damp * diag.mean(-1, keepdim=True))
    else:
        diag.add_(damp)
    return h
