"""The journal under faults: torn last records, garbage, a failed write, a full disk."""

from __future__ import annotations

import errno
import logging
import os
import socket
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

from dse import storage as dse_storage
from dse.cli import main
from dse.driver import open_study
from dse.plugins.benchmarks import study_spec
from dse.spec import parse_spec
from dse.storage import BufferedJournalFileBackend, StorageError, flush_storage, open_storage


def _make_study(root: Path, name: str, n: int) -> Path:
    """A study of ``n`` COMPLETE trials written through the driver's buffered storage."""
    spec = parse_spec(study_spec(name, n_trials=50, sampler="random", tracking={"enabled": False}))
    sdir = root / name
    study = open_study(spec, sdir, buffered=True)
    for _ in range(n):
        t = study.ask()
        x = [t.suggest_float(f"x.{i}", 0.0, 1.0) for i in range(2)]
        study.tell(t, x)
        flush_storage(study._storage)  # one write per trial, as the driver's 0.2 s batches
    return sdir / "optuna.journal"


def _reader(path: Path, name: str = "s") -> list[Any]:
    return optuna.load_study(study_name=name, storage=open_storage(None, path.parent)).trials


def _record_ends(data: bytes) -> list[int]:
    return [i + 1 for i, b in enumerate(data) if b == ord("\n")]


@pytest.mark.parametrize("cut", [1, 7, 40, -2, "batch"])
def test_torn_last_record_is_cut_and_the_study_continues(
    tmp_path: Path, cut: int | str, caplog: pytest.LogCaptureFixture
) -> None:
    path = _make_study(tmp_path, "s", 6)
    data = path.read_bytes()
    ends = _record_ends(data)
    # a torn write: the file ends inside a record (inside the last one, or inside the
    # second-to-last of the last batch: a write of several records cut short)
    last_start = ends[-2]
    at = ends[-3] + 5 if cut == "batch" else (last_start + cut if cut > 0 else len(data) + cut)  # type: ignore[operator]
    path.write_bytes(data[:at])
    keep = max(e for e in ends if e <= at)
    want = [(t.number, t.state, t.params, t.values) for t in _reader(path)]  # readers skip the tail
    caplog.set_level(logging.WARNING, logger="dse")
    storage = open_storage(None, path.parent, buffered=True)
    lines = [r.getMessage() for r in caplog.records if "torn" in r.getMessage()]
    assert lines == [f"{path}: cut a torn last record ({at - keep} bytes at byte {keep}, an "
                     "interrupted write); the journal ends with its last complete record"]
    assert path.read_bytes() == data[:keep]
    study = optuna.load_study(study_name="s", storage=storage)
    assert [(t.number, t.state, t.params, t.values) for t in study.trials] == want
    for _ in range(3):  # appending after the cut gives a journal every reader can read
        t = study.ask()
        study.tell(t, [t.suggest_float("x.0", 0, 1), t.suggest_float("x.1", 0, 1)])
    flush_storage(storage)
    got = _reader(path)
    assert [(t.number, t.state, t.params, t.values) for t in got[: len(want)]] == want
    assert len(got) == len(want) + 3 and all(t.state == TrialState.COMPLETE for t in got[len(want):])
    assert main(["status", "s", "--dir", str(tmp_path)]) == 0


def _garbage_cases(data: bytes) -> dict[str, tuple[bytes, int]]:
    """name -> (damaged journal, offset of the first damaged byte)."""
    ends = _record_ends(data)
    mid = ends[len(ends) // 2]
    fused = ends[-4]  # what stock Optuna leaves: a torn record with the next batch appended
    return {
        "text_appended": (data + b"garbage\n", len(data)),
        "json_appended": (data + b'{"a": 1}\n', len(data)),
        "bytes_appended": (data + bytes(range(256)) * 4, len(data)),
        "line_in_middle": (data[:mid] + b"xx\n" + data[mid:], mid),
        "torn_then_appended": (data[: fused - 9] + data[fused:], ends[-5]),
    }


@pytest.mark.parametrize("case", ["text_appended", "json_appended", "bytes_appended",
                                  "line_in_middle", "torn_then_appended"])
def test_garbage_is_one_line_with_its_offset(
    tmp_path: Path, case: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _make_study(tmp_path, "s", 6)
    good = path.read_bytes()
    bad, off = _garbage_cases(good)[case]
    path.write_bytes(bad)
    n_before = good[:off].count(b"\n")
    for argv in (["status", "s"], ["export", "s", "--out", str(tmp_path / "t.csv")],
                 ["resume", "s", "--no-tracking"], ["run", str(path.parent / "spec.toml")]):
        assert main([*argv, "--dir", str(tmp_path)]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1, err
        assert f"byte {off} (line {n_before + 1}) is not an Optuna journal record" in err[0]
        assert f"the {n_before} records before it are intact" in err[0]
        assert f"truncate -s {off} {path}" in err[0] and "dse resume s" in err[0]
    assert path.read_bytes() == bad  # nothing written to a damaged journal
    # the way out works: cut at the offset, every reader and writer opens it again
    os.truncate(path, off)
    assert main(["status", "s", "--dir", str(tmp_path)]) == 0
    assert path.read_bytes() == good[:off] and len(_reader(path)) >= 3
    open_storage(None, path.parent, buffered=True)


def test_failed_write_cuts_back_and_keeps_the_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC after half a batch was written (simulated at the file-write layer)."""
    path = _make_study(tmp_path, "s", 3)
    storage = open_storage(None, path.parent, buffered=True)
    study = optuna.load_study(study_name="s", storage=storage)
    for _ in range(2):
        t = study.ask()  # written at once (a new trial takes the file's next id)
        study.tell(t, [t.suggest_float("x.0", 0, 1), t.suggest_float("x.1", 0, 1)])
    size = path.stat().st_size  # the last trial's parameters and tell are buffered
    assert _reader(path)[-1].state == TrialState.RUNNING
    real_write = os.write

    def half_then_full(fd: int, data: Any) -> int:
        real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(dse_storage.os, "write", half_then_full)
    with pytest.raises(StorageError) as exc:
        flush_storage(storage)
    msg = str(exc.value)
    assert "\n" not in msg and "No space left on device" in msg and "free space, then" in msg
    assert f"dse resume s --dir {tmp_path}" in msg
    assert path.stat().st_size == size  # cut back: the journal holds whole records only
    assert len(_reader(path)) == 5 and _reader(path)[-1].state == TrialState.RUNNING
    monkeypatch.setattr(dse_storage.os, "write", real_write)
    flush_storage(storage)  # space is back: the kept records are written
    got = _reader(path)
    assert len(got) == 5 and all(t.state == TrialState.COMPLETE for t in got)
    assert isinstance(storage._backend, BufferedJournalFileBackend)  # type: ignore[attr-defined]


@pytest.fixture
def small_tmpfs(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A 2 MB tmpfs (needs root and mount rights; skipped with the reason otherwise)."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.strip() or r.returncode}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.slow
def test_full_disk_stops_the_run_then_resume_completes(
    ray_session: Any, small_tmpfs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    n = 120  # about 1.3 KB of journal each: 64 KB hold some 45, in batches of a few
    spec = tmp_path / "full.toml"
    spec.write_text(study_spec("full", n_trials=n, sampler="random", options={"delay_s": 0.05},
                               tracking={"enabled": False}))
    root = small_tmpfs / "studies"
    filler = small_tmpfs / "filler"
    st = os.statvfs(small_tmpfs)
    filler.write_bytes(b"\0" * (st.f_bavail * st.f_frsize - 64 * 1024))  # 64 KB left
    assert main(["run", str(spec), "--dir", str(root), "--progress", "log"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert err[0].startswith(f"dse run: cannot write {root / 'full' / 'optuna.journal'}: "
                             "No space left on device; the study is intact up to its last flush")
    assert err[0].endswith(f"free space, then continue with `dse resume full --dir {root}`")
    journal = root / "full" / "optuna.journal"
    assert journal.read_bytes().endswith(b"\n") and dse_storage.find_damage(journal) is None
    before = Counter(t.state for t in _reader(journal, "full"))
    stale = [t.number for t in _reader(journal, "full") if t.state == TrialState.RUNNING]
    assert 0 < before[TrialState.COMPLETE] < n
    filler.unlink()  # space is back
    assert main(["resume", "full", "--dir", str(root), "--progress", "log"]) == 0
    trials = _reader(journal, "full")
    after = Counter(t.state for t in trials)
    assert after[TrialState.COMPLETE] == n and after[TrialState.RUNNING] == 0
    # each trial left RUNNING ran again as itself (adopted at the start), or, when its
    # driver's heartbeat still looked fresh then, was failed and re-enqueued once later
    failed = [k for k in stale if trials[k].state == TrialState.FAIL]
    assert all(trials[k].state == TrialState.COMPLETE for k in stale if k not in failed)
    assert after[TrialState.FAIL] == len(failed)
    retried = sorted(t.user_attrs["dse:retry_of"] for t in trials if "dse:retry_of" in t.user_attrs)
    assert retried == [k for k in failed if trials[k].params]  # (none to retry without parameters)


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_lock_of_a_dead_writer_is_broken_at_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A writer SIGKILLed mid-flush leaves its lock (and a torn record): the next writer
    breaks the lock of the dead pid with one log line instead of waiting out a grace period."""
    path = _make_study(tmp_path, "s", 2)
    lock = Path(str(path) + ".lock")
    pid = _dead_pid()
    lock.write_text(f"{pid} {socket.gethostname()}\n")
    with path.open("ab") as f:
        f.write(b'{"op_code":5,"worker')  # the torn record of the same kill
    caplog.set_level(logging.WARNING)
    storage = open_storage(None, path.parent, buffered=True)
    msgs = [r.getMessage() for r in caplog.records]
    assert f"{lock}: removed the lock of pid {pid}, which died holding it" in msgs
    assert not any("Forcibly releasing" in m or "unchanged for" in m for m in msgs), msgs
    assert any("cut a torn last record" in m for m in msgs) and not lock.exists()
    study = optuna.load_study(study_name="s", storage=storage)
    _ask = study.ask()
    study.tell(_ask, [_ask.suggest_float("x.0", 0, 1), _ask.suggest_float("x.1", 0, 1)])
    flush_storage(storage)
    assert len(_reader(path)) == 3 and not lock.exists()


def test_lock_of_a_live_writer_is_waited_for(tmp_path: Path) -> None:
    path = _make_study(tmp_path, "s", 1)
    lock = Path(str(path) + ".lock")
    lock.write_text(f"{os.getpid()} {socket.gethostname()}\n")  # held by a live process
    released: list[bool] = []

    def release_later() -> None:
        time.sleep(0.3)
        released.append(True)
        lock.unlink()

    th = threading.Thread(target=release_later)
    th.start()
    dse_storage.OwnedLock(str(path)).acquire()
    th.join()
    assert released == [True]  # acquired only after the holder let go
    assert lock.read_text().split() == [str(os.getpid()), socket.gethostname()]


WRITER = """
import sys
import optuna
from pathlib import Path
from dse.storage import open_storage, flush_storage
optuna.logging.set_verbosity(optuna.logging.ERROR)
storage = open_storage(None, Path(sys.argv[1]), buffered=True)
study = optuna.create_study(study_name="s", storage=storage, directions=["minimize"],
                            load_if_exists=True)
print("ready", flush=True)
while True:  # big records: a SIGKILL lands inside a write (a torn record) or a held lock
    t = study.ask()
    t.set_user_attr("blob", "x" * 4_000_000)
    study.tell(t, t.suggest_float("x", 0.0, 1.0))
    flush_storage(storage)
"""


@pytest.mark.slow
def test_writer_sigkilled_mid_write_then_reopened(tmp_path: Path) -> None:
    """A real writer process SIGKILLed at six moments while it writes 4 MB records: each
    time the next writer opens the journal (cutting a torn record, removing a dead lock),
    every reader reads it, and no COMPLETE trial is lost."""
    import random
    import sys

    sdir = tmp_path / "s"
    path = sdir / "optuna.journal"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    rng = random.Random(0)
    torn = locked = 0
    n_complete = 0
    for _ in range(6):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(sdir)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        size0 = path.stat().st_size
        while path.stat().st_size < size0 + 10_000_000:  # a few trials written
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.2))
        proc.kill()
        proc.wait()
        data = path.read_bytes()
        torn += not data.endswith(b"\n")
        locked += Path(str(path) + ".lock").exists()
        open_storage(None, sdir, buffered=True)  # the next writer: heals
        assert path.read_bytes().endswith(b"\n") and dse_storage.find_damage(path) is None
        trials = _reader(path)
        done = sum(t.state == TrialState.COMPLETE for t in trials)
        assert done >= n_complete + 1  # every flushed trial is still there
        n_complete = done
    print(f"kills that tore a record: {torn}/6, left the lock: {locked}/6")


@pytest.mark.slow
def test_read_only_study_is_one_line(small_tmpfs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = small_tmpfs / "studies"
    _make_study(root, "s", 2)
    r = subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot remount read-only: {r.stderr.strip()}")
    for argv, what in ((["resume", "s", "--no-tracking"], "Read-only file system"),
                       (["run", str(root / "s" / "spec.toml")], "Read-only file system"),
                       (["export", "s", "--out", str(small_tmpfs / "t.csv")], "Read-only file system")):
        assert main([*argv, "--dir", str(root)]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and what in err[0] and "Traceback" not in err[0], err
    assert main(["status", "s", "--dir", str(root)]) == 0  # reading needs no writes
