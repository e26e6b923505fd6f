"""One pool per evaluator: the spec fields, where each evaluator runs (driver process or
its own Ray actors), per-evaluator resources reaching Ray, the order of stages and
``upstream``, and a cheap study that never starts Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

from dse import registry
from dse.cli import main
from dse.driver import Driver
from dse.plugins.benchmarks import study_spec
from dse.spec import SpecError, parse_spec
from dse.storage import open_storage

ROOT = Path(__file__).resolve().parents[1]


def two_stage(extra: str = "", first: str = "", address: str = "") -> str:
    """A zdt1 study with a second evaluator table ``extra`` and lines added to the first."""
    text = study_spec("p", n_trials=6, seed=0, sampler="random", tracking={"enabled": False})
    text = text.replace("options = { n_vars = 2 }\n", f"options = {{ n_vars = 2 }}\n{first}", 1)
    if address:
        text = text.replace("[ray]\n", f'[ray]\naddress = "{address}"\n', 1)
    return text.replace("[ray]\n", f"{extra}[ray]\n", 1)


# ---- spec fields: one line naming the field


@pytest.mark.parametrize(("first", "fragment"), [
    ("workers = 0\n", "evaluators[0].workers: expected an integer >= 1, got 0"),
    ("workers = 1.5\n", "evaluators[0].workers: expected an integer"),
    ('inline = "yes"\n', "evaluators[0].inline: expected true or false"),
    ("inline = true\nworkers = 2\n", "evaluators[0].inline: expected no workers with inline = true"),
    ("inline = true\nresources = { num_cpus = 2 }\n", "evaluators[0].inline: expected no resources"),
    ("resources = { custom = { CPU = 1 } }\n", "evaluators[0].resources.custom.CPU: expected the name of a custom"),
    ("resources = { custom = { tpu_host = 0 } }\n", "evaluators[0].resources.custom.tpu_host: expected a number > 0"),
    ("resources = { custom = 3 }\n", "evaluators[0].resources.custom: expected a table"),
    ('resources = { accelerator_type = "" }\n', "evaluators[0].resources.accelerator_type: expected a Ray accelerator"),
    ('resources = { accelerator_type = 7 }\n', "evaluators[0].resources.accelerator_type: expected a string"),
    ("resources = { num_gpu = 1 }\n", "evaluators[0].resources.num_gpu: unknown field"),
])
def test_pool_fields_are_checked(first: str, fragment: str) -> None:
    with pytest.raises(SpecError) as e:
        parse_spec(two_stage(first=first))
    lines = str(e.value).splitlines()
    assert len(lines) == 1 and fragment in lines[0], lines


def test_pool_fields_parse_into_ray_options() -> None:
    spec = parse_spec(two_stage(first='workers = 3\nresources = { num_cpus = 2, num_gpus = 0.5, '
                                      'memory = 1e9, accelerator_type = "A100", custom = { tpu_host = 1 } }\n'))
    e = spec.evaluators[0]
    assert e.workers == 3 and e.inline is None
    assert e.actor_resources() == {"num_cpus": 2.0, "num_gpus": 0.5, "memory": 1e9,
                                   "resources": {"tpu_host": 1.0}, "accelerator_type": "A100"}


# ---- where each evaluator runs


PLENA = '[[evaluators]]\nname = "plena"\n'


@pytest.mark.parametrize(("first", "extra", "address", "inline"), [
    ("", "", "", [True]),  # a benchmark problem is cheap
    ("", "", "auto", [False]),  # ... unless the user asks for a cluster
    ("inline = true\n", "", "auto", [True]),  # ... and does not keep it here
    ("inline = false\n", "", "", [False]),
    ("resources = { num_cpus = 1 }\n", "", "", [False]),  # resources are for actors
    ("workers = 3\n", "", "", [False]),
    ("", "", "inline", [True]),
])
def test_cheap_evaluators_run_in_the_driver(first: str, extra: str, address: str, inline: list[bool]) -> None:
    assert Driver(parse_spec(two_stage(extra, first, address)), "unused")._inline() == inline


def test_cheapness_follows_the_options_and_the_kind() -> None:
    slow = parse_spec(two_stage(first="").replace("n_vars = 2 }", "n_vars = 2, delay_s = 0.5 }"))
    assert Driver(slow, "unused")._inline() == [False]  # a zdt1 told to sleep needs workers
    registry.register("test_plain_factory", Stage)  # a plain factory: no schema, not cheap
    mixed = parse_spec(two_stage('[[evaluators]]\nname = "test_plain_factory"\n', address="auto"))
    assert Driver(mixed, "unused")._inline() == [True, False]


# ---- per-evaluator pools on the session's Ray cluster (it has 2 of the custom resource
# `dse_test_pool`; see conftest.ray_session)


class Stage:
    """Reports where it ran: its pid, the resources Ray assigned to it, what it saw upstream."""

    def __init__(self, options: dict[str, Any], ctx: registry.EvalContext) -> None:
        self.tag = str(options.get("tag", "s"))

    def evaluate(self, params: Any, upstream: Any) -> dict[str, Any]:
        import ray

        in_actor = ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None
        assigned = ray.get_runtime_context().get_assigned_resources() if in_actor else {}
        return {f"{self.tag}_pid": os.getpid(), f"{self.tag}_assigned": json.dumps(assigned, sort_keys=True),
                f"{self.tag}_saw": ",".join(sorted(upstream)),
                f"{self.tag}_sum": float(sum(v for k, v in upstream.items() if k in ("f1", "f2")))}


registry.register("test_stage", Stage)


@pytest.mark.slow
def test_each_evaluator_gets_its_own_pool_and_resources(ray_session: Any, tmp_path: Path) -> None:
    """zdt1 (cheap: the driver) -> a (2 actors, 1 CPU) -> b (1 actor, 0.5 CPU and a custom
    resource only it asks for) -> c (inline = true: the driver again). Every trial passes
    through all four in spec order, each seeing the earlier ones' outputs."""
    extra = ('[[evaluators]]\nname = "test_stage"\noptions = { tag = "a" }\nworkers = 2\n'
             '[[evaluators]]\nname = "test_stage"\noptions = { tag = "b" }\nworkers = 1\n'
             'resources = { num_cpus = 0.5, custom = { dse_test_pool = 1 } }\n'
             '[[evaluators]]\nname = "test_stage"\noptions = { tag = "c" }\ninline = true\n')
    text = two_stage(extra).replace("n_trials = 6", "n_trials = 12")
    spec = parse_spec(text)
    summary = Driver(spec, tmp_path, progress=False).run()
    trials = optuna.load_study(study_name="p", storage=open_storage(None, tmp_path / "p")).trials
    assert summary.complete == 12 and Counter(t.state for t in trials) == {TrialState.COMPLETE: 12}
    m = [t.user_attrs["metrics"] for t in trials]
    info = [t.user_attrs["info"] for t in trials]
    a_pids, b_pids = {x["a_pid"] for x in m}, {x["b_pid"] for x in m}
    assert len(a_pids) <= 2 and len(b_pids) == 1 and not a_pids & b_pids
    assert os.getpid() not in a_pids | b_pids and {x["c_pid"] for x in m} == {os.getpid()}
    assert {i["a_assigned"] for i in info} == {'{"CPU": 1.0}'}
    assert {i["b_assigned"] for i in info} == {'{"CPU": 0.5, "dse_test_pool": 1.0}'}
    assert {i["c_assigned"] for i in info} == {"{}"}
    # the order: each stage saw exactly the outputs of the stages before it
    assert {i["a_saw"] for i in info} == {"f1,f2"}
    assert {i["b_saw"] for i in info} == {"a_assigned,a_pid,a_saw,a_sum,f1,f2"}
    assert all(x["a_sum"] == x["b_sum"] == x["c_sum"] == pytest.approx(x["f1"] + x["f2"]) for x in m)


@pytest.mark.slow
def test_a_request_the_cluster_cannot_meet_is_reported(ray_session: Any, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """A GPU evaluator on a cluster without GPUs, behind a cheap one: one line naming its
    demand and what the cluster has, exit 1, nothing left RUNNING."""
    extra = ('[[evaluators]]\nname = "test_stage"\nresources = { num_gpus = 1 }\n')
    text = two_stage(extra).replace("[ray]\n", "[ray]\nplace_timeout_s = 2\n")
    spec = tmp_path / "gpu.toml"
    spec.write_text(text)
    root = tmp_path / "studies"
    assert main(["run", str(spec), "--dir", str(root), "--progress", "log"]) == 1
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("dse run:")]
    assert len(err) == 1, err
    assert "no evaluator actor alive (2 could not be placed" in err[0]
    assert "num_gpus=1" in err[0] and "GPU=0" in err[0]
    trials = optuna.load_study(study_name="p", storage=open_storage(None, root / "p")).trials
    assert not [t for t in trials if t.state == TrialState.RUNNING]


# ---- a cheap study never starts Ray


CHEAP_RUN = """
import json, sys
from dse.cli import main
rc = main(sys.argv[1:])
print(json.dumps({"rc": rc, "ray_imported": "ray" in sys.modules, "torch_imported": "torch" in sys.modules}))
"""


@pytest.mark.slow
def test_a_cheap_study_starts_no_ray(tmp_path: Path) -> None:
    """plena + gpu + tpu baselines (all cheap): the whole run in one process that never
    even imports Ray (so no raylet, no GCS) nor torch; with --address it would join a
    cluster."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", CHEAP_RUN, "run", str(ROOT / "examples" / "plena_vs_baselines.toml"),
         "--dir", str(tmp_path), "--n-trials", "30", "--no-tracking", "--progress", "log"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == {"rc": 0, "ray_imported": False, "torch_imported": False}
    trials = optuna.load_study(study_name="plena_vs_baselines",
                               storage=open_storage(None, tmp_path / "plena_vs_baselines")).trials
    assert Counter(t.state for t in trials)[TrialState.COMPLETE] == 30


@pytest.mark.slow
def test_a_local_cluster_stops_at_once_on_what_it_cannot_hold(tmp_path: Path) -> None:
    """The local cluster dse starts has no custom resources and cannot grow: an evaluator
    asking for one stops the run with one line at once (place_timeout_s = 600 is not waited
    for: the command would outlive the subprocess timeout), exit 1."""
    text = two_stage(first="resources = { custom = { dse_test_absent = 1 } }\n")
    spec = tmp_path / "absent.toml"
    spec.write_text(text.replace("[ray]\n", "[ray]\nplace_timeout_s = 600\n"))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "dse.cli", "run", str(spec), "--dir", str(tmp_path / "s"), "--progress", "log"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    err = [ln for ln in proc.stderr.splitlines() if ln.startswith("dse run:")]
    assert len(err) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "no evaluator actor can be placed: each actor asks for num_cpus=1, dse_test_absent=1" in err[0]
    assert "dse_test_absent=0 in total, and a local cluster does not grow" in err[0]
