"""Label-free output fidelity of a quantized model against its full-precision original.

Two numbers, both computed with torchmetrics on the same (validation) batches and needing no labels:

- ``top1_agreement``: fraction of outputs whose arg-max class is the same for both models
  (``MulticlassAccuracy`` with the FP prediction as the target);
- ``kl_div``: mean ``KL(FP || quantized)`` of the softmax distributions (``KLDivergence``), in nats.

Outputs are read as class scores (logits): ``[N, C]``; ``[N, C, *spatial]`` (segmentation-like) is
flattened to one row per position; ``[N]`` or ``[N, 1]`` is a binary logit. When a model returns a tuple,
list or dict, its first tensor is used. Under ``torch.distributed`` the torchmetrics states are
synchronised across processes when computed, so every rank gets the value over all shards.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchmetrics import KLDivergence
from torchmetrics.classification import MulticlassAccuracy

from .calibration import ForwardFn, default_forward, first_tensor, model_device, to_device


def class_scores(output: Any) -> torch.Tensor:
    """A model output as ``[rows, classes]`` logits (see the module docstring)."""
    t = first_tensor(output)
    if t is None:
        raise TypeError(f"model output of type {type(output).__name__} holds no tensor")
    t = t.detach()
    if t.dim() == 0:
        raise ValueError("model output is a scalar; output fidelity needs per-sample class scores")
    if t.dim() == 1 or (t.dim() == 2 and t.shape[1] == 1):
        t = t.reshape(-1, 1)
        return torch.cat([torch.zeros_like(t), t], dim=1)
    if t.dim() > 2:
        t = t.movedim(1, -1)
    return t.reshape(-1, t.shape[-1])


class OutputFidelity:
    """Streaming top-1 agreement and ``KL(reference || candidate)`` over pairs of model outputs."""

    def __init__(self) -> None:
        self.agreement: MulticlassAccuracy | None = None
        self.kl = KLDivergence(log_prob=True, reduction="mean")
        self.rows = 0

    def update(self, reference_output: Any, candidate_output: Any) -> None:
        """Add one batch: the reference (FP) output and the candidate (quantized) output of the same inputs."""
        ref = class_scores(reference_output)
        cand = class_scores(candidate_output).to(ref.device)
        if ref.shape != cand.shape:
            raise ValueError(f"FP output shape {tuple(ref.shape)} differs from quantized {tuple(cand.shape)}")
        if self.agreement is None:
            self.agreement = MulticlassAccuracy(num_classes=ref.shape[1], average="micro").to(ref.device)
            self.kl = self.kl.to(ref.device)
        self.agreement.update(cand.argmax(dim=1), ref.argmax(dim=1))
        self.kl.update(F.log_softmax(ref.double(), dim=1), F.log_softmax(cand.double(), dim=1))
        self.rows += ref.shape[0]

    def compute(self) -> dict[str, float]:
        """``{"top1_agreement", "kl_div"}`` over every batch added (all ranks under torch.distributed)."""
        if self.agreement is None:
            raise ValueError("output fidelity has no data: the evaluation batches were empty")
        return {"top1_agreement": float(self.agreement.compute()), "kl_div": float(self.kl.compute())}


def output_fidelity(
    reference: nn.Module,
    candidate: nn.Module,
    batches: Iterable[Any],
    forward_fn: ForwardFn | None = None,
    max_batches: int | None = None,
) -> dict[str, float]:
    """Top-1 agreement and KL divergence of ``candidate`` (quantized) against ``reference`` (FP).

    ``batches`` is a DataLoader or any iterable of batches (labels, if present, are ignored);
    ``forward_fn(model, batch)`` runs a batch that is not a plain tensor/tuple/dict (the same contract as
    `quantize_model`). Both models run in eval mode without gradients, each on its own device; their
    training mode is restored afterwards. ``max_batches`` caps the number of batches.
    """
    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int)
                                    or max_batches < 1):
        raise ValueError(f"max_batches must be a positive int or None, got {max_batches!r}")
    forward = forward_fn or default_forward
    modes = [(m, m.training) for m in (reference, candidate)]
    metric = OutputFidelity()
    try:
        reference.eval()
        candidate.eval()
        with torch.no_grad():
            for i, batch in enumerate(batches):
                if max_batches is not None and i >= max_batches:
                    break
                ref = forward(reference, to_device(batch, model_device(reference)))
                cand = forward(candidate, to_device(batch, model_device(candidate)))
                metric.update(ref, cand)
    finally:
        for m, training in modes:
            m.train(training)
    return metric.compute()
