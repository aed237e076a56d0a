"""Calibration data: drawing batches from loaders/iterables and running them through a model."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn as nn

ForwardFn = Callable[[nn.Module, Any], Any]

# Keys tried, in order, when a batch is a dict and no forward_fn is given.
INPUT_KEYS = ("input", "inputs", "x", "image", "images", "img", "pixel_values", "input_ids")


def first_tensor(batch: Any) -> torch.Tensor | None:
    """The first tensor found in a (nested) batch, depth first."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, Mapping):
        batch = list(batch.values())
    if isinstance(batch, Sequence) and not isinstance(batch, str | bytes):
        for item in batch:
            found = first_tensor(item)
            if found is not None:
                return found
    return None


def batch_size(batch: Any) -> int:
    """Samples in a batch: the leading dim of its first tensor."""
    t = first_tensor(batch)
    if t is None:
        raise TypeError(f"calibration batch of type {type(batch).__name__} holds no tensor")
    return t.shape[0] if t.dim() > 0 else 1


def _map_tensors(batch: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, Mapping):
        return {k: _map_tensors(v, fn) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(_map_tensors(v, fn) for v in batch))
    if isinstance(batch, list | tuple):
        return type(batch)(_map_tensors(v, fn) for v in batch)
    return batch


def output_tensors(out: Any) -> list[torch.Tensor]:
    """The floating tensors of a model output (nested tuples, lists, dicts), depth first."""
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, Mapping):
        out = list(out.values())
    if isinstance(out, list | tuple):
        return [t for o in out for t in output_tensors(o)]
    return []


def flat_output(out: Any, detach: bool = True) -> torch.Tensor:
    """All floating tensors of a model output, flattened and concatenated (``detach=False`` keeps the graph)."""
    parts = [(t.detach() if detach else t).float().reshape(-1) for t in output_tensors(out)]
    return torch.cat(parts) if parts else torch.empty(0)


def detached_output(out: Any) -> Any:
    """A model output with every tensor detached, in float32 and on the CPU: a reference to compare with later."""
    return _map_tensors(out, lambda t: t.detach().float().cpu() if t.is_floating_point() else t.detach().cpu())


def sample_squared_change(output: Any, reference: Any, samples: int) -> torch.Tensor:
    """Squared difference of two outputs of the same batch, summed per sample (``[samples]``, float64), or as
    one total (``[1]``) when some output tensor has no leading dimension of ``samples``."""
    pairs = list(zip(output_tensors(output), output_tensors(reference), strict=True))
    per_sample = all(a.dim() > 0 and a.shape[0] == samples for a, _ in pairs)
    total = torch.zeros(samples if per_sample else 1, dtype=torch.float64)
    for out, ref in pairs:
        squared = (out.detach().double().cpu() - ref.double().cpu()).pow(2)
        total += squared.reshape(samples, -1).sum(dim=1) if per_sample else squared.sum()
    return total


def squared_output_change(
    model: nn.Module, batches: Iterable[Any], references: Iterable[Any], forward_fn: ForwardFn | None = None
) -> tuple[float, int]:
    """Summed squared difference of the model's (flattened, floating) outputs on ``batches`` from the
    recorded ``references``, and how many values were compared: the output-MSE measure that mixed
    precision's check and the BatchNorm choice share."""
    forward = forward_fn or default_forward
    device = model_device(model)
    squared, count = 0.0, 0
    with torch.no_grad():
        for batch, ref in zip(batches, references, strict=True):
            ref = flat_output(ref)
            out = flat_output(forward(model, to_device(batch, device))).to(ref.device)
            squared += float((out - ref).double().pow(2).sum())
            count += ref.numel()
    return squared, count


def to_device(batch: Any, device: torch.device) -> Any:
    """The batch with every tensor moved to ``device``."""
    return _map_tensors(batch, lambda t: t.to(device, non_blocking=True))


def slice_batch(batch: Any, start: int, stop: int | None = None) -> Any:
    """Samples ``start:stop`` of a batch (every tensor with a batch dimension is sliced)."""
    return _map_tensors(batch, lambda t: t[start:stop] if t.dim() > 0 else t)


def split_batches(batches: Sequence[Any], tail_samples: int) -> tuple[list[Any], list[Any]]:
    """``batches`` cut in two: the last ``tail_samples`` samples and everything before them.

    A batch that straddles the cut is sliced, so the two parts never share a sample. Returns
    ``(head, tail)``.
    """
    sizes = [batch_size(b) for b in batches]
    cut = sum(sizes) - tail_samples
    if not 0 < cut < sum(sizes):
        raise ValueError(f"cannot hold back {tail_samples} of {sum(sizes)} samples and keep some of both")
    head: list[Any] = []
    tail: list[Any] = []
    seen = 0
    for batch, n in zip(batches, sizes, strict=True):
        if seen + n <= cut:
            head.append(batch)
        elif seen >= cut:
            tail.append(batch)
        else:
            head.append(slice_batch(batch, 0, cut - seen))
            tail.append(slice_batch(batch, cut - seen))
        seen += n
    return head, tail


def _leading_sizes(batch: Any) -> set[int]:
    sizes: set[int] = set()
    _map_tensors(batch, lambda t: sizes.add(t.shape[0] if t.dim() > 0 else -1) or t)
    return sizes


def cut_batches(batches: Sequence[Any], samples: int) -> list[Any]:
    """``batches`` with every batch of more than ``samples`` samples cut into consecutive pieces of at most
    that many: the same samples in the same order. A batch whose tensors do not all share its batch size
    (per-sample lists, a shared mask) is left whole, since slicing it would not split samples."""
    if samples < 1:
        raise ValueError(f"cannot cut batches into pieces of {samples} samples")
    pieces: list[Any] = []
    for batch in batches:
        n = batch_size(batch)
        if n <= samples or _leading_sizes(batch) != {n}:
            pieces.append(batch)
            continue
        pieces.extend(slice_batch(batch, start, start + samples) for start in range(0, n, samples))
    return pieces


def draw_batches(calibration: Iterable[Any], max_samples: int) -> list[Any]:
    """Up to ``max_samples`` samples from a DataLoader or any iterable of tensors/tuples/dicts.

    The batches are kept (inputs only, never activations) so that every pass (Hessians, sequential
    layers, BatchNorm re-estimation) sees the same samples, even from a shuffling loader or a generator.
    """
    if calibration is None:
        raise ValueError("calibration data is None: pass a DataLoader or an iterable of batches")
    if isinstance(calibration, torch.Tensor):
        calibration = [calibration]
    try:
        iterator = iter(calibration)
    except TypeError as exc:
        raise TypeError(
            f"calibration must be a DataLoader or an iterable of batches, got {type(calibration).__name__}"
        ) from exc
    batches: list[Any] = []
    seen = 0
    for batch in iterator:
        n = batch_size(batch)
        if n == 0:
            continue
        if seen + n > max_samples:
            batch, n = slice_batch(batch, 0, max_samples - seen), max_samples - seen
        batches.append(batch)
        seen += n
        if seen >= max_samples:
            break
    if not batches:
        raise ValueError("calibration data is empty: the loader yielded no samples")
    return batches


def default_forward(model: nn.Module, batch: Any) -> Any:
    """Run a batch through the model: a tensor as is, the first item of a tuple/list, or a dict's input key."""
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, list | tuple) and batch and isinstance(batch[0], torch.Tensor):
        return model(batch[0])
    if isinstance(batch, Mapping):
        for key in INPUT_KEYS:
            if key in batch:
                return model(batch[key])
        raise TypeError(
            f"calibration batch is a dict with keys {sorted(batch)} and none of {list(INPUT_KEYS)}: "
            "pass forward_fn=lambda model, batch: model(...)"
        )
    raise TypeError(
        f"cannot feed a calibration batch of type {type(batch).__name__} to the model: pass forward_fn"
    )


@contextmanager
def removed_after(handles: Iterable[Any]) -> Iterator[None]:
    """Removes the hooks ``handles`` (torch ``RemovableHandle``) when the block ends, however it ends: a failed
    calibration pass never leaves hooks on the user's model."""
    handles = list(handles)
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (CPU for a parameterless model)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def run_batches(model: nn.Module, batches: Iterable[Any], forward_fn: ForwardFn | None = None,
                stop: type[BaseException] | None = None) -> None:
    """Forward every batch (no grad) on the model's device; ``stop`` exceptions end a batch early."""
    forward = forward_fn or default_forward
    device = model_device(model)
    with torch.no_grad():
        for batch in batches:
            try:
                forward(model, to_device(batch, device))
            except BaseException as exc:
                if stop is None or not isinstance(exc, stop):
                    raise
