"""The dse command line: bad specs, run/status/pareto/export, SIGKILLed driver + resume,
dead MLflow server + sync."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import optuna
import pyarrow.parquet as pq
import pytest
from optuna.trial import TrialState

from dse.cli import main
from dse.driver import open_storage
from dse.plugins.benchmarks import study_spec
from dse.spec import load_spec, study_info
from tests.kills import sigkill_when
from tracking.artifacts import write_artifacts

ROOT = Path(__file__).resolve().parents[1]


def spec_text(name: str, n_trials: int, *, delay_s: float = 0.0,
              tracking: dict[str, Any] | None = None) -> str:
    return study_spec(name, n_trials=n_trials, seed=2, options={"delay_s": delay_s},
                      sampler_options={"population_size": 4}, constraints=[("f1", "<=", 0.9)],
                      tracking={"artifact_every": 50, **(tracking or {})})


def child_runs(uri: str, study: str) -> list[Any]:
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=uri)
    exp = c.get_experiment_by_name(study)
    assert exp is not None
    runs = c.search_runs([exp.experiment_id], max_results=10000)
    return [r for r in runs if "dse.trial_number" in r.data.tags]


def parent_run(uri: str, study: str) -> Any:
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=uri)
    exp = c.get_experiment_by_name(study)
    (run,) = c.search_runs([exp.experiment_id], filter_string="tags.`dse.role` = 'parent'")
    return run


def states(root: Path, name: str) -> Counter[TrialState]:
    study = optuna.load_study(study_name=name, storage=open_storage(None, root / name))
    return Counter(t.state for t in study.trials)


def test_bad_spec_exits_2_and_creates_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(spec_text("bad", 4).replace('sampler = "nsga2"', 'sampler = "simplex"'))
    out = tmp_path / "studies"
    assert main(["run", str(bad), "--dir", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"{bad}: study.sampler: expected one of nsga2, nsga3, tpe, gp, parego, random, qmc, got 'simplex'"]
    assert not out.exists()
    assert main(["validate", str(bad)]) == 2
    assert main(["run", str(tmp_path / "none.toml"), "--dir", str(out)]) == 2
    assert main(["run", str(bad), "--dir", str(out), "--workers", "0"]) == 2
    assert not out.exists()
    assert main(["status", "nosuch", "--dir", str(out)]) == 2
    assert main(["validate", str(ROOT / "examples" / "zdt1.toml")]) == 0


@pytest.mark.slow
def test_run_status_pareto_export(ray_session: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = tmp_path / "s.toml"
    spec.write_text(spec_text("cli", 12))
    root = tmp_path / "studies"
    assert main(["run", str(spec), "--dir", str(root), "--progress", "log"]) == 0
    capsys.readouterr()
    assert main(["status", "cli", "--dir", str(root), "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["states"]["COMPLETE"] == 12 and st["pareto_size"] >= 1 and st["hypervolume"] > 0
    assert st["reference_point"] == [1.1, 1.1]
    assert main(["pareto", "cli", "--dir", str(root), "--out", str(tmp_path / "front.parquet")]) == 0
    front = pq.read_table(tmp_path / "front.parquet")
    assert front.num_rows == st["pareto_size"]
    assert all(v <= 0.9 for v in front.column("values.f1").to_pylist())  # feasible only
    assert main(["export", "cli", "--dir", str(root), "--out", str(tmp_path / "t.csv")]) == 0
    assert (tmp_path / "t.csv").read_text().count("\n") == 13
    # artifacts and one MLflow child run per COMPLETE trial
    sdir = root / "cli"
    for f in ("trials.parquet", "pareto.parquet", "pareto.png", "pareto.html"):
        assert (sdir / "artifacts" / f).stat().st_size > 0
    uri = f"sqlite:///{sdir / 'mlflow.db'}"
    runs = child_runs(uri, "cli")
    assert sorted(int(r.data.tags["dse.trial_number"]) for r in runs) == list(range(12))
    parent = parent_run(uri, "cli")
    # the logging process built them from the trials it was handed: byte for byte what
    # `dse sync` rebuilds from the study's storage; the copies on the parent run are the same
    trials = optuna.load_study(study_name="cli", storage=open_storage(None, sdir)).trials
    rebuilt = write_artifacts(trials, study_info(load_spec(spec), sdir), tmp_path / "rebuilt")
    uploaded = sdir / "mlartifacts" / parent.info.run_id / "artifacts"
    for f in rebuilt:
        assert (sdir / "artifacts" / f.name).read_bytes() == f.read_bytes() == (uploaded / f.name).read_bytes(), f.name
    # a complete study: says so, imports no Ray, leaves the parent run untouched
    code = f"import sys; from dse.cli import main; main({['run', str(spec), '--dir', str(root)]!r}); print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert out == [f"study cli is complete: 12 COMPLETE trials (target 12); nothing run. "
                   f"Extend it with `dse run {spec} --n-trials 24 --dir {root}`", "False"]
    again = parent_run(uri, "cli")
    assert again.info.status == "FINISHED" and again.info.end_time == parent.info.end_time
    # --n-trials extends the same study; --tracking-uri wins over the spec and the default
    other = f"sqlite:///{tmp_path / 'other.db'}"
    assert main(["run", str(spec), "--dir", str(root), "--n-trials", "14", "--tracking-uri", other,
                 "--progress", "log"]) == 0
    assert states(root, "cli")[TrialState.COMPLETE] == 14
    assert sorted(int(r.data.tags["dse.trial_number"]) for r in child_runs(other, "cli")) == list(range(14))
    assert len(child_runs(uri, "cli")) == 12


def start_driver_until_progress(spec: Path, root: Path, name: str) -> subprocess.Popen[bytes]:
    """Start `dse run` in its own process group; return once >= 4 trials are COMPLETE and
    at least one is RUNNING. The caller signals the group and waits for it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "dse.cli", "run", str(spec), "--dir", str(root), "--progress", "log"],
        cwd=spec.parent, env=env, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"driver exited early: {proc.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
            if (root / name / "optuna.journal").exists():
                try:
                    c = states(root, name)
                except KeyError:  # the study is being created
                    c = Counter()
                if c[TrialState.COMPLETE] >= 4 and c[TrialState.RUNNING] >= 1:
                    return proc
            time.sleep(0.2)
        pytest.fail("driver made no progress")
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise


@pytest.mark.slow
def test_sigkilled_driver_then_resume(ray_session: Any, tmp_path: Path) -> None:
    spec = tmp_path / "k.toml"
    n = 16
    spec.write_text(spec_text("killed", n, delay_s=0.3))
    root = tmp_path / "studies"
    # the driver joins the session's Ray cluster (no start-up of its own); the group is
    # SIGKILLed once 4 trials are COMPLETE and one RUNNING
    sigkill_when(["run", str(spec)], root, "killed", 4, cwd=tmp_path, join=ray_session)
    before = states(root, "killed")
    assert before[TrialState.RUNNING] >= 1 and before[TrialState.COMPLETE] < n
    stale = [t.number for t in optuna.load_study(
        study_name="killed", storage=open_storage(None, root / "killed")).trials if t.state == TrialState.RUNNING]
    assert main(["resume", "killed", "--dir", str(root), "--progress", "log"]) == 0
    study = optuna.load_study(study_name="killed", storage=open_storage(None, root / "killed"))
    after = Counter(t.state for t in study.trials)
    assert after[TrialState.COMPLETE] == n and after[TrialState.RUNNING] == 0
    assert after[TrialState.FAIL] == 0 and len(study.trials) == n  # left RUNNING: run again as themselves
    assert all(study.trials[k].state == TrialState.COMPLETE for k in stale)
    runs = child_runs(f"sqlite:///{root / 'killed' / 'mlflow.db'}", "killed")
    numbers = [int(r.data.tags["dse.trial_number"]) for r in runs]
    complete = sorted(t.number for t in study.trials if t.state == TrialState.COMPLETE)
    assert sorted(numbers) == complete  # one child run per COMPLETE trial, none twice


@pytest.mark.slow
def test_ctrl_c_then_resume(ray_session: Any, tmp_path: Path) -> None:
    """Ctrl-C (SIGINT to the foreground process group, as a terminal sends it): in-flight
    trials finish and are told, exit 130, nothing is lost; resume reaches n COMPLETE."""
    spec = tmp_path / "c.toml"
    n = 16
    spec.write_text(spec_text("ctrlc", n, delay_s=0.3))
    root = tmp_path / "studies"
    proc = start_driver_until_progress(spec, root, "ctrlc")
    try:
        os.killpg(proc.pid, signal.SIGINT)
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert rc == 130, proc.stderr.read().decode()[-2000:]  # type: ignore[union-attr]
    before = states(root, "ctrlc")
    assert before[TrialState.RUNNING] == 0 and before[TrialState.FAIL] == 0
    assert 4 <= before[TrialState.COMPLETE] < n
    assert main(["resume", "ctrlc", "--dir", str(root), "--progress", "log"]) == 0
    after = states(root, "ctrlc")
    assert after[TrialState.COMPLETE] == n and after[TrialState.RUNNING] == 0
    assert after[TrialState.FAIL] == 0
    runs = child_runs(f"sqlite:///{root / 'ctrlc' / 'mlflow.db'}", "ctrlc")
    assert sorted(int(r.data.tags["dse.trial_number"]) for r in runs) == list(range(n))


@pytest.mark.slow
def test_dead_mlflow_then_sync(ray_session: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = tmp_path / "d.toml"
    spec.write_text(spec_text("deadml", 8, tracking={"uri": "http://127.0.0.1:9"}))
    root = tmp_path / "studies"
    assert main(["run", str(spec), "--dir", str(root), "--progress", "log"]) == 0
    assert states(root, "deadml")[TrialState.COMPLETE] == 8
    assert not (root / "deadml" / "mlflow.db").exists()
    capsys.readouterr()
    assert main(["sync", "deadml", "--dir", str(root)]) == 1  # still down: one line, no traceback
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dse sync: MLflow at http://127.0.0.1:9: connecting failed ("), err
    uri = f"sqlite:///{root / 'deadml' / 'mlflow.db'}"  # the store is reachable again
    assert main(["sync", "deadml", "--dir", str(root), "--uri", uri]) == 0
    assert "8 child runs created, 0 already there" in capsys.readouterr().out
    assert main(["sync", "deadml", "--dir", str(root), "--tracking-uri", uri]) == 0
    assert "0 child runs created, 8 already there" in capsys.readouterr().out
    runs = child_runs(uri, "deadml")
    assert sorted(int(r.data.tags["dse.trial_number"]) for r in runs) == list(range(8))
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=uri)
    exp = c.get_experiment_by_name("deadml")
    parent = c.search_runs([exp.experiment_id], filter_string="tags.`dse.role` = 'parent'")[0]
    assert c.get_metric_history(parent.info.run_id, "hypervolume")
    arts = {a.path for a in c.list_artifacts(parent.info.run_id)}
    assert {"trials.parquet", "pareto.parquet", "pareto.png", "pareto.html"} <= arts


@pytest.mark.slow
def test_ui_against_a_server_starts_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`dse ui` with a remote tracking URI prints that server's URL and returns (no exec)."""
    sdir = tmp_path / "studies" / "uiq"
    sdir.mkdir(parents=True)
    (sdir / "spec.toml").write_text(spec_text("uiq", 4))
    args = ["ui", "uiq", "--dir", str(tmp_path / "studies"), "--tracking-uri", "http://127.0.0.1:9"]
    assert main(args) == 0
    assert capsys.readouterr().out.splitlines() == [
        "MLflow UI for uiq: http://127.0.0.1:9/  (a running server: nothing started)"
    ]


def test_closed_pipe_ends_silently(tmp_path: Path) -> None:
    """`dse ... | head`: the reader is gone before dse writes; no BrokenPipeError traceback."""
    r, w = os.pipe()
    os.close(r)  # the reader went away
    specs = [str(ROOT / "examples" / "zdt1.toml")] * 300  # more than one stdout buffer
    proc = subprocess.run([sys.executable, "-m", "dse.cli", "validate", *specs], stdout=w,
                          stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          cwd=tmp_path, timeout=120)
    os.close(w)
    assert proc.stderr.decode() == "" and proc.returncode == 141


def _run_subprocess(spec: Path, root: Path, *flags: str,
                    **extra_env: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_LOGGING_LEVEL", "PYTHONWARNINGS", "RAY_AUTH_MODE")}
    return subprocess.run(
        [sys.executable, "-m", "dse.cli", "run", str(spec), "--dir", str(root), "--progress", "log",
         *flags], capture_output=True, text=True,
        env={**env, **extra_env, "PYTHONPATH": str(ROOT)},
        cwd=spec.parent, timeout=300,
    )


@pytest.mark.slow
def test_run_is_quiet_unless_verbose(tmp_path: Path) -> None:
    """A normal `dse run` (own Ray cluster, MLflow) prints dse's lines only: no Ray
    token-authentication warning, no MLflow "Creating initial ... tables", no Python
    warnings; `-v` shows the libraries' lines."""
    spec = tmp_path / "q.toml"
    spec.write_text(spec_text("quiet", 3))
    # a cache of its own per run: MLflow builds its store template (with its "Creating
    # initial ... tables" lines) in both, so the quiet run has those lines to hide
    quiet = _run_subprocess(spec, tmp_path / "a", DSE_CACHE_DIR=str(tmp_path / "cache-a"))
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    assert quiet.stdout.startswith("study quiet: 3 COMPLETE") and len(quiet.stdout.splitlines()) == 1
    # progress, and the notice of a final MLflow drain longer than 2 s (a loaded machine)
    own = re.compile(r"^\d{4}-\d\d-\d\d [\d:,]+ INFO dse(: quiet: \d+/3 complete|\.tracking: waiting for the MLflow)")
    assert [ln for ln in quiet.stderr.splitlines() if not own.match(ln)] == []
    loud = _run_subprocess(spec, tmp_path / "b", "-v", DSE_CACHE_DIR=str(tmp_path / "cache-b"))
    assert loud.returncode == 0, loud.stderr[-2000:]
    assert "Creating initial MLflow database tables" in loud.stderr
