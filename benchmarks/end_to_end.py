"""End-to-end benchmark: `quantize_model` on torchvision resnet18/resnet50 at W4, time split and peak memory.

For each model (random init: weights cannot be downloaded here; BatchNorm statistics estimated on the
calibration images) and 256 calibration images of 224 px, this script:

1. measures the plain float32 matrix-multiply rate of this machine and the achieved Hessian accumulation
   rate (the library's `HessianAccumulator` on every Conv/Linear layer, timed inside the hooks);
2. runs `quantize_model` for fastobq, gptq and rtn (one fresh copy of the model each) and records the
   calibration / solve / BatchNorm seconds, the total and the peak RSS;
3. runs `quantize_model` with method obq (OBC variant with the outlier rule) where each distinct layer shape
   runs real OBQ on one row batch of its memory budget and its full solve time is extrapolated linearly in
   rows (see ``layers.obq_estimate``): calibration, BN and peak memory are measured, the solve estimated;
4. checks that one-pass calibration stays within ``hessian_memory_mb`` by splitting into groups of layers.

Results go to ``benchmarks/results/end_to_end.md``. The script re-executes itself under jemalloc when it is
installed (OBQ's faster figure; every method runs under the same allocator).

    python benchmarks/end_to_end.py                         # resnet18 + resnet50, 256 images
    python benchmarks/end_to_end.py --models resnet18 --quick
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import time
from pathlib import Path

import torch
import torch.nn as nn
from common import (
    RESULTS,
    calibration_images,
    command_line,
    current_rss_mb,
    fmt,
    markdown_table,
    matmul_gflops,
    reexec_with_jemalloc,
    torchvision_model,
    write_markdown,
)
from layers import obq_estimate

from lightning_obq import QuantConfig, quantize_layer, quantize_model
from lightning_obq.core import hessian as hessian_module
from lightning_obq.core import kernels
from lightning_obq.core.hessian import HessianAccumulator, layer_columns, weight_matrix
from lightning_obq.core.layer import LayerResult
from lightning_obq.core.measure import measure
from lightning_obq.model.capture import find_layers

METHODS = ("fastobq", "gptq", "rtn")
RESNET18_TARGET_SECONDS = 70
"""resnet18 W4 fastobq end to end on 256 images, on this 2-core CPU (the FastOBQ issue's target)."""


def hessian_flops(d: int, m: int, groups: int) -> tuple[float, float]:
    """(GEMM-equivalent flops ``2 m d^2``, flops actually executed by `symmetric_update`) for one update."""
    full = 2.0 * groups * m * d * d
    block = hessian_module.SYMMETRIC_BLOCK
    if d < 2 * block:
        return full, full
    done = sum(2.0 * m * (min(i0 + block, d) - i0) * (d - i0) for i0 in range(0, d, block))
    return full, groups * done


def hessian_rate(model: nn.Module, batches: list[torch.Tensor]) -> dict:
    """Forward passes with a timed `HessianAccumulator` hook on every Conv/Linear layer.

    Returns the seconds spent inside the accumulator updates (unfold + GEMM) and in total,
    and the GEMM-equivalent and executed flops of the updates.
    """
    layers = find_layers(model, QuantConfig())
    accs = {n: HessianAccumulator(m, n) for n, m in layers.items()}
    spent = {"update": 0.0, "full": 0.0, "exec": 0.0}

    def make_hook(name: str):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            x = inputs[0]
            g, d, m = layer_columns(module, x[:1]).shape
            full, done = hessian_flops(d, m * x.shape[0], g)
            start = time.perf_counter()
            accs[name].update(x)
            spent["update"] += time.perf_counter() - start
            spent["full"] += full
            spent["exec"] += done

        return hook

    handles = [m.register_forward_hook(make_hook(n)) for n, m in layers.items()]
    try:
        with torch.no_grad(), measure() as total:
            for x in batches:
                model(x)
    finally:
        for h in handles:
            h.remove()
    accs.clear()
    return {
        "update_s": spent["update"],
        "total_s": total.seconds,
        "gemm_equiv_flops": spent["full"],
        "executed_flops": spent["exec"],
        "peak_rss_mb": total.peak_rss_mb,
    }


def obq_layer_solver(max_rows: int, log: list[str]):
    """A `quantize_model` ``layer_solver`` that runs real OBQ on one row batch per distinct layer shape.

    Each layer gets rtn weights, with the first OBQ row batch replaced by OBQ's result where OBQ ran
    (the model is only timed, not evaluated). ``LayerResult.seconds`` is the full-layer OBQ estimate of
    `layers.obq_estimate` (measured, or extrapolated in rows), so ``QuantReport.solve_seconds`` sums the
    estimated OBQ solve time while the process memory is that of real OBQ row batches.
    """
    cache: dict[tuple, tuple[float, bool]] = {}

    def solve(names: list[str], weights: list[torch.Tensor], hessians: list[torch.Tensor],
              config: QuantConfig) -> list[LayerResult]:
        out = []
        for name, w, h in zip(names, weights, hessians, strict=True):
            r_rtn = quantize_layer(w, h, config.replace(method="rtn"), name=name)
            key = (tuple(w.shape), tuple(h.shape))
            if key not in cache:
                est = obq_estimate(w, h, config, name, max_rows, rtn_seconds=r_rtn.seconds)
                k = est.rows
                weight, codes = r_rtn.weight.clone(), r_rtn.codes.clone()
                weight[:, :k], codes[:, :k] = est.result.weight, est.result.codes
                r_rtn = dataclasses.replace(r_rtn, weight=weight, codes=codes,
                                            peak_rss_mb=max(r_rtn.peak_rss_mb, est.result.peak_rss_mb))
                cache[key] = (est.seconds, est.extrapolated)
                log.append(f"{name} {tuple(w.shape)}: {fmt(est.seconds)} s"
                           + (f" (extrapolated from {est.rows} rows)" if est.extrapolated else " (measured)"))
                print("  obq " + log[-1], flush=True)
            seconds, extrapolated = cache[key]
            out.append(dataclasses.replace(r_rtn, seconds=seconds, error=math.nan, damped_error=math.nan))
        return out

    return solve


def run_model(name: str, args: argparse.Namespace, images: torch.Tensor, sections: list, summary: list) -> None:
    batches = list(images.split(args.batch))
    model = torchvision_model(name, images, args.batch)
    print(f"{name}: measuring Hessian accumulation rate", flush=True)
    mm_before = matmul_gflops()
    rate = hessian_rate(model, list(images[: args.rate_images].split(args.batch)))
    mm_after = matmul_gflops()
    mm = max(mm_before, mm_after)
    equiv = rate["gemm_equiv_flops"] / rate["update_s"] / 1e9
    executed = rate["executed_flops"] / rate["update_s"] / 1e9
    rows = []
    reports = {}
    for method in args.methods:
        print(f"{name}: quantize_model {method}", flush=True)
        m = copy.deepcopy(model)
        base_rss = current_rss_mb()
        config = QuantConfig(bits=4, method=method, calib_samples=len(images), progress=False)
        rep = quantize_model(m, batches, config)
        reports[method] = rep
        rows.append([method, rep.calib_seconds, rep.solve_seconds, rep.bn_seconds, rep.total_seconds,
                     rep.peak_rss_mb, base_rss, "measured"])
        del m
    obq = None
    if args.obq:
        print(f"{name}: quantize_model obq (one row batch per shape, rest estimated)", flush=True)
        m = copy.deepcopy(model)
        base_rss = current_rss_mb()
        obq_log: list[str] = []
        config = QuantConfig(bits=4, method="obq", calib_samples=len(images), progress=False)
        obq = quantize_model(m, batches, config, layer_solver=obq_layer_solver(args.obq_max_rows, obq_log))
        del m
        total = obq.calib_seconds + obq.solve_seconds + obq.bn_seconds
        extrapolated = sum("extrapolated" in line for line in obq_log)
        rows.append(["obq", obq.calib_seconds, obq.solve_seconds, obq.bn_seconds, total, obq.peak_rss_mb, base_rss,
                     f"solve estimated: {extrapolated}/{len(obq_log)} distinct shapes extrapolated in rows "
                     f"(wall time of this run {fmt(obq.total_seconds)} s)"])
    table = markdown_table(["method", "calibration s", "solve s", "BN s", "total s", "peak RSS MB",
                            "RSS before MB", "how"], rows)
    lines = [table, ""]
    if "fastobq" in reports:
        fast = reports["fastobq"]
        if obq is not None:
            obq_total = rows[-1][4]
            lines.append(f"- obq total / fastobq total: **{fmt(obq_total / fast.total_seconds)}x** "
                         f"(target >= 100x: {'met' if obq_total / fast.total_seconds >= 100 else 'not met'}); "
                         f"obq solve / fastobq solve: {fmt(obq.solve_seconds / fast.solve_seconds)}x.")
            lines.append(f"- peak RSS fastobq {fmt(fast.peak_rss_mb)} MB vs obq {fmt(rows[-1][5])} MB "
                         f"(target fastobq below obq: {'met' if fast.peak_rss_mb < rows[-1][5] else 'not met'}).")
        if name == "resnet18":
            ok = fast.total_seconds <= RESNET18_TARGET_SECONDS
            lines.append(f"- resnet18 W4 fastobq end to end: {fmt(fast.total_seconds)} s "
                         f"(target <= {RESNET18_TARGET_SECONDS} s: {'met' if ok else 'not met'}).")
        if "gptq" in reports:
            lines.append(f"- fastobq solve / gptq solve: {fmt(fast.solve_seconds / reports['gptq'].solve_seconds)}x.")
    lines.append(
        f"- Hessian accumulation: {fmt(rate['gemm_equiv_flops'] / 1e9)} GFLOP GEMM-equivalent "
        f"on {min(args.rate_images, len(images))} images "
        f"({fmt(rate['gemm_equiv_flops'] / 1e9 / min(args.rate_images, len(images)))} per image, "
        f"`2 N d_col^2` per layer) in "
        f"{fmt(rate['update_s'])} s of accumulator updates (unfold + products; the whole hooked forward took "
        f"{fmt(rate['total_s'])} s): **{fmt(equiv)} GFLOP/s GEMM-equivalent = {fmt(100 * equiv / mm)}% of the "
        f"matrix-multiply rate** {fmt(mm)} GFLOP/s (2048^3 float32 `torch.mm`, best of the measurements before "
        f"({fmt(mm_before)}) and after ({fmt(mm_after)}) in this run); target >= 70%: "
        f"{'met' if equiv >= 0.7 * mm else 'not met'}. The symmetric update skips the lower triangle, so it "
        f"executes {fmt(rate['executed_flops'] / 1e9)} GFLOP: {fmt(executed)} GFLOP/s executed "
        f"({fmt(100 * executed / mm)}% of the matmul rate)."
    )
    sections.append((f"{name} (W4, {len(images)} calibration images of {images.shape[-1]} px)", "\n".join(lines)))
    if "fastobq" in reports:
        summary.append((name, reports["fastobq"]))


def memory_bound_check(args: argparse.Namespace, images: torch.Tensor) -> str:
    """Run one-pass fastobq with a small ``hessian_memory_mb`` and report passes and peak RSS vs default."""
    imgs = images[: args.memory_images]
    batches = list(imgs.split(args.batch))
    model = torchvision_model("resnet18", imgs, args.batch)
    layers = find_layers(model, QuantConfig())
    total_mb = sum(weight_matrix(m).shape[0] * weight_matrix(m).shape[2] ** 2 * 4 / 2**20 for m in layers.values())
    largest = max(weight_matrix(m).shape[0] * weight_matrix(m).shape[2] ** 2 * 4 / 2**20 for m in layers.values())
    rows = []
    for budget in (4096.0, args.memory_budget_mb):
        m = copy.deepcopy(model)
        base = current_rss_mb()
        rep = quantize_model(m, batches, QuantConfig(bits=4, calib_samples=len(imgs), progress=False,
                                                     hessian_memory_mb=budget))
        groups, used = 1, 0.0
        for mod in layers.values():
            w = weight_matrix(mod)
            mb = w.shape[0] * w.shape[2] ** 2 * 4 / 2**20
            if used and used + mb > budget:
                groups, used = groups + 1, 0.0
            used += mb
        rows.append([fmt(budget), groups, rep.calib_seconds, rep.total_seconds, rep.peak_rss_mb,
                     rep.peak_rss_mb - base])
        del m
    return "\n".join([
        f"resnet18, fastobq W4, one-pass calibration on {len(imgs)} images. All float32 Hessians together: "
        f"{fmt(total_mb)} MB (largest layer {fmt(largest)} MB). With a budget below the total, `quantize_model` "
        "captures consecutive groups of layers in separate passes (each pass stops after the group's last layer).",
        "",
        markdown_table(["hessian_memory_mb", "passes (groups)", "calibration s", "total s", "peak RSS MB",
                        "peak above RSS before MB"], rows),
    ])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="resnet18,resnet50")
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--no-obq", dest="obq", action="store_false", help="skip the OBQ estimate")
    p.add_argument("--obq-max-rows", type=int, default=0,
                   help="cap on OBQ rows timed on layers with d_col >= 2048 (0: one full row batch)")
    p.add_argument("--rate-images", type=int, default=64, help="images for the Hessian-rate measurement")
    p.add_argument("--memory-images", type=int, default=64, help="images for the memory-bound check")
    p.add_argument("--memory-budget-mb", type=float, default=64.0, help="small budget for the memory check")
    p.add_argument("--no-memory-check", dest="memory_check", action="store_false")
    p.add_argument("--quick", action="store_true", help="dry run: 16 images, OBQ on 2 rows per shape")
    p.add_argument("--no-jemalloc", action="store_true")
    p.add_argument("--out", type=Path, default=RESULTS / "end_to_end.md")
    args = p.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    if args.quick:
        args.images, args.batch, args.obq_max_rows, args.memory_images = 16, 8, 2, 8
    if not args.no_jemalloc:
        reexec_with_jemalloc()
    images, note = calibration_images(args.images)
    kernel_seconds = kernels.load()
    sections: list = []
    summary: list = []
    for name in [m for m in args.models.split(",") if m]:
        run_model(name, args, images, sections, summary)
    if args.memory_check:
        print("memory-bound check", flush=True)
        sections.append(("Bounded memory: one-pass calibration in groups of layers", memory_bound_check(args, images)))
    intro = "\n".join([
        f"Calibration data: {note} (no real ImageNet here; random-init models with BatchNorm statistics "
        "estimated on these images). W4, per-channel asymmetric grids with MSE range search, damp 0.1: the "
        "`QuantConfig` defaults, one-pass calibration, `bn_mode=\"auto\"`, fastobq with its one refinement "
        "sweep. Times are `QuantReport` fields of "
        "one `quantize_model` run per method; peak RSS is the whole process (model, images, FP backup of the "
        "weights and all Hessians included). The solvers' compiled kernels were loaded before the first timed "
        f"run ({kernel_seconds:.2f} s, once per process), so no method carries that one-time cost.",
        "OBQ is the OBC reference algorithm (greedy per weight with OBC's outlier rule, `solve_obq(outliers="
        "True)`); a full run would take hours, so it runs as a real `quantize_model(method='obq')` whose "
        "layer solver runs OBQ on one row batch (of its 1024 MB budget; at most `--obq-max-rows` rows on layers "
        "with d_col >= 2048, where each step is a memory-bound update proportional to the rows) per distinct "
        "layer shape and "
        "extrapolates the solve time linearly in rows (fixed parts counted once; repeated shapes reuse the "
        "estimate). Its calibration, BN and peak RSS are measured in that run; its solve seconds are the "
        "estimate.",
    ])
    path = write_markdown(args.out, "End-to-end quantization: time and memory", command_line(), sections, intro)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
