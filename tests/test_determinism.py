"""The same seed gives the same study; no parameter set is evaluated twice; a run
continues as it was started (issue 11 items 2, 3, 5; docs/driver.md "What is reproducible").
"""

from __future__ import annotations

import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import FrozenTrial, TrialState

from dse import registry
from dse.driver import DUPLICATE_ATTR, Driver, open_storage
from dse.pareto import params_key, pareto_trials
from dse.plugins.benchmarks import BenchmarkProblem, study_spec
from dse.spec import parse_spec
from tests.kills import sigkill_when


class Jittery:
    """ZDT1 that sleeps a random 0-60 ms first (from the OS's entropy, not any seed), so
    trials finish in a different order on every run."""

    def __init__(self, options: dict[str, Any], ctx: registry.EvalContext) -> None:
        self.inner = BenchmarkProblem("zdt1", {"n_vars": 2})
        self.rng = random.SystemRandom()

    def evaluate(self, params: Any, upstream: Any) -> dict[str, Any]:
        time.sleep(self.rng.uniform(0.0, 0.06))
        return self.inner.evaluate(params, upstream)


registry.register("test_jittery", Jittery)


def _spec(name: str, *, n_trials: int, sampler: str, workers: int, problem: str = "zdt1",
          seed: int = 3, options: dict[str, Any] | None = None) -> str:
    opts = {"n_startup_trials": 4} if sampler in ("tpe", "parego") else {"population_size": 4}
    return study_spec(name, n_trials=n_trials, sampler=sampler, seed=seed, workers=workers,
                      problem=problem, sampler_options=opts if sampler != "random" else None,
                      options=options, tracking={"enabled": False})


def _trials(root: Path, name: str) -> list[FrozenTrial]:
    return optuna.load_study(study_name=name, storage=open_storage(None, root / name)).trials


def _sequence(trials: list[FrozenTrial]) -> list[tuple[int, str, str]]:
    """What a study proposed, in order: (number, state, parameters)."""
    return [(t.number, t.state.name, params_key(t)) for t in trials]


# ----------------------------------------------------------------------------- same seed


def test_inline_runs_repeat(tmp_path: Path) -> None:
    """Inline (no Ray): two runs per worker count give the same study; one trial is
    evaluated at a time whatever ``workers`` says, so the sampler sees every result."""
    seqs: dict[int, list[Any]] = {}
    for workers in (1, 2):
        runs = []
        for i in range(2):
            name = f"w{workers}r{i}"
            spec = parse_spec(_spec(name, n_trials=10, sampler="tpe", workers=workers))
            Driver(spec, tmp_path, address="inline", progress=False).run()
            runs.append(_sequence(_trials(tmp_path, name)))
        assert runs[0] == runs[1]
        assert Counter(s for _, s, _ in runs[0]) == {"COMPLETE": 10}
        seqs[workers] = runs[0]
    assert seqs[1] == seqs[2]


@pytest.mark.slow
@pytest.mark.parametrize(("sampler", "workers"), [("tpe", 1), ("tpe", 2), ("nsga2", 2)])
def test_ray_runs_with_random_durations_repeat(ray_session: Any, tmp_path: Path, sampler: str,
                                               workers: int) -> None:
    """Ray actors, evaluation times random: the finishing order differs between runs, the
    proposed parameters do not; with one worker the inline pool agrees, with two the
    sampler sees one told trial fewer at each ask, so the study differs (after TPE's
    random start-up)."""
    seqs = []
    for i in range(2):
        name = f"r{i}"
        spec = parse_spec(_spec(name, n_trials=16, sampler=sampler, workers=workers, problem="test_jittery"))
        Driver(spec, tmp_path, progress=False).run()
        trials = _trials(tmp_path, name)
        seqs.append(_sequence(trials))
    assert seqs[0] == seqs[1]
    assert Counter(s for _, s, _ in seqs[0]) == {"COMPLETE": 16}
    spec = parse_spec(_spec("inline", n_trials=16, sampler=sampler, workers=workers, problem="test_jittery"))
    Driver(spec, tmp_path, address="inline", progress=False).run()
    inline = _sequence(_trials(tmp_path, "inline"))
    assert inline[:4] == seqs[0][:4]
    assert (inline == seqs[0]) == (workers == 1)


def test_throughput_mode_still_completes(tmp_path: Path) -> None:
    spec = parse_spec(_spec("fast", n_trials=8, sampler="tpe", workers=2).replace(
        "[study]\n", "[study]\ndeterministic = false\n", 1))
    assert not spec.deterministic
    summary = Driver(spec, tmp_path, address="inline", progress=False).run()
    assert summary.complete == 8 and summary.failed == 0


# ----------------------------------------------------------------------------- kill + resume


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["tpe", "nsga2", "parego"])
def test_sigkill_and_resume_give_the_uninterrupted_study(tmp_path: Path, sampler: str) -> None:
    """A driver SIGKILLed twice mid-run, then resumed: the same trials, numbers, parameters
    and values as a run never interrupted (the trials left RUNNING run again as themselves)."""
    n = 16 if sampler == "parego" else 24  # ParEGO's asks cost ~0.1 s each here
    text = _spec("k", n_trials=n, sampler=sampler, workers=2, options={"delay_s": 0.05})
    text = text.replace("[ray]\n", '[ray]\naddress = "inline"\n', 1)
    spec_path = tmp_path / "k.toml"
    spec_path.write_text(text)
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    sigkill_when(["run", str(spec_path)], killed, "k", 6)
    sigkill_when(["resume", "k"], killed, "k", 14)
    from dse.cli import main

    assert main(["resume", "k", "--dir", str(killed), "--progress", "log"]) == 0
    Driver(parse_spec(text), clean, progress=False).run()
    got, want = _trials(killed, "k"), _trials(clean, "k")
    assert _sequence(got) == _sequence(want)
    assert [t.values for t in got] == [t.values for t in want]
    assert Counter(t.state for t in got) == {TrialState.COMPLETE: n}


# ----------------------------------------------------------------------------- no trial twice


class Counting:
    """ZDT1 that counts its evaluations (inline: the driver's process)."""

    calls: list[dict[str, Any]] = []

    def __init__(self, options: dict[str, Any], ctx: registry.EvalContext) -> None:
        self.inner = BenchmarkProblem("zdt1", {"n_vars": 2})

    def evaluate(self, params: Any, upstream: Any) -> dict[str, Any]:
        Counting.calls.append(dict(params))
        return self.inner.evaluate(params, upstream)


registry.register("test_counting", Counting)


def test_a_parameter_set_is_evaluated_once(tmp_path: Path) -> None:
    """A 3 x 3 grid, 20 trials: each set is evaluated once; the repeats are answered from
    the study, attributed to the first trial, and the front lists each set once."""
    text = study_spec("dup", n_trials=20, sampler="random", seed=1, problem="test_counting",
                      tracking={"enabled": False})
    text = text.replace('type = "float", low = 0.0, high = 1.0', "choices = [0.0, 0.5, 1.0]")
    spec = parse_spec(text)
    Counting.calls = []
    summary = Driver(spec, tmp_path, address="inline", progress=False).run()
    trials = _trials(tmp_path, "dup")
    assert Counter(t.state for t in trials) == {TrialState.COMPLETE: 20}
    keys = [params_key(t) for t in trials]
    assert len(Counting.calls) == len(set(keys)) < 20  # every set once, and there were repeats
    assert summary.duplicates == 20 - len(set(keys))
    first: dict[str, FrozenTrial] = {}
    for t, k in zip(trials, keys, strict=True):
        if k not in first:
            first[k] = t
            assert DUPLICATE_ATTR not in t.user_attrs
        else:
            assert t.user_attrs[DUPLICATE_ATTR] == first[k].number
            assert t.values == first[k].values and t.user_attrs["metrics"] == first[k].user_attrs["metrics"]
    front = pareto_trials(trials, spec)
    assert len({params_key(t) for t in front}) == len(front) > 0
    assert all(DUPLICATE_ATTR not in t.user_attrs for t in front)
    # running on adds trials, and still evaluates no set twice
    Counting.calls = []
    Driver(spec, tmp_path, n_trials=30, address="inline", progress=False).run()
    more = _trials(tmp_path, "dup")[20:]
    assert len(Counting.calls) == len({params_key(t) for t in more} - set(keys))


def test_front_of_an_older_study_lists_each_set_once(tmp_path: Path) -> None:
    """A study whose duplicates were evaluated twice (before this rule): one front entry each."""
    spec = parse_spec(study_spec("old", n_trials=4, tracking={"enabled": False}))
    study = optuna.create_study(directions=["minimize", "minimize"])
    for x in (0.1, 0.9, 0.1):
        study.enqueue_trial({"x.0": x, "x.1": 0.0})
        t = study.ask()
        t.suggest_float("x.0", 0, 1)
        t.suggest_float("x.1", 0, 1)
        study.tell(t, [x, 1 - x])
    front = pareto_trials(study.trials, spec)
    assert [t.number for t in front] == [0, 1]


@pytest.mark.parametrize("sampler", ["random", "tpe", "nsga2", "nsga3"])
def test_reseeded_sampler_draws_as_a_fresh_one(sampler: str) -> None:
    """``Spec.sampler_for`` re-seeds the driver's sampler in place for speed: the draws are
    those of a fresh ``make_sampler(n)`` at every ask (trials told two asks late, so the
    samplers' search-space caches see RUNNING trials)."""
    text = _spec("s", n_trials=40, sampler=sampler, workers=2)
    spec = parse_spec(text)
    draws: list[list[Any]] = []
    for reuse in (False, True):
        study = optuna.create_study(directions=["minimize", "minimize"], sampler=spec.make_sampler())
        out, untold = [], []
        for n in range(30):
            study.sampler = spec.sampler_for(n, study.sampler if reuse else None)
            t = study.ask()
            x = (t.suggest_float("x.0", 0.0, 1.0), t.suggest_float("x.1", 0.0, 1.0))
            out.append(x)
            untold.append((t, x))
            if len(untold) == 2:
                t0, x0 = untold.pop(0)
                study.tell(t0, [x0[0], 1 - x0[0] * x0[1]])
        draws.append(out)
    assert draws[0] == draws[1]
    assert len(set(draws[0])) > 20  # (NSGA children may copy a parent by design)


# ----------------------------------------------------------------------------- run options


@pytest.mark.slow
def test_a_run_continues_as_it_was_started(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--n-trials/--workers/--seed given to `run` are stored; the printed command continues
    with them (timeout_s stops each run early), `status` shows that target, and the study
    ends as one uninterrupted `run` with the same flags."""
    import shlex

    from dse.cli import main
    from dse.driver import RUN_ATTR

    text = _spec("s", n_trials=20, sampler="tpe", workers=2, options={"delay_s": 0.1})
    spec = tmp_path / "s.toml"
    spec.write_text(text.replace("[study]\n", "[study]\ntimeout_s = 0.3\n", 1))
    root = tmp_path / "dir with space"
    flags = ["--n-trials", "7", "--workers", "1", "--seed", "11", "--address", "inline", "--no-tracking",
             "--progress", "log"]
    argv = ["run", str(spec), "--dir", str(root), *flags]
    for _ in range(10):
        assert main(argv) == 0
        out = capsys.readouterr().out
        if "continue with" not in out:
            break
        cmd = shlex.split(out.split("continue with `")[1].split("`")[0])
        assert cmd == ["dse", "resume", "s", "--dir", str(root), "--address", "inline", "--no-tracking"]
        argv = [*cmd[1:], "--progress", "log"]
        assert main(["status", "s", "--dir", str(root)]) == 0
        assert "(target 7 COMPLETE)" in capsys.readouterr().out
    else:
        pytest.fail("never completed")
    assert argv[0] == "resume"  # it took more than one run
    got = _trials(root, "s")
    assert optuna.load_study(study_name="s", storage=open_storage(None, root / "s")).user_attrs[RUN_ATTR] == {
        "n_trials": 7, "workers": 1, "seed": 11}
    clean = tmp_path / "clean"
    spec.write_text(text)  # no timeout_s
    assert main(["run", str(spec), "--dir", str(clean), *flags]) == 0
    assert _sequence(got) == _sequence(_trials(clean, "s"))
    capsys.readouterr()
    # another seed on the existing study is refused; `run` without --seed keeps its seed
    assert main(["run", str(spec), "--dir", str(clean), "--seed", "12", "--n-trials", "8",
                 "--address", "inline", "--no-tracking"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["--seed: expected 11 (the seed study 's' runs with) or none, got 12; use another "
                   "study name, or --allow-spec-change to continue it with this seed"]
    assert main(["run", str(spec), "--dir", str(clean), "--n-trials", "8", "--address", "inline",
                 "--no-tracking", "--progress", "log"]) == 0
    study = optuna.load_study(study_name="s", storage=open_storage(None, clean / "s"))
    assert study.user_attrs[RUN_ATTR] == {"n_trials": 8, "seed": 11}
    assert len(study.trials) == 8


def _cut_sqlite(db: Path, number: int, params_kept: int) -> None:
    """Make SQLite study ``db`` what a driver SIGKILLed while writing trial ``number``'s
    parameters leaves (an RDB storage writes them one by one): later trials gone, trial
    ``number`` RUNNING with its first ``params_kept`` parameters and nothing else, and the
    driver's heartbeat naming a dead process."""
    import json
    import sqlite3
    import subprocess

    dead = subprocess.Popen(["true"])
    dead.wait()
    c = sqlite3.connect(db)
    later = "(SELECT trial_id FROM trials WHERE number > ?)"
    for table in ("trial_params", "trial_values", "trial_user_attributes", "trial_system_attributes",
                  "trial_intermediate_values"):
        c.execute(f"DELETE FROM {table} WHERE trial_id IN {later}", (number,))
    c.execute("DELETE FROM trials WHERE number > ?", (number,))
    (tid,) = c.execute("SELECT trial_id FROM trials WHERE number = ?", (number,)).fetchone()
    c.execute("UPDATE trials SET state = 'RUNNING', datetime_complete = NULL WHERE trial_id = ?", (tid,))
    for table in ("trial_values", "trial_user_attributes"):
        c.execute(f"DELETE FROM {table} WHERE trial_id = ?", (tid,))
    c.execute("DELETE FROM trial_system_attributes WHERE trial_id = ? AND key != 'dse:owner'", (tid,))
    ids = [r[0] for r in c.execute("SELECT param_id FROM trial_params WHERE trial_id = ? ORDER BY param_id", (tid,))]
    assert len(ids) > params_kept
    c.executemany("DELETE FROM trial_params WHERE param_id = ?", [(i,) for i in ids[params_kept:]])
    for key, value in list(c.execute("SELECT key, value_json FROM study_system_attributes")):
        if key.startswith("dse:driver:"):
            c.execute("UPDATE study_system_attributes SET value_json = ? WHERE key = ?",
                      (json.dumps({**json.loads(value), "pid": dead.pid, "done": False}), key))
    c.commit()
    c.close()


def test_trial_killed_while_its_parameters_were_written_resumes_as_uninterrupted(tmp_path: Path) -> None:
    """SQLite writes a trial's parameters one commit each: a driver SIGKILLed after the
    trial was created leaves it RUNNING with none or some of them (the state is made in
    the database: the moment is too short to hit with a kill). Resumed, the trial gets
    the parameters it was asked with, all of them (the missing ones are not drawn from a
    sampler that skipped the stored ones), and the study equals the uninterrupted run."""
    import shutil

    db = tmp_path / "s.db"
    spec = parse_spec(study_spec("s", n_trials=8, sampler="tpe", seed=3, n_vars=3, workers=1,
                                 sampler_options={"n_startup_trials": 3}, storage=f"sqlite:///{db}",
                                 tracking={"enabled": False}))
    Driver(spec, tmp_path, address="inline", progress=False).run()
    want = optuna.load_study(study_name="s", storage=f"sqlite:///{db}").trials
    shutil.copy(db, tmp_path / "clean.db")
    for kept in (0, 2):  # of its 3 parameters
        shutil.copy(tmp_path / "clean.db", db)
        _cut_sqlite(db, 5, kept)
        assert len(optuna.load_study(study_name="s", storage=f"sqlite:///{db}").trials[5].params) == kept
        summary = Driver(spec, tmp_path, address="inline", progress=False).run()
        got = optuna.load_study(study_name="s", storage=f"sqlite:///{db}").trials
        assert summary.recovered == [5]
        assert _sequence(got) == _sequence(want), kept
        assert [t.values for t in got] == [t.values for t in want]
