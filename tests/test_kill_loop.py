"""MLflow is a function of the journal (issue 10, item 2): a study SIGKILLed four times at
different moments (start-up, early, mid-run, late), resumed after each kill, then `dse sync`:
MLflow then holds exactly one FINISHED child run per COMPLETE trial, each with that trial's
own parameters and metrics, and nothing else is left active. The random sampler's resumed
state does not repeat earlier parameter sets (item 3)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

from dse.cli import main
from dse.driver import open_storage
from dse.plugins.benchmarks import study_spec
from tests.kills import sigkill_when

ROOT = Path(__file__).resolve().parents[1]
N_TRIALS = 24
NAME = "kills"


def _trials(root: Path) -> list[optuna.trial.FrozenTrial]:
    try:
        study = optuna.load_study(study_name=NAME, storage=open_storage(None, root / NAME))
    except KeyError:  # not created yet
        return []
    return study.get_trials(deepcopy=False)


@pytest.mark.slow
def test_four_kills_then_sync_make_mlflow_equal_the_journal(ray_session: Any, tmp_path: Path) -> None:
    """The killed drivers join the session's Ray cluster (``--address``): each kill ends the
    driver, its MLflow logging and its actors as before, without a cluster start-up per
    driver (seconds each); the last resume runs in this process on that cluster."""
    from mlflow.tracking import MlflowClient

    spec = tmp_path / "kills.toml"
    spec.write_text(study_spec(NAME, n_trials=N_TRIALS, seed=3, sampler="random",
                               options={"delay_s": 0.1}, tracking={"artifact_every": 10}))
    root = tmp_path / "studies"
    left: dict[int, dict[str, Any]] = {}  # trials each kill left RUNNING: number -> parameters
    for argv, at in ((["run", str(spec)], 0), (["resume", NAME], 5), (["resume", NAME], 11),
                     (["resume", NAME], 17)):  # 0: at start-up, once the first trials are asked
        sigkill_when(argv, root, NAME, at, cwd=tmp_path, join=ray_session)
        left.update({t.number: t.params for t in _trials(root) if t.state == TrialState.RUNNING})
    assert left  # (each kill finds one RUNNING; one told in the last instant is not left)
    assert main(["resume", NAME, "--dir", str(root), "--progress", "log"]) == 0
    assert main(["sync", NAME, "--dir", str(root)]) == 0

    trials = _trials(root)
    # the rule: a trial a dead driver left RUNNING is run again as itself by the next
    # resume (same number; the parameters it had, or, killed before they were written, the
    # ones its sampler draws then): nothing FAILs, nothing is re-enqueued, no trial is
    # added, and the study is exactly trials 0 .. n_trials - 1, all COMPLETE
    assert [(t.number, t.state) for t in trials] == [(n, TrialState.COMPLETE) for n in range(N_TRIALS)]
    assert [t.number for t in trials if "dse:retry_of" in t.user_attrs] == []
    for n, params in left.items():
        assert trials[n].params == params or not params, (n, params, trials[n].params)
    complete = {t.number: t for t in trials}
    # resume never repeats: every trial has its own parameter set (random sampler)
    assert len({tuple(sorted(t.params.items())) for t in trials}) == N_TRIALS

    client = MlflowClient(tracking_uri=f"sqlite:///{root / NAME / 'mlflow.db'}")
    exp = client.get_experiment_by_name(NAME)
    assert exp is not None
    runs: list[Any] = client.search_runs([exp.experiment_id], max_results=10000)
    assert [r.info.run_name for r in runs if r.info.status == "RUNNING"] == []
    children = [r for r in runs if "dse.trial_number" in r.data.tags]
    by_number = Counter(int(r.data.tags["dse.trial_number"]) for r in children)
    assert sorted(by_number) == sorted(complete) and set(by_number.values()) == {1}
    for r in children:
        t = complete[int(r.data.tags["dse.trial_number"])]
        assert r.info.status == "FINISHED"
        assert {k: float(v) for k, v in r.data.params.items()} == t.params, t.number
        assert [r.data.metrics["f1"], r.data.metrics["f2"]] == t.values, t.number
    # sync again changes nothing
    assert main(["sync", NAME, "--dir", str(root)]) == 0
    assert len(client.search_runs([exp.experiment_id], max_results=10000)) == len(runs)


@pytest.mark.slow
def test_a_new_study_with_an_old_name_never_adopts_the_old_runs(tmp_path: Path) -> None:
    """Tracking keys runs by the study's identity, not by a name or trial number it finds in
    MLflow: a study deleted and re-created under the same name, tracked to the same server,
    gets its own parent run and its own child runs with its own parameters."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'shared.db'}"
    root = tmp_path / "studies"
    for seed in (1, 2):
        spec = tmp_path / f"s{seed}.toml"
        spec.write_text(study_spec("again", n_trials=6, seed=seed, sampler="random",
                                   tracking={"uri": uri}).replace("[ray]", "[ray]\naddress = \"inline\""))
        assert main(["run", str(spec), "--dir", str(root), "--progress", "log"]) == 0
        trials = optuna.load_study(study_name="again", storage=open_storage(None, root / "again")).trials
        client = MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name("again")
        assert exp is not None
        parents = client.search_runs([exp.experiment_id], filter_string="tags.`dse.role` = 'parent'")
        assert len(parents) == seed
        mine = [p for p in parents if p.data.tags["dse.study_uid"] != ""]
        assert len({p.data.tags["dse.study_uid"] for p in mine}) == seed
        newest = max(parents, key=lambda p: p.info.start_time)
        children = client.search_runs(
            [exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{newest.info.run_id}'")
        assert sorted(int(r.data.tags["dse.trial_number"]) for r in children) == list(range(6))
        for r in children:
            t = trials[int(r.data.tags["dse.trial_number"])]
            assert {k: float(v) for k, v in r.data.params.items()} == t.params
            assert r.data.tags["dse.study_uid"] == newest.data.tags["dse.study_uid"]
        # sync on the re-created study touches only its own runs
        assert main(["sync", "again", "--dir", str(root)]) == 0
        import shutil

        shutil.rmtree(root / "again")  # the user deletes the study, then re-creates the name


@pytest.mark.slow
def test_no_ray_process_outlives_a_sigkilled_driver(tmp_path: Path) -> None:
    """Ray's agents used to live on 60-70 s after their driver was SIGKILLed (they report the
    raylet's death to a GCS that is gone); the driver's watcher (dse/reaper.py) ends every
    Ray process it started within a few seconds, whether the driver alone or its whole
    process group is killed (the group case: a group SIGKILL reaches the agents directly, so
    only the driver is killed here; the kill loop above kills groups)."""
    import psutil

    spec = tmp_path / "r.toml"
    spec.write_text(study_spec(NAME, n_trials=200, options={"delay_s": 0.2}))
    root = tmp_path / "studies"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "dse.cli", "run", str(spec), "--dir", str(root),
                             "--no-tracking", "--progress", "log"], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while Counter(t.state for t in _trials(root))[TrialState.COMPLETE] < 2:
            assert proc.poll() is None and time.monotonic() < deadline, "driver made no progress"
            time.sleep(0.1)
        ray_procs = [p for p in psutil.Process(proc.pid).children(recursive=True)
                     if "ray" in " ".join(p.cmdline()[:2]) or p.name().startswith("ray::")]
        assert len(ray_procs) >= 4  # gcs, raylet, agents, workers
    finally:
        proc.kill()
        proc.wait()
    _, alive = psutil.wait_procs(ray_procs, timeout=15)  # a bound against a hang, not a speed target
    assert [p.pid for p in alive] == []
