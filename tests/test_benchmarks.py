"""Every benchmark script imports against the current package layout (a moved module breaks them silently
otherwise: they run only when someone re-measures)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
MODULES = sorted(BENCHMARKS.glob("*.py"))
SCRIPTS = [p for p in MODULES if '__name__ == "__main__"' in p.read_text()]


def test_there_are_benchmark_scripts() -> None:
    assert len(SCRIPTS) >= 5, SCRIPTS


@pytest.mark.parametrize("script", MODULES, ids=lambda p: p.stem)
def test_benchmark_module_imports(script: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(f"benchmark_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    if script in SCRIPTS:
        assert callable(getattr(module, "main", None)), f"{script.name} runs as a script but has no main()"
