"""Optional dependencies: which extra installs what, and the error that names the extra to install.

The core (`lightning_obq.core`, `.model`, `.export` without ONNX) needs torch, numba, safetensors and tqdm
only. Each integration checks its own packages when it is imported, so a missing one fails at the import
with ``pip install 'lightning-obq[<extra>]'`` in the message instead of deep inside a call.
"""

from __future__ import annotations

import importlib.util

EXTRAS: dict[str, tuple[str, ...]] = {
    "lightning": ("lightning", "torchmetrics"),
    "ultralytics": ("ultralytics",),
    "wandb": ("wandb",),
    "onnx": ("onnx", "onnxruntime"),
    "demo": ("lightning", "torchmetrics", "torchvision", "matplotlib"),
}
"""The import names each extra of ``pyproject.toml`` provides (the ones this package imports)."""


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the extra that installs it."""


def require_extra(extra: str, feature: str) -> None:
    """Raise `MissingExtraError` naming ``extra`` unless every package of that extra can be imported.

    ``feature`` is what the user asked for (``"lightning_obq.OBQCallback"``), so the message says what
    needs the extra and which package is missing.
    """
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra {extra!r}; extras: {sorted(EXTRAS)}")
    missing = [name for name in EXTRAS[extra] if importlib.util.find_spec(name) is None]
    if missing:
        raise MissingExtraError(
            f"{feature} needs the [{extra}] extra ({', '.join(missing)} not installed): "
            f"pip install 'lightning-obq[{extra}]'",
            name=missing[0],
        )
