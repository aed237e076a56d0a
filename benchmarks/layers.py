"""Per-layer benchmark: fastobq vs gptq (natural and act order) vs exact obq vs rtn on resnet18's layer shapes.

For every distinct Conv/Linear weight shape of torchvision ``resnet18`` (random init: weights cannot be
downloaded here; BatchNorm statistics estimated on the calibration images), the Hessian of the first layer
with that shape is captured from real forward passes, then each method quantizes the layer with
`quantize_layer` (W4, per-channel asymmetric grid with MSE range search, damp 0.1: the defaults). Written
to ``benchmarks/results/layers.md``: seconds, peak memory, layer error, error ratio to obq, speedups, and
whether the issue's targets are met. fastobq runs with its default refinement stage (`QuantConfig.refine_sweeps`);
its error before refinement (the column-parallel solve alone) and the refinement's seconds are reported next to it.

OBQ is exact but costs ``O(d_row d_col^3)``: where the whole layer does not fit one row batch of its memory
budget, it runs on the first row batch only (the memory peak is then the full run's) and its time is
extrapolated linearly in rows (rows are independent in OBQ); every such layer is marked. The script
re-executes itself under jemalloc when installed, because OBQ is several times faster with it and a speed
claim against OBQ must use its faster figure; all methods then run under the same allocator.

    python benchmarks/layers.py                  # full run (~10 min on an idle 2-core CPU)
    python benchmarks/layers.py --quick          # small dry run (few images, cheap OBQ sample)
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
from common import (
    RESULTS,
    calibration_images,
    command_line,
    current_rss_mb,
    fmt,
    jemalloc_active,
    markdown_table,
    reexec_with_jemalloc,
    torchvision_model,
    write_markdown,
)

import lightning_obq.core.layer as layer_module
from lightning_obq import QuantConfig, quantize_layer
from lightning_obq.core import kernels
from lightning_obq.core.config import DEFAULT_ORDER
from lightning_obq.core.hessian import HessianAccumulator, damp_hessian, weight_matrix
from lightning_obq.core.layer import LayerResult, layer_error
from lightning_obq.core.measure import measure
from lightning_obq.core.solvers import inverse_hessian, obq_row_batch

METHODS = {  # label -> config changes
    "fastobq": {"method": "fastobq"},
    "fastobq-des": {"method": "fastobq", "order": "sensi_des"},  # the paper's static order, for comparison
    "gptq": {"method": "gptq", "order": "none"},
    "gptq-act": {"method": "gptq", "order": "act"},
    "rtn": {"method": "rtn"},
}


@dataclass
class LayerBench:
    """Everything measured on one layer shape."""

    name: str
    same_shape: list[str]
    d_row: int
    d_col: int
    groups: int
    seconds: dict[str, float] = field(default_factory=dict)
    peak_mb: dict[str, float] = field(default_factory=dict)
    error: dict[str, float] = field(default_factory=dict)
    error_obq_rows: dict[str, float] = field(default_factory=dict)  # error on the rows obq ran on
    solve_error: float = float("nan")  # fastobq before its refinement stage, whole layer
    solve_error_obq_rows: float = float("nan")  # the same on the rows obq ran on
    refine_seconds: float = float("nan")  # of the timed (fastest) fastobq run
    refine_sweeps: int = 0
    obq_rows: int = 0
    obq_extrapolated: bool = False
    plain_greedy_ratio: float = float("nan")  # greedy OBQ without the outlier rule / obq, on <= 8 rows


@dataclass
class OBQEstimate:
    """OBQ on the first ``rows`` rows (per group) and the full-layer time estimated from it."""

    result: LayerResult  # on the first `rows` rows
    rows: int
    seconds: float  # full layer: measured, or extrapolated when `extrapolated`
    peak_mb: float  # peak RSS increment of the measured run (one full row batch: the full run's peak)
    extrapolated: bool


LARGE_D_COL = 2048
"""From this d_col on, each OBQ step is a memory-bound ``rows x d_col^2`` update whose cost is proportional
to the rows in the batch, so timing fewer rows than a full batch (``max_rows``) still extrapolates fairly.
Below it, the per-step overhead is shared by the whole batch, so OBQ is always timed on a full batch."""


@contextmanager
def obq_variant(outliers: bool = True) -> Iterator[None]:
    """Make ``quantize_layer(method="obq")`` use `solve_obq` with or without OBC's outlier rule.

    The library's ``obq`` is the OBC reference algorithm (``outliers=True``); ``outliers=False`` gives
    plain greedy OBQ, which the benchmark reports for comparison.
    """
    original = layer_module.solve_obq

    def forced(*args: object, **kwargs: object) -> torch.Tensor:
        return original(*args, **{**kwargs, "outliers": outliers})

    layer_module.solve_obq = forced
    try:
        yield
    finally:
        layer_module.solve_obq = original


OBQ_REPEAT_SECONDS = 3.0
"""OBQ runs shorter than this are repeated (``repeats``) and the fastest kept."""


def best_runs(
    calls: dict[str, Callable[[], LayerResult]], repeats: int, min_seconds: float = 0.0,
    stop_above: float = math.inf,
) -> dict[str, tuple[LayerResult, float]]:
    """Fastest result per label, the calls taking turns: each round makes every call once, so a slow spell of
    this shared virtual machine (runs here drift by 10-20 % for seconds at a time) hits them all alike instead
    of whichever one it falls on. At least ``repeats`` rounds, more until the slowest call's seconds add up
    to ``min_seconds`` (at most 100 rounds), none after a call took ``stop_above`` seconds. With each
    result, the largest peak-RSS increment of its label's calls over the RSS before them (MB)."""
    best: dict[str, LayerResult] = {}
    peak = dict.fromkeys(calls, 0.0)
    spent = dict.fromkeys(calls, 0.0)
    rounds, slow = 0, False
    while not slow and (rounds < repeats or (max(spent.values()) < min_seconds and rounds < 100)):
        for label, call in calls.items():
            before = current_rss_mb()
            r = call()
            spent[label] += r.seconds
            peak[label] = max(peak[label], r.peak_rss_mb - before)
            if label not in best or r.seconds < best[label].seconds:
                best[label] = r
            slow = slow or r.seconds >= stop_above
        rounds += 1
    return {label: (r, peak[label]) for label, r in best.items()}


def obq_estimate(
    w: torch.Tensor, h: torch.Tensor, base: QuantConfig, name: str, max_rows: int = 0,
    rtn_seconds: float | None = None, repeats: int = 1,
) -> OBQEstimate:
    """Run OBQ (OBC variant) on one row batch of its memory budget, or the whole layer if it fits.

    ``max_rows`` caps the rows timed on layers with ``d_col >= LARGE_D_COL`` only (see there). With
    ``repeats > 1`` a run shorter than `OBQ_REPEAT_SECONDS` is repeated and the fastest kept, as for the
    other methods (OBQ is memory-bound and its single runs varied by up to 50 % here).

    Rows are independent in OBQ, so the full time is extrapolated linearly in rows, but only for the
    per-row solver work: the fixed parts (grid search + error evaluation, measured by rtn on the same
    rows, and the one ``H^-1``) are counted once. ``rtn_seconds`` is rtn's time on the full layer (it is
    measured here when not given). ``w`` is ``[G, d_row/G, d_col]``.
    """
    g, d_row, d_col = w.shape
    k = min(d_row, obq_row_batch(d_col, base.obq_memory_mb))
    if max_rows and d_col >= LARGE_D_COL:
        k = min(k, max_rows)
    with obq_variant(outliers=True):
        r, peak = best_runs({"obq": lambda: quantize_layer(w[:, :k], h, base.replace(method="obq"), name=name)},
                            repeats, stop_above=OBQ_REPEAT_SECONDS)["obq"]
    if k == d_row:
        return OBQEstimate(r, k, r.seconds, peak, False)
    if rtn_seconds is None:
        rtn_seconds = quantize_layer(w, h, base.replace(method="rtn"), name=name).seconds
    r_rtn_k = quantize_layer(w[:, :k], h, base.replace(method="rtn"), name=name)
    with measure() as m_inv:
        inverse_hessian(damp_hessian(h, base.damp, base.damp_mode))
    per_rows = max(r.seconds - r_rtn_k.seconds - m_inv.seconds, 0.0)
    return OBQEstimate(r, k, rtn_seconds + m_inv.seconds + per_rows * d_row / k, peak, True)


def representative_layers(model: nn.Module) -> dict[str, list[str]]:
    """First layer of each distinct (type, weight shape, groups) -> names of all layers sharing it."""
    shapes: dict[tuple, list[str]] = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            key = (type(m).__name__, tuple(m.weight.shape), getattr(m, "groups", 1))
            shapes.setdefault(key, []).append(name)
    return {names[0]: names for names in shapes.values()}


def capture(model: nn.Module, names: list[str], images: torch.Tensor, batch: int) -> dict[str, torch.Tensor]:
    """Hessians of ``names`` from forward passes over ``images`` (the library's accumulator and hooks)."""
    modules = dict(model.named_modules())
    accs = {n: HessianAccumulator(modules[n], n) for n in names}
    handles = [h for n in names for h in accs[n].register()]
    try:
        with torch.no_grad():
            for x in images.split(batch):
                model(x)
    finally:
        for h in handles:
            h.remove()
    return {n: a.hessian for n, a in accs.items()}


MIN_TIMED_SECONDS = 0.5
"""Fast layers are repeated until their runs add up to this (at most 100 runs): best-of-3 of a 2 ms call
moved by +-20 % between identical runs here, more than the differences being measured."""


def bench_layer(name: str, same: list[str], module: nn.Module, h: torch.Tensor, args: argparse.Namespace) -> LayerBench:
    w = weight_matrix(module).detach()  # [G, d_row/G, d_col]
    g, d_row, d_col = w.shape
    b = LayerBench(name, same, d_row * g, d_col, g)
    base = QuantConfig(bits=args.bits, progress=False, obq_memory_mb=args.obq_memory_mb)
    calls = {label: partial(quantize_layer, w, h, base.replace(**changes), name=name)
             for label, changes in METHODS.items()}
    timed = best_runs(calls, args.repeats, min_seconds=MIN_TIMED_SECONDS)
    results = {label: r for label, (r, _) in timed.items()}
    for label, (r, peak) in timed.items():
        b.seconds[label], b.peak_mb[label], b.error[label] = r.seconds, peak, r.error
    est = obq_estimate(w, h, base, name, args.obq_max_rows, rtn_seconds=b.seconds["rtn"], repeats=args.repeats)
    b.peak_mb["obq"], b.obq_rows, b.obq_extrapolated = est.peak_mb, est.rows * g, est.extrapolated
    b.seconds["obq"] = est.seconds
    if not est.extrapolated:
        b.error["obq"] = est.result.error
    k = est.rows
    b.error_obq_rows["obq"] = est.result.error
    for label, r in results.items():
        b.error_obq_rows[label] = layer_error(w[:, :k], r.weight[:, :k], h)
    fast = results["fastobq"]
    b.solve_error, b.refine_seconds, b.refine_sweeps = fast.solve_error, fast.refine_seconds, fast.refine_sweeps
    solve = quantize_layer(w, h, base.replace(refine_sweeps=0), name=name)  # the same solve, untimed
    b.solve_error_obq_rows = layer_error(w[:, :k], solve.weight[:, :k], h)
    # Plain greedy OBQ (no outlier rule) on a few of the same rows, to show what the rule is worth.
    kp = min(k, 8)
    with obq_variant(outliers=False):
        plain = quantize_layer(w[:, :kp], h, base.replace(method="obq"), name=name)
    b.plain_greedy_ratio = plain.error / layer_error(w[:, :kp], est.result.weight[:, :kp], h)
    return b


def obq_flops(d_row: int, d_col: int) -> float:
    """OBQ's leading cost: per row, ``d_col`` rank-1 downdates of a ``d_col x d_col`` inverse Hessian."""
    return 2.0 * d_row * d_col**3


def fastobq_flops(d_row: int, d_col: int) -> float:
    """FastOBQ's leading cost: Cholesky + ``H^-1`` (~7/3 d^3), the factor of the permuted inverse (d^3/3;
    ``sensi_dyn``'s three Schur complements cost about the same) and the shared column updates
    (``2 d_row d_col^2``)."""
    return 8 / 3 * d_col**3 + 2.0 * d_row * d_col**2


def summarize(benches: list[LayerBench], args: argparse.Namespace, images_note: str, capture_s: float) -> None:
    timing_rows, error_rows, target_rows, refine_rows = [], [], [], []
    ok_speed, ok_gptq_time, ok_err_nat, ok_obq, ok_act = [], [], [], [], []
    for b in benches:
        star = "*" if b.obq_extrapolated else ""
        shape = f"{b.d_row}x{b.d_col}" + (f" (G={b.groups})" if b.groups > 1 else "")
        label = f"{b.name} (x{len(b.same_shape)})" if len(b.same_shape) > 1 else b.name
        s = b.seconds
        timing_rows.append([
            label, shape, s["fastobq"], s["gptq"], s["gptq-act"], s["rtn"], fmt(s["obq"]) + star,
            b.peak_mb["fastobq"], b.peak_mb["gptq"], b.peak_mb["obq"], f"{b.obq_rows}/{b.d_row}",
        ])
        e, eo = b.error, b.error_obq_rows
        error_rows.append([
            label, e["fastobq"], e["fastobq-des"], e["gptq"], e["gptq-act"], e["rtn"],
            fmt(e["obq"]) if "obq" in e else f"(rows) {fmt(eo['obq'])}",
            eo["fastobq"] / eo["obq"], eo["gptq"] / eo["obq"], eo["gptq-act"] / eo["obq"], eo["rtn"] / eo["obq"],
            b.plain_greedy_ratio,
        ])
        refine_rows.append([
            label, b.solve_error, e["fastobq"], e["fastobq"] / b.solve_error, b.solve_error_obq_rows / eo["obq"],
            eo["fastobq"] / eo["obq"], b.refine_sweeps, b.refine_seconds, s["fastobq"] - b.refine_seconds,
        ])
        speedup = s["obq"] / s["fastobq"]
        t_ratio = s["fastobq"] / s["gptq"]
        err_nat = e["fastobq"] / e["gptq"]
        err_act = e["fastobq"] / e["gptq-act"]
        big = b.d_col >= 576
        if big:
            ok_speed.append(speedup >= 100)
            ok_gptq_time.append(t_ratio <= 1.5)
        ok_err_nat.append(err_nat < 1)
        ok_obq.append(eo["fastobq"] <= eo["obq"])
        ok_act.append(err_act <= 1)
        target_rows.append([
            label, fmt(speedup) + star + ("" if big else " (d_col<576)"), t_ratio, err_nat, err_act,
            eo["fastobq"] / eo["obq"], e["fastobq-des"] / e["gptq"],
        ])
    tot = {k: sum(b.seconds[k] for b in benches) for k in ("fastobq", "gptq", "gptq-act", "rtn", "obq")}

    def verdict(ok: list[bool]) -> str:
        return f"{'**met**' if all(ok) else '**not met**'} ({sum(ok)}/{len(ok)} layers)"

    def names(ok: list[bool], subset: list[LayerBench]) -> str:
        missed = [b.name for b, good in zip(subset, ok, strict=True) if not good]
        return f"; not on {', '.join(missed)}" if missed else ""

    big_benches = [b for b in benches if b.d_col >= 576]
    targets = "\n".join([
        f"- fastobq (refined) error <= obq's on every layer (on the rows obq ran on): {verdict(ok_obq)}"
        f"{names(ok_obq, benches)}.",
        f"- fastobq error <= gptq act order's on every layer: {verdict(ok_act)}{names(ok_act, benches)}.",
        f"- fastobq <= 1.5x gptq time on every layer with d_col >= 576: {verdict(ok_gptq_time)}"
        f"{names(ok_gptq_time, big_benches)}; all layers together {fmt(tot['fastobq'] / tot['gptq'])}x.",
        f"- fastobq >= 100x faster than obq on every layer with d_col >= 576: {verdict(ok_speed)}; smallest "
        f"speedup {fmt(min(b.seconds['obq'] / b.seconds['fastobq'] for b in big_benches))}x.",
        f"- fastobq error below gptq natural order on every layer: {verdict(ok_err_nat)}.",
        f"- Totals over the distinct shapes (seconds): fastobq {fmt(tot['fastobq'])} (refinement "
        f"{fmt(sum(b.refine_seconds for b in benches))}), gptq {fmt(tot['gptq'])}, gptq-act {fmt(tot['gptq-act'])}, "
        f"rtn {fmt(tot['rtn'])}, obq {fmt(tot['obq'])} (obq/fastobq {fmt(tot['obq'] / tot['fastobq'])}x); "
        f"summed layer error of fastobq {fmt(sum(b.error['fastobq'] for b in benches), 4)} after refinement, "
        f"{fmt(sum(b.solve_error for b in benches), 4)} before.",
    ])
    slow = [b for b in big_benches if b.seconds["obq"] / b.seconds["fastobq"] < 100]
    if slow:
        targets += "\n" + "\n".join(
            f"- {b.name} ({b.d_row}x{b.d_col}): obq does ~{fmt(obq_flops(b.d_row, b.d_col) / 1e9)} GFLOP "
            f"({fmt(obq_flops(b.d_row, b.d_col) / 1e9 / b.seconds['obq'])} GFLOP/s here), fastobq ~"
            f"{fmt(fastobq_flops(b.d_row, b.d_col) / 1e9, 3)} GFLOP: at equal FLOP rates the speedup is capped "
            f"at {fmt(obq_flops(b.d_row, b.d_col) / fastobq_flops(b.d_row, b.d_col))}x on this shape, and "
            f"fastobq's per-column steps ({b.d_col} of them) and grid search add fixed time on top."
            for b in slow
        )
    extrapolated = [b.name for b in benches if b.obq_extrapolated]
    setup = "\n".join([
        "Model: torchvision `resnet18`, random init (weights cannot be downloaded here), BatchNorm statistics "
        "estimated on the calibration images so activations are normalised like a trained network's.",
        f"Calibration: {images_note}; Hessians captured with `HessianAccumulator` forward hooks in batches of "
        f"{args.batch} ({fmt(capture_s)} s for all captured layers).",
        f"Quantization: W{args.bits}, per-channel asymmetric grid with MSE range search, damp 0.1 (absolute) "
        f"- the `QuantConfig` defaults; fastobq uses its default order `{DEFAULT_ORDER['fastobq']}`; the "
        "`fastobq sensi_des` columns use the paper's static order.",
        "Seconds are `LayerResult.seconds` of one `quantize_layer` call (grid search, solver and the error "
        f"evaluation, which are common to all methods), best of at least {args.repeats} runs for fastobq/gptq/rtn "
        f"(fast layers: up to 100 runs, until {MIN_TIMED_SECONDS:g} s of the slowest method are timed), the "
        "methods taking turns (one call of each per round) so that a slow spell of the machine hits them alike; "
        f"obq: best of {args.repeats} "
        f"runs where a run takes under {OBQ_REPEAT_SECONDS:g} s, else one run. Peak memory is the peak RSS "
        "increment of the call over the RSS before it (MB). The solvers' compiled kernels were loaded before "
        f"the first timed call ({args.kernel_seconds:.2f} s, once per process), so no method or layer carries "
        "that one-time cost or its memory.",
        f"OBQ row batches use a {fmt(args.obq_memory_mb)} MB budget; allocator: "
        f"{'jemalloc (LD_PRELOAD) for every method' if jemalloc_active() else 'glibc malloc (jemalloc not used)'}.",
        f"OBQ ran on a subset of rows and its time is extrapolated (marked `*`) on: "
        f"{', '.join(extrapolated) if extrapolated else 'none'}. Extrapolation: rtn time of the full layer "
        "(grid + evaluation) + one H^-1 + (obq time on the rows - rtn time on the same rows - H^-1) x "
        "d_row/rows. OBQ's error is then known on those rows only: every error ratio to obq is taken on the "
        "rows obq ran on (each method's error restricted to the same rows).",
        "`obq` is the OBC reference algorithm: greedy per weight plus OBC's outlier rule (a weight off the "
        "grid is quantized at once), `solve_obq(..., outliers=True)`, which is what the library's "
        "`method=\"obq\"` runs; the last error column shows plain greedy OBQ (`outliers=False`) / obq on "
        "the first <= 8 rows.",
    ])
    sections = [
        ("Setup", setup),
        ("Targets", targets),
        ("Time and memory per layer shape", markdown_table(
            ["layer", "d_row x d_col", "fastobq s", "gptq s", "gptq-act s", "rtn s", "obq s",
             "fastobq MB", "gptq MB", "obq MB", "obq rows"], timing_rows)),
        ("Layer error per method (tr((W-Q) H (W-Q)^T), undamped H)", markdown_table(
            ["layer", "fastobq", "fastobq sensi_des", "gptq", "gptq-act", "rtn", "obq", "fastobq/obq", "gptq/obq",
             "gptq-act/obq", "rtn/obq", "plain greedy/obq"], error_rows, digits=4)),
        ("Speed and error ratios", markdown_table(
            ["layer", "obq s / fastobq s", "fastobq s / gptq s", "fastobq err / gptq err",
             "fastobq err / gptq-act err", "fastobq err / obq err (obq rows)", "sensi_des err / gptq err"],
            target_rows, digits=4)),
        ("Refinement stage of fastobq (before = the column-parallel solve alone)", markdown_table(
            ["layer", "error before", "error after", "after / before", "before / obq (obq rows)",
             "after / obq (obq rows)", "sweeps", "refinement s", "solve s (rest)"], refine_rows, digits=4)),
    ]
    path = write_markdown(args.out, "Per-layer benchmark: resnet18 layer shapes", command_line(), sections)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=64, help="calibration images (224 px)")
    p.add_argument("--batch", type=int, default=16, help="forward batch size for Hessian capture")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3, help="timing repeats for fastobq/gptq/rtn (best kept)")
    p.add_argument("--obq-memory-mb", type=float, default=1024.0, help="OBQ row-batch memory budget")
    p.add_argument("--obq-max-rows", type=int, default=0,
                   help="cap on OBQ rows timed on layers with d_col >= 2048 (0: one full row batch)")
    p.add_argument("--layers", default="", help="comma-separated substrings: only matching layer shapes")
    p.add_argument("--quick", action="store_true", help="dry run: 8 images, 1 repeat, OBQ on 2 rows")
    p.add_argument("--no-jemalloc", action="store_true", help="do not re-execute under jemalloc")
    p.add_argument("--out", type=Path, default=RESULTS / "layers.md")
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.batch, args.repeats, args.obq_max_rows = 8, 8, 1, 2
    if not args.no_jemalloc:
        reexec_with_jemalloc()
    images, images_note = calibration_images(args.images)
    model = torchvision_model("resnet18", images, args.batch)
    reps = representative_layers(model)
    if args.layers:
        keys = args.layers.split(",")
        reps = {n: s for n, s in reps.items() if any(k in n for k in keys)}
    with measure() as m:
        hessians = capture(model, list(reps), images, args.batch)
    modules = dict(model.named_modules())
    args.kernel_seconds = kernels.load()  # before any timing, so no method or layer carries the one-time load
    benches = []
    for name, same in reps.items():
        b = bench_layer(name, same, modules[name], hessians[name], args)
        print(f"{name:24s} {b.d_row}x{b.d_col} " + " ".join(f"{k}={fmt(v)}s" for k, v in b.seconds.items()),
              flush=True)
        benches.append(b)
    summarize(benches, args, images_note, m.seconds)


if __name__ == "__main__":
    main()
