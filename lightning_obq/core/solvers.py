"""Layer solvers on plain tensors: FastOBQ/GPTQ (column-parallel), exact OBQ, and round to nearest.

All solvers take a batch of ``G`` independent problems: weights ``W [G, d_row, d_col]`` and damped
Hessians ``H [G, d_col, d_col]`` (a grouped conv is solved in one call), plus the grid's per-column
scale/zero (``[G, d_row, d_col]`` or broadcastable). They return integer codes (as floats) in the
original column order; weights are always ``dequantize_codes(codes, scale, zero)``.
"""

from __future__ import annotations

import math

import torch

from lightning_obq.core.grid import dequantize_codes, fake_quantize, quantize_codes
from lightning_obq.core.kernels import order_columns_kernel, quantize_block_kernel, squared_rounding_error_kernel

COMPILED_DEVICES = ("cpu",)
"""Device types whose column loop, column scores and column re-ordering run as the compiled `kernels` (on
float32 tensors); others use torch ops."""


class HessianNotPositiveDefinite(RuntimeError):
    """The damped Hessian has no Cholesky factor."""


def cholesky_factor(h: torch.Tensor, upper: bool = False) -> torch.Tensor:
    """The (lower or upper) Cholesky factor, raising `HessianNotPositiveDefinite` when there is none."""
    try:
        return torch.linalg.cholesky(h, upper=upper)
    except torch.linalg.LinAlgError as exc:
        raise HessianNotPositiveDefinite("Cholesky factorisation failed") from exc


def inverse_hessian(h: torch.Tensor) -> torch.Tensor:
    """``H^-1`` of a (batched) positive-definite matrix via its Cholesky factor.

    ``cholesky_inverse`` (LAPACK potri: the factor's triangular inverse and its product with its transpose)
    needs a third of the work of two triangular solves against the identity, and measured 2x faster on the
    largest resnet18 shape (d = 4608, 2 threads: 0.77 s against 1.64 s with the factor; still 1.2x under a
    competing process). Its result is exactly symmetric.
    """
    return torch.cholesky_inverse(cholesky_factor(h))


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

    Each ranking costs a re-sort and a Schur complement of ``H^-1``; three keep that a small part of the
    solve, while finer steps barely change the layer error.
    """
    return max(32, -(-d_col // 3))


def quantize_block(
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
    """`quantize_block` over ``w [G, r, n]`` in lazy blocks: within a block each column updates the
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
        quantize_block(wt, u, scale, zero, maxq, columns, codes, err, i1)
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
            u_block, u_rest = cholesky_factor(hinv[:, :b, :b], upper=True), None
            if b < hinv.shape[-1]:
                u_rest = torch.linalg.solve_triangular(u_block.transpose(-2, -1), hinv[:, :b, b:], upper=False)
                hinv = torch.baddbmm(hinv[:, b:, b:], u_rest.transpose(-2, -1), u_rest, alpha=-1)
        else:
            b, columns = d_col, perm
            # Upper factor U of the permuted H^-1: row i of U holds the update of step i for columns >= i.
            u_block, u_rest = cholesky_factor(hinv, upper=True), None
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
