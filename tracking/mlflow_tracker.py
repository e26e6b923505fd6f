"""MLflow tracking of a study: one parent run, one child run per trial, from a process.

The Optuna storage is the source of truth; MLflow is a view of it. The driver hands each
finished trial to :class:`Tracker`, which logs it from a background process with
``MlflowClient`` (``create_run`` + one ``log_batch`` + ``set_terminated``), so MLflow never
blocks the search. If MLflow fails (unreachable, or an error it answers with) the tracker
logs one warning naming what failed; a server that is gone is reconnected to with backoff,
and ``dse sync <study>`` (:func:`sync`) backfills whatever is still missing.

Any parameter or metric name a spec accepts is tracked: a name MLflow rejects (MLflow
allows letters, digits, ``_ - . / :`` and spaces, 250 characters at most; a spec also
accepts glob patterns such as ``sparsity.layer.layer1*.density``) is logged under
:func:`mlflow_key` (a deterministic legal key); the run's tag ``dse.names`` maps the keys
back to the original names (JSON), and the parent run's ``search_space`` table lists both.

No trial is logged twice: a child run carries the tag ``dse.trial_number``; before logging,
the tracker lists the child runs already under the parent, and deletes any left
unfinished by a killed driver (status RUNNING) so that they are logged again whole.

Layout under the study directory: ``mlflow.db`` (SQLite backend store, the default URI),
``mlartifacts/`` (the experiment's artifact root), ``artifacts/`` (local copies of
trials.parquet, pareto.parquet, pareto.png, pareto.html).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import queue
import re
import signal
import sys
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optuna.trial import FrozenTrial, TrialState

from tracking.artifacts import preload, write_artifacts
from tracking.info import StudyInfo
from tracking.mlflow_sql import FinishedRun, bulk_store, insert_finished_runs, validate

log = logging.getLogger("dse.tracking")

TRIAL_TAG = "dse.trial_number"
ROLE_TAG = "dse.role"
UID_TAG = "dse.study_uid"
PARENT_TAG = "mlflow.parentRunId"
NAMES_TAG = "dse.names"
KIND_TAG = "mlflow.experimentKind"
NOTE_TAG = "mlflow.note.content"  # the description on the experiment and run pages
LOGGED_ARTIFACTS_TAG = "mlflow.loggedArtifacts"
_DRIVER_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # the driver decides when the logging stops
DRAIN_NOTICE_S = 2.0  # a final drain longer than this is announced (and how to stop it)
MAX_KEY_CHARS = 250  # MLflow's limit on param/metric/tag keys
BULK_RUNS = 500  # child runs per SQLite transaction (tracking.mlflow_sql)
HTTP_THREADS = 4  # concurrent requests to a tracking server
_LEGAL_KEY = re.compile(r"^[A-Za-z0-9_./ -]*$")  # MLflow's rule, minus ':' (not legal on Windows)


class TrackingError(RuntimeError):
    """MLflow failed; the message names the step and the cause in one line."""


@functools.lru_cache(maxsize=4096)  # the same names come with every trial
def mlflow_key(name: str) -> str:
    """The MLflow key of a parameter or metric ``name``: the name itself when MLflow
    accepts it; otherwise each illegal character becomes ``_`` and 8 hex digits of the
    name's SHA-1 are appended (``sparsity.layer.layer1*.density`` ->
    ``sparsity.layer.layer1_.density_<hash>``), so distinct names never share a key."""
    if _LEGAL_KEY.match(name) and len(name) <= MAX_KEY_CHARS and not _path_like(name):
        return name
    digest = hashlib.sha1(name.encode()).hexdigest()[:8]
    base = re.sub(r"[^A-Za-z0-9_.-]", "_", name)[: MAX_KEY_CHARS - 9]
    return f"{base}_{digest}"


def _path_like(name: str) -> bool:
    """MLflow rejects keys that change under path normalisation (``a//b``, ``./a``, ``..``)."""
    import posixpath

    norm = posixpath.normpath(name)
    return norm != name or norm == "." or norm.startswith(("..", "/"))


def _legal(items: dict[str, Any], names: dict[str, str]) -> dict[str, Any]:
    """``items`` under their MLflow keys; renamed keys are recorded in ``names`` (key -> name)."""
    out: dict[str, Any] = {}
    for k, v in items.items():
        key = mlflow_key(k)
        if key != k:
            names[key] = k
        out[key] = v
    return out


def parent_params(info: StudyInfo) -> dict[str, str]:
    """The parent run's params: the search settings, every search-space parameter with its
    domain (``space.<name>``), every objective with its direction and reference point
    (``objective.<metric>``), the constraints and the evaluators."""
    out = {"sampler": info.sampler, "seed": str(info.seed), "n_trials": str(info.n_trials)}
    out |= {mlflow_key(f"sampler.{k}"): str(v) for k, v in info.sampler_options.items()}
    out |= {mlflow_key(f"space.{p.name}"): p.domain for p in info.params}
    for o in info.objectives:
        out[mlflow_key(f"objective.{o.metric}")] = o.direction + (f", ref {o.ref:g}" if o.ref is not None else "")
    out["constraints"] = ", ".join(info.constraint_keys) or "-"
    out["evaluators"] = ", ".join(info.evaluators)
    return out


def summary_metrics(
    trials: Sequence[FrozenTrial], info: StudyInfo, front: Collection[int] | None = None
) -> dict[str, float]:
    """The parent run's summary: ``pareto_size``, ``n_complete``, ``n_failed`` and
    ``best.<metric>`` (the best feasible value of each objective, in its direction).
    ``front``: the numbers of ``info.front(trials)`` when the caller has them already."""
    done = [t for t in trials if t.state == TrialState.COMPLETE and t.values]
    out = {
        "pareto_size": float(len(info.front(trials) if front is None else front)),
        "n_complete": float(len(done)),
        "n_failed": float(sum(t.state == TrialState.FAIL for t in trials)),
    }
    feasible = [t for t in done if info.is_feasible(t)]
    for i, o in enumerate(info.objectives):
        vals = [t.values[i] for t in feasible]
        if vals:
            out[f"best.{o.metric}"] = float(min(vals) if o.direction == "minimize" else max(vals))
    return out


def _why(e: BaseException) -> str:
    """``Type: first line`` of an exception (MLflow's messages run to many lines)."""
    first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
    return f"{type(e).__name__}: {first[:300]}" if first else type(e).__name__


def _rejected(e: BaseException) -> bool:
    """Whether MLflow answered and rejected the input (the server is fine; go on)."""
    return getattr(e, "error_code", "") in ("INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS")


def _ms(dt: Any) -> int:
    return int(dt.timestamp() * 1000) if dt is not None else int(time.time() * 1000)


def _sqlite_wal(client: Any) -> None:
    """WAL journal + synchronous=NORMAL on MLflow's SQLite store: about 2x faster writes
    here (an fsync per checkpoint instead of per commit); crash-safe, only the last
    commits can be lost on power failure. Best effort: MLflow internals may change."""
    try:
        from sqlalchemy import event

        engine = client._tracking_client.store.engine

        def _pragmas(dbapi_conn: Any, _rec: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        event.listen(engine, "connect", _pragmas)
        engine.dispose()
    except Exception as e:  # noqa: BLE001 - an optimisation only
        log.debug("could not set SQLite pragmas on the MLflow store: %s", e)


def _sqlite_file(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI; ``None`` for other URIs and ``:memory:``."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):].split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


@contextlib.contextmanager
def _made_aside(db: Path, replace: bool = False) -> Iterator[Path]:
    """A temporary path beside ``db`` (``<db>.init-<pid>``) for the caller to build a file
    in; linked to ``db`` when the block ends without an error (never replacing a ``db``
    another process made meanwhile; ``replace``: renamed over ``db``, atomically) and
    removed in every case, so ``db`` is never seen half-built."""
    tmp = db.with_name(f"{db.name}.init-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        yield tmp
        if replace:
            os.replace(tmp, db)
        else:
            with contextlib.suppress(FileExistsError):
                os.link(tmp, db)
    finally:
        tmp.unlink(missing_ok=True)


def _build_sqlite_store(db: Path, replace: bool = False) -> None:
    """Have MLflow build a new SQLite store all at once: its schema (dozens of migrations,
    ~3 s of CPU) is made in ``<db>.init-<pid>``, which is then linked to ``db``. A process
    killed during that set-up used to leave a half-migrated store that MLflow refused for
    good ("table _alembic_tmp_trace_info already exists"); now it leaves only a temporary
    file. If another process created ``db`` meanwhile, its store is kept (``replace``: the
    new store replaces ``db``)."""
    from mlflow.tracking import MlflowClient

    with _made_aside(db, replace) as tmp:
        store = MlflowClient(tracking_uri=f"sqlite:///{tmp}")._tracking_client.store
        store.engine.dispose()  # closes the file: nothing left in a journal


def _template_problem(path: Path) -> str | None:
    """What is wrong with a store template (``None``: nothing): SQLite's quick integrity
    check, one schema version row, the Default experiment; milliseconds for the ~1 MB file."""
    import sqlite3

    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            check = con.execute("PRAGMA quick_check").fetchall()
            if check != [("ok",)]:
                return f"integrity check: {check[0][0]}"
            if len(con.execute("SELECT version_num FROM alembic_version").fetchall()) != 1:
                return "expected one alembic_version row"
            if not con.execute("SELECT 1 FROM experiments WHERE experiment_id = 0").fetchall():
                return "no Default experiment"
        finally:
            con.close()
    except sqlite3.Error as e:
        return _why(e)
    return None


def store_template() -> Path | None:
    """An empty MLflow SQLite store of the installed MLflow version, built by MLflow once per
    machine (``<cache>/mlflow/empty-<version>.db``, cache = ``$DSE_CACHE_DIR`` or
    ``~/.cache/dse``) and rebuilt (replaced atomically) when it is found damaged
    (:func:`_template_problem`); ``None`` when the cache cannot be written."""
    import mlflow

    from evaluators.cache import default_cache_root

    path = default_cache_root() / "mlflow" / f"empty-{mlflow.__version__}.db"
    problem = _template_problem(path) if path.exists() else "missing"
    if problem is not None:
        if problem != "missing":
            log.warning("MLflow store template %s is damaged (%s); rebuilding it", path, problem)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            _build_sqlite_store(path, replace=problem != "missing")
        except OSError as e:
            log.debug("no MLflow store template at %s (%s)", path, e)
            return None
    return path


def _create_sqlite_store(db: Path) -> None:
    """Create a new MLflow SQLite store ``db`` all at once: a copy of :func:`store_template`
    (milliseconds instead of MLflow's seconds of schema migrations) made under a temporary
    name and linked to ``db``, with its ``Default`` experiment given the artifact location
    and times MLflow would have given it here and now; built by MLflow where there is no
    template. A process killed meanwhile leaves no ``db``; if another process created
    ``db`` meanwhile, its store is kept."""
    import shutil
    import sqlite3

    from mlflow.store.tracking import DEFAULT_LOCAL_FILE_AND_ARTIFACT_PATH
    from mlflow.utils.uri import append_to_uri_path, resolve_uri_if_local

    template = store_template()
    if template is None:
        _build_sqlite_store(db)
        return
    with _made_aside(db) as tmp:
        shutil.copyfile(template, tmp)
        now_ms = int(time.time() * 1000)
        root = resolve_uri_if_local(DEFAULT_LOCAL_FILE_AND_ARTIFACT_PATH)
        con = sqlite3.connect(tmp)
        try:
            with con:
                con.execute("UPDATE experiments SET artifact_location = ?, creation_time = ?, last_update_time = ?"
                            " WHERE experiment_id = 0", (append_to_uri_path(root, "0"), now_ms, now_ms))
        finally:
            con.close()


class MlflowLink:
    """The MLflow side of one study: its experiment, parent run and logged trials."""

    def __init__(self, info: StudyInfo, sdir: Path, bulk: bool = True) -> None:
        """``bulk``: write child runs into a SQLite store in bulk where possible
        (:func:`tracking.mlflow_sql.bulk_store`); false: always through MLflow's client."""
        # Fail fast on an unreachable server instead of minutes of retries.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
        # MLflow prints two lines ("View run ... at ...") per run ended against a server.
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        from mlflow.tracking import MlflowClient

        self.info = info
        self.sdir = sdir
        self.uri = info.uri
        db = _sqlite_file(self.uri)
        if db is not None and not db.exists():
            _create_sqlite_store(db)
        self.client = MlflowClient(tracking_uri=self.uri)
        if self.uri.startswith("sqlite:"):
            _sqlite_wal(self.client)
        #: MLflow's SQL store when child runs are written in bulk (``None``: public API)
        self._bulk = bulk_store(self.client) if bulk else None
        self.experiment_id = ""
        self.parent_id = ""
        self.logged: set[int] = set()
        self._uploaded: dict[str, str] = {}  # artifact name -> SHA-256 of the bytes logged
        self._valid_keys: set[tuple[tuple[str, ...], ...]] = set()  # of child runs (mlflow_sql.validate)

    def connect(self) -> None:
        """Find or create the experiment and the parent run; list the logged trials."""
        from mlflow.entities import Param, RunTag

        c = self.client
        exp = c.get_experiment_by_name(self.info.name)
        if exp is None:
            loc = (self.sdir / "mlartifacts").resolve().as_uri() if self.uri.startswith("sqlite") else None
            self.experiment_id = c.create_experiment(self.info.name, artifact_location=loc)
        else:
            self.experiment_id = exp.experiment_id
        # MLflow 3 opens an experiment of unknown kind in GenAI mode; a study is model training.
        for key, value in ((KIND_TAG, "custom_model_development"), (NOTE_TAG, self.info.description)):
            if exp is None or exp.tags.get(key) != value:
                c.set_experiment_tag(self.experiment_id, key, value)
        parent = self._find_parent()
        if parent is not None:
            self.parent_id = parent.info.run_id
            if parent.info.status != "RUNNING":
                c.update_run(self.parent_id, status="RUNNING")
        else:
            info = self.info
            tags = {ROLE_TAG: "parent", "dse.study": info.name, "dse.storage": info.storage_desc}
            if info.study_uid:
                tags[UID_TAG] = info.study_uid
            run = c.create_run(self.experiment_id, tags=tags, run_name=info.name)
            self.parent_id = run.info.run_id
            params = [Param(k, str(v)[:6000]) for k, v in parent_params(info).items()]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
                c.log_batch(self.parent_id, params=params[i : i + 100])
            c.log_batch(self.parent_id, tags=[RunTag("dse.spec", info.spec_text[:7000]),
                                              RunTag(NOTE_TAG, info.description)])
            self._log_table(
                {"name": info.param_names, "mlflow_key": [mlflow_key(n) for n in info.param_names],
                 "domain": [p.domain for p in info.params]},
                "search_space.json",
            )
        self._list_logged()

    def _find_parent(self) -> Any:
        """This study's parent run, or None. With a known study identity, only a parent
        tagged with it (or an untagged one from before identities, which is then tagged)
        is this study's: a parent with another identity belongs to an earlier study that
        had the same name, and its child runs must not count as this study's."""
        parents = self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.`{ROLE_TAG}` = 'parent'", max_results=1000
        )
        uid = self.info.study_uid
        if not uid:
            return parents[0] if parents else None
        for p in parents:
            if p.data.tags.get(UID_TAG) == uid:
                return p
        for p in parents:
            if UID_TAG not in p.data.tags:
                self.client.set_tag(p.info.run_id, UID_TAG, uid)
                return p
        return None

    def _list_logged(self) -> None:
        token = None
        self.logged = set()
        while True:
            page = self.client.search_runs(
                [self.experiment_id],
                filter_string=f"tags.`{PARENT_TAG}` = '{self.parent_id}'",
                max_results=5000,
                page_token=token,
            )
            for r in page:
                n = r.data.tags.get(TRIAL_TAG)
                if n is None:
                    continue
                if r.info.status != "FINISHED":  # half-logged by a killed driver
                    self.client.delete_run(r.info.run_id)
                    continue
                self.logged.add(int(n))
            token = page.token
            if not token:
                break

    def child_run(self, t: FrozenTrial) -> FinishedRun:
        """The child run of a COMPLETE trial: started and ended when the trial was, tagged
        with the parent, the trial number, the study identity and feasibility (``dse.names``
        for renamed keys); every active parameter, every metric (objectives and
        ``constraint.<key>`` included), under their MLflow keys."""
        metrics = dict(t.user_attrs.get("metrics") or {})
        for o, v in zip(self.info.objectives, t.values or [], strict=False):
            metrics.setdefault(o.metric, v)
        for k, v in t.constraints.items():
            metrics[f"constraint.{k}"] = v
        names: dict[str, str] = {}
        metrics = _legal(metrics, names)
        params = _legal(self.info.complete_params(t.params), names)
        tags = {PARENT_TAG: self.parent_id, TRIAL_TAG: str(t.number), UID_TAG: self.info.study_uid,
                "dse.feasible": str(self.info.is_feasible(t))}
        if names:
            tags[NAMES_TAG] = json.dumps(names, sort_keys=True)[:8000]
        return FinishedRun(
            name=f"trial-{t.number}", start_ms=_ms(t.datetime_start), end_ms=_ms(t.datetime_complete),
            tags=tags, params={k: str(v)[:6000] for k, v in params.items()},
            metrics={k: float(v) for k, v in metrics.items()},
        )

    def log_trial(self, t: FrozenTrial) -> bool:
        """Log one COMPLETE trial as a child run unless already logged; returns whether
        logged. Raises what MLflow raised, a rejection of the trial's input included."""
        before = len(self.logged)
        for _n, e in self.log_trials([t]):
            raise e
        return len(self.logged) > before

    def log_trials(self, trials: Sequence[FrozenTrial]) -> list[tuple[int, Exception]]:
        """Log the COMPLETE trials not logged yet as child runs; returns the trials whose
        input MLflow rejected, as (trial number, MLflow's exception): the rest is logged.
        Raises on any other failure (what was logged by then is in :attr:`logged`).

        SQLite store (MLflow's pinned version): :data:`BULK_RUNS` runs per transaction
        through :func:`tracking.mlflow_sql.insert_finished_runs`. A tracking server
        (``http(s)://``): :data:`HTTP_THREADS` concurrent requests. Otherwise MLflow's
        client, one run after another."""
        todo: dict[int, FinishedRun] = {}
        for t in trials:
            if t.state == TrialState.COMPLETE and t.number not in self.logged and t.number not in todo:
                todo[t.number] = self.child_run(t)
        if not todo:
            return []
        if self._bulk is not None:
            return self._log_bulk(todo)
        if self.uri.startswith(("http://", "https://")) and len(todo) > 1:
            return self._log_threads(todo)
        rejected: list[tuple[int, Exception]] = []
        for n, run in todo.items():
            try:
                self._log_public(n, run)
            except Exception as e:
                if not _rejected(e):
                    raise
                rejected.append((n, e))
        return rejected

    def _log_bulk(self, todo: dict[int, FinishedRun]) -> list[tuple[int, Exception]]:
        from mlflow.exceptions import MlflowException

        rejected: list[tuple[int, Exception]] = []
        ok: list[int] = []
        for n, run in todo.items():
            try:
                validate(run, self._valid_keys)
                ok.append(n)
            except MlflowException as e:  # what the public log_batch would raise for it
                rejected.append((n, e))
        for i in range(0, len(ok), BULK_RUNS):
            chunk = ok[i : i + BULK_RUNS]
            insert_finished_runs(self._bulk, self.experiment_id, [todo[n] for n in chunk])
            self.logged.update(chunk)
        return rejected

    def _log_threads(self, todo: dict[int, FinishedRun]) -> list[tuple[int, Exception]]:
        """Each run through the public API, :data:`HTTP_THREADS` at a time (a server's
        latency, not this process's CPU, bounds one client). After the first failure that
        is not a rejection, runs not yet started are not tried; that failure is raised."""
        import threading
        from concurrent.futures import ThreadPoolExecutor

        failed = threading.Event()
        rejected: list[tuple[int, Exception]] = []
        errors: list[Exception] = []

        def one(n: int) -> None:
            if failed.is_set():
                return
            try:
                self._log_public(n, todo[n])
            except Exception as e:  # noqa: BLE001 - sorted out below
                if _rejected(e):
                    rejected.append((n, e))
                else:
                    errors.append(e)
                    failed.set()

        with ThreadPoolExecutor(max_workers=HTTP_THREADS, thread_name_prefix="dse-mlflow") as pool:
            list(pool.map(one, todo))
        if errors:
            raise errors[0]
        return sorted(rejected, key=lambda r: r[0])

    def _log_public(self, number: int, run: FinishedRun) -> None:
        """One finished run through MLflow's client: ``create_run`` (with the links to the
        parent and the trial), one ``log_batch``, ``set_terminated``; a run whose batch
        fails is deleted (nothing half-logged stays behind)."""
        from mlflow.entities import Metric, Param, RunTag

        c = self.client
        first = (PARENT_TAG, TRIAL_TAG, UID_TAG)
        created = c.create_run(self.experiment_id, start_time=run.start_ms, run_name=run.name,
                               tags={k: v for k, v in run.tags.items() if k in first})
        try:
            c.log_batch(
                created.info.run_id,
                metrics=[Metric(k, v, run.end_ms, 0) for k, v in run.metrics.items()],
                params=[Param(k, v) for k, v in run.params.items()],
                tags=[RunTag(k, v) for k, v in run.tags.items() if k not in first],
            )
        except Exception:
            c.delete_run(created.info.run_id)
            raise
        c.set_terminated(created.info.run_id, "FINISHED", end_time=run.end_ms)
        self.logged.add(number)

    def log_hypervolume(self, points: Sequence[tuple[int, float, int]]) -> None:
        """Log (step, hypervolume, timestamp_ms) points on the parent run (batches of 1000,
        MLflow's limit)."""
        from mlflow.entities import Metric

        for k in range(0, len(points), 1000):
            self.client.log_batch(
                self.parent_id, metrics=[Metric("hypervolume", v, ts, step) for step, v, ts in points[k : k + 1000]]
            )

    def log_artifacts(
        self, trials: Sequence[FrozenTrial], plots: bool = True, front: Collection[int] | None = None
    ) -> None:
        """Write the tables (and, with ``plots``, the plots) to ``<sdir>/artifacts`` and log
        those whose bytes changed since this link last logged them on the parent run, with
        the summary metrics (:func:`summary_metrics`) and the front as an MLflow table
        (``pareto_front.json``: trial number, objective values, constraints, parameters; column
        names with ``/`` for ``.``: ``values/f1``, ``params/x.0`` -> ``params/x/0``)."""
        import pyarrow.parquet as pq
        from mlflow.entities import Metric

        if front is None:
            front = [t.number for t in self.info.front(trials)]
        paths = write_artifacts(trials, self.info, self.sdir / "artifacts", plots=plots, front=front)
        for p in paths:
            self._log_file(p)
        front = pq.read_table(self.sdir / "artifacts" / "pareto.parquet")
        cols = ["number"] + [c for c in front.column_names if c.startswith(("values.", "constraints.", "params."))]
        # MLflow's table view reads a column name with a dot as a nested path (blank cells)
        data = {c.replace(".", "/"): v for c, v in front.select(cols).to_pydict().items()}
        self._log_table(data, "pareto_front.json")
        summary = summary_metrics(trials, self.info, front)
        step = int(summary["n_complete"])
        ts = int(time.time() * 1000)
        self.client.log_batch(
            self.parent_id, metrics=[Metric(mlflow_key(k), v, ts, step) for k, v in summary.items()]
        )

    def _log_file(self, path: Path) -> bool:
        """Log ``path`` on the parent run unless the same bytes were logged already."""
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if self._uploaded.get(path.name) == digest:
            return False
        self.client.log_artifact(self.parent_id, str(path))
        self._uploaded[path.name] = digest
        return True

    def _log_table(self, data: dict[str, list[Any]], name: str) -> None:
        """``MlflowClient.log_table`` that replaces the table (log_table appends to it):
        the same JSON (pandas ``split``) and the ``mlflow.loggedArtifacts`` tag the UI reads.
        Logged only when its content changed."""
        import tempfile

        import pandas as pd

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            pd.DataFrame(data).to_json(path, orient="split", index=False, date_format="iso")
            if not self._log_file(path):
                return
        logged = json.loads(self.client.get_run(self.parent_id).data.tags.get(LOGGED_ARTIFACTS_TAG, "[]"))
        entry = {"path": name, "type": "table"}
        if entry not in logged:
            self.client.set_tag(self.parent_id, LOGGED_ARTIFACTS_TAG, json.dumps(logged + [entry]))

    def close(self, status: str = "FINISHED") -> None:
        """Mark the parent run finished."""
        self.client.set_terminated(self.parent_id, status)

    def dispose(self) -> None:
        """Close the store's database connections, if it has any (SQLite: the last close
        checkpoints the write-ahead log into the database file)."""
        engine = getattr(self.client._tracking_client.store, "engine", None)
        if engine is not None:
            engine.dispose()


def _empty(q: Any) -> bool:
    """Whether nothing is queued on ``q`` (a multiprocessing queue: approximate, which is
    enough to put off an artifact step)."""
    try:
        return bool(q.empty())
    except (OSError, ValueError):  # closed
        return True


class Tracker:
    """Background MLflow logging for a running driver (see the module docstring).

    The MLflow work runs in a separate *process* (spawned), fed through a queue: MLflow's
    ORM costs tens of ms of Python per child run, and in a thread it would contend for the
    driver's GIL (measured: the driver loop ran 2x slower). The driver only pickles each
    finished trial onto the queue.
    """

    def __init__(self, info: StudyInfo, sdir: Path, stop: Callable[[], bool] | None = None) -> None:
        """``stop``: when it returns true (the driver aborts: a second Ctrl-C, SIGTERM),
        :meth:`finish` stops waiting for the logging at once; ``dse sync`` completes it."""
        import multiprocessing as mp

        self.info = info
        self.sdir = sdir
        self.stop = stop
        self.error: str | None = None
        self._ctx = mp.get_context("spawn")
        self._q: Any = self._ctx.Queue()
        self._status: Any = self._ctx.Queue()
        self._proc: Any = None
        self._sent: set[int] = set()  # finished trials the logging process has (none is sent twice)

    def start(self, existing: Sequence[FrozenTrial]) -> None:
        """Start the logging process; ``existing`` finished trials are backfilled if not logged."""
        self._q.put(("init", list(existing)))
        self._sent.update(t.number for t in existing if t.state.is_finished())
        self._proc = self._ctx.Process(
            target=_worker_main,
            args=(self.info, self.sdir, self._q, self._status, os.getpid()),
            name="dse-tracking",
            daemon=True,
        )
        # The process starts with SIGINT/SIGTERM blocked (the mask survives exec), so a
        # Ctrl-C while it imports MLflow prints no traceback; it ignores them once running.
        # (multiprocessing's resource tracker is started the same way.) Here they are only
        # held back for the moment of the start, not lost.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _DRIVER_SIGNALS)
        try:
            self._proc.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)

    def trial_finished(self, t: FrozenTrial) -> None:
        """Queue a finished trial (never blocks)."""
        self.trials_finished([t])

    def trials_finished(self, trials: Sequence[FrozenTrial]) -> None:
        """Queue finished trials as one item (never blocks): one pickling and one pipe
        write for all of them."""
        if trials:
            self._q.put(("trials", list(trials)))
            self._sent.update(t.number for t in trials if t.state.is_finished())

    def log_hypervolume(self, step: int, value: float) -> None:
        """Queue a hypervolume point for the parent run's history (step = COMPLETE count)."""
        self._q.put(("hv", (step, value, int(time.time() * 1000))))

    def finish(self, trials: Sequence[FrozenTrial], timeout_s: float = 300.0) -> None:
        """Write final artifacts, close the parent run and wait for the process (bounded).
        ``trials``: every trial of the study; those the process has (finished ones it was
        handed) are not sent again."""
        self._q.put(("finish", [t for t in trials if t.number not in self._sent]))
        self._q.put(None)
        aborted = False
        done = False  # the process sent its status: everything is logged and its store closed
        proc = self._proc
        if proc is not None:
            deadline = time.monotonic() + timeout_s
            told = False
            while time.monotonic() < deadline:
                if not told and time.monotonic() > deadline - timeout_s + DRAIN_NOTICE_S:
                    told = True
                    log.info("waiting for the MLflow logging to finish (Ctrl-C twice stops it; "
                                "`dse sync %s` completes it later)", self.info.name)
                if self.stop is not None and self.stop():
                    aborted = True
                    break
                try:  # (not its exit: tearing down the process's memory is not worth waiting for)
                    self.error = self._status.get(timeout=0.1)
                    done = True
                    break
                except queue.Empty:
                    if not proc.is_alive():
                        break
            if not done and proc.is_alive():
                proc.kill()  # it ignores SIGINT/SIGTERM; a half-logged child run is redone later
                proc.join(5)
                self._q.cancel_join_thread()  # queued items die with it: no hang at exit
                self.error = ("MLflow logging stopped before it was complete (interrupted)" if aborted
                              else f"MLflow logging did not finish in {timeout_s:.0f} s")
        if not done:
            with contextlib.suppress(queue.Empty):  # a status sent just before it died
                self.error = self._status.get(timeout=0.1) or self.error
        if self._proc is not None and self._proc.exitcode not in (0, None) and self.error is None:
            self.error = f"MLflow logging process exited with code {self._proc.exitcode}"
        if self.error is not None and not aborted:  # (an abort: the driver said so already)
            log.warning("MLflow: %s; backfill with `dse sync %s`", self.error, self.info.name)
        self._q.close()
        self._status.close()


def _worker_main(info: StudyInfo, sdir: Path, q: Any, status: Any, parent_pid: int | None = None) -> None:
    """Entry point of the logging process.

    Ctrl-C and SIGTERM go to the whole process group; the driver decides when logging
    stops (it sends ``finish``), so this process ignores them (a signal mid-way through
    MLflow's schema creation left a half-made store). It exits when its parent dies.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _DRIVER_SIGNALS)  # blocked from its start (Tracker.start)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    w = _TrackerWorker(info, sdir)
    try:
        w.loop(q, parent_pid)
    except BaseException as e:
        w.error = w.error or f"the MLflow logging process failed ({_why(e)})"
        raise
    finally:
        if w._link is not None:
            with contextlib.suppress(Exception):  # the data is committed; closing is tidiness
                w._link.dispose()
        status.put(w.error)  # the driver stops waiting here
    # Done: the interpreter's teardown of MLflow, SQLAlchemy, matplotlib and pandas took
    # ~2 s here, all of it in the driver's final wait; skip it once the store is closed,
    # the status sent and the logs flushed.
    status.close()
    status.join_thread()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


class _TrackerWorker:
    """The logging loop (runs in the tracking process).

    MLflow failing (other than rejecting one input) marks it *down*: nothing more is tried
    until a reconnect, attempted with backoff (1 s doubling to 30 s) while the trials and
    hypervolume points keep arriving. A reconnect lists what the store has (deleting
    half-logged child runs) and logs everything missed. Still down at the end: one warning
    pointing at ``dse sync``.
    """

    BACKOFF_S = (1.0, 30.0)  # first and longest wait between reconnect attempts
    ARTIFACTS_EVERY_S = 10.0  # shortest time between two artifact steps (the last one always runs)
    #: while trials are still queued, an artifact step due waits until the queue is empty or
    #: this long past its time: the child runs first (a step costs 0.2-0.5 s; trials queued
    #: behind it are the end-of-run drain when the search ends). The first step is due
    #: ARTIFACTS_EVERY_S after connecting (a short run has only the final one). Measured
    #: (bench_tracking, 2,000 instant trials, idle): drain 0.33-0.52 s in 8 runs of 8; with
    #: the plots warmed up only once nothing was queued, 0.32-1.12 s (never idle: the final
    #: step paid matplotlib's import).
    ARTIFACTS_LATE_S = 30.0
    BATCH_S = 0.2  # shortest time between two batches of trials (fewer, larger transactions)

    def __init__(self, info: StudyInfo, sdir: Path) -> None:
        self.info = info
        self.sdir = sdir
        self.error: str | None = None
        self._trials: dict[int, FrozenTrial] = {}
        self._link: MlflowLink | None = None
        self._since_artifacts = 0
        self._hv: list[tuple[int, float, int]] = []  # points not yet logged
        self._plotted: list[int] | None = None  # the front (trial numbers) last plotted
        self._artifacts_due = 0.0  # monotonic time from which the next artifact step may run
        self._preloaded = False  # tracking.artifacts.preload done
        self._down: str | None = None  # why MLflow is down
        self._down_since = 0.0
        self._retry_at = 0.0
        self._backoff_s = self.BACKOFF_S[0]
        self._batch_at = 0.0  # monotonic time the last batch was taken off the queue

    def _guard(self, what: str, fn: Any, *args: Any) -> bool:
        """Run one MLflow step; returns whether it succeeded. A failure is logged naming the
        step; a rejected input (MLflow answered) skips that step only; anything else marks
        MLflow down until a reconnect."""
        if self._down is not None:
            return False
        try:
            fn(*args)
            return True
        except Exception as e:  # noqa: BLE001 - MLflow must never stop the search
            if _rejected(e):
                log.warning("MLflow rejected %s (%s); the rest is logged", what, _why(e))
                return False
            self._down = f"failed while {what} at {self.info.uri} ({_why(e)})"
            self._down_since = time.monotonic()
            self._backoff_s = self.BACKOFF_S[0]
            self._retry_at = self._down_since + self._backoff_s
            log.warning("MLflow %s; the search goes on; reconnecting with backoff", self._down)
            return False

    def _reconnect(self) -> None:
        """One reconnect attempt; on success log everything missed while down."""
        if self._down is None or time.monotonic() < self._retry_at:
            return
        why, since = self._down, self._down_since
        self._down = None
        if not self._guard("reconnecting", self._connect):
            self._down = why
            self._down_since = since
            self._backoff_s = min(2 * self._backoff_s, self.BACKOFF_S[1])
            self._retry_at = time.monotonic() + self._backoff_s
            return
        link = self._link
        assert link is not None
        before = len(link.logged)
        self._log_trials(sorted(self._trials.values(), key=lambda t: t.number))
        self._flush_hv()
        if self._down is None:
            log.warning("MLflow back at %s after %.0f s: %d missed trial(s) and the hypervolume logged",
                        self.info.uri, time.monotonic() - since, len(link.logged) - before)

    def loop(self, q: Any, parent_pid: int | None = None) -> None:
        while True:
            self._reconnect()
            wait_s = 2.0 if self._down is None else max(0.05, min(2.0, self._retry_at - time.monotonic()))
            try:
                item = q.get(timeout=wait_s)
            except queue.Empty:
                if parent_pid is not None and os.getppid() != parent_pid:
                    log.warning("driver gone; MLflow logging stops (`dse sync %s` backfills)", self.info.name)
                    return
                continue
            items = [item]
            # let a batch of trials gather (one transaction), but not once the search is over
            gather_until = self._batch_at + self.BATCH_S if item is not None and item[0] == "trials" else 0.0
            while items[-1] is not None:  # take what is queued: one batch
                left = 0.0 if items[-1][0] == "finish" else gather_until - time.monotonic()
                try:
                    items.append(q.get(timeout=left) if left > 0 else q.get_nowait())
                except queue.Empty:
                    if left <= 0:
                        break
            self._batch_at = time.monotonic()
            done = False
            batch: list[FrozenTrial] = []  # the trials of this batch: logged together
            for it in items:
                if it is None:
                    done = True
                    continue
                kind, payload = it
                if kind == "init":
                    for t in payload:
                        self._trials[t.number] = t
                    if self._guard("connecting", self._connect):
                        self._log_trials(payload)
                elif kind == "trials":
                    for t in payload:
                        self._trials[t.number] = t
                        batch.append(t)
                        self._since_artifacts += t.state == TrialState.COMPLETE
                elif kind == "hv":
                    self._hv.append(payload)
                elif kind == "finish":
                    self._log_trials(batch)
                    batch = []
                    for t in payload:
                        self._trials[t.number] = t
                    self._retry_at = 0.0  # one last attempt now
                    self._reconnect()
                    self._flush_hv()
                    self._final()
            self._log_trials(batch)
            self._flush_hv()
            if not self._preloaded and self._link is not None:
                self._preloaded = True  # once connected: warm the plots up for the artifact steps
                preload()
            now = time.monotonic()
            if (self._since_artifacts >= self.info.artifact_every and now >= self._artifacts_due
                    and (_empty(q) or now >= self._artifacts_due + self.ARTIFACTS_LATE_S)):
                self._since_artifacts = 0
                self._artifacts()
            if done:
                if self._down is not None:
                    self.error = self._down
                return

    def _connect(self) -> None:
        self._link = MlflowLink(self.info, self.sdir)
        self._link.connect()
        self._artifacts_due = max(self._artifacts_due, time.monotonic() + self.ARTIFACTS_EVERY_S)

    def _log_trials(self, trials: Sequence[FrozenTrial], pareto: bool = False) -> None:
        """Child runs of ``trials`` (``child_runs = "all"``; ``pareto``: the final front for
        ``"pareto"``), all in one call: one warning per trial MLflow rejects."""
        if (self.info.child_runs != "all" and not pareto) or self._link is None or not trials:
            return
        link = self._link
        numbers = [t.number for t in trials]
        what = f"logging trial {numbers[0]}" if len(numbers) == 1 else f"logging trials {min(numbers)}-{max(numbers)}"
        rejected: list[tuple[int, Exception]] = []
        if self._guard(what, lambda: rejected.extend(link.log_trials(trials))):
            for n, e in rejected:
                log.warning("MLflow rejected logging trial %d (%s); the rest is logged", n, _why(e))

    def _flush_hv(self) -> None:
        if self._hv and self._link is not None:
            if self._guard("logging the hypervolume", self._link.log_hypervolume, self._hv):
                self._hv = []

    def _artifacts(self, final: bool = False) -> None:
        """Tables, summary and front table; the plots only when the front changed (and at
        the end). Then the next step waits :attr:`ARTIFACTS_EVERY_S`, or 10x the time this
        one took: drawing thousands of points costs seconds, and the logging must keep up
        with the search."""
        trials = sorted(self._trials.values(), key=lambda t: t.number)
        front = [t.number for t in self.info.front(trials)]
        t0 = time.monotonic()
        plots = final or front != self._plotted
        self._plotted = front
        ok = self._link is not None and self._guard("logging artifacts", self._link.log_artifacts, trials, plots, front)
        self._artifacts_due = time.monotonic() + max(self.ARTIFACTS_EVERY_S, 10 * (time.monotonic() - t0))
        if not ok:
            try:
                write_artifacts(trials, self.info, self.sdir / "artifacts", plots=plots, front=front)
            except OSError as e:  # e.g. a full disk: the journal has everything
                log.warning("artifacts not written to %s (%s); `dse sync %s` writes them later",
                            self.sdir / "artifacts", e.strerror or e, self.info.name)

    def _final(self) -> None:
        trials = sorted(self._trials.values(), key=lambda t: t.number)
        link = self._link
        if self.info.child_runs == "pareto":
            self._log_trials(self.info.front(trials), pareto=True)
        else:
            self._log_trials(trials)  # anything missed
        self._artifacts(final=True)
        if link is not None:
            self._guard("closing the parent run", link.close)


#: MLflow 3.17's UI opens every experiment in its GenAI view (a per-browser setting that
#: ignores the experiment's ``mlflow.experimentKind`` tag); this query selects the
#: model-training view, where the study's runs are listed.
UI_VIEW = "?workflowType=machine_learning"


def study_run_path(uri: str, study: str) -> str:
    """The UI path of a study's parent run (``#/experiments/<id>/runs/<run id>``), or of
    its experiment's runs, in the model-training view (:data:`UI_VIEW`); ``""`` when the
    store does not have the study (yet) or cannot be read."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    from mlflow.tracking import MlflowClient

    try:
        c = MlflowClient(tracking_uri=uri)
        exp = c.get_experiment_by_name(study)
        if exp is None:
            return ""
        runs = c.search_runs([exp.experiment_id], filter_string=f"tags.`{ROLE_TAG}` = 'parent'", max_results=1)
    except Exception as e:  # noqa: BLE001 - a URL without the run is still useful
        log.warning("MLflow at %s: cannot find study %s (%s)", uri, study, _why(e))
        return ""
    path = f"#/experiments/{exp.experiment_id}"
    return (f"{path}/runs/{runs[0].info.run_id}" if runs else f"{path}/runs") + UI_VIEW


@dataclass
class SyncResult:
    """What :func:`sync` did: child runs created and already present, the tracking URI,
    and one line per trial MLflow rejected (the rest was still logged)."""

    created: int
    present: int
    uri: str
    rejected: list[str]


def sync(info: StudyInfo, sdir: Path, trials: Sequence[FrozenTrial]) -> SyncResult:
    """Backfill MLflow from the Optuna trials: missing child runs, the hypervolume history
    (every step up to 200 evenly spaced ones, and the last, that the parent run lacks),
    artifacts and summary.

    Safe to run repeatedly: trials already logged are skipped. Raises
    :class:`TrackingError` (one line: the step, the URI, the cause) when MLflow fails
    other than by rejecting one trial's input.
    """
    step = "connecting"
    try:
        link = MlflowLink(info, sdir)
        link.connect()
        present = len(link.logged)
        trials = sorted(trials, key=lambda t: t.number)
        to_log = info.front(trials) if info.child_runs == "pareto" else trials
        step = "logging the trials"
        before = len(link.logged)
        rejected = [f"trial {n}: {_why(e)}" for n, e in link.log_trials(to_log)]
        created = len(link.logged) - before
        step = "logging the hypervolume history"
        if len(info.objectives) > 1:
            have = {m.step for m in link.client.get_metric_history(link.parent_id, "hypervolume")}
            done = sorted(
                (t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: (t.datetime_complete, t.number)
            )
            stride = max(1, len(done) // 200)
            steps = [i for i in [*range(stride, len(done) + 1, stride), len(done)] if i and i not in have]
            pts = [(i, info.hypervolume(done[:i]), _ms(done[i - 1].datetime_complete)) for i in sorted(set(steps))]
            link.log_hypervolume(pts)
        step = "logging the artifacts"
        link.log_artifacts(trials)
        step = "closing the parent run"
        link.close()
    except Exception as e:  # noqa: BLE001 - one line for the user, not a traceback
        raise TrackingError(f"MLflow at {info.uri}: {step} failed ({_why(e)})") from e
    return SyncResult(created, present, link.uri, rejected)
