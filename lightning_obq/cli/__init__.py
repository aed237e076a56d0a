"""The ``lightning-obq`` command (the ``[demo]`` extra): the demo, ``quantize``, ``compare`` and ``yolo``.

One module per job: `demo` (no arguments), `commands` (``quantize``/``compare``), `yolo`; `jobs` runs a
comparison, `user_models` loads the user's model and data, `outputs` writes report, plot and W&B run,
`main` parses the arguments.
"""

from lightning_obq.extras import require_extra

require_extra("demo", "the lightning-obq command")

from lightning_obq.cli.main import build_parser, main  # noqa: E402

__all__ = ["build_parser", "main"]
