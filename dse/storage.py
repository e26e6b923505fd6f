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

import contextlib
import copy
import datetime
import errno
import json
import logging
import math
import os
import socket
import time
import uuid
from collections.abc import Container, Generator, Iterator
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import BaseStorage, JournalStorage
from optuna.storages._cached_storage import _CachedStorage
from optuna.storages.journal import JournalFileBackend
from optuna.storages.journal._file import BaseJournalFileLock, get_lock_file
from optuna.storages.journal._storage import JournalOperation
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
    """A journal file backend shared by any number of drivers, with buffered appends.

    Records whose effect depends on the order of all writers (a new study or trial, which
    takes the next id; a WAITING trial claimed as RUNNING) are written at once, under the
    journal's lock, after the buffered ones; the records of other writers found in the
    file before them are replayed first, so this process's ids are the file's ids. Every
    other record (parameters, attributes, the tell of an own trial) is kept in memory and
    written by :meth:`flush` (one lock, one ``fsync``), in any order relative to the other
    writers' records: they touch only this process's own trials and attributes.
    :meth:`exclusive` holds the lock across several operations (a check and a write that
    must not interleave with another driver's: the cap of ``n_trials``, a recovery).
    Records written outside a flush are not fsynced (a process kill keeps them; a machine
    crash may lose the records of the last ``FLUSH_S``, as for buffered ones).
    """

    _ORDERED = (JournalOperation.CREATE_STUDY, JournalOperation.CREATE_TRIAL)

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
        self._buffer: list[dict[str, Any]] = []  # own records not in the file yet
        self._pending: list[dict[str, Any]] = []  # records the replay has not seen yet
        self._offset = 0  # bytes of the file read or written by this process
        self._held = 0  # depth of exclusive()

    # ---------------------------------------------------------------- reading
    def _read_new(self) -> None:
        """Queue the complete records other writers appended since the last read."""
        size = os.path.getsize(self._file_path)
        if size <= self._offset:
            return
        with open(self._file_path, "rb") as f:
            f.seek(self._offset)
            data = f.read(size - self._offset)
        end = data.rfind(b"\n") + 1  # a torn or half-written last line waits
        for line in data[:end].splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                rec = None
            if not isinstance(rec, dict) or not isinstance(rec.get("op_code"), int):
                raise StorageError(damage_message(self._file_path, f", then{self._resume_hint}")
                                   or f"{self._file_path}: damaged")
            self._pending.append(rec)
        self._offset += end

    def read_logs(self, log_number_from: int) -> Generator[dict[str, Any], None, None]:
        """The records this process's replay has not seen: other writers' and its own."""
        if not self._held:
            self._read_new()
        out, self._pending = self._pending, []
        yield from out

    # ---------------------------------------------------------------- writing
    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        """Buffer ``logs``; an id-taking or claiming record is written at once (see the class)."""
        ordered = any(
            r["op_code"] in self._ORDERED
            or (r["op_code"] == JournalOperation.SET_TRIAL_STATE_VALUES
                and r.get("state") == TrialState.RUNNING)
            for r in logs
        )
        if ordered and not self._held:
            with self.exclusive(sync=False):
                self._pending.extend(logs)
                self._buffer.extend(logs)
            return
        self._pending.extend(logs)
        self._buffer.extend(logs)

    @contextlib.contextmanager
    def exclusive(self, sync: bool = False) -> Iterator[None]:
        """Hold the journal's lock: no other writer appends until the block ends.

        On entry the other writers' new records are queued for the replay; on exit the
        buffered records are written (``sync``: and fsynced).
        """
        if self._held:
            self._held += 1
            try:
                yield
            finally:
                self._held -= 1
            return
        with get_lock_file(self._lock):
            self._read_new()
            self._held = 1
            try:
                yield
            finally:
                self._held = 0
                self._write(sync)

    def _write(self, sync: bool) -> int:
        """Append the buffer to the file (the lock is held); returns the records written."""
        if not self._buffer:
            return 0
        data = ("\n".join(json.dumps(r, separators=(",", ":")) for r in self._buffer) + "\n").encode()
        size = os.path.getsize(self._file_path)
        try:
            try:
                _append(self._file_path, data, sync=sync)
            except OSError:
                os.truncate(self._file_path, size)  # shrinking needs no space
                raise
        except OSError as e:
            raise self._write_error(e) from None
        n = len(self._buffer)
        self._buffer = []
        self._offset = size + len(data)
        return n

    def flush(self) -> int:
        """Write the buffered records (one lock, one fsync); returns how many.

        Raises:
            StorageError: the write failed (e.g. the disk is full). The file is cut back to
                its size before the write and the records stay buffered.
        """
        if not self._buffer:
            return 0
        n = len(self._buffer)
        try:
            with self.exclusive(sync=True):
                pass
        except OSError as e:  # taking the lock failed (e.g. no room for the lock file)
            raise self._write_error(e) from None
        return n

    def _write_error(self, e: OSError) -> StorageError:
        why = os.strerror(e.errno) if e.errno else str(e)
        free = " free space, then" if e.errno in (errno.ENOSPC, errno.EDQUOT) else ""
        return StorageError(
            f"cannot write {self._file_path}: {why}; the study is intact up to its last "
            f"flush ({len(self._buffer)} records not written, their trials run again);"
            f"{free} continue with{self._resume_hint or ' `dse resume`'}"
        )


def _append(path: str, data: bytes, sync: bool = True) -> None:
    """Append ``data`` to ``path`` (every byte, or OSError); ``sync``: fsync it."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if sync:
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


def is_journal(url: str | None) -> bool:
    """Whether ``url`` names a journal file (``None``: the study directory's default one)."""
    return url is None or (url.endswith((".journal", ".log")) and "://" not in url)


def storage_url(url: str) -> str:
    """The SQLAlchemy URL for ``url``: ``postgresql://`` and ``postgres://`` use psycopg 3.

    SQLAlchemy's default PostgreSQL driver is psycopg2; dse installs psycopg 3 (the
    ``postgresql`` extra), so a plain ``postgresql://`` URL is mapped to
    ``postgresql+psycopg://``. A URL naming its driver (``postgresql+psycopg2://``) is kept.
    """
    for plain in ("postgresql://", "postgres://"):
        if url.startswith(plain):
            return "postgresql+psycopg://" + url[len(plain):]
    return url


def redact(url: str | None) -> str:
    """``url`` without its password (for messages and MLflow tags)."""
    if url is None or is_journal(url):
        return url or "journal:optuna.journal"
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - a message must not fail
        return url.split("@")[-1]


def check_storage(url: str, timeout_s: float = 5.0) -> str | None:
    """Why the study storage ``url`` cannot be used now (``None``: it can).

    A journal path needs nothing. A database URL needs its driver importable (PostgreSQL:
    ``pip install 'dse[postgresql]'``) and its server reachable: one connection is made,
    waiting at most ``timeout_s``. The answer is one line, without the password.
    """
    if is_journal(url):
        return None
    import sqlalchemy
    from sqlalchemy.engine import make_url

    u = make_url(storage_url(url))
    try:
        u.get_dialect().import_dbapi()
    except ImportError as e:
        extra = " (pip install 'dse[postgresql]')" if u.get_backend_name() == "postgresql" else ""
        return f"storage {redact(url)}: driver {u.get_driver_name()!r} is not installed ({e}){extra}"
    args: dict[str, Any] = {}
    if u.get_backend_name() in ("postgresql", "mysql"):
        args["connect_timeout"] = max(1, int(timeout_s))
    try:
        engine = sqlalchemy.create_engine(u, connect_args=args, poolclass=sqlalchemy.pool.NullPool)
        with engine.connect() as c:
            c.execute(sqlalchemy.text("SELECT 1"))
    except Exception as e:  # noqa: BLE001 - one line: refused, unknown host, auth, ...
        why = (str(getattr(e, "orig", None) or e).strip().splitlines() or [type(e).__name__])[0]
        return f"storage {redact(url)}: cannot connect ({why})"
    return None


def open_rdb(url: str) -> optuna.storages.RDBStorage:
    """An Optuna ``RDBStorage`` for ``url`` with the connection settings dse uses.

    ``pool_pre_ping`` (a connection the server dropped is replaced, not an error mid-run);
    PostgreSQL: ``synchronous_commit=off`` for this client's transactions: a commit no
    longer waits for the server's WAL fsync (measured 5 ms here, several per trial), and a
    server crash may lose the last ~0.6 s of commits but never corrupts the database:
    the same guarantee as the journal's 0.2 s buffer. A driver crash loses nothing.
    """
    from sqlalchemy.engine import make_url

    u = storage_url(url)
    engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}
    pg = make_url(u).get_backend_name() == "postgresql"
    if pg:
        engine_kwargs["connect_args"] = {"options": "-c synchronous_commit=off", "connect_timeout": 10}
    try:
        with _schema_lock(u, pg):  # drivers starting together create Optuna's tables once
            return optuna.storages.RDBStorage(u, engine_kwargs=engine_kwargs)
    except ImportError as e:
        raise StorageError(f"storage {redact(url)}: driver not installed ({e}); "
                           "pip install 'dse[postgresql]'") from None
    except Exception as e:  # noqa: BLE001 - sqlalchemy.exc.OperationalError and friends
        why = (str(getattr(e, "orig", None) or e).strip().splitlines() or [type(e).__name__])[0]
        raise StorageError(f"storage {redact(url)}: cannot connect ({why})") from None


@contextlib.contextmanager
def _schema_lock(url: str, pg: bool) -> Iterator[None]:
    """PostgreSQL: an advisory lock around Optuna's schema creation (``CREATE TABLE`` from
    several clients at once fails on PostgreSQL's catalog); other databases: nothing."""
    if not pg:
        yield
        return
    import sqlalchemy

    engine = sqlalchemy.create_engine(url, connect_args={"connect_timeout": 10},
                                      poolclass=sqlalchemy.pool.NullPool)
    key = {"k": _PG_LOCK_BASE - 1}
    with engine.connect() as c:
        c.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), key)
        try:
            yield
        finally:
            c.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), key)
            c.commit()


class DriverRDBStorage(_CachedStorage):
    """Optuna's cached RDB storage, reading the study's trials less often (the driver's).

    ``study.ask()`` and the samplers call ``get_all_trials`` 3-4 times per trial, and
    Optuna's cache re-reads every unfinished trial from the database each time (7 queries
    per read: the trials and each related table). Here a read happens only when this
    process finished or enqueued a trial since the last read, or ``REFRESH_S`` has passed
    (other drivers' trials); otherwise the last read is returned. A single driver thus sees
    exactly what a read per call would show at the points where it matters (after each
    of its tells); other drivers' trials appear within ``REFRESH_S``. Counting for the
    ``n_trials`` cap never uses this cache (:func:`state_counts`).
    """

    REFRESH_S = 1.0

    def __init__(self, backend: optuna.storages.RDBStorage) -> None:
        super().__init__(backend)
        self._read_at: dict[int, float] = {}
        self._dirty = True
        self._mine: dict[int, FrozenTrial] = {}

    def _read_trials_from_remote_storage(self, study_id: int) -> None:
        now = time.monotonic()
        if self._dirty or now - self._read_at.get(study_id, -math.inf) >= self.REFRESH_S:
            self._dirty = False
            self._read_at[study_id] = now
            super()._read_trials_from_remote_storage(study_id)

    # This driver's own RUNNING trials are mirrored in memory: ``get_trial`` (three times
    # per trial: ask, tell's check, tell's result; 7 queries each) reads the mirror, which
    # every write of this process updates after the database accepted it.

    def create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> int:
        """As Optuna's; a new RUNNING trial is mirrored; after an enqueued (template) one
        the next ``get_all_trials`` reads again."""
        tid = super().create_new_trial(study_id, template_trial)
        self._mine = {k: t for k, t in self._mine.items() if not t.state.is_finished()}
        if template_trial is None:
            sid, number = self._trial_id_to_study_id_and_number[tid]
            self._mine[tid] = copy.deepcopy(self._studies[sid].trials[number])
        else:
            self._dirty = True
        return tid

    def get_trial(self, trial_id: int) -> FrozenTrial:
        """The mirror of an own trial, else as Optuna's."""
        mine = self._mine.get(trial_id)
        return mine if mine is not None else super().get_trial(trial_id)

    def set_trial_param(self, trial_id: int, param_name: str, param_value_internal: float,
                        distribution: Any) -> None:
        """As Optuna's, mirrored."""
        super().set_trial_param(trial_id, param_name, param_value_internal, distribution)
        if (t := self._mine.get(trial_id)) is not None:
            t._params[param_name] = distribution.to_external_repr(param_value_internal)
            t._distributions[param_name] = distribution

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        """As Optuna's, mirrored."""
        super().set_trial_user_attr(trial_id, key, value)
        if (t := self._mine.get(trial_id)) is not None:
            t._user_attrs[key] = value

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        """As Optuna's, mirrored."""
        super().set_trial_system_attr(trial_id, key, value)
        if (t := self._mine.get(trial_id)) is not None:
            t._system_attrs[key] = value

    def set_trial_state_values(
        self, trial_id: int, state: TrialState, values: Any = None
    ) -> bool:
        """As Optuna's, mirrored; the next ``get_all_trials`` reads again."""
        self._dirty = True
        try:
            ok = super().set_trial_state_values(trial_id, state=state, values=values)
        except Exception:
            self._mine.pop(trial_id, None)  # e.g. failed meanwhile as an orphan: read it again
            raise
        if (t := self._mine.get(trial_id)) is not None and state.is_finished():
            t.state = state
            t._values = None if values is None else [float(v) for v in values]
            t.datetime_complete = datetime.datetime.now()
        return ok

    def refresh(self) -> None:
        """Read again at the next ``get_all_trials`` (e.g. before the final summary)."""
        self._dirty = True


def open_storage(url: str | None, sdir: Path, *, buffered: bool = False) -> BaseStorage:
    """Open a study's Optuna storage.

    Args:
        url: ``None`` for the default journal file ``<sdir>/optuna.journal``; a database
            URL (``sqlite:///...``, ``postgresql://...``) for an RDB storage; a path ending
            in ``.journal`` or ``.log`` for a journal file elsewhere.
        sdir: the study directory (created for the default journal only).
        buffered: journal files only: buffer writes until :func:`flush_storage` (the
            driver's mode; any number of drivers may share the file).
    """
    if is_journal(url):
        if url is None:
            sdir.mkdir(parents=True, exist_ok=True)
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
    assert url is not None
    return DriverRDBStorage(open_rdb(url)) if buffered else open_rdb(url)


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
    elif isinstance(storage, DriverRDBStorage):
        storage.refresh()  # written already: the next read sees the other drivers' too


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


# ----------------------------------------------------------------------------- several drivers
# Any number of drivers (processes, hosts) may run one study. Each writes a heartbeat
# (study system attribute ``dse:driver:<id>``), marks the trials it asks (trial system
# attribute ``dse:owner``), and asks only while COMPLETE + RUNNING < n_trials, counted in
# the storage under a storage-wide lock (:func:`exclusive`), so together they end with
# exactly n_trials COMPLETE. A RUNNING trial whose owner is gone (a dead pid on this host,
# a heartbeat older than ``GRACE_S``, a driver that ended) is failed and re-enqueued once,
# by whichever driver sees it first, under the same lock.

HEARTBEAT_S = float(os.environ.get("DSE_HEARTBEAT_S") or 5.0)  # driver heartbeat period
GRACE_S = 3 * HEARTBEAT_S  # a heartbeat older than this: its driver is gone
DRIVER_PREFIX = "dse:driver:"
OWNER_ATTR = "dse:owner"
_PG_LOCK_BASE = 0x6473650000000000  # "dse" in the high bytes; the study id in the low ones


def host_name() -> str:
    """The name this driver records as its host: ``$DSE_HOST``, else the hostname.

    Two drivers on one host can tell a dead pid at once; across hosts only the heartbeat
    age counts (the hosts' clocks must agree within seconds: NTP).
    """
    return os.environ.get("DSE_HOST") or socket.gethostname()


def _rdb(study: optuna.Study) -> Any:
    """The study's ``RDBStorage`` (unwrapped from Optuna's cache), or ``None``."""
    st = study._storage
    st = getattr(st, "_backend", st)
    return st if isinstance(st, optuna.storages.RDBStorage) else None


@contextlib.contextmanager
def exclusive(study: optuna.Study) -> Iterator[None]:
    """A lock over the study's storage, shared by every driver on every host.

    Journal: the journal file's lock (other writers' records are read on entry, this
    process's written on exit). PostgreSQL: a session advisory lock on the study. SQLite:
    an ``flock`` beside the database file. MySQL: ``GET_LOCK``.
    """
    backend = getattr(study._storage, "_backend", None)
    if isinstance(backend, BufferedJournalFileBackend):
        with backend.exclusive():
            yield
        return
    rdb = _rdb(study)
    if rdb is None:  # a plain journal or in-memory storage: one process
        yield
        return
    import sqlalchemy

    dialect = rdb.engine.dialect.name
    if dialect == "sqlite":
        import fcntl

        db = rdb.engine.url.database or ""
        with open(f"{db}.dse-lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
        return
    if dialect == "postgresql":
        lock, unlock = "SELECT pg_advisory_lock(:k)", "SELECT pg_advisory_unlock(:k)"
        key: Any = _PG_LOCK_BASE + study._study_id
    elif dialect in ("mysql", "mariadb"):
        lock, unlock = "SELECT GET_LOCK(:k, -1)", "SELECT RELEASE_LOCK(:k)"
        key = f"dse:{study._study_id}"
    else:
        yield
        return
    with rdb.engine.connect() as c:
        c.execute(sqlalchemy.text(lock), {"k": key})
        try:
            yield
        finally:
            c.execute(sqlalchemy.text(unlock), {"k": key})
            c.commit()


def state_counts(study: optuna.Study) -> dict[TrialState, int]:
    """Trials of the study by state, read now (RDB: one ``GROUP BY`` query)."""
    counts = {s: 0 for s in TrialState}
    rdb = _rdb(study)
    if rdb is not None:
        import sqlalchemy
        from optuna.storages._rdb.models import TrialModel

        q = (sqlalchemy.select(TrialModel.state, sqlalchemy.func.count())
             .where(TrialModel.study_id == study._study_id).group_by(TrialModel.state))
        with rdb.engine.connect() as c:
            for state, n in c.execute(q):
                counts[TrialState[state] if isinstance(state, str) else TrialState(state)] = int(n)
        return counts
    for t in study._storage.get_all_trials(study._study_id, deepcopy=False):
        counts[t.state] += 1
    return counts


class Cooperation:
    """This driver's part in a study that other drivers may run at the same time.

    Args:
        study: the study.
        requeue: enqueues the parameters of a recovered trial (the driver's retry rule).
    """

    def __init__(self, study: optuna.Study, requeue: Any) -> None:
        self.study = study
        self.requeue = requeue
        self.id = uuid.uuid4().hex[:12]
        self.pid = os.getpid()
        self.host = host_name()

    def beat(self, done: bool = False) -> None:
        """Write this driver's heartbeat (``done``: it has ended)."""
        set_system_attr(self.study, DRIVER_PREFIX + self.id,
                        {"pid": self.pid, "host": self.host, "time": time.time(), "done": done})

    def ask(self, n_trials: int) -> tuple[optuna.Trial | None, dict[TrialState, int]]:
        """A new trial, or ``None`` when COMPLETE + RUNNING (all drivers) reach ``n_trials``.

        Returns the trial and the study's counts by state before it was asked.
        """
        with exclusive(self.study):
            counts = state_counts(self.study)
            if counts[TrialState.COMPLETE] + counts[TrialState.RUNNING] >= n_trials:
                return None, counts
            trial = self.study.ask()
            self.study._storage.set_trial_system_attr(trial._trial_id, OWNER_ATTR, self.id)
        return trial, counts

    def enqueue_once(self, key: str, points: list[dict[str, Any]], user_attrs: dict[str, Any]) -> bool:
        """Enqueue ``points`` unless the study attribute ``key`` says it was done (race-free)."""
        with exclusive(self.study):
            if system_attrs(self.study).get(key):
                return False
            for p in points:
                self.study.enqueue_trial(p, user_attrs=user_attrs)
            set_system_attr(self.study, key, True)
        return True

    def _drivers(self) -> dict[str, dict[str, Any]]:
        return {k[len(DRIVER_PREFIX):]: v for k, v in system_attrs(self.study).items()
                if k.startswith(DRIVER_PREFIX) and isinstance(v, dict)}

    def _gone(self, hb: dict[str, Any], now: float) -> bool:
        if hb.get("done"):
            return True
        if hb.get("host") == self.host and isinstance(hb.get("pid"), int) and not _alive(hb["pid"]):
            return True
        return now - float(hb.get("time", 0.0)) > GRACE_S

    def orphan(self, t: FrozenTrial, drivers: dict[str, dict[str, Any]], now: float) -> bool:
        """Whether RUNNING trial ``t`` has no live driver."""
        owner = t.system_attrs.get(OWNER_ATTR)
        if owner == self.id:
            return False
        hb = drivers.get(owner) if isinstance(owner, str) else None
        if hb is not None:
            return self._gone(hb, now)
        # no owner recorded (made outside a driver, or an older dse): an orphan unless a
        # live driver might have just asked it
        live = any(not self._gone(h, now) for i, h in drivers.items() if i != self.id)
        started = t.datetime_start.timestamp() if t.datetime_start else 0.0
        return not live or now - started > GRACE_S

    def adopt(self) -> list[FrozenTrial]:
        """The orphaned RUNNING trials, now owned by this driver (which runs them again as
        themselves); another driver cannot adopt the same one (under the storage lock)."""
        out: list[FrozenTrial] = []
        with exclusive(self.study):
            drivers, now = self._drivers(), time.time()
            for t in self._running():
                if self.orphan(t, drivers, now):
                    self.study._storage.set_trial_system_attr(t._trial_id, OWNER_ATTR, self.id)
                    out.append(t)
        return out

    def _running(self) -> list[FrozenTrial]:
        """The RUNNING trials as the storage holds them now (no cached read)."""
        st = self.study._storage
        if isinstance(st, DriverRDBStorage):
            st.refresh()
        return self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))

    def recover(self, reason: str) -> list[int]:
        """Fail every orphaned RUNNING trial with ``reason`` and re-enqueue it, once."""
        out: list[int] = []
        with exclusive(self.study):
            drivers, now = self._drivers(), time.time()
            for t in self._running():
                if self.orphan(t, drivers, now):
                    try:
                        fail_trial(self.study, t, reason)
                    except optuna.exceptions.UpdateFinishedTrialError:
                        continue  # finished meanwhile (a cached view): not an orphan
                    self.requeue(t)
                    out.append(t.number)
        return out

    def live_drivers(self) -> list[dict[str, Any]]:
        """Heartbeats of the other drivers that are running now."""
        now = time.time()
        return [h for i, h in self._drivers().items() if i != self.id and not self._gone(h, now)]
