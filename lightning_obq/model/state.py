"""Temporary changes to a module that must be undone: its training modes, and its weights when a step fails.

Every step that runs a model for measurement (calibration, fidelity, BatchNorm, ONNX export, the Lightning
evaluation) switches modes with `module_mode`, and every step that changes weights in place guards them with
`restored_on_failure`, so a model is never left in another mode or half-quantized.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch.nn as nn

log = logging.getLogger(__name__)


@contextmanager
def module_mode(*modules: nn.Module, training: bool = False) -> Iterator[None]:
    """Run the block with ``modules`` in eval mode (or train mode with ``training=True``).

    Afterwards every submodule gets its own earlier flag back (submodules may differ from their root, e.g. a
    frozen BatchNorm inside a training model), whether the block succeeded or raised.
    """
    saved = [(m, m.training) for root in modules for m in root.modules()]
    try:
        for root in modules:
            root.train(training)
        yield
    finally:
        for module, flag in saved:
            module.training = flag


@contextmanager
def restored_on_failure(model: nn.Module, message: str) -> Iterator[None]:
    """Run the block; if it raises, put every parameter and buffer of ``model`` back, log ``message``, re-raise.

    The backup is a detached copy of the state taken on entry, on the tensors' own devices.
    """
    backup = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    try:
        yield
    except BaseException:
        model.load_state_dict(backup)
        log.error(message)
        raise
