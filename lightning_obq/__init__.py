"""lightning-obq: fast, accurate post-training weight quantization (FastOBQ) for PyTorch.

The public API: `QuantConfig`, `quantize_layer`, `quantize_model` (torch alone) and `OBQCallback`
(Lightning, the ``[lightning]`` extra). The integration names are imported on first use (module
``__getattr__``), so ``import lightning_obq`` works with torch alone and a missing extra fails only when its
name is used, with an `ImportError` that names the extra to install. The layout is described in the README
("Architecture"): ``core`` <- ``model`` <- ``export`` <- ``integrations`` <- ``cli``, with ``demo`` beside.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from lightning_obq.core.config import QuantConfig
from lightning_obq.core.layer import LayerResult, quantize_layer
from lightning_obq.export.artifact import load_quantized, save_quantized
from lightning_obq.model.capture import capture_hessians
from lightning_obq.model.quantize import quantize_model
from lightning_obq.model.report import LayerStats, QuantReport
from lightning_obq.version import __version__

if TYPE_CHECKING:
    from lightning_obq.integrations.lightning.callback import OBQCallback

_LAZY = {"OBQCallback": "lightning_obq.integrations.lightning"}
"""Names imported from an integration on first use: name -> module."""

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


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lightning_obq' has no attribute {name!r}")
