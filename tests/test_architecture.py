"""The package layout holds: imports run one way (core <- model <- export <- integrations <- demo <- cli), the
library runs with torch alone, and a missing extra fails with an error that names it."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lightning_obq.extras import EXTRAS

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "lightning_obq"

LAYERS = ["core", "model", "export", "integrations", "demo", "cli"]
"""Subpackages from the bottom up: each may import itself and those before it, never one after it."""

OPTIONAL = ("lightning", "lightning_utilities", "torchmetrics", "ultralytics", "wandb", "matplotlib", "torchvision",
            "onnx", "onnxruntime", "jsonargparse")
"""Top-level modules the torch-only part of the package must not import."""


def _imported_modules(path: Path) -> set[str]:
    """Every ``lightning_obq...`` module named by an import in ``path`` (relative imports resolved)."""
    module = ".".join(path.relative_to(REPO).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    package = package.removesuffix(".__init__")
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.add(name)
            found.update(f"{name}.{alias.name}" for alias in node.names)
    return {m for m in found if m == "lightning_obq" or m.startswith("lightning_obq.")}


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


@pytest.mark.parametrize("layer", LAYERS)
def test_imports_run_one_way(layer: str) -> None:
    allowed = set(LAYERS[: LAYERS.index(layer) + 1])
    wrong = []
    files = sorted((PACKAGE / layer).rglob("*.py"))
    assert files, f"no modules in lightning_obq/{layer}"
    for path in files:
        for name in _imported_modules(path):
            target = _layer(name)
            if name == "lightning_obq" or (target is not None and target not in allowed):
                wrong.append(f"{path.relative_to(REPO)} imports {name}")
    assert not wrong, "\n".join(wrong)


def test_the_import_parser_sees_relative_and_absolute_imports(tmp_path: Path) -> None:
    """The check above would pass vacuously if the parser missed imports: it does not."""
    path = PACKAGE / "core" / "layer.py"
    names = _imported_modules(path)
    assert "lightning_obq.core.config" in names and "lightning_obq.core.solvers" in names
    assert _imported_modules(PACKAGE / "integrations" / "lightning" / "callback.py") >= {
        "lightning_obq.model.quantize", "lightning_obq.core.config"}


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          cwd=REPO, timeout=600)


def test_library_imports_and_quantizes_with_torch_alone() -> None:
    """``import lightning_obq`` and `quantize_model` (with export) pull in no optional package."""
    proc = _python(f"""
        import sys
        import torch
        import lightning_obq
        import lightning_obq.core.layer, lightning_obq.model.quantize, lightning_obq.model.fidelity
        import lightning_obq.export.artifact, lightning_obq.integrations.wandb
        from lightning_obq import QuantConfig, quantize_model, save_quantized
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                    torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 4))
        report = quantize_model(model, [torch.randn(16, 3, 8, 8) for _ in range(4)], QuantConfig(bits=4))
        assert len(report.layers) == 2 and report.batchnorm["chosen"] in ("keep", "correct", "reestimate")
        loaded = sorted(m for m in {OPTIONAL!r} if m in sys.modules)
        assert not loaded, loaded
        print("ok")
    """)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


@pytest.mark.parametrize(
    ("extra", "blocked", "statement"),
    [
        ("lightning", "lightning", "from lightning_obq import OBQCallback"),
        ("lightning", "torchmetrics", "import lightning_obq.integrations.lightning"),
        ("ultralytics", "ultralytics", "import lightning_obq.integrations.ultralytics"),
        ("wandb", "wandb", "from lightning_obq.integrations.wandb import start_run; start_run('p', 'n', '.')"),
        ("onnx", "onnx", "from lightning_obq.export.onnx import export_onnx"),
        ("demo", "matplotlib", "import lightning_obq.demo"),
        ("demo", "torchvision", "from lightning_obq.cli import main; print(main([]))"),
    ],
)
def test_a_missing_extra_names_it(extra: str, blocked: str, statement: str) -> None:
    """``sys.modules[name] = None`` is how Python marks a module as not importable: the package then behaves
    as in an environment without it (the bare-venv check in the CHANGELOG does it for real)."""
    proc = _python(f"""
        import sys
        sys.modules[{blocked!r}] = None
        try:
            {statement}
        except ImportError as exc:
            print(exc)
        else:
            print("no error")
    """)
    assert proc.returncode == 0, proc.stderr
    said = proc.stdout + proc.stderr  # the command prints its one-line error on stderr (and returns 2)
    assert f"pip install 'lightning-obq[{extra}]'" in said and blocked in said, said


def test_pyproject_extras_install_what_the_package_checks() -> None:
    """Every import name `require_extra` checks for an extra is a requirement of that extra in pyproject.toml
    (directly or through another extra it includes), and ``[all]`` / ``[dev]`` cover every extra."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]

    def requirements(name: str) -> set[str]:
        out: set[str] = set()
        for req in extras[name]:
            dist = req.split(">")[0].split("<")[0].split("=")[0].split("[")[0].strip()
            if dist == "lightning-obq":
                for included in req.split("[", 1)[1].split("]", 1)[0].split(","):
                    out |= requirements(included.strip())
            else:
                out.add(dist)
        return out

    for extra, modules in EXTRAS.items():
        assert set(modules) <= requirements(extra), extra
    everything = set().union(*(requirements(e) for e in EXTRAS))
    assert everything <= requirements("all") <= requirements("dev")
    core = {r.split(">")[0].split("<")[0].split("=")[0].strip() for r in project["dependencies"]}
    assert not core & set(OPTIONAL), core & set(OPTIONAL)


@pytest.mark.parametrize("argv", [["-m", "lightning_obq", "--help"], ["-m", "lightning_obq", "quantize", "--help"]])
def test_python_m_runs_the_command(argv: list[str]) -> None:
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "lightning-obq" in proc.stdout


def test_no_module_is_over_about_400_lines() -> None:
    long = {str(p.relative_to(REPO)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 420}
    assert not long, long
