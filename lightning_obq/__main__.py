"""`python -m lightning_obq`: the same as the `lightning-obq` command."""

import sys

from lightning_obq.cli import main

sys.exit(main())
