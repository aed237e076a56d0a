"""Shared helpers for every benchmark script: machine description, load, jemalloc, markdown results.

Stable API (other benchmark scripts import it; keep these signatures):

- ``machine_info() -> str``: one markdown paragraph describing CPU, cores, torch, BLAS, threads, allocator.
- ``load_average() -> tuple[float, float, float]`` and ``load_note() -> str``: the 1/5/15 min load, and a
  sentence saying whether other jobs shared the CPU while the numbers were taken.
- ``command_line() -> str``: the exact command that is running (for the "produced by" line).
- ``markdown_table(headers, rows) -> str``: a GitHub markdown table; numbers are formatted with ``fmt``.
- ``fmt(value, digits=3) -> str``: compact number formatting (``3.14``, ``1.2e-05``, ``12,345``).
- ``write_markdown(path, title, command, sections, intro="") -> Path``: writes a results file with the
  title, the command, the machine description and then each ``(heading, markdown body)`` section.
- ``jemalloc_path() -> str | None``, ``jemalloc_active() -> bool``, ``reexec_with_jemalloc()``: run a
  script under Debian's libjemalloc2 (OBQ is 3-5x faster with it; claims against OBQ must use it).
- ``matmul_gflops(n=2048, repeats=5) -> float``: the plain float32 matrix-multiply rate of this machine,
  the yardstick for "runs at matrix-multiply speed".

Scripts run as ``python benchmarks/<name>.py`` import it as ``from common import ...`` (the script's
folder is on ``sys.path``); ``python -m benchmarks.<name>`` can use ``from benchmarks.common import ...``.
Numbers in results files must come from the scripts, never be typed in by hand.
"""

from __future__ import annotations

import os
import platform
import shlex
import sys
import time
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
JEMALLOC_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
    "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
    "/usr/lib64/libjemalloc.so.2",
    "/usr/local/lib/libjemalloc.so.2",
)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _total_memory_gb() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def _blas() -> str:
    config = torch.__config__.show()
    for key in ("BLAS_INFO=", "LAPACK_INFO="):
        if key in config:
            return config.split(key, 1)[1].split(",", 1)[0].strip()
    return "unknown"


def load_average() -> tuple[float, float, float]:
    """The 1, 5 and 15 minute load averages (zeros where the OS does not report them)."""
    try:
        return os.getloadavg()
    except OSError:
        return (0.0, 0.0, 0.0)


def load_note(threshold: float = 0.5) -> str:
    """A sentence with the current load and whether other jobs shared the CPU (load above ``threshold``).

    Call it right after the measurements (the 1-minute load then includes the benchmark itself, so
    compare it with the number of threads the benchmark used).
    """
    one, five, fifteen = load_average()
    cores = os.cpu_count() or 1
    text = (
        f"Load average when the results were written: {one:.2f} / {five:.2f} / {fifteen:.2f} (1/5/15 min) "
        f"on {cores} cores"
    )
    if five > torch.get_num_threads() + threshold:
        text += "; other jobs shared the CPU, so timings are noisy (slower than on an idle machine)."
    else:
        text += "; no significant other load beyond this benchmark."
    return text


def jemalloc_path() -> str | None:
    """Path of an installed libjemalloc (Debian: ``apt-get install libjemalloc2``), else None."""
    for path in JEMALLOC_CANDIDATES:
        if os.path.exists(path):
            return path
    return None


def jemalloc_active() -> bool:
    """True when this process runs with jemalloc preloaded."""
    return "jemalloc" in os.environ.get("LD_PRELOAD", "")


def reexec_with_jemalloc() -> bool:
    """Re-execute the current script with jemalloc preloaded (no return on success).

    Returns False (and does nothing) when jemalloc is already active or not installed; the caller then
    records which allocator was used via ``machine_info()``.
    """
    path = jemalloc_path()
    if path is None or jemalloc_active():
        return False
    env = dict(os.environ)
    env["LD_PRELOAD"] = (path + " " + env.get("LD_PRELOAD", "")).strip()
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.argv], env)
    return True  # pragma: no cover - execve does not return


def machine_info() -> str:
    """One markdown paragraph describing the machine and software the numbers were measured on."""
    mem = _total_memory_gb()
    parts = [
        f"CPU: {_cpu_model()}, {os.cpu_count()} logical cores",
        f"RAM: {mem:.1f} GB" if mem is not None else None,
        f"{platform.system()} {platform.release()}",
        f"Python {platform.python_version()}",
        f"torch {torch.__version__} (BLAS: {_blas()}, {torch.get_num_threads()} threads)",
        f"CUDA: {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "CUDA: none",
        "allocator: jemalloc (LD_PRELOAD)" if jemalloc_active() else "allocator: glibc malloc",
    ]
    return "Machine: " + "; ".join(p for p in parts if p) + "."


def command_line() -> str:
    """The command that is running, relative to the repository root when possible."""
    args = list(sys.argv)
    try:
        args[0] = str(Path(args[0]).resolve().relative_to(ROOT))
    except ValueError:
        pass
    python = sys.executable
    try:
        python = str(Path(python).relative_to(ROOT))
    except ValueError:
        pass
    return " ".join(shlex.quote(a) for a in [python, *args])


def fmt(value: Any, digits: int = 3) -> str:
    """Compact formatting: floats with ``digits`` significant digits, big ints with separators."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10000 else str(value)
    if isinstance(value, float):
        if value != value:
            return "nan"
        if value == 0:
            return "0"
        if abs(value) >= 10 ** digits:
            return f"{value:,.0f}"
        if abs(value) < 10 ** -(digits - 1):
            return f"{value:.{max(digits - 1, 1)}e}"
        return f"{value:.{digits}g}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], digits: int = 3) -> str:
    """A GitHub markdown table; non-string cells go through ``fmt``."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        cells = [c if isinstance(c, str) else fmt(c, digits) for c in row]
        if len(cells) != len(headers):
            raise ValueError(f"row has {len(cells)} cells, table has {len(headers)} columns: {row!r}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_markdown(
    path: str | Path,
    title: str,
    command: str,
    sections: Sequence[tuple[str, str]] | dict[str, str],
    intro: str = "",
) -> Path:
    """Write a results file: title, intro, command, machine, date, then ``## heading`` + body per section.

    ``sections`` is a sequence of ``(heading, markdown body)`` pairs (or a dict in insertion order).
    Missing parent directories are created. Returns the path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    items = list(sections.items()) if isinstance(sections, dict) else list(sections)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out = [f"# {title}", ""]
    if intro:
        out += [intro.strip(), ""]
    out += [
        "Produced by:",
        "",
        "```",
        command,
        "```",
        "",
        machine_info(),
        "",
        f"Written {stamp}. {load_note()}",
        "",
    ]
    for heading, body in items:
        out += [f"## {heading}", "", body.strip(), ""]
    path.write_text("\n".join(out))
    return path


def matmul_gflops(n: int = 2048, repeats: int = 5, dtype: torch.dtype = torch.float32) -> float:
    """Best-of-``repeats`` GFLOP/s of a plain ``n x n @ n x n`` matrix multiply on the CPU."""
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    c = torch.empty(n, n, dtype=dtype)
    torch.mm(a, b, out=c)  # warm up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b, out=c)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9
