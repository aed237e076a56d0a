"""How the command reports a user error: one line, exit status 2, no traceback (``--debug`` shows it)."""

from __future__ import annotations

EXIT_USAGE = 2
DEFAULT_OUTPUT = "outputs/lightning-obq"


class CLIError(Exception):
    """A problem with the user's input: printed as one line, exit status 2, no traceback."""
