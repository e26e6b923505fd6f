"""Study-spec validation: a table of malformed specs, each with its expected message."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from dse.samplers import default_sampler
from dse.spec import SAMPLERS, SpecError, load_spec, parse_spec, sample_params

STUDY = '[study]\nname = "s"\nn_trials = 4\n'
OBJ = '[[objectives]]\nmetric = "f1"\n[[objectives]]\nmetric = "f2"\n'
SPACE = '[space.x]\n0 = { type = "float", low = 0.0, high = 1.0 }\n1 = { type = "float", low = 0.0, high = 1.0 }\n'
EVAL = '[[evaluators]]\nname = "zdt1"\noptions = { n_vars = 2 }\n'


def spec(study: str = STUDY, obj: str = OBJ, space: str = SPACE, ev: str = EVAL, extra: str = "") -> str:
    return "\n".join([study, obj, space, ev, extra])


def test_valid_minimal() -> None:
    s = parse_spec(spec())
    assert s.name == "s" and s.n_trials == 4 and s.workers == 2
    assert s.sampler_auto and (s.sampler, s.sampler_options) == default_sampler(2, 4, continuous=True)  # dse/samplers.py: gp
    assert [p.name for p in s.params] == ["x.0", "x.1"]


CASES: list[tuple[str, str]] = [
    # (spec text, expected fragment of the one-line message)
    ("[study\nname=1", "invalid TOML"),
    (spec(study=""), "study: required section missing"),
    (spec(study="[study]\nseed = 1\n"), "study.name: required field missing"),
    (spec(study='[study]\nname = "a b"\n'), "study.name: expected a plain name"),
    (spec(study='[study]\nname = 3\n'), "study.name: expected a string, got 3"),
    (spec(study='[study]\nname = "s"\nseed = -1\n'), "study.seed: expected an integer >= 0, got -1"),
    (spec(study='[study]\nname = "s"\nseed = 1.5\n'), "study.seed: expected an integer, got 1.5"),
    (spec(study='[study]\nname = "s"\nsampler = "cmaes"\n'), "study.sampler: expected one of nsga2, nsga3, tpe, gp, parego, random, qmc, got 'cmaes'"),
    (spec(study='[study]\nname = "s"\nn_trials = 0\n'), "study.n_trials: expected an integer >= 1, got 0"),
    (spec(study='[study]\nname = "s"\ntimeout_s = -5\n'), "study.timeout_s: expected a number > 0, got -5"),
    (spec(study='[study]\nname = "s"\nstorage = 5\n'), "study.storage: expected a string, got 5"),
    (spec(study='[study]\nname = "s"\nn_trail = 5\n'), "study.n_trail: unknown field"),
    (spec(study='[study]\nname = "s"\nsampler = "nsga2"\n[study.sampler_options]\npopsize = 4\n'), "study.sampler_options.popsize: unknown option of the nsga2 sampler"),
    (spec(extra='[[study.enqueue]]\n"x.9" = 0.5\n'), "study.enqueue[0].x.9: expected the name of a parameter in [space]"),
    (spec(extra='[[study.enqueue]]\n"x.0" = 2.0\n'), "study.enqueue[0].x.0: expected a value in the parameter's range/choices, got 2.0"),
    (spec(obj=""), "objectives: required; expected at least one [[objectives]] table"),
    (spec(obj='[[objectives]]\ndirection = "minimize"\n'), "objectives[0].metric: required field missing"),
    (spec(obj='[[objectives]]\nmetric = "f1"\ndirection = "down"\n'), "objectives[0].direction: expected one of minimize, maximize, got 'down'"),
    (spec(obj='[[objectives]]\nmetric = "f1"\n[[objectives]]\nmetric = "f1"\n'), "objectives[1].metric: expected each objective metric once"),
    (spec(obj='[[objectives]]\nmetric = "f1"\nref = "big"\n'), "objectives[0].ref: expected a finite number, got 'big'"),
    (spec(extra='[[constraints]]\nmetric = "f1"\nop = "<"\nbound = 1.0\n'), "constraints[0].op: expected one of <=, >=, got '<'"),
    (spec(extra='[[constraints]]\nmetric = "f1"\nop = "<="\n'), "constraints[0].bound: required field missing"),
    (spec(extra='[[constraints]]\nop = "<="\nbound = 1\n'), "constraints[0].metric: required field missing"),
    (spec(space=""), "space: required section missing"),
    (spec(space="[space.x]\n0 = 5\n"), "space.x.0: expected a table with choices, type (int/float) or value, got 5"),
    (spec(space='[space.x]\n0 = { type = "double", low = 0, high = 1 }\n'), "space.x.0.type: expected 'int' or 'float', got 'double'"),
    (spec(space='[space.x]\n0 = { type = "float", low = 1.0, high = 0.0 }\n'), "space.x.0.high: expected high >= low (1.0), got 0.0"),
    (spec(space='[space.x]\n0 = { type = "float", low = 0.0, high = 1.0, log = true }\n'), "space.x.0.low: expected low > 0 with log = true, got 0.0"),
    (spec(space='[space.x]\n0 = { type = "int", low = 0.5, high = 4 }\n'), "space.x.0.low: expected an integer, got 0.5"),
    (spec(space='[space.x]\n0 = { type = "int", low = 0, high = 10, step = 3 }\n'), "space.x.0.step: expected (high - low) divisible by step 3"),
    (spec(space='[space.x]\n0 = { type = "int", low = 1, high = 9, step = 2, log = true }\n'), "space.x.0.step: not allowed with log = true"),
    (spec(space='[space.x]\n0 = { type = "int", high = 9 }\n'), "space.x.0.low: required for type = 'int'"),
    (spec(space='[space.x]\n0 = { choices = [] }\n'), "space.x.0.choices: expected a non-empty list, got []"),
    (spec(space='[space.x]\n0 = { choices = ["a", "a"] }\n'), "space.x.0.choices: expected distinct values"),
    (spec(space='[space.x]\n0 = { choices = ["a"], type = "int" }\n'), "space.x.0: expected exactly one of choices, type, value, got choices and type"),
    (spec(space='[space.x]\n0 = { choices = ["a"], lo = 1 }\n'), "space.x.0.lo: unknown field"),
    (spec(space='[space.x]\n0 = { value = [1, 2] }\n'), "space.x.0.value: expected a string, number or bool"),
    (spec(space='[space.q]\nw = { choices = ["a", "b"] }\nr = { type = "int", low = 0, high = 4, when = { "q.z" = ["a"] } }\n'), "space.q.r.when.q.z: expected the name of a parameter in [space], got an unknown name"),
    (spec(space='[space.q]\nw = { choices = ["a", "b"] }\nr = { type = "int", low = 0, high = 4, when = { "q.w" = ["c"] } }\n'), "space.q.r.when.q.w: expected values among ['a', 'b'], got ['c']"),
    (spec(space='[space.q]\nw = { type = "float", low = 0.0, high = 1.0 }\nr = { type = "int", low = 0, high = 4, when = { "q.w" = [0.5] } }\n'), "space.q.r.when.q.w: expected a categorical or fixed parameter, got a float one"),
    (spec(space='[space.q]\nw = { choices = ["a"], when = { "q.r" = ["b"] } }\nr = { choices = ["b"], when = { "q.w" = ["a"] } }\n'), "expected no cycle of conditions"),
    (spec(space='[space.q]\nw = { choices = ["a"] }\nr = { choices = ["b"], when = { "q.w" = "a" } }\n'), "space.q.r.when.q.w: expected a non-empty list of values, got 'a'"),
    (spec(ev=""), "evaluators: required; expected at least one [[evaluators]] table"),
    (spec(ev='[[evaluators]]\nname = "nope"\n'), "evaluators[0].name: expected a registered evaluator"),
    (spec(ev='[[evaluators]]\nname = "zdt1"\noptions = { n_vars = 1 }\n'), "evaluators[0].options: zdt1 option n_vars: expected an integer >= 2, got 1"),
    (spec(ev='[[evaluators]]\nname = "zdt1"\noptions = { speed = 1 }\n'), "evaluators[0].options: zdt1 option 'speed' is unknown"),
    (spec(ev='[[evaluators]]\nname = "zdt1"\nresources = { num_cpus = -1 }\n'), "evaluators[0].resources.num_cpus: expected a number >= 0, got -1"),
    (spec(ev='[[evaluators]]\nname = "zdt1"\nresources = { cpus = 1 }\n'), "evaluators[0].resources.cpus: unknown field"),
    (spec(extra='[ray]\nworkers = 0\n'), "ray.workers: expected an integer >= 1, got 0"),
    (spec(extra='[ray]\naddress = 1\n'), "ray.address: expected a string, got 1"),
    (spec(extra='[tracking]\nchild_runs = "some"\n'), "tracking.child_runs: expected one of all, pareto, got 'some'"),
    (spec(extra='[tracking]\nenabled = "yes"\n'), "tracking.enabled: expected true or false, got 'yes'"),
    (spec(extra='[tracking]\nartifact_every = 0\n'), "tracking.artifact_every: expected an integer >= 1, got 0"),
    (spec(extra='[trackng]\nenabled = true\n'), "trackng: unknown field; expected one of: study, objectives"),
]


@pytest.mark.parametrize(("text", "expected"), CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_malformed(text: str, expected: str, tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(SpecError) as exc:
        load_spec(path)
    lines = exc.value.errors
    assert any(expected in line for line in lines), lines
    # every line names the file and is one line
    assert all(line.startswith(f"{path}: ") and "\n" not in line for line in lines)


def test_at_least_thirty_cases() -> None:
    assert len(CASES) >= 30


def test_all_errors_reported_at_once(tmp_path: Path) -> None:
    text = spec(study='[study]\nname = "s"\nseed = -1\nsampler = "x"\n', extra='[ray]\nworkers = 0\n')
    with pytest.raises(SpecError) as exc:
        parse_spec(text, source="f.toml")
    assert len(exc.value.errors) == 3


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="cannot read the file"):
        load_spec(tmp_path / "none.toml")


COND = """
[study]
name = "c"
sampler = "random"
[[objectives]]
metric = "f1"
[space.quant]
weights = { choices = ["mxint4", "fp32"] }
[space.quant.lqer]
rank = { type = "int", low = 0, high = 64, step = 8, when = { "quant.weights" = ["mxint4"] } }
[space.hw]
mlen = { type = "int", low = 256, high = 4096, log = true }
hbm_gbps = { type = "float", low = 400.0, high = 3200.0, log = true }
[space.workload]
model = { value = "llama-3.1-8b" }
[[evaluators]]
name = "zdt1"
"""


def test_conditional_sampling() -> None:
    s = parse_spec(COND, check_options=False)  # sampling only: zdt1 reads none of these
    assert s.sampler == "tpe" or s.sampler == "random"
    study = optuna.create_study(sampler=s.make_sampler())
    seen = {"mxint4": 0, "fp32": 0}
    for _ in range(40):
        t = study.ask()
        p = sample_params(t, s)
        seen[p["quant.weights"]] += 1
        assert ("quant.lqer.rank" in p) == (p["quant.weights"] == "mxint4")
        assert ("quant.lqer.rank" in t.params) == (p["quant.weights"] == "mxint4")
        assert p["workload.model"] == "llama-3.1-8b" and "workload.model" not in t.params
        assert 256 <= p["hw.mlen"] <= 4096 and 400 <= p["hw.hbm_gbps"] <= 3200
        if "quant.lqer.rank" in p:
            assert p["quant.lqer.rank"] % 8 == 0
        study.tell(t, 0.0)
    assert seen["mxint4"] > 0 and seen["fp32"] > 0


def test_condition_order_independent_of_declaration() -> None:
    text = COND.replace(
        '[space.quant]\nweights = { choices = ["mxint4", "fp32"] }\n[space.quant.lqer]\nrank',
        '[space.quant.lqer]\nrank',
    ) + '[space.z]\nweights = { choices = ["mxint4", "fp32"] }\n'
    text = text.replace('"quant.weights" = ["mxint4"]', '"z.weights" = ["mxint4"]')
    s = parse_spec(text, check_options=False)
    names = [p.name for p in s.params]
    assert names.index("z.weights") < names.index("quant.lqer.rank")


@pytest.mark.parametrize("sampler", SAMPLERS)  # every sampler a spec may name
def test_samplers_seeded(sampler: str) -> None:
    s = parse_spec(spec(study=f'[study]\nname = "s"\nsampler = "{sampler}"\nseed = 3\n'))
    runs = []
    for _ in range(2):
        study = optuna.create_study(directions=s.directions, sampler=s.make_sampler())
        pts = []
        for _ in range(3):
            t = study.ask()
            p = sample_params(t, s)
            pts.append(p)
            study.tell(t, [p["x.0"], p["x.1"]])
        runs.append(pts)
    assert runs[0] == runs[1]


def test_examples_validate() -> None:
    root = Path(__file__).resolve().parents[1] / "examples"
    names = sorted(f.name for f in root.glob("*.toml"))
    assert {"zdt1.toml", "quickstart.toml"} <= set(names)
    for name in names:  # raises SpecError on any problem, evaluator options included
        load_spec(root / name)
