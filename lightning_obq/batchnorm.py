"""BatchNorm running-statistics re-estimation after the weights change."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch.nn as nn

from .calibration import ForwardFn, run_batches


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """Every BatchNorm module that tracks running statistics."""
    return [
        m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]


def reestimate_batchnorm(model: nn.Module, batches: Iterable[Any], forward_fn: ForwardFn | None = None) -> int:
    """Reset BN running stats and re-estimate them as exact averages over ``batches``.

    Only BN layers switch to train mode (dropout and the rest stay as they were); momentum is set to
    ``None`` for a cumulative average, then everything is restored. Returns how many BN layers were updated.
    """
    layers = batchnorm_layers(model)
    if not layers:
        return 0
    saved = [(m, m.training, m.momentum) for m in layers]
    try:
        for m in layers:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        run_batches(model, batches, forward_fn)
    finally:
        for m, training, momentum in saved:
            m.train(training)
            m.momentum = momentum
    return len(layers)
