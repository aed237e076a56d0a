"""Distributed calibration glue on top of a Lightning `Strategy` (DDP, multi-node DDP, or one device).

Every rank captures Hessians on its own shard of the calibration data; `StrategyHooks` then plugs into
`quantize_model`:

- `reduce_hessian` all-reduces each layer's Hessian weighted by the input columns each rank saw
  (``H = sum_r N_r H_r / sum_r N_r``, exactly the Hessian of the union of the shards), plus the column
  and sample counts;
- `solve_layers` solves each layer once, on one rank (layers are spread over ranks by their solver
  cost), and broadcasts the results, so every rank writes identical weights;
- `batchnorm_sync` gives `quantize_model` the BatchNorm step's collectives (`BatchNormSync`): a float64
  sum over ranks, which makes bias correction and ``bn_mode="auto"``'s held-back scores global, and
  `sync_batchnorm`, which averages re-estimated BatchNorm statistics over ranks weighted by the number
  of batches each rank saw (equal to a single-process re-estimation over all ranks' batches).

Only the strategy's public collectives are used (``reduce``, ``broadcast``), so whatever Lightning runs
(gloo on CPU, NCCL on GPUs, several nodes) works here. With one process every hook is a no-op.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.nn as nn

from lightning_obq.core.config import QuantConfig
from lightning_obq.core.hessian import HessianAccumulator, weight_matrix
from lightning_obq.core.layer import LayerResult, quantize_layer
from lightning_obq.model.batchnorm import BatchNormSync, batchnorm_layers

log = logging.getLogger(__name__)


class StrategyHooks:
    """`quantize_model` hooks that make calibration on many processes equal to one process on all data."""

    def __init__(self, strategy: Any) -> None:
        self.strategy = strategy

    @property
    def world_size(self) -> int:
        return int(getattr(self.strategy, "world_size", 1) or 1)

    @property
    def rank(self) -> int:
        return int(getattr(self.strategy, "global_rank", 0) or 0)

    @property
    def active(self) -> bool:
        """True when there is more than one process to talk to."""
        return self.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()

    def _sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.strategy.reduce(tensor, reduce_op="sum")

    def sum_int(self, value: int) -> int:
        """Sum of an integer over ranks."""
        if not self.active:
            return value
        device = getattr(self.strategy, "root_device", torch.device("cpu"))
        return int(self._sum(torch.tensor([float(value)], dtype=torch.float64, device=device)).item())

    def any_true(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is true on any rank."""
        return self.sum_int(int(flag)) > 0

    def reduce_hessian(self, name: str, acc: HessianAccumulator) -> None:
        """Replace the rank's Hessian with the column-weighted mean over all ranks (float64 sums)."""
        if not self.active:
            return
        w = weight_matrix(acc.module)
        device = w.device
        g, _, d_col = w.shape
        local = acc.hessian if acc.hessian is not None else torch.zeros(g, d_col, d_col, device=device)
        weighted = local.to(torch.float64) * acc.columns
        counts = torch.tensor([acc.columns, acc.samples], dtype=torch.float64, device=device)
        weighted = self._sum(weighted)
        counts = self._sum(counts)
        columns = int(counts[0].item())
        if columns == 0:
            raise ValueError(f"layer {name!r} received no calibration input on any of the {self.world_size} ranks")
        acc.hessian = (weighted / columns).to(acc.dtype)
        acc.columns = columns
        acc.samples = int(counts[1].item())

    def _owners(self, weights: list[torch.Tensor]) -> list[int]:
        """Rank that solves each layer: largest solver cost first, to the least loaded rank (deterministic)."""
        costs = [w.shape[0] * (w.shape[2] ** 3 + w.shape[1] * w.shape[2] ** 2) for w in weights]
        load = [0.0] * self.world_size
        owners = [0] * len(weights)
        for i in sorted(range(len(weights)), key=lambda i: (-costs[i], i)):
            rank = min(range(self.world_size), key=lambda r: (load[r], r))
            owners[i] = rank
            load[rank] += costs[i]
        return owners

    def solve_layers(
        self, names: list[str], weights: list[torch.Tensor], hessians: list[torch.Tensor], config: QuantConfig
    ) -> list[LayerResult]:
        """Solve each layer on its owner rank and broadcast the result; every rank returns all results.

        If any rank fails, every rank raises (a `RuntimeError` naming the failing layer on the other
        ranks), so `quantize_model` restores the FP weights everywhere instead of hanging in a collective.
        """
        if not self.active:
            return [quantize_layer(w, h, config, name=n) for n, w, h in zip(names, weights, hessians, strict=True)]
        owners = self._owners(weights)
        log.debug("rank %d solves layers %s", self.rank, [n for n, o in zip(names, owners, strict=True)
                                                          if o == self.rank])
        mine: dict[int, LayerResult] = {}
        error: BaseException | None = None
        for i, (name, w, h) in enumerate(zip(names, weights, hessians, strict=True)):
            if owners[i] != self.rank:
                continue
            try:
                mine[i] = quantize_layer(w, h, config, name=name)
            except Exception as exc:  # re-raised below, after telling the other ranks
                error = exc
                break
        if self.any_true(error is not None):
            if error is not None:
                raise error
            raise RuntimeError(
                f"quantization failed on another rank (layers {names}); the FP weights are restored on every rank"
            ) from None
        results: list[LayerResult] = []
        for i, w in enumerate(weights):
            payload = _to_cpu(mine[i]) if owners[i] == self.rank else None
            result = self.strategy.broadcast(payload, src=owners[i])
            results.append(_to_device(result, w.device))
        return results

    def sync_batchnorm(self, model: nn.Module) -> int:
        """Average re-estimated BN running stats over ranks, weighted by batches seen; returns BN layers synced."""
        if not self.active:
            return 0
        layers = batchnorm_layers(model)
        for m in layers:
            n = m.num_batches_tracked.to(torch.float64)
            stats = torch.cat([m.running_mean.double() * n, m.running_var.double() * n, n.reshape(1)])
            stats = self._sum(stats)
            total = stats[-1]
            if total.item() == 0:
                continue
            c = m.running_mean.numel()
            m.running_mean.copy_((stats[:c] / total).to(m.running_mean.dtype))
            m.running_var.copy_((stats[c : 2 * c] / total).to(m.running_var.dtype))
            m.num_batches_tracked.fill_(int(total.item()))
        return len(layers)

    def batchnorm_sync(self) -> BatchNormSync | None:
        """The `BatchNormSync` for `quantize_model` under DDP (``None`` with one process), so every rank
        fits, scores and chooses the BatchNorm step on all ranks' calibration samples."""
        if not self.active:
            return None
        return BatchNormSync(sum=self._sum, statistics=self.sync_batchnorm)

    def mean_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """Mean of each metric over ranks (Lightning's ``sync_dist`` semantics); keys must match on all ranks."""
        if not self.active or not metrics:
            return dict(metrics)
        keys = sorted(metrics)
        device = getattr(self.strategy, "root_device", torch.device("cpu"))
        values = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=device)
        values = self._sum(values) / self.world_size
        return {k: float(v) for k, v in zip(keys, values.tolist(), strict=True)}

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """The strategy's broadcast (identity with one process)."""
        return self.strategy.broadcast(obj, src=src) if self.active else obj


def _map_result(result: LayerResult, fn: Any) -> LayerResult:
    fields = {k: (fn(v) if isinstance(v, torch.Tensor) else v) for k, v in vars(result).items()}
    return LayerResult(**fields)


def _to_cpu(result: LayerResult) -> LayerResult:
    return _map_result(result, lambda t: t.detach().cpu())


def _to_device(result: LayerResult, device: torch.device) -> LayerResult:
    return _map_result(result, lambda t: t.to(device))


def shard_size(total: int, world_size: int) -> int:
    """Per-rank share of a global sample budget."""
    return max(1, math.ceil(total / max(1, world_size)))
