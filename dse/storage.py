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
import threading
import time
import uuid
from collections.abc import Callable, Container, Generator, Iterator
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import BaseStorage, JournalStorage
from optuna.storages._cached_storage import _CachedStorage
from optuna.storages.journal import JournalFileBackend
from optuna.storages.journal._file import BaseJournalFileLock, get_lock_file
from optuna.storages.journal._storage import JournalOperation
from optuna.trial import FrozenTrial, TrialState

from dse.schema import first_line

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

    Other queries (a sampler asks for the trials several times per ask) reuse the list
    built by the last identical query while no record was applied since (any change to
    any trial is a record), instead of scanning every trial again.
    """

    def __init__(self, backend: JournalFileBackend) -> None:
        super().__init__(backend)
        self._waiting_from: dict[int, int] = {}
        # state_counts: per study, finished trials counted so far, how many trials were
        # looked at, and the positions of those not finished then (looked at again)
        self._finished: dict[int, dict[TrialState, int]] = {}
        self._seen: dict[int, int] = {}
        self._open: dict[int, list[int]] = {}
        # get_all_trials: (study, states) -> (records applied then, the trials)
        self._lists: dict[tuple[int, Any], tuple[int, list[FrozenTrial]]] = {}

    def state_counts(self, study_id: int) -> dict[TrialState, int]:
        """Trials of the study by state, read now (other writers' records included).

        Finished trials never change state, so each is counted once; only new trials and
        those not finished at the last call are looked at (the stock count is a scan of
        every trial, O(n) per ask).
        """
        with self._thread_lock:
            self._sync_with_backend()
            replay = self._replay_result
            ids = replay._study_id_to_trial_ids.get(study_id, [])
            finished = self._finished.setdefault(study_id, {s: 0 for s in TrialState})
            still = []
            for i in [*self._open.get(study_id, []), *range(self._seen.get(study_id, 0), len(ids))]:
                if replay._trials[ids[i]].state.is_finished():
                    finished[replay._trials[ids[i]].state] += 1
                else:
                    still.append(i)
            self._open[study_id], self._seen[study_id] = still, len(ids)
            counts = dict(finished)
            for i in still:
                counts[replay._trials[ids[i]].state] += 1
            return counts

    def get_all_trials(
        self, study_id: int, deepcopy: bool = True, states: Container[TrialState] | None = None
    ) -> list[FrozenTrial]:
        """As ``JournalStorage.get_all_trials``; WAITING-only queries scan from a bookmark,
        others reuse the last identical query's list while no record arrived."""
        if states != (TrialState.WAITING,):
            if states is not None and not isinstance(states, tuple | list | set | frozenset):
                return super().get_all_trials(study_id, deepcopy=deepcopy, states=states)
            key = (study_id, None if states is None else frozenset(states))
            with self._thread_lock:
                self._sync_with_backend()
                read = self._replay_result.log_number_read
                hit = self._lists.get(key)
                if hit is None or hit[0] != read:
                    hit = (read, self._replay_result.get_all_trials(study_id, states))
                    self._lists[key] = hit
                return copy.deepcopy(hit[1]) if deepcopy else list(hit[1])
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


def _why(e: Exception) -> str:
    """The first line of a database error (the driver's own message where SQLAlchemy wraps one)."""
    return first_line(getattr(e, "orig", None) or e)


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
        return f"storage {redact(url)}: cannot connect ({_why(e)})"
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
        raise StorageError(f"storage {redact(url)}: cannot connect ({_why(e)})") from None


@contextlib.contextmanager
def _sqlite_lock(db: str | None) -> Iterator[None]:
    """An ``flock`` on ``<db>.dse-lock`` beside SQLite database file ``db``: the lock every
    process using that file shares (none for an in-memory database: one process)."""
    if not db or db == ":memory:" or db.startswith("file::memory:"):
        yield
        return
    import fcntl

    with open(f"{db}.dse-lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


#: GET_LOCK's timeout, s: MySQL reads -1 as "for ever", MariaDB as an error (NULL, no lock)
_MYSQL_LOCK_WAIT_S = 365 * 24 * 3600


@contextlib.contextmanager
def _mysql_lock(c: Any, key: str) -> Iterator[None]:
    """Hold MySQL/MariaDB named lock ``key`` on connection ``c`` (``GET_LOCK``)."""
    import sqlalchemy

    got = c.execute(sqlalchemy.text("SELECT GET_LOCK(:k, :t)"), {"k": key, "t": _MYSQL_LOCK_WAIT_S}).scalar()
    if got != 1:
        raise StorageError(f"cannot take the database lock {key!r} (GET_LOCK returned {got})")
    try:
        yield
    finally:
        c.execute(sqlalchemy.text("SELECT RELEASE_LOCK(:k)"), {"k": key})
        c.commit()


@contextlib.contextmanager
def _pg_lock(c: Any, key: int) -> Iterator[None]:
    """Hold PostgreSQL session advisory lock ``key`` on connection ``c``."""
    import sqlalchemy

    c.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
    try:
        yield
    finally:
        c.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
        c.commit()


@contextlib.contextmanager
def _schema_lock(url: str, pg: bool) -> Iterator[None]:
    """A lock around Optuna's schema creation, which several clients at once fail
    (PostgreSQL: ``CREATE TABLE`` on its catalog; SQLite: the second ``INSERT`` of
    ``alembic_version``; MariaDB: ``Table ... already exists``): PostgreSQL an advisory
    lock, SQLite :func:`_sqlite_lock`, MySQL/MariaDB ``GET_LOCK``; other databases:
    nothing."""
    if not pg:
        import sqlalchemy
        from sqlalchemy.engine import make_url

        u = make_url(url)
        if u.get_backend_name() == "sqlite":
            with _sqlite_lock(u.database):
                yield
            return
        if u.get_backend_name() not in ("mysql", "mariadb"):
            yield
            return
        engine = sqlalchemy.create_engine(u, poolclass=sqlalchemy.pool.NullPool)
        with engine.connect() as c, _mysql_lock(c, "dse:schema"):
            yield
        return
    import sqlalchemy

    engine = sqlalchemy.create_engine(url, connect_args={"connect_timeout": 10},
                                      poolclass=sqlalchemy.pool.NullPool)
    with engine.connect() as c, _pg_lock(c, _PG_LOCK_BASE - 1):
        yield


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

    def _due(self, study_id: int) -> bool:
        """Whether the study's trials are to be read now (then they count as read now)."""
        now = time.monotonic()
        if self._dirty or now - self._read_at.get(study_id, -math.inf) >= self.REFRESH_S:
            self._dirty = False
            self._read_at[study_id] = now
            return True
        return False

    def _read_trials_from_remote_storage(self, study_id: int) -> None:
        if self._due(study_id):
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


class PostgresDriverStorage(DriverRDBStorage):
    """The driver's PostgreSQL storage: about two round trips per trial.

    Optuna's RDB storage writes every parameter, attribute and value in its own
    transaction (a ``SELECT ... FOR UPDATE`` of the trial, the write, a commit: ~10
    transactions and ~32 statements per trial, each a round trip to the server). Here:

    * **ask** (:meth:`ask`): one round trip, one transaction: the cooperation lock (the
      study's advisory lock, transaction-scoped), the study row locked as Optuna's own trial
      creation does, then one statement that counts the trials by state, claims the first
      WAITING trial or creates a new one, unless COMPLETE + RUNNING has reached the cap,
      and records this driver as its owner;
    * **writes to this driver's RUNNING trials** (parameters, user and system attributes)
      are kept in memory (and in the trial the sampler sees) and written by
      :meth:`flush` (the driver's ``FLUSH_S`` cadence: one statement per trial);
    * **tell** (:meth:`set_trial_state_values` to a finished state): one statement, one
      transaction writes everything buffered for the trial, its values and its state, only
      if the trial is still RUNNING in the database (another driver may have failed it as
      an orphan: then ``UpdateFinishedTrialError``, as Optuna raises). When the tell
      returns, the trial is committed: a SIGKILL of the driver loses no told trial.
    * reads of the other drivers' trials: every ``REFRESH_S`` (:class:`DriverRDBStorage`),
      skipping this driver's own (RUNNING: the state held here is newer; told: final);
      the study's system attributes are cached as long, written through (NSGA-II reads
      them on every ask); :func:`system_attrs` (the cooperation code) reads them now.

    Every other operation (study user attributes, heartbeats, enqueued trials, trials
    adopted from a dead driver) goes through Optuna's storage unchanged. A crash of this process
    loses the buffered writes of its RUNNING trials (at most the last ``FLUSH_S``): those
    trials are RUNNING in the database and are re-run (as themselves, or failed and
    re-enqueued) like any orphan; a trial killed before its parameters were written has
    none and a new trial takes its place. The server's ``synchronous_commit=off``
    (:func:`open_rdb`) means a *server* crash may lose its last ~0.6 s of commits.
    """

    IDLE_PING_S = 5.0  # an ask on a connection idle this long checks it first

    def __init__(self, backend: optuna.storages.RDBStorage) -> None:
        super().__init__(backend)
        self._conn: Any = None  # a psycopg connection: this storage's own session
        self._conn_lock = threading.RLock()
        self._writes: dict[int, _TrialWrites] = {}  # buffered writes of own RUNNING trials
        self._types: tuple[str, str] | None = None  # the enum types of trials.state, value_type
        self._study_attrs: dict[int, tuple[float, dict[str, Any]]] = {}  # (read at, attrs)
        self._told: set[int] = set()  # own trials told since the last read
        self._held = 0  # depth of locked()
        self._used_at = -math.inf  # last statement on the own connection (monotonic s)

    # ---------------------------------------------------------------- the connection
    def _connection(self) -> Any:
        """This storage's psycopg connection (autocommit; opened on first use)."""
        if self._conn is not None and (self._conn.closed or self._conn.broken):
            self.close()
        if self._conn is None:
            raw = self._backend.engine.raw_connection()  # with the engine's connect_args
            conn = raw.driver_connection
            raw.detach()  # never back to the pool: it holds this driver's session locks
            conn.rollback()
            conn.autocommit = True
            self._conn = conn
        return self._conn

    def close(self) -> None:
        """Close this storage's own connection (a later call opens a new one)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    def _execute(self, sql: str, params: Any, *, client: bool = False,
                 retry: bool = True) -> list[tuple[Any, ...]]:
        """Run ``sql`` on the own connection; the rows of its last statement.

        ``client``: bind the parameters in the client, so that ``sql`` may hold several
        statements (one round trip; PostgreSQL runs them as one transaction, each statement
        with a new snapshot). ``retry``: ``sql`` may run twice (its second run changes
        nothing), so a broken connection (the server restarted, an idle connection
        dropped) is replaced and the call made once more; never inside :meth:`locked`.

        Raises:
            StorageError: the server cannot be reached (one line; told trials are committed).
        """
        import psycopg

        with self._conn_lock:
            for attempt in (0, 1):
                conn = self._connection()
                try:
                    cur = psycopg.ClientCursor(conn) if client else conn.cursor()
                    with cur:
                        cur.execute(sql, params)
                        while cur.nextset():
                            pass
                        self._used_at = time.monotonic()
                        return cur.fetchall() if cur.description else []
                except psycopg.OperationalError as e:
                    if not conn.broken:
                        raise
                    self.close()
                    if attempt or not retry or self._held:
                        raise StorageError(
                            f"storage {redact(self._backend.url)}: connection lost ({_why(e)}); told "
                            "trials are committed; continue with `dse resume`") from None
        raise AssertionError("unreachable")

    def _enum_types(self) -> tuple[str, str]:
        """The SQL types of ``trials.state`` and ``trial_values.value_type`` (Optuna's enums)."""
        if self._types is None:
            rows = self._execute(
                "SELECT c.relname, format_type(a.atttypid, NULL) FROM pg_attribute a "
                "JOIN pg_class c ON c.oid = a.attrelid WHERE a.attrelid IN "
                "(to_regclass('trials'), to_regclass('trial_values')) "
                "AND a.attname IN ('state', 'value_type')", None)
            found = dict(rows)
            self._types = (found["trials"], found["trial_values"])
        return self._types

    @contextlib.contextmanager
    def locked(self, key: int) -> Iterator[None]:
        """Hold the session advisory lock ``key`` on this storage's connection (the
        cooperation lock: :meth:`ask` takes the same key again, which a session holding it
        gets at once)."""
        with self._conn_lock:
            self._execute("SELECT pg_advisory_lock(%s)", (key,), retry=not self._held)
            self._held += 1
            try:
                yield
            finally:
                self._held -= 1
                self._execute("SELECT pg_advisory_unlock(%s)", (key,))

    # ---------------------------------------------------------------- ask
    def ask(self, study_id: int, cap: int | None, owner: str | None) -> tuple[int | None, dict[TrialState, int]]:
        """Claim the first WAITING trial or create one, owned by ``owner``, unless the
        study's COMPLETE + RUNNING trials reach ``cap``. One round trip. ``owner`` ``None``:
        create a trial (no claim, no owner, no cap), as Optuna's ``create_new_trial``.

        Returns the trial id (``None``: capped) and the counts by state before the ask.
        """
        state_t, _ = self._enum_types()
        if time.monotonic() - self._used_at > self.IDLE_PING_S:  # the ask is not retried:
            self._execute("SELECT 1", None)  # replace a connection dropped while idle first
        now = datetime.datetime.now()
        now_utc = now.astimezone(datetime.UTC).replace(tzinfo=None)
        sql = _ASK_SQL.format(state=state_t)
        rows = self._execute(sql, {
            "lock": _PG_LOCK_BASE + study_id, "study": study_id, "cap": cap if cap is not None else 2**31 - 1,
            "now": now_utc, "key": OWNER_ATTR, "owner": None if owner is None else json.dumps(owner),
            "claim": owner is not None,
        }, client=True, retry=False)  # a lost reply to a committed ask must not make a second trial
        counts_json, trial_id, number, claimed = rows[0]
        counts = {s: 0 for s in TrialState}
        for name, n in (counts_json or {}).items():
            counts[TrialState[name]] = int(n)
        if trial_id is None:
            return None, counts
        if claimed:  # an enqueued trial: its template (parameters, attributes) as stored
            ft = self._backend.get_trial(trial_id)
        else:
            ft = FrozenTrial(number=number, state=TrialState.RUNNING, value=None, values=None,
                             datetime_start=now, datetime_complete=None, params={},
                             distributions={}, user_attrs={},
                             system_attrs={} if owner is None else {OWNER_ATTR: owner},
                             intermediate_values={}, trial_id=trial_id)
        with self._lock:
            self._study_info(study_id)
            self._add_trials_to_cache(study_id, [ft])
            self._mine[trial_id] = ft
        return trial_id, counts

    def create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> int:
        """A new RUNNING trial as :meth:`ask` makes it (no cap); an enqueued one as Optuna's."""
        if template_trial is not None:
            return super().create_new_trial(study_id, template_trial)
        trial_id, _ = self.ask(study_id, None, None)
        assert trial_id is not None
        return trial_id

    def _study_info(self, study_id: int) -> Any:
        """The cache's record of study ``study_id``, made if new (call with ``_lock`` held)."""
        if study_id not in self._studies:
            from optuna.storages._cached_storage import _StudyInfo

            self._studies[study_id] = _StudyInfo()
        return self._studies[study_id]

    # ---------------------------------------------------------------- writes
    def _own(self, trial_id: int) -> FrozenTrial | None:
        t = self._mine.get(trial_id)
        return t if t is not None and t.state == TrialState.RUNNING else None

    def set_trial_param(self, trial_id: int, param_name: str, param_value_internal: float,
                        distribution: Any) -> None:
        """Own RUNNING trial: buffered (checked against the study's distribution as Optuna
        does); any other trial: as Optuna's."""
        t = self._own(trial_id)
        if t is None:
            return super().set_trial_param(trial_id, param_name, param_value_internal, distribution)
        from optuna import distributions as dists

        with self._lock:
            study_id, _ = self._trial_id_to_study_id_and_number[trial_id]
            seen = self._studies[study_id].param_distribution
            if param_name in seen:
                dists.check_distribution_compatibility(seen[param_name], distribution)
            else:
                seen[param_name] = distribution
        t._params[param_name] = distribution.to_external_repr(param_value_internal)
        t._distributions[param_name] = distribution
        self._writes.setdefault(trial_id, _TrialWrites()).params[param_name] = (
            float(param_value_internal), dists.distribution_to_json(distribution))

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        """Own RUNNING trial: buffered; any other trial: as Optuna's."""
        t = self._own(trial_id)
        if t is None:
            return super().set_trial_user_attr(trial_id, key, value)
        text = json.dumps(value)
        t._user_attrs[key] = json.loads(text)  # as a read from the database would give it
        self._writes.setdefault(trial_id, _TrialWrites()).user[key] = text

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        """Own RUNNING trial: buffered; any other trial: as Optuna's."""
        t = self._own(trial_id)
        if t is None:
            return super().set_trial_system_attr(trial_id, key, value)
        text = json.dumps(value)
        t._system_attrs[key] = json.loads(text)
        self._writes.setdefault(trial_id, _TrialWrites()).system[key] = text

    def set_trial_state_values(self, trial_id: int, state: TrialState, values: Any = None) -> bool:
        """Own RUNNING trial finished: everything buffered for it, its values and its state
        in one statement (one transaction); any other trial: as Optuna's."""
        t = self._own(trial_id)
        if t is None:
            return super().set_trial_state_values(trial_id, state=state, values=values)
        if not state.is_finished():
            return False  # RUNNING already (Optuna: only a WAITING trial becomes RUNNING)
        vals = None if values is None else [float(v) for v in values]
        now = datetime.datetime.now()
        if not self._write_trial(trial_id, state, vals, now):
            self._lost(trial_id)
            raise optuna.exceptions.UpdateFinishedTrialError(
                f"Trial#{t.number} has already finished and can not be updated.")
        t.state = state
        t._values = vals
        t.datetime_complete = now
        del self._mine[trial_id]
        self._told.add(trial_id)
        return True

    def _write_trial(self, trial_id: int, state: TrialState | None, values: list[float] | None,
                     now: datetime.datetime) -> bool:
        """Write trial ``trial_id``'s buffered writes (and ``state``, ``values``) if it is
        RUNNING in the database; whether it was."""
        w = self._writes.get(trial_id) or _TrialWrites()
        state_t, value_t = self._enum_types()
        vals = values or []
        types = ["INF_POS" if v == math.inf else "INF_NEG" if v == -math.inf else "FINITE" for v in vals]
        rows = self._execute(_TELL_SQL.format(state=state_t, value_type=value_t), {
            "id": trial_id, "state": state.name if state is not None else None,
            "done": now.astimezone(datetime.UTC).replace(tzinfo=None) if state is not None else None,
            "pn": list(w.params), "pv": [v for v, _ in w.params.values()],
            "pd": [d for _, d in w.params.values()],
            "uk": list(w.user), "uj": list(w.user.values()),
            "sk": list(w.system), "sj": list(w.system.values()),
            "vo": list(range(len(vals))), "vv": [v if math.isfinite(v) else None for v in vals],
            "vt": types,
        })
        self._writes.pop(trial_id, None)
        return bool(rows[0][0])

    def _lost(self, trial_id: int) -> None:
        """Own trial ``trial_id`` is no longer RUNNING in the database (another driver
        failed it as an orphan): forget its buffered writes, read it again."""
        self._writes.pop(trial_id, None)
        self._mine.pop(trial_id, None)
        with self._lock:
            study_id, _ = self._trial_id_to_study_id_and_number[trial_id]
            self._studies[study_id].unfinished_trial_ids.add(trial_id)
        self._dirty = True

    def flush(self) -> int:
        """Write the buffered writes of this driver's RUNNING trials; returns how many."""
        n = 0
        for trial_id in list(self._writes):
            k = len(self._writes[trial_id])
            if self._write_trial(trial_id, None, None, datetime.datetime.now()):
                n += k
            else:
                log.warning("trial %d: finished by another driver meanwhile (its driver was "
                            "thought gone); this driver's result for it is dropped",
                            self._mine[trial_id].number if trial_id in self._mine else trial_id)
                self._lost(trial_id)
        return n

    def unflushed(self) -> int:
        """Buffered writes of this driver's RUNNING trials (told trials are written at once)."""
        return sum(len(w) for w in self._writes.values())

    # ---------------------------------------------------------------- reads
    def get_study_system_attrs(self, study_id: int) -> dict[str, Any]:
        """The study's system attributes as read at most ``REFRESH_S`` ago, with this
        process's writes (NSGA-II reads them on every ask for its parent population);
        :meth:`study_system_attrs_now` reads them now."""
        got = self._study_attrs.get(study_id)
        if got is None or time.monotonic() - got[0] >= self.REFRESH_S:
            got = (time.monotonic(), self._backend.get_study_system_attrs(study_id))
            self._study_attrs[study_id] = got
        return dict(got[1])

    def study_system_attrs_now(self, study_id: int) -> dict[str, Any]:
        """The study's system attributes read now (heartbeats, once-only markers)."""
        self._study_attrs.pop(study_id, None)
        return self.get_study_system_attrs(study_id)

    def set_study_system_attr(self, study_id: int, key: str, value: Any) -> None:
        """As Optuna's (written at once); the attributes read here see it."""
        self._backend.set_study_system_attr(study_id, key, value)
        if (got := self._study_attrs.get(study_id)) is not None:
            got[1][key] = json.loads(json.dumps(value))

    def refresh(self) -> None:
        """Read trials and study system attributes again at their next use."""
        super().refresh()
        self._study_attrs.clear()

    def get_trial(self, trial_id: int) -> FrozenTrial:
        """Own RUNNING trial: a copy of the state held here; else as :class:`DriverRDBStorage`."""
        t = self._own(trial_id)
        return copy.deepcopy(t) if t is not None else super().get_trial(trial_id)

    def _read_trials_from_remote_storage(self, study_id: int) -> None:
        """Read the study's new and unfinished trials (every ``REFRESH_S``, or when asked),
        except this driver's trials: its RUNNING ones (the state held here is newer) and
        those it told (final, and held here as written)."""
        if not self._due(study_id):
            return
        with self._lock:
            study = self._study_info(study_id)
            after = study.last_finished_trial_id
            skip = set(self._mine) | {i for i in self._told if i > after}
            trials = self._query_trials(study_id, study.unfinished_trial_ids - skip, after, skip)
            for trial in trials:
                tid = trial._trial_id
                self._add_trials_to_cache(study_id, [trial])
                if not trial.state.is_finished():
                    study.unfinished_trial_ids.add(tid)
                    continue
                study.last_finished_trial_id = max(study.last_finished_trial_id, tid)
                study.unfinished_trial_ids.discard(tid)
            # every trial after ``after`` was read now or is this driver's: its told ones
            # count as read (a read of them would return what is held here)
            study.last_finished_trial_id = max(study.last_finished_trial_id, *self._told, -1)
            self._told.clear()

    def _query_trials(self, study_id: int, ids: set[int], after: int, skip: set[int]) -> list[FrozenTrial]:
        """Trials of the study whose id is in ``ids`` or above ``after``, except ``skip``
        (Optuna's ``RDBStorage._get_trials`` with the exclusion)."""
        import sqlalchemy
        from optuna.storages._rdb import models
        from optuna.storages._rdb.storage import _create_scoped_session
        from sqlalchemy import orm

        m = models.TrialModel
        with _create_scoped_session(self._backend.scoped_session) as session:
            q = (session.query(m)
                 .options(orm.selectinload(m.params), orm.selectinload(m.values),
                          orm.selectinload(m.user_attributes), orm.selectinload(m.system_attributes),
                          orm.selectinload(m.intermediate_values))
                 .filter(m.study_id == study_id)
                 .filter(sqlalchemy.or_(m.trial_id.in_(ids), m.trial_id > after)))
            if skip:
                q = q.filter(m.trial_id.not_in(skip))
            return [self._backend._build_frozen_trial_from_trial_model(t)
                    for t in q.order_by(m.trial_id).all()]


class _TrialWrites:
    """Writes to one RUNNING trial not yet in the database: parameters (internal value,
    distribution JSON), user and system attributes (JSON text)."""

    __slots__ = ("params", "system", "user")

    def __init__(self) -> None:
        self.params: dict[str, tuple[float, str]] = {}
        self.user: dict[str, str] = {}
        self.system: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self.params) + len(self.user) + len(self.system)


# Ask: the cooperation lock, the study row (Optuna's own trial creation locks it too, so
# trial numbers stay unique), then counts and claim-or-create in one statement; the
# statements after a lock see the commits made before it (READ COMMITTED: a new snapshot
# per statement). The counts are those before the ask.
_ASK_SQL = """
SELECT pg_advisory_xact_lock(%(lock)s);
SELECT 1 FROM studies WHERE study_id = %(study)s FOR UPDATE;
WITH c AS (SELECT state::text AS st, count(*) AS n FROM trials WHERE study_id = %(study)s GROUP BY state),
ok AS (SELECT coalesce(sum(n), 0) AS total FROM c
       HAVING coalesce(sum(n) FILTER (WHERE st IN ('COMPLETE', 'RUNNING')), 0) < %(cap)s),
w AS (SELECT trial_id FROM trials WHERE study_id = %(study)s AND state = 'WAITING' AND %(claim)s
      ORDER BY number, trial_id LIMIT 1),
claimed AS (UPDATE trials SET state = 'RUNNING', datetime_start = %(now)s
            WHERE trial_id = (SELECT trial_id FROM w) AND EXISTS (SELECT 1 FROM ok)
            RETURNING trial_id, number),
created AS (INSERT INTO trials (number, study_id, state, datetime_start)
            SELECT total, %(study)s, 'RUNNING'::{state}, %(now)s FROM ok
            WHERE NOT EXISTS (SELECT 1 FROM w) RETURNING trial_id, number),
t AS (SELECT trial_id, number, true AS claimed FROM claimed
      UNION ALL SELECT trial_id, number, false FROM created),
o AS (INSERT INTO trial_system_attributes (trial_id, key, value_json)
      SELECT trial_id, %(key)s, %(owner)s FROM t WHERE %(owner)s IS NOT NULL
      ON CONFLICT (trial_id, key) DO UPDATE SET value_json = EXCLUDED.value_json)
SELECT (SELECT json_object_agg(st, n) FROM c), t.trial_id, t.number, t.claimed
FROM (SELECT 1) AS one LEFT JOIN t ON true
"""

# A trial's buffered writes, values and state, only while it is RUNNING in the database
# (or already finished by this very write: a retry after a lost reply changes nothing).
# ``state`` NULL: the writes only (the trial stays RUNNING).
_TELL_SQL = """
WITH t AS (UPDATE trials SET state = coalesce(%(state)s::text::{state}, state),
                             datetime_complete = coalesce(%(done)s, datetime_complete)
           WHERE trial_id = %(id)s
             AND (state = 'RUNNING' OR (state::text = %(state)s AND datetime_complete = %(done)s))
           RETURNING trial_id),
p AS (INSERT INTO trial_params (trial_id, param_name, param_value, distribution_json)
      SELECT t.trial_id, x.n, x.v, x.d
      FROM t, unnest(%(pn)s::text[], %(pv)s::float8[], %(pd)s::text[]) AS x(n, v, d)
      ON CONFLICT (trial_id, param_name) DO UPDATE
      SET param_value = EXCLUDED.param_value, distribution_json = EXCLUDED.distribution_json),
u AS (INSERT INTO trial_user_attributes (trial_id, key, value_json)
      SELECT t.trial_id, x.k, x.j FROM t, unnest(%(uk)s::text[], %(uj)s::text[]) AS x(k, j)
      ON CONFLICT (trial_id, key) DO UPDATE SET value_json = EXCLUDED.value_json),
s AS (INSERT INTO trial_system_attributes (trial_id, key, value_json)
      SELECT t.trial_id, x.k, x.j FROM t, unnest(%(sk)s::text[], %(sj)s::text[]) AS x(k, j)
      ON CONFLICT (trial_id, key) DO UPDATE SET value_json = EXCLUDED.value_json),
v AS (INSERT INTO trial_values (trial_id, objective, value, value_type)
      SELECT t.trial_id, x.o, x.v, x.ty::{value_type}
      FROM t, unnest(%(vo)s::int[], %(vv)s::float8[], %(vt)s::text[]) AS x(o, v, ty)
      ON CONFLICT (trial_id, objective) DO UPDATE
      SET value = EXCLUDED.value, value_type = EXCLUDED.value_type)
SELECT count(*) FROM t
"""


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
    rdb = open_rdb(url)
    if not buffered:
        return rdb
    return PostgresDriverStorage(rdb) if rdb.engine.dialect.name == "postgresql" else DriverRDBStorage(rdb)


def buffered_records(storage: BaseStorage) -> int:
    """Journal records of ``storage`` written but not yet flushed (0 for other storages)."""
    if isinstance(storage, PostgresDriverStorage):
        return storage.unflushed()
    backend = getattr(storage, "_backend", None)
    return len(backend._buffer) if isinstance(backend, BufferedJournalFileBackend) else 0


def flush_storage(storage: BaseStorage, reread: bool = True) -> None:
    """Write any buffered records of ``storage`` (journal, PostgreSQL driver storage);
    RDB driver storages: with ``reread``, the next read sees every driver's trials."""
    backend = getattr(storage, "_backend", None)
    if isinstance(backend, BufferedJournalFileBackend):
        with storage._thread_lock:  # type: ignore[attr-defined]
            backend.flush()
    elif isinstance(storage, DriverRDBStorage):
        if isinstance(storage, PostgresDriverStorage):
            storage.flush()  # the writes to its RUNNING trials (told trials are written)
        if reread:
            storage.refresh()  # the next read sees the other drivers' trials too


# ----------------------------------------------------------------------------- study helpers
# The only place outside Optuna that touches a study's storage internals.


def system_attrs(study: optuna.Study) -> dict[str, Any]:
    """The study's system attributes (``dse:driver``, ``dse:baselines_enqueued``, ...), read now."""
    if isinstance(study._storage, PostgresDriverStorage):
        return study._storage.study_system_attrs_now(study._study_id)
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


def release(study: optuna.Study) -> None:
    """Close the connection the study's driver storage holds for itself (PostgreSQL; a
    later use opens another). The driver calls it at its end."""
    if isinstance(study._storage, PostgresDriverStorage):
        study._storage.close()


def unflushed(study: optuna.Study) -> int:
    """Records of the study written but not yet flushed (see :func:`buffered_records`)."""
    return buffered_records(study._storage)


def flush(study: optuna.Study, reread: bool = True) -> None:
    """Write the study's buffered records (see :func:`flush_storage`)."""
    flush_storage(study._storage, reread)


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
    if isinstance(study._storage, PostgresDriverStorage):  # on its own connection (see ask)
        with study._storage.locked(_PG_LOCK_BASE + study._study_id):
            yield
        return
    rdb = _rdb(study)
    if rdb is None:  # a plain journal or in-memory storage: one process
        yield
        return
    dialect = rdb.engine.dialect.name
    if dialect == "sqlite":
        with _sqlite_lock(rdb.engine.url.database):
            yield
        return
    if dialect in ("mysql", "mariadb"):
        with rdb.engine.connect() as c, _mysql_lock(c, f"dse:{study._study_id}"):
            yield
        return
    if dialect == "postgresql":
        with rdb.engine.connect() as c, _pg_lock(c, _PG_LOCK_BASE + study._study_id):
            yield
        return
    yield


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
    if isinstance(study._storage, DriverJournalStorage):
        return study._storage.state_counts(study._study_id)
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

    def ask(self, n_trials: int, before: Callable[[int], Any] | None = None
            ) -> tuple[optuna.Trial | None, dict[TrialState, int]]:
        """A new trial, or ``None`` when COMPLETE + RUNNING (all drivers) reach ``n_trials``.

        ``before(n)`` is called just before the trial is asked, ``n`` the study's trials
        then (the driver sets the sampler for it). Returns the trial and the study's
        counts by state before it was asked.
        PostgreSQL: one round trip (:meth:`PostgresDriverStorage.ask`); ``before`` runs
        after it, before the trial samples anything (the sampler is not used by that ask).
        """
        st = self.study._storage
        if isinstance(st, PostgresDriverStorage):
            trial_id, counts = st.ask(self.study._study_id, n_trials, self.id)
            if trial_id is None:
                return None, counts
            if before is not None:
                before(sum(counts.values()))
            self.study._thread_local.cached_all_trials = None  # as Study.ask does
            return optuna.Trial(self.study, trial_id), counts
        with exclusive(self.study):
            counts = state_counts(self.study)
            if counts[TrialState.COMPLETE] + counts[TrialState.RUNNING] >= n_trials:
                return None, counts
            if before is not None:
                before(sum(counts.values()))
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
