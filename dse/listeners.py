"""What reacts to a told trial: the Pareto front, progress, heartbeat and MLflow tracking.

The driver tells Optuna, then hands each finished trial to every listener (:meth:`told`)
and calls :meth:`tick` once per loop turn (with ``final=True`` once at the end);
:meth:`close` runs on every exit, crash or not. Listeners only read :class:`RunState`;
none of them changes the study, except the heartbeat (through :mod:`dse.storage`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from dse import storage
from dse.pareto import FrontTracker, is_feasible, params_key
from dse.storage import HEARTBEAT_S

if TYPE_CHECKING:
    from dse.spec import Spec

__all__ = [
    "Front", "Heartbeat", "Listener", "LogLine", "ProgressBar", "RunState",
    "Tracking", "make_listeners",
]

log = logging.getLogger("dse")

HV_EVERY_S = 1.0  # hypervolume (progress + MLflow history) at most this often
LOG_EVERY_S = 10.0  # progress log line period (no bar)


@dataclass
class RunState:
    """Counts of the running study, kept by the driver (listeners only read them)."""

    n_trials: int  # the COMPLETE target
    complete: int  # COMPLETE in the whole study
    failed: int = 0  # FAIL told by this run
    running: int = 0  # in flight now


class Listener:
    """Base listener: every hook does nothing."""

    def told(self, ft: FrozenTrial, state: RunState) -> None:
        """A trial was told (COMPLETE or FAIL); ``state`` already counts it."""

    def tick(self, state: RunState, final: bool = False) -> None:
        """Once per loop turn (``final``: the run ended normally)."""

    def close(self, trials: Sequence[FrozenTrial]) -> None:
        """The run is over (every trial of the study, flushed)."""


class Front(Listener):
    """The feasible Pareto front of the study so far and its (cached) hypervolume."""

    def __init__(self, spec: Spec, trials: Sequence[FrozenTrial]) -> None:
        self.spec = spec
        self.tracker = FrontTracker(spec)
        self._hv: float | None = None
        for t in trials:
            self.told(t, None)  # type: ignore[arg-type]

    def told(self, ft: FrozenTrial, state: RunState | None) -> None:
        """Add a feasible COMPLETE trial to the front."""
        if ft.state == TrialState.COMPLETE and ft.values and is_feasible(ft):
            self.tracker.add(ft.values, params_key(ft))
            self._hv = None

    @property
    def size(self) -> int:
        """Points on the front."""
        return self.tracker.size

    def hypervolume(self) -> float:
        """The front's hypervolume (computed once per change of the front)."""
        if self._hv is None:
            self._hv = self.tracker.hypervolume()
        return self._hv

    def quality(self) -> dict[str, str | int]:
        """Pareto size and hypervolume (several objectives) or the best value (one)."""
        if len(self.spec.objectives) > 1:
            return {"pareto": self.size, "hv": f"{self.hypervolume():.4g}"}
        sign = 1 if self.spec.directions[0] == "minimize" else -1
        best = self.tracker.front[:, 0].min() * sign if self.size else float("nan")
        return {"best": f"{best:.4g}"}


class _Every:
    """True at most once per ``period_s`` (and always when forced)."""

    def __init__(self, period_s: float, start_s: float | None = None) -> None:
        self.period_s = period_s
        self.last_s = time.monotonic() if start_s is None else start_s

    def due(self, force: bool = False) -> bool:
        now = time.monotonic()
        if force or now - self.last_s >= self.period_s:
            self.last_s = now
            return True
        return False


class ProgressBar(Listener):
    """A tqdm bar: COMPLETE count, running, failed and the front's quality."""

    def __init__(self, spec: Spec, front: Front, state: RunState) -> None:
        from tqdm import tqdm

        self.front = front
        self.bar = tqdm(total=state.n_trials, initial=state.complete, desc=spec.name, unit="trial")
        self.every = _Every(HV_EVERY_S, 0.0)
        self.dirty = False

    def told(self, ft: FrozenTrial, state: RunState) -> None:
        """Mark the bar for the next refresh."""
        self.dirty = True

    def tick(self, state: RunState, final: bool = False) -> None:
        """Refresh at most every second (and when the target is reached)."""
        if self.dirty and self.every.due(force=final or state.complete >= state.n_trials):
            self.dirty = False
            self.bar.n = state.complete
            self.bar.set_postfix(running=state.running, failed=state.failed, refresh=False, **self.front.quality())
            self.bar.refresh()

    def close(self, trials: Sequence[FrozenTrial]) -> None:
        """Close the bar."""
        self.bar.close()


class LogLine(Listener):
    """One INFO line every ``LOG_EVERY_S`` seconds (when no bar is shown)."""

    def __init__(self, spec: Spec, front: Front) -> None:
        self.name = spec.name
        self.front = front
        self.every = _Every(LOG_EVERY_S)

    def tick(self, state: RunState, final: bool = False) -> None:
        """Log counts, front size and hypervolume."""
        if self.every.due():
            log.info(
                "%s: %d/%d complete, %d running, %d failed, pareto %d, hv %.6g",
                self.name, state.complete, state.n_trials, state.running, state.failed,
                self.front.size, self.front.hypervolume(),
            )


class Heartbeat(Listener):
    """This driver's heartbeat in the study every ``HEARTBEAT_S`` seconds
    (:class:`dse.storage.Cooperation`), and the recovery of trials whose driver is gone."""

    def __init__(self, coop: storage.Cooperation, recover: Any = None) -> None:
        self.coop = coop
        self.recover = recover
        self.every = _Every(HEARTBEAT_S)

    def tick(self, state: RunState, final: bool = False) -> None:
        """Beat when due; then recover the trials of drivers that are gone."""
        if self.every.due():
            self.coop.beat()
            if self.recover is not None and not final:
                self.recover()

    def close(self, trials: Sequence[FrozenTrial]) -> None:
        """Mark this driver as ended (its trials, if any were left RUNNING, are orphans)."""
        self.coop.beat(done=True)


class Tracking(Listener):
    """MLflow through :class:`tracking.mlflow_tracker.Tracker` (a background process).

    Told trials go to MLflow only once their records are in the storage file: the journal
    is the source of truth, and a SIGKILL between a tell and the next flush must not leave
    MLflow holding a trial that ``resume`` will run again.
    """

    def __init__(
        self, tracker: Any, study: optuna.Study, front: Front, n_objectives: int,
        finished: Sequence[FrozenTrial],
    ) -> None:
        self.tracker = tracker
        self.study = study
        self.front = front
        self.multi = n_objectives > 1
        self.every = _Every(HV_EVERY_S, 0.0)
        self.dirty = False
        self.untracked: list[FrozenTrial] = []
        tracker.start(list(finished))

    def told(self, ft: FrozenTrial, state: RunState) -> None:
        """Hold the trial until its record is durable."""
        self.untracked.append(ft)
        self.dirty = True

    def _send_durable(self) -> None:
        if self.untracked and storage.unflushed(self.study) == 0:
            self.tracker.trials_finished(self.untracked)
            self.untracked.clear()

    def tick(self, state: RunState, final: bool = False) -> None:
        """Send durable trials; log the hypervolume (at most once a second, and at the target)."""
        self._send_durable()
        if self.multi and self.dirty and self.every.due(force=final or state.complete >= state.n_trials):
            self.dirty = False
            hv = self.front.hypervolume()
            if math.isfinite(hv):
                self.tracker.log_hypervolume(state.complete, hv)

    def close(self, trials: Sequence[FrozenTrial]) -> None:
        """Durable trials, final artifacts; waits for the logging process."""
        self._send_durable()
        self.tracker.finish(list(trials))


def make_listeners(
    spec: Spec, coop: storage.Cooperation, trials: Sequence[FrozenTrial], state: RunState, *,
    progress: bool, tracker: Any | None, recover: Any = None,
) -> tuple[Front, list[Listener]]:
    """The front and every listener of a run, in the order they are called.

    ``coop``: this driver's :class:`dse.storage.Cooperation` (heartbeat);
    ``tracker``: a started-or-not :class:`tracking.mlflow_tracker.Tracker`, or ``None``;
    ``recover``: called after each heartbeat (recovers orphaned trials).
    """
    study = coop.study
    front = Front(spec, trials)
    out: list[Listener] = [front, Heartbeat(coop, recover)]
    if tracker is not None:
        finished = [t for t in trials if t.state.is_finished()]
        out.append(Tracking(tracker, study, front, len(spec.objectives), finished))
    out.append(ProgressBar(spec, front, state) if progress else LogLine(spec, front))
    return front, out
