"""The default sampler: which Optuna sampler (and settings) a study gets when its spec
names none.

Chosen by measurement (``bench/bench_samplers.py``, table and reasoning in
docs/benchmarks.md and docs/driver.md "How the default sampler is chosen"). An explicit
``[study] sampler`` always wins. The choice is recorded in the study (user attribute
:data:`SAMPLER_ATTR`), so ``dse resume`` and ``dse status`` use and show the sampler the
study was started with, even when the run's ``--n-trials`` changes what would be chosen.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Container, Mapping, Sequence
from typing import Any

import numpy as np
import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.samplers import BaseSampler
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

#: study user attribute holding ``{"name": ..., "options": {...}, "auto": bool}``
SAMPLER_ATTR = "dse:sampler"


#: largest budget given the GP sampler: it costs ~0.4-0.9 s per trial by 100 trials on one
#: core (more with each trial) and ~0.6-0.9 GB of memory (torch)
GP_MAX_TRIALS = 100
#: largest budget given ParEGO on a space with choices (NSGA-II beyond): its asks cost
#: ~0.2-0.3 s each by 200 trials on one core, growing with the trials (GP)
PAREGO_MAX_TRIALS = 200


def warmup_trials(n_params: int) -> int:
    """Random trials before a model-based sampler models a space with choices: 2 (d + 1)
    for d searched parameters (the size of Ax's initial Sobol design), at least Optuna's 10.

    Measured (docs/benchmarks.md "Samplers", 20 seeds, % of the true front at 200
    trials): dataflow space (12 parameters) 47.8% with 26 against 40.4% with Optuna's 10,
    where TPE settles on its first good region and ends below random search (46.9%);
    PLENA space (8 parameters) 84.1% with 18 against 82.6%.
    """
    return max(10, 2 * (n_params + 1))


def default_sampler(n_objectives: int, n_trials: int, *, continuous: bool = False,
                    conditional: bool = False, n_params: int = 0) -> tuple[str, dict[str, Any]]:
    """The sampler name (a ``SAMPLER_CLASSES`` key) and its options for a study.

    The rule (measured: docs/benchmarks.md "Samplers", reasoning in docs/driver.md):

    * one objective: multivariate TPE (Optuna's own single-objective default);
    * a conditional space (``when``): multivariate TPE with ``group = true`` (it models
      each group of parameters that appear together; NSGA-II and GP sample conditional
      parameters at random);
    * a space with ``choices`` (formats, array shapes, foldings), up to
      :data:`PAREGO_MAX_TRIALS` trials: :class:`ParEGOSampler` after
      :func:`warmup_trials` random trials (the best at 50-200 trials on both simulator
      spaces by 7-30 points); beyond, NSGA-II with a population of ``n_trials // 50``
      within [10, 50] (~1 ms per ask, where ParEGO's and TPE's asks grow with the trials);
    * a continuous space (only int/float ranges), two objectives: the GP sampler up to
      :data:`GP_MAX_TRIALS` trials (ZDT1-3: 96-99% of the true front by 100 trials),
      ParEGO up to :data:`PAREGO_MAX_TRIALS`; otherwise independent TPE (the best at 200
      trials on DTLZ2, 3 objectives).

    Args:
        n_objectives: objectives of the study (>= 1).
        n_trials: the run's trial budget (COMPLETE trials).
        continuous: every searched parameter is an int or float range (no ``choices``).
        conditional: some parameter has a ``when`` condition.
        n_params: searched parameters (sizes ParEGO's random warm-up).

    Returns:
        ``(name, options)``; options are keyword arguments of the Optuna sampler, all
        numbers, strings or bools (they are recorded in the study as JSON).
    """
    if n_objectives < 1:
        raise ValueError(f"n_objectives: expected an integer >= 1, got {n_objectives}")
    if n_trials < 1:
        raise ValueError(f"n_trials: expected an integer >= 1, got {n_trials}")
    if n_objectives == 1 or conditional:
        return "tpe", {"multivariate": True, **({"group": True} if conditional else {})}
    if continuous:
        if n_objectives == 2 and n_trials <= GP_MAX_TRIALS:
            return "gp", {}
        if n_objectives == 2 and n_trials <= PAREGO_MAX_TRIALS:
            return "parego", {"n_startup_trials": warmup_trials(n_params)}
        return "tpe", {}
    if n_trials <= PAREGO_MAX_TRIALS:
        return "parego", {"n_startup_trials": warmup_trials(n_params)}
    return "nsga2", {"population_size": max(10, min(50, n_trials // 50))}


def describe(name: str, options: Mapping[str, Any]) -> str:
    """``tpe (multivariate=True, group=True)``: a sampler and its options in one line."""
    opts = ", ".join(f"{k}={v!r}" for k, v in sorted(options.items()))
    return f"{name} ({opts})" if opts else name


# ----------------------------------------------------------------------------- GA samplers
class _KnownGenerations:
    """Optuna's GA samplers (NSGA-II/III) with :meth:`get_trial_generation` kept exact but
    without a pass over every COMPLETE trial per ask (Optuna's own; ~20 % of a cheap
    2,000-trial study's CPU).

    A new trial's generation is the largest generation among the COMPLETE trials (0 if
    none), plus one once that generation holds ``population_size`` trials. COMPLETE trials
    never change, nor does the generation recorded on them, so the counts of the trials
    already looked at stay valid: only COMPLETE trials newer (by id) than the last one
    looked at are read. When an older trial turned COMPLETE since (the list no longer has
    the last one looked at where it was), every trial is counted again. The subclasses
    keep Optuna's class names: the generation is stored under ``<class name>:generation``,
    so studies started with Optuna's samplers continue unchanged.
    """

    def get_trial_generation(self, study: Any, trial: Any) -> int:  # noqa: D102 - as Optuna's
        key = self._get_generation_key()  # type: ignore[attr-defined]
        generation = trial.system_attrs.get(key, None)
        if generation is not None:
            return int(generation)
        trials = study._get_trials(deepcopy=False, states=[optuna.trial.TrialState.COMPLETE], use_cache=True)
        memo: dict[int, tuple[int, int, dict[int, int]]] = self.__dict__.setdefault("_dse_generations", {})
        seen, last_id, counts = memo.get(study._study_id, (0, -1, {}))
        if seen and not (len(trials) >= seen and trials[seen - 1]._trial_id == last_id):
            seen, counts = 0, {}
        counts = dict(counts)
        for t in trials[seen:]:
            g = t.system_attrs.get(key, -1)
            counts[g] = counts.get(g, 0) + 1
        if trials:
            memo[study._study_id] = (len(trials), trials[-1]._trial_id, counts)
        top = max([0, *counts])
        generation = top + 1 if counts.get(top, 0) >= self._population_size else top  # type: ignore[attr-defined]
        study._storage.set_trial_system_attr(trial._trial_id, key, generation)
        return generation


class NSGAIISampler(_KnownGenerations, optuna.samplers.NSGAIISampler):
    """:class:`optuna.samplers.NSGAIISampler`, generations counted incrementally."""


class NSGAIIISampler(_KnownGenerations, optuna.samplers.NSGAIIISampler):
    """:class:`optuna.samplers.NSGAIIISampler`, generations counted incrementally."""


# ----------------------------------------------------------------------------- ranks
def is_ordered(dist: BaseDistribution) -> bool:
    """Whether ``dist`` is a categorical of numbers (no bools), at least three: an ordered
    choice (foldings, array sizes, bandwidths) that :class:`Ranked` searches by rank."""
    return (isinstance(dist, CategoricalDistribution) and len(dist.choices) >= 3
            and all(isinstance(c, int | float) and not isinstance(c, bool) for c in dist.choices))


#: a stepped int or float range with more values than this is shown to the wrapped sampler
#: as a continuous range (Optuna's GP enumerates every value of a stepped range at each
#: acquisition step: a 16 MiB-256 MiB SRAM size in bytes would be 2.5e8 values)
MAX_GRID = 256


def _grid_size(dist: BaseDistribution) -> int:
    """Values of a stepped int/float range (0 for anything else)."""
    if isinstance(dist, IntDistribution) or (isinstance(dist, FloatDistribution) and dist.step):
        step = dist.step or 1  # a log int range has step 1
        return int(round((dist.high - dist.low) / step)) + 1
    return 0


def _encode(dist: BaseDistribution) -> BaseDistribution:
    """The distribution the wrapped sampler sees: the rank 0..k-1 of an ordered choice; a
    continuous range for a stepped range of more than :data:`MAX_GRID` values; else ``dist``."""
    if is_ordered(dist):
        return IntDistribution(0, len(dist.choices) - 1)  # type: ignore[attr-defined]
    if _grid_size(dist) > MAX_GRID:
        return FloatDistribution(dist.low, dist.high, log=dist.log)  # type: ignore[attr-defined]
    return dist


def _to_view(dist: BaseDistribution, value: Any) -> Any:
    """``value`` of ``dist`` as the wrapped sampler sees it (see :func:`_encode`)."""
    if is_ordered(dist):
        return sorted(dist.choices).index(value)  # type: ignore[attr-defined]
    return float(value) if _grid_size(dist) > MAX_GRID else value


def _from_view(dist: BaseDistribution, value: Any) -> Any:
    """The value of ``dist`` that the wrapped sampler's ``value`` stands for: the choice of
    that rank, or the range's nearest grid value."""
    if is_ordered(dist):
        return sorted(dist.choices)[int(value)]  # type: ignore[attr-defined]
    if _grid_size(dist) > MAX_GRID:
        step = dist.step or 1  # type: ignore[attr-defined]
        k = min(max(round((float(value) - dist.low) / step), 0), _grid_size(dist) - 1)  # type: ignore[attr-defined]
        v = dist.low + k * step  # type: ignore[attr-defined]
        return int(v) if isinstance(dist, IntDistribution) else float(v)
    return value


class _StudyView:
    """A study as a wrapped sampler sees it: :meth:`show` maps each trial; everything else
    (storage, directions, system attributes: what the sampler writes goes to the study) is
    the study itself."""

    def __init__(self, study: optuna.Study) -> None:
        self._study = study

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)

    def show(self, trial: FrozenTrial) -> FrozenTrial:  # pragma: no cover - overridden
        raise NotImplementedError

    def _get_trials(self, deepcopy: bool = True, states: Container[TrialState] | None = None,
                    use_cache: bool = False) -> list[FrozenTrial]:
        trials = self._study._get_trials(deepcopy=False, states=states, use_cache=use_cache)
        return [self.show(t) for t in trials]

    def get_trials(self, deepcopy: bool = True,
                   states: Container[TrialState] | None = None) -> list[FrozenTrial]:
        return self._get_trials(deepcopy=deepcopy, states=states)

    @property
    def trials(self) -> list[FrozenTrial]:
        return self._get_trials()


class _RankedView(_StudyView):
    """Each ordered choice's value replaced by its rank (a wide stepped range's by a float),
    its distribution by :func:`_encode`'s."""

    def __init__(self, study: optuna.Study) -> None:
        super().__init__(study)
        self._done: dict[int, FrozenTrial] = {}  # finished trials (immutable), by trial id
        self.orig: dict[str, BaseDistribution] = {}  # ranked parameter -> its own distribution

    def show(self, trial: FrozenTrial) -> FrozenTrial:
        """``trial`` with ranks for ordered choices (itself when it has none)."""
        hit = self._done.get(trial._trial_id)
        if hit is not None:
            return hit
        enc = {n: _encode(d) for n, d in trial.distributions.items()}
        out = trial
        if any(enc[n] is not d for n, d in trial.distributions.items()):
            out = copy.copy(trial)
            out._params = {n: (_to_view(trial.distributions[n], v) if enc[n] is not trial.distributions[n] else v)
                           for n, v in trial.params.items()}
            out._distributions = enc
            self.orig.update((n, d) for n, d in trial.distributions.items() if enc[n] is not d)
        if trial.state.is_finished():
            self._done[trial._trial_id] = out
        return out


class Ranked(BaseSampler):
    """An Optuna sampler that searches ordered choices by rank.

    A ``choices`` parameter whose values are all numbers (at least three: foldings 1, 2,
    4, 8; array sizes; bandwidths) is shown to the wrapped sampler as an integer 0..k-1,
    its rank among the sorted choices. Model-based samplers then see that 4 lies between
    2 and 8 (GP's and TPE's kernels, NSGA-II's numeric crossover) instead of k unrelated
    labels; the rank of powers of two is their log2, so the steps are log-scale. The
    study stores what Optuna would without the wrapper (the choice's value and its
    categorical distribution). Used by :class:`ParEGOSampler`; measured and not used with
    TPE or NSGA-II (docs/benchmarks.md "Samplers": TPE lost 10 points on the PLENA space).

    Args:
        inner: the sampler that proposes (seeded by its owner).
    """

    def __init__(self, inner: BaseSampler) -> None:
        self.inner = inner
        self._view: _RankedView | None = None

    def _ranked(self, study: optuna.Study) -> _RankedView:
        if self._view is None or self._view._study is not study:
            self._view = _RankedView(study)
        return self._view

    def infer_relative_search_space(self, study: optuna.Study,
                                    trial: FrozenTrial) -> dict[str, BaseDistribution]:
        view = self._ranked(study)
        space = self.inner.infer_relative_search_space(view, view.show(trial))  # type: ignore[arg-type]
        # Optuna checks each suggestion against this space: the study's own distributions
        return {name: view.orig.get(name, dist) for name, dist in space.items()}

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        view = self._ranked(study)
        enc = {n: _encode(d) for n, d in search_space.items()}
        got = self.inner.sample_relative(view, view.show(trial), enc)  # type: ignore[arg-type]
        return {n: (_from_view(search_space[n], v) if enc[n] is not search_space[n] else v)
                for n, v in got.items()}

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        view = self._ranked(study)
        enc = _encode(param_distribution)
        v = self.inner.sample_independent(view, view.show(trial), param_name, enc)  # type: ignore[arg-type]
        return _from_view(param_distribution, v) if enc is not param_distribution else v

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        view = self._ranked(study)
        self.inner.before_trial(view, view.show(trial))  # type: ignore[arg-type]

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState,
                    values: Sequence[float] | None) -> None:
        view = self._ranked(study)
        self.inner.after_trial(view, view.show(trial), state, values)  # type: ignore[arg-type]

    def reseed_rng(self) -> None:
        self.inner.reseed_rng()


# ----------------------------------------------------------------------------- ParEGO
def chebyshev(values: np.ndarray, weights: np.ndarray, rho: float = 0.05) -> np.ndarray:
    """ParEGO's augmented Chebyshev scalarisation of minimised objectives (Knowles 2006).

    Each objective (column of ``values``, one row per trial) is normalised to [0, 1] by the
    smallest and largest finite value in its column (a constant column is 0; ``+inf`` and
    NaN are the worst, 1, and ``-inf`` the best, 0); a row's scalar is
    ``max_i w_i z_i + rho * sum_i w_i z_i``, to be minimised.
    """
    v = np.asarray(values, dtype=float)
    fin = np.isfinite(v)
    lo = np.where(fin, v, np.inf).min(axis=0)
    hi = np.where(fin, v, -np.inf).max(axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)
    z = np.clip((v - np.where(np.isfinite(lo), lo, 0.0)) / span, 0.0, 1.0)
    z = np.where(np.isnan(v) | (v == np.inf), 1.0, np.where(v == -np.inf, 0.0, z))
    wz = np.asarray(weights, dtype=float) * z
    return wz.max(axis=1) + rho * wz.sum(axis=1)


class _ScalarView(_StudyView):
    """A multi-objective study shown as one minimised objective: every COMPLETE trial's
    values replaced by their :func:`chebyshev` scalar for one weight vector (``done``: the
    study's COMPLETE trials, as the caller read them)."""

    def __init__(self, study: optuna.Study, done: Sequence[FrozenTrial], weights: np.ndarray,
                 rho: float) -> None:
        super().__init__(study)
        self.directions = [StudyDirection.MINIMIZE]
        self.direction = StudyDirection.MINIMIZE
        self._scalar: dict[int, float] = {}
        if done:
            sign = np.array([-1.0 if d == StudyDirection.MAXIMIZE else 1.0 for d in study.directions])
            s = chebyshev(np.array([t.values for t in done], dtype=float) * sign, weights, rho)
            self._scalar = {t._trial_id: float(x) for t, x in zip(done, s, strict=True)}

    def _is_multi_objective(self) -> bool:
        return False

    def show(self, trial: FrozenTrial) -> FrozenTrial:
        x = self._scalar.get(trial._trial_id)
        if x is None:
            return trial
        out = copy.copy(trial)
        out._values = [x]
        return out


class _ParEGO(BaseSampler):
    """The scalarisation step of :class:`ParEGOSampler` around a single-objective sampler."""

    def __init__(self, inner: BaseSampler, seed: int | None, rho: float, n_startup_trials: int) -> None:
        from optuna.samplers._lazy_random_state import LazyRandomState

        self.inner, self.rho, self.n_startup_trials = inner, rho, n_startup_trials
        self._rng = LazyRandomState(seed)
        self._random = optuna.samplers.RandomSampler(seed=seed)

    def infer_relative_search_space(self, study: optuna.Study,
                                    trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self.inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        done = study._get_trials(deepcopy=False, states=(TrialState.COMPLETE,), use_cache=True)
        if not search_space or len(done) < self.n_startup_trials:
            return {}
        k = len(study.directions)
        weights = self._rng.rng.dirichlet(np.ones(k)) if k > 1 else np.ones(1)
        view = _ScalarView(study, done, weights, self.rho) if k > 1 else study
        from evaluators.base import torch_threads  # torch only once the GP is needed

        with torch_threads(1):  # the GP's torch: 1 thread measured faster on small CPUs
            return self.inner.sample_relative(view, trial, search_space)  # type: ignore[arg-type]

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        return self._random.sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.inner.before_trial(study, trial)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState,
                    values: Sequence[float] | None) -> None:
        self.inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._rng.rng.seed()
        self._random.reseed_rng()
        self.inner.reseed_rng()


class ParEGOSampler(BaseSampler):
    """ParEGO (Knowles 2006) on Optuna's GP: multi-objective search as a sequence of
    single-objective Bayesian optimisation steps.

    Before each ask, a weight vector is drawn uniformly from the simplex and every COMPLETE
    trial's objectives are folded into one :func:`chebyshev` scalar (objectives normalised
    by the smallest and largest value seen); Optuna's :class:`~optuna.samplers.GPSampler`
    then proposes the point of best expected improvement of that scalar. Successive asks
    weight the objectives differently, so the proposals spread along the Pareto front.
    Numeric choices (3+ numbers: foldings, array sizes, bandwidths) are given to the GP by
    rank (:class:`Ranked`), so its kernel knows 4 lies between 2 and 8; other choices are
    one-hot. The first ``n_startup_trials`` trials are random. Constraints (trials'
    ``set_constraint``) and running trials are handled by the GP as in Optuna.

    Measured (docs/benchmarks.md "Samplers", median of 5 seeds, % of the true front at
    200 trials): dataflow space 84% (every other sampler <= 54%), PLENA space 96% (the
    next best 89%); ~0.2-0.3 s per ask on one core at 200 trials (torch).

    Args:
        seed: seeds the weights, the warm-up and the GP.
        n_startup_trials: random trials before the GP models the study.
        rho: weight of the sum term of the augmented Chebyshev scalarisation.
        ordinal: give numeric choices to the GP by rank (else one-hot, unordered).
        deterministic_objective: the evaluators return the same values for the same
            parameters (GP fits no noise; dse's evaluators are deterministic).
    """

    def __init__(self, *, seed: int | None = None, n_startup_trials: int = 10, rho: float = 0.05,
                 ordinal: bool = True, deterministic_objective: bool = True) -> None:
        if n_startup_trials < 0:
            raise ValueError(f"n_startup_trials: expected an integer >= 0, got {n_startup_trials}")
        if not rho >= 0:
            raise ValueError(f"rho: expected a number >= 0, got {rho}")
        with warnings.catch_warnings():  # deterministic_objective is "experimental" in Optuna
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            gp = optuna.samplers.GPSampler(seed=seed, n_startup_trials=0,
                                           deterministic_objective=deterministic_objective,
                                           independent_sampler=optuna.samplers.RandomSampler(seed=seed),
                                           warn_independent_sampling=False)
        core = _ParEGO(gp, seed, rho, n_startup_trials)
        self._inner: BaseSampler = Ranked(core) if ordinal else core

    def infer_relative_search_space(self, study: optuna.Study,
                                    trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self._inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        return self._inner.sample_relative(study, trial, search_space)

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        return self._inner.sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self._inner.before_trial(study, trial)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState,
                    values: Sequence[float] | None) -> None:
        self._inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._inner.reseed_rng()
