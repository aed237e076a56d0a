"""Affine integer grids for weights: scale/zero per channel, per tensor or per group, range search.

A grid maps a float weight ``w`` to an integer code ``q = clamp(round(w / scale) + zero, 0, 2^bits - 1)``
and back to ``scale * (q - zero)``. Weights are handled as ``[..., d_row, d_col]`` matrices (a leading
batch dim holds the groups of a grouped conv); grids have shape ``[..., d_row, n_groups]`` where
``n_groups`` is 1 for per-channel/per-tensor grids and ``ceil(d_col / group_size)`` for group grids.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Clipping ratios tried by the coarse pass of the MSE range search, then refined locally (REQuant:
# the grid error as a function of the clipping ratio is locally convex around its minimum).
_COARSE_RATIOS = torch.linspace(1.0, 0.2, 33)
_FINE_STEPS = 17


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
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


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
    q = fake_quantize(w.unsqueeze(1), scale.unsqueeze(-1), zero.unsqueeze(-1), maxq)  # [n, r, k]
    return (q - w.unsqueeze(1)).pow(2).sum(-1)


def _search_ratio(w: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, maxq: int, symmetric: bool) -> torch.Tensor:
    """Clipping ratio per row minimising the grid error: coarse scan, then a fine scan around the best."""
    n = w.shape[0]
    coarse = _COARSE_RATIOS.to(w).expand(n, -1)
    best_ratio = torch.empty(n, 1, dtype=w.dtype, device=w.device)
    step = float(_COARSE_RATIOS[0] - _COARSE_RATIOS[1])
    # Rows are processed in chunks so the [rows, ratios, cols] temporary stays small.
    chunk = max(1, (1 << 24) // max(1, w.shape[1] * coarse.shape[1]))
    for s in range(0, n, chunk):
        sl = slice(s, s + chunk)
        err = _grid_error(w[sl], lo[sl], hi[sl], coarse[sl], maxq, symmetric)
        center = coarse[sl].gather(1, err.argmin(1, keepdim=True))
        offsets = torch.linspace(-step, step, _FINE_STEPS, dtype=w.dtype, device=w.device)
        fine = (center + offsets).clamp(0.01, 1.0)
        err = _grid_error(w[sl], lo[sl], hi[sl], fine, maxq, symmetric)
        best_ratio[sl] = fine.gather(1, err.argmin(1, keepdim=True))
    return best_ratio


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
