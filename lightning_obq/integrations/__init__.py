"""Glue to other frameworks, each behind its extra: `lightning` (`OBQCallback`), `ultralytics` (YOLO)
and `wandb` (the W&B run set-up). Importing one without its extra raises an `ImportError` naming it."""
