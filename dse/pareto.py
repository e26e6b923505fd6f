"""Pareto fronts and the hypervolume of a study (the project's one implementation).

Everything is computed in *minimisation* space: maximised objectives are negated. The
hypervolume is moocore's exact algorithm (WFG-style, O(n log n) in 2-D and 3-D); points
that do not strictly dominate the reference point contribute nothing.

Reference point: an objective's ``ref`` from the spec when given (in the objective's own
units and direction); otherwise the worst value seen so far among feasible complete
trials plus 10% of the observed range. A spec without ``ref`` therefore has a reference
point that moves as the search explores; give ``ref`` on every objective for a
hypervolume history that is comparable across steps and studies.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import moocore
import numpy as np
from optuna.trial import BaseTrial, FrozenTrial, TrialState

if TYPE_CHECKING:
    from dse.spec import Spec


def hypervolume(points: np.ndarray, ref: Sequence[float] | np.ndarray) -> float:
    """Hypervolume dominated by ``points`` (rows, minimisation) and bounded by ``ref``.

    Points that do not strictly dominate ``ref`` in every coordinate are ignored.
    Returns 0.0 for no points.
    """
    pts = np.asarray(points, dtype=float).reshape(-1, len(ref))
    r = np.asarray(ref, dtype=float)
    pts = pts[np.all(pts < r, axis=1)]
    if len(pts) == 0:
        return 0.0
    return float(moocore.hypervolume(pts, ref=r))


def nondominated_mask(points: np.ndarray) -> np.ndarray:
    """Boolean mask of the non-dominated rows of ``points`` (minimisation).

    Rows with identical values are all kept (a tie is not domination), matching
    ``FrontTracker``, so the progress line and ``dse status`` report the same front size.
    """
    pts = np.asarray(points, dtype=float)
    if len(pts) == 0:
        return np.zeros(0, dtype=bool)
    if pts.shape[1] == 1:
        return pts[:, 0] == pts[:, 0].min()
    return np.asarray(moocore.is_nondominated(pts, keep_weakly=True), dtype=bool)


def signs(spec: Spec) -> np.ndarray:
    """+1 for minimised objectives, -1 for maximised ones."""
    return np.array([1.0 if o.direction == "minimize" else -1.0 for o in spec.objectives])


def is_feasible(trial: FrozenTrial) -> bool:
    """A trial is feasible when every constraint violation is <= 0."""
    return all(v <= 0.0 for v in trial.constraints.values())


def feasible_values(trials: Sequence[FrozenTrial], spec: Spec) -> tuple[list[FrozenTrial], np.ndarray]:
    """Feasible COMPLETE trials (with finite values) and their values in minimisation space.

    Each parameter set counts once (:func:`params_key`): of trials with equal parameters (a
    duplicate answered from the study, or one evaluated twice in an older study) only the
    first is kept, so ``dse status`` counts the front as :func:`pareto_trials` lists it.
    """
    good: list[FrozenTrial] = []
    seen: set[str] = set()
    for t in trials:
        if t.state == TrialState.COMPLETE and t.values and is_feasible(t) \
                and all(math.isfinite(v) for v in t.values) and (key := params_key(t)) not in seen:
            seen.add(key)
            good.append(t)
    n_obj = len(spec.objectives)
    vals = np.array([t.values for t in good], dtype=float).reshape(-1, n_obj) * signs(spec)
    return good, vals


def reference_point(spec: Spec, values_min: np.ndarray) -> np.ndarray | None:
    """The reference point in minimisation space (see the module docstring).

    Returns ``None`` when an objective has no ``ref`` and there are no values yet.
    """
    s = signs(spec)
    ref = np.empty(len(spec.objectives))
    for i, o in enumerate(spec.objectives):
        if o.ref is not None:
            ref[i] = o.ref * s[i]
        elif len(values_min) == 0:
            return None
        else:
            hi, lo = values_min[:, i].max(), values_min[:, i].min()
            ref[i] = hi + 0.1 * (hi - lo) + (1e-12 if hi == lo else 0.0) + 1e-9 * abs(hi)
    return ref


def params_key(trial: BaseTrial) -> str:
    """A trial's parameter set as a key: trials with identical parameters share it.

    (``trial.params``: the searched parameters; fixed ones are the same for every trial of a
    study and not stored there. A live ``optuna.Trial`` works too.)"""
    return repr(sorted(trial.params.items()))


def pareto_trials(trials: Sequence[FrozenTrial], spec: Spec) -> list[FrozenTrial]:
    """Feasible COMPLETE trials on the Pareto front, in trial order. Ties of different
    parameter sets are kept; a parameter set on the front more than once (a baseline run
    again, a duplicate sample) appears once, as its first trial."""
    good, vals = feasible_values(trials, spec)
    if not good:
        return []
    mask = nondominated_mask(vals)
    return [t for t, m in zip(good, mask, strict=True) if m]  # good: one trial per parameter set


def study_hypervolume(trials: Sequence[FrozenTrial], spec: Spec) -> float:
    """Hypervolume of the feasible front of ``trials`` (0.0 when there is none)."""
    _, vals = feasible_values(trials, spec)
    ref = reference_point(spec, vals)
    if ref is None or len(vals) == 0:
        return 0.0
    return hypervolume(vals[nondominated_mask(vals)], ref)


class FrontTracker:
    """Incremental Pareto front + hypervolume for the driver's progress reports."""

    def __init__(self, spec: Spec) -> None:
        self.spec = spec
        self.n_obj = len(spec.objectives)
        self.front = np.empty((0, self.n_obj))
        self.keys: list[str | None] = []  # parameter-set key of each front row
        self.lo = np.full(self.n_obj, np.inf)
        self.hi = np.full(self.n_obj, -np.inf)

    def add(self, values: Sequence[float], key: str | None = None) -> None:
        """Add one feasible complete trial's objective values (in the objectives' directions);
        ``key`` (:func:`params_key`): a parameter set already on the front is not added again."""
        v = np.asarray(values, dtype=float) * signs(self.spec)
        if not np.all(np.isfinite(v)):
            return  # never on a front: the hypervolume stays finite
        self.lo = np.minimum(self.lo, v)
        self.hi = np.maximum(self.hi, v)
        if key is not None and key in self.keys:
            return  # the same design again
        if len(self.front) and np.any(np.all(self.front <= v, axis=1) & np.any(self.front < v, axis=1)):
            return  # dominated
        keep = ~(np.all(v <= self.front, axis=1) & np.any(v < self.front, axis=1))
        self.front = np.vstack([self.front[keep], v])
        self.keys = [k for k, kept in zip(self.keys, keep, strict=True) if kept] + [key]

    @property
    def size(self) -> int:
        """Number of points on the current front."""
        return len(self.front)

    def hypervolume(self) -> float:
        """Hypervolume of the current front (reference point as in the module docstring)."""
        if not len(self.front):
            return 0.0
        ref = reference_point(self.spec, np.vstack([self.lo, self.hi]))
        return 0.0 if ref is None else hypervolume(self.front, ref)
