"""Several drivers on one study: real ``dse`` processes racing on a shared storage.

Three drivers started together on one journal file (a shared file system), one SQLite
database and one PostgreSQL database (and MySQL/MariaDB where ``DSE_TEST_MYSQL_URL`` names
one) end with exactly ``n_trials`` COMPLETE, nothing RUNNING, the baselines
enqueued once; a driver SIGKILLed on "host A" is resumed by name on "host B" (another
``--dir``, another recorded host name, no spec file) and its orphan is run again once.
Drivers evaluate inline (no Ray: three local Ray clusters do not fit on two cores) with a
short sleep per trial, so their asks interleave.
"""

from __future__ import annotations

import os
import signal
from collections import Counter
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from dse.plugins.benchmarks import study_spec
from dse.storage import open_storage
from tests.kills import Dse, mid_trial

BASELINES = [{"x.0": 0.25, "x.1": 0.0}, {"x.0": 0.75, "x.1": 0.5}]


def _spec(tmp: Path, name: str, n_trials: int, delay_s: float) -> Path:
    text = study_spec(name, n_trials=n_trials, options={"delay_s": delay_s}, tracking={"enabled": False})
    text = text.replace("[ray]\n", '[ray]\naddress = "inline"\n', 1)
    enq = "".join(f'[[study.enqueue]]\n"x.0" = {b["x.0"]}\n"x.1" = {b["x.1"]}\n' for b in BASELINES)
    text = text.replace("[[objectives]]", enq + "[[objectives]]", 1)
    path = tmp / f"{name}.toml"
    path.write_text(text)
    return path


def _dse(args: list[str], host: str) -> Dse:
    return Dse([*args, "--progress", "log"], env={"DSE_HOST": host, "DSE_HEARTBEAT_S": "1"},
               watch=False)


def _ended(d: Dse, timeout_s: float = 240) -> None:
    """Wait for a driver to end; fails the test, with its last lines, unless it ends well."""
    assert d.wait(timeout_s) == 0, "\n".join(d.err[-30:])


def _trials(url: str, name: str, tmp: Path) -> list[optuna.trial.FrozenTrial]:
    study = optuna.load_study(study_name=name, storage=open_storage(url, tmp))
    return study.get_trials(deepcopy=False)


def _check(trials: list[optuna.trial.FrozenTrial], n_trials: int) -> None:
    states = Counter(t.state for t in trials)
    assert states[TrialState.COMPLETE] == n_trials, states
    assert states[TrialState.RUNNING] == 0 and states[TrialState.WAITING] == 0, states
    base = [t for t in trials if t.user_attrs.get("dse:baseline")]
    assert sorted(t.params["x.0"] for t in base) == sorted(b["x.0"] for b in BASELINES)


def _race(url: str, tmp: Path, name: str, n: int = 40) -> None:
    spec = _spec(tmp, name, n, delay_s=0.03)
    procs = [_dse(["run", str(spec), "--dir", str(tmp / f"host{i}"), "--storage", url], f"host{i}")
             for i in range(3)]
    for d in procs:
        _ended(d)
    trials = _trials(url, name, tmp)
    _check(trials, n)
    # no driver was killed: none took another, alive, for gone (its trial would be FAILed
    # as "left RUNNING" and run again), so exactly n_trials trials were made
    assert len(trials) == n, Counter(t.state for t in trials)
    # all three took part
    owners = Counter(t.system_attrs.get("dse:owner") for t in trials)
    assert len(owners) == 3, owners


@pytest.mark.slow
def test_three_drivers_on_one_journal(tmp_path: Path) -> None:
    _race(str(tmp_path / "shared.journal"), tmp_path, "jrace")


@pytest.mark.slow
def test_three_drivers_on_sqlite(tmp_path: Path) -> None:
    """The cooperation lock of an SQLite database: an ``flock`` beside the file."""
    db = tmp_path / "shared.db"
    _race(f"sqlite:///{db}", tmp_path, "sqrace", n=15)
    assert (tmp_path / "shared.db.dse-lock").exists()  # the lock the drivers shared


@pytest.mark.slow
def test_three_drivers_on_mysql(tmp_path: Path) -> None:
    """MySQL/MariaDB (``GET_LOCK``): only where ``DSE_TEST_MYSQL_URL`` names a server (not in
    CI: installing MariaDB takes ~50 s, this race ~30 s; measured on MariaDB 10.11)."""
    import uuid

    url = os.environ.get("DSE_TEST_MYSQL_URL")
    if not url:
        pytest.skip("no MySQL/MariaDB server: set DSE_TEST_MYSQL_URL=mysql+pymysql://user@host:port/db")
    pytest.importorskip("pymysql", reason="pip install pymysql (the MySQL driver)")
    _race(url, tmp_path, f"myrace_{uuid.uuid4().hex[:8]}", n=24)


@pytest.mark.slow
def test_three_drivers_on_postgresql(postgres_url: str, tmp_path: Path) -> None:
    _race(postgres_url, tmp_path, "pgrace")


@pytest.mark.slow
def test_sigkilled_on_host_a_resumed_on_host_b(postgres_url: str, tmp_path: Path) -> None:
    """SIGKILL a driver mid-trial on "host A"; ``dse resume NAME --storage URL`` on "host B"
    (another --dir, no spec file there, another host name) recovers its orphans once."""
    n = 12
    spec = _spec(tmp_path, "hosts", n, delay_s=0.3)
    a = _dse(["run", str(spec), "--dir", str(tmp_path / "A"), "--storage", postgres_url], "hostA")
    try:
        a.wait_until(mid_trial(tmp_path, "hosts", 4, postgres_url), "4 COMPLETE and one RUNNING",
                     120, poll_s=0.05)
    finally:
        os.killpg(a.proc.pid, signal.SIGKILL)
        a.proc.wait(timeout=30)
    running = [t.number for t in _trials(postgres_url, "hosts", tmp_path) if t.state == TrialState.RUNNING]
    assert running, "the kill should leave the in-flight trial RUNNING"
    b = _dse(["resume", "hosts", "--dir", str(tmp_path / "B"), "--storage", postgres_url], "hostB")
    _ended(b)
    assert not (tmp_path / "B" / "hosts" / "optuna.journal").exists()
    trials = _trials(postgres_url, "hosts", tmp_path)
    _check(trials, n)
    # every orphan failed once and re-run once
    for t in trials:
        if t.state == TrialState.FAIL:
            assert "left RUNNING" in t.user_attrs.get("fail_reason", ""), t.user_attrs
            retries = [r for r in trials if r.user_attrs.get("dse:retry_of") == t.number]
            if not t.params:  # killed before its parameters were written: nothing to re-run
                assert retries == []
                continue
            assert len(retries) == 1 and retries[0].params == t.params
    # A's orphans: run again as themselves by B (found at B's start, once A's heartbeat is
    # older than the grace period), or failed and re-enqueued once (found later)
    for n in running:
        t = trials[n]
        assert t.state in (TrialState.COMPLETE, TrialState.FAIL), t
        if t.state == TrialState.COMPLETE:
            assert t.system_attrs["dse:owner"] != trials[0].system_attrs["dse:owner"]  # B's now
