"""Where trials are evaluated: a pool of Ray actors, or inline in the driver process.

A pool takes :class:`Job`\\ s (an Optuna trial and its parameters) and gives back
:class:`Outcome`\\ s: the evaluators' result, or why the job could not be evaluated. The
driver never sees an actor. Both pools hold :class:`EvaluatorHost`\\ s, which build every
``[[evaluators]]`` entry once and run them in spec order.

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
* **no actor left** (none alive, none starting): :class:`PoolError`.

:class:`InlinePool` runs the evaluators in the driver process: no Ray, one trial at a
time; for cheap evaluators where a Ray hop costs more than the evaluation.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
import traceback
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol

from optuna.trial import Trial

from dse import registry

__all__ = ["ActorPool", "EvaluatorHost", "InlinePool", "Job", "Outcome", "Pool", "PoolError"]

log = logging.getLogger("dse")

MAX_ATTEMPTS = 3  # runs of one job on successive actors (and starts of one slot) before giving up
PLACE_TIMEOUT_S = 60.0  # default: an actor not placed on a node by then is dropped

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


class EvaluatorHost:
    """Holds the warm evaluators of one worker and runs them in spec order for a trial.

    Construction is cheap (it only sets thread counts); :meth:`build` runs the factories.
    """

    def __init__(self, evaluators: list[EvaluatorEntry], study_dir: str, seed: int, num_threads: int) -> None:
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
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(self._num_threads)
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


# ----------------------------------------------------------------------------- jobs


@dataclass
class Job:
    """One trial to evaluate: the Optuna trial, its full parameters, the runs so far."""

    trial: Trial
    params: dict[str, Any]
    attempts: int = 0
    started_s: float = 0.0  # time.monotonic() of the current run


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


class InlinePool:
    """Evaluators in the driver process, one job at a time (no Ray)."""

    overlaps = False

    def __init__(self, evaluators: list[EvaluatorEntry], study_dir: Path, seed: int, num_threads: int = 1) -> None:
        self.host = EvaluatorHost(evaluators, str(study_dir), seed, num_threads)
        self._job: Job | None = None

    def start(self, should_stop: Callable[[], bool], on_wait: Callable[[], Any]) -> None:
        """Build the evaluators here; a factory that raises is a :class:`PoolError`."""
        try:
            self.host.build()
        except Exception as e:  # noqa: BLE001 - reported as one line by the CLI
            raise PoolError(f"an evaluator failed to start: {type(e).__name__}: {e}") from None

    def idle(self) -> int:
        """1 when no job is held, else 0."""
        return 0 if self._job is not None else 1

    def in_flight(self) -> int:
        """The held job, if any."""
        return 0 if self._job is None else 1

    def submit(self, job: Job) -> None:
        """Hold ``job``; it runs in the next :meth:`wait`."""
        job.attempts += 1
        self._job = job

    def wait(self, timeout_s: float) -> list[Outcome]:
        """Run the held job now (``timeout_s`` is not used: the driver process evaluates)."""
        job, self._job = self._job, None
        if job is None:
            return []
        job.started_s = time.monotonic()
        return [Outcome(job, result=self.host.evaluate(job.params))]

    def drain(self) -> list[Job]:
        """The held job, not run."""
        job, self._job = self._job, None
        return [job] if job is not None else []

    def close(self) -> None:
        """Nothing to stop."""


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
        demand: the resources one actor asks for (named in warnings).
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
        demand: Mapping[str, float] | None = None,
        place_timeout_s: float = PLACE_TIMEOUT_S,
        trial_timeout_s: float | None = None,
        max_attempts: int = MAX_ATTEMPTS,
        stopping: Callable[[], bool] = lambda: False,
    ) -> None:
        self.make_actor = make_actor
        self.size = size
        self.demand = dict(demand or {})
        self.place_timeout_s = place_timeout_s
        self.trial_timeout_s = trial_timeout_s
        self.max_attempts = max_attempts
        self.stopping = stopping
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

    def _demand_text(self) -> str:
        import ray

        want = ", ".join(f"{k}={v:g}" for k, v in self.demand.items() if v and k != "memory")
        if self.demand.get("memory"):
            want += f", memory={self.demand['memory'] / 1e9:.3g} GB"
        want = want.strip(", ") or "nothing"
        try:
            free = ray.available_resources()
            keys = ["CPU"] + (["GPU"] if self.demand.get("num_gpus") or "GPU" in free else [])
            have = ", ".join(f"{k}={free.get(k, 0.0):g}" for k in keys)
            if "memory" in self.demand:
                have += f", memory={free.get('memory', 0.0) / 1e9:.3g} GB"
        except Exception:  # noqa: BLE001 - the cluster may be unreachable
            have = "unknown"
        return f"each actor asks for {want}; the cluster has {have or 'nothing'} free"

    def _fits(self) -> int:
        """How many actors the cluster's total resources hold (an autoscaler may add more)."""
        import ray

        try:
            total = ray.cluster_resources()
        except Exception:  # noqa: BLE001 - the cluster may be unreachable
            return self.size
        need = {"CPU": self.demand.get("num_cpus", 0.0), "GPU": self.demand.get("num_gpus", 0.0),
                "memory": self.demand.get("memory", 0.0)}
        return min([self.size] + [int(total.get(k, 0.0) // v) for k, v in need.items() if v > 0])

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
        cluster (they join when placed). ``should_stop`` is polled, ``on_wait`` called each
        second. Raises :class:`PoolError` when a factory raises or no actor could start.
        """
        for s in self.slots:
            self._launch(s)
        while any(s.state in ("placing", "building") for s in self.slots) and not should_stop():
            on_wait()
            waiting = [s for s in self.slots if s.state == "placing"]
            if (
                any(s.state == "idle" for s in self.slots)
                and all(s.state in ("idle", "dead", "placing") for s in self.slots)
                and sum(s.state == "idle" for s in self.slots) >= self._fits()
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
            self._poll(1.0)
        self._check_alive()

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
        slot.ref = slot.actor.evaluate.remote(job.params)

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
                f"no evaluator actor alive ({self.dropped} could not be placed; {self._demand_text()}); "
                "`dse resume` continues once the cluster has room"
            )

    def _poll(self, timeout_s: float) -> list[Outcome]:
        import ray

        refs = {s.ref: s for s in self.slots if s.ref is not None}
        wait_s = min(timeout_s, self._next_deadline_s())
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
            out.extend(self._on_ready(refs[ref], ref))
        out.extend(self._on_deadlines())
        self._dispatch_queue()
        return out

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
