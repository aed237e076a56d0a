"""Quantized models on disk and in memory: bit packing, the safetensors artifact, packed modules, ONNX.

`save_quantized` / `load_quantized` need torch and safetensors; `lightning_obq.export.onnx` needs the
``[onnx]`` extra.
"""

from lightning_obq.export.artifact import load_quantized, read_quantized, resident_weight_bytes, save_quantized

__all__ = ["load_quantized", "read_quantized", "resident_weight_bytes", "save_quantized"]
