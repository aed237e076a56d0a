"""lightning-obq: fast, accurate post-training weight quantization (FastOBQ) for PyTorch.

The public API: `QuantConfig`, `quantize_layer`, `quantize_model` and `OBQCallback` (Lightning).
"""

from .config import QuantConfig
from .layer import LayerResult, quantize_layer
from .quantize import quantize_model
from .report import LayerStats, QuantReport

__version__ = "0.1.0"
__all__ = [
    "LayerResult",
    "LayerStats",
    "QuantConfig",
    "QuantReport",
    "__version__",
    "quantize_layer",
    "quantize_model",
]
