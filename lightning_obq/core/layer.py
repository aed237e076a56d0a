"""`quantize_layer`: one weight matrix and its Hessian in, weights on the grid out."""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass

import torch

from lightning_obq.core.config import COLUMN_PARALLEL_METHODS, QuantConfig
from lightning_obq.core.grid import Grid, dequantize_codes, find_grid
from lightning_obq.core.hessian import damp_hessian
from lightning_obq.core.measure import measure
from lightning_obq.core.refine import refine_solution
from lightning_obq.core.solvers import HessianNotPositiveDefinite, solve_column_parallel, solve_obq, solve_rtn

log = logging.getLogger(__name__)

DAMP_RETRIES = 3  # each retry multiplies the damping by 10


@dataclass(kw_only=True)
class LayerOutcome:
    """What quantizing one layer gave and cost, shared by `LayerResult` (with the tensors) and the report's
    `LayerStats` (with the layer's description): one definition of these fields.

    ``error`` is the layer objective ``tr((W-Q) H (W-Q)^T)`` with the undamped Hessian (what the layer really
    loses), ``damped_error`` the same with the damped Hessian (what the solver minimised), ``rtn_error`` the
    undamped objective of round-to-nearest on the same grid; ``damp`` the damping used, ``seconds`` and the
    peaks the cost. With the refinement stage (fastobq/gptq: `refine_sweeps`),
    ``solve_error`` is the undamped objective of the column-parallel solve before it, ``refine_sweeps`` the
    sweeps it ran and ``refine_seconds`` its time (part of ``seconds``); without it ``solve_error == error``
    and both are 0.
    """

    bits: int
    error: float
    damped_error: float
    rtn_error: float
    damp: float
    seconds: float
    peak_rss_mb: float
    cuda_peak_mb: float
    solve_error: float = math.nan
    refine_sweeps: int = 0
    refine_seconds: float = 0.0

    def __post_init__(self) -> None:
        if math.isnan(self.solve_error):
            self.solve_error = self.error


@dataclass
class LayerResult(LayerOutcome):
    """Outcome of quantizing one layer: the `LayerOutcome` figures and the quantized tensors.

    ``weight`` is the dequantized weight (same shape and dtype as the input); ``codes`` holds the
    integer codes (uint8, same shape) with ``scale``/``zero`` of shape ``[..., d_row, n_groups]``
    (``n_groups`` = 1 unless group-wise, ``group_size`` columns each), so ``scale * (codes - zero)``, with
    the scales expanded to the columns (`Grid.column_params`), reproduces ``weight`` exactly in float32;
    ``perm`` is the column order the solver used (``None`` if natural).
    """

    weight: torch.Tensor
    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    group_size: int | None
    perm: torch.Tensor | None


def layer_error(w: torch.Tensor, q: torch.Tensor, h: torch.Tensor) -> float:
    """``sum_g tr((W_g - Q_g) H_g (W_g - Q_g)^T)`` for ``[G, d_row, d_col]`` weights.

    The product runs in float32 (a float64 one is much slower on large layers); only the final sum is
    float64, which keeps the result within float32 rounding of a float64 evaluation.
    """
    d = (w - q).float()
    return float(((d @ h.float()) * d).sum(dtype=torch.float64))


def _as_batched(weight: torch.Tensor, hessian: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if weight.dim() == 2 and hessian.dim() == 2:
        weight, hessian = weight.unsqueeze(0), hessian.unsqueeze(0)
    if weight.dim() != 3 or hessian.dim() != 3:
        raise ValueError(
            f"weight must be [d_row, d_col] with hessian [d_col, d_col] (or batched with a leading group "
            f"dim), got weight {tuple(weight.shape)} and hessian {tuple(hessian.shape)}"
        )
    g, _, d_col = weight.shape
    if hessian.shape != (g, d_col, d_col):
        raise ValueError(f"hessian shape {tuple(hessian.shape)} does not match weight {tuple(weight.shape)}")
    return weight, hessian


def refine_sweeps(config: QuantConfig, d_row: int) -> int:
    """Most refinement sweeps for a layer with ``d_row`` output rows per group under ``config`` (0 for obq and
    rtn: `QuantConfig` holds both sweep fields at 0 for them)."""
    return max(config.refine_sweeps, config.single_row_refine_sweeps) if d_row == 1 else config.refine_sweeps


def _refine(
    w: torch.Tensor, hd: torch.Tensor, codes: torch.Tensor, grid: Grid, config: QuantConfig, name: str, sweeps: int,
) -> tuple[torch.Tensor, Grid, torch.Tensor, int, float, float] | None:
    """`refine_solution` on the damped objective the solve minimised (``hd``): the codes, grid, weights, sweeps,
    and that objective before and after. The damping is what keeps the stage from overfitting the calibration
    samples: on a Hessian from fewer samples than inputs (a classifier head after pooling: EfficientNet-Lite1's
    1280-input fc on 256 crops) a sweep on the undamped objective halved the calibration error but raised the
    error on other crops by a third, where the damped one lowered both. None, with a warning, if the block
    factors fail all the same (the solve stands)."""
    try:
        new_codes, new_scale, sweeps, before, after = refine_solution(
            w, hd, codes, grid.scale, grid.zero, grid.maxq, grid.group_size, config.granularity == "tensor",
            sweeps)
    except HessianNotPositiveDefinite:
        log.warning("layer %r: the damped Hessian's blocks could not be factored; refinement skipped", name)
        return None
    new_grid = dataclasses.replace(grid, scale=new_scale)
    new_q = dequantize_codes(new_codes, *new_grid.column_params(w.shape[-1]))
    return new_codes, new_grid, new_q, sweeps, before, after


def _damping_term(w: torch.Tensor, q: torch.Tensor, extra: torch.Tensor) -> float:
    """What the damping adds to the layer objective: ``sum_j extra_j (W - Q)_ij^2`` (``extra [G, 1, d_col]``)."""
    return float(((w - q).pow(2) * extra).sum(dtype=torch.float64))


def quantize_layer(
    weight: torch.Tensor, hessian: torch.Tensor, config: QuantConfig | None = None, name: str = "layer"
) -> LayerResult:
    """Quantize one weight matrix ``[d_row, d_col]`` for the inputs summarised by ``hessian``.

    A batch of independent matrices (the groups of a grouped conv) is accepted as ``[G, d_row, d_col]``
    with ``[G, d_col, d_col]`` Hessians and solved in one call. ``hessian`` is the undamped
    ``2/N X X^T``; damping follows the config. Inputs that never fire (``H_jj = 0``) get weight 0.
    If the damped Hessian is not positive definite the damping is raised tenfold (with a warning) up to
    three times before a `ValueError` naming the layer.
    """
    config = config or QuantConfig()
    if not isinstance(weight, torch.Tensor) or not isinstance(hessian, torch.Tensor):
        raise TypeError("quantize_layer expects torch.Tensor weight and hessian")
    w, h = _as_batched(weight, hessian)
    if not torch.isfinite(w).all():
        raise ValueError(f"layer {name!r}: weight contains NaN or Inf")
    if not torch.isfinite(h).all():
        raise ValueError(f"layer {name!r}: Hessian contains NaN or Inf")
    # Inference mode: no autograd bookkeeping on the solvers' many small tensor ops (a noticeable share
    # of a small layer's solve); the tensors kept in the result are cloned out of it below.
    with measure(w.device) as m, torch.inference_mode():
        w = w.detach().float()
        h = h.detach().float()
        h_true = h  # undamped, dead diagonal 0: what the layer really loses is measured with it
        dead = h.diagonal(dim1=-2, dim2=-1) == 0  # [G, d_col]
        if bool(dead.any()):
            h = h.clone()
            h.diagonal(dim1=-2, dim2=-1)[dead] = 1.0
            w = w.masked_fill(dead.unsqueeze(1), 0.0)
        grid = find_grid(w, config.bits, config.symmetric, config.granularity, config.group_size,
                         config.range_search)
        scale, zero = grid.column_params(w.shape[-1])
        maxq = grid.maxq
        damp = config.damp
        for attempt in range(DAMP_RETRIES + 1):
            hd = damp_hessian(h, damp, config.damp_mode)
            try:
                perm = None
                if config.method in COLUMN_PARALLEL_METHODS:
                    codes, perm = solve_column_parallel(w, hd, scale, zero, maxq, config.order,
                                                        config.block_size, hessian_for_order=h)
                elif config.method == "obq":
                    codes = solve_obq(w, hd, scale, zero, maxq, config.obq_memory_mb, outliers=True)
                else:
                    torch.linalg.cholesky(hd)  # rtn needs no Hessian, but a broken one is still reported
                    codes = solve_rtn(w, scale, zero, maxq)
                break
            except (HessianNotPositiveDefinite, torch.linalg.LinAlgError) as exc:
                if attempt == DAMP_RETRIES:
                    raise ValueError(
                        f"layer {name!r}: Hessian is not positive definite even with damping {damp:g} "
                        f"({config.damp_mode}); check the calibration data or raise QuantConfig.damp"
                    ) from exc
                next_damp = damp * 10 if damp > 0 else 1e-4
                log.warning("layer %r: Hessian not positive definite with damp=%g, retrying with %g",
                            name, damp, next_damp)
                damp = next_damp
        # RTN on the grid the range search chose (the refinement's scale refit may move the method's grid).
        rtn = dequantize_codes(solve_rtn(w, scale, zero, maxq), scale, zero)
        q = dequantize_codes(codes, scale, zero)
        # The damping only adds to the diagonal, so the damped and undamped objectives need no second product.
        extra = (hd.diagonal(dim1=-2, dim2=-1) - h_true.diagonal(dim1=-2, dim2=-1)).unsqueeze(1)  # [G, 1, d_col]
        sweeps, refine_seconds, refined = 0, 0.0, None
        if most_sweeps := refine_sweeps(config, w.shape[1]):
            with measure(w.device, memory=False) as m_refine:
                refined = _refine(w, hd, codes, grid, config, name, most_sweeps)
            refine_seconds = m_refine.seconds
        term = _damping_term(w, q, extra)  # of the weights `q` currently holds
        if refined is None:
            error = solve_error = layer_error(w, q, h_true)
        else:
            new_codes, new_grid, new_q, sweeps, damped_before, damped_after = refined
            solve_error = max(0.0, damped_before - term)  # >= 0 whatever the rounding
            # `damped_after` is the start plus the accepted steps' exact changes, each below -REFINE_MIN_GAIN of its
            # row's objective (the margin that covers their float32 rounding; the tests compare it with the product):
            # monotone by construction, and the comparison keeps the better one should that ever change.
            if damped_after <= damped_before:
                codes, grid, q = new_codes, new_grid, new_q
                scale, zero = grid.column_params(w.shape[-1])
                term = _damping_term(w, q, extra)
                error = max(0.0, damped_after - term)
            else:
                error = solve_error
        damped_error = error + term
        rtn_error = layer_error(w, rtn, h_true)
    shape = weight.shape
    return LayerResult(
        weight=q.reshape(shape).to(weight.dtype, copy=True),
        codes=codes.to(torch.uint8).reshape(shape),
        scale=(grid.scale.reshape(*shape[:-1], -1) if weight.dim() == 3 else grid.scale[0]).clone(),
        zero=(grid.zero.reshape(*shape[:-1], -1) if weight.dim() == 3 else grid.zero[0]).clone(),
        bits=config.bits,
        group_size=grid.group_size,
        perm=None if perm is None else (perm if weight.dim() == 3 else perm[0]).clone(),
        error=error,
        damped_error=damped_error,
        rtn_error=rtn_error,
        damp=damp,
        seconds=m.seconds,
        peak_rss_mb=m.peak_rss_mb,
        cuda_peak_mb=m.cuda_peak_mb,
        solve_error=solve_error,
        refine_sweeps=sweeps,
        refine_seconds=refine_seconds,
    )
