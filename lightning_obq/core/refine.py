"""The refinement stage after a column-parallel solve: block re-solves of the codes, then a scale refit.

`refine_solution` is what `quantize_layer` calls when ``QuantConfig.refine_sweeps > 0``; `refine_codes` and
`refit_scales` are its two steps. Shapes follow `lightning_obq.core.solvers`: ``W [G, d_row, d_col]``,
``H [G, d_col, d_col]``.
"""

from __future__ import annotations

import math
from itertools import pairwise

import torch

from lightning_obq.core import solvers
from lightning_obq.core.grid import dequantize_codes
from lightning_obq.core.kernels import accept_steps_kernel, block_delta_kernel
from lightning_obq.core.solvers import cholesky_factor, inverse_hessian, quantize_block

REFINE_BLOCK = 32
"""Columns re-solved together by one step of `refine_codes`. Small enough that the blocks' factors cost little
(``d_col * REFINE_BLOCK^2`` per sweep), large enough that correlated columns (a conv channel's kernel taps sit
next to each other) move together; the error depends little on the exact size."""

REFINE_DAMP = 1e-3
"""Extra damping of the blocks that `refine_codes` factors, relative to the mean of ``diag(H)``. The block solve
only proposes codes (every step is accepted or refused on the objective of the ``H`` given), so it needs just
enough for a Cholesky factor where ``H`` itself is singular; `quantize_layer` passes the damped Hessian of the
solve, which is positive definite already."""

REFINE_LAZY_BLOCKS = 8
"""Blocks whose changes reach the residual product ``R`` together, in one rank-``8 * REFINE_BLOCK`` update: a
rank-32 update per block streams all of ``R`` through memory each time (a sweep of them costs more than one whole
``d_row x d_col x d_col`` product); within the chunk each block gets the earlier blocks' changes with a small
product of its own."""

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
    h: torch.Tensor, damp: torch.Tensor, blocks: list[tuple[int, int]], reverse: bool
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per block of ``h [G, n, n]``: the inverse of ``h[:, a:b, a:b]`` with ``damp [G]`` added to its diagonal,
    and the upper Cholesky factor of that inverse with its rows and columns in the order the block's columns are
    quantized (reversed when ``reverse``). Blocks of one size are factored in one batched call (a sweep has at
    most three sizes); only the blocks are damped, so no damped copy of the whole ``h`` is made."""
    g, n, _ = h.shape
    h = h.contiguous()
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
        stacked = h.as_strided((g, len(members), size, size), (n * n, (n + 1) * step, n, 1),
                               h.storage_offset() + starts[0] * (n + 1))
        stacked = stacked + torch.diag_embed(damp[:, None, None].expand(g, len(members), size))
        hinv = inverse_hessian(stacked.reshape(-1, size, size))
        u = cholesky_factor(hinv.flip(-2, -1) if reverse else hinv, upper=True)
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
    and ``v``: no second product with ``H``). Returns the ``[G, r, n_groups]`` scales and that change of the
    objective (summed in float64, <= 0).
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
    gain = float(change.where(take, 0.0).sum(dtype=torch.float64))
    return torch.where(take.unsqueeze(-1), new, s_old).expand_as(old).clone(), gain


def _expand_groups(t: torch.Tensor, group_size: int, d_col: int) -> torch.Tensor:
    """A ``[..., n_groups]`` grid tensor with one value per column ``[..., d_col]``."""
    return t[..., torch.arange(d_col, device=t.device) // group_size]


def block_delta(
    new: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, q: torch.Tensor, q_new: torch.Tensor,
    d: torch.Tensor,
) -> None:
    """A block step's proposal in values: ``q_new = dequantize_codes(new, scale, zero)`` and ``d = q_new - q``
    (the change from the current values ``q``), written into the C-contiguous ``q_new``/``d [G, r, k]``. On
    `solvers.COMPILED_DEVICES` one compiled pass (`block_delta_kernel`, bitwise the same)."""
    if new.device.type in solvers.COMPILED_DEVICES:
        block_delta_kernel(*(t.numpy() for t in (new, scale, zero, q, q_new, d)))
        return
    q_new.copy_(dequantize_codes(new, scale, zero))
    torch.sub(q_new, q, out=d)


def accept_steps(
    change: torch.Tensor, floor: torch.Tensor, d: torch.Tensor, new: torch.Tensor, q_new: torch.Tensor,
    pending: torch.Tensor, codes: torch.Tensor, q: torch.Tensor, objective: torch.Tensor,
) -> None:
    """One block step of `refine_codes`, row by row: a row whose objective ``change [G, r]`` is below ``floor``
    takes its ``new`` codes and ``q_new`` values (into the views ``codes``/``q [G, r, k]``) and adds its change
    to ``objective``; ``pending`` gets each row's change of values ``d``, zero where the step is refused. On
    `solvers.COMPILED_DEVICES` it runs as one compiled pass (`accept_steps_kernel`, bitwise the same), since
    on a small layer these few element-wise calls per block were a noticeable share of the stage."""
    if d.device.type in solvers.COMPILED_DEVICES:
        accept_steps_kernel(*(t.numpy() for t in (change, floor, d, new, q_new, pending, codes, q, objective)))
        return
    take = (change < floor).unsqueeze(-1)
    pending.copy_(d.mul_(take))
    codes.copy_(torch.where(take, new, codes))
    q.copy_(torch.where(take, q_new, q))
    objective += change.mul_(take[..., 0])


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
    ``[G, r, n]`` (not changed), ``scale``/``zero`` ``[G, r, 1 or n]``. Returns the codes, the sweeps run, the
    starting objective (float64 sum of the rows', the same product and sum as `layer.layer_error`) and the
    final one: the start plus the accepted steps' exact changes, so no product with ``H`` is spent on it.
    As in `solve_column_parallel`, only the sequential loop and the element-wise parts of a block step
    (`block_delta`, `accept_steps`) run compiled on `COMPILED_DEVICES`; every other step is the same torch call
    on both paths, so both give the same bits.
    """
    w, h, scale, zero = w.float(), h.float(), scale.float(), zero.float()
    g, r, n = w.shape
    codes = codes.float().clone()
    q = dequantize_codes(codes, scale, zero)
    e = q - w
    res = e @ h  # R = (Q - W) H, kept up to date with every accepted block step
    objective = (e * res).sum(-1)  # [G, r]: each row's objective, lowered by every accepted step
    first = objective.clone()
    start = float((res * e).sum(dtype=torch.float64))
    diag = h.diagonal(dim1=-2, dim2=-1)
    damp = REFINE_DAMP * diag.mean(-1).clamp_min(torch.finfo(h.dtype).tiny)
    scale_t = scale.transpose(-2, -1).expand(g, -1, r)  # the column loop's layout, [G, 1 or n, r]
    zero_t = zero.transpose(-2, -1).expand_as(scale_t)
    per_column = scale.shape[-1] != 1
    active = torch.ones(g, dtype=torch.bool, device=w.device)
    factors: dict[tuple[int, bool], list[tuple[torch.Tensor, torch.Tensor]]] = {}
    new = torch.empty(g, r, block, dtype=w.dtype, device=w.device)  # the column loop's codes, per block
    # Scratch per block size (C-contiguous): the column loop's errors, a step's new values and their change.
    err: dict[int, torch.Tensor] = {}
    values: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    done = 0
    while done < sweeps and bool(active.any()):
        blocks = refine_blocks(n, block, done)
        key = (done % 2, done % 4 in (1, 2))  # (shifted boundaries, reversed column order)
        if key not in factors:
            factors[key] = _block_factors(h, damp, blocks, key[1])
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
                    values[k] = tuple(torch.empty(g, r, k, dtype=w.dtype, device=w.device) for _ in range(2))
                quantize_block(target_t, u_b, s_t, z_t, maxq, columns[k], new[..., :k], err[k], 0)
                grid_b = (scale[..., a:b], zero[..., a:b]) if per_column else (scale, zero)
                q_new, d = values[k]
                block_delta(new[..., :k], *grid_b, q_b, q_new, d)
                change = (d * torch.baddbmm(res_b, d, h[:, a:b, a:b], beta=2)).sum(-1)  # [G, r]
                accept_steps(change, floor, d, new[..., :k], q_new, pending[..., a - c0 : b - c0], codes[..., a:b],
                             q_b, objective)
            res.baddbmm_(pending, h[:, c0:c1, :])
        done += 1
        active &= before - objective.sum(-1) > tol * before
    return codes, done, start, start + float((objective - first).sum(dtype=torch.float64))


def refine_solution(
    w: torch.Tensor, h: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int,
    group_size: int | None, shared: bool, sweeps: int,
) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    """The refinement stage after a column-parallel solve: `refine_codes` on the grid, then the closed-form
    scale refit for the codes found (`refit_scales`; the zero points stay, so codes stay integers on
    ``[0, maxq]``). Neither step raises ``tr((Q-W) H (Q-W)^T)``.

    ``scale``/``zero`` are the grid's ``[G, r, n_groups]``. Returns the codes, the grid's new scales, the
    sweeps run, and the objective of the starting codes and of the result (the latter from the steps' exact
    changes, `refine_codes`, `refit_scales`); the weights are ``dequantize_codes(codes, scales, zero)`` with the
    scales expanded per column.
    """
    d_col = w.shape[-1]
    expand = (lambda t: t) if group_size is None else (lambda t: _expand_groups(t, group_size, d_col))
    codes, done, start, end = refine_codes(w, h, codes, expand(scale), expand(zero), maxq, sweeps)
    new_scale, gain = refit_scales(w, h, codes, scale, zero, group_size, shared)
    return codes, new_scale, done, start, end + gain
