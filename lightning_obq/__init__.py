"""lightning-obq: fast, accurate post-training weight quantization (FastOBQ) for PyTorch.

The public API: `QuantConfig`, `quantize_layer`, `quantize_model` and `OBQCallback` (Lightning).
"""

from .callback import OBQCallback
from .config import QuantConfig
from .export import load_quantized, save_quantized
from .layer import LayerResult, quantize_layer
from .quantize import capture_hessians, quantize_model
from .report import LayerStats, QuantReport
from .version import __version__

__all__ = [
    "LayerResult",
    "LayerStats",
    "OBQCallback",
    "QuantConfig",
    "QuantReport",
    "__version__",
    "capture_hessians",
    "load_quantized",
    "quantize_layer",
    "quantize_model",
    "save_quantized",
]
