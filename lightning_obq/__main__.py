"""`python -m lightning_obq`: the same as the `lightning-obq` command."""

import sys

from .cli import main

sys.exit(main())
