"""The driver on a real local Ray cluster (one per test session, see conftest.ray_session)."""

from __future__ import annotations

import math
import os
import signal
from collections import Counter
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

from dse import registry
from dse.driver import Driver, open_storage
from dse.pareto import study_hypervolume
from dse.plugins.benchmarks import BenchmarkProblem, study_spec, true_hypervolume
from dse.spec import parse_spec


def zdt_spec(name: str, *, n_trials: int, sampler: str = "tpe", evaluator: str = "zdt1",
             n_vars: int = 2, options: dict[str, Any] | None = None) -> str:
    return study_spec(name, n_trials=n_trials, seed=1, sampler=sampler, problem=evaluator,
                      n_vars=n_vars, options=options, tracking={"enabled": False})


def load(spec_name: str, root: Path) -> optuna.Study:
    return optuna.load_study(study_name=spec_name, storage=open_storage(None, root / spec_name))


@pytest.mark.slow
def test_zdt1_search_reaches_true_front(ray_session: Any, tmp_path: Path) -> None:
    spec = parse_spec(zdt_spec("zdt1", n_trials=250))
    summary = Driver(spec, tmp_path, progress=False).run()
    study = load("zdt1", tmp_path)
    states = Counter(t.state for t in study.trials)
    assert states[TrialState.COMPLETE] == 250 and summary.complete == 250
    assert states[TrialState.FAIL] == 0 and states[TrialState.RUNNING] == 0
    hv = study_hypervolume(study.trials, spec)
    true = true_hypervolume("zdt1", [1.1, 1.1])
    assert hv == pytest.approx(summary.hypervolume)
    assert hv >= 0.9 * true, (hv, true)
    # every trial carries its metrics as a user attribute
    t0 = study.trials[0]
    assert t0.user_attrs["metrics"]["f1"] == pytest.approx(t0.values[0])


# ---- evaluators defined here: the driver ships registered factory objects to the actors


def claim(marker: Path) -> bool:
    """Create ``marker`` atomically: True for exactly one of several actors (exists() then
    write would let two actors racing on their first trials both kill themselves)."""
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


class KillOnce:
    """Kills its own actor process (os.kill, SIGKILL) the first time it sees x.0 >= 0.5."""

    def __init__(self, options: dict[str, Any], ctx: registry.EvalContext) -> None:
        self.inner = BenchmarkProblem("zdt1", {"n_vars": 2})
        self.marker = Path(options["marker"])

    def evaluate(self, params: Any, upstream: Any) -> dict[str, Any]:
        if params["x.0"] >= 0.5 and claim(self.marker):
            os.kill(os.getpid(), signal.SIGKILL)
        return self.inner.evaluate(params, upstream)


class Faulty:
    """Raises for x.0 < 0.2, returns NaN for 0.2 <= x.0 < 0.4, else ZDT1 + an info dict."""

    def __init__(self, options: dict[str, Any], ctx: registry.EvalContext) -> None:
        self.inner = BenchmarkProblem("zdt1", {"n_vars": 2})

    def evaluate(self, params: Any, upstream: Any) -> dict[str, Any]:
        if params["x.0"] < 0.2:
            raise RuntimeError("simulated evaluator crash")
        out: dict[str, Any] = dict(self.inner.evaluate(params, upstream))
        if params["x.0"] < 0.4:
            out["f2"] = math.nan
        out["layers"] = {"a": 0.5}
        return out


class Upstream:
    """Second evaluator: sees the first one's metrics as ``upstream``."""

    def __init__(self, options: dict[str, Any], ctx: registry.EvalContext) -> None:
        pass

    def evaluate(self, params: Any, upstream: Any) -> dict[str, Any]:
        return {"sum_f": upstream["f1"] + upstream["f2"]}


registry.register("test_kill_once", KillOnce)
registry.register("test_faulty", Faulty)
registry.register("test_upstream", Upstream)


@pytest.mark.slow
def test_actor_killed_mid_trial(ray_session: Any, tmp_path: Path) -> None:
    marker = tmp_path / "killed"
    spec = parse_spec(zdt_spec("kill", n_trials=12, sampler="nsga2", evaluator="test_kill_once",
                               options={"marker": str(marker)}))
    spec.evaluators[0].options.pop("n_vars")
    summary = Driver(spec, tmp_path, progress=False).run()
    assert marker.exists(), "the evaluator never killed its actor"
    study = load("kill", tmp_path)
    states = Counter(t.state for t in study.trials)
    assert states[TrialState.COMPLETE] == 12 and summary.complete == 12
    assert states[TrialState.FAIL] == 0
    # the killed trial ran again on a replacement actor and was told once
    rerun = [t for t in study.trials if t.user_attrs.get("attempts") == 2]
    assert len(rerun) == 1 and rerun[0].params["x.0"] >= 0.5
    assert len({t.number for t in study.trials}) == len(study.trials) == 12


@pytest.mark.slow
def test_failures_nan_and_upstream(ray_session: Any, tmp_path: Path) -> None:
    text = zdt_spec("faulty", n_trials=10, sampler="random", evaluator="test_faulty")
    text = text.replace("n_trials = 10", "n_trials = 10\nmax_failed = 100")
    text = text.replace('[ray]', '[[evaluators]]\nname = "test_upstream"\n[[constraints]]\nmetric = "sum_f"\nop = "<="\nbound = 1.5\n[ray]')
    spec = parse_spec(text)
    spec.evaluators[0].options.pop("n_vars")
    Driver(spec, tmp_path, progress=False).run()
    study = load("faulty", tmp_path)
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    failed = [t for t in study.trials if t.state == TrialState.FAIL]
    assert len(done) == 10
    assert failed, "random sampling of 10+ points never hit x.0 < 0.4"
    for t in failed:
        reason = t.user_attrs["fail_reason"]
        if t.params["x.0"] < 0.2:
            assert "RuntimeError: simulated evaluator crash" in reason and "test_faulty" in reason
        else:
            assert reason == "NaN metric(s): f2, sum_f"  # NaN propagates downstream
    for t in done:
        m = t.user_attrs["metrics"]
        assert m["sum_f"] == pytest.approx(m["f1"] + m["f2"])
        assert t.user_attrs["info"] == {"layers": {"a": 0.5}}
        assert t.constraints["sum_f_le_1.5"] == pytest.approx(m["sum_f"] - 1.5)


@pytest.mark.slow
def test_enqueue_and_resume_of_stale_running(ray_session: Any, tmp_path: Path) -> None:
    text = zdt_spec("stale", n_trials=6, sampler="nsga2")
    text = text.replace("[[objectives]]", '[[study.enqueue]]\n"x.0" = 0.25\n"x.1" = 0.0\n[[objectives]]', 1)
    spec = parse_spec(text)
    # a dead driver left two trials RUNNING and one COMPLETE
    sdir = tmp_path / "stale"
    from dse.driver import open_study

    study = open_study(spec, sdir)
    for _ in range(2):
        t = study.ask({"x.0": optuna.distributions.FloatDistribution(0, 1),
                       "x.1": optuna.distributions.FloatDistribution(0, 1)})
        assert t.params
    t = study.ask()
    t.suggest_float("x.0", 0, 1)
    t.suggest_float("x.1", 0, 1)
    study.tell(t, [0.5, 0.5])
    stale = [t.number for t in study.get_trials(states=(TrialState.RUNNING,))]
    summary = Driver(spec, tmp_path, progress=False).run()
    assert sorted(summary.recovered) == sorted(stale)
    study = load("stale", tmp_path)
    states = Counter(t.state for t in study.trials)
    assert states[TrialState.COMPLETE] == 6 and states[TrialState.RUNNING] == 0
    assert states[TrialState.FAIL] == 0
    for n in stale:  # run again as themselves: same numbers, same parameters
        assert study.trials[n].state == TrialState.COMPLETE
        assert not any(t.user_attrs.get("dse:retry_of") == n for t in study.trials)
    base = [t for t in study.trials if t.user_attrs.get("dse:baseline")]
    assert len(base) == 1 and base[0].params == {"x.0": 0.25, "x.1": 0.0}
    # running again on the finished study adds nothing and does not re-enqueue the baseline
    Driver(spec, tmp_path, progress=False).run()
    assert len(load("stale", tmp_path).trials) == len(study.trials)


class BrokenFactory:
    """A factory that cannot build its evaluator (a missing model file, say)."""

    def __init__(self, options: dict[str, Any], ctx: registry.EvalContext) -> None:
        raise FileNotFoundError("model weights /nowhere/model.bin missing")


registry.register("test_broken", BrokenFactory)


@pytest.mark.slow
def test_evaluator_that_cannot_start_stops_the_run(ray_session: Any, tmp_path: Path) -> None:
    from dse.driver import DriverError

    spec = parse_spec(zdt_spec("broken", n_trials=4, evaluator="test_broken"))
    with pytest.raises(DriverError, match="FileNotFoundError: model weights /nowhere/model.bin missing"):
        Driver(spec, tmp_path, progress=False).run()
    assert len(load("broken", tmp_path).trials) == 0


@pytest.mark.slow
def test_mlflow_gets_a_trial_only_once_it_is_on_disk(
    ray_session: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The journal is the source of truth: the tracker (MLflow) must never hear of a trial
    whose record is still in the driver's write buffer, or a SIGKILL in between leaves a
    child run for a trial that `resume` fails and re-runs (the cause of a flaky
    test_sigkilled_driver_then_resume). Each handed-over trial is read back from the file
    by a separate reader at that moment."""
    from tracking.mlflow_tracker import Tracker

    spec = parse_spec(study_spec("durable", n_trials=8, seed=1, sampler="random",
                                 options={"delay_s": 0.05}, tracking={"artifact_every": 50}))
    seen: list[tuple[int, TrialState, TrialState | None]] = []
    handed_over = Tracker.trials_finished

    def on_disk_then_track(self: Tracker, trials: list[optuna.trial.FrozenTrial]) -> None:
        disk = {ft.number: ft.state for ft in load("durable", tmp_path).get_trials(deepcopy=False)}
        seen.extend((t.number, t.state, disk.get(t.number)) for t in trials)
        handed_over(self, trials)

    monkeypatch.setattr(Tracker, "trials_finished", on_disk_then_track)
    Driver(spec, tmp_path, progress=False).run()
    assert len(seen) == 8 and {n for n, _, _ in seen} == set(range(8))
    assert [(n, s) for n, s, disk in seen if disk != s] == []
