"""The search driver: Optuna ask/tell over a pool of Ray actors holding warm evaluators.

One driver process owns a study while it runs. It asks Optuna for a trial, samples the
spec's space define-by-run, sends the parameters to a free actor, and ``ray.wait``\\ s on
the in-flight trials (as many as there are workers). Each finished trial is told exactly
once: objectives as values, constraints through ``trial.set_constraint``, every metric and
every non-float output as user attributes (``metrics``, ``info``); an evaluator that
raises or returns NaN fails the trial with ``fail_reason``. An actor that dies is replaced
and its trial runs again on the replacement.

Crash safety: the driver writes a heartbeat (study system attribute ``dse:driver``) every
few seconds. A driver that starts on an existing study finds trials left RUNNING by a
dead driver, fails them with a reason and re-enqueues their parameters, and goes on until
the study has ``n_trials`` COMPLETE trials. Ctrl-C stops asking and lets in-flight trials
finish; a second Ctrl-C (or SIGTERM) fails and re-enqueues them at once.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import optuna
from optuna.trial import FrozenTrial, Trial, TrialState

from dse import registry
from dse.pareto import FrontTracker, is_feasible
from dse.spec import (
    Spec,
    SpecError,
    complete_params,
    parse_spec,
    sample_params,
    study_info,
    study_name_problem,
)
from dse.storage import buffered_records, flush_storage, open_storage

__all__ = ["Driver", "DriverError", "RunSummary", "open_storage", "open_study", "study_dir"]

log = logging.getLogger("dse")

DEFAULT_DIR = Path("dse-studies")
HEARTBEAT_S = 5.0
FLUSH_S = 0.2  # longest time told results stay unflushed in the journal buffer
HV_EVERY_S = 1.0  # hypervolume (progress + MLflow history) at most this often
MAX_ATTEMPTS = 3  # runs of one trial on successive actors before it FAILs
SPEC_ATTR = "dse:spec"
DRIVER_ATTR = "dse:driver"
ENQUEUED_ATTR = "dse:baselines_enqueued"


def _system_attrs(study: optuna.Study) -> dict[str, Any]:
    return study._storage.get_study_system_attrs(study._study_id)


def _root_cause(e: BaseException) -> str:
    """The last ``SomeError: message`` line of a (Ray) exception's text, else its first line."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    causes = [ln for ln in lines if re.match(r"^[\w.]*(Error|Exception)\b: ", ln)]
    return causes[-1] if causes else (lines[0] if lines else type(e).__name__)


class DriverError(RuntimeError):
    """The search cannot start or go on (e.g. an evaluator fails to build)."""


# ----------------------------------------------------------------------------- storage


def study_dir(spec_name: str, root: str | Path = DEFAULT_DIR) -> Path:
    """The directory holding everything of study ``spec_name``: ``<root>/<name>/``.

    Raises:
        SpecError: ``spec_name`` is not a plain name (a path, ``..``, an option, ...).
    """
    if why := study_name_problem(spec_name):
        raise SpecError([f"study: {why}"])
    return Path(root) / spec_name


def load_study_spec(name: str, root: str | Path = DEFAULT_DIR) -> Spec:
    """The spec a study was created with (``<root>/<name>/spec.toml``), validated again."""
    path = study_dir(name, root) / "spec.toml"
    if not path.exists():
        raise FileNotFoundError(f"study {name!r}: no {path}; expected a study created by `dse run`")
    return parse_spec(path.read_text(encoding="utf-8"), source=str(path), path=path)


#: spec fields that steer a run without changing what the study is (accepted on an existing study)
RUN_CONTROL_FIELDS = ("study.n_trials", "study.timeout_s", "study.max_failed", "ray.", "tracking.")


def _flat_fields(x: Any, prefix: str = "") -> dict[str, Any]:
    """Leaves of parsed TOML by field name (``space.x.0.high``, ``objectives[1].metric``)."""
    if isinstance(x, dict):
        out: dict[str, Any] = {}
        for k, v in x.items():
            out.update(_flat_fields(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(x, list) and x and all(isinstance(v, dict) for v in x):
        out = {}
        for i, v in enumerate(x):
            out.update(_flat_fields(v, f"{prefix}[{i}]"))
        return out
    return {prefix: x}


def spec_changes(old_text: str, new_text: str) -> list[str]:
    """The fields whose values differ between two spec texts (comments and layout aside)."""
    import tomllib

    a, b = _flat_fields(tomllib.loads(old_text)), _flat_fields(tomllib.loads(new_text))
    return sorted(k for k in a.keys() | b.keys() if k not in a or k not in b or a[k] != b[k]
                  or type(a[k]) is not type(b[k]))


def check_spec_change(spec: Spec, sdir: Path, *, allow: bool = False) -> None:
    """Refuse a spec that differs from the one an existing study in ``sdir`` was made with.

    Differences only in run-control fields (:data:`RUN_CONTROL_FIELDS`: ``n_trials``,
    ``timeout_s``, ``max_failed``, ``[ray]``, ``[tracking]``) are accepted; any other
    (space, objectives, constraints, evaluators, seed, sampler, storage, baselines) raises
    :class:`SpecError` naming the fields, unless ``allow`` (``--allow-spec-change``).
    An accepted change is written to ``sdir/spec.toml`` (atomically), so the stored spec
    is always the one the study runs with; ``dse resume`` uses it.
    """
    path = sdir / "spec.toml"
    if not path.exists() or not spec.text:
        return
    old = path.read_text(encoding="utf-8")
    changed = spec_changes(old, spec.text)
    if not changed:
        return
    meaning = [k for k in changed if not k.startswith(RUN_CONTROL_FIELDS)]
    if meaning and not allow:
        shown = ", ".join(meaning[:8]) + (f" (+{len(meaning) - 8} more)" if len(meaning) > 8 else "")
        raise SpecError([
            f"{spec.path or spec.name}: study {spec.name!r} exists with another spec ({path}): "
            f"{shown} differ; use another study name, or --allow-spec-change to continue it "
            "with this spec"
        ])
    tmp = path.with_name("spec.toml.tmp")
    tmp.write_text(spec.text, encoding="utf-8")
    os.replace(tmp, path)
    (log.warning if meaning else log.info)("study %s: spec changed (%s); %s now holds the new spec",
                                           spec.name, ", ".join(changed), path)


def open_study(
    spec: Spec, sdir: Path, *, create: bool = True, buffered: bool = False,
    allow_spec_change: bool = False,
) -> optuna.Study:
    """Create or load the spec's Optuna study in ``sdir`` (spec copied to ``sdir/spec.toml``).

    ``buffered``: batch journal writes until :func:`dse.storage.flush_storage` (driver only).
    ``allow_spec_change``: see :func:`check_spec_change` (``create`` only).
    """
    if create:
        check_spec_change(spec, sdir, allow=allow_spec_change)
    storage = open_storage(spec.storage, sdir, buffered=buffered)
    if not create:
        study = optuna.load_study(study_name=spec.name, storage=storage, sampler=spec.make_sampler())
        _reseed(study, spec)
        return study
    study = optuna.create_study(
        study_name=spec.name,
        storage=storage,
        sampler=spec.make_sampler(),
        directions=spec.directions,
        load_if_exists=True,
    )
    if list(study.directions) != [
        optuna.study.StudyDirection.MINIMIZE if d == "minimize" else optuna.study.StudyDirection.MAXIMIZE
        for d in spec.directions
    ]:
        raise DriverError(f"study {spec.name!r} exists with other objective directions; use another name")
    spec_path = sdir / "spec.toml"
    if not spec_path.exists():
        spec_path.write_text(spec.text, encoding="utf-8")
    if spec.text and study.user_attrs.get(SPEC_ATTR) != spec.text:
        study.set_user_attr(SPEC_ATTR, spec.text)
    _reseed(study, spec)
    return study


def _reseed(study: optuna.Study, spec: Spec) -> None:
    """A resumed study's sampler continues the search: seeded from (seed, trials so far)."""
    n = len(study._storage.get_all_trials(study._study_id, deepcopy=False))
    if n:
        study.sampler = spec.make_sampler(n)


def _init_loopback_ray(kwargs: dict[str, Any]) -> None:
    """``ray.init(**kwargs)`` of a local cluster whose processes listen on 127.0.0.1 only.

    Ray binds its servers (GCS, raylet, workers, agents) to the node's IP address, and
    picks the host's routable address unless Ray clusters are disabled, as on macOS and
    Windows (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``; a plain ``_node_ip_address =
    "127.0.0.1"`` is turned back into the routable address). The flag is set for this
    call only (the module value and the environment that Ray's processes inherit).
    """
    import ray
    from ray._private import ray_constants

    env_var = ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR
    old_env = os.environ.get(env_var)
    old_flag = ray_constants.ENABLE_RAY_CLUSTER
    os.environ[env_var], ray_constants.ENABLE_RAY_CLUSTER = "0", False
    try:
        ray.init(**kwargs)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = old_flag
        if old_env is None:
            os.environ.pop(env_var, None)
        else:
            os.environ[env_var] = old_env


# ----------------------------------------------------------------------------- actors


def _jsonable(v: Any) -> Any:
    """``v`` if JSON can hold it, else its ``str``."""
    try:
        json.dumps(v)
        return v
    except (TypeError, ValueError):
        return str(v)


def _is_metric(v: Any) -> bool:
    if isinstance(v, bool | int | float):
        return True
    try:  # numpy scalars
        import numpy as np

        return isinstance(v, np.number | np.bool_)
    except ImportError:  # pragma: no cover
        return False


class EvaluatorHost:
    """Holds the warm evaluators of one actor and runs them in spec order for a trial."""

    def __init__(
        self,
        evaluators: list[tuple[str, dict[str, Any], Callable[..., Any] | None]],
        study_dir: str,
        seed: int,
        num_threads: int,
    ) -> None:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            os.environ[var] = str(num_threads)
        self.evaluators: list[tuple[str, Any]] = []
        for name, options, factory in evaluators:
            fac = factory if factory is not None else registry.get(name)
            ctx = registry.EvalContext(Path(study_dir), seed=seed, num_threads=num_threads, name=name)
            self.evaluators.append((name, fac(dict(options), ctx)))
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(num_threads)

    def ready(self) -> int:
        """The process id (the driver waits for this before it starts asking)."""
        return os.getpid()

    def evaluate(self, params: dict[str, Any]) -> dict[str, Any]:
        """Run every evaluator on ``params``; never raises (errors come back as ``error``)."""
        t0 = time.perf_counter()
        metrics: dict[str, float] = {}
        info: dict[str, Any] = {}
        name = ""
        try:
            for ev_name, ev in self.evaluators:
                name = ev_name
                out = ev.evaluate(MappingProxyType(params), MappingProxyType({**info, **metrics}))
                if not isinstance(out, Mapping):
                    raise TypeError(f"evaluate returned {type(out).__name__}; expected a dict")
                for k, v in out.items():
                    if _is_metric(v):
                        metrics[str(k)] = float(v)
                    else:
                        info[str(k)] = _jsonable(v)
        except Exception as e:  # noqa: BLE001 - every evaluator error fails the trial only
            first = (str(e).strip().splitlines() or [""])[0]
            return {
                "error": f"evaluator {name!r} raised {type(e).__name__}: {first}",
                "traceback": traceback.format_exc(limit=20),
                "pid": os.getpid(),
                "eval_s": time.perf_counter() - t0,
            }
        return {"metrics": metrics, "info": info, "pid": os.getpid(), "eval_s": time.perf_counter() - t0}


# ----------------------------------------------------------------------------- driver


@dataclass
class RunSummary:
    """What a driver run did. Counts are over the whole study at the end."""

    study: str
    study_dir: Path
    complete: int
    failed: int
    running: int
    pareto_size: int
    hypervolume: float
    wall_s: float
    interrupted: bool = False
    recovered: list[int] = field(default_factory=list)
    setup_s: float = 0.0  # Ray start/connect and actors ready
    loop_s: float = 0.0  # first ask to last tell (the orchestration being measured)
    finish_s: float = 0.0  # shutdown, final tracking flush and artifacts


@dataclass
class _Job:
    trial: Trial
    params: dict[str, Any]
    actor_index: int
    attempts: int = 1
    started: float = field(default_factory=time.monotonic)


class Driver:
    """Runs (or resumes) one study to ``n_trials`` COMPLETE trials.

    Args:
        spec: the validated spec.
        root: the studies directory (``--dir``).
        n_trials, workers, seed, address: overrides of the spec's values (``None``: keep).
        tracking: ``False`` disables MLflow (``--no-tracking``); ``None`` keeps the spec's.
        progress: ``True`` for a tqdm bar, ``False`` for log lines, ``None``: bar on a TTY.
        num_cpus: logical CPUs of a local Ray cluster the driver starts (default: enough
            for the workers).
    """

    def __init__(
        self,
        spec: Spec,
        root: str | Path = DEFAULT_DIR,
        *,
        n_trials: int | None = None,
        workers: int | None = None,
        seed: int | None = None,
        address: str | None = None,
        tracking: bool | None = None,
        progress: bool | None = None,
        num_cpus: int | None = None,
        allow_spec_change: bool = False,
    ) -> None:
        if seed is not None:
            spec.seed = seed
        self.spec = spec
        self.root = Path(root)
        self.sdir = study_dir(spec.name, root)
        self.n_trials = n_trials if n_trials is not None else spec.n_trials
        self.workers = workers if workers is not None else spec.workers
        self.address = address if address is not None else spec.address
        self.tracking = spec.tracking if tracking is None else tracking
        self.progress = sys.stderr.isatty() if progress is None else progress
        self.num_cpus = num_cpus
        self.allow_spec_change = allow_spec_change
        self.max_failed = spec.max_failed if spec.max_failed is not None else max(self.n_trials, 10)
        self._stop = threading.Event()
        self._abort = threading.Event()
        self._interrupts = 0

    # -------------------------------------------------------------- setup helpers

    def _heartbeat(self, study: optuna.Study) -> None:
        study._storage.set_study_system_attr(
            study._study_id,
            DRIVER_ATTR,
            {"pid": os.getpid(), "host": socket.gethostname(), "time": time.time()},
        )

    def _check_owner(self, study: optuna.Study) -> None:
        """Refuse to run a study another live driver is running."""
        hb = _system_attrs(study).get(DRIVER_ATTR)
        if not isinstance(hb, dict) or hb.get("pid") == os.getpid():
            return
        fresh = time.time() - float(hb.get("time", 0)) < 3 * HEARTBEAT_S
        if hb.get("host") == socket.gethostname():
            try:
                os.kill(int(hb["pid"]), 0)
                alive = True
            except (OSError, ValueError):
                alive = False
            if alive and fresh:
                raise DriverError(f"study {self.spec.name!r} is being run by pid {hb['pid']}; stop it first")
        elif fresh:
            raise DriverError(f"study {self.spec.name!r} is being run on host {hb.get('host')}; stop it first")

    def _recover(self, study: optuna.Study) -> list[int]:
        """Fail trials left RUNNING by a dead driver and re-enqueue their parameters."""
        stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        for t in stale:
            study._storage.set_trial_user_attr(
                t._trial_id, "fail_reason", "left RUNNING by a driver that stopped (no heartbeat); re-enqueued"
            )
            study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
            study.enqueue_trial(dict(t.params), user_attrs={"dse:retry_of": t.number})
        if stale:
            log.warning("recovered %d trial(s) left RUNNING: %s", len(stale), [t.number for t in stale])
        return [t.number for t in stale]

    def _init_ray(self) -> bool:
        """Connect to or start Ray; returns whether this driver must shut it down."""
        import ray

        if ray.is_initialized():
            return False
        res = self.spec.actor_resources()
        kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING}
        if self.address == "local":
            cpus = self.num_cpus or max(1, math.ceil(self.workers * max(res["num_cpus"], 1e-3)))
            kwargs.update(
                address="local",
                num_cpus=cpus,
                object_store_memory=100 * 1024 * 1024,
            )
            if res["num_gpus"]:
                kwargs["num_gpus"] = math.ceil(self.workers * res["num_gpus"])
        else:
            kwargs["address"] = self.address
        try:
            if self.address == "local":
                _init_loopback_ray(kwargs)
            else:
                ray.init(**kwargs)
        except (ConnectionError, RuntimeError, ValueError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise DriverError(f"cannot start or join Ray at address {self.address!r}: {first}") from None
        return True

    def _make_actor(self) -> Any:
        import ray

        res = self.spec.actor_resources()
        threads = max(1, int(res["num_cpus"]))
        evals = []
        for e in self.spec.evaluators:
            fac = registry._LOADED.get(e.name) if e.name not in registry._BUILTIN else None
            if fac is not None:
                # A factory registered as an object (a notebook, a test) may live in a
                # module the workers cannot import: ship its module by value.
                mod = sys.modules.get(getattr(fac, "__module__", "") or "")
                if mod is not None and mod.__name__ != "__main__":
                    import ray.cloudpickle

                    ray.cloudpickle.register_pickle_by_value(mod)
            evals.append((e.name, e.options, fac))
        cls = ray.remote(EvaluatorHost)
        opts: dict[str, Any] = {"num_cpus": res["num_cpus"], "num_gpus": res["num_gpus"], "max_restarts": 0}
        if "memory" in res:
            opts["memory"] = res["memory"]
        return cls.options(**opts).remote(evals, str(self.sdir.resolve()), self.spec.seed, threads)

    # -------------------------------------------------------------- signals

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._interrupts += 1
        if signum == signal.SIGTERM or self._interrupts > 1:
            self._abort.set()
            self._stop.set()
            log.warning("aborting: in-flight trials are failed and re-enqueued")
        else:
            self._stop.set()
            log.warning("stopping: waiting for in-flight trials (Ctrl-C again to abort them)")

    # -------------------------------------------------------------- main loop

    def run(self) -> RunSummary:
        """Run the search until the study has ``n_trials`` COMPLETE trials (or stops)."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError, WorkerCrashedError

        t_start = time.monotonic()
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.sdir.mkdir(parents=True, exist_ok=True)
        study = open_study(self.spec, self.sdir, buffered=True, allow_spec_change=self.allow_spec_change)
        self._check_owner(study)
        self._heartbeat(study)
        recovered = self._recover(study)
        if self.spec.enqueue and not _system_attrs(study).get(ENQUEUED_ATTR):
            for point in self.spec.enqueue:
                study.enqueue_trial(point, user_attrs={"dse:baseline": True})
            study._storage.set_study_system_attr(study._study_id, ENQUEUED_ATTR, True)
        flush_storage(study._storage)

        trials = study.get_trials(deepcopy=False)
        n_complete = sum(t.state == TrialState.COMPLETE for t in trials)
        front = FrontTracker(self.spec)
        for t in trials:
            if t.state == TrialState.COMPLETE and t.values and is_feasible(t):
                front.add(t.values)

        tracker = None
        if self.tracking and n_complete < self.n_trials:  # a complete study's runs stay as they are
            from tracking.mlflow_tracker import Tracker

            tracker = Tracker(study_info(self.spec, self.sdir), self.sdir)
            tracker.start([t for t in trials if t.state.is_finished()])

        old_handlers: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                old_handlers[sig] = signal.signal(sig, self._on_signal)

        owns_ray = False
        t_loop = time.monotonic()
        actors: list[Any] = []
        inflight: dict[Any, _Job] = {}
        n_failed_run = 0
        bar = None
        last_log = time.monotonic()
        last_hb = time.monotonic()
        last_flush = time.monotonic()
        last_hv = 0.0
        # Told trials go to MLflow only once their records are in the storage file: the
        # journal is the source of truth, and a SIGKILL between a tell and the next flush
        # must not leave MLflow holding a trial that `resume` will re-run.
        untracked: list[FrozenTrial] = []

        def track_durable() -> None:
            if untracked and buffered_records(study._storage) == 0:
                if tracker is not None:
                    for ft in untracked:
                        tracker.trial_finished(ft)
                untracked.clear()

        try:
            if n_complete < self.n_trials:
                owns_ray = self._init_ray()
                actors = [self._make_actor() for _ in range(self.workers)]
                try:
                    ray.get([a.ready.remote() for a in actors])
                except RayActorError as e:
                    raise DriverError(f"an evaluator failed to start: {_root_cause(e)}") from None
            free = list(range(len(actors)))
            if self.progress:
                from tqdm import tqdm

                bar = tqdm(total=self.n_trials, initial=n_complete, desc=self.spec.name, unit="trial")
            deadline = t_start + self.spec.timeout_s if self.spec.timeout_s else None
            t_loop = time.monotonic()

            def submit(job: _Job) -> None:
                ref = actors[job.actor_index].evaluate.remote(job.params)
                inflight[ref] = job

            def fill(n_done: int, n_failed: int, n_pending: int) -> None:
                """Ask and submit trials while an actor is free and more are needed."""
                while (
                    free
                    and not self._stop.is_set()
                    and n_done + n_pending + len(inflight) < self.n_trials
                    and n_failed < self.max_failed
                ):
                    trial = study.ask()
                    params = complete_params(sample_params(trial, self.spec), self.spec)
                    submit(_Job(trial, params, free.pop()))

            while True:
                if deadline is not None and time.monotonic() > deadline and not self._stop.is_set():
                    log.warning("timeout_s reached: no new trials")
                    self._stop.set()
                fill(n_complete, n_failed_run, 0)
                dirty = buffered_records(study._storage) > 0
                if dirty and (time.monotonic() - last_flush >= FLUSH_S or not inflight):
                    flush_storage(study._storage)  # one lock + fsync for many records
                    last_flush = time.monotonic()
                    dirty = False
                track_durable()
                if self._abort.is_set() or not inflight:
                    break
                ready, _ = ray.wait(list(inflight), num_returns=1, timeout=FLUSH_S if dirty else 1.0)
                if ready:
                    rest = [r for r in inflight if r not in ready]
                    if rest:
                        more, _ = ray.wait(rest, num_returns=len(rest), timeout=0)
                        ready = ready + more
                told: list[FrozenTrial] = []
                results: list[tuple[_Job, dict[str, Any]]] = []
                for ref in ready:
                    job = inflight.pop(ref)
                    try:
                        res = ray.get(ref, timeout=30)
                    except RayTaskError as e:  # e.g. the parameters could not be unpickled
                        free.append(job.actor_index)
                        told.append(self._fail(study, job, f"task error: {str(e).splitlines()[0]}"))
                        continue
                    except (RayActorError, WorkerCrashedError, GetTimeoutError) as e:
                        reason = f"actor died: {type(e).__name__}"
                        log.warning("trial %d: %s; replacing the actor", job.trial.number, reason)
                        ray.kill(actors[job.actor_index], no_restart=True)
                        actors[job.actor_index] = self._make_actor()
                        if job.attempts >= MAX_ATTEMPTS:
                            told.append(self._fail(study, job, f"{reason} ({job.attempts} attempts)"))
                            free.append(job.actor_index)
                        else:
                            job.attempts += 1
                            submit(job)
                        continue
                    free.append(job.actor_index)
                    results.append((job, res))
                # Keep the actors busy first, then tell: the tells overlap the evaluations.
                if results:
                    fill(n_complete, n_failed_run, len(results))
                for job, res in results:
                    told.append(self._tell(study, job, res))
                for ft in told:
                    if ft.state == TrialState.COMPLETE:
                        n_complete += 1
                        if is_feasible(ft):
                            front.add(ft.values)
                    else:
                        n_failed_run += 1
                    untracked.append(ft)
                now = time.monotonic()
                if told and (now - last_hv >= HV_EVERY_S or n_complete >= self.n_trials):
                    last_hv = now
                    hv = front.hypervolume() if len(self.spec.objectives) > 1 else float("nan")
                    if tracker is not None and len(self.spec.objectives) > 1:
                        tracker.log_hypervolume(n_complete, hv)
                    if bar is not None:
                        bar.n = n_complete
                        if len(self.spec.objectives) > 1:
                            quality = {"pareto": front.size, "hv": f"{hv:.4g}"}
                        else:  # the best value, in the objective's direction
                            best = front.front[:, 0].min() * (1 if self.spec.directions[0] == "minimize" else -1) if front.size else float("nan")
                            quality = {"best": f"{best:.4g}"}
                        bar.set_postfix(running=len(inflight), failed=n_failed_run, refresh=False, **quality)
                        bar.refresh()
                now = time.monotonic()
                if bar is None and now - last_log > 10.0:
                    last_log = now
                    log.info(
                        "%s: %d/%d complete, %d running, %d failed, pareto %d, hv %.6g",
                        self.spec.name, n_complete, self.n_trials, len(inflight), n_failed_run,
                        front.size, front.hypervolume(),
                    )
                if now - last_hb > HEARTBEAT_S:
                    last_hb = now
                    self._heartbeat(study)
            if self._abort.is_set():
                for job in list(inflight.values()):
                    untracked.append(
                        self._fail(study, job, "interrupted (Ctrl-C/SIGTERM); re-enqueued", requeue=True)
                    )
                inflight.clear()
            if n_failed_run >= self.max_failed:
                log.error("stopped: %d failed trials (max_failed)", n_failed_run)
        finally:
            t_fin = time.monotonic()
            if bar is not None:
                bar.close()
            for a in actors:
                try:
                    ray.kill(a, no_restart=True)
                except Exception:  # noqa: BLE001 - already dead
                    pass
            if owns_ray:
                ray.shutdown()
            for sig, h in old_handlers.items():
                signal.signal(sig, h)
            try:  # a full disk raises here again (StorageError): still stop the tracker
                study._storage.set_study_system_attr(study._study_id, DRIVER_ATTR, {"pid": None, "time": 0.0})
                flush_storage(study._storage)
                track_durable()
            finally:
                all_trials = study.get_trials(deepcopy=False)
                if tracker is not None:
                    tracker.finish(all_trials)
        counts = {s: 0 for s in TrialState}
        for t in all_trials:
            counts[t.state] += 1
        return RunSummary(
            study=self.spec.name,
            study_dir=self.sdir,
            complete=counts[TrialState.COMPLETE],
            failed=counts[TrialState.FAIL],
            running=counts[TrialState.RUNNING],
            pareto_size=front.size,
            hypervolume=front.hypervolume(),
            wall_s=time.monotonic() - t_start,
            interrupted=self._stop.is_set(),
            recovered=recovered,
            setup_s=t_loop - t_start,
            loop_s=t_fin - t_loop,
            finish_s=time.monotonic() - t_fin,
        )

    # -------------------------------------------------------------- telling

    def _fail(self, study: optuna.Study, job: _Job, reason: str, requeue: bool = False) -> FrozenTrial:
        job.trial.set_user_attr("fail_reason", reason)
        ft = study.tell(job.trial, state=TrialState.FAIL, skip_if_finished=True)
        if requeue:
            study.enqueue_trial(dict(job.trial.params), user_attrs={"dse:retry_of": job.trial.number})
        return ft

    def _tell(self, study: optuna.Study, job: _Job, res: dict[str, Any]) -> FrozenTrial:
        trial = job.trial
        if res.get("error"):
            trial.set_user_attr("traceback", res.get("traceback", ""))
            return self._fail(study, job, res["error"])
        metrics: dict[str, float] = res["metrics"]
        trial.set_user_attr("metrics", metrics)
        if res.get("info"):
            trial.set_user_attr("info", res["info"])
        trial.set_user_attr("eval_s", res.get("eval_s", 0.0))
        if job.attempts > 1:
            trial.set_user_attr("attempts", job.attempts)
        nan = [k for k, v in metrics.items() if math.isnan(v)]
        if nan:
            return self._fail(study, job, f"NaN metric(s): {', '.join(nan)}")
        missing = [m for m in [o.metric for o in self.spec.objectives] + [c.metric for c in self.spec.constraints] if m not in metrics]
        if missing:
            return self._fail(
                study, job, f"metric(s) {', '.join(missing)} missing; evaluators returned {', '.join(sorted(metrics))}"
            )
        for c in self.spec.constraints:
            trial.set_constraint(c.key, c.violation(metrics[c.metric]))
        values = [metrics[o.metric] for o in self.spec.objectives]
        return study.tell(trial, values, skip_if_finished=True)
