"""Where trials are evaluated: one pool per evaluator, Ray actors or the driver process.

A pool takes :class:`Job`\\ s (an Optuna trial and its parameters) and gives back
:class:`Outcome`\\ s: the evaluators' result, or why the job could not be evaluated. The
driver never sees an actor. It holds one :class:`Pipeline`: a stage per ``[[evaluators]]``
entry, in spec order, each either an :class:`ActorPool` (the evaluator's own Ray actors,
with its own resources and size) or an :class:`InlineStage` (a cheap evaluator run in the
driver process, no Ray hop). A job flows through the stages; each later stage receives the
earlier ones' outputs as ``upstream``. Every stage holds :class:`EvaluatorHost`\\ s.

:class:`ActorPool` (one Ray actor per worker) handles every fault of an actor itself:

* **start**: an actor is first *placed* (a cheap call answers once its process runs on a
  node), then *built* (the factories run). A factory that raises stops the run
  (:class:`PoolError`); an actor that dies while starting is replaced, up to
  ``max_attempts`` times in a row.
* **place timeout**: an actor not placed within ``place_timeout_s`` (the cluster lacks the
  resources, or lost the node it was meant for) is dropped and the pool shrinks, with one
  warning naming the resources it asked for and what the cluster has free. ``--workers``
  beyond what fits therefore starts with what fits.
* **death mid-trial**: the actor is killed for good and replaced; its job goes to the next
  free live actor at once and runs again (same trial, same parameters) up to
  ``max_attempts`` times, then fails.
* **trial timeout**: a job running longer than ``trial_timeout_s`` has its actor killed and
  replaced; the job comes back as a ``timed_out`` outcome (the driver fails the trial and
  decides whether to retry it).
* **no actor left** (none alive, none starting): :class:`PoolError`; on a cluster that
  cannot grow (a local one the driver started) an actor that could never fit is one too,
  at once.

:class:`InlinePool` is a pipeline of inline stages only: no Ray. It evaluates up to ``batch``
trials per call (default 1): an evaluator with an ``evaluate_batch(params_list,
upstream_list) -> list[dict]`` method (PLENA: one vectorised simulator call) gets them in
one call, any other one by one; a batch call that raises falls back to one call per trial,
so each trial keeps its own result or error.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import time
import traceback
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol

from optuna.trial import Trial

from dse import registry

__all__ = [
    "ActorPool", "EvaluatorHost", "InlinePool", "InlineStage", "Job", "Outcome", "Pipeline", "Pool",
    "PoolError",
]

log = logging.getLogger("dse")

MAX_ATTEMPTS = 3  # runs of one job on successive actors (and starts of one slot) before giving up
PLACE_TIMEOUT_S = 60.0  # default: an actor not placed on a node by then is dropped
POLL_S = 0.25  # longest one wait on Ray blocks: signal handlers run between waits (ray.wait
# runs them only once a second), so a Ctrl-C is answered within this

EvaluatorEntry = tuple[str, dict[str, Any], Callable[..., Any] | None]


class PoolError(RuntimeError):
    """The pool cannot go on: a factory raised, or no actor is alive."""


def root_cause(e: BaseException) -> str:
    """The last ``SomeError: message`` line of a (Ray) exception's text, else its first line."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    causes = [ln for ln in lines if re.match(r"^[\w.]*(Error|Exception)\b: ", ln)]
    return causes[-1] if causes else (lines[0] if lines else type(e).__name__)


# ----------------------------------------------------------------------------- evaluators


def _jsonable(v: Any) -> Any:
    """``v`` if JSON can hold it, else its ``str``."""
    import json

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


def _split(out: Mapping[Any, Any], metrics: dict[str, float], info: dict[str, Any]) -> None:
    """Sort one evaluator's returned values into ``metrics`` (numbers) and ``info`` (the rest, JSON-ready)."""
    for k, v in out.items():
        if _is_metric(v):
            metrics[str(k)] = float(v)
        else:
            info[str(k)] = _jsonable(v)


class EvaluatorHost:
    """Holds the warm evaluators of one worker and runs them in spec order for a trial.

    Construction is cheap (it only sets thread counts); :meth:`build` runs the factories.
    """

    def __init__(self, evaluators: list[EvaluatorEntry], study_dir: str, seed: int, num_threads: int,
                 set_threads: bool = True) -> None:
        self._set_threads = set_threads  # False in the driver process (an inline stage)
        if set_threads:
            for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
                os.environ[var] = str(num_threads)
        self._entries = evaluators
        self._study_dir = study_dir
        self._seed = seed
        self._num_threads = num_threads
        self.evaluators: list[tuple[str, Any]] = []

    def pid(self) -> int:
        """The process id (answers once the worker is placed and running)."""
        return os.getpid()

    def build(self) -> int:
        """Build every evaluator (the factories may raise); returns the process id."""
        self.evaluators = []
        for name, options, factory in self._entries:
            fac = factory if factory is not None else registry.get(name)
            ctx = registry.EvalContext(Path(self._study_dir), seed=self._seed, num_threads=self._num_threads, name=name)
            self.evaluators.append((name, fac(dict(options), ctx)))
        if self._set_threads and "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(self._num_threads)
        return os.getpid()

    def evaluate(self, params: dict[str, Any], upstream: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Run every evaluator on ``params``; never raises (errors come back as ``error``).

        ``upstream``: what earlier stages returned (metrics and information); the result
        holds only this host's own ``metrics`` and ``info``.
        """
        t0 = time.perf_counter()
        metrics: dict[str, float] = {}
        info: dict[str, Any] = {}
        before = dict(upstream or {})
        name = ""
        try:
            for ev_name, ev in self.evaluators:
                name = ev_name
                out = ev.evaluate(MappingProxyType(params), MappingProxyType({**before, **info, **metrics}))
                if not isinstance(out, Mapping):
                    raise TypeError(f"evaluate returned {type(out).__name__}; expected a dict")
                _split(out, metrics, info)
        except Exception as e:  # noqa: BLE001 - every evaluator error fails the trial only
            first = (str(e).strip().splitlines() or [""])[0]
            return {
                "error": f"evaluator {name!r} raised {type(e).__name__}: {first}",
                "traceback": traceback.format_exc(limit=20),
                "pid": os.getpid(),
                "eval_s": time.perf_counter() - t0,
            }
        return {"metrics": metrics, "info": info, "pid": os.getpid(), "eval_s": time.perf_counter() - t0}

    def evaluate_many(self, params: Sequence[dict[str, Any]], upstream: Sequence[Mapping[str, Any]]
                      ) -> list[dict[str, Any]]:
        """:meth:`evaluate` of each candidate: in one ``evaluate_batch`` call when this host
        holds one evaluator that has one, else one by one. A batch call that raises (or
        returns something other than one dict per candidate) is repeated candidate by
        candidate, so each gets its own result or error; ``eval_s`` is the batch's time
        shared equally."""
        batch = getattr(self.evaluators[0][1], "evaluate_batch", None) if len(self.evaluators) == 1 else None
        if batch is None or len(params) < 2:
            return [self.evaluate(p, u) for p, u in zip(params, upstream, strict=True)]
        t0 = time.perf_counter()
        try:
            outs = batch([MappingProxyType(p) for p in params], [MappingProxyType(dict(u)) for u in upstream])
            if not isinstance(outs, list) or len(outs) != len(params) or not all(isinstance(o, Mapping) for o in outs):
                raise TypeError("evaluate_batch: expected one dict per candidate")
        except Exception:  # noqa: BLE001 - each candidate then fails (or not) on its own
            return [self.evaluate(p, u) for p, u in zip(params, upstream, strict=True)]
        eval_s = (time.perf_counter() - t0) / len(params)
        results = []
        for out in outs:
            metrics: dict[str, float] = {}
            info: dict[str, Any] = {}
            _split(out, metrics, info)
            results.append({"metrics": metrics, "info": info, "pid": os.getpid(), "eval_s": eval_s})
        return results


# ----------------------------------------------------------------------------- jobs


@dataclass
class Job:
    """One trial to evaluate: the Optuna trial, its full parameters, where it is.

    ``attempts`` counts runs at the current stage (a dead actor's job runs again);
    ``metrics``/``info``/``eval_s`` gather what the finished stages returned.
    """

    trial: Trial
    params: dict[str, Any]
    attempts: int = 0
    started_s: float = 0.0  # time.monotonic() of the current run
    stage: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    eval_s: float = 0.0  # summed over the finished stages, s
    most_attempts: int = 0  # the most runs a finished stage needed

    @property
    def runs(self) -> int:
        """The most runs any stage needed (> 1: an actor died under it)."""
        return max(self.attempts, self.most_attempts)

    @property
    def upstream(self) -> dict[str, Any]:
        """What the finished stages returned, as the next evaluator sees it."""
        return {**self.info, **self.metrics}

    def absorb(self, result: Mapping[str, Any]) -> None:
        """Add one stage's successful result; the job moves to the next stage."""
        self.metrics.update(result.get("metrics", {}))
        self.info.update(result.get("info", {}))
        self.eval_s += float(result.get("eval_s", 0.0))
        self.most_attempts, self.attempts = self.runs, 0
        self.stage += 1

    def result(self, pid: int | None = None) -> dict[str, Any]:
        """The whole trial's result once the last stage is done (the host's format)."""
        return {"metrics": dict(self.metrics), "info": dict(self.info), "eval_s": self.eval_s,
                "pid": pid if pid is not None else os.getpid()}


@dataclass
class Outcome:
    """What became of a job: ``result`` (the host's dict) or ``fail_reason``."""

    job: Job
    result: dict[str, Any] | None = None
    fail_reason: str | None = None
    timed_out: bool = False


class Pool(Protocol):
    """What the driver needs of a pool.

    ``overlaps``: jobs run while the driver tells (the driver then asks for the freed
    workers before it tells finished trials).
    """

    overlaps: bool

    def start(self, should_stop: Callable[[], bool], on_wait: Callable[[], Any]) -> None:
        """Build the evaluators; raises :class:`PoolError` when they cannot start.

        ``should_stop`` is polled while waiting (an abort), ``on_wait`` called (a heartbeat).
        """

    def idle(self) -> int:
        """How many new jobs the pool would run at once now."""

    def in_flight(self) -> int:
        """Jobs submitted and not yet returned as outcomes."""

    def submit(self, job: Job) -> None:
        """Run ``job`` (only while :meth:`idle` > 0)."""

    def wait(self, timeout_s: float) -> list[Outcome]:
        """Outcomes that are ready, waiting at most ``timeout_s`` for the first one."""

    def drain(self) -> list[Job]:
        """Take every job not yet returned (for an abort)."""

    def close(self) -> None:
        """Stop every worker."""


# ----------------------------------------------------------------------------- inline


class InlineStage:
    """One evaluator run in the driver process (a cheap one: no Ray hop, no actor).

    ``interruptible``: a context manager around each build and evaluation, inside which the
    driver's signal handler may raise to abort it (a Ctrl-C that stops the run: the
    evaluator's own ``except Exception`` does not catch it); the job is then failed and
    re-enqueued by the driver.
    """

    def __init__(self, evaluators: list[EvaluatorEntry], study_dir: Path | str, seed: int, label: str = "",
                 interruptible: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
                 ) -> None:
        self.host = EvaluatorHost(evaluators, str(study_dir), seed, 1, set_threads=False)
        self.label = label
        self.interruptible = interruptible

    def start(self) -> None:
        """Build the evaluator here; a factory that raises is a :class:`PoolError`."""
        try:
            with self.interruptible():
                self.host.build()
        except Exception as e:  # noqa: BLE001 - reported as one line by the CLI
            raise PoolError(f"an evaluator failed to start: {type(e).__name__}: {e}") from None

    def run(self, job: Job) -> dict[str, Any]:
        """Evaluate ``job`` at this stage now."""
        return self.run_many([job])[0]

    def run_many(self, jobs: Sequence[Job]) -> list[dict[str, Any]]:
        """Evaluate ``jobs`` at this stage now (one batch call where the evaluator has one)."""
        now = time.monotonic()
        for job in jobs:
            job.attempts += 1
            job.started_s = now
        with self.interruptible():
            return self.host.evaluate_many([j.params for j in jobs], [j.upstream for j in jobs])


# ----------------------------------------------------------------------------- Ray actors


@dataclass
class _Slot:
    """One worker: its actor, where it is in its life, the job it runs."""

    index: int
    actor: Any = None
    state: str = "placing"  # placing -> building -> idle <-> busy; dead
    ref: Any = None  # placing: pid(); building: build(); busy: evaluate()
    since_s: float = field(default_factory=time.monotonic)
    job: Job | None = None
    starts: int = 0  # consecutive starts that died
    announced: bool = False  # the start said this actor did not fit (yet)


class ActorPool:
    """Ray actors holding warm evaluators (see the module docstring for the faults handled).

    Jobs run in the actors while the driver tells (``overlaps``).

    Args:
        make_actor: creates one actor (an ``EvaluatorHost`` handle), not waiting for it.
        size: the number of actors (``--workers``).
        demand: the Ray options of one actor (``num_cpus``, ``num_gpus``, ``memory``,
            ``resources``, ``accelerator_type``), named in warnings.
        label: which evaluator the pool serves, in messages (``""``: the only one).
        fixed_cluster: the cluster cannot grow (a local one the driver started): an actor
            that can never fit stops the start at once instead of after ``place_timeout_s``.
        place_timeout_s: drop an actor not placed by then.
        trial_timeout_s: kill an actor whose job runs longer (``None``: no limit).
        max_attempts: runs of one job before it fails; consecutive start deaths of a slot.
        stopping: when it returns True (an abort: the cluster may be going down with the
            driver), dead actors are no longer replaced and late ones no longer dropped.
    """

    def __init__(
        self,
        make_actor: Callable[[], Any],
        size: int,
        *,
        demand: Mapping[str, Any] | None = None,
        place_timeout_s: float = PLACE_TIMEOUT_S,
        trial_timeout_s: float | None = None,
        max_attempts: int = MAX_ATTEMPTS,
        stopping: Callable[[], bool] = lambda: False,
        label: str = "",
        fixed_cluster: bool = False,
    ) -> None:
        self.make_actor = make_actor
        self.size = size
        self.demand = dict(demand or {})
        self.place_timeout_s = place_timeout_s
        self.trial_timeout_s = trial_timeout_s
        self.max_attempts = max_attempts
        self.stopping = stopping
        self.label = label
        self.fixed_cluster = fixed_cluster
        self.launched = False
        self.overlaps = True
        self.slots = [_Slot(i) for i in range(size)]
        self.queue: deque[Job] = deque()  # jobs whose actor died, waiting for a live one
        self.dropped = 0

    # ------------------------------------------------------------------ life of a slot

    def _launch(self, slot: _Slot) -> None:
        slot.actor, slot.announced = self.make_actor(), False
        slot.state, slot.since_s = "placing", time.monotonic()
        slot.ref = slot.actor.pid.remote()

    def _kill(self, slot: _Slot) -> None:
        import ray

        if slot.actor is not None:
            try:
                ray.kill(slot.actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already dead
                pass
        slot.actor, slot.ref = None, None

    def _replace(self, slot: _Slot) -> None:
        self._kill(slot)
        self._launch(slot)

    def _need(self) -> dict[str, float]:
        """The demand of one actor as Ray resource names (``CPU``, ``GPU``, custom, ...)."""
        d = self.demand
        need = {"CPU": float(d.get("num_cpus", 0.0)), "GPU": float(d.get("num_gpus", 0.0)),
                "memory": float(d.get("memory", 0.0)), **dict(d.get("resources") or {})}
        if d.get("accelerator_type"):
            need[f"accelerator_type:{d['accelerator_type']}"] = 0.001  # as Ray asks for it
        return {k: float(v) for k, v in need.items() if v}

    def _demand_text(self, what: str = "free") -> str:
        import ray

        d = self.demand
        want = [f"{k}={float(d[k]):g}" for k in ("num_cpus", "num_gpus") if d.get(k)]
        want += [f"{k}={float(v):g}" for k, v in dict(d.get("resources") or {}).items()]
        if d.get("accelerator_type"):
            want.append(f"accelerator_type={d['accelerator_type']}")
        if d.get("memory"):
            want.append(f"memory={float(d['memory']) / 1e9:.3g} GB")
        try:
            free = ray.available_resources() if what == "free" else ray.cluster_resources()
            keys = ["CPU"] + [k for k in self._need() if k not in ("CPU", "memory")]
            have = ", ".join(f"{k}={free.get(k, 0.0):g}" for k in dict.fromkeys(keys))
            if "memory" in d:
                have += f", memory={free.get('memory', 0.0) / 1e9:.3g} GB"
        except Exception:  # noqa: BLE001 - the cluster may be unreachable
            have = "unknown"
        return f"each actor{self.label} asks for {', '.join(want) or 'nothing'}; the cluster has {have or 'nothing'} {what}"

    def _fits(self) -> int:
        """How many actors the cluster's total resources hold (an autoscaler may add more)."""
        import ray

        try:
            have = ray.cluster_resources()
        except Exception:  # noqa: BLE001 - the cluster may be unreachable
            return self.size
        return min([self.size] + [int(have.get(k, 0.0) // v) for k, v in self._need().items()])

    def live(self) -> int:
        """Actors alive or starting (not dropped)."""
        return sum(s.state != "dead" for s in self.slots)

    def _drop(self, slots: list[_Slot]) -> None:
        for s in slots:
            self._kill(s)
            s.state = "dead"
        self.dropped += len(slots)
        alive = sum(s.state != "dead" for s in self.slots)
        said = all(s.announced for s in slots)  # the start already said they did not fit
        (log.info if said else log.warning)(
            "%d actor(s) not placed within %g s (%s): running with %d of %d",
            len(slots), self.place_timeout_s, self._demand_text(), alive, self.size,
        )

    # ------------------------------------------------------------------ the pool

    def start(self, should_stop: Callable[[], bool], on_wait: Callable[[], Any]) -> None:
        """Create every actor and wait until each is built, or dropped (not placed in time).

        Returns early once some actors are built and the rest still wait for room on the
        cluster (they join when placed). ``should_stop`` is polled, ``on_wait`` called, every
        :data:`POLL_S`. Raises :class:`PoolError` when a factory raises or no actor could start.
        """
        self.launch()
        if self.fixed_cluster and self._fits() == 0:
            self.close()
            raise PoolError(f"no evaluator actor can be placed: {self._demand_text('in total')}, "
                            "and a local cluster does not grow; ask for less, or run with --address "
                            "on a cluster that has it")
        while any(s.state in ("placing", "building") for s in self.slots) and not should_stop():
            on_wait()
            waiting = [s for s in self.slots if s.state == "placing"]
            idle = sum(s.state == "idle" for s in self.slots)
            if (
                idle
                and all(s.state in ("idle", "dead", "placing") for s in self.slots)
                and idle >= self._fits()
            ):  # the rest wait for room on the cluster: run with what fits, say so once
                for s in waiting:
                    s.announced = True
                log.warning(
                    "%d actor(s) not placed yet (%s): running with %d of %d; they join if "
                    "placed within %g s (place_timeout_s), else the pool stays smaller",
                    len(waiting), self._demand_text(), self.size - len(waiting), self.size,
                    self.place_timeout_s,
                )
                break
            self._poll(POLL_S)
        self._check_alive()

    def launch(self) -> None:
        """Create every actor, not waiting for them (once)."""
        if not self.launched:
            self.launched = True
            for s in self.slots:
                self._launch(s)

    def idle(self) -> int:
        """Idle live actors not claimed by a job waiting for a re-run."""
        return max(0, sum(s.state == "idle" for s in self.slots) - len(self.queue))

    def in_flight(self) -> int:
        """Jobs running or waiting for a live actor."""
        return sum(s.state == "busy" for s in self.slots) + len(self.queue)

    def submit(self, job: Job) -> None:
        """Run ``job`` on an idle actor."""
        slot = next(s for s in self.slots if s.state == "idle")
        job.attempts += 1
        job.started_s = time.monotonic()
        slot.job, slot.state, slot.since_s = job, "busy", job.started_s
        slot.ref = slot.actor.evaluate.remote(job.params, job.upstream)

    def wait(self, timeout_s: float) -> list[Outcome]:
        """Outcomes ready within ``timeout_s`` (re-runs and replacements happen inside)."""
        out = self._poll(timeout_s)
        self._check_alive()
        return out

    def drain(self) -> list[Job]:
        """Every job running or queued, taken from the pool (their actors keep running)."""
        jobs = list(self.queue)
        self.queue.clear()
        for s in self.slots:
            if s.state == "busy" and s.job is not None:
                jobs.append(s.job)
                s.job, s.state, s.ref = None, "idle", None
        return jobs

    def close(self) -> None:
        """Kill every actor."""
        for s in self.slots:
            self._kill(s)
            s.state = "dead"

    # ------------------------------------------------------------------ internals

    def _check_alive(self) -> None:
        if all(s.state == "dead" for s in self.slots) and not self.stopping():
            raise PoolError(
                f"no evaluator actor{self.label} alive ({self.dropped} could not be placed; {self._demand_text()}); "
                "`dse resume` continues once the cluster has room"
            )

    def _poll(self, timeout_s: float) -> list[Outcome]:
        return _poll_many([self], timeout_s)

    def _next_deadline_s(self) -> float:
        now, soon = time.monotonic(), float("inf")
        for s in self.slots:
            if s.state == "placing":
                soon = min(soon, s.since_s + self.place_timeout_s - now)
            elif s.state == "busy" and self.trial_timeout_s is not None:
                soon = min(soon, s.since_s + self.trial_timeout_s - now)
        return soon

    def _on_ready(self, slot: _Slot, ref: Any) -> list[Outcome]:
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError, WorkerCrashedError

        try:
            value = ray.get(ref, timeout=30)
        except RayTaskError as e:
            if slot.state == "building":
                raise PoolError(f"an evaluator failed to start: {root_cause(e)}") from None
            if slot.state == "busy" and slot.job is not None:  # e.g. parameters not unpicklable
                job, slot.job, slot.state, slot.ref = slot.job, None, "idle", None
                return [Outcome(job, fail_reason=f"task error: {str(e).splitlines()[0]}")]
            return []
        except (RayActorError, WorkerCrashedError, GetTimeoutError) as e:
            if getattr(e, "actor_init_failed", False):
                raise PoolError(f"an evaluator failed to start: {root_cause(e)}") from None
            return self._on_death(slot, f"actor died: {type(e).__name__}")
        if slot.state == "placing":
            slot.state, slot.ref = "building", slot.actor.build.remote()
        elif slot.state == "building":
            slot.state, slot.ref, slot.starts = "idle", None, 0
        elif slot.state == "busy" and slot.job is not None:
            job, slot.job, slot.state, slot.ref = slot.job, None, "idle", None
            return [Outcome(job, result=value)]
        return []

    def _on_death(self, slot: _Slot, reason: str) -> list[Outcome]:
        """Replace a dead actor; its job runs again on the next live actor, or fails."""
        job, slot.job = slot.job, None
        if self.stopping():  # no new actors; the job stays for drain()
            self._kill(slot)
            slot.state = "dead"
            if job is not None:
                self.queue.append(job)
            return []
        if job is None:  # died while starting
            slot.starts += 1
            if slot.starts >= self.max_attempts:
                raise PoolError(f"an evaluator actor died {slot.starts} times while starting ({reason})")
            log.warning("an actor died while starting (%s); replacing it", reason)
            self._replace(slot)
            return []
        log.warning("trial %d: %s; replacing the actor", job.trial.number, reason)
        self._replace(slot)
        if job.attempts >= self.max_attempts:
            return [Outcome(job, fail_reason=f"{reason} ({job.attempts} attempts)")]
        self.queue.append(job)
        return []

    def _on_deadlines(self) -> list[Outcome]:
        if self.stopping():
            return []
        now = time.monotonic()
        late = [s for s in self.slots if s.state == "placing" and now - s.since_s > self.place_timeout_s]
        if late:
            self._drop(late)
        out: list[Outcome] = []
        if self.trial_timeout_s is not None:
            for s in self.slots:
                if s.state == "busy" and s.job is not None and now - s.since_s > self.trial_timeout_s:
                    job, s.job = s.job, None
                    log.warning("trial %d: over trial_timeout_s = %g s; replacing its actor",
                                job.trial.number, self.trial_timeout_s)
                    self._replace(s)
                    reason = f"timed out after {self.trial_timeout_s:g} s (trial_timeout_s); evaluator killed"
                    out.append(Outcome(job, fail_reason=reason, timed_out=True))
        return out

    def _dispatch_queue(self) -> None:
        while self.queue and not self.stopping() and any(s.state == "idle" for s in self.slots):
            self.submit(self.queue.popleft())


def _poll_many(pools: list[ActorPool], timeout_s: float) -> list[Outcome]:
    """One ``ray.wait`` over every pool's calls: outcomes of all pools within ``timeout_s``."""
    import ray

    refs = {s.ref: (p, s) for p in pools for s in p.slots if s.ref is not None}
    wait_s = min([timeout_s] + [p._next_deadline_s() for p in pools])
    ready: list[Any] = []
    if refs:
        ready, rest = ray.wait(list(refs), num_returns=1, timeout=max(0.0, wait_s))
        if ready and rest:
            more, _ = ray.wait(rest, num_returns=len(rest), timeout=0)
            ready += more
    elif wait_s > 0:
        time.sleep(min(wait_s, 0.05))
    out: list[Outcome] = []
    for ref in ready:
        pool, slot = refs[ref]
        out.extend(pool._on_ready(slot, ref))
    for p in pools:
        out.extend(p._on_deadlines())
        p._dispatch_queue()
    return out


# ----------------------------------------------------------------------------- the pipeline

Stage = InlineStage | ActorPool


class Pipeline:
    """One stage per evaluator, in spec order; a job flows through them (see module doc).

    Inline stages run when a job reaches them (in :meth:`submit` or :meth:`wait`). Between
    actor stages a job waits for a free actor of the next stage; new jobs are taken only
    while no later stage has a backlog as large as its live actors (so a fast first stage
    does not pile up work in front of a slow one). ``overlaps`` when some stage has actors.
    Without actors (every stage inline) it takes up to ``batch`` jobs and runs them in
    :meth:`wait`, stage by stage, each stage's jobs in one call (:meth:`InlineStage.run_many`).
    """

    def __init__(self, stages: list[Stage], batch: int = 1) -> None:
        if batch < 1:
            raise ValueError(f"batch: expected an integer >= 1, got {batch}")
        self.batch = batch
        self.stages = stages
        self.actor_pools = [st for st in stages if isinstance(st, ActorPool)]
        self.overlaps = bool(self.actor_pools)
        self.waiting: list[deque[Job]] = [deque() for _ in stages]  # ready for stage k, no free actor
        self.held: list[Job] = []  # inline only: submitted, run in wait()
        self.ready: list[Outcome] = []  # finished, not yet returned

    def start(self, should_stop: Callable[[], bool], on_wait: Callable[[], Any]) -> None:
        """Build the inline evaluators, start every actor pool (their actors start together)."""
        for st in self.stages:
            if isinstance(st, InlineStage):
                st.start()
        for p in self.actor_pools:
            p.launch()
        for p in self.actor_pools:
            p.start(should_stop, on_wait)

    def idle(self) -> int:
        """New jobs the pipeline takes now: the first actor stage's free actors (inline:
        ``batch`` less the jobs it holds)."""
        if not self.actor_pools:
            return max(0, self.batch - len(self.held))
        first = self.stages.index(self.actor_pools[0])
        for k, st in enumerate(self.stages):
            if k > first and isinstance(st, ActorPool) and len(self.waiting[k]) >= max(1, st.live()):
                return 0
        return max(0, self.actor_pools[0].idle() - len(self.waiting[first]))

    def in_flight(self) -> int:
        """Jobs submitted and not yet returned."""
        return (sum(p.in_flight() for p in self.actor_pools) + sum(len(w) for w in self.waiting)
                + len(self.held) + len(self.ready))

    def submit(self, job: Job) -> None:
        """Take ``job``: inline stages before the first actor stage run now."""
        if not self.actor_pools:
            self.held.append(job)
        else:
            self._forward(job)

    def wait(self, timeout_s: float) -> list[Outcome]:
        """Trials done within ``timeout_s`` (each through every stage, or failed at one)."""
        if not self.actor_pools:
            held, self.held = self.held, []
            self._run_inline(held)
        else:
            for o in _poll_many(self.actor_pools, 0.0 if self.ready else timeout_s):
                res = o.result
                if res is None or o.timed_out or res.get("error"):
                    self.ready.append(self._final(o))
                else:
                    o.job.absorb(res)
                    self._forward(o.job, res.get("pid"))
            for k, st in enumerate(self.stages):
                while self.waiting[k] and isinstance(st, ActorPool) and st.idle() > 0:
                    st.submit(self.waiting[k].popleft())
            for p in self.actor_pools:
                p._check_alive()
        out, self.ready = self.ready, []
        return out

    def drain(self) -> list[Job]:
        """Every job not yet returned (an abort)."""
        jobs = [o.job for o in self.ready] + self.held
        self.ready, self.held = [], []
        for w in self.waiting:
            jobs += list(w)
            w.clear()
        for p in self.actor_pools:
            jobs += p.drain()
        return jobs

    def close(self) -> None:
        """Stop every actor."""
        for p in self.actor_pools:
            p.close()

    def _final(self, o: Outcome) -> Outcome:
        """A stage's failure as the trial's outcome (the time of earlier stages added)."""
        if o.result is not None:
            o.result = {**o.result, "eval_s": o.job.eval_s + float(o.result.get("eval_s", 0.0))}
        o.job.most_attempts = o.job.runs
        return o

    def _run_inline(self, jobs: list[Job]) -> None:
        """Run ``jobs`` through every stage (all inline), each stage's jobs in one call; a
        job whose stage fails leaves the batch with its outcome."""
        for st in self.stages:
            assert isinstance(st, InlineStage)
            if not jobs:
                return
            going = []
            for job, res in zip(jobs, st.run_many(jobs), strict=True):
                if res.get("error"):
                    self.ready.append(self._final(Outcome(job, result=res)))
                else:
                    job.absorb(res)
                    going.append(job)
            jobs = going
        self.ready.extend(Outcome(job, result=job.result()) for job in jobs)

    def _forward(self, job: Job, pid: int | None = None) -> None:
        """Move ``job`` on from its stage: run inline stages, queue for an actor stage, or finish."""
        while job.stage < len(self.stages):
            st = self.stages[job.stage]
            if isinstance(st, ActorPool):
                if not self.waiting[job.stage] and st.idle() > 0:
                    st.submit(job)
                else:
                    self.waiting[job.stage].append(job)
                return
            res = st.run(job)
            if res.get("error"):
                self.ready.append(self._final(Outcome(job, result=res)))
                return
            job.absorb(res)
        self.ready.append(Outcome(job, result=job.result(pid)))


class InlinePool(Pipeline):
    """Every evaluator in the driver process (``[ray] address = "inline"``), ``batch`` jobs
    per call."""

    def __init__(self, evaluators: list[EvaluatorEntry], study_dir: Path, seed: int, num_threads: int = 1,
                 batch: int = 1) -> None:
        super().__init__([InlineStage([e], study_dir, seed, e[0]) for e in evaluators], batch)
