"""The arrows between packages point one way (read from the source with ``ast``).

``dse`` composes ``tracking`` and the libraries; ``tracking`` never imports ``dse``; the
libraries (``quant``, ``evaluators``, ``simulators``) import neither ``dse`` nor ``tracking``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "tracking": {"dse"},
    "quant": {"dse", "tracking"},
    "evaluators": {"dse", "tracking"},
    "simulators": {"dse", "tracking"},
}


def imported_packages(path: Path, package: str) -> set[tuple[int, str]]:
    """(line, top-level package) of every import in ``path``, static or ``import_module``,
    TYPE_CHECKING blocks and function bodies included; relative imports resolve to
    ``package``."""
    out: set[tuple[int, str]] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            out.update((node.lineno, a.name.split(".")[0]) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            top = package if node.level else (node.module or "").split(".")[0]
            out.add((node.lineno, top))
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", "")) in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            out.add((node.lineno, node.args[0].value.split(".")[0]))
    return out


def test_finds_imports(tmp_path: Path) -> None:
    """The reader sees every form of import (so the arrow test can fail)."""
    f = tmp_path / "m.py"
    f.write_text(
        "import dse.spec\nfrom tracking import x\nfrom . import y\n"
        "def f():\n    import importlib\n    importlib.import_module('dse.pareto')\n"
    )
    assert {p for _, p in imported_packages(f, "quant")} == {"dse", "tracking", "quant", "importlib"}


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_import_direction(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no Python files under {package}/"
    bad = [
        f"{f.relative_to(ROOT)}:{line}: imports {top}"
        for f in files
        for line, top in sorted(imported_packages(f, package))
        if top in FORBIDDEN[package]
    ]
    assert not bad, "\n".join(bad)


def test_quant_public_names() -> None:
    """``quant``'s public names (its TYPE_CHECKING imports, read once) resolve lazily to the
    objects of the modules named there, and importing a submodule named like one of them
    (``quant.finetune``) does not replace the name."""
    import importlib

    import quant

    assert {"QuantConfig", "as_format", "get_format", "finetune", "FAMILIES"} <= set(quant.__all__)
    for name in quant.__all__:
        module = importlib.import_module(quant._MODULES[name])
        assert getattr(quant, name) is getattr(module, name), name
    importlib.import_module("quant.finetune")
    assert callable(quant.finetune)
    assert set(quant.__all__) <= set(dir(quant))


CHEAP_PATH = """
import json, sys
from pathlib import Path
from dse.cli import main
from dse.spec import load_spec
import dse.plugins.plena, dse.plugins.benchmarks, simulators.baselines, quant.desc
import dse.plugins.dataflow, quant.config, quant
assert quant.multiplier_cost("mxint4", "mxint8") > 0  # quant.desc's, torch-free
spec = load_spec(Path(sys.argv[1]))        # validates every format name (quant.desc)
rc = main(["run", sys.argv[1], "--dir", sys.argv[2], "--n-trials", "2", "--no-tracking",
           "--progress", "log"])
print(json.dumps({"rc": rc, "torch": "torch" in sys.modules, "ray": "ray" in sys.modules}))
"""


PLENA_SPEC = """
[study]
name = "p"
[[objectives]]
metric = "tokens_per_s"
direction = "maximize"
[space.quant]
weights = { choices = ["mxint4", "int4(asym,group=128)", "bf16"] }
kv = { choices = ["mxint8", "fp8_e4m3"] }
[[evaluators]]
name = "plena"
"""

# the dataflow simulator reads the candidate's formats and densities through
# quant.QuantConfig / quant.SparsityConfig (quant.config: format descriptions, no torch)
DATAFLOW_SPEC = """
[study]
name = "d"
[[objectives]]
metric = "images_per_s_per_dsp"
direction = "maximize"
[space.quant]
weights = { choices = ["int8", "int4"] }
acts = { value = "int8" }
[space.sparsity]
density = { type = "float", low = 0.3, high = 1.0 }
[[evaluators]]
name = "dataflow"
options = { network = "mobilenetv3_small", device = "u250" }
"""


@pytest.mark.parametrize("spec_text", [PLENA_SPEC, DATAFLOW_SPEC], ids=["plena", "dataflow"])
def test_a_simulator_only_study_never_imports_torch(tmp_path: Path, spec_text: str) -> None:
    """The cheap path (the CLI, spec validation with format names, the PLENA simulator and
    its baselines or the dataflow simulator, a 2-trial run) in a fresh interpreter: torch
    (2.5 s to import) and Ray are never imported; format descriptions come from quant.desc."""
    import json
    import os
    import subprocess
    import sys

    spec = tmp_path / "p.toml"
    spec.write_text(spec_text)
    proc = subprocess.run([sys.executable, "-c", CHEAP_PATH, str(spec), str(tmp_path / "s")],
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"rc": 0, "torch": False,
                                                                 "ray": False}
