"""The driver's buffered journal storage: same study as Optuna's backend, batched writes."""

from __future__ import annotations

from pathlib import Path

import optuna

from dse.storage import BufferedJournalFileBackend, buffered_records, flush_storage, open_storage


def _run(study: optuna.Study, n: int) -> None:
    for _ in range(n):
        t = study.ask()
        x = t.suggest_float("x", 0.0, 1.0)
        c = t.suggest_categorical("c", ["a", "b"])
        t.set_user_attr("metrics", {"y": x})
        study.tell(t, x if c == "a" else 1 - x)


def test_buffered_journal_equals_plain(tmp_path: Path) -> None:
    buf = open_storage(None, tmp_path / "b", buffered=True)
    assert isinstance(buf._backend, BufferedJournalFileBackend)  # type: ignore[attr-defined]
    sb = optuna.create_study(study_name="s", storage=buf, sampler=optuna.samplers.RandomSampler(seed=0))
    sp = optuna.create_study(study_name="s", storage=open_storage(None, tmp_path / "p"),
                             sampler=optuna.samplers.RandomSampler(seed=0))
    _run(sb, 5)
    # another process sees nothing of the unflushed records, then everything after flush
    assert buffered_records(buf) > 0
    flush_storage(buf)
    assert buffered_records(buf) == 0
    _run(sb, 5)
    flush_storage(buf)
    _run(sp, 10)
    reader = optuna.load_study(study_name="s", storage=open_storage(None, tmp_path / "b"))
    got = [(t.params, t.values, t.user_attrs, t.state) for t in reader.trials]
    want = [(t.params, t.values, t.user_attrs, t.state) for t in sp.trials]
    assert got == want and len(got) == 10
    # the writer's own view is unchanged by flushing
    assert [t.params for t in sb.trials] == [t.params for t in sp.trials]


def test_unflushed_records_invisible_to_readers(tmp_path: Path) -> None:
    buf = open_storage(None, tmp_path, buffered=True)
    sb = optuna.create_study(study_name="s", storage=buf)
    flush_storage(buf)
    _run(sb, 3)
    # a new trial is written at once (it takes the next id in the file, shared with other
    # writers), with the records buffered before it; the last trial's tell is still buffered
    reader = optuna.load_study(study_name="s", storage=open_storage(None, tmp_path))
    assert [t.state.name for t in reader.trials] == ["COMPLETE", "COMPLETE", "RUNNING"]
    assert reader.trials[2].params == {}
    flush_storage(buf)
    reader = optuna.load_study(study_name="s", storage=open_storage(None, tmp_path))
    assert len(reader.trials) == 3
    # resuming from the file (a new writer) continues the same study
    buf2 = open_storage(None, tmp_path, buffered=True)
    s2 = optuna.load_study(study_name="s", storage=buf2)
    _run(s2, 2)
    flush_storage(buf2)
    assert [t.number for t in optuna.load_study(study_name="s", storage=open_storage(None, tmp_path)).trials] == [0, 1, 2, 3, 4]


def test_waiting_fast_path_finds_every_enqueued_trial(tmp_path: Path) -> None:
    storage = open_storage(None, tmp_path, buffered=True)
    study = optuna.create_study(study_name="w", storage=storage)
    study.enqueue_trial({"x": 0.1})
    study.enqueue_trial({"x": 0.2})
    xs = []
    for i in range(6):
        t = study.ask()
        xs.append(t.suggest_float("x", 0.0, 1.0))
        study.tell(t, xs[-1])
        if i == 2:
            study.enqueue_trial({"x": 0.9})  # enqueued after the bookmark moved on
    assert xs[:2] == [0.1, 0.2] and xs[3] == 0.9
    assert all(t.state.name == "COMPLETE" for t in study.trials)


def test_state_counts_follow_every_change_and_other_writers(tmp_path: Path) -> None:
    """The incremental count (each finished trial counted once, the others looked at
    again) equals a full scan after every kind of change, also a trial another driver's
    storage on the same file finishes."""
    from collections import Counter

    from optuna.trial import TrialState

    from dse.storage import state_counts

    def scan(study: optuna.Study) -> dict[TrialState, int]:
        c = Counter(t.state for t in study.get_trials(deepcopy=False))
        return {s: c.get(s, 0) for s in TrialState}

    study = optuna.create_study(study_name="c", storage=open_storage(None, tmp_path, buffered=True))
    other_storage = open_storage(None, tmp_path, buffered=True)
    assert state_counts(study) == scan(study)
    running = [study.ask() for _ in range(3)]
    study.enqueue_trial({"x": 0.5})
    assert state_counts(study) == scan(study)
    study.tell(running[0], 1.0)
    study.tell(running[1], state=TrialState.FAIL)
    assert state_counts(study) == scan(study) != {s: 0 for s in TrialState}
    flush_storage(study._storage)
    other = optuna.load_study(study_name="c", storage=other_storage)
    other.tell(running[2].number, 2.0)  # finished by another writer
    flush_storage(other_storage)
    t = study.ask()  # the enqueued one: WAITING -> RUNNING
    assert state_counts(study) == scan(study)
    assert state_counts(study)[TrialState.COMPLETE] == 2 and state_counts(study)[TrialState.RUNNING] == 1
    study.tell(t, state=TrialState.PRUNED)
    assert state_counts(study) == scan(study)
