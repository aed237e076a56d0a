"""Layer solvers on plain tensors: FastOBQ/GPTQ (column-parallel), exact OBQ, and round to nearest.

All solvers take a batch of ``G`` independent problems: weights ``W [G, d_row, d_col]`` and damped
Hessians ``H [G, d_col, d_col]`` (a grouped conv is solved in one call), plus the grid's per-column
scale/zero (``[G, d_row, d_col]`` or broadcastable). They return integer codes (as floats) in the
original column order; weights are always ``dequantize_codes(codes, scale, zero)``.
"""

from __future__ import annotations

import math
from itertools import pairwise

import torch

from .kernels import order_columns_kernel, quantize_block_kernel, squared_rounding_error_kernel
from .quantizer import dequantize_codes, fake_quantize, quantize_codes

COMPILED_DEVICES = ("cpu",)
"""Device types whose column loop, column scores and column re-ordering run as the compiled `kernels` (on
float32 tensors); others use torch ops."""


class HessianNotPositiveDefinite(RuntimeError):
    """The damped Hessian has no Cholesky factor."""


def _cholesky(h: torch.Tensor, upper: bool = False) -> torch.Tensor:
    try:
        return torch.linalg.cholesky(h, upper=upper)
    except torch.linalg.LinAlgError as exc:
        raise HessianNotPositiveDefinite("Cholesky factorisation failed") from exc


def inverse_hessian(h: torch.Tensor) -> torch.Tensor:
    """``H^-1`` of a (batched) positive-definite matrix via its Cholesky factor.

    The inverse is taken as two triangular solves against the identity (``cholesky_solve``): on the
    MKL CPU build this is 1.2-80x faster than ``cholesky_inverse`` (LAPACK potri), which was erratic
    under load (e.g. 3.6-14 s vs a steady 3.5 s at d=4608, 8 s vs 0.1 s at d=1152). The result is
    symmetrised so either triangle can be read.
    """
    factor = _cholesky(h)
    eye = torch.eye(h.shape[-1], dtype=h.dtype, device=h.device).expand_as(h)
    hinv = torch.cholesky_solve(eye, factor)
    return hinv.add_(hinv.transpose(-2, -1).clone()).mul_(0.5)


def squared_rounding_error(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """``(q(w) - w)^2`` per weight of ``w [G, r, n]``: the rounding residual the column orders score.

    ``scale``/``zero`` broadcast to ``[G, r, 1 or n]``. Compiled (`squared_rounding_error_kernel`) for
    float32 tensors on `COMPILED_DEVICES`.
    """
    if w.device.type in COMPILED_DEVICES and w.dtype == scale.dtype == zero.dtype == torch.float32:
        g, r, _ = w.shape
        grid = (t.expand(g, r, t.shape[-1]).contiguous().numpy() for t in (scale, zero))
        return torch.from_numpy(squared_rounding_error_kernel(w.contiguous().numpy(), *grid, float(maxq)))
    return torch.sub(fake_quantize(w, scale, zero, maxq), w).square_()


def column_order(
    order: str,
    w: torch.Tensor,
    h: torch.Tensor,
    hinv: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    maxq: int,
) -> torch.Tensor:
    """Column permutation ``[G, d_col]`` for a static FastOBQ/GPTQ ordering.

    ``sensi``: column sum of the OBQ sensitivity ``(q(w)-w)^2 / (2 [H^-1]_jj)``; ``err``: column sum of
    ``(q(w)-w)^2``; ``w``: column sum of ``w^2``; ``act``: ``diag(H)`` (GPTQ act order); ``none``: natural.
    """
    g, _, d_col = w.shape
    if order == "sensi_dyn":
        raise ValueError("order 'sensi_dyn' is re-ranked while solving: use solve_column_parallel")
    if order == "none":
        return torch.arange(d_col, device=w.device).expand(g, d_col)
    key, _, direction = order.partition("_")
    if key == "act":
        score, direction = h.diagonal(dim1=-2, dim2=-1), "des"
    elif key == "w":
        score = w.pow(2).sum(1)
    else:
        err = squared_rounding_error(w, scale, zero, maxq)
        if key == "sensi":
            err = err / (2 * hinv.diagonal(dim1=-2, dim2=-1).unsqueeze(1))
        score = err.sum(1)
    return torch.argsort(score, dim=-1, descending=direction == "des", stable=True)


def _gather_columns(t: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """``t[..., perm]`` per batch entry; ``t`` may broadcast along its last dim."""
    if t.shape[-1] == 1:
        return t
    return t.gather(-1, perm.unsqueeze(1).expand(t.shape[0], t.shape[1], -1))


def _permute_square(m: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """``m[perm][:, perm]`` per batch entry of ``[G, n, n]``."""
    if m.shape[0] == 1:  # contiguous row copies: several times faster than an element-wise gather
        return m[0].index_select(0, perm[0]).index_select(1, perm[0]).unsqueeze(0)
    n = m.shape[-1]
    rows = m.gather(1, perm.unsqueeze(-1).expand(-1, n, n))
    return rows.gather(2, perm.unsqueeze(1).expand(-1, n, n))


def _apply_order(order: torch.Tensor, w: torch.Tensor, hinv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w``'s columns and ``H^-1``'s rows and columns in ``order [G, n]`` (torch operations)."""
    return w.gather(2, order.unsqueeze(1).expand_as(w)), _permute_square(hinv, order)


def dynamic_sensitivity(
    w: torch.Tensor, hinv_diag: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int,
    expected: torch.Tensor,
) -> torch.Tensor:
    """Column scores ``[G, n]`` of the ``sensi_dyn`` order on the current weights and ``diag(H^-1)``.

    The paper's sensitivity ``sum_i (q(w_ij)-w_ij)^2 / [H^-1]_jj`` with ``expected``, the column sum of
    the expected squared rounding error of a uniform residual (``scale^2 / 12`` per weight), added to the
    current one: the updates of earlier columns still move each weight before it is rounded, so its
    residual now is only part of what rounding it will cost.
    """
    return squared_rounding_error(w, scale, zero, maxq).sum(1).add_(expected).div_(hinv_diag)


def _rank_columns(
    w: torch.Tensor, hinv: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int,
    expected: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The columns sorted by `dynamic_sensitivity` (highest first, stable), with ``w``'s columns and
    ``H^-1``'s rows and columns in that order. On `COMPILED_DEVICES` the score's last steps, the sort and
    the permutation run as one compiled call (`order_columns_kernel`, bitwise the same)."""
    if w.device.type in COMPILED_DEVICES:
        error_sums = squared_rounding_error(w, scale, zero, maxq).sum(1)
        ranked = order_columns_kernel(*(t.numpy() for t in (error_sums, expected, w, hinv)))
        return tuple(torch.from_numpy(a) for a in ranked)
    score = dynamic_sensitivity(w, hinv.diagonal(dim1=-2, dim2=-1), scale, zero, maxq, expected)
    order = torch.argsort(score, dim=-1, descending=True, stable=True)
    return order, *_apply_order(order, w, hinv)


def reorder_block(d_col: int) -> int:
    """Columns quantized between two re-rankings of ``sensi_dyn``: a third of the layer (at least 32).

    Each ranking costs a re-sort and a Schur complement of ``H^-1``; three keep that to a few percent of
    the solve, and on resnet18's layer shapes finer steps changed the layer error by about 1 % or less.
    """
    return max(32, -(-d_col // 3))


def _quantize_block(
    wt: torch.Tensor, u: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int,
    columns: torch.Tensor, codes: torch.Tensor, err: torch.Tensor, start: int,
) -> None:
    """The sequential core of GPTQ/FastOBQ on the block of columns ``start .. start + b``, transposed:
    ``wt [G, b, r]``.

    Column ``i`` of all rows is rounded, and its error, scaled by ``1 / u_ii``, is spread over the block's
    later columns with row ``i`` of the upper Cholesky factor ``u [G, n, n]``. Writes the codes of column
    ``i`` into column ``columns[:, i]`` of ``codes [G, r, N]`` (the weight's own order) and the scaled errors
    into the block's rows of ``err [G, n, r]``; ``scale``/``zero`` are ``[G, 1 or n, r]``. On the devices in
    `COMPILED_DEVICES` the loop runs compiled (`quantize_block_kernel`, bitwise the same float32
    operations), elsewhere as torch operations.
    """
    if wt.device.type in COMPILED_DEVICES:
        arrays = (t.numpy() for t in (wt, u, scale, zero))
        quantize_block_kernel(*arrays, float(maxq), columns.numpy(), codes.numpy(), err.numpy(), start)
        return
    per_column = scale.shape[-2] != 1
    s, z = scale[:, 0], zero[:, 0]
    for i in range(wt.shape[1]):
        col = start + i
        if per_column:
            s, z = scale[:, col], zero[:, col]
        x = wt[:, i]
        q = quantize_codes(x, s, z, maxq)
        codes.scatter_(2, columns[:, col, None, None].expand(-1, codes.shape[1], 1), q.unsqueeze(-1))
        e = (x - dequantize_codes(q, s, z)) / u[:, col, col, None]
        err[:, col] = e
        wt[:, i:] -= u[:, col, col : start + wt.shape[1], None] * e[:, None]


def _quantize_columns(
    w: torch.Tensor, u: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int, block_size: int,
    columns: torch.Tensor, codes: torch.Tensor,
) -> torch.Tensor:
    """`_quantize_block` over ``w [G, r, n]`` in lazy blocks: within a block each column updates the
    block's later columns; the columns after the block get the whole block's errors in one product.

    Writes the codes of column ``i`` into column ``columns[:, i]`` of ``codes [G, r, N]`` and returns the
    scaled errors ``[G, r, n]`` (a transposed view). The loop reads each block as a transposed copy, so
    every column is contiguous.
    """
    g, r, n = w.shape
    err = torch.empty(g, n, r, dtype=w.dtype, device=w.device)
    scale = scale.transpose(-2, -1).expand(g, -1, r)  # [G, 1 or n, r]
    zero = zero.transpose(-2, -1).expand_as(scale)
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        wt = w[..., i1:i2].transpose(-2, -1).contiguous()
        _quantize_block(wt, u, scale, zero, maxq, columns, codes, err, i1)
        if i2 < n:
            w[..., i2:] -= err[:, i1:i2].transpose(-2, -1) @ u[:, i1:i2, i2:]
    return err.transpose(-2, -1)


def solve_column_parallel(
    w: torch.Tensor,
    h: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    maxq: int,
    order: str = "sensi_dyn",
    block_size: int = 32,
    hessian_for_order: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FastOBQ / GPTQ: quantize all rows one column at a time in a shared order.

    After each column, its rounding error is spread over the remaining columns with one update shared
    by all rows (paper eqs. 12-13). The updates use the upper Cholesky factor of the permuted
    ``H^-1`` (equivalent to the sequential inverse-Hessian downdates) and are applied lazily per
    block of columns, so the cost is ``O(d_col^3 + d_row d_col^2)`` at matrix-multiply speed.

    Static orders fix the permutation up front and factor ``H^-1`` once. ``sensi_dyn`` re-ranks the
    remaining columns by `dynamic_sensitivity` every `reorder_block` columns: the best ones move to the
    front, their rows of the factor come from the current ``H^-1``, and ``H^-1`` is downdated to the
    columns left (its Schur complement, what eq. 13 gives after those columns), so the order follows
    the weights and the inverse Hessian as quantization proceeds.

    Returns ``(codes, perm)``: codes ``[G, d_row, d_col]`` in original column order and the order used.
    ``hessian_for_order`` (undamped H) feeds the ``act`` order; the damped ``h`` is used otherwise.
    """
    w = w.float()  # every path below updates a copy: a column gather, or the clone for order "none"
    h, scale, zero = h.float(), scale.float(), zero.float()
    g, d_row, d_col = w.shape
    hinv = inverse_hessian(h)
    dynamic = order == "sensi_dyn"
    if dynamic:
        # Expected squared rounding error per column, [G, 1, 1] or [G, 1, d_col] like the grid's columns.
        expected = (scale.pow(2) / 12).expand(g, d_row, scale.shape[-1]).sum(1, keepdim=True)
        remaining, chosen = torch.arange(d_col, device=w.device).expand(g, d_col), []
    else:
        perm = column_order(
            order, w, h if hessian_for_order is None else hessian_for_order, hinv, scale, zero, maxq
        )
        if order != "none":
            w, hinv = _apply_order(perm, w, hinv)
            scale, zero = _gather_columns(scale, perm), _gather_columns(zero, perm)
        else:
            w = w.clone()
    codes = torch.empty(g, d_row, d_col, dtype=w.dtype, device=w.device)
    done = 0
    while done < d_col:
        if dynamic:
            b = min(reorder_block(d_col), d_col - done)
            local, w, hinv = _rank_columns(w, hinv, scale, zero, maxq, expected[:, 0])
            scale, zero, expected = (_gather_columns(t, local) for t in (scale, zero, expected))
            remaining = remaining.gather(1, local)
            columns, remaining = remaining[:, :b], remaining[:, b:]
            chosen.append(columns)
            # Rows of the upper factor for the block, then H^-1 of the columns left (Schur complement).
            u_block, u_rest = _cholesky(hinv[:, :b, :b], upper=True), None
            if b < hinv.shape[-1]:
                u_rest = torch.linalg.solve_triangular(u_block.transpose(-2, -1), hinv[:, :b, b:], upper=False)
                hinv = torch.baddbmm(hinv[:, b:, b:], u_rest.transpose(-2, -1), u_rest, alpha=-1)
        else:
            b, columns = d_col, perm
            # Upper factor U of the permuted H^-1: row i of U holds the update of step i for columns >= i.
            u_block, u_rest = _cholesky(hinv, upper=True), None
        e = _quantize_columns(w[..., :b], u_block, scale, zero, maxq, block_size, columns, codes)
        if u_rest is not None:
            w = torch.baddbmm(w[..., b:], e, u_rest, alpha=-1)
            if scale.shape[-1] != 1:
                scale, zero, expected = scale[..., b:], zero[..., b:], expected[..., b:]
        done += b
    if dynamic:
        perm = torch.cat(chosen, dim=1)
    return codes, perm


def obq_row_batch(d_col: int, memory_mb: float) -> int:
    """Rows whose per-row inverse Hessians (float32, plus work space) fit in ``memory_mb``."""
    per_row = 3 * 4 * d_col * d_col
    return max(1, int(memory_mb * 2**20 // per_row))


def solve_obq(
    w: torch.Tensor,
    h: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    maxq: int,
    memory_mb: float = 1024.0,
    rows: slice | None = None,
    outliers: bool = False,
) -> torch.Tensor:
    """Exact greedy OBQ (Frantar & Alistarh 2022): each row quantizes its weights one at a time.

    At every step each row picks, among its unquantized weights, the one whose rounding raises the
    objective least (``(q(w_p)-w_p)^2 / [H^-1]_pp``), rounds it, compensates the others and removes
    it from its own ``H^-1``. Every row owns a ``d_col x d_col`` inverse, so rows run in batches sized
    to ``memory_mb``; cost ``O(d_row d_col^3)``. ``rows`` restricts the work to a subset of rows
    (used to time a sample and extrapolate); the other rows are returned as zeros.

    ``outliers=True`` adds the outlier rule of the OBC reference implementation: whenever a row has an
    unquantized weight whose rounding error exceeds half a grid step (it lies off the grid, e.g. beyond
    an MSE-clipped range), the worst such weight is quantized next instead of the greedy choice. Without
    it, greedy OBQ postpones clipped weights, the updates push them further out, and on real Hessians
    with MSE-searched grids its error can be several times that of GPTQ.
    """
    w = w.float()
    g, d_row, d_col = w.shape
    hinv_all = inverse_hessian(h.float())
    codes = torch.zeros_like(w)
    scale = scale.expand(g, d_row, scale.shape[-1])
    zero = zero.expand(g, d_row, zero.shape[-1])
    selected = range(d_row)[rows] if rows is not None else range(d_row)
    pairs = [(gi, r) for gi in range(g) for r in selected]
    batch = obq_row_batch(d_col, memory_mb)
    for start in range(0, len(pairs), batch):
        chunk = pairs[start : start + batch]
        gi = torch.tensor([p[0] for p in chunk], device=w.device)
        ri = torch.tensor([p[1] for p in chunk], device=w.device)
        wb = w[gi, ri].clone()  # [B, d_col]
        sb, zb = scale[gi, ri], zero[gi, ri]  # [B, d_col] or [B, 1]
        hinv = hinv_all[gi].clone()  # [B, d_col, d_col]
        done = torch.zeros_like(wb, dtype=torch.bool)
        qb = torch.zeros_like(wb)
        arange = torch.arange(len(chunk), device=w.device)
        for _ in range(d_col):
            q = quantize_codes(wb, sb, zb, maxq)
            deq = dequantize_codes(q, sb, zb)
            diag = hinv.diagonal(dim1=-2, dim2=-1)
            sq_err = (deq - wb).pow(2)
            score = sq_err / diag
            score.masked_fill_(done, math.inf)
            p = score.argmin(1)
            if outliers:
                # OBC's outlier rule: a weight pushed off the grid (rounding error above half a step)
                # is quantized at once, worst first, before the updates push it further out.
                sq_err.masked_fill_(done, 0.0)
                off_grid = (sq_err > 0.25 * sb.pow(2)).any(1)
                p = torch.where(off_grid, sq_err.argmax(1), p)
            d = diag[arange, p]
            col = hinv[arange, :, p]  # [B, d_col]
            err = (wb[arange, p] - deq[arange, p]) / d
            wb -= err.unsqueeze(1) * col
            qb[arange, p] = q[arange, p]
            wb[arange, p] = deq[arange, p]
            done[arange, p] = True
            # In place (no [B, d_col, d_col] temporary per step): the allocator churn of a fresh
            # temporary each step made OBQ several times slower under glibc malloc.
            hinv.addcmul_(col.unsqueeze(2), (col / d.unsqueeze(1)).unsqueeze(1), value=-1.0)
            # Removed weights keep a unit diagonal so later divisions stay finite (they are masked).
            hinv[arange, p, p] = 1.0
        codes[gi, ri] = qb
    return codes


def solve_rtn(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Round to nearest on the grid (no Hessian)."""
    return quantize_codes(w.float(), scale, zero, maxq)



REFINE_BLOCK = 32
"""Columns re-solved together by one step of `refine_codes`. Small enough that the blocks' factors cost little
(``d_col * REFINE_BLOCK^2`` per sweep), large enough that correlated columns (a conv channel's kernel taps sit
next to each other) move together; on resnet18's layer shapes 16 and 64 gave errors within about 2 % of 32's."""

REFINE_DAMP = 1e-3
"""Damping of the blocks that `refine_codes` factors, relative to the mean of ``diag(H)``. The block solve only
proposes codes (every step is accepted or refused on the undamped objective), so it needs just enough damping
for a Cholesky factor: with the solvers' 0.1 its targets stay near the damped solution, and on resnet18's
rank-deficient stem conv the refined error was 0.89x the solve's against 0.43x with 1e-3 (W4)."""

REFINE_LAZY_BLOCKS = 8
"""Blocks whose changes reach the residual product ``R`` together, in one rank-``8 * REFINE_BLOCK`` update: a
rank-32 update per block streams all of ``R`` through memory each time (on 512x4608, one thread, a sweep of them
took 0.42 s against 0.33 s for one whole ``d_row x d_col x d_col`` product); within the chunk each block gets the
earlier blocks' changes with a small product of its own."""

REFINE_MIN_GAIN = 1e-5
"""A row's block step is taken only if it lowers that row's objective by more than this share of it: smaller
gains are within the float32 rounding of their own estimate, so taking them could raise the objective."""


def refine_blocks(d_col: int, block: int, sweep: int) -> list[tuple[int, int]]:
    """Column ranges ``(start, end)`` covering ``0 .. d_col`` for sweep ``sweep`` of `refine_codes`.

    Odd sweeps shift the boundaries by half a block, so columns split by one sweep's boundary are re-solved
    together by the next.
    """
    offset = block // 2 if sweep % 2 else 0
    bounds = [0, *range(offset or block, d_col, block), d_col]
    return [(a, b) for a, b in pairwise(bounds) if b > a]


def _block_factors(
    hb: torch.Tensor, blocks: list[tuple[int, int]], reverse: bool
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per block of ``hb [G, n, n]``: the inverse of ``hb[:, a:b, a:b]`` and the upper Cholesky factor of that
    inverse with its rows and columns in the order the block's columns are quantized (reversed when
    ``reverse``). Blocks of one size are factored in one batched call (a sweep has at most three sizes)."""
    g, n, _ = hb.shape
    hb = hb.contiguous()
    by_size: dict[int, list[int]] = {}
    for i, (a, b) in enumerate(blocks):
        by_size.setdefault(b - a, []).append(i)
    out: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for size, members in by_size.items():
        # Blocks of one size follow each other at a fixed step (`refine_blocks`): one strided view of them.
        starts = [blocks[i][0] for i in members]
        step = starts[1] - starts[0] if len(starts) > 1 else size
        if any(b - a != step for a, b in pairwise(starts)):
            raise AssertionError(f"refine blocks of size {size} are not evenly spaced: {starts}")
        stacked = hb.as_strided((g, len(members), size, size), (n * n, (n + 1) * step, n, 1),
                                hb.storage_offset() + starts[0] * (n + 1))
        hinv = inverse_hessian(stacked.reshape(-1, size, size))
        u = _cholesky(hinv.flip(-2, -1) if reverse else hinv, upper=True)
        hinv, u = (t.reshape(g, len(members), size, size) for t in (hinv, u))
        out.update((i, (hinv[:, j], u[:, j])) for j, i in enumerate(members))
    return [out[i] for i in range(len(blocks))]


def _normal_equations(
    a: torch.Tensor, w: torch.Tensor, h: torch.Tensor, group_size: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``M [G, r, k, k]`` and ``v [G, r, k]`` of ``f(s) = s M s^T - 2 s v^T + W H W^T``, a row's objective
    as a function of its ``k`` group scales ``s`` for fixed ``A = codes - zero``: ``M_kl = A_k H A_l^T``,
    ``v_k = A_k H W^T`` (``A_k``: the row's ``A`` in group ``k``, zero elsewhere; ``k = 1`` without groups)."""
    g, r, n = a.shape
    if group_size is None:
        ah = a @ h
        return (ah * a).sum(-1)[..., None, None], (ah * w).sum(-1, keepdim=True)
    groups = -(-n // group_size)
    pad = groups * group_size - n
    m = torch.empty(g, r, groups, groups, dtype=a.dtype, device=a.device)
    v = torch.empty(g, r, groups, dtype=a.dtype, device=a.device)
    for k in range(groups):
        cols = slice(k * group_size, min((k + 1) * group_size, n))
        ah = a[..., cols] @ h[:, cols, :]  # [G, r, n]: A_k H
        m[..., k, :] = torch.nn.functional.pad(ah * a, (0, pad)).reshape(g, r, groups, group_size).sum(-1)
        v[..., k] = (ah * w).sum(-1)
    return m, v


def refit_scales(
    w: torch.Tensor, h: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
    group_size: int | None, shared: bool = False,
) -> torch.Tensor:
    """The closed-form best scales for fixed codes and zero points, where they lower the objective.

    ``w``/``codes`` are ``[G, r, n]``, ``scale``/``zero`` the grid's ``[G, r, n_groups]`` (``group_size``
    columns per group, or None for one scale per row; ``shared``: one scale for the whole tensor, as for
    ``granularity="tensor"``). The scales minimise `_normal_equations`' quadratic: ``s = v / M`` per row, a
    small linear solve per row with groups, ``sum v / sum M`` when shared. A row (the tensor when shared)
    keeps its old scales unless the new ones are finite, positive and lower its objective by more than
    `REFINE_MIN_GAIN` of its quadratic term, so the objective never rises (the change is exact from ``M``
    and ``v``: no second product with ``H``). Returns the ``[G, r, n_groups]`` scales.
    """
    d_col = w.shape[-1]
    z = zero if group_size is None else _expand_groups(zero, group_size, d_col)
    m, v = _normal_equations(codes - z, w, h, group_size)
    old = scale.expand_as(v)
    if shared:
        m, v = m.sum((0, 1), keepdim=True), v.sum((0, 1), keepdim=True)
    s_old = old[:1, :1] if shared else old
    # A group whose codes all sit on the zero point has no say in the objective: its equation becomes s = old.
    empty = m.diagonal(dim1=-2, dim2=-1) == 0
    eye = torch.eye(m.shape[-1], dtype=m.dtype, device=m.device)
    new, info = torch.linalg.solve_ex(m + eye * empty.unsqueeze(-1), (v + s_old * empty).unsqueeze(-1))
    new = new.squeeze(-1).masked_fill((info != 0).unsqueeze(-1), math.nan)  # singular M: keep the old scales

    def quadratic(s: torch.Tensor) -> torch.Tensor:  # s M s^T per row (element-wise: k is small)
        return ((m * s.unsqueeze(-2)).sum(-1) * s).sum(-1)

    change = quadratic(new) - quadratic(s_old) - 2 * ((new - s_old) * v).sum(-1)
    take = torch.isfinite(new).all(-1) & (new > 0).all(-1) & (change < -REFINE_MIN_GAIN * quadratic(s_old))
    return torch.where(take.unsqueeze(-1), new, s_old).expand_as(old).clone()


def _expand_groups(t: torch.Tensor, group_size: int, d_col: int) -> torch.Tensor:
    """A ``[..., n_groups]`` grid tensor with one value per column ``[..., d_col]``."""
    return t[..., torch.arange(d_col, device=t.device) // group_size]


def refine_codes(
    w: torch.Tensor,
    h: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    maxq: int,
    sweeps: int,
    block: int = REFINE_BLOCK,
    tol: float = 1e-3,
) -> tuple[torch.Tensor, int, float]:
    """Lower ``tr((Q-W) H (Q-W)^T)`` of a solution on its grid by block coordinate descent over the columns.

    One sweep visits blocks of ``block`` columns in turn (`refine_blocks`). With all other columns fixed the
    objective of block ``B`` is ``(Q_B - T_B) H_BB (Q_B - T_B)^T`` plus a constant, where
    ``T_B = Q_B - R_B H_BB^-1`` and ``R = (Q - W) H`` is the residual product. The block is re-quantized
    towards ``T_B`` with the column-parallel loop of the solvers (all rows at once; natural column order,
    reversed in sweeps 1-2 of every 4 so the block's last columns also get to go first), and each row keeps
    its new codes only if their exact change of the objective, ``D (D H_BB + 2 R_B)^T`` for the row's change
    ``D``, is negative (by more than `REFINE_MIN_GAIN` of the row's objective): every accepted step lowers
    the objective, so no sweep raises it. ``R`` takes each block's change in one rank-``block`` product, so a
    sweep costs about one ``d_row x d_col x d_col`` multiply and no factorisation of ``H`` (only of its
    diagonal blocks, lightly damped by `REFINE_DAMP`, which need not be positive definite otherwise).
    Sweeps repeat while the last one lowered the objective by more than ``tol`` of it, at most ``sweeps``
    times, decided per group so that a grouped conv gets what its groups would get one by one.

    ``w [G, r, n]``, ``h [G, n, n]`` (the objective's Hessian, need not be damped), starting ``codes``
    ``[G, r, n]`` (not changed), ``scale``/``zero`` ``[G, r, 1 or n]``. Returns the codes, the sweeps run and
    the starting objective (float64 sum of the rows', the same product and sum as `layer.layer_error`).
    As in `solve_column_parallel`, only the sequential loop runs compiled on `COMPILED_DEVICES`; every other
    step is the same torch call on both paths, so both give the same bits.
    """
    w, h, scale, zero = w.float(), h.float(), scale.float(), zero.float()
    g, r, n = w.shape
    codes = codes.float().clone()
    q = dequantize_codes(codes, scale, zero)
    e = q - w
    res = e @ h  # R = (Q - W) H, kept up to date with every accepted block step
    objective = (e * res).sum(-1)  # [G, r]: each row's objective, lowered by every accepted step
    start = float((res * e).sum(dtype=torch.float64))
    diag = h.diagonal(dim1=-2, dim2=-1)
    damp = REFINE_DAMP * diag.mean(-1).clamp_min(torch.finfo(h.dtype).tiny)
    hb = h + torch.diag_embed(damp.unsqueeze(-1).expand_as(diag))
    scale_t = scale.transpose(-2, -1).expand(g, -1, r)  # the column loop's layout, [G, 1 or n, r]
    zero_t = zero.transpose(-2, -1).expand_as(scale_t)
    per_column = scale.shape[-1] != 1
    active = torch.ones(g, dtype=torch.bool, device=w.device)
    factors: dict[tuple[int, bool], list[tuple[torch.Tensor, torch.Tensor]]] = {}
    new = torch.empty(g, r, block, dtype=w.dtype, device=w.device)  # the column loop's codes, per block
    err: dict[int, torch.Tensor] = {}  # its scratch errors per block size (they must be C-contiguous)
    done = 0
    while done < sweeps and bool(active.any()):
        blocks = refine_blocks(n, block, done)
        key = (done % 2, done % 4 in (1, 2))  # (shifted boundaries, reversed column order)
        if key not in factors:
            factors[key] = _block_factors(hb, blocks, key[1])
        columns = {k: torch.arange(k, device=w.device).flip(0).expand(g, k) if key[1]
                   else torch.arange(k, device=w.device).expand(g, k) for k in {b - a for a, b in blocks}}
        before = objective.sum(-1)
        for chunk in range(0, len(blocks), REFINE_LAZY_BLOCKS):
            lazy = blocks[chunk : chunk + REFINE_LAZY_BLOCKS]
            c0, c1 = lazy[0][0], lazy[-1][1]
            pending = torch.zeros(g, r, c1 - c0, dtype=w.dtype, device=w.device)  # changes not yet in R
            # A step is taken below this change of its row's objective; never in a group that has converged.
            floor = torch.where(active.unsqueeze(-1), objective * -REFINE_MIN_GAIN, -math.inf)
            for (a, b), (hinv_b, u_b) in zip(lazy, factors[key][chunk : chunk + REFINE_LAZY_BLOCKS], strict=True):
                k = b - a
                q_b, res_b = q[..., a:b], res[..., a:b]
                if a > c0:  # R of this block after the changes of the earlier blocks of the chunk
                    res_b = torch.baddbmm(res_b, pending[..., : a - c0], h[:, c0:a, a:b])
                target_t = torch.baddbmm(q_b.transpose(-2, -1), hinv_b, res_b.transpose(-2, -1), alpha=-1)
                s_t, z_t = (scale_t[:, a:b], zero_t[:, a:b]) if per_column else (scale_t, zero_t)
                if key[1]:
                    target_t = target_t.flip(1)
                    s_t, z_t = (s_t.flip(1), z_t.flip(1)) if per_column else (s_t, z_t)
                if k not in err:
                    err[k] = torch.empty(g, k, r, dtype=w.dtype, device=w.device)
                _quantize_block(target_t, u_b, s_t, z_t, maxq, columns[k], new[..., :k], err[k], 0)
                grid_b = (scale[..., a:b], zero[..., a:b]) if per_column else (scale, zero)
                q_new = dequantize_codes(new[..., :k], *grid_b)
                d = q_new - q_b
                change = (d * torch.baddbmm(res_b, d, h[:, a:b, a:b], beta=2)).sum(-1)  # [G, r]
                take = (change < floor).unsqueeze(-1)
                pending[..., a - c0 : b - c0] = d.mul_(take)
                codes[..., a:b] = torch.where(take, new[..., :k], codes[..., a:b])
                q[..., a:b] = torch.where(take, q_new, q_b)
                objective += change.mul_(take[..., 0])
            res.baddbmm_(pending, h[:, c0:c1, :])
        done += 1
        active &= before - objective.sum(-1) > tol * before
    return codes, done, start


def refine_solution(
    w: torch.Tensor, h: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int,
    group_size: int | None, shared: bool, sweeps: int,
) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    """The refinement stage after a column-parallel solve: `refine_codes` on the grid, then the closed-form
    scale refit for the codes found (`refit_scales`; the zero points stay, so codes stay integers on
    ``[0, maxq]``). Neither step raises ``tr((Q-W) H (Q-W)^T)``.

    ``scale``/``zero`` are the grid's ``[G, r, n_groups]``. Returns the codes, the grid's new scales, the
    sweeps run and the objective of the starting codes; the weights are ``dequantize_codes(codes, scales, zero)``
    with the scales expanded per column.
    """
    d_col = w.shape[-1]
    expand = (lambda t: t) if group_size is None else (lambda t: _expand_groups(t, group_size, d_col))
    codes, done, start = refine_codes(w, h, codes, expand(scale), expand(zero), maxq, sweeps)
    return codes, refit_scales(w, h, codes, scale, zero, group_size, shared), done, start
