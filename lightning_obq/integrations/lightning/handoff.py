"""Results of `OBQCallback` handed from a strategy's spawned/forked workers back to the main process.

Spawn strategies (``ddp_spawn``, ``ddp_fork``, ``ddp_notebook``) return the weights and ``callback_metrics``
to the main process but not the callback's own attributes, so rank zero writes them (JSON, no tensors) to a
temporary file that the main process reads on first use.
"""

from __future__ import annotations

import json
import os
import tempfile
import weakref
from pathlib import Path
from typing import Any

from lightning_obq.model.report import QuantReport


class SpawnHandoff:
    """One callback's handoff file: `send` in a worker, `receive` (once) in the process that built it."""

    def __init__(self, owner: object) -> None:
        self.creator = os.getpid()
        self.path = Path(tempfile.gettempdir()) / f"lightning_obq_{self.creator}_{id(owner):x}.json"
        weakref.finalize(owner, _unlink, self.path, self.creator)

    @property
    def in_worker(self) -> bool:
        """True in a process the strategy started (not the one that built the callback)."""
        return os.getpid() != self.creator

    def send(self, data: dict[str, Any]) -> None:
        """Write ``data`` atomically for the main process."""
        partial = self.path.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(json.dumps(data))
        partial.replace(self.path)

    def receive(self) -> dict[str, Any] | None:
        """In the main process, what a worker sent (then the file is removed); ``None`` if nothing."""
        if self.in_worker or not self.path.exists():
            return None
        data = json.loads(self.path.read_text())
        self.path.unlink()
        return data


class SpawnResults:
    """What `OBQCallback` exposes after a run (``report``, ``quantized``, ``checkpoint_files``, ``export_file``,
    the module fingerprints), kept in step across spawned workers: a worker's rank zero `_send` s them and the
    main process `_receive` s them on first use of ``report``/``quantized`` (and before being pickled again).

    The class using it sets ``_handoff`` (a `SpawnHandoff`) and the attributes above.
    """

    _handoff: SpawnHandoff
    _report: QuantReport | None
    _quantized: bool
    _fingerprints: dict[str, str | None]
    _quantized_state: Any
    checkpoint_files: dict[str, Path]
    export_file: Path | None

    @property
    def report(self) -> QuantReport | None:
        """The `QuantReport` of the last quantization (``None`` before any)."""
        self._receive()
        return self._report

    @report.setter
    def report(self, value: QuantReport | None) -> None:
        self._report = value

    @property
    def quantized(self) -> bool:
        """True once this callback quantized the module (or loaded a checkpoint it had quantized)."""
        self._receive()
        return self._quantized

    @quantized.setter
    def quantized(self, value: bool) -> None:
        self._quantized = value

    def __getstate__(self) -> dict[str, Any]:
        self._receive()  # a spawn launcher pickles the callback: take along what the last workers handed back
        return dict(self.__dict__)

    def _send(self, trainer: Any) -> None:
        """In a process spawned/forked by the strategy, rank zero hands the results to the main process."""
        if not self._handoff.in_worker or not trainer.is_global_zero:
            return
        self._handoff.send({"report": self._report.to_dict() if self._report is not None else None,
                            "quantized": self._quantized, "fingerprints": self._fingerprints,
                            "checkpoint_files": {k: str(v) for k, v in self.checkpoint_files.items()},
                            "export_file": str(self.export_file) if self.export_file is not None else None})

    def _receive(self) -> None:
        """In the process that built the callback, read what spawned workers handed back (once)."""
        data = self._handoff.receive()
        if data is None:
            return
        self._report = QuantReport.from_dict(data["report"]) if data["report"] else None
        self._quantized = bool(data["quantized"])
        self._fingerprints = data["fingerprints"]
        self._quantized_state = None  # the tensors stay in the workers; the weights came back via Lightning
        self.checkpoint_files = {k: Path(v) for k, v in data["checkpoint_files"].items()}
        self.export_file = Path(data["export_file"]) if data["export_file"] else None


def _unlink(path: Path, owner: int) -> None:
    """Remove an unread handoff file, in the process that created the callback only (not a forked worker)."""
    if os.getpid() == owner:
        path.unlink(missing_ok=True)
