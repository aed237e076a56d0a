"""Small argument helpers shared by the command's jobs: parsing lists and JSON, the progress bar, the command
line as run."""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from collections.abc import Iterable, Sequence
from typing import Any

from torch.utils.data import DataLoader

from lightning_obq.cli.errors import CLIError


def progress_wanted(args: argparse.Namespace) -> bool:
    return not args.no_progress and sys.stderr.isatty()


def command_text(args: argparse.Namespace) -> str:
    return "lightning-obq " + " ".join(shlex.quote(a) for a in args.argv)


def calibration_batches(loader: DataLoader, args: argparse.Namespace, progress: bool) -> Iterable[Any]:
    """The calibration loader behind a progress bar (as many steps as batches will be drawn)."""
    from tqdm.auto import tqdm

    steps = min(len(loader), math.ceil(args.calib_samples / (loader.batch_size or 1)))
    return tqdm(loader, total=steps, desc="calibration", disable=not progress, leave=False)


def add_refine_sweeps(p: argparse.ArgumentParser) -> None:
    """``--refine-sweeps``, for every command that quantizes (`QuantConfig.refine_sweeps`)."""
    p.add_argument("--refine-sweeps", type=int, default=None, metavar="N",
                   help="refinement sweeps after the column solve of fastobq and gptq (default: the method's own, "
                        "fastobq 1, gptq 0; 0 turns it off, 3 lowers the layer error further)")


def int_list(text: str, flag: str) -> list[int]:
    if not text.strip():
        return []
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise CLIError(f"{flag} must be comma-separated integers, got {text!r}") from exc
    bad = [v for v in values if not 2 <= v <= 8]
    if bad:
        raise CLIError(f"{flag}: bit widths must be in 2..8, got {bad}")
    return sorted(set(values), key=values.index)


def str_list(text: str, flag: str, choices: Sequence[str]) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in values if v not in choices]
    if bad or not values:
        raise CLIError(f"{flag}: {bad or text!r} not in {list(choices)}")
    return values


def json_arg(text: str | None, flag: str) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CLIError(f"{flag} is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise CLIError(f"{flag} must be a JSON object, got {text!r}")
    return value
