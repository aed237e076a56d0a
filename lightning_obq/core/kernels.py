"""Compiled CPU kernels of the column solvers: the sequential column loop, the rounding residual the
column orders score, the column re-ordering, and the refinement's block step (its change of values and
its row-wise acceptance).

The column loop rounds one column of a block, then spreads its error over the block's later columns. On a
layer with a few hundred rows each step is a handful of operations on vectors of a few hundred values, so
an interpreted loop (torch or numpy) runs at call-overhead speed; compiled with numba it runs at the speed
of the arithmetic. Each ranking of ``sensi_dyn`` (score the columns, sort, permute the
weights' columns and ``H^-1``) takes two compiled calls and one column sum instead of about twenty tensor
calls; each block step of the refinement takes two compiled calls (its change of values, then the
row-wise acceptance) instead of eleven tensor calls.
Each kernel does the same float32 operations in the same order as the torch code in `solvers` and `refine`
(round half to even, no fused multiply-add; a stable sort; plain copies), so the results are bitwise
equal; the tests hold both paths to that. The column sum stays a torch call: its summation order is
torch's own."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

import numba
import numpy as np

_ANY3 = "float32[:, :, :]"
_C3 = "float32[:, :, ::1]"


_LOADERS: list[Callable[[], Callable[..., object]]] = []


def _compiled_on_first_call(signature: str) -> Callable[[Callable[..., object]], Callable[..., object]]:
    """Compile for exactly ``signature`` (whatever the strides of the views passed in: one machine-code
    version per kernel) when first called, not at import; numba caches it on disk, so the compilation
    happens once per installation and later processes only load it."""

    def decorate(func: Callable[..., object]) -> Callable[..., object]:
        @functools.cache
        def compiled() -> Callable[..., object]:
            return numba.njit(signature, cache=True, nogil=True)(func)

        @functools.wraps(func)
        def call(*args: object) -> object:
            return compiled()(*args)

        _LOADERS.append(compiled)
        return call

    return decorate


def load() -> float:
    """Load every kernel now (compile it on a fresh installation) and return the seconds that took.

    Code that times methods against each other calls this first, so the one-time cost does not land on
    whichever method happens to run first.
    """
    start = time.perf_counter()
    for loader in _LOADERS:
        loader()
    return time.perf_counter() - start


@_compiled_on_first_call(
    f"void({_C3}, {_ANY3}, {_ANY3}, {_ANY3}, float64, int64[:, :], {_ANY3}, {_C3}, int64)"
)
def quantize_block_kernel(
    wt: np.ndarray, u: np.ndarray, scale: np.ndarray, zero: np.ndarray, maxq: float, columns: np.ndarray,
    codes: np.ndarray, err: np.ndarray, start: int,
) -> None:  # pragma: no cover - compiled; the test suite checks it against the torch loop
    """Quantize the columns ``start .. start + b`` in order, on the block's transpose ``wt [G, b, r]``.

    ``u [G, n, n]`` is the upper Cholesky factor of ``H^-1``; ``scale``/``zero`` are ``[G, 1 or n, r]``
    (one grid for all columns, or one per column). Writes the codes of column ``i`` into column
    ``columns[i]`` of ``codes [G, r, N]`` (the weight's own column order) and the errors scaled by
    ``1 / u_ii`` into rows ``start .. start + b`` of ``err [G, n, r]``; ``wt``'s later columns take the
    updates in place.
    """
    groups, b, rows = wt.shape
    per_column = scale.shape[1] != 1
    top = np.float32(maxq)
    low = np.float32(0.0)
    for k in range(groups):
        for i in range(b):
            col = start + i
            c = col if per_column else 0
            out = columns[k, col]
            d = u[k, col, col]
            for j in range(rows):
                x = wt[k, i, j]
                s = scale[k, c, j]
                z = zero[k, c, j]
                q = _quantize_code(x, s, z, low, top)
                codes[k, j, out] = q
                err[k, col, j] = (x - s * (q - z)) / d
            for m in range(i + 1, b):
                um = u[k, col, start + m]
                for j in range(rows):
                    wt[k, m, j] -= um * err[k, col, j]


@_compiled_on_first_call(
    f"Tuple((int64[:, ::1], {_C3}, {_C3}))(float32[:, ::1], float32[:, :], {_ANY3}, {_ANY3})"
)
def order_columns_kernel(
    error_sums: np.ndarray, expected: np.ndarray, w: np.ndarray, hinv: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # pragma: no cover - compiled; tests check it against torch
    """Rank the columns of ``w [G, r, n]`` by their ``sensi_dyn`` score, highest first (stable), and apply
    that order.

    The score of column ``j`` is ``(error_sums[j] + expected[j]) / hinv[j, j]`` (`solvers.dynamic_sensitivity`
    from the column sums of the squared rounding error; ``expected`` is ``[G, 1 or n]``). Returns the order
    ``[G, n]``, ``w``'s columns in that order and ``hinv [G, n, n]`` with rows and columns in that order.
    """
    groups, rows, n = w.shape
    order = np.empty((groups, n), dtype=np.int64)
    w_out = np.empty((groups, rows, n), dtype=np.float32)
    hinv_out = np.empty((groups, n, n), dtype=np.float32)
    per_column = expected.shape[1] != 1
    score = np.empty(n, dtype=np.float32)
    for k in range(groups):
        for j in range(n):
            score[j] = -((error_sums[k, j] + expected[k, j if per_column else 0]) / hinv[k, j, j])
        order[k] = np.argsort(score, kind="mergesort")  # ascending on the negated score: stable, highest first
        pk = order[k].astype(np.uint64)  # unsigned: indexing skips the negative-index check (faster)
        for i in range(rows):
            src = w[k, i]
            dst = w_out[k, i]
            for j in range(n):
                dst[j] = src[pk[j]]
        for i in range(n):
            src = hinv[k, pk[i]]
            dst = hinv_out[k, i]
            for j in range(n):
                dst[j] = src[pk[j]]
    return order, w_out, hinv_out


@_compiled_on_first_call(f"{_C3}({_C3}, {_C3}, {_C3}, float64)")
def squared_rounding_error_kernel(
    w: np.ndarray, scale: np.ndarray, zero: np.ndarray, maxq: float
) -> np.ndarray:  # pragma: no cover - compiled; the test suite checks it against the torch path
    """``(q(w) - w)^2`` per weight of ``w [G, r, n]``; ``scale``/``zero`` are ``[G, r, 1 or n]``.

    One pass instead of eight tensor operations: what the column orders score, once per ranking of
    ``sensi_dyn``.
    """
    groups, rows, n = w.shape
    out = np.empty((groups, rows, n), dtype=np.float32)
    per_column = scale.shape[2] != 1
    top = np.float32(maxq)
    low = np.float32(0.0)
    for k in range(groups):
        for i in range(rows):
            if per_column:  # two loops: with one grid per row the inner loop vectorises (this one does not)
                for j in range(n):
                    out[k, i, j] = _squared_rounding_error(w[k, i, j], scale[k, i, j], zero[k, i, j], low, top)
            else:
                s = scale[k, i, 0]
                z = zero[k, i, 0]
                for j in range(n):
                    out[k, i, j] = _squared_rounding_error(w[k, i, j], s, z, low, top)
    return out


@_compiled_on_first_call(f"void({_ANY3}, {_ANY3}, {_ANY3}, {_ANY3}, {_C3}, {_C3})")
def block_delta_kernel(
    new: np.ndarray, scale: np.ndarray, zero: np.ndarray, q: np.ndarray, q_new: np.ndarray, d: np.ndarray
) -> None:  # pragma: no cover - compiled; the test suite checks it against the torch path
    """`refine.block_delta`: the values ``q_new = scale * (new - zero)`` of a block's new codes ``new [G, r, k]``
    and their change ``d = q_new - q`` from the current values ``q``; ``scale``/``zero`` are ``[G, r, 1 or k]``."""
    groups, rows, k = new.shape
    per_column = scale.shape[2] != 1
    for g in range(groups):
        for i in range(rows):
            for j in range(k):
                c = j if per_column else 0
                v = scale[g, i, c] * (new[g, i, j] - zero[g, i, c])
                q_new[g, i, j] = v
                d[g, i, j] = v - q[g, i, j]


@_compiled_on_first_call(
    f"void(float32[:, :], float32[:, :], {_ANY3}, {_ANY3}, {_ANY3}, {_ANY3}, {_ANY3}, {_ANY3}, float32[:, :])"
)
def accept_steps_kernel(
    change: np.ndarray, floor: np.ndarray, d: np.ndarray, new: np.ndarray, q_new: np.ndarray,
    pending: np.ndarray, codes: np.ndarray, q: np.ndarray, objective: np.ndarray,
) -> None:  # pragma: no cover - compiled; the test suite checks it against the torch path
    """`refine.accept_steps`: the rows (``[G, r]``) whose ``change`` is below ``floor`` take their block's new
    codes and values; every row writes its change ``d [G, r, k]`` times 1 or 0 into ``pending`` and adds
    ``change`` times 1 or 0 to ``objective``, the float32 products the torch path computes. One pass instead
    of eight tensor calls per block of a refinement sweep."""
    groups, rows, k = d.shape
    one = np.float32(1.0)
    nil = np.float32(0.0)
    for g in range(groups):
        for i in range(rows):
            take = change[g, i] < floor[g, i]
            t = one if take else nil
            for j in range(k):
                pending[g, i, j] = d[g, i, j] * t
            if take:
                for j in range(k):
                    codes[g, i, j] = new[g, i, j]
                    q[g, i, j] = q_new[g, i, j]
            objective[g, i] += change[g, i] * t


@numba.njit(inline="always")
def _quantize_code(x: float, s: float, z: float, low: float, top: float) -> float:  # pragma: no cover
    """`quantizer.quantize_codes` of one weight, as the same float32 operations (inlined into the kernels)."""
    return min(max(np.float32(np.rint(x / s)) + z, low), top)


@numba.njit(inline="always")
def _squared_rounding_error(x: float, s: float, z: float, low: float, top: float) -> float:  # pragma: no cover
    """``(q(x) - x)^2`` of one weight: `quantizer.fake_quantize` minus the weight, squared."""
    d = s * (_quantize_code(x, s, z, low, top) - z) - x
    return d * d
