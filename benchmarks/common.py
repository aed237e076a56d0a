"""Shared helpers for every benchmark script: machine description, load, jemalloc, markdown results.

Stable API (other benchmark scripts import it; keep these signatures):

- ``machine_info() -> str``: one markdown paragraph describing CPU, cores, torch, BLAS, threads, allocator.
- ``load_average() -> tuple[float, float, float]`` and ``load_note() -> str``: the 1/5/15 min load, and a
  sentence saying whether other jobs shared the CPU while the numbers were taken.
- ``command_line() -> str``: the exact command that is running (for the "produced by" line).
- ``utc_stamp() -> str``: the current time as results files print it.
- ``markdown_table(headers, rows) -> str``: a GitHub markdown table; numbers are formatted with ``fmt``.
- ``fmt(value, digits=3) -> str``: compact number formatting (``3.14``, ``1.2e-05``, ``12,345``).
- ``write_markdown(path, title, command, sections, intro="") -> Path``: writes a results file with the
  title, the command, the machine description and then each ``(heading, markdown body)`` section.
- ``jemalloc_path() -> str | None``, ``jemalloc_active() -> bool``, ``reexec_with_jemalloc()``: run a
  script under Debian's libjemalloc2 (OBQ is 3-5x faster with it; claims against OBQ must use it).
- ``matmul_gflops(n=2048, repeats=5) -> float``: the plain float32 matrix-multiply rate of this machine,
  the yardstick for "runs at matrix-multiply speed".
- ``current_rss_mb() -> float``: resident memory now (peak increments are ``peak - current`` before a call).
- ``calibration_images(n, size=224, seed=0) -> Tensor [n, 3, size, size]``: images with real image
  statistics and no download (mosaics of Fashion-MNIST pictures), smoothed noise if that is missing.
- ``torchvision_model(name, images, batch=32, seed=0) -> nn.Module``: a randomly initialised torchvision
  model in eval mode whose BatchNorm statistics were estimated on ``images`` (sane activations).

Scripts run as ``python benchmarks/<name>.py`` import it as ``from common import ...`` (Python puts the
script's folder first on ``sys.path``) and the library as the installed package, so no script edits
``sys.path``.
Numbers in results files must come from the scripts, never be typed in by hand.
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from lightning_obq.core.measure import machine_info as library_machine_info

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
JEMALLOC_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
    "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
    "/usr/lib64/libjemalloc.so.2",
    "/usr/local/lib/libjemalloc.so.2",
)


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


def cpu_note() -> str:
    """The CPU and its logical cores, as `machine_info` names them: for results files whose sections come from
    different runs (and machines)."""
    info = library_machine_info()
    return f"{info['cpu']}, {info['cores']} logical cores"


def machine_info() -> str:
    """One markdown paragraph describing the machine and software the numbers were measured on
    (`lightning_obq.core.measure.machine_info`, plus the allocator)."""
    info = library_machine_info()
    parts = [
        f"CPU: {cpu_note()}",
        f"RAM: {info['ram_gb']:.1f} GB" if info["ram_gb"] is not None else None,
        f"{info['system']} {info['release']}",
        f"Python {info['python']}",
        f"torch {info['torch']} (BLAS: {info['blas']}, {info['torch_threads']} threads)",
        f"CUDA: {info['cuda_device']}" if "cuda_device" in info else "CUDA: none",
        "allocator: jemalloc (LD_PRELOAD)" if jemalloc_active() else "allocator: glibc malloc",
    ]
    return "Machine: " + "; ".join(p for p in parts if p) + "."


THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
"""Environment variables that change the timings: part of the command when set."""


def command_line() -> str:
    """The command that is running, relative to the repository root when possible, with the thread settings
    of its environment in front (they are part of what produced the numbers)."""
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
    env = [f"{name}={shlex.quote(os.environ[name])}" for name in THREAD_VARIABLES if name in os.environ]
    return " ".join([*env, *(shlex.quote(a) for a in [python, *args])])


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


def utc_stamp() -> str:
    """The current time as results files print it (``2026-12-02 08:14 UTC``)."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


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
        f"Written {utc_stamp()}. {load_note()}",
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


def current_rss_mb() -> float:
    """Resident memory of this process right now, in MB (0 where /proc is missing)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def calibration_images(n: int, size: int = 224, seed: int = 0) -> tuple[torch.Tensor, str]:
    """``n`` RGB images ``[n, 3, size, size]`` with real image statistics, plus a sentence saying what they are.

    Weights and ImageNet cannot be downloaded here, so each image is a mosaic of 4x4 real Fashion-MNIST
    pictures (28 px, upsampled 2x to 56 px tiles, gray repeated to RGB, normalised): real edges and
    textures at several scales, which random noise lacks. Without the dataset, smoothed Gaussian noise.
    """
    gen = torch.Generator().manual_seed(seed)
    tiles_per_side = 4
    tile = size // tiles_per_side
    try:
        from lightning_obq.demo.data import fashion_mnist

        data = fashion_mnist(train=True, download=False, channels=3)
        count = n * tiles_per_side**2
        index = torch.randperm(len(data), generator=gen)[:count].tolist()
        pics = torch.stack([data[i][0] for i in index])  # [count, 3, 28, 28]
        pics = F.interpolate(pics, size=(tile, tile), mode="bilinear", align_corners=False)
        pics = pics.reshape(n, tiles_per_side, tiles_per_side, 3, tile, tile)
        images = pics.permute(0, 3, 1, 4, 2, 5).reshape(n, 3, tile * tiles_per_side, tile * tiles_per_side)
        if images.shape[-1] != size:
            images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
        what = (
            f"{n} images of {size} px, each a 4x4 mosaic of real Fashion-MNIST pictures (upsampled to "
            f"{tile} px tiles, gray to RGB, normalised); seed {seed}"
        )
        return images.contiguous(), what
    except (ImportError, RuntimeError, OSError):
        noise = torch.randn(n, 3, size // 8, size // 8, generator=gen)
        images = F.interpolate(noise, size=(size, size), mode="bicubic", align_corners=False)
        images += 0.1 * torch.randn(images.shape, generator=gen)
        return images, f"{n} images of {size} px of smoothed Gaussian noise (Fashion-MNIST not found); seed {seed}"


def torchvision_model(name: str, images: torch.Tensor, batch: int = 32, seed: int = 0) -> nn.Module:
    """Randomly initialised ``torchvision.models.<name>()`` in eval mode with BN statistics from ``images``.

    Pretrained weights cannot be downloaded here; estimating the BatchNorm statistics on the images makes
    the activations of the random network normalised like a trained one's, so Hessians are realistic.
    """
    import torchvision

    from lightning_obq.model.batchnorm import reestimate_batchnorm

    torch.manual_seed(seed)
    model = getattr(torchvision.models, name)(weights=None).eval()
    with torch.no_grad():
        reestimate_batchnorm(model, list(images.split(batch)))
    return model
