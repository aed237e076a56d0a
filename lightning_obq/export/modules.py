"""Packed layers: Linear/ConvNd modules that hold their weight (and ``nn.MultiheadAttention`` modules that hold
their ``in_proj_weight``) as bit-packed codes and dequantize it at each access, and the `LayerSpec` that describes
one quantized layer (shapes, bits, grid) in an artifact.

`dequantize_packed` is the one dequantization path of loading and of packed layers; `pack_module` /
`unpack_module` convert a layer in place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from lightning_obq.core.config import LAYER_TYPES
from lightning_obq.core.grid import Grid, dequantize_codes
from lightning_obq.export.packing import packed_size, unpack_codes

DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
    torch.int8, torch.uint8, torch.bool,
)}


class PackedMixin:
    """Holds one parameter, ``packed_attr``, as bit-packed codes: the buffers ``<attr>_packed`` (uint8),
    ``<attr>_scale`` and ``<attr>_zero`` and the `LayerSpec` ``<attr>_spec``; the subclasses make the parameter a
    read-only property that dequantizes them on every access."""

    packed_attr = "weight"

    def dequantized(self) -> torch.Tensor:
        """The packed parameter as a float tensor (`dequantize_packed`)."""
        a = self.packed_attr
        return dequantize_packed(getattr(self, f"{a}_packed"), getattr(self, f"{a}_scale"),
                                 getattr(self, f"{a}_zero"), getattr(self, f"{a}_spec"))

    def extra_repr(self) -> str:
        spec: LayerSpec = getattr(self, f"{self.packed_attr}_spec")
        groups = f", group_size={spec.group_size}" if spec.group_size else ""
        what = "" if self.packed_attr == "weight" else f"{self.packed_attr} "
        return f"{super().extra_repr()}, packed {what}W{spec.bits}{groups}"  # type: ignore[misc]


class PackedWeightMixin(PackedMixin):
    """Makes ``weight`` a read-only property that dequantizes packed codes on every access.

    Mixed in front of ``nn.Linear``/``nn.ConvNd`` (like ``torch.nn.utils.parametrize`` does), so a
    packed layer still is an instance of its original class and its own ``forward`` runs unchanged;
    only the buffers ``weight_packed`` (uint8), ``weight_scale`` and ``weight_zero`` are resident.
    """

    weight_packed: torch.Tensor
    weight_scale: torch.Tensor
    weight_zero: torch.Tensor

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        return self.dequantized()


class PackedInProjectionMixin(PackedMixin):
    """The same for an ``nn.MultiheadAttention``'s ``in_proj_weight``, which torch reads as a bare parameter
    (buffers ``in_proj_weight_packed``, ``_scale``, ``_zero``); its ``out_proj`` is a packed Linear of its own."""

    packed_attr = "in_proj_weight"

    @property
    def in_proj_weight(self) -> torch.Tensor:  # type: ignore[override]
        return self.dequantized()


class PackedLinear(PackedWeightMixin, nn.Linear):
    """``nn.Linear`` whose weight is stored packed (see `PackedWeightMixin`)."""


class PackedConv1d(PackedWeightMixin, nn.Conv1d):
    """``nn.Conv1d`` whose weight is stored packed (see `PackedWeightMixin`)."""


class PackedConv2d(PackedWeightMixin, nn.Conv2d):
    """``nn.Conv2d`` whose weight is stored packed (see `PackedWeightMixin`)."""


class PackedConv3d(PackedWeightMixin, nn.Conv3d):
    """``nn.Conv3d`` whose weight is stored packed (see `PackedWeightMixin`)."""


_PACKED_CLASSES: dict[tuple[type, str], type] = {
    (nn.Linear, "weight"): PackedLinear, (nn.Conv1d, "weight"): PackedConv1d, (nn.Conv2d, "weight"): PackedConv2d,
    (nn.Conv3d, "weight"): PackedConv3d,
}
_ORIGINAL_CLASSES: dict[type, type] = {v: k[0] for k, v in _PACKED_CLASSES.items()}
_MIXINS = {"weight": PackedWeightMixin, "in_proj_weight": PackedInProjectionMixin}


def _packed_class(cls: type, attr: str) -> type:
    """The class of ``cls`` holding ``attr`` packed (created once for user subclasses and attention modules)."""
    if (cls, attr) not in _PACKED_CLASSES:
        packed = type(f"Packed{cls.__name__}", (_MIXINS[attr], cls), {})
        _PACKED_CLASSES[cls, attr], _ORIGINAL_CLASSES[packed] = packed, cls
    return _PACKED_CLASSES[cls, attr]


@dataclass(frozen=True)
class LayerSpec:
    """What the header records about one quantized layer; enough to check and rebuild its weight."""

    name: str
    kind: str
    weight_shape: tuple[int, ...]
    weight_dtype: str
    groups: int
    bits: int
    group_size: int | None
    n_groups: int
    zero_dtype: str
    perm_shape: tuple[int, ...] | None

    @property
    def numel(self) -> int:
        n = 1
        for d in self.weight_shape:
            n *= d
        return n

    @property
    def matrix_shape(self) -> tuple[int, int, int]:
        """``[G, d_row / G, d_col]``, the `weight_matrix` layout of codes, scales and zero points."""
        d_row = self.weight_shape[0]
        return self.groups, d_row // self.groups, self.numel // d_row

    @property
    def packed_bytes(self) -> int:
        return packed_size(self.numel, self.bits)

    @property
    def grid_shape(self) -> tuple[int, int, int]:
        g, r, _ = self.matrix_shape
        return g, r, self.n_groups

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "weight_shape": list(self.weight_shape), "weight_dtype": self.weight_dtype,
            "groups": self.groups, "bits": self.bits, "group_size": self.group_size,
            "n_groups": self.n_groups, "zero_dtype": self.zero_dtype, "packed_bytes": self.packed_bytes,
            "perm_shape": None if self.perm_shape is None else list(self.perm_shape),
        }

    @classmethod
    def from_json(cls, name: str, d: Any, source: str) -> LayerSpec:
        """Parse and sanity-check one header entry; `ValueError` naming the layer on anything odd."""
        where = f"{source}: layer {name!r}"
        try:
            spec = cls(
                name=name, kind=str(d["kind"]), weight_shape=tuple(int(x) for x in d["weight_shape"]),
                weight_dtype=str(d["weight_dtype"]), groups=int(d["groups"]), bits=int(d["bits"]),
                group_size=None if d["group_size"] is None else int(d["group_size"]),
                n_groups=int(d["n_groups"]), zero_dtype=str(d["zero_dtype"]),
                perm_shape=None if d["perm_shape"] is None else tuple(int(x) for x in d["perm_shape"]),
            )
            packed_bytes = int(d["packed_bytes"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{where}: malformed header entry ({exc!r})") from exc
        if spec.kind not in LAYER_TYPES:
            raise ValueError(f"{where}: unsupported layer kind {spec.kind!r}")
        if not 1 <= spec.bits <= 8:
            raise ValueError(f"{where}: bits={spec.bits} outside [1, 8]")
        if len(spec.weight_shape) < 2 or min(spec.weight_shape) < 1 or spec.groups < 1 \
                or spec.weight_shape[0] % spec.groups:
            raise ValueError(f"{where}: inconsistent weight shape {spec.weight_shape} with groups={spec.groups}")
        if spec.weight_dtype not in DTYPES or not DTYPES[spec.weight_dtype].is_floating_point:
            raise ValueError(f"{where}: unsupported weight dtype {spec.weight_dtype!r}")
        if spec.zero_dtype not in ("uint8", "float32"):
            raise ValueError(f"{where}: unsupported zero point dtype {spec.zero_dtype!r}")
        d_col = spec.matrix_shape[2]
        expected_groups = 1 if spec.group_size is None else -(-d_col // max(spec.group_size, 1))
        if (spec.group_size is not None and spec.group_size < 1) or spec.n_groups != expected_groups:
            raise ValueError(f"{where}: n_groups={spec.n_groups} does not match group_size={spec.group_size} "
                             f"for {d_col} columns")
        if packed_bytes != spec.packed_bytes:
            raise ValueError(f"{where}: header says {packed_bytes} packed bytes, but {spec.numel} codes of "
                             f"{spec.bits} bits need {spec.packed_bytes}")
        return spec


def dequantize_packed(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: LayerSpec) -> torch.Tensor:
    """The layer weight from its packed codes: the one dequantization path of loading and of packed layers.

    Uses the core `Grid.column_params` and `dequantize_codes`, exactly as `quantize_layer` does, so the
    result is bitwise equal to the weight `quantize_model` wrote into the model.
    """
    codes = unpack_codes(packed, spec.bits, spec.numel).reshape(spec.matrix_shape)
    grid = Grid(scale, zero.to(scale.dtype), spec.bits, spec.group_size)
    s, z = grid.column_params(spec.matrix_shape[2])
    w = dequantize_codes(codes.to(scale.dtype), s, z)
    return w.reshape(spec.weight_shape).to(DTYPES[spec.weight_dtype])


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def pack_module(module: nn.Module, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                spec: LayerSpec, attr: str = "weight") -> nn.Module:
    """Turn a Linear/ConvNd layer (or, with ``attr="in_proj_weight"``, an ``nn.MultiheadAttention``) into its
    packed variant in place: the float parameter ``attr`` is dropped."""
    device = getattr(module, attr).device
    delattr(module, attr)
    module.register_buffer(f"{attr}_packed", packed.to(device))
    module.register_buffer(f"{attr}_scale", scale.to(device))
    module.register_buffer(f"{attr}_zero", zero.to(device))
    setattr(module, f"{attr}_spec", spec)
    module.__class__ = _packed_class(type(module), attr)
    return module


def unpack_module(module: nn.Module) -> nn.Module:
    """Inverse of `pack_module`: a plain module again, holding the dequantized float parameter."""
    if not isinstance(module, PackedMixin):
        raise TypeError(f"{type(module).__name__} is not a packed layer")
    attr = module.packed_attr
    value = module.dequantized()
    base = _ORIGINAL_CLASSES[type(module)]
    for suffix in ("packed", "scale", "zero"):
        delattr(module, f"{attr}_{suffix}")
    delattr(module, f"{attr}_spec")
    module.__class__ = base
    setattr(module, attr, nn.Parameter(value, requires_grad=False))
    return module
