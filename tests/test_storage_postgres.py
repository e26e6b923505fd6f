"""The driver's PostgreSQL storage (``dse.storage.PostgresDriverStorage``): about two round
trips per trial, the same study as Optuna's own RDB storage writes, the ``n_trials`` cap and
enqueued trials as the cooperation protocol needs them, and a told trial in the database
when ``tell`` returns (a SIGKILL right after loses nothing told).

Slow only because of the PostgreSQL server (session fixture, shared with test_race).
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from dse.storage import (
    Cooperation,
    PostgresDriverStorage,
    StorageError,
    buffered_records,
    flush_storage,
    open_storage,
)

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # a PostgreSQL server


def _driver_study(url: str, tmp: Path, name: str) -> optuna.Study:
    st = open_storage(url, tmp, buffered=True)
    assert isinstance(st, PostgresDriverStorage)
    return optuna.create_study(study_name=name, storage=st, directions=["minimize", "minimize"],
                               sampler=optuna.samplers.RandomSampler(seed=0), load_if_exists=True)


def _read(url: str, tmp: Path, name: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=open_storage(url, tmp)).get_trials(deepcopy=False)


def _trial(study: optuna.Study, trial: optuna.Trial, i: int) -> None:
    """One trial as the driver makes it: parameters, attributes, a constraint, then tell."""
    x = trial.suggest_float("x", 0.0, 1.0)
    c = trial.suggest_categorical("c", ["a", "b"])
    trial.set_user_attr("metrics", {"y": x, "tag": c})
    trial.set_constraint("c0", x - 0.5)
    if i == 2:
        trial.set_user_attr("fail_reason", "a failed evaluation")
        study.tell(trial, state=TrialState.FAIL)
    else:
        study.tell(trial, [x, math.inf if i == 3 else 1 - x])


def _view(t: optuna.trial.FrozenTrial) -> tuple[object, ...]:
    sys_attrs = {k: v for k, v in t.system_attrs.items() if k != "dse:owner"}
    return (t.number, t.state, t.params, t.distributions, t.values, t.user_attrs, sys_attrs)


def test_same_study_as_optunas_rdb_storage(postgres_url: str, tmp_path: Path) -> None:
    drv = _driver_study(postgres_url, tmp_path, "drv")
    coop = Cooperation(drv, requeue=lambda t: None)
    plain = optuna.create_study(study_name="plain", storage=open_storage(postgres_url, tmp_path),
                                directions=["minimize", "minimize"],
                                sampler=optuna.samplers.RandomSampler(seed=0))
    for i in range(6):
        trial, counts = coop.ask(100)
        assert trial is not None and counts[TrialState.COMPLETE] == max(0, i - (1 if i > 2 else 0))
        _trial(drv, trial, i)
        _trial(plain, plain.ask(), i)
    want = [_view(t) for t in _read(postgres_url, tmp_path, "plain")]
    got = [_view(t) for t in _read(postgres_url, tmp_path, "drv")]
    assert got == want and len(got) == 6
    assert got[2][1] == TrialState.FAIL and got[3][4] == [pytest.approx(want[3][4][0]), math.inf]
    # the writer's own view is the database's
    drv._storage.refresh()
    assert [_view(t) for t in drv.get_trials(deepcopy=False)] == want
    assert all(t.system_attrs["dse:owner"] == coop.id for t in _read(postgres_url, tmp_path, "drv"))


def test_told_at_once_running_writes_at_flush(postgres_url: str, tmp_path: Path) -> None:
    study = _driver_study(postgres_url, tmp_path, "s")
    trial, _ = Cooperation(study, requeue=lambda t: None).ask(10)
    assert trial is not None
    trial.suggest_float("x", 0.0, 1.0)
    trial.set_user_attr("note", [1, 2])
    (t,) = _read(postgres_url, tmp_path, "s")
    assert t.state == TrialState.RUNNING and t.params == {} and t.user_attrs == {}
    assert buffered_records(study._storage) == 2
    flush_storage(study._storage, reread=False)  # the driver's FLUSH_S cadence
    assert buffered_records(study._storage) == 0
    (t,) = _read(postgres_url, tmp_path, "s")
    assert t.state == TrialState.RUNNING and set(t.params) == {"x"} and t.user_attrs == {"note": [1, 2]}
    trial.set_user_attr("metrics", {"y": 1.0})
    study.tell(trial, [0.25, 0.5])  # no flush: the tell itself is the transaction
    (t,) = _read(postgres_url, tmp_path, "s")
    assert t.state == TrialState.COMPLETE and t.values == [0.25, 0.5]
    assert t.user_attrs == {"note": [1, 2], "metrics": {"y": 1.0}}


def test_cap_and_enqueued_trials(postgres_url: str, tmp_path: Path) -> None:
    study = _driver_study(postgres_url, tmp_path, "cap")
    coop = Cooperation(study, requeue=lambda t: None)
    study.enqueue_trial({"x": 0.5}, user_attrs={"dse:baseline": True})
    first, counts = coop.ask(2)
    assert first is not None and counts[TrialState.WAITING] == 1
    assert first.suggest_float("x", 0.0, 1.0) == 0.5 and first.user_attrs == {"dse:baseline": True}
    second, counts = coop.ask(2)
    assert second is not None and second.number == 1 and counts[TrialState.RUNNING] == 1
    none, counts = coop.ask(2)  # COMPLETE + RUNNING = 2: capped
    assert none is None and counts[TrialState.RUNNING] == 2
    second.suggest_float("x", 0.0, 1.0)
    study.tell(second, [1.0, 1.0])
    assert coop.ask(2)[0] is None  # 1 COMPLETE + 1 RUNNING
    study.tell(first, state=TrialState.FAIL)
    third, counts = coop.ask(2)
    assert third is not None and third.number == 2 and counts[TrialState.FAIL] == 1
    states = [t.state for t in _read(postgres_url, tmp_path, "cap")]
    assert states == [TrialState.FAIL, TrialState.COMPLETE, TrialState.RUNNING]


def test_trial_failed_by_another_driver_is_not_overwritten(postgres_url: str, tmp_path: Path) -> None:
    study = _driver_study(postgres_url, tmp_path, "orph")
    trial, _ = Cooperation(study, requeue=lambda t: None).ask(10)
    assert trial is not None
    trial.suggest_float("x", 0.0, 1.0)
    other = optuna.load_study(study_name="orph", storage=open_storage(postgres_url, tmp_path))
    other._storage.set_trial_user_attr(trial._trial_id, "fail_reason", "left RUNNING")
    other._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
    trial.set_user_attr("metrics", {"y": 0.1})
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        study.tell(trial, [0.1, 0.2])
    (t,) = _read(postgres_url, tmp_path, "orph")
    assert t.state == TrialState.FAIL and t.values is None and t.params == {}
    assert t.user_attrs == {"fail_reason": "left RUNNING"}
    assert buffered_records(study._storage) == 0


def _drop_connection(url: str, tmp: Path, st: PostgresDriverStorage) -> None:
    """The server ends the driver storage's own session (as a restart or an idle timeout)."""
    import sqlalchemy

    pid = st._connection().info.backend_pid
    with open_storage(url, tmp).engine.connect() as c:
        assert c.execute(sqlalchemy.text("SELECT pg_terminate_backend(:p)"), {"p": pid}).scalar()


def test_dropped_connection(postgres_url: str, tmp_path: Path) -> None:
    """A tell on a dropped connection is made again on a new one (it is idempotent); an ask
    is not (a lost reply would leave a second trial): it checks a connection idle for
    ``IDLE_PING_S`` first, else stops with one line."""
    study = _driver_study(postgres_url, tmp_path, "drop")
    st = study._storage
    assert isinstance(st, PostgresDriverStorage)
    coop = Cooperation(study, requeue=lambda t: None)
    trial, _ = coop.ask(10)
    assert trial is not None
    trial.suggest_float("x", 0.0, 1.0)
    _drop_connection(postgres_url, tmp_path, st)
    study.tell(trial, [0.5, 0.5])
    st.IDLE_PING_S = 0.0
    _drop_connection(postgres_url, tmp_path, st)
    assert coop.ask(10)[0] is not None
    st.IDLE_PING_S = math.inf
    _drop_connection(postgres_url, tmp_path, st)
    with pytest.raises(StorageError, match=r"connection lost .*dse resume"):
        coop.ask(10)
    assert [t.state for t in _read(postgres_url, tmp_path, "drop")] == [TrialState.COMPLETE, TrialState.RUNNING]


_WRITER = """
import sys, optuna
from pathlib import Path
from dse.storage import Cooperation, open_storage
optuna.logging.set_verbosity(optuna.logging.WARNING)
study = optuna.create_study(study_name="kill", storage=open_storage(sys.argv[1], Path("."), buffered=True))
coop = Cooperation(study, requeue=lambda t: None)
while True:
    trial, _ = coop.ask(10**6)
    x = trial.suggest_float("x", 0.0, 1.0)
    trial.set_user_attr("metrics", {"y": x})
    study.tell(trial, x)
    print(trial.number, flush=True)
"""


def test_sigkill_loses_no_told_trial(postgres_url: str, tmp_path: Path) -> None:
    """A writer SIGKILLed mid-loop: every trial whose tell returned is COMPLETE with its
    parameters and attributes; only the trial in flight is left RUNNING."""
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, postgres_url], cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    told = []
    while len(told) < 25:
        line = proc.stdout.readline()
        assert line, proc.stderr.read().decode() if proc.stderr else ""
        told.append(int(line))
    proc.send_signal(signal.SIGKILL)
    rest, _ = proc.communicate(timeout=30)
    told += [int(n) for n in rest.split()]
    trials = {t.number: t for t in _read(postgres_url, tmp_path, "kill")}
    for n in told:
        t = trials[n]
        assert t.state == TrialState.COMPLETE and set(t.params) == {"x"}, t
        assert t.user_attrs == {"metrics": {"y": t.params["x"]}} and t.values == [t.params["x"]]
    assert sorted(trials) == list(range(len(trials)))
    assert [t.state for t in trials.values()].count(TrialState.RUNNING) <= 1
    assert len(trials) - len(told) <= 1
