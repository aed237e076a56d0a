"""The ``lightning-obq`` command (the ``[demo]`` extra): the demo, ``quantize``, ``compare`` and ``yolo``.

One module per job: `demo` (no arguments), `commands` (``quantize``/``compare``), `yolo`; `jobs` runs a
comparison, `user_models` loads the user's model and data, `outputs` writes report, plot and W&B run,
`main` parses the arguments. Without the extra, the command says which one to install and exits with 2.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from lightning_obq.extras import MissingExtraError, require_extra

EXIT_MISSING_EXTRA = 2


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lightning-obq`` console script and ``python -m lightning_obq``; the exit status."""
    try:
        require_extra("demo", "the lightning-obq command")
    except MissingExtraError as exc:
        print(f"lightning-obq: error: {exc}", file=sys.stderr)
        return EXIT_MISSING_EXTRA
    from lightning_obq.cli.main import main as run

    return run(argv)


__all__ = ["main"]
