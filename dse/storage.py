"""Optuna storage of a study: a journal file under the study directory by default.

The driver is the only writer of its study while it runs (it refuses a study another live
driver holds), so it can batch its journal writes: :class:`BufferedJournalFileBackend`
keeps appended log records in memory and writes them with one lock and one ``fsync`` per
:meth:`~BufferedJournalFileBackend.flush`. The driver flushes at most every
``FLUSH_S`` = 0.2 s, and whenever it has waited that long for Ray, so a crash loses at most
the last 0.2 s of records; those trials are then missing or RUNNING in the journal and
``dse resume`` re-runs them.
Measured here: Optuna's stock backend fsyncs every record (about 7 per trial), which cost
more than half of the driver's per-trial time (docs/benchmarks.md).

Readers in other processes (``dse status``) see a consistent prefix of the journal.

Faults (docs/driver.md, "What survives which fault"):

* a torn last record (a kill or a full disk mid-write) is cut back to the last complete
  record when a writer opens the journal, said so in one log line;
* a complete line that is not a journal record (garbage) stops every reader and writer
  with :class:`StorageError`: one line naming its byte offset and the way out (cut the
  journal there; the records before it are intact);
* a failed write (``ENOSPC``, ``EIO``, ...) is cut back to the journal's previous size and
  raises :class:`StorageError`; the study is intact up to the last flush and ``dse resume``
  continues it once the disk has room.
"""

from __future__ import annotations

import copy
import errno
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Container, Generator
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import BaseStorage, JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.storages.journal._file import BaseJournalFileLock, get_lock_file
from optuna.trial import FrozenTrial, TrialState

log = logging.getLogger("dse")

_CHUNK_BYTES = 1 << 16  # backwards reads of a journal's tail


class StorageError(RuntimeError):
    """The study's storage cannot be read or written; the message is one line with the way out."""


def _is_record(line: bytes) -> bool:
    """Whether ``line`` (without its newline) is one Optuna journal record."""
    try:
        rec = json.loads(line)
    except ValueError:  # JSON and Unicode decoding errors
        return False
    return isinstance(rec, dict) and isinstance(rec.get("op_code"), int)


def find_damage(path: str | Path) -> tuple[int, int, int] | None:
    """The first complete line of journal ``path`` that is not a record, if any.

    Returns ``(byte_offset, records_before, records_after)``, or ``None`` when every
    complete line is a record (a torn last line without its newline is not damage).
    """
    offset = n_good = 0
    bad: int | None = None
    n_after = 0
    with open(path, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                break  # a torn tail
            if bad is None:
                if _is_record(line[:-1]):
                    n_good += 1
                else:
                    bad = offset
            else:
                n_after += 1
            offset += len(line)
    return None if bad is None else (bad, n_good, n_after)


def damage_message(path: str | Path, resume_hint: str = "") -> str | None:
    """One line naming the first damaged byte of journal ``path`` and the way out, or None."""
    found = find_damage(path)
    if found is None:
        return None
    off, before, after = found
    return (
        f"{path}: byte {off} (line {before + 1}) is not an Optuna journal record; the {before} "
        f"records before it are intact, {after} line(s) after it would be dropped: keep the "
        f"intact part with `truncate -s {off} {path}` (copy the file first){resume_hint}"
    )


def _tail(path: str | Path) -> tuple[int, int, bytes]:
    """``(size, end of the last complete line, that line)`` of journal ``path``."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        found: list[int] = []  # offsets of the last two newlines
        end = size
        while end > 0 and len(found) < 2:  # read backwards
            start = max(0, end - _CHUNK_BYTES)
            f.seek(start)
            chunk = f.read(end - start)
            i = len(chunk)
            while len(found) < 2 and (i := chunk.rfind(b"\n", 0, i)) >= 0:
                found.append(start + i)
            end = start
        if not found:
            return size, 0, b""
        first = found[1] + 1 if len(found) == 2 else 0
        f.seek(first)
        return size, found[0] + 1, f.read(found[0] - first)


def check_journal(path: str | Path, *, heal: bool, resume_hint: str = "") -> None:
    """Check the end of journal ``path``; with ``heal``, cut a torn last record.

    A torn last record (bytes after the last newline) is what a kill or a full disk
    mid-write leaves; readers skip it, a writer (``heal``, holding the journal's lock)
    cuts it and says so in one log line. A last complete line that is not a record is
    damage: :class:`StorageError` with the first damaged offset and the way out.
    """
    if not os.path.exists(path):
        return
    size, keep, last = _tail(path)
    if keep and not _is_record(last):
        raise StorageError(damage_message(path, resume_hint) or f"{path}: damaged")
    if heal and keep < size:
        os.truncate(path, keep)
        log.warning(
            "%s: cut a torn last record (%d bytes at byte %d, an interrupted write); "
            "the journal ends with its last complete record", path, size - keep, keep,
        )


class OwnedLock(BaseJournalFileLock):
    """The journal's write lock, ``<journal>.lock``, naming its holder (``pid host``).

    A writer killed while it holds the lock (mid-flush: the moment that also tears the
    last record) leaves the file behind. Optuna's own lock then makes the next writer wait
    30 s before breaking it; this one breaks at once a lock whose holder is a dead
    process on this host (one log line). Held by a live process, another host, or an
    unreadable holder (Optuna's symlink lock, which it excludes as well: same path), it
    waits, and breaks it only after ``grace_s`` without change, as Optuna does.
    """

    def __init__(self, journal_path: str, grace_s: float = 30.0) -> None:
        self._path = journal_path + ".lock"
        self._grace_s = grace_s

    def _holder(self) -> tuple[int, str] | None:
        try:
            pid, host = open(self._path, encoding="utf-8").read().split()
            return int(pid), host
        except (OSError, ValueError):  # a symlink lock, a lock being written, gone
            return None

    def _break(self) -> None:
        aside = f"{self._path}.{uuid.uuid4().hex}.stale"
        try:
            os.rename(self._path, aside)  # atomic: only one breaker wins
            os.unlink(aside)
        except OSError:
            pass

    def acquire(self) -> bool:
        """Take the lock (blocking); breaks a dead holder's lock at once."""
        sleep_s, seen, since = 0.001, None, time.monotonic()
        while True:
            try:
                fd = os.open(self._path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                holder = self._holder()
                if holder is not None and holder[1] == socket.gethostname() and not _alive(holder[0]):
                    log.warning("%s: removed the lock of pid %d, which died holding it",
                                self._path, holder[0])
                    self._break()
                    continue
                try:
                    mtime = os.lstat(self._path).st_mtime
                except OSError:
                    continue
                if mtime != seen:
                    seen, since = mtime, time.monotonic()
                elif time.monotonic() - since > self._grace_s:
                    log.warning("%s: removed a lock unchanged for %.0f s (holder %s)",
                                self._path, self._grace_s, holder or "unknown")
                    self._break()
                    continue
                time.sleep(sleep_s)
                sleep_s = min(2 * sleep_s, 0.1)
                continue
            try:
                os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
            except OSError:  # e.g. a full disk: leave no lock without a holder behind
                os.close(fd)
                os.unlink(self._path)
                raise
            os.close(fd)
            return True

    def release(self) -> None:
        """Drop the lock."""
        aside = f"{self._path}.{uuid.uuid4().hex}.release"
        os.rename(self._path, aside)
        os.unlink(aside)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, another user's
        return True
    return True


class BufferedJournalFileBackend(JournalFileBackend):
    """A journal file backend whose appends are buffered until :meth:`flush`.

    Only for a single writing process; other processes may read the file at any time.
    """

    def __init__(self, file_path: str, resume_hint: str = "") -> None:
        self._resume_hint = resume_hint
        try:
            super().__init__(file_path, lock_obj=OwnedLock(file_path))
            with get_lock_file(self._lock):
                check_journal(file_path, heal=True, resume_hint=f", then{resume_hint}")
        except OSError as e:  # a read-only or full file system, no permission
            why = os.strerror(e.errno) if e.errno else str(e)
            raise StorageError(f"cannot write the journal {file_path} ({why}): nothing was "
                               f"changed; make it writable, then{resume_hint or ' `dse resume`'}") from None
        self._buffer: list[dict[str, Any]] = []
        self._n_file = 0  # records known to be in the file
        self._synced = False  # read the whole file once

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        """Buffer ``logs`` (written by the next :meth:`flush`)."""
        self._buffer.extend(logs)

    def read_logs(self, log_number_from: int) -> Generator[dict[str, Any], None, None]:
        """Records from ``log_number_from`` on: the file's, then the buffered ones."""
        n = log_number_from
        if not self._synced or log_number_from < self._n_file:
            for log in super().read_logs(log_number_from):
                n += 1
                yield log
            self._n_file = max(self._n_file, n)
            self._synced = True
        start = max(0, log_number_from - self._n_file)
        yield from self._buffer[start:]

    def flush(self) -> int:
        """Write the buffered records (one lock, one fsync); returns how many.

        Raises:
            StorageError: the write failed (e.g. the disk is full). The file is cut back to
                its size before the write and the records stay buffered.
        """
        if not self._buffer:
            return 0
        data = ("\n".join(json.dumps(r, separators=(",", ":")) for r in self._buffer) + "\n").encode()
        try:
            with get_lock_file(self._lock):
                size = os.path.getsize(self._file_path)
                try:
                    _append(self._file_path, data)
                except OSError:
                    os.truncate(self._file_path, size)  # shrinking needs no space
                    raise
        except OSError as e:
            why = os.strerror(e.errno) if e.errno else str(e)
            free = " free space, then" if e.errno in (errno.ENOSPC, errno.EDQUOT) else ""
            raise StorageError(
                f"cannot write {self._file_path}: {why}; the study is intact up to its last "
                f"flush ({len(self._buffer)} records not written, their trials run again);"
                f"{free} continue with{self._resume_hint or ' `dse resume`'}"
            ) from None
        n = len(self._buffer)
        self._buffer = []
        self._n_file += n
        return n


def _append(path: str, data: bytes) -> None:
    """Append ``data`` to ``path`` and fsync (every byte, or OSError)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


class DriverJournalStorage(JournalStorage):
    """``JournalStorage`` with the in-memory storage's fast path for WAITING trials.

    ``study.ask()`` looks for enqueued (WAITING) trials on every call; the stock journal
    storage scans every trial for that (O(n) per ask, a quarter of the storage time at
    2,000 trials). Trials never return to WAITING, so the scan can start at the first
    trial that was still WAITING last time.
    """

    def __init__(self, backend: JournalFileBackend) -> None:
        super().__init__(backend)
        self._waiting_from: dict[int, int] = {}

    def get_all_trials(
        self, study_id: int, deepcopy: bool = True, states: Container[TrialState] | None = None
    ) -> list[FrozenTrial]:
        """As ``JournalStorage.get_all_trials``; WAITING-only queries scan from a bookmark."""
        if states != (TrialState.WAITING,):
            return super().get_all_trials(study_id, deepcopy=deepcopy, states=states)
        with self._thread_lock:
            self._sync_with_backend()
            replay = self._replay_result
            ids = replay._study_id_to_trial_ids.get(study_id)
            if ids is None:
                return super().get_all_trials(study_id, deepcopy=deepcopy, states=states)
            start = self._waiting_from.get(study_id, 0)
            out: list[FrozenTrial] = []
            for i in range(start, len(ids)):
                t = replay._trials[ids[i]]
                if t.state == TrialState.WAITING:
                    if not out:
                        self._waiting_from[study_id] = i
                    out.append(t)
            if not out:
                self._waiting_from[study_id] = len(ids)
        return copy.deepcopy(out) if deepcopy else out


def open_storage(url: str | None, sdir: Path, *, buffered: bool = False) -> BaseStorage:
    """Open a study's Optuna storage.

    Args:
        url: ``None`` for the default journal file ``<sdir>/optuna.journal``; a database
            URL (``sqlite:///...``, ``postgresql://...``) for an RDB storage; a path ending
            in ``.journal`` or ``.log`` for a journal file elsewhere.
        sdir: the study directory (created).
        buffered: journal files only: buffer writes until :func:`flush_storage` (the
            driver's mode; a single writing process).
    """
    sdir.mkdir(parents=True, exist_ok=True)
    if url is None or (url.endswith((".journal", ".log")) and "://" not in url):
        path = str(sdir / "optuna.journal") if url is None else url
        hint = f" `dse resume {sdir.name} --dir {sdir.parent}`"
        try:
            if buffered:
                return DriverJournalStorage(BufferedJournalFileBackend(path, resume_hint=hint))
            check_journal(path, heal=False, resume_hint=f", then{hint}")
            return JournalStorage(JournalFileBackend(path))
        except (ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
            msg = damage_message(path, f", then{hint}")
            if msg is None:
                raise
            raise StorageError(msg) from e
    return optuna.storages.RDBStorage(url)


def buffered_records(storage: BaseStorage) -> int:
    """Journal records of ``storage`` written but not yet flushed (0 for other storages)."""
    backend = getattr(storage, "_backend", None)
    return len(backend._buffer) if isinstance(backend, BufferedJournalFileBackend) else 0


def flush_storage(storage: BaseStorage) -> None:
    """Write any buffered journal records of ``storage`` (no-op for other storages)."""
    backend = getattr(storage, "_backend", None)
    if isinstance(backend, BufferedJournalFileBackend):
        with storage._thread_lock:  # type: ignore[attr-defined]
            backend.flush()


# ----------------------------------------------------------------------------- study helpers
# The only place outside Optuna that touches a study's storage internals.


def system_attrs(study: optuna.Study) -> dict[str, Any]:
    """The study's system attributes (``dse:driver``, ``dse:baselines_enqueued``, ...)."""
    return study._storage.get_study_system_attrs(study._study_id)


def set_system_attr(study: optuna.Study, key: str, value: Any) -> None:
    """Set one study system attribute."""
    study._storage.set_study_system_attr(study._study_id, key, value)


UID_ATTR = "dse:uid"


def study_uid(study: optuna.Study) -> str:
    """The study's identity across storages and tracking servers: a random hex string set
    once when the study is first opened by dse (a system attribute). MLflow runs are keyed
    by it, so a new study that re-uses a name never adopts an old study's runs."""
    uid = system_attrs(study).get(UID_ATTR)
    if not isinstance(uid, str):
        import uuid

        uid = uuid.uuid4().hex
        set_system_attr(study, UID_ATTR, uid)
    return uid


def fail_trial(study: optuna.Study, trial: FrozenTrial, reason: str) -> None:
    """Fail a trial known only as a ``FrozenTrial`` (e.g. left RUNNING), with ``fail_reason``."""
    study._storage.set_trial_user_attr(trial._trial_id, "fail_reason", reason)
    study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)


def running_trial(study: optuna.Study, trial: FrozenTrial) -> optuna.Trial:
    """A live ``optuna.Trial`` for a RUNNING trial known only as a ``FrozenTrial`` (e.g. left
    RUNNING by a driver that died), to evaluate and tell it as itself."""
    return optuna.Trial(study, trial._trial_id)


def unflushed(study: optuna.Study) -> int:
    """Records of the study written but not yet flushed (see :func:`buffered_records`)."""
    return buffered_records(study._storage)


def flush(study: optuna.Study) -> None:
    """Write the study's buffered records (see :func:`flush_storage`)."""
    flush_storage(study._storage)
