"""Users extend dse without forking it: an evaluator from an installed package (entry point
``dse.evaluators``), from a spec name ``"package.module:factory"``, and the Python API."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dse.spec import SpecError, parse_spec

REPO = Path(__file__).resolve().parent.parent

TOY = '''
"""A user's evaluator: a 1-D trade-off, loss = (a - 0.3)^2, cost = a."""
from dse.schema import EvaluatorSchema, Metric, Option, Param, Plugin


class Toy:
    def __init__(self, scale: float) -> None:
        self.scale = scale

    def evaluate(self, params, upstream):
        a = float(params["toy.a"])
        return {"loss": self.scale * (a - 0.3) ** 2, "cost": a}


toy = Plugin(
    EvaluatorSchema(
        "toy", "a user's toy trade-off",
        options=(Option("scale", "float", "loss multiplier", low=0.0, default=1.0),),
        params=(Param("toy.a", "float", "the knob", low=0.0, high=1.0),),
        metrics=(Metric("loss", "(a - 0.3)^2 x scale"), Metric("cost", "= a")),
    ),
    lambda options, ctx: Toy(options["scale"]),
)
'''


def spec_text(evaluator: str, name: str, *, param: str = "a", metric: str = "loss") -> str:
    return textwrap.dedent(f"""
        [study]
        name = "{name}"
        sampler = "random"
        n_trials = 6
        [[objectives]]
        metric = "{metric}"
        [[objectives]]
        metric = "cost"
        [space.toy]
        {param} = {{ type = "float", low = 0.0, high = 1.0 }}
        [[evaluators]]
        name = "{evaluator}"
        options = {{ scale = 2.0 }}
        [ray]
        workers = 1
        [tracking]
        enabled = false
        """)


def test_spec_names_package_module_factory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "toy_user_mod.py").write_text(TOY)
    monkeypatch.syspath_prepend(str(tmp_path))
    s = parse_spec(spec_text("toy_user_mod:toy", "t"))
    assert s.evaluators[0].name == "toy_user_mod:toy"
    with pytest.raises(SpecError) as e:  # the user's schema is enforced like a built-in's
        parse_spec(spec_text("toy_user_mod:toy", "t", param="b", metric="los"))
    assert [ln.split(": ")[1] for ln in e.value.errors] == ["space.toy.b", "objectives[0].metric"]
    with pytest.raises(SpecError, match=r"evaluators\[0\]\.name: expected an importable"):
        parse_spec(spec_text("toy_user_mod:nope", "t"))


@pytest.mark.slow
def test_installed_package_entry_point_runs_a_study(tmp_path: Path) -> None:
    """pip-install a tiny evaluator package (offline) and run studies with it in a fresh
    process: by its entry-point name and by ``module:factory``, through ``dse.run``."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "toy_eval.py").write_text(TOY)
    (pkg / "pyproject.toml").write_text(textwrap.dedent("""
        [build-system]
        requires = ["setuptools>=61"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "dse-toy-eval"
        version = "0.1"
        [tool.setuptools]
        py-modules = ["toy_eval"]
        [project.entry-points."dse.evaluators"]
        toy = "toy_eval:toy"
        """))
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--no-build-isolation", "--no-index", "--target", str(site), str(pkg)],
                   check=True, capture_output=True, cwd=tmp_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(site)])}
    env.pop("DSE_CACHE_DIR", None)
    script = textwrap.dedent(f"""
        import ray, torch
        torch.set_num_threads(1)
        import dse
        from dse import registry
        assert "toy" in registry.names(), registry.names()
        ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
        for ev, name in (("toy", "ep"), ("toy_eval:toy", "path")):
            r = dse.run({spec_text("EV", "NAME")!r}.replace("EV", ev).replace("NAME", name),
                        root={str(tmp_path / "studies")!r}, progress=False)
            best = min(t.user_attrs["metrics"]["loss"] / 2.0 - (t.params["toy.a"] - 0.3) ** 2
                       for t in r.front)
            print(name, r.summary.complete, len(r.front), abs(best) < 1e-12,
                  dse.load(name, root={str(tmp_path / "studies")!r}).study.study_name)
        ray.shutdown()
        """)
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [ln.split() for ln in out.stdout.splitlines()]
    assert [ln[0] for ln in lines] == ["ep", "path"]
    for ln in lines:
        assert ln[1] == "6" and int(ln[2]) >= 1 and ln[3] == "True" and ln[4] in ("ep", "path")
    cli = subprocess.run([sys.executable, "-m", "dse.cli", "evaluators", "toy"], env=env,
                         capture_output=True, text=True, cwd=tmp_path)
    assert cli.returncode == 0 and "toy.a" in cli.stdout and "loss" in cli.stdout
