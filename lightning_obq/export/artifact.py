"""Real low-bit artifacts: packed integer weights in one safetensors file, and loading them back.

`save_quantized` writes, for every quantized layer, the integer codes bit-packed densely
(`lightning_obq.export.packing`), the scales and zero points (per channel or per group) and the column
permutation if the solver used one; every other parameter and buffer of the model in its own dtype;
and a JSON header (format name and version, library version, config, layer list, a BLAKE2b digest of
every tensor) in the safetensors metadata. Nothing is pickled, so loading never executes code.

`load_quantized` checks the whole file against the model first (format, version, digests, layer
names, shapes, dtypes, packed sizes) and only then writes into the model, so a bad file leaves the model
untouched. Weights are either dequantized into the normal modules (bitwise equal to the in-memory
quantized model) or, with ``keep_packed=True``, kept packed in the modules and dequantized on the fly
at each forward, which shrinks the resident weight memory to the codes plus scales.

File layout (tensor names)::

    layers/<module name>/codes   uint8, codes of the weight in its natural element order, packed
    layers/<module name>/scale   float32 [G, d_row / G, n_groups]
    layers/<module name>/zero    uint8 (or float32 if not integral) [G, d_row / G, n_groups]
    layers/<module name>/perm    int32 column order used by the solver (informational)
    state/<state_dict key>       every other entry of ``model.state_dict()``
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lightning_obq.core.config import LAYER_TYPES
from lightning_obq.core.hessian import layer_groups
from lightning_obq.core.layer import LayerResult
from lightning_obq.export.modules import (
    DTYPES,
    LayerSpec,
    PackedMixin,
    dequantize_packed,
    dtype_name,
    pack_module,
)
from lightning_obq.export.packing import pack_codes
from lightning_obq.model.attention import AttentionProjection, find_projection
from lightning_obq.model.quantize import model_size_mb
from lightning_obq.model.report import QuantReport
from lightning_obq.version import __version__

log = logging.getLogger(__name__)

FORMAT_NAME = "lightning-obq"
FORMAT_VERSION = 1
LAYER_PREFIX = "layers/"
STATE_PREFIX = "state/"
def _digest(t: torch.Tensor) -> str:
    data = t.detach().reshape(-1).contiguous().cpu().view(torch.uint8).numpy().tobytes()
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _weight_key(model: nn.Module, name: str) -> str:
    """The ``state_dict`` key of layer ``name``'s weight (an attention module's ``in_proj_weight`` for its input
    projection, `lightning_obq.model.attention`)."""
    projection = find_projection(model, name)
    if projection is not None and projection.role == "in_proj":
        return f"{name.rpartition('.')[0]}.{projection.state_key}".lstrip(".")
    return f"{name}.weight" if name else "weight"


def _layer_module(model: nn.Module, name: str, where: str) -> nn.Module:
    """Layer ``name`` of ``model``: its module, or for an attention module's input projection (a bare parameter)
    the `AttentionProjection` that stands in for it."""
    try:
        module = model.get_submodule(name)
    except AttributeError as exc:
        module = find_projection(model, name)
        if module is None:
            raise ValueError(f"{where}: layer {name!r} does not exist in {type(model).__name__}") from exc
    if not isinstance(module, tuple(LAYER_TYPES.values())):
        raise ValueError(f"{where}: {name!r} is a {type(module).__name__}, not one of {list(LAYER_TYPES)}")
    if isinstance(module, PackedMixin) or isinstance(getattr(module, "attention", None), PackedMixin):
        raise ValueError(f"{where}: layer {name!r} already holds packed weights; use a freshly built model")
    return module


def _pack(module: nn.Module, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: LayerSpec) -> None:
    """`pack_module` for a layer: an attention module's input projection packs the attention's ``in_proj_weight``."""
    if isinstance(module, AttentionProjection):
        pack_module(module.attention, packed, scale, zero, spec, attr=module.state_key)
    else:
        pack_module(module, packed, scale, zero, spec)


def _layer_spec(name: str, module: nn.Module, r: LayerResult) -> LayerSpec:
    """Header entry for one report layer, after checking the result belongs to this module."""
    w = module.weight
    where = f"layer {name!r}"
    groups = layer_groups(module)
    d_row = w.shape[0]
    matrix = (groups, d_row // groups, w.numel() // d_row)
    if tuple(r.codes.shape) != matrix:
        raise ValueError(f"{where}: codes of shape {tuple(r.codes.shape)} do not fit weight {tuple(w.shape)} "
                         f"(expected {matrix})")
    n_groups = r.scale.shape[-1]
    if tuple(r.scale.shape) != (*matrix[:2], n_groups) or r.zero.shape != r.scale.shape:
        raise ValueError(f"{where}: scale {tuple(r.scale.shape)} / zero {tuple(r.zero.shape)} do not fit "
                         f"codes {tuple(r.codes.shape)}")
    zero_int = bool(torch.equal(r.zero, r.zero.round())) and bool(((r.zero >= 0) & (r.zero <= 255)).all())
    return LayerSpec(
        name=name, kind=next(k for k, c in LAYER_TYPES.items() if isinstance(module, c)),
        weight_shape=tuple(w.shape), weight_dtype=dtype_name(w.dtype), groups=groups, bits=int(r.bits),
        group_size=r.group_size, n_groups=n_groups, zero_dtype="uint8" if zero_int else "float32",
        perm_shape=None if r.perm is None else tuple(r.perm.shape),
    )


def quantized_layers(
    model: nn.Module, report: QuantReport | None = None
) -> dict[str, tuple[LayerSpec, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Every quantized layer as ``(spec, packed codes, scale, zero)`` on the CPU.

    With a ``report`` the codes come from ``report.results`` and each layer's current weight must
    still equal them (`ValueError` otherwise: the model was changed after quantization). Without one,
    the model's packed layers (from ``load_quantized(..., keep_packed=True)``) are used.
    """
    out = {}
    if report is None:
        for name, module in model.named_modules():
            if isinstance(module, PackedMixin):
                a = module.packed_attr
                layer = name if a == "weight" else f"{name}.in_proj".lstrip(".")
                out[layer] = (getattr(module, f"{a}_spec"), *(getattr(module, f"{a}_{t}").cpu()
                                                              for t in ("packed", "scale", "zero")))
        return out
    for name, r in report.results.items():
        module = _layer_module(model, name, "quantized layers")
        spec = _layer_spec(name, module, r)
        scale = r.scale.detach().float().cpu().contiguous()
        zero = r.zero.detach().float().cpu()
        zero = zero.to(torch.uint8) if spec.zero_dtype == "uint8" else zero.contiguous()
        packed = pack_codes(r.codes.detach().cpu().reshape(-1), spec.bits)
        if not torch.equal(dequantize_packed(packed, scale, zero, spec), module.weight.detach().cpu()):
            raise ValueError(f"the weight of layer {name!r} no longer equals its quantized codes; was the model "
                             "changed after quantize_model? Re-quantize it first")
        out[name] = (spec, packed, scale, zero)
    return out


def save_quantized(model: nn.Module, path: str | os.PathLike, report: QuantReport) -> Path:
    """Write ``model`` quantized by `quantize_model` as one safetensors file; returns the path.

    ``report`` is the `QuantReport` that `quantize_model` returned for this model: its ``results``
    hold the integer codes. The model's current weights must still equal those codes (a model changed
    after quantization would otherwise be saved wrongly), which is checked. The file is written to a
    temporary name and renamed, so an interrupted save never leaves a truncated artifact behind.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(report, QuantReport):
        hint = " (a QuantConfig holds no integer codes)" if type(report).__name__ == "QuantConfig" else ""
        raise TypeError(f"report must be the QuantReport returned by quantize_model, got {type(report).__name__}"
                        f"{hint}")
    if not report.results:
        raise ValueError("report.results is empty: save_quantized needs the integer codes that quantize_model "
                         "keeps in QuantReport.results (a report rebuilt from JSON has none)")
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    specs: dict[str, LayerSpec] = {}
    for name, (spec, packed, scale, zero) in quantized_layers(model, report).items():
        prefix = f"{LAYER_PREFIX}{name}/"
        tensors[prefix + "codes"], tensors[prefix + "scale"], tensors[prefix + "zero"] = packed, scale, zero
        perm = report.results[name].perm
        if perm is not None:
            tensors[prefix + "perm"] = perm.detach().cpu().to(torch.int32).contiguous()
        specs[name] = spec
    quantized_keys = {_weight_key(model, n) for n in specs}
    state = {}
    for key, value in model.state_dict().items():
        if key in quantized_keys:
            continue
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"save_quantized: state_dict entry {key!r} is a {type(value).__name__}, not a tensor")
        if dtype_name(value.dtype) not in DTYPES:
            raise TypeError(f"save_quantized: state_dict entry {key!r} has unsupported dtype {value.dtype}")
        state[key] = {"dtype": dtype_name(value.dtype), "shape": list(value.shape)}
        # clone: safetensors refuses tensors that share memory (tied weights, views)
        tensors[STATE_PREFIX + key] = value.detach().cpu().contiguous().clone()
    header = {
        "library_version": __version__,
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "config": report.config,
        "layers": {n: s.to_json() for n, s in specs.items()},
        "state": state,
        "digests": {k: _digest(t) for k, t in tensors.items()},
    }
    metadata = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION), "header": json.dumps(header)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    log.info("saved %d quantized layers and %d other tensors to %s (%.2f MB)", len(specs), len(state), path,
             path.stat().st_size / 2**20)
    return path


@dataclass
class QuantizedArtifact:
    """A validated artifact in memory: header, layer specs and every tensor (digests already checked)."""

    path: Path
    header: dict[str, Any]
    layers: dict[str, LayerSpec]
    tensors: dict[str, torch.Tensor]

    def layer_tensors(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        prefix = f"{LAYER_PREFIX}{name}/"
        return self.tensors[prefix + "codes"], self.tensors[prefix + "scale"], self.tensors[prefix + "zero"]

    def state(self) -> dict[str, torch.Tensor]:
        return {k.removeprefix(STATE_PREFIX): v for k, v in self.tensors.items() if k.startswith(STATE_PREFIX)}


def read_quantized(path: str | os.PathLike) -> QuantizedArtifact:
    """Open and check an artifact on its own (no model): format, version, header, tensor shapes, digests.

    Raises `ValueError` naming the file and the offending entry. Only safetensors and JSON are parsed.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            keys = list(f.keys())
            if metadata.get("format") != FORMAT_NAME:
                raise ValueError(f"{path}: not a {FORMAT_NAME} artifact (metadata format={metadata.get('format')!r})")
            version = metadata.get("format_version")
            if version != str(FORMAT_VERSION):
                raise ValueError(f"{path}: unsupported format_version {version!r}; this library (lightning-obq "
                                 f"{__version__}) reads version {FORMAT_VERSION}")
            tensors = {k: f.get_tensor(k) for k in keys}
    except SafetensorError as exc:
        raise ValueError(f"{path}: not a readable safetensors file (truncated or corrupted?): {exc}") from exc
    try:
        header = json.loads(metadata["header"])
        layers_json, state_json, digests = header["layers"], header["state"], header["digests"]
        if not all(isinstance(x, dict) for x in (layers_json, state_json, digests)):
            raise TypeError("layers/state/digests must be objects")
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: malformed JSON header ({exc!r})") from exc
    layers = {name: LayerSpec.from_json(name, d, str(path)) for name, d in layers_json.items()}
    expected: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, spec in layers.items():
        prefix = f"{LAYER_PREFIX}{name}/"
        expected[prefix + "codes"] = ("uint8", (spec.packed_bytes,))
        expected[prefix + "scale"] = ("float32", spec.grid_shape)
        expected[prefix + "zero"] = (spec.zero_dtype, spec.grid_shape)
        if spec.perm_shape is not None:
            expected[prefix + "perm"] = ("int32", spec.perm_shape)
    for key, d in state_json.items():
        try:
            expected[STATE_PREFIX + key] = (str(d["dtype"]), tuple(int(x) for x in d["shape"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}: malformed header entry for state {key!r} ({exc!r})") from exc
    if set(expected) != set(tensors):
        missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        raise ValueError(f"{path}: tensors do not match the header (missing {missing[:5]}, unexpected {extra[:5]})")
    for key, (dtype, shape) in expected.items():
        t = tensors[key]
        if dtype_name(t.dtype) != dtype or tuple(t.shape) != shape:
            raise ValueError(f"{path}: tensor {key!r} is {dtype_name(t.dtype)} {tuple(t.shape)}, header says "
                             f"{dtype} {shape}")
        if digests.get(key) != _digest(t):
            raise ValueError(f"{path}: tensor {key!r} fails its checksum (the file is corrupted)")
    return QuantizedArtifact(path, header, layers, tensors)


def _check_against_model(art: QuantizedArtifact, model: nn.Module) -> dict[str, nn.Module]:
    """Everything that could go wrong when writing ``art`` into ``model``, checked up front."""
    where = str(art.path)
    arch = f"(the file was saved from {art.header.get('model_class')!r}, the model is {type(model).__qualname__!r})"
    modules = {}
    for name, spec in art.layers.items():
        try:
            module = _layer_module(model, name, where)
        except ValueError as exc:
            raise ValueError(f"{exc} {arch}") from exc
        if not isinstance(module, LAYER_TYPES[spec.kind]):
            raise ValueError(f"{where}: layer {name!r} is a {type(module).__name__} in the model but a {spec.kind} "
                             f"in the file {arch}")
        w = module.weight
        if tuple(w.shape) != spec.weight_shape or layer_groups(module) != spec.groups:
            raise ValueError(f"{where}: layer {name!r} has weight shape {tuple(w.shape)} (groups "
                             f"{layer_groups(module)}) in the model but {spec.weight_shape} (groups "
                             f"{spec.groups}) in the file {arch}")
        if dtype_name(w.dtype) != spec.weight_dtype:
            raise ValueError(f"{where}: layer {name!r} weight is {w.dtype} in the model but {spec.weight_dtype} "
                             "in the file; convert the model's dtype before loading")
        modules[name] = module
    model_state = model.state_dict()
    quantized_keys = {_weight_key(model, n) for n in art.layers}
    wanted = {k: v for k, v in model_state.items() if k not in quantized_keys}
    state = art.header["state"]
    if set(wanted) != set(state):
        missing, extra = sorted(set(wanted) - set(state)), sorted(set(state) - set(wanted))
        raise ValueError(f"{where}: the model's parameters and buffers do not match the file {arch}: missing in "
                         f"the file {missing[:5]}{'...' if len(missing) > 5 else ''}, not in the model "
                         f"{extra[:5]}{'...' if len(extra) > 5 else ''}")
    for key, value in wanted.items():
        shape, dtype = tuple(state[key]["shape"]), state[key]["dtype"]
        if tuple(value.shape) != shape:
            raise ValueError(f"{where}: {key!r} has shape {tuple(value.shape)} in the model but {shape} in the file "
                             f"{arch}")
        if dtype_name(value.dtype) != dtype:
            raise ValueError(f"{where}: {key!r} is {value.dtype} in the model but {dtype} in the file")
    return modules


def load_quantized(path: str | os.PathLike, model: nn.Module, keep_packed: bool = False) -> nn.Module:
    """Load an artifact of `save_quantized` into ``model`` (same architecture) in place and return it.

    Everything is validated before the model is touched: format and version, per-tensor checksums,
    that every layer exists with the same shape and dtype, that the other parameters and buffers
    match one to one, that packed buffer sizes agree with bits and shapes. On any problem a
    `ValueError` names the file and the entry, and the model is left exactly as it was.

    ``keep_packed=False`` writes the dequantized weights into the normal modules (bitwise equal to the
    model `quantize_model` produced). ``keep_packed=True`` keeps codes packed in the layers
    (`PackedLinear`, `PackedConv2d`, ...; still instances of the original classes) and dequantizes on
    each forward: same outputs, smaller resident memory (an attention module's ``in_proj_weight``, which torch
    reads as a bare parameter, becomes a property of a packed ``nn.MultiheadAttention`` subclass, dequantized on each
    access).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    art = read_quantized(path)
    modules = _check_against_model(art, model)
    weights = {}
    if not keep_packed:
        weights = {_weight_key(model, n): dequantize_packed(*art.layer_tensors(n), spec)
                   for n, spec in art.layers.items()}
    # From here on nothing can fail on account of the file: shapes, keys and dtypes all match.
    state = art.state()
    state.update(weights)
    result = model.load_state_dict(state, strict=not keep_packed)
    if keep_packed:
        expected_missing = {_weight_key(model, n) for n in art.layers}
        if set(result.missing_keys) != expected_missing or result.unexpected_keys:  # guarded by the checks above
            raise RuntimeError(f"unexpected state_dict mismatch while loading {art.path}: {result}")
        for name, spec in art.layers.items():
            _pack(modules[name], *art.layer_tensors(name), spec)
    log.info("loaded %d quantized layers from %s%s", len(art.layers), art.path, " (packed)" if keep_packed else "")
    return model


def resident_weight_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers (each tensor counted once): the resident weights."""
    return round(model_size_mb(model) * 2**20)
