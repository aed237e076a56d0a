"""Does a refactor change any result? Quantize the same seeded model with every method at this checkout and at
an earlier revision, and compare the quantized weights bit for bit.

    python benchmarks/same_results.py a77cc90 --out benchmarks/results/same_results.md

The earlier revision is checked out into a temporary git worktree and imported from there (``PYTHONPATH``), in
a process of its own; both runs use one thread, a demo SmallResNet with BatchNorm statistics deliberately off
for the calibration inputs (so ``bn_mode="auto"`` has a real choice) and the same calibration tensors.
Compared per run: every tensor of the state dict (``torch.equal``), the BatchNorm decision and the layer errors.
"""

from __future__ import annotations

import argparse
import copy
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from common import RESULTS, ROOT, command_line, markdown_table, write_markdown

RUNS = {
    "fastobq W4": {},
    "gptq act W3": {"method": "gptq", "order": "act", "bits": 3},
    "rtn W2": {"method": "rtn", "bits": 2},
    "obq W4": {"method": "obq"},
    "fastobq mixed 3.5 bits": {"budget": 3.5},
    "fastobq W3 sequential": {"bits": 3, "calibration": "sequential"},
}


def quantize_all(out: Path) -> None:
    """Every run of `RUNS` on the seeded model, saved to ``out`` (runs in the checkout being measured)."""
    try:
        from lightning_obq.demo.models import SmallResNet
    except ImportError:  # revisions before the demo subpackage
        from lightning_obq.models import SmallResNet
    from lightning_obq import QuantConfig, quantize_model

    torch.set_num_threads(1)
    torch.manual_seed(0)
    fp = SmallResNet(width=16).eval()
    g = torch.Generator().manual_seed(1)
    cal = list(torch.nn.functional.avg_pool2d(torch.randn(256, 1, 28, 28, generator=g), 3, 1, 1).split(64))
    with torch.no_grad():
        for m in fp.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
    results = {}
    for name, fields in RUNS.items():
        model = copy.deepcopy(fp)
        report = quantize_model(model, cal, QuantConfig(progress=False, **fields))
        results[name] = {"state": model.state_dict(), "bn": report.batchnorm,
                         "errors": [s.error for s in report.layers]}
    torch.save(results, out)


def run_at(revision: str | None, out: Path) -> None:
    """`quantize_all` in a fresh process importing the package from ``revision`` (None: this checkout)."""
    env = None
    with tempfile.TemporaryDirectory() as tmp:
        if revision is not None:
            tree = Path(tmp) / "tree"
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(tree), revision],
                           check=True)
            env = {"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"}
        try:
            subprocess.run([sys.executable, __file__, "--quantize-to", str(out)], check=True, env=env, cwd=tmp)
        finally:
            if revision is not None:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("revision", nargs="?", help="the earlier git revision to compare with")
    parser.add_argument("--out", type=Path, default=RESULTS / "same_results.md")
    parser.add_argument("--quantize-to", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quantize_to is not None:
        quantize_all(args.quantize_to)
        return
    if args.revision is None:
        parser.error("give the earlier revision to compare with")
    with tempfile.TemporaryDirectory() as tmp:
        before, after = Path(tmp) / "before.pt", Path(tmp) / "after.pt"
        run_at(args.revision, before)
        run_at(None, after)
        old, new = torch.load(before, weights_only=False), torch.load(after, weights_only=False)
    rows = []
    for name in RUNS:
        a, b = old[name], new[name]
        identical = a["state"].keys() == b["state"].keys() and all(torch.equal(a["state"][k], b["state"][k])
                                                                    for k in a["state"])
        rows.append([name, "yes" if identical else "NO", "yes" if a["bn"] == b["bn"] else "NO",
                     "yes" if a["errors"] == b["errors"] else "NO", b["bn"]["chosen"], sum(b["errors"])])
    table = markdown_table(["run", "state dict bit-identical", "same BN decision", "same layer errors",
                            "BN chosen", "layer error (sum)"], rows)
    write_markdown(args.out, f"Same results before and after: {args.revision} vs this checkout", command_line(),
                   [("Runs", table)], intro=__doc__.split("\n\n")[0])
    print(table)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
