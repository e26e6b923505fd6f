"""The search driver: Optuna ask/tell over a pool of evaluators (Ray actors, or inline).

One driver process owns a study while it runs. The loop (:meth:`Driver.run`) is:
ask Optuna for trials while the pool has an idle worker -> the pool evaluates
(:mod:`dse.pools`: placement, re-runs after an actor dies, trial timeouts, shrinking) ->
tell each outcome exactly once -> the listeners react (:mod:`dse.listeners`: Pareto
front, progress, heartbeat, MLflow) -> stop rules (target reached, ``max_failed``,
``timeout_s``, signals). Objectives are told as values, constraints through
``trial.set_constraint``, every metric and every non-float output as user attributes
(``metrics``, ``info``); an evaluator that raises or returns a non-finite metric fails
the trial with ``fail_reason``.

Several drivers (processes, hosts) may run one study at once and cooperate
(:class:`dse.storage.Cooperation`): each writes a heartbeat (``dse:driver:<id>``) every few
seconds and asks only while the study's COMPLETE + RUNNING trials are fewer than
``n_trials`` (counted under a storage-wide lock), so together they end with exactly
``n_trials`` COMPLETE. Trials left RUNNING by a driver that is gone are run again as
themselves by a driver that starts, or failed and re-enqueued once by one that is
running. Ctrl-C stops asking and lets in-flight trials
finish; a second Ctrl-C or SIGTERM fails and re-enqueues them at once (an evaluation in the
driver process is aborted too). During start-up (Ray starting, actors building) the first
Ctrl-C stops at once: nothing is in flight. During the final MLflow drain a second Ctrl-C
stops the logging (``dse sync`` completes it). The guarantees per fault are listed in
docs/driver.md.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import signal
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import optuna
from optuna.trial import FrozenTrial, TrialState

from dse import reaper, registry, storage
from dse.listeners import Listener, RunState, make_listeners
from dse.pareto import params_key
from dse.pools import (
    POLL_S,
    ActorPool,
    EvaluatorEntry,
    EvaluatorHost,
    InlineStage,
    Job,
    Outcome,
    Pipeline,
    Pool,
    PoolError,
)
from dse.samplers import SAMPLER_ATTR
from dse.spec import (
    SAMPLER_CLASSES,
    EvaluatorSpec,
    Spec,
    SpecError,
    complete_params,
    missing_params,
    parse_spec,
    sample_params,
    study_info,
    study_name_problem,
)
from dse.storage import open_storage, redact
from tracking.info import BASELINE_ATTR

__all__ = [
    "Driver", "DriverError", "EvaluatorHost", "Interrupted", "RunSummary", "open_storage", "open_study",
    "study_dir",
]

log = logging.getLogger("dse")

DEFAULT_DIR = Path("dse-studies")
FLUSH_S = 0.2  # longest time told results stay unflushed in the journal buffer
WAIT_S = 0.5  # poll period while other drivers' trials fill the study
SPEC_ATTR = "dse:spec"
ENQUEUED_ATTR = "dse:baselines_enqueued"
TIMEOUTS_ATTR = "dse:timeouts"  # trial user attribute: earlier timed-out runs of these parameters
DUPLICATE_ATTR = "dse:duplicate_of"  # trial user attribute: the COMPLETE trial it was answered from
RUN_ATTR = "dse:run"  # study user attribute: the overrides of its last run (run_options)
RUN_OPTIONS = ("n_trials", "workers", "seed", "deterministic", "batch")


class DriverError(RuntimeError):
    """The search cannot start or go on (e.g. an evaluator fails to build)."""


class Interrupted(KeyboardInterrupt):
    """A signal stopped the run where it could be stopped at once (Ray starting, an
    evaluator building or evaluating in the driver process). :meth:`Driver.run` raises it
    only when it came before the study was created: nothing was written.
    ``signum``: ``SIGINT`` or ``SIGTERM``."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


# ----------------------------------------------------------------------------- storage


def study_dir(spec_name: str, root: str | Path = DEFAULT_DIR) -> Path:
    """The directory holding everything of study ``spec_name``: ``<root>/<name>/``.

    Raises:
        SpecError: ``spec_name`` is not a plain name (a path, ``..``, an option, ...).
    """
    if why := study_name_problem(spec_name):
        raise SpecError([f"study: {why}"])
    return Path(root) / spec_name


STORAGE_FILE = "storage.url"  # in a study directory: the storage given by --storage


def _parse_stored(text: str, source: str, path: Path | None, name: str, read_only: bool) -> Spec:
    """A study's stored spec, validated again; ``read_only``: one that no longer validates
    against today's evaluators (an option removed, a plugin gone) still opens without
    those checks, with one warning."""
    try:
        return parse_spec(text, source=source, path=path)
    except SpecError as e:
        if not read_only:
            raise
        try:
            spec = parse_spec(text, source=source, path=path, check_options=False, check_names=False)
        except SpecError:
            raise e from None
        log.warning("study %s: its spec no longer validates (%s); opened read-only: status, pareto, "
                    "export and sync work, run and resume refuse", name, e.errors[0])
        return spec


def load_study_spec(name: str, root: str | Path = DEFAULT_DIR, storage: str | None = None, *,
                    read_only: bool = False) -> Spec:
    """The spec a study runs with, validated again.

    With ``storage`` (``--storage URL``): the copy inside the study (user attribute
    ``dse:spec``), so any machine reaches the study with its URL alone; the spec's own
    ``storage`` becomes ``storage``. Without: ``<root>/<name>/spec.toml``, with the storage
    a run's ``--storage`` gave (``<root>/<name>/storage.url``) if any.

    ``read_only`` (status, pareto, export, sync, ui, :func:`dse.load`): a stored spec
    that today's evaluators reject (an option since removed, an evaluator no longer
    installed) is loaded without the evaluator checks, with one warning; a run or resume
    (``read_only=False``) refuses it with the one-line error.

    Raises:
        FileNotFoundError: no such study (one line).
        SpecError: the stored spec is no longer valid (``read_only``: not even as TOML
            with a valid space and objectives).
    """
    sdir = study_dir(name, root)
    if storage is not None:
        st = open_storage(storage, sdir)
        try:
            text = st.get_study_user_attrs(st.get_study_id_from_name(name)).get(SPEC_ATTR)
        except KeyError:
            raise FileNotFoundError(f"study {name!r}: not in storage {redact(storage)}") from None
        if not isinstance(text, str):
            raise FileNotFoundError(f"study {name!r}: storage {redact(storage)} holds no spec for it "
                                    f"(made outside dse?); run its spec file with `dse run SPEC --storage ...`")
        spec = _parse_stored(text, f"{SPEC_ATTR} of study {name} in {redact(storage)}", None, name, read_only)
        spec.storage = storage
        return spec
    path = sdir / "spec.toml"
    if not path.exists():
        raise FileNotFoundError(f"study {name!r}: no {path}; expected a study created by `dse run` "
                                "(or give --storage URL to load it from its storage)")
    spec = _parse_stored(path.read_text(encoding="utf-8"), str(path), path, name, read_only)
    pointer = sdir / STORAGE_FILE
    if pointer.exists():
        spec.storage = pointer.read_text(encoding="utf-8").strip() or spec.storage
    return spec


#: spec fields that steer a run without changing what the study is (accepted on an existing study)
RUN_CONTROL_FIELDS = (
    "study.n_trials", "study.timeout_s", "study.max_failed", "study.deterministic", "ray.", "tracking.",
)
#: where an evaluator runs and on how many actors (accepted too)
RUN_CONTROL_EVALUATOR_FIELDS = r"evaluators\[\d+\]\.(workers|inline|resources)\b"


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
    changed = _spec_change(spec, path.read_text(encoding="utf-8"), str(path), allow)
    if not changed:
        return
    storage = open_storage(spec.storage, sdir)  # both stored copies: the storage's, then the file
    try:
        storage.set_study_user_attr(storage.get_study_id_from_name(spec.name), SPEC_ATTR, spec.text)
    except KeyError:  # the study is not in the storage (yet)
        pass
    tmp = path.with_name("spec.toml.tmp")
    tmp.write_text(spec.text, encoding="utf-8")
    os.replace(tmp, path)
    log.info("study %s: spec changed (%s); %s now holds the new spec", spec.name, ", ".join(changed), path)


def _spec_change(spec: Spec, stored: str, where: str, allow: bool) -> list[str]:
    """The fields ``spec`` changes against the ``stored`` text; raises on a refused change."""
    changed = spec_changes(stored, spec.text)
    meaning = [k for k in changed if not k.startswith(RUN_CONTROL_FIELDS)
               and not re.match(RUN_CONTROL_EVALUATOR_FIELDS, k)]
    if meaning and not allow:
        shown = ", ".join(meaning[:8]) + (f" (+{len(meaning) - 8} more)" if len(meaning) > 8 else "")
        raise SpecError([
            f"{spec.path or spec.name}: study {spec.name!r} exists with another spec ({where}): "
            f"{shown} differ; use another study name, or --allow-spec-change to continue it "
            "with this spec"
        ])
    return changed


def stored_run_options(spec: Spec, root: str | Path = DEFAULT_DIR) -> dict[str, Any]:
    """The overrides (``n_trials``, ``workers``, ``seed``, ``deterministic``) the last
    ``dse run``/``resume`` of ``spec``'s study was given, as stored in the study (empty for
    none, or no study yet). ``dse resume`` and ``dse status`` use them unless overridden, so
    a run continues as it was started. Reads only; creates nothing."""
    sdir = study_dir(spec.name, root)
    if not (sdir / "spec.toml").exists():
        return {}
    try:
        study = optuna.load_study(study_name=spec.name, storage=open_storage(spec.storage, sdir))
    except KeyError:  # created, not yet in the storage
        return {}
    return run_options(study)


def run_options(study: optuna.Study) -> dict[str, Any]:
    """The overrides (:data:`RUN_OPTIONS`) stored in a loaded ``study`` by its last run
    (empty for none): the one reader of :data:`RUN_ATTR`."""
    stored = study.user_attrs.get(RUN_ATTR)
    return {k: stored[k] for k in RUN_OPTIONS if k in stored} if isinstance(stored, dict) else {}


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
        use_recorded_sampler(study, spec, record=False)
        _reseed(study, spec)
        return study
    try:  # an existing study is loaded: creating it again would write a (no-op) record
        storage.get_study_id_from_name(spec.name)
        study = optuna.load_study(study_name=spec.name, storage=storage, sampler=spec.make_sampler())
    except KeyError:
        study = optuna.create_study(
            study_name=spec.name,
            storage=storage,
            sampler=spec.make_sampler(),
            directions=spec.directions,
            load_if_exists=True,  # another driver may create it at the same moment
        )
    if list(study.directions) != [
        optuna.study.StudyDirection.MINIMIZE if d == "minimize" else optuna.study.StudyDirection.MAXIMIZE
        for d in spec.directions
    ]:
        raise DriverError(f"study {spec.name!r} exists with other objective directions; use another name")
    spec_path = sdir / "spec.toml"
    if not spec_path.exists():
        spec_path.write_text(spec.text, encoding="utf-8")
    _write_pointer(spec, sdir)
    stored = study.user_attrs.get(SPEC_ATTR)
    if spec.text and stored != spec.text:
        if isinstance(stored, str):  # e.g. spec.toml edited by hand, then `dse resume`
            _spec_change(spec, stored, f"the study's {SPEC_ATTR} in its storage", allow_spec_change)
        study.set_user_attr(SPEC_ATTR, spec.text)
    use_recorded_sampler(study, spec, record=True)
    _reseed(study, spec)
    return study


def use_recorded_sampler(study: optuna.Study, spec: Spec, *, record: bool) -> None:
    """Use the sampler recorded in the study, or (``record``) record the spec's.

    A spec without ``[study] sampler`` continues with the default chosen when its study
    began (the choice depends on ``n_trials``, which a resume may change); a spec naming
    its sampler uses that one (a changed sampler is refused by :func:`check_spec_change`
    unless allowed) and the record is updated. A study with trials and no record (begun
    before dse recorded the choice) continues with the default of that time: ``nsga2``
    for several objectives, ``tpe`` for one.
    """
    stored = study.user_attrs.get(SAMPLER_ATTR)
    if spec.sampler_auto and stored is None and study.get_trials(deepcopy=False):
        # a study begun before the choice was recorded ran the old default
        stored = {"name": "nsga2" if len(spec.objectives) > 1 else "tpe",
                  "options": dict(spec.sampler_given), "auto": True}
        if record:
            study.set_user_attr(SAMPLER_ATTR, stored)
    if spec.sampler_auto and isinstance(stored, dict) and stored.get("name") in SAMPLER_CLASSES:
        if (stored["name"], stored.get("options", {})) != (spec.sampler, spec.sampler_options):
            spec.sampler, spec.sampler_options = stored["name"], dict(stored.get("options", {}))
            study.sampler = spec.make_sampler()
        return
    mine = {"name": spec.sampler, "options": dict(spec.sampler_options), "auto": spec.sampler_auto}
    if record and stored != mine:
        study.set_user_attr(SAMPLER_ATTR, mine)


def _write_pointer(spec: Spec, sdir: Path) -> None:
    """Record a storage the spec text does not name (``--storage``) in ``sdir/storage.url``."""
    pointer = sdir / STORAGE_FILE
    named = None
    if spec.text:
        import tomllib

        named = tomllib.loads(spec.text).get("study", {}).get("storage")
    if spec.storage is None or spec.storage == named:
        pointer.unlink(missing_ok=True)
        return
    if not pointer.exists() or pointer.read_text(encoding="utf-8").strip() != spec.storage:
        tmp = pointer.with_name(STORAGE_FILE + ".tmp")
        tmp.write_text(spec.storage + "\n", encoding="utf-8")
        os.chmod(tmp, 0o600)  # a URL may hold a password
        os.replace(tmp, pointer)


def _reseed(study: optuna.Study, spec: Spec) -> None:
    """A resumed study's sampler continues the search: seeded from (seed, trials so far)."""
    n = len(study.get_trials(deepcopy=False))
    if n:
        study.sampler = spec.make_sampler(n)


class _NoParamWrites:
    """A study storage whose ``set_trial_param`` does nothing (everything else passes)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def set_trial_param(self, *args: Any, **kwargs: Any) -> None:
        """Nothing: the replayed draws are kept in the trial object only."""

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def _replay_params(trial: optuna.Trial, spec: Spec) -> None:
    """Give ``trial``, left RUNNING with only some of its parameters by a driver that died
    while writing them (an RDB storage writes them one by one), the parameters it was
    asked with, all of them.

    Sampling only the missing ones would draw them from a sampler that has not drawn the
    others first, so they would differ from the uninterrupted run's. Instead the whole
    space is drawn again, in order, on a copy of the trial that has no parameters and
    writes none: the sampler, seeded for the trial's number (deterministic mode), draws
    what it drew when the trial was asked. Those draws become the trial's fixed parameters:
    the stored ones keep their values (the same), the missing ones are written.
    """
    import copy

    shadow = copy.copy(trial)
    frozen = copy.deepcopy(trial._cached_frozen_trial)
    frozen._params, frozen._distributions = {}, {}
    shadow._cached_frozen_trial = frozen
    shadow.storage = _NoParamWrites(trial.storage)  # type: ignore[assignment]
    shadow._relative_params, shadow.relative_search_space = None, None
    sample_params(shadow, spec)
    drawn = dict(frozen.params)
    if any(k in drawn and drawn[k] != v for k, v in trial.params.items()):
        log.warning("trial %d: its stored parameters are not what the sampler draws again (a "
                    "sampler that does not reproduce its draws); it differs from the "
                    "uninterrupted run", trial.number)
    trial._fixed_params = {**drawn, **trial._fixed_params}


# ----------------------------------------------------------------------------- driver


def _init_loopback_ray(kwargs: dict[str, Any], *, own: bool = True) -> None:
    """``ray.init(**kwargs)`` of a local cluster whose processes listen on 127.0.0.1 only:
    one this process starts (``own``: its processes are watched by :mod:`dse.reaper`) or
    one it joins at a loopback address (without the flag below, Ray looks for the
    cluster's local node on the host's routable address, finds none and waits for ever).

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
        if own:
            reaper.watch()  # the cluster's processes end with this one, even on SIGKILL
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = old_flag
        if old_env is None:
            os.environ.pop(env_var, None)
        else:
            os.environ[env_var] = old_env


def end_process(code: int) -> NoReturn:
    """End this process at once with exit status ``code``, after an aborted run that left
    its own local Ray running (:attr:`Driver.ray_left`): stdout and stderr are flushed,
    Ray's processes (the driver's descendants only) SIGKILLed (~0.2 s), and the process
    ends with ``os._exit``. Ray's core worker is still connected to them: the
    interpreter's teardown would run Ray's ``atexit`` shutdown, which waits ~6 s for the
    dead processes. The study's storage and the MLflow logging are closed before (the
    driver's ``_close``); nothing else in the process is left to write.
    """
    for f in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            f.flush()
    with contextlib.suppress(Exception):
        reaper.kill_now()
    os._exit(code)


def _connected_ray() -> str:
    """The Ray this process is connected to: ``ray://host:port`` (Ray Client) or the GCS
    address ``host:port``; ``""`` when Ray does not say."""
    import ray

    try:
        if ray.util.client.ray.is_connected():
            worker = getattr(ray.util.client.ray.get_context(), "client_worker", None)
            conn = getattr(worker, "_conn_str", "")
            return f"ray://{conn}" if conn else "ray://"
        return str(ray.get_runtime_context().gcs_address or "")
    except Exception:  # noqa: BLE001 - only for a message
        return ""


def _same_address(a: str, b: str) -> bool:
    """Whether Ray addresses ``a`` and ``b`` name the same server (host names resolved)."""
    def norm(x: str) -> str:
        scheme, _, rest = x.rpartition("://")
        host, _, port = rest.rpartition(":")
        try:
            host = socket.gethostbyname(host)
        except OSError:
            pass
        return f"{scheme}://{host}:{port}"

    return a == b or norm(a) == norm(b)


def _say_reused(asked: str) -> None:
    """One line: Ray is initialised in this process already (e.g. a notebook called
    ``ray.init()``) and the run uses it. Ray's own libraries (Tune, Train, Data) do the
    same: a second ``ray.init`` would fail, and shutting the user's Ray down would destroy
    their actors and objects. A warning when ``asked`` (``--address``/``address=``/``[ray]
    address``) names another cluster, with the way to get that one instead."""
    current = _connected_ray() or "an unknown address"
    if asked in ("local", "auto") or _same_address(asked, current):
        log.info("Ray is already initialised in this process (%s): the run uses it", current)
        return
    log.warning("Ray is already initialised in this process (%s): the run uses it, not address %r "
                "(call ray.shutdown() first to run there)", current, asked)


class _DropClientServerNoise(logging.Filter):
    """Ray Client forwards the log lines of its per-client server on the head; one of them,
    "SIGTERM handler is not set because current thread is not the main thread", is about
    that server's own thread, on every connection, and means nothing to the user."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "SIGTERM handler is not set" not in record.getMessage()


def _quiet_ray_client() -> None:
    """Install :class:`_DropClientServerNoise` on Ray Client's log-stream logger (once)."""
    logger = logging.getLogger("ray.util.client.logsclient")
    if not any(isinstance(f, _DropClientServerNoise) for f in logger.filters):
        logger.addFilter(_DropClientServerNoise())


def _client_server_failed(e: BaseException) -> bool:
    """Whether ``e`` says the head's Ray Client server could not start the server it runs
    for each client (not a refusal: the connection and the token were fine)."""
    return any(m in str(e) for m in ("Starting Ray client server failed", "Proxy failed to Connect",
                                     # the same death seen by the proxy's psutil check
                                     "psutil.ZombieProcess"))


def _init_ray_client(kwargs: dict[str, Any]) -> None:
    """``ray.init(**kwargs)`` through Ray Client (``ray://``), once more when the head's
    client server failed to start this client's own server. Seen on a loaded 2-core
    machine (2 of 13 connections at load 8): the new server process died with a gRPC
    ``epoll_wait error: Bad file descriptor`` (it is forked while the proxy's gRPC threads
    run); a second connection gets a new one."""
    import ray

    try:
        ray.init(**kwargs)
    except ConnectionError as e:
        if not _client_server_failed(e):
            raise
        log.warning("Ray Client: the head could not start a server for this client (%s); "
                    "connecting again", str(e).strip().splitlines()[-1][:200])
        ray.shutdown()
        ray.init(**kwargs)


def _is_loopback(address: str) -> bool:
    """Whether GCS ``address`` (``host:port``) names this host's loopback interface."""
    import ipaddress

    host = address.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


#: what to do about a cluster that refuses this process's token (Ray's token authentication)
TOKEN_HINT = ("set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (`ray get-auth-token` on the head prints "
              "it; clusters/README.md)")


def _check_answers(address: str, timeout_s: float = 10.0) -> None:
    """Raise :class:`DriverError` when nothing accepts a connection at ``address``, or the
    GCS there refuses this process's token.

    ``host:port`` (a GCS) or ``ray://host:port`` (a Ray Client server); ``auto`` and other
    forms are left to Ray. Ray itself retries an unreachable GCS for ever, silently, and a
    refused token for 20 s, with a warning a second (:func:`_check_token`).
    """
    hostport = address.removeprefix("ray://")
    host, sep, port = hostport.rpartition(":")
    if not sep or not host or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        why = e.strerror or type(e).__name__
        raise DriverError(
            f"cannot join Ray at address {address!r}: nothing answers at {hostport} ({why}); "
            "is the head node up (`ray start --head`) and the port reachable?"
        ) from None
    if not address.startswith("ray://"):
        _check_token(address, timeout_s)


def _check_token(address: str, timeout_s: float) -> None:
    """Raise :class:`DriverError` when the GCS at ``address`` refuses the token this process
    would send (Ray's own token loader: ``RAY_AUTH_MODE``, ``RAY_AUTH_TOKEN``, ...): one gRPC
    call, as Ray's Python clients make it. Anything else (no answer in time, TLS, a
    token Ray cannot load) is left to ``ray.init``, which says what it is."""
    import grpc
    from ray._private.authentication.grpc_authentication_client_interceptor import (
        _get_authentication_metadata_tuple,
    )
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    try:
        metadata = _get_authentication_metadata_tuple()
    except Exception:  # noqa: BLE001 - e.g. token mode without a token: ray.init says so
        return
    with grpc.insecure_channel(address) as channel:
        try:
            gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel).GetClusterId(
                gcs_service_pb2.GetClusterIdRequest(), timeout=timeout_s, metadata=metadata)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.UNAUTHENTICATED:
                why = ((e.details() or "").strip().splitlines() or ["unauthenticated"])[0]
                raise DriverError(f"cannot join Ray at address {address!r}: the cluster refuses this "
                                  f"driver's token ({why}); {TOKEN_HINT}") from None


def _is_cheap(e: EvaluatorSpec) -> bool:
    """Whether evaluator ``e``'s kind declares itself cheap under its options (no schema: no)."""
    try:
        schema = registry.schema(e.name)
        return schema is not None and schema.is_cheap(e.options)
    except Exception:  # noqa: BLE001 - validation reports a broken evaluator; here it is not cheap
        return False


@dataclass
class RunSummary:
    """What a driver run did. Counts are over the whole study at the end.

    ``stop_reason``: why the run ended short of ``n_trials`` (``""`` when it did not, or
    ``"interrupted"``, ``"terminated"``, ``"max_failed"``, ``"timeout_s"``);
    ``signal``: the signal that stopped it, if any.
    """

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
    stop_reason: str = ""
    signal: int | None = None
    duplicates: int = 0  # trials of this run answered from the study (parameters seen before)
    tracking_error: str | None = None  # why the MLflow logging is incomplete (`dse sync` completes it)


class _Order:
    """The trials asked and not yet told, and when to ask, submit and tell.

    Deterministic (``lag`` = the worker count, or 1 when every evaluator runs in the
    driver process, one trial at a time): outcomes are told in the order their trials
    were asked (trial-number order), and a trial is asked only while fewer than ``lag``
    are untold, right after the tell that freed it. Trial n is thus asked when exactly
    trials 0 .. n - lag are told and n - lag + 1 .. n - 1 are running, whatever the
    timing, and the sampler sees the same study at every ask. A trial asked while no
    worker is idle (actors starting or replaced) is held until one is.

    Throughput (``lag = None``): a trial is asked only when a worker is idle for it, and
    outcomes are told as they arrive.

    A trial whose parameters an untold trial is evaluating waits for that one's outcome
    (:meth:`release`) instead of being evaluated too.
    """

    def __init__(self, lag: int | None) -> None:
        self.lag = lag
        self.untold: dict[int, Job] = {}  # by trial number, in ask order
        self.held: deque[Job] = deque()  # asked, not yet submitted
        self.ready: dict[int, Outcome] = {}  # arrived, not yet told
        self.evaluating: dict[str, int] = {}  # parameter set -> the untold trial evaluating it
        self.waiting: dict[int, list[Job]] = {}  # trial number -> trials with its parameters

    def pending(self) -> int:
        """Trials asked and not yet told."""
        return len(self.untold)

    def may_ask(self, pool: Pool) -> bool:
        """Whether another trial may be asked now."""
        if self.lag is None:
            return pool.idle() > len(self.held)
        return len(self.untold) < self.lag

    def asked(self, job: Job, key: str, answer: Outcome | None = None) -> None:
        """A trial was asked, ``key`` its parameter set: ``answer`` is its outcome, or it
        waits for the untold trial with the same parameters, or it is evaluated (held until
        submitted)."""
        self.untold[job.trial.number] = job
        if answer is not None:
            self.ready[job.trial.number] = answer
        elif (first := self.evaluating.get(key)) is not None:
            self.waiting.setdefault(first, []).append(job)
        else:
            self.evaluating[key] = job.trial.number
            self.held.append(job)

    def release(self, ft: FrozenTrial, answer: Callable[[Job], Outcome | None]) -> list[Job]:
        """``ft`` was told: the trials waiting for it get ``answer(job)``, or (``None``: it
        failed) are evaluated; returns the answered ones."""
        self.evaluating = {k: n for k, n in self.evaluating.items() if n != ft.number}
        answered = []
        for job in self.waiting.pop(ft.number, []):
            o = answer(job)
            if o is not None:
                self.ready[job.trial.number] = o
                answered.append(job)
            else:
                self.evaluating.setdefault(params_key(job.trial), job.trial.number)
                self.held.append(job)
        return answered

    def submit(self, pool: Pool) -> None:
        """Submit held trials while the pool has idle workers."""
        while self.held and pool.idle() > 0:
            pool.submit(self.held.popleft())

    def arrived(self, outcomes: list[Outcome]) -> None:
        """Outcomes back from the pool."""
        for o in outcomes:
            self.ready[o.job.trial.number] = o

    def next(self) -> Outcome | None:
        """The next outcome to tell, if it is there (deterministic: the oldest trial's)."""
        if not self.ready:
            return None
        number = next(iter(self.ready)) if self.lag is None else next(iter(self.untold))
        o = self.ready.pop(number, None)
        if o is not None:
            del self.untold[number]
        return o

    def take_all(self, pool: Pool) -> list[tuple[Job, Outcome | None]]:
        """Every untold trial in ask order with its outcome if it has one; empties the pool."""
        pool.drain()
        out = [(job, self.ready.get(n)) for n, job in self.untold.items()]
        self.untold.clear()
        self.held.clear()
        self.ready.clear()
        self.evaluating.clear()
        self.waiting.clear()
        return out


class Driver:
    """Runs (or resumes) one study to ``n_trials`` COMPLETE trials.

    Args:
        spec: the validated spec.
        root: the studies directory (``--dir``).
        n_trials, workers, seed, address: overrides of the spec's values (``None``: keep).
            ``address = "inline"`` evaluates in the driver process (no Ray, one at a time).
        deterministic: override of ``[study] deterministic`` (``None``: keep): the same
            seed and workers propose the same trials whatever the timing (:class:`_Order`).
        batch: trials evaluated per call when every evaluator runs in the driver process
            (default 1; ignored when some evaluator has Ray actors): ``batch`` trials are
            asked before the first of them is told, and an evaluator with
            ``evaluate_batch`` (PLENA) prices them in one vectorised call. Part of the
            recipe of a deterministic study, as ``workers`` is.
        tracking: ``False`` disables MLflow (``--no-tracking``); ``None`` keeps the spec's.
        progress: ``True`` for a tqdm bar, ``False`` for log lines, ``None``: bar on a TTY.
        num_cpus: logical CPUs of a local Ray cluster the driver starts (default: enough
            for the workers).
        allow_spec_change: continue an existing study with a changed spec
            (:func:`check_spec_change`).
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
        deterministic: bool | None = None,
        batch: int | None = None,
    ) -> None:
        if seed is not None:
            spec.seed = seed
        self.spec = spec
        self.root = Path(root)
        self.sdir = study_dir(spec.name, root)
        self.n_trials = n_trials if n_trials is not None else spec.n_trials
        spec.choose_sampler(self.n_trials)  # the default sampler, for this budget (dse.samplers)
        self.workers = workers if workers is not None else spec.workers
        self.address = address if address is not None else spec.address
        self.tracking = spec.tracking if tracking is None else tracking
        self.progress = sys.stderr.isatty() if progress is None else progress
        self.num_cpus = num_cpus
        self.allow_spec_change = allow_spec_change
        self.deterministic = spec.deterministic if deterministic is None else deterministic
        if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
            raise ValueError(f"batch: expected an integer >= 1, got {batch!r}")
        self.batch = batch or 1
        given = {"n_trials": n_trials, "workers": workers, "seed": seed, "deterministic": deterministic,
                 "batch": batch}
        self._run_options = {k: v for k, v in given.items() if v is not None}
        self._seen: dict[str, FrozenTrial] = {}  # COMPLETE trials by parameter set (the first)
        self._duplicates = 0
        # 0 and 1 both stop at the first FAIL
        self.max_failed = max(1, spec.max_failed if spec.max_failed is not None else max(self.n_trials, 10))
        self._stop = threading.Event()
        self._abort = threading.Event()
        self._signal: int | None = None
        self._stop_reason = ""
        self._interrupts = 0
        self._phase = "starting"  # -> "running" (the search loop) -> "closing" (pool, Ray, MLflow drain)
        self._raising: Callable[[], bool] | None = None  # inside _interruptible(): may an abort raise
        self._tracking: Any = None  # the Tracker, if MLflow is on
        self._old_handlers: dict[int, Any] = {}
        self._capped = False  # the last ask found the study full (other drivers' trials)
        self._ray_known = False  # Ray was found initialised or initialised here (said once)
        self._inline_memo: list[bool] | None = None  # _inline(), worked out once
        # Set by the `dse` program, whose process ends right after the run: on an abort, the
        # local Ray this driver started is not shut down (ray.shutdown stops its 5
        # processes one after another, ~1.3 s); ``ray_left`` then says the program must
        # end with :func:`end_process` (kill them, skip the interpreter's teardown).
        self.leave_ray_on_abort = False
        self.ray_left = False

    # -------------------------------------------------------------- the loop

    def run(self) -> RunSummary:
        """Run the search until the study has ``n_trials`` COMPLETE trials (or stops).

        SIGINT/SIGTERM handlers are installed for the whole run (again after ``ray.init``,
        which replaces them) and restored at the end.

        Raises:
            Interrupted: a signal stopped the start-up before the study was created.
        """
        self._signals_on()
        try:
            return self._run(time.monotonic())
        finally:
            for sig, h in self._old_handlers.items():
                signal.signal(sig, h)
            self._old_handlers.clear()

    def _run(self, t_start: float) -> RunSummary:
        # a new study: the cluster answers before anything is written (no empty study left behind)
        new = not self.sdir.exists()
        owns_ray = self._init_ray() if new else False
        self._signals_on()  # again: ray.init replaces the SIGTERM handler
        try:
            if new and self._abort.is_set():  # stopped while Ray started: nothing written
                raise Interrupted(self._signal or signal.SIGINT)
            study, state, stale = self._open()
            recovered = [t.number for t in stale]
        except BaseException:
            if owns_ray:
                import ray

                ray.shutdown()
            raise
        # a complete study's MLflow runs stay as they are
        tracker = self._tracker(study) if self.tracking and state.complete < self.n_trials else None
        self._tracking = tracker
        trials = study.get_trials(deepcopy=False)
        front, listeners = make_listeners(self.spec, self._coop, trials, state, progress=self.progress,
                                          tracker=tracker, recover=self._recover_later)
        pool: Pool | None = None
        order = _Order(None)
        t_loop = time.monotonic()
        try:
            try:
                if state.complete < self.n_trials and not self._abort.is_set():
                    owns_ray = self._init_ray() or owns_ray
                    self._signals_on()  # again: ray.init replaces the SIGTERM handler
                    pool = self._pool(owns_ray)
                    if self.deterministic:  # trials evaluated at once: the workers, or the batch in the driver process
                        order.lag = self.workers if pool.overlaps else self.batch
                    for t in stale:  # left RUNNING by a dead driver: evaluated again as themselves
                        if self.deterministic:  # the sampler that asked it (it may have no parameters yet)
                            study.sampler = self.spec.make_sampler(t.number)
                        trial = storage.running_trial(study, t)
                        if self.deterministic and t.params and missing_params(t.params, self.spec):
                            _replay_params(trial, self.spec)
                        job = self._job(study, trial)
                        order.asked(job, params_key(job.trial))
                    pool.start(self._abort.is_set, lambda: [li.tick(state) for li in listeners])
                elif state.complete >= self.n_trials:
                    for t in stale:  # the target is reached without them
                        storage.fail_trial(study, t, "left RUNNING by a driver that stopped; not run again "
                                           f"(the study has its {self.n_trials} COMPLETE trials)")
                t_loop = time.monotonic()
                self._phase = "running"
                deadline = t_start + self.spec.timeout_s if self.spec.timeout_s else math.inf
                while pool is not None and not self._abort.is_set():
                    if time.monotonic() > deadline and not self._stop.is_set():
                        self._halt("timeout_s", "timeout_s reached: no new trials")
                    self._step(study, pool, state, order, listeners)
                    self._flush(study, force=not pool.in_flight())
                    if not order.pending() and not self._wants(state, 0):
                        break  # (wanting more with nothing in flight: actors are starting)
                    if self._capped and not order.pending():
                        time.sleep(WAIT_S)  # the other drivers' trials fill the study: wait for them
                    order.arrived(pool.wait(FLUSH_S if storage.unflushed(study) else POLL_S))
                    state.running = order.pending()
                    for li in listeners:
                        li.tick(state)
            except Interrupted:
                pass  # an abort stopped Ray's start, a build or an evaluation here: handled below
            if pool is not None and self._abort.is_set():
                self._fail_in_flight(study, pool, order, state, listeners, "interrupted (Ctrl-C/SIGTERM); re-enqueued")
            if state.failed >= self.max_failed:
                self._stop_reason = "max_failed"
                log.error("stopped: %d failed trials (max_failed = %d)", state.failed, self.max_failed)
            for li in listeners:
                li.tick(state, final=True)
            if self._duplicates:
                log.info("%d trial(s) proposed parameters already evaluated: answered from the study "
                         "(user attribute %s)", self._duplicates, DUPLICATE_ATTR)
        except PoolError as e:
            if pool is not None:
                self._fail_in_flight(study, pool, order, state, listeners, f"no evaluator left ({e}); re-enqueued")
            raise DriverError(str(e)) from None
        finally:
            t_fin = time.monotonic()
            self._phase = "closing"
            all_trials = self._close(study, pool, owns_ray, listeners)
        return self._summary(all_trials, front, t_start, t_loop, t_fin, recovered)

    def _step(
        self, study: optuna.Study, pool: Pool, state: RunState, order: _Order, listeners: list[Listener]
    ) -> None:
        """Ask, submit and tell what the order allows; each tell may free the next ask."""
        if pool.overlaps:  # keep workers busy, then tell
            self._fill(study, pool, state, order)
        while (o := order.next()) is not None:
            ft = self._tell(study, o)
            self._told(ft, state, listeners)
            order.release(ft, lambda job, ft=ft: self._answer(job, ft))
            self._fill(study, pool, state, order)
        self._fill(study, pool, state, order)

    def _fill(self, study: optuna.Study, pool: Pool, state: RunState, order: _Order) -> None:
        """Ask trials while the order allows and more are needed; submit what a worker can take."""
        self._capped = False
        while order.may_ask(pool) and self._wants(state, order.pending()):
            # asked only while COMPLETE + RUNNING over every driver < n_trials (Cooperation.ask);
            # deterministic: the sampler's state follows from (seed, trials in the study then)
            trial, counts = self._coop.ask(self.n_trials, self._reseed(study) if self.deterministic else None)
            state.complete = counts[TrialState.COMPLETE]  # every driver's
            if trial is None:
                self._capped = True
                break
            job = self._job(study, trial)
            key = params_key(job.trial)
            order.asked(job, key, self._answer(job, self._seen.get(key)))
        order.submit(pool)

    def _reseed(self, study: optuna.Study) -> Callable[[int], None]:
        """Sets the study's sampler for an ask made when the study holds ``n`` trials."""
        def before(n: int) -> None:
            study.sampler = self.spec.sampler_for(n, study.sampler)
        return before

    def _job(self, study: optuna.Study, trial: optuna.Trial) -> Job:
        """A trial's job: its full parameters (a recovered trial keeps those it has)."""
        return Job(trial, complete_params(sample_params(trial, self.spec), self.spec))

    def _answer(self, job: Job, orig: FrozenTrial | None) -> Outcome | None:
        """``job``'s outcome copied from ``orig``, a COMPLETE trial with the same parameters
        (``None`` when there is none: then it is evaluated)."""
        if orig is None or orig.state != TrialState.COMPLETE or not isinstance(orig.user_attrs.get("metrics"), dict):
            return None
        self._duplicates += 1
        job.trial.set_user_attr(DUPLICATE_ATTR, orig.number)
        log.debug("trial %d: the parameters of trial %d; answered from the study", job.trial.number, orig.number)
        result = {"metrics": orig.user_attrs["metrics"], "eval_s": 0.0}
        if orig.user_attrs.get("info"):
            result["info"] = orig.user_attrs["info"]
        return Outcome(job, result=result)

    def _remember(self, ft: FrozenTrial) -> None:
        """Keep a COMPLETE trial as the answer for its parameter set (the first one only)."""
        if ft.state == TrialState.COMPLETE and isinstance(ft.user_attrs.get("metrics"), dict):
            self._seen.setdefault(params_key(ft), ft)

    def _wants(self, state: RunState, n_pending: int) -> bool:
        """Whether to ask for another trial, ``n_pending`` trials being on their way."""
        return (
            not self._stop.is_set()
            and state.complete + n_pending < self.n_trials
            and state.failed < self.max_failed
        )

    def _told(self, ft: FrozenTrial, state: RunState, listeners: list[Listener]) -> None:
        if ft.state == TrialState.COMPLETE:
            state.complete += 1
            self._remember(ft)
        else:
            state.failed += 1
        for li in listeners:
            li.told(ft, state)

    # -------------------------------------------------------------- telling

    def _fail(self, study: optuna.Study, job: Job, reason: str, requeue: dict[str, Any] | None = None) -> FrozenTrial:
        """Fail ``job``'s trial with ``reason``; ``requeue``: enqueue its parameters with these attrs."""
        job.trial.set_user_attr("fail_reason", reason)
        ft = study.tell(job.trial, state=TrialState.FAIL, skip_if_finished=True)
        if requeue is not None:
            study.enqueue_trial(dict(job.trial.params), user_attrs={"dse:retry_of": job.trial.number, **requeue})
        return ft

    def _tell(self, study: optuna.Study, o: Outcome) -> FrozenTrial:
        """Tell one outcome: COMPLETE with values and constraints, or FAIL with the reason."""
        job, trial, res = o.job, o.job.trial, o.result
        if o.timed_out:
            return self._fail_timed_out(study, job, o.fail_reason or "timed out")
        if res is None:
            return self._fail(study, job, o.fail_reason or "no result")
        if res.get("error"):
            trial.set_user_attr("traceback", res.get("traceback", ""))
            return self._fail(study, job, res["error"])
        metrics: dict[str, float] = res["metrics"]
        trial.set_user_attr("metrics", {k: (v if math.isfinite(v) else str(v)) for k, v in metrics.items()})
        if res.get("info"):
            trial.set_user_attr("info", res["info"])
        trial.set_user_attr("eval_s", res.get("eval_s", 0.0))
        if job.runs > 1:
            trial.set_user_attr("attempts", job.runs)
        nan = [k for k, v in metrics.items() if math.isnan(v)]
        if nan:
            return self._fail(study, job, f"NaN metric(s): {', '.join(nan)}")
        inf = [f"{k} = {v}" for k, v in metrics.items() if math.isinf(v)]
        if inf:
            return self._fail(study, job, f"non-finite metric(s): {', '.join(inf)}")
        wanted = [o.metric for o in self.spec.objectives] + [c.metric for c in self.spec.constraints]
        missing = [m for m in wanted if m not in metrics]
        if missing:
            return self._fail(
                study, job, f"metric(s) {', '.join(missing)} missing; evaluators returned {', '.join(sorted(metrics))}"
            )
        for c in self.spec.constraints:
            trial.set_constraint(c.key, c.violation(metrics[c.metric]))
        values = [metrics[ob.metric] for ob in self.spec.objectives]
        return study.tell(trial, values, skip_if_finished=True)

    def _fail_timed_out(self, study: optuna.Study, job: Job, reason: str) -> FrozenTrial:
        """Fail a trial over ``trial_timeout_s``; re-enqueue it up to ``trial_retries`` times."""
        done = int(job.trial.user_attrs.get(TIMEOUTS_ATTR, 0)) + 1
        if done <= self.spec.trial_retries:
            note = f"; re-enqueued (retry {done} of {self.spec.trial_retries})"
            return self._fail(study, job, reason + note, requeue={TIMEOUTS_ATTR: done})
        return self._fail(study, job, f"{reason}; not retried (trial_retries = {self.spec.trial_retries})")

    def _fail_in_flight(
        self, study: optuna.Study, pool: Pool, order: _Order, state: RunState, listeners: list[Listener],
        reason: str,
    ) -> None:
        """Tell the untold trials that have an outcome; fail the others and re-enqueue them."""
        for job, outcome in order.take_all(pool):
            if outcome is not None:
                self._told(self._tell(study, outcome), state, listeners)
                continue
            timeouts = job.trial.user_attrs.get(TIMEOUTS_ATTR)
            requeue = {TIMEOUTS_ATTR: timeouts} if timeouts else {}
            self._told(self._fail(study, job, reason, requeue=requeue), state, listeners)
            state.failed -= 1  # re-enqueued, not a failure of the search (max_failed)
        state.running = 0

    # -------------------------------------------------------------- start and end

    def _open(self) -> tuple[optuna.Study, RunState, list[FrozenTrial]]:
        """Open the study, join the drivers running it, adopt orphans, enqueue baselines."""
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.sdir.mkdir(parents=True, exist_ok=True)
        study = open_study(self.spec, self.sdir, buffered=True, allow_spec_change=self.allow_spec_change)
        self._coop = storage.Cooperation(study, lambda t: self._requeue(study, t))
        self._coop.beat()
        others = self._coop.live_drivers()
        if others:
            log.info("study %s: joining %d running driver(s) (%s)", self.spec.name, len(others),
                     ", ".join(f"pid {h.get('pid')} on {h.get('host')}" for h in others))
        if study.user_attrs.get(RUN_ATTR, {}) != self._run_options:  # for resume and status
            study.set_user_attr(RUN_ATTR, self._run_options)
        recovered = self._recover(study)
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            self._remember(t)
        if self.spec.enqueue:  # once per study, under the storage lock (several drivers)
            self._coop.enqueue_once(ENQUEUED_ATTR, list(self.spec.enqueue), {BASELINE_ATTR: True})
        storage.flush(study)
        done = sum(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False))
        return study, RunState(n_trials=self.n_trials, complete=done), recovered

    def _tracker(self, study: optuna.Study) -> Any:
        from tracking.mlflow_tracker import Tracker

        return Tracker(study_info(self.spec, self.sdir, study_uid=storage.study_uid(study)), self.sdir,
                       stop=self._abort.is_set)  # a second Ctrl-C/SIGTERM stops the final drain

    def _flush(self, study: optuna.Study, force: bool = False) -> None:
        """Write buffered journal records when ``FLUSH_S`` has passed (or ``force``)."""
        now = time.monotonic()
        if storage.unflushed(study) and (force or now - getattr(self, "_last_flush", 0.0) >= FLUSH_S):
            storage.flush(study, reread=False)  # journal: one lock + fsync for many records
            self._last_flush = now

    def _close(
        self, study: optuna.Study, pool: Pool | None, owns_ray: bool, listeners: list[Listener]
    ) -> list[FrozenTrial]:
        """Stop the pool and Ray, restore signal handlers, flush; the listeners close last."""
        if pool is not None:
            pool.close()
        if owns_ray and self._abort.is_set() and self.leave_ray_on_abort and self.address == "local":
            self.ray_left = True  # the program kills it at its end (end_process)
        elif owns_ray:
            import ray

            ray.shutdown()  # a cluster joined (--address): a disconnect only
        try:  # a full disk raises here (StorageError): the listeners still close
            storage.flush(study)
        finally:
            all_trials = study.get_trials(deepcopy=False)
            for li in listeners:
                li.close(all_trials)
        storage.flush(study)
        storage.release(study)
        return all_trials

    def _summary(
        self, trials: list[FrozenTrial], front: Any, t_start: float, t_loop: float, t_fin: float,
        recovered: list[int],
    ) -> RunSummary:
        counts = {s: 0 for s in TrialState}
        for t in trials:
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
            interrupted=self._signal is not None,
            recovered=recovered,
            setup_s=t_loop - t_start,
            loop_s=t_fin - t_loop,
            finish_s=time.monotonic() - t_fin,
            stop_reason=self._stop_reason if counts[TrialState.COMPLETE] < self.n_trials else "",
            signal=self._signal,
            duplicates=self._duplicates,
            tracking_error=None if self._tracking is None else self._tracking.error,
        )

    def _recover(self, study: optuna.Study) -> list[FrozenTrial]:
        """Trials left RUNNING by a dead driver: the run evaluates them again as themselves
        (same numbers, same parameters) before asking new ones, so the study goes on as
        the uninterrupted run would have."""
        stale = self._coop.adopt()  # only those whose driver is gone (other drivers may run)
        if stale:
            log.warning("%d trial(s) left RUNNING by a driver that stopped: running them again: %s",
                        len(stale), [t.number for t in stale])
        return stale

    def _recover_later(self) -> list[int]:
        """Trials left RUNNING by a driver that died while this one runs (found after each
        heartbeat): failed and their parameters re-enqueued, once, by whichever driver
        sees them first."""
        stale = self._coop.recover("left RUNNING by a driver that stopped (no heartbeat); re-enqueued")
        if stale:
            log.warning("recovered %d trial(s) left RUNNING by a driver that stopped: %s", len(stale), stale)
        return stale

    def _requeue(self, study: optuna.Study, t: FrozenTrial) -> None:
        """Enqueue the parameters of recovered trial ``t`` (its timeout count kept); a trial
        killed before its parameters were written has none: a new trial takes its place."""
        if not t.params:
            return
        extra = {TIMEOUTS_ATTR: t.user_attrs[TIMEOUTS_ATTR]} if TIMEOUTS_ATTR in t.user_attrs else {}
        study.enqueue_trial(dict(t.params), user_attrs={"dse:retry_of": t.number, **extra})

    # -------------------------------------------------------------- Ray and the pool

    def _inline(self) -> list[bool]:
        """Per evaluator, whether it runs in the driver process (else on its own Ray actors).

        ``inline = true/false`` in its entry decides; else it runs inline when its kind
        declares itself cheap (:meth:`dse.schema.EvaluatorSchema.is_cheap`) and the entry
        names no ``resources``/``workers``. A study whose evaluators would all run inline
        while the user asked for a cluster (an address other than ``local``) runs them on
        actors there. ``[ray] address = "inline"``: all inline.
        """
        if self._inline_memo is not None:  # asked by _init_ray, _evaluator_entries and _pool
            return list(self._inline_memo)
        if self.address == "inline":
            chosen = [True] * len(self.spec.evaluators)
        else:
            chosen = [e.inline if e.inline is not None else not e.asks_for_actors and _is_cheap(e)
                      for e in self.spec.evaluators]
            if self.address != "local" and all(chosen):
                chosen = [e.inline is True for e in self.spec.evaluators]
        self._inline_memo = chosen
        return list(chosen)

    def _init_ray(self) -> bool:
        """Connect to or start Ray if an evaluator needs actors; returns whether this
        driver must shut it down."""
        if all(self._inline()):
            return False
        if self.address == "local" and "ray._raylet" not in sys.modules:
            # Ray >= 2.52 turns token authentication on for a new local cluster and warns
            # that it did unless RAY_AUTH_MODE is set; set Ray's default explicitly, before
            # Ray reads its configuration (at import; a later change would not reach it)
            os.environ.setdefault("RAY_AUTH_MODE", "token")
        import ray

        if ray.is_initialized():  # a notebook's ray.init(): used, as Ray's own libraries do
            if not self._ray_known:
                _say_reused(self.address)
                self._ray_known = True
            return False
        kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING}
        if self.address.startswith("ray://"):
            _quiet_ray_client()
        if self.address == "local":
            # CPUs: every actor at once; GPUs and accelerator types: what Ray detects (a
            # request the machine cannot meet is reported, not faked); no custom resources
            cpus = self.num_cpus or max(1, math.ceil(sum(
                self._pool_size(e) * max(e.actor_resources()["num_cpus"], 1e-3)
                for e, inline in zip(self.spec.evaluators, self._inline(), strict=True) if not inline)))
            kwargs.update(address="local", num_cpus=cpus, object_store_memory=100 * 1024 * 1024)
        else:
            kwargs["address"] = self.address
            with self._interruptible():  # a connection attempt and a token check (10 s each at most)
                _check_answers(self.address)
        from ray._private import worker

        try:  # stopped while the node starts; once it connects (C++; ray.shutdown only after
            # it finished: measured, an exception inside crashed the interpreter at exit) it ends first
            with self._interruptible(lambda: worker._global_node is None):
                if self.address == "local":
                    _init_loopback_ray(kwargs)
                elif self.address.startswith("ray://"):
                    _init_ray_client(kwargs)
                elif _is_loopback(self.address):
                    _init_loopback_ray(kwargs, own=False)
                else:
                    ray.init(**kwargs)
        except Interrupted:
            # Ctrl-C while Ray starts: disconnect what is connected, then kill what a
            # half-started node left running (Ray's processes block SIGINT: they would stay)
            ray.shutdown()
            reaper.kill_now()
            raise
        except (ConnectionError, RuntimeError, ValueError, ray.exceptions.RayError) as e:
            lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()] or [type(e).__name__]
            first = lines[0]
            if first.endswith(":") and len(lines) > 1:  # Ray Client: "... from server:" + a traceback
                first = f"{first} {lines[-1]}"
            if _client_server_failed(e):
                hint = ("; the head's logs say why: ray_client_server*.err under its "
                        "session_latest/logs (default /tmp/ray)")
            elif self.address == "local":
                hint = ""
            else:
                hint = f"; a cluster with token authentication refuses a client without its token: {TOKEN_HINT}"
            raise DriverError(f"cannot start or join Ray at address {self.address!r}: {first}{hint}") from None
        self._ray_known = True
        return True

    def _evaluator_entries(self) -> list[EvaluatorEntry]:
        """(name, options, factory object or None) per evaluator, as the hosts build them."""
        evals: list[EvaluatorEntry] = []
        for e in self.spec.evaluators:
            fac = registry._LOADED.get(e.name) if e.name not in registry._BUILTIN else None
            if fac is not None and not all(self._inline()):
                # A factory registered as an object (a notebook, a test) may live in a
                # module the workers cannot import: ship its module by value.
                mod = sys.modules.get(getattr(fac, "__module__", "") or "")
                if mod is not None and mod.__name__ != "__main__":
                    import ray.cloudpickle

                    ray.cloudpickle.register_pickle_by_value(mod)
            evals.append((e.name, e.options, fac))
        return evals

    def _pool_size(self, e: EvaluatorSpec) -> int:
        """Actors of one evaluator: its ``workers``, else the run's (``--workers``, ``[ray]``)."""
        return e.workers or self.workers

    def _pool(self, owns_ray: bool = False) -> Pool:
        """One stage per evaluator, in spec order: inline, or a pool of its own Ray actors."""
        entries = self._evaluator_entries()
        sdir = str(self.sdir.resolve())
        inline = self._inline()
        several = sum(not x for x in inline) > 1
        stages: list[InlineStage | ActorPool] = []
        for e, entry, here in zip(self.spec.evaluators, entries, inline, strict=True):
            if here:
                stages.append(InlineStage([entry], sdir, self.spec.seed, e.name, self._interruptible))
                continue
            import ray

            res = e.actor_resources()
            threads = max(1, int(res["num_cpus"]))
            cls = ray.remote(EvaluatorHost).options(max_restarts=0, **res)
            stages.append(ActorPool(
                lambda cls=cls, entry=entry, threads=threads: cls.remote([entry], sdir, self.spec.seed, threads),
                self._pool_size(e),
                demand=res,
                place_timeout_s=self.spec.place_timeout_s,
                trial_timeout_s=self.spec.trial_timeout_s,
                stopping=self._abort.is_set,
                label=f" of {e.name!r}" if several else "",
                fixed_cluster=owns_ray and self.address == "local",
            ))
        return Pipeline(stages, batch=self.batch if all(inline) else 1)

    # -------------------------------------------------------------- signals

    def _signals_on(self) -> None:
        """Install the SIGINT/SIGTERM handlers (main thread only; again after ``ray.init``)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            old = signal.signal(sig, self._on_signal)
            self._old_handlers.setdefault(sig, old)

    @contextlib.contextmanager
    def _interruptible(self, now: Callable[[], bool] = lambda: True) -> Iterator[None]:
        """Code that an abort (a second Ctrl-C, SIGTERM; during start-up the first Ctrl-C)
        stops at once: the signal handler raises :class:`Interrupted` inside it, while
        ``now()`` holds. Only for code whose unwinding leaves nothing half-written:
        ``ray.init``, an evaluator's factory or evaluation in the driver process (never a
        tell or a storage write)."""
        if self._abort.is_set():
            raise Interrupted(self._signal or signal.SIGINT)
        outer, self._raising = self._raising, now
        try:
            yield
        finally:
            self._raising = outer

    def _halt(self, reason: str, message: str) -> None:
        self._stop_reason = self._stop_reason or reason
        self._stop.set()
        log.warning("%s", message)

    def _on_signal(self, signum: int, frame: Any) -> None:
        """One line per signal. Running: the first Ctrl-C stops asking, the second (or
        SIGTERM) aborts. Starting: nothing is in flight, so the first already aborts.
        Closing (the MLflow drain): the second Ctrl-C stops the logging."""
        self._interrupts += 1
        self._signal = signal.SIGTERM if signum == signal.SIGTERM else (self._signal or signum)
        drain = self._phase == "closing" and self._tracking is not None
        sync = f"`dse sync {self.spec.name}` completes it later"
        if signum != signal.SIGTERM and self._interrupts == 1 and self._phase != "starting":
            self._halt("interrupted", {
                "running": "stopping: waiting for in-flight trials (Ctrl-C again to abort them)",
                "closing": f"stopping: waiting for the MLflow logging to finish (Ctrl-C again to stop it; {sync})"
                if drain else "stopping: shutting down",
            }[self._phase])
            return
        if self._phase != "closing":
            self._stop_reason = "terminated" if signum == signal.SIGTERM else "interrupted"
        self._abort.set()
        self._stop.set()
        if self._phase == "starting":
            log.warning("%s", "stopping: start-up interrupted (no trial was running)" if self._interrupts <= 1
                        else "aborting: start-up interrupted")
        elif self._phase == "running":
            log.warning("aborting: in-flight trials are failed and re-enqueued")
        else:
            log.warning("%s", f"aborting: the MLflow logging is stopped; {sync}" if drain else "aborting: shutting down")
        if self._raising is not None and self._raising():
            self._raising = None
            raise Interrupted(signum)
