"""Label-free output fidelity of a quantized model against its full-precision original.

Two numbers, both computed on the same (validation) batches and needing no labels:

- ``top1_agreement``: fraction of outputs whose arg-max class is the same for both models (what
  torchmetrics' ``MulticlassAccuracy(average="micro")`` gives with the FP prediction as the target);
- ``kl_div``: mean ``KL(FP || quantized)`` of the softmax distributions (torchmetrics' ``KLDivergence``
  with ``log_prob=True``), in nats, over all rows.

Outputs are read as class scores (logits): ``[N, C]``; ``[N, C, *spatial]`` (segmentation-like) is
flattened to one row per position; ``[N]`` or ``[N, 1]`` is a binary logit. When a model returns a tuple,
list or dict, its first tensor is used. Plain torch: a batch adds its `fidelity_terms` (agreeing rows, rows,
summed KL), and `fidelity_from_terms` turns the sums into the two numbers, so the sums can be added over
processes first (`lightning_obq.integrations.lightning.fidelity.OutputFidelity` is the torchmetrics
``Metric`` over the same terms).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from lightning_obq.model.calibration import ForwardFn, default_forward, first_tensor, model_device, to_device
from lightning_obq.model.state import module_mode


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


def _paired_scores(reference_output: Any, candidate_output: Any) -> tuple[torch.Tensor, torch.Tensor]:
    ref = class_scores(reference_output)
    cand = class_scores(candidate_output).to(ref.device)
    if ref.shape != cand.shape:
        raise ValueError(f"FP output shape {tuple(ref.shape)} differs from quantized {tuple(cand.shape)}")
    return ref, cand


def row_kl(reference_output: Any, candidate_output: Any) -> torch.Tensor:
    """``KL(reference || candidate)`` of the softmax of every row (float64): the per-row terms `fidelity_terms`
    sums, kept apart where a decision needs their spread (`lightning_obq.model.batchnorm`)."""
    ref, cand = _paired_scores(reference_output, candidate_output)
    p, q = F.log_softmax(ref.double(), dim=1), F.log_softmax(cand.double(), dim=1)
    return torch.sum(p.exp() * (p - q), dim=-1)


def fidelity_terms(reference_output: Any, candidate_output: Any) -> torch.Tensor:
    """One batch's ``[agreeing rows, rows, summed KL(reference || candidate)]`` as a float64 CPU tensor.

    Both outputs of the same inputs; the sums of these over batches (and processes) give
    `fidelity_from_terms`.
    """
    ref, cand = _paired_scores(reference_output, candidate_output)
    agree = (cand.argmax(dim=1) == ref.argmax(dim=1)).sum()
    kl = row_kl(ref, cand).sum()
    return torch.stack([agree.double(), torch.tensor(float(ref.shape[0]), dtype=torch.float64, device=ref.device),
                        kl]).cpu()


def fidelity_from_terms(terms: torch.Tensor) -> dict[str, float]:
    """``{"top1_agreement", "kl_div"}`` from summed `fidelity_terms`.

    The agreement is divided in float32 and the KL in float64, as torchmetrics does, so the numbers equal
    those of ``MulticlassAccuracy``/``KLDivergence`` on the same batches.
    """
    agree, rows, kl = (float(v) for v in terms)
    if rows == 0:
        raise ValueError("output fidelity has no data: the evaluation batches were empty")
    agreement = torch.tensor(agree, dtype=torch.float32) / torch.tensor(rows, dtype=torch.float32)
    return {"top1_agreement": float(agreement), "kl_div": kl / rows}


def global_sum(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over the processes of the default ``torch.distributed`` group (``t`` itself without one)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else t.device
    out = t.to(device)
    dist.all_reduce(out)
    return out.to(t.device)


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
    training modes are restored afterwards. ``max_batches`` caps the number of batches. Under
    ``torch.distributed`` the sums are added over processes, so every rank gets the value over all shards.
    """
    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int)
                                    or max_batches < 1):
        raise ValueError(f"max_batches must be a positive int or None, got {max_batches!r}")
    forward = forward_fn or default_forward
    terms = torch.zeros(3, dtype=torch.float64)
    with module_mode(reference, candidate), torch.no_grad():
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            ref = forward(reference, to_device(batch, model_device(reference)))
            cand = forward(candidate, to_device(batch, model_device(candidate)))
            terms += fidelity_terms(ref, cand)
    return fidelity_from_terms(global_sum(terms))
