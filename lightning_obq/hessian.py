"""Layer Hessians ``H = 2/N X X^T`` captured from calibration inputs with forward hooks.

Every supported layer is seen as ``G`` independent matrices (``G`` = conv groups, 1 for Linear):
inputs become ``X`` of shape ``[G, d_col, N]`` with the same column order as
``weight.reshape(G, d_row / G, d_col)``, and the Hessian is ``[G, d_col, d_col]``.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn as nn
import torch.nn.functional as F

ConvNd = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def layer_groups(module: nn.Module) -> int:
    """Number of independent weight matrices of a layer (conv groups, 1 for Linear)."""
    return module.groups if isinstance(module, ConvNd) else 1


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The layer weight as ``[G, d_row / G, d_col]`` (a view when possible)."""
    w = module.weight
    g = layer_groups(module)
    return w.reshape(g, w.shape[0] // g, -1)


def _conv_columns(module: nn.Conv1d | nn.Conv2d | nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    """Patches of a conv input as ``[G, C_in/G * prod(kernel), B * prod(out)]``.

    Padding follows the module exactly (``'same'``, ``'valid'``, numbers, and non-zero padding modes);
    kernels are gathered by strided slicing, which serves 1d/2d/3d and dilation with one code path.
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
    if all(k == 1 for k in module.kernel_size):
        index = tuple(slice(None, o * s, s) for o, s in zip(out, module.stride, strict=True))
        patches = x[(slice(None), slice(None), *index)].unsqueeze(2)
    else:
        slices = []
        for offset in itertools.product(*(range(k) for k in module.kernel_size)):
            index = tuple(
                slice(o * d, o * d + (n - 1) * s + 1, s)
                for o, d, n, s in zip(offset, module.dilation, out, module.stride, strict=True)
            )
            slices.append(x[(slice(None), slice(None), *index)])
        patches = torch.stack(slices, dim=2)  # [B, C, K, *out]
    g = module.groups
    k = patches.shape[2]
    patches = patches.reshape(b, g, c // g, k, -1)  # [B, G, C/G, K, L]
    return patches.permute(1, 2, 3, 0, 4).reshape(g, (c // g) * k, -1)


def layer_columns(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Layer input as ``[G, d_col, N]`` columns such that the output is ``W @ X`` per group."""
    if isinstance(module, ConvNd):
        return _conv_columns(module, x)
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1]).t().unsqueeze(0)
    raise TypeError(f"unsupported layer type {type(module).__name__}")


class HessianAccumulator:
    """Running ``2/N X X^T`` of one layer, updated batch by batch without storing activations.

    The running mean is rescaled before each update (``H <- H n/(n+m) + 2/(n+m) X X^T``), which
    keeps every entry at the scale of one average term instead of a sum over all samples.
    """

    def __init__(self, module: nn.Module, name: str = "", dtype: torch.dtype = torch.float32) -> None:
        self.module = module
        self.name = name
        self.dtype = dtype
        self.hessian: torch.Tensor | None = None
        self.columns = 0  # N: input columns (positions) seen
        self.samples = 0  # batch items seen

    def update(self, x: torch.Tensor) -> None:
        """Add one batch of layer inputs."""
        if not torch.isfinite(x).all():
            raise ValueError(f"layer {self.name!r}: calibration input contains NaN or Inf")
        cols = layer_columns(self.module, x.detach()).to(self.dtype)
        m = cols.shape[-1]
        if m == 0:
            return
        if self.hessian is None:
            g, d, _ = cols.shape
            self.hessian = torch.zeros(g, d, d, dtype=self.dtype, device=cols.device)
        n = self.columns
        self.hessian.mul_(n / (n + m))
        cols = cols * (2.0 / (n + m)) ** 0.5
        self.hessian.baddbmm_(cols, cols.transpose(1, 2))
        self.columns = n + m
        is_batched = not (isinstance(self.module, ConvNd) and x.dim() == len(self.module.kernel_size) + 1)
        self.samples += x.shape[0] if is_batched and x.dim() > 1 else 1

    def hook(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        """Forward hook signature: ``module.register_forward_hook(acc.hook)``."""
        self.update(inputs[0])


def damp_hessian(h: torch.Tensor, damp: float, mode: str) -> torch.Tensor:
    """A damped copy: ``damp`` (absolute) or ``damp * mean(diag)`` (relative) added to each diagonal."""
    h = h.clone()
    diag = h.diagonal(dim1=-2, dim2=-1)
    if mode == "relative":
        diag.add_(damp * diag.mean(-1, keepdim=True))
    else:
        diag.add_(damp)
    return h
