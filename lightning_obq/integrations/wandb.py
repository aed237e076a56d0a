"""W&B run set-up shared by the callback, the YOLO integration and the CLI: offline unless the user chose.

`start_run` needs the ``[wandb]`` extra; `default_wandb_offline` only sets an environment variable and works
without it.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from lightning_obq.extras import require_extra

log = logging.getLogger(__name__)


def default_wandb_offline() -> bool:
    """Make W&B runs created from now on offline unless the user chose a mode; True if it did so.

    Sets ``WANDB_MODE=offline`` when the variable is unset. It must happen before a `WandbLogger` creates
    its run, which Lightning does before any callback hook, so `OBQCallback` calls this in its constructor.
    ``WANDB_MODE=online`` (or ``WandbLogger(mode="online")``, which wandb ranks above the variable) keeps
    runs online.
    """
    if "WANDB_MODE" in os.environ:
        return False
    os.environ["WANDB_MODE"] = "offline"
    log.info("W&B runs are offline (set WANDB_MODE=online or pass OBQCallback(wandb_offline=False) to change it)")
    return True


def start_run(project: str, name: str, directory: str | os.PathLike[str], config: dict[str, Any] | None = None) -> Any:
    """A new W&B run in ``directory``: offline unless ``WANDB_MODE`` says otherwise, quiet, and a run of its own
    even when another is active in this process (a `WandbLogger`, an earlier call). The caller finishes it."""
    require_extra("wandb", "logging to W&B")
    os.environ.setdefault("WANDB_SILENT", "true")
    import wandb

    mode = os.environ.get("WANDB_MODE", "offline")
    return wandb.init(project=project, name=name, dir=str(directory), mode=mode, config=config, reinit="create_new")
