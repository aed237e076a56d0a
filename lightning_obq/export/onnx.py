"""ONNX export with integer weights: ``DequantizeLinear`` on uint8/uint4 initializers, checked in onnxruntime.

The float model is exported with PyTorch's TorchScript-based exporter (``dynamo=False``; the dynamo
exporter needs ``onnxscript``) in ``TrainingMode.PRESERVE`` so BatchNorm is not folded into the conv
weights, which keeps every quantized weight an initializer of its own. Each quantized layer's float
initializer is then replaced by integer codes plus scale and zero point feeding a ``DequantizeLinear``
node whose output keeps the initializer's name, so Conv/Gemm/MatMul consumers are untouched:

- per-channel grids: ``DequantizeLinear(axis=0)`` on codes of the weight's shape;
- group-wise grids: blocked ``DequantizeLinear(axis=1, block_size=group_size)`` (opset 21) on codes of
  shape ``[d_row, d_col]``, then ``Reshape`` to the weight's shape (works for convs too, whose groups
  run along the flattened ``C_in/groups * kh * kw`` columns).

Codes are stored as ``UINT8`` for every bit width, or as ``UINT4`` (two codes per byte) for 2..4-bit
layers when the opset is at least 21 (onnxruntime runs both on CPU). The dequantized values equal the
PyTorch weights exactly: ``(code - zero) * scale`` is one float multiplication either way.
"""

from __future__ import annotations

import copy
import logging
import os
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from lightning_obq.export.artifact import quantized_layers
from lightning_obq.export.modules import LayerSpec, PackedMixin, dequantize_packed, unpack_module
from lightning_obq.export.packing import pack_codes, unpack_codes
from lightning_obq.extras import require_extra
from lightning_obq.model.report import QuantReport
from lightning_obq.model.state import module_mode

require_extra("onnx", "lightning_obq.export.onnx (export_onnx)")

log = logging.getLogger(__name__)

MIN_OPSET = 13  # per-axis DequantizeLinear
BLOCKED_OPSET = 21  # blocked DequantizeLinear and 4-bit integer types
WEIGHT_TYPES = ("auto", "uint8", "uint4")


def _flatten(out: Any) -> list[torch.Tensor]:
    """Tensors of a (nested) model output in the order the ONNX exporter flattens them."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        out = list(out.values())
    if isinstance(out, Sequence) and not isinstance(out, str | bytes):
        return [t for item in out for t in _flatten(item)]
    return []


def _float_copy(model: nn.Module) -> nn.Module:
    """The model itself, or a copy whose packed layers hold float weights again (exporter-friendly)."""
    if not any(isinstance(m, PackedMixin) for m in model.modules()):
        return model
    clone = copy.deepcopy(model)
    for m in list(clone.modules()):
        if isinstance(m, PackedMixin):
            unpack_module(m)
    return clone


def _storage(spec: LayerSpec, weight_type: str, opset: int) -> str:
    if weight_type == "uint4" and spec.bits > 4:
        raise ValueError(f"layer {spec.name!r}: weight_type='uint4' cannot hold {spec.bits}-bit codes")
    if weight_type == "auto":
        return "uint4" if spec.bits <= 4 and opset >= BLOCKED_OPSET else "uint8"
    return weight_type


def _find_initializer(graph: Any, name: str, weight: np.ndarray) -> tuple[Any, bool]:
    """The initializer holding a layer's weight, and whether it holds it transposed.

    Looked up by its state_dict name, else by shape and exact value; a Linear weight may appear
    transposed (the exporter feeds ``MatMul`` with ``W^T`` when there is no bias).
    """
    from onnx import numpy_helper

    key = f"{name}.weight" if name else "weight"
    forms = [(weight, False)] + ([(weight.T, True)] if weight.ndim == 2 else [])
    ordered = sorted(graph.initializer, key=lambda i: i.name != key)
    for init in ordered:
        for form, transposed in forms:
            if tuple(init.dims) == form.shape and np.array_equal(numpy_helper.to_array(init), form):
                return init, transposed
    raise ValueError(f"export_onnx: no ONNX initializer holds the weight of layer {name!r} (the exporter "
                     "transformed it, e.g. folded it into another op); exclude the layer from quantization")


def _rewrite(onnx_model: Any, layers: dict[str, tuple], weight_type: str, opset: int) -> dict[str, str]:
    """Replace quantized float initializers by integer ones + DequantizeLinear; returns layer -> storage type."""
    from onnx import TensorProto, helper, numpy_helper

    graph = onnx_model.graph
    inputs = {i.name for i in graph.input}
    new_nodes, storage = [], {}
    for name, (spec, packed, scale, zero) in layers.items():
        if spec.weight_dtype != "float32":
            raise ValueError(f"export_onnx: layer {name!r} is {spec.weight_dtype}; only float32 models are supported")
        grouped = spec.group_size is not None
        if grouped and opset < BLOCKED_OPSET:
            raise ValueError(f"export_onnx: layer {name!r} has group-wise scales, which need blocked "
                             f"DequantizeLinear (opset >= {BLOCKED_OPSET}); got opset {opset}")
        if spec.zero_dtype != "uint8":
            raise ValueError(f"export_onnx: layer {name!r} has non-integer zero points; DequantizeLinear needs "
                             "integer zero points")
        weight = dequantize_packed(packed, scale, zero, spec).numpy()
        init, transposed = _find_initializer(graph, name, weight)
        target = init.name
        if target in inputs:
            raise ValueError(f"export_onnx: weight {target!r} is a graph input; export without "
                             "keep_initializers_as_inputs")
        kind = storage[name] = _storage(spec, weight_type, opset)
        d_row = spec.weight_shape[0]
        # Codes as [d_row, d_col] (group-wise) or in the weight's shape (per channel); scales [d_row, n_groups]
        # or [d_row]. A transposed initializer swaps both axes, and the row axis becomes axis 1.
        codes = unpack_codes(packed, spec.bits, spec.numel)
        codes = codes.reshape(d_row, -1) if grouped or transposed else codes.reshape(spec.weight_shape)
        scale = scale.reshape(d_row, -1) if grouped else scale.reshape(d_row)
        zero = zero.reshape(scale.shape)
        if transposed:
            codes, scale, zero = codes.t().contiguous(), scale.t().contiguous(), zero.t().contiguous()
        if grouped:
            attrs = {"axis": 0 if transposed else 1, "block_size": spec.group_size}
        else:
            attrs = {"axis": 1 if transposed else 0}
        if kind == "uint4":
            q = helper.make_tensor(f"{target}_quantized", TensorProto.UINT4, list(codes.shape),
                                   pack_codes(codes.reshape(-1), 4).numpy().tobytes(), raw=True)
            z = helper.make_tensor(f"{target}_zero_point", TensorProto.UINT4, list(zero.shape),
                                   pack_codes(zero.reshape(-1), 4).numpy().tobytes(), raw=True)
        else:
            q = numpy_helper.from_array(codes.numpy(), f"{target}_quantized")
            z = numpy_helper.from_array(zero.numpy(), f"{target}_zero_point")
        s = numpy_helper.from_array(scale.numpy().astype(np.float32), f"{target}_scale")
        graph.initializer.remove(init)
        graph.initializer.extend([q, s, z])
        reshape = grouped and not transposed and len(spec.weight_shape) > 2
        dq_out = f"{target}_dequantized_2d" if reshape else target
        new_nodes.append(helper.make_node("DequantizeLinear", [q.name, s.name, z.name], [dq_out],
                                          name=f"{target}_DequantizeLinear", **attrs))
        if reshape:
            shape = numpy_helper.from_array(np.array(spec.weight_shape, dtype=np.int64), f"{target}_shape")
            graph.initializer.append(shape)
            new_nodes.append(helper.make_node("Reshape", [dq_out, shape.name], [target], name=f"{target}_Reshape"))
    for node in reversed(new_nodes):
        graph.node.insert(0, node)
    return storage


def export_onnx(
    model: nn.Module,
    example_input: torch.Tensor | tuple[torch.Tensor, ...],
    path: str | os.PathLike,
    report: QuantReport | None = None,
    *,
    opset: int = BLOCKED_OPSET,
    weight_type: str = "auto",
    dynamic_batch: bool = False,
    check: bool = True,
    rtol: float = 1e-3,
    atol: float = 1e-4,
) -> Path:
    """Export a quantized model to ONNX with integer weight initializers; returns the path.

    The integer codes come from ``report`` (the `QuantReport` of `quantize_model` for this model) or,
    without one, from the model's packed layers (``load_quantized(..., keep_packed=True)``).
    ``weight_type``: ``"auto"`` (UINT4 for <= 4 bits at opset >= 21, else UINT8), ``"uint8"`` or
    ``"uint4"``. With ``check`` the file is run in onnxruntime on CPU with ``example_input`` (float32
    accumulation, see `ort_session`) and must match the PyTorch outputs within ``rtol``/``atol``
    (`ValueError` otherwise). The TorchScript exporter traces the model: data-dependent control flow
    is frozen to ``example_input``'s path, as with any ``torch.onnx.export(dynamo=False)``.
    """
    import onnx

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if weight_type not in WEIGHT_TYPES:
        raise ValueError(f"weight_type={weight_type!r} is not one of {list(WEIGHT_TYPES)}")
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET:
        raise ValueError(f"opset={opset!r} must be an int >= {MIN_OPSET} (per-axis DequantizeLinear)")
    if weight_type == "uint4" and opset < BLOCKED_OPSET:
        raise ValueError(f"weight_type='uint4' needs opset >= {BLOCKED_OPSET}, got {opset}")
    if report is not None and not isinstance(report, QuantReport):
        raise TypeError(f"report must be a QuantReport, got {type(report).__name__}")
    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise TypeError("example_input must be a tensor or a tuple of tensors")
    layers = quantized_layers(model, report)
    if not layers:
        raise ValueError("export_onnx: the model has no quantized layer; pass the QuantReport of quantize_model "
                         "or a model loaded with load_quantized(..., keep_packed=True)")
    path = Path(path)
    float_model = _float_copy(model)
    float_model.eval()
    input_names = [f"input_{i}" if len(inputs) > 1 else "input" for i in range(len(inputs))]
    with module_mode(model):
        with torch.no_grad():
            expected = [t.detach().cpu().numpy() for t in _flatten(model(*inputs))]
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation/constant-folding notes
            tmp_path = Path(tmp) / "float.onnx"
            torch.onnx.export(
                float_model, inputs, str(tmp_path), dynamo=False, opset_version=opset,
                training=torch.onnx.TrainingMode.PRESERVE, input_names=input_names,
                dynamic_axes={n: {0: "batch"} for n in input_names} if dynamic_batch else None,
            )
            onnx_model = onnx.load(str(tmp_path))
    storage = _rewrite(onnx_model, layers, weight_type, opset)
    onnx_model.ir_version = max(onnx_model.ir_version, 10)  # 4-bit types need IR 10
    onnx.checker.check_model(onnx_model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(onnx_model, str(path))
    log.info("exported %d quantized layers (%s) to %s (%.2f MB)", len(storage),
             ", ".join(f"{k}: {sum(v == k for v in storage.values())}" for k in sorted(set(storage.values()))),
             path, path.stat().st_size / 2**20)
    if check:
        diff = check_onnx(path, inputs, expected, rtol=rtol, atol=atol)
        log.info("onnxruntime matches torch: max abs difference %.3g", diff)
    return path


def ort_session(path: str | os.PathLike, exact: bool = True) -> Any:
    """An onnxruntime CPU session for ``path``.

    By default onnxruntime fuses ``DequantizeLinear -> MatMul`` into ``MatMulNBits`` and runs it with
    int8-quantized activations (``session.qdq_matmulnbits_accuracy_level`` 4), which is faster but
    differs from float math by ~1e-3. ``exact=True`` asks for float32 accumulation (level 1), which
    computes the same function as the PyTorch model; ``exact=False`` is onnxruntime's default.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    if exact:
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def check_onnx(path: str | os.PathLike, inputs: Sequence[torch.Tensor], expected: Sequence[np.ndarray],
               rtol: float = 1e-3, atol: float = 1e-4, exact: bool = True) -> float:
    """Run ``path`` in onnxruntime on CPU (see `ort_session`) and compare with ``expected``.

    Each output must satisfy ``max|onnx - torch| <= atol + rtol * max|torch|``: the tolerance scales
    with the output's magnitude, since two conv implementations legitimately differ by float32
    rounding that grows with the activations. Returns the largest abs difference; `ValueError` otherwise.
    """
    session = ort_session(path, exact)
    feeds = {i.name: t.detach().cpu().numpy() for i, t in zip(session.get_inputs(), inputs, strict=True)}
    got = session.run(None, feeds)
    if len(got) != len(expected):
        raise ValueError(f"{path}: onnxruntime returned {len(got)} outputs, torch {len(expected)}")
    worst = 0.0
    for k, (a, b) in enumerate(zip(got, expected, strict=True)):
        if a.shape != b.shape:
            raise ValueError(f"{path}: output {k} has shape {a.shape} in onnxruntime, {b.shape} in torch")
        if not a.size:
            continue
        diff, scale = float(np.abs(a - b).max()), float(np.abs(b).max())
        if not diff <= atol + rtol * scale:  # also catches NaN
            raise ValueError(f"{path}: onnxruntime output {k} differs from torch by {diff:.3g} (max |torch| "
                             f"{scale:.3g}; tolerance atol {atol} + rtol {rtol} x max |torch|)")
        worst = max(worst, diff)
    return worst
