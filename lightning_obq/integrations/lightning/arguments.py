"""The one path from `OBQCallback`'s arguments into `QuantConfig`, and errors that name the argument written.

`QuantConfig` owns every default and every check: the callback passes on only the fields the user gave
(``None`` means "not given"), so no default is written twice, and re-words `QuantConfig`'s errors to name the
``OBQCallback(...)`` argument.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from lightning_obq.core.config import QuantConfig

CONFIG_FIELDS = frozenset(f.name for f in dataclasses.fields(QuantConfig))
WHEN = ("fit_end", "validation_start")
"""When `OBQCallback` quantizes: at the end of ``fit``, or before a ``validate``/``test`` loop."""


def check_arguments(when: str, calib_dataloader: Any, forward_fn: Any, export_path: Any, **flags: Any) -> None:
    """The checks of `OBQCallback`'s own (non-`QuantConfig`) arguments: a clear error naming the argument."""
    if when not in WHEN:
        raise ValueError(f"OBQCallback(when={when!r}) is not one of {list(WHEN)}")
    if calib_dataloader is not None:
        if isinstance(calib_dataloader, str | bytes) or not isinstance(calib_dataloader, Iterable):
            raise TypeError(
                f"OBQCallback(calib_dataloader=...) must be a DataLoader or an iterable of batches, "
                f"got {type(calib_dataloader).__name__}"
            )
        if hasattr(calib_dataloader, "__len__") and len(calib_dataloader) == 0:  # type: ignore[arg-type]
            raise ValueError("OBQCallback(calib_dataloader=...) is empty: it yields no batches")
    if forward_fn is not None and not callable(forward_fn):
        raise TypeError(f"OBQCallback(forward_fn=...) must be callable, got {type(forward_fn).__name__}")
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"OBQCallback({name}=...) must be a bool, got {value!r}")
    if export_path is not None:
        if not isinstance(export_path, str | os.PathLike) or not str(export_path):
            raise TypeError(f"OBQCallback(export_path=...) must be a non-empty path, got {export_path!r}")


def callback_config(config: QuantConfig | None, skip: str | Sequence[str], fields: Mapping[str, Any],
                    owner: Callable[..., Any]) -> QuantConfig:
    """The `QuantConfig` of an ``OBQCallback``: ``config`` as given, or built from ``fields``; ``skip`` added
    to its ``exclude``.

    ``fields`` are the `QuantConfig` fields the user passed to ``owner`` (``None`` values are left out: the
    config's default applies). Passing both ``config`` and fields is refused, misspelt names get the closest
    valid one, and validation errors name the ``OBQCallback`` argument.
    """
    skip = (skip,) if isinstance(skip, str) else skip
    if not isinstance(skip, Sequence) or not all(isinstance(p, str) for p in skip):
        raise TypeError(f"OBQCallback(skip=...) must be a string or a sequence of strings, got {skip!r}")
    given = {k: v for k, v in fields.items() if v is not None}
    unknown = sorted(set(given) - CONFIG_FIELDS)
    if unknown:
        raise unknown_argument_error(unknown, owner)
    if config is not None:
        if not isinstance(config, QuantConfig):
            raise TypeError(f"OBQCallback(config=...) must be a QuantConfig, got {type(config).__name__}")
        if given:
            raise ValueError(f"OBQCallback: pass either config=QuantConfig(...) or {sorted(given)}, not both")
        return config.replace(exclude=tuple(config.exclude) + tuple(skip)) if skip else config
    exclude = given.pop("exclude", ())
    exclude = (exclude,) if isinstance(exclude, str) else tuple(exclude)
    try:
        return QuantConfig(exclude=exclude + tuple(skip), **given)
    except (ValueError, TypeError) as exc:
        raise callback_argument_error(exc, given) from exc


def unknown_argument_error(unknown: Sequence[str], owner: Callable[..., Any]) -> TypeError:
    """The error for misspelt/unknown ``OBQCallback`` keyword arguments, with the closest valid names."""
    own = [p for p in inspect.signature(owner).parameters if p not in ("self", "config_fields")]
    fields = sorted(CONFIG_FIELDS - set(own))
    parts = []
    for name in unknown:
        close = difflib.get_close_matches(name, own + fields, n=1, cutoff=0.6)
        parts.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return TypeError(
        f"OBQCallback got unknown argument(s) {', '.join(parts)}. OBQCallback arguments: {', '.join(own)}; "
        f"any other QuantConfig field is accepted too: {', '.join(fields)}"
    )


def callback_argument_error(exc: Exception, given: Mapping[str, Any]) -> Exception:
    """A `QuantConfig` validation error re-worded to name the ``OBQCallback(...)`` argument the user wrote."""
    match = re.search(r"QuantConfig\.(\w+)", str(exc))
    field = match.group(1) if match else None
    if field not in given:
        return exc
    return type(exc)(f"OBQCallback({field}={given[field]!r}): {exc}")
