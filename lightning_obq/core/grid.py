"""Affine integer grids for weights: scale/zero per channel, per tensor or per group, range search.

A grid maps a float weight ``w`` to an integer code ``q = clamp(round(w / scale) + zero, 0, 2^bits - 1)``
and back to ``scale * (q - zero)``. Weights are handled as ``[..., d_row, d_col]`` matrices (a leading
batch dim holds the groups of a grouped conv); grids have shape ``[..., d_row, n_groups]`` where
``n_groups`` is 1 for per-channel/per-tensor grids and ``ceil(d_col / group_size)`` for group grids.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import torch

# Clipping ratios tried by the coarse pass of the MSE range search, then refined locally (REQuant:
# the grid error as a function of the clipping ratio is locally convex around its minimum).
_COARSE_RATIOS = torch.linspace(1.0, 0.2, 33)
_FINE_STEPS = 17
# Elements of the [rows, ratios, cols] range-search temporary scored at once (2 MB: about L2 sized).
_CHUNK_ELEMENTS = 1 << 19


@dataclass
class Grid:
    """Scale and zero point of an affine grid, broadcastable against a ``[..., d_row, d_col]`` weight."""

    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    group_size: int | None = None

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    def column_params(self, d_col: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero expanded to one value per weight column (``[..., d_row, d_col]`` or ``[..., 1]``)."""
        if self.group_size is None:
            return self.scale, self.zero
        index = torch.arange(d_col, device=self.scale.device) // self.group_size
        return self.scale[..., index], self.zero[..., index]


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Integer codes (as floats) of ``w`` on the grid."""
    return ((w / scale).round() + zero).clip(0, maxq)


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Float values of integer codes; the only place codes become weights, so round trips are exact."""
    return scale * (codes - zero)


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """``w`` rounded to the nearest grid point."""
    return dequantize_codes(quantize_codes(w, scale, zero, maxq), scale, zero)


def _grid_from_range(
    lo: torch.Tensor, hi: torch.Tensor, maxq: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    lo = torch.minimum(lo, torch.zeros_like(lo))
    hi = torch.maximum(hi, torch.zeros_like(hi))
    if symmetric:
        hi = torch.maximum(hi, -lo)
        scale = 2 * hi / maxq
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        scale = (hi - lo) / maxq
        zero = None
    # An all-zero channel gets a unit grid: every weight is exactly representable as 0.
    empty = scale == 0
    scale = torch.where(empty, torch.ones_like(scale), scale)
    if zero is None:
        zero = torch.round(-lo / scale)
    return scale, zero


def _grid_error(
    w: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, ratio: torch.Tensor, maxq: int, symmetric: bool
) -> torch.Tensor:
    """Squared grid error of each row of ``w`` ([n, k]) for clipping ratios ``ratio`` ([n, r]) -> [n, r]."""
    scale, zero = _grid_from_range(lo * ratio, hi * ratio, maxq, symmetric)  # [n, r]
    (n, k), r = w.shape, ratio.shape[1]
    # Cache-sized chunks scored in place in one buffer: whole [n, r, k] temporaries fall out of cache (much slower).
    rows = max(1, _CHUNK_ELEMENTS // max(1, r * k))
    # A row too long for one chunk splits its ratios in runs of >= 2: a 1-output sum is split across threads.
    splits = 1 if rows > 1 else min(r // 2, -(-r * k // _CHUNK_ELEMENTS))
    bounds = [r * t // splits for t in range(splits + 1)]
    buf = torch.empty(min(n, rows) * r * k, dtype=w.dtype, device=w.device)
    err = torch.empty(n, r, dtype=w.dtype, device=w.device)
    for i in range(0, n, rows):
        x = w[i : i + rows].unsqueeze(1)
        for j0, j1 in pairwise(bounds):
            s, z = scale[i : i + rows, j0:j1, None], zero[i : i + rows, j0:j1, None]
            # Same op order as fake_quantize(x, s, z, maxq) - x, squared and summed, so results are bitwise equal.
            q = torch.div(x, s, out=buf[: s.numel() * k].view(*s.shape[:2], k))
            q.round_().add_(z).clamp_(0, maxq).sub_(z).mul_(s).sub_(x)
            err[i : i + rows, j0:j1] = q.mul_(q).sum(-1)
    return err


def _search_ratio(w: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, maxq: int, symmetric: bool) -> torch.Tensor:
    """Clipping ratio per row minimising the grid error: coarse scan, then a fine scan around the best."""
    coarse = _COARSE_RATIOS.to(w).expand(w.shape[0], -1)
    center = coarse.gather(1, _grid_error(w, lo, hi, coarse, maxq, symmetric).argmin(1, keepdim=True))
    step = float(_COARSE_RATIOS[0] - _COARSE_RATIOS[1])
    offsets = torch.linspace(-step, step, _FINE_STEPS, dtype=w.dtype, device=w.device)
    fine = (center + offsets).clamp(0.01, 1.0)
    return fine.gather(1, _grid_error(w, lo, hi, fine, maxq, symmetric).argmin(1, keepdim=True))


def find_grid(
    weight: torch.Tensor,
    bits: int,
    symmetric: bool = False,
    granularity: str = "channel",
    group_size: int = 128,
    range_search: str = "mse",
) -> Grid:
    """The grid for a ``[..., d_row, d_col]`` weight.

    ``range_search="mse"`` clips the range by the ratio that minimises the squared rounding error of
    each channel (or group); it is vectorised over all channels at once.
    """
    w = weight.detach().float()
    *lead, d_row, d_col = w.shape
    if granularity == "tensor":
        rows = w.reshape(1, -1)
    elif granularity == "channel":
        rows = w.reshape(-1, d_col)
    elif granularity == "group":
        # Zero padding never widens a range that always holds 0, and 0 is exactly on every grid.
        n_groups = -(-d_col // group_size)
        rows = torch.nn.functional.pad(w, (0, n_groups * group_size - d_col)).reshape(-1, group_size)
    else:
        raise ValueError(f"granularity={granularity!r} is not one of ['channel', 'tensor', 'group']")
    maxq = (1 << bits) - 1
    lo, hi = rows.amin(1, keepdim=True), rows.amax(1, keepdim=True)
    if range_search == "mse":
        ratio = _search_ratio(rows, lo, hi, maxq, symmetric)
        lo, hi = lo * ratio, hi * ratio
    elif range_search != "minmax":
        raise ValueError(f"range_search={range_search!r} is not one of ['minmax', 'mse']")
    scale, zero = _grid_from_range(lo, hi, maxq, symmetric)
    if granularity == "tensor":
        shape = (*lead, d_row, 1)
        return Grid(scale.reshape(1).expand(shape).contiguous(), zero.reshape(1).expand(shape).contiguous(), bits)
    if granularity == "channel":
        return Grid(scale.reshape(*lead, d_row, 1), zero.reshape(*lead, d_row, 1), bits)
    n_groups = -(-d_col // group_size)
    return Grid(scale.reshape(*lead, d_row, n_groups), zero.reshape(*lead, d_row, n_groups), bits, group_size)
