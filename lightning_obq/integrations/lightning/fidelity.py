"""`OutputFidelity`: the output fidelity of `lightning_obq.model.fidelity` as a torchmetrics ``Metric``.

States are the summed `fidelity_terms`, reduced by summing over processes when computed, so under DDP every
rank gets the value over all shards, like any torchmetrics metric.
"""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics import Metric

from lightning_obq.model.fidelity import fidelity_from_terms, fidelity_terms


class OutputFidelity(Metric):
    """Streaming top-1 agreement and ``KL(reference || candidate)`` over pairs of model outputs.

    ``update(reference_output, candidate_output)`` adds one batch (the FP and the quantized output of the
    same inputs); ``compute()`` returns ``{"top1_agreement", "kl_div"}``.
    """

    full_state_update = False
    higher_is_better = None
    is_differentiable = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("terms", torch.zeros(3, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, reference_output: Any, candidate_output: Any) -> None:
        self.terms += fidelity_terms(reference_output, candidate_output).to(self.terms.device)

    def compute(self) -> dict[str, float]:
        return fidelity_from_terms(self.terms)
