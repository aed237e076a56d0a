"""Ultralytics YOLO integration (the ``[ultralytics]`` extra): quantize, validate, save and load detectors.

    from lightning_obq.integrations.ultralytics import quantize_yolo, obq_callback, save_quantized_yolo
"""

from lightning_obq.extras import require_extra

require_extra("ultralytics", "lightning_obq.integrations.ultralytics")

from lightning_obq.integrations.ultralytics.callback import YOLOQuantCallback, obq_callback  # noqa: E402
from lightning_obq.integrations.ultralytics.checkpoint import (  # noqa: E402
    load_packed_yolo,
    read_recipe,
    recipe,
    save_packed_yolo,
    save_quantized_yolo,
)
from lightning_obq.integrations.ultralytics.yolo import (  # noqa: E402
    DFL_PATTERN,
    METRIC_KEYS,
    RECIPE_KEY,
    calibration_images,
    evaluate_yolo,
    load_yolo,
    log_to_wandb,
    quantize_yolo,
    resolve_dataset,
    yolo_forward,
)

__all__ = [
    "DFL_PATTERN", "METRIC_KEYS", "RECIPE_KEY", "YOLOQuantCallback", "calibration_images", "evaluate_yolo",
    "load_packed_yolo", "load_yolo", "log_to_wandb", "obq_callback", "quantize_yolo", "read_recipe", "recipe",
    "resolve_dataset", "save_packed_yolo", "save_quantized_yolo", "yolo_forward",
]
