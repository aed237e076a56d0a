"""Size on disk and in memory of real low-bit artifacts: torchvision resnet18 (or ``--model``) at W8/W4/W2.

The model (default resnet18; ``--model vit_b_16`` for a transformer, whose attention projections are quantized
layers too) is built with random weights (no download here; the sizes do not depend on the values),
quantized with ``--method`` (default ``rtn``: sizes only depend on bits and grids, and RTN is fast)
per output channel on a few random 224px calibration batches, then:

- written with `save_quantized` (packed codes + scales + zero points + the other tensors) and compared
  with the FP32 state dict written by ``torch.save`` and by safetensors;
- the quantized layers' bytes in the file (codes + scales + zero points) are compared with their FP32
  bytes, against the ideal ``bits / 32``;
- loaded with ``keep_packed=True`` to measure the resident weight bytes, and checked for identical
  outputs against the in-memory quantized model;
- exported to ONNX (`export_onnx`, UINT4 initializers for <= 4 bits, UINT8 otherwise; checked in
  onnxruntime) next to the float ONNX export.

    python benchmarks/export.py --out benchmarks/results/export.md
    python benchmarks/export.py --model vit_b_16 --out benchmarks/results/export_vit.md
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torchvision
from common import RESULTS, command_line, fmt, markdown_table, write_markdown
from safetensors import safe_open
from safetensors.torch import save_file

from lightning_obq import QuantConfig, quantize_model
from lightning_obq.core.measure import measure
from lightning_obq.export.artifact import load_quantized, resident_weight_bytes, save_quantized
from lightning_obq.export.onnx import export_onnx
from lightning_obq.model.capture import find_layers

MB = 2**20


def file_parts(path: Path) -> dict[str, int]:
    """Bytes of the file by kind: packed codes, scales + zero points (+ perms), other tensors, header."""
    parts = {"codes": 0, "grid": 0, "other": 0}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            t = f.get_tensor(key)
            n = t.numel() * t.element_size()
            if key.startswith("layers/") and key.endswith("/codes"):
                parts["codes"] += n
            elif key.startswith("layers/"):
                parts["grid"] += n
            else:
                parts["other"] += n
    parts["header"] = path.stat().st_size - sum(parts.values())
    return parts


def float_onnx_size(model: nn.Module, x: torch.Tensor, path: Path) -> int:
    """Size of the plain float ONNX export (same exporter settings as `export_onnx`)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notes
        torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=21,
                          training=torch.onnx.TrainingMode.PRESERVE)
    return path.stat().st_size


def forward_ms(models: list[nn.Module], x: torch.Tensor, repeats: int = 5) -> list[float]:
    """Best-of-``repeats`` milliseconds of one forward pass of each model, runs interleaved (no grad).

    Interleaving makes both models see the same machine load; the best run is the least disturbed one.
    """
    best = [float("inf")] * len(models)
    with torch.no_grad():
        for _ in range(repeats):
            for i, model in enumerate(models):
                with measure() as m:
                    model(x)
                best[i] = min(best[i], m.seconds * 1000)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bits", type=int, nargs="+", default=[8, 4, 2])
    parser.add_argument("--method", default="rtn", choices=["rtn", "gptq", "fastobq"])
    parser.add_argument("--batches", type=int, default=2, help="random 224px calibration batches")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="resnet18", help="torchvision architecture (random init, 224 px input)")
    parser.add_argument("--out", type=Path, default=RESULTS / "export.md")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    fp = torchvision.models.get_model(args.model, weights=None).eval()
    g = torch.Generator().manual_seed(args.seed + 1)
    calib = [torch.randn(args.batch_size, 3, 224, 224, generator=g) for _ in range(args.batches)]
    x = torch.randn(2, 3, 224, 224, generator=g)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.save(fp.state_dict(), tmp / "fp.pt")
        save_file({k: v.contiguous() for k, v in fp.state_dict().items()}, str(tmp / "fp.safetensors"))
        fp_pt, fp_st = (tmp / "fp.pt").stat().st_size, (tmp / "fp.safetensors").stat().st_size
        fp_resident = resident_weight_bytes(fp)
        fp_onnx = float_onnx_size(fp, x, tmp / "fp.onnx")

        size_rows, share_rows, mem_rows = [], [], []
        for bits in args.bits:
            model = copy.deepcopy(fp)
            config = QuantConfig(bits=bits, method=args.method, progress=False)
            with measure() as mq:
                report = quantize_model(model, calib, config)
            layers = find_layers(model, config)
            quant_fp_bytes = sum(layers[n].weight.numel() * 4 for n in report.results)
            path = tmp / f"w{bits}.safetensors"
            with measure() as ms:
                save_quantized(model, path, report)
            size = path.stat().st_size
            parts = file_parts(path)
            with measure() as ml:
                packed = load_quantized(path, torchvision.models.get_model(args.model, weights=None).eval(),
                                        keep_packed=True)
            with torch.no_grad():
                ref = model(x)
                identical = torch.equal(packed(x), ref)
            onnx_path = export_onnx(model, x, tmp / f"w{bits}.onnx", report)
            size_rows.append([
                f"W{bits}", size / MB, fp_pt / size, fp_st / size, onnx_path.stat().st_size / MB,
                fp_onnx / onnx_path.stat().st_size, mq.seconds, ms.seconds, ml.seconds,
            ])
            quantized_bytes = parts["codes"] + parts["grid"]
            share_rows.append([
                f"W{bits}", len(report.results), quant_fp_bytes / MB, parts["codes"] / MB, parts["grid"] / MB,
                quantized_bytes / quant_fp_bytes, bits / 32, parts["codes"] / quant_fp_bytes,
                parts["other"] / MB, parts["header"] / 1024,
            ])
            mem_rows.append([
                f"W{bits}", fp_resident / MB, resident_weight_bytes(packed) / MB,
                resident_weight_bytes(packed) / fp_resident, identical, *forward_ms([model, packed], x),
            ])
            print(f"W{bits}: {size / MB:.2f} MB on disk (FP torch.save {fp_pt / MB:.2f} MB), quantized layers "
                  f"{quantized_bytes / quant_fp_bytes:.4f} of FP (bits/32 = {bits / 32:.4f}), packed outputs "
                  f"identical: {identical}")

    sizes = markdown_table(
        ["bits", "artifact MB", "x smaller than torch.save FP", "x smaller than safetensors FP", "ONNX MB",
         "x smaller than FP ONNX", "quantize s", "save s", "load (packed) s"],
        size_rows,
    )
    share = markdown_table(
        ["bits", "quantized layers", "their FP32 MB", "packed codes MB", "scales + zero points + perms MB",
         "(codes + grid) / FP32", "bits / 32", "codes / FP32", "other tensors MB", "JSON header KB"],
        share_rows, digits=4,
    )
    memory = markdown_table(
        ["bits", "FP resident MB", "packed resident MB", "ratio", "outputs identical to in-memory model",
         "forward ms (float weights)", "forward ms (packed, dequantized on the fly)"],
        mem_rows,
    )
    intro = (
        f"torchvision {args.model} (random init, {fmt(sum(p.numel() for p in fp.parameters()))} parameters), "
        f"quantized with method `{args.method}`, per-channel asymmetric grids with MSE range search, "
        f"calibration {args.batches} random batches of {args.batch_size} images at 224px. FP32 state dict: "
        f"{fp_pt / MB:.2f} MB with torch.save, {fp_st / MB:.2f} MB with safetensors; FP ONNX "
        f"{fp_onnx / MB:.2f} MB. Artifacts: `save_quantized` (one safetensors file, codes bit-packed) and "
        "`export_onnx` (UINT4 initializers for <= 4 bits, UINT8 above; every file checked in onnxruntime). "
        "Scales are float32 per output channel; zero points uint8; the solver's column permutation is not "
        "stored by rtn (fastobq/gptq store it as int32, informational)."
    )
    path = write_markdown(args.out, "Low-bit artifacts: size on disk and in memory", command_line(), [
        ("Size on disk", sizes),
        ("Quantized layers vs bits/32", share + "\n\nThe quantized layers' share is the packed codes plus "
         "float32 scales and uint8 zero points divided by their FP32 bytes; the excess over bits/32 is the "
         "per-channel grid (and byte padding at the end of each layer). Everything else (BatchNorm, biases) "
         "stays FP32 and is listed separately. W2 ONNX uses UINT4 storage (ONNX has no 2-bit type), so it "
         "is the same size as W4."),
        ("Resident weight memory (load_quantized keep_packed=True)", memory + "\n\nResident bytes are the "
         "parameters and buffers held by the modules. Packed layers unpack and dequantize their weight at "
         f"every forward (timed on a batch of {x.shape[0]} at 224px, best of 5 interleaved runs), so they trade "
         "compute for memory; the float weight of one layer at a time exists only transiently."),
    ], intro=intro)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
