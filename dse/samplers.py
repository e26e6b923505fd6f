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
from collections.abc import Container, Mapping, Sequence
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, IntDistribution
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial, TrialState

#: study user attribute holding ``{"name": ..., "options": {...}, "auto": bool}``
SAMPLER_ATTR = "dse:sampler"


#: largest budget given the GP sampler: it costs ~0.4-0.9 s per trial by 100 trials on one
#: core (more with each trial) and ~0.6-0.9 GB of memory (torch)
GP_MAX_TRIALS = 100
#: largest budget given multivariate TPE on a space with choices (NSGA-II beyond)
TPE_MAX_TRIALS = 200


def warmup_trials(n_params: int) -> int:
    """Random trials before multivariate TPE models a space with choices: 2 (d + 1) for d
    searched parameters (Ax/BoTorch's initial design size), at least Optuna's 10.

    Measured (docs/benchmarks.md "Samplers"): with Optuna's 10 on the 12-parameter dataflow
    space, TPE settles on its first good region and ends below random search at 200
    trials (median 40% of the true front over 20 seeds against random's 46%); with 26, 47%.
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
    * a continuous space (only int/float ranges): the GP sampler for two objectives and
      at most :data:`GP_MAX_TRIALS` trials (ZDT1-3: 96-99% of the true front by 100
      trials, every other sampler at most 53%), else independent TPE (best at 200 trials on
      ZDT1-3 and DTLZ2);
    * a space with ``choices`` (formats, array shapes, foldings): multivariate TPE up to
      :data:`TPE_MAX_TRIALS` trials (PLENA space: 83% at 200 trials, 86% with two
      workers, best; dataflow space: 40%, 12 points behind NSGA-II), NSGA-II beyond, with
      a population of ``n_trials // 50`` within [10, 50] (at 500 trials within 2.5 points
      of the best on PLENA and the best on dataflow; ~1 ms per trial against TPE's
      15-45 ms, which grows with the trials).

    Args:
        n_objectives: objectives of the study (>= 1).
        n_trials: the run's trial budget (COMPLETE trials).
        continuous: every searched parameter is an int or float range (no ``choices``).
        conditional: some parameter has a ``when`` condition.
        n_params: searched parameters (sizes the TPE warm-up on spaces with choices).

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
        return "tpe", {}
    if n_trials <= TPE_MAX_TRIALS:
        return "tpe", {"multivariate": True, **({"n_startup_trials": warm}
                                               if (warm := warmup_trials(n_params)) > 10 else {})}
    return "nsga2", {"population_size": max(10, min(50, n_trials // 50))}


def describe(name: str, options: Mapping[str, Any]) -> str:
    """``tpe (multivariate=True, group=True)``: a sampler and its options in one line."""
    opts = ", ".join(f"{k}={v!r}" for k, v in sorted(options.items()))
    return f"{name} ({opts})" if opts else name


def is_ordered(dist: BaseDistribution) -> bool:
    """Whether ``dist`` is a categorical of numbers (no bools), at least three: an ordered
    choice (foldings, array sizes, bandwidths) that :class:`OrdinalChoices` searches by rank."""
    return (isinstance(dist, CategoricalDistribution) and len(dist.choices) >= 3
            and all(isinstance(c, int | float) and not isinstance(c, bool) for c in dist.choices))


def _ranked(dist: CategoricalDistribution) -> list[Any]:
    return sorted(dist.choices)  # type: ignore[type-var]


def _encode(dist: BaseDistribution) -> BaseDistribution:
    """The distribution the wrapped sampler sees: the rank 0..k-1 of an ordered choice."""
    return IntDistribution(0, len(dist.choices) - 1) if is_ordered(dist) else dist  # type: ignore[attr-defined]


class _RankedView:
    """A study as the wrapped sampler sees it: each ordered choice's value replaced by its
    rank and its distribution by :func:`_encode`'s. Everything else is the study itself
    (storage, directions, system attributes: what the sampler writes goes to the study)."""

    def __init__(self, study: optuna.Study) -> None:
        self._study = study
        self._done: dict[int, FrozenTrial] = {}  # finished trials (immutable), by trial id
        self.orig: dict[str, BaseDistribution] = {}  # ranked parameter -> its own distribution

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)

    def rank(self, trial: FrozenTrial) -> FrozenTrial:
        """``trial`` with ranks for ordered choices (itself when it has none)."""
        hit = self._done.get(trial._trial_id)
        if hit is not None:
            return hit
        enc = {n: _encode(d) for n, d in trial.distributions.items()}
        out = trial
        if any(enc[n] is not d for n, d in trial.distributions.items()):
            out = copy.copy(trial)
            out._params = {n: (_ranked(trial.distributions[n]).index(v)  # type: ignore[arg-type]
                               if enc[n] is not trial.distributions[n] else v)
                           for n, v in trial.params.items()}
            out._distributions = enc
            self.orig.update((n, d) for n, d in trial.distributions.items() if enc[n] is not d)
        if trial.state.is_finished():
            self._done[trial._trial_id] = out
        return out

    def _get_trials(self, deepcopy: bool = True, states: Container[TrialState] | None = None,
                    use_cache: bool = False) -> list[FrozenTrial]:
        trials = self._study._get_trials(deepcopy=deepcopy, states=states, use_cache=use_cache)
        return [self.rank(t) for t in trials]

    def get_trials(self, deepcopy: bool = True,
                   states: Container[TrialState] | None = None) -> list[FrozenTrial]:
        return self._get_trials(deepcopy=deepcopy, states=states)

    @property
    def trials(self) -> list[FrozenTrial]:
        return self._get_trials()


class OrdinalChoices(BaseSampler):
    """An Optuna sampler that searches ordered choices by rank: every other sampler as is.

    A ``choices`` parameter whose values are all numbers (at least three: foldings 1, 2,
    4, 8; array sizes; bandwidths) is shown to the wrapped sampler as an integer 0..k-1,
    its rank among the sorted choices. Model-based samplers then see that 4 lies between
    2 and 8 (TPE's and GP's kernels, NSGA-II's numeric crossover) instead of k unrelated
    labels; the rank of powers of two is their log2, so the steps are log-scale. The
    study stores what Optuna would without the wrapper (the choice's value and its
    categorical distribution): ``dse pareto``, exports, MLflow, duplicate detection and
    resume see the values, and a study begun without the wrapper continues with it.

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
        space = self.inner.infer_relative_search_space(view, view.rank(trial))  # type: ignore[arg-type]
        # Optuna checks each suggestion against this space: the study's own distributions
        return {name: view.orig.get(name, dist) for name, dist in space.items()}

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        view = self._ranked(study)
        enc = {n: _encode(d) for n, d in search_space.items()}
        got = self.inner.sample_relative(view, view.rank(trial), enc)  # type: ignore[arg-type]
        return {n: (_ranked(search_space[n])[int(v)]  # type: ignore[arg-type]
                    if enc[n] is not search_space[n] else v) for n, v in got.items()}

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        view = self._ranked(study)
        enc = _encode(param_distribution)
        v = self.inner.sample_independent(view, view.rank(trial), param_name, enc)  # type: ignore[arg-type]
        return _ranked(param_distribution)[int(v)] if enc is not param_distribution else v  # type: ignore[arg-type]

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        view = self._ranked(study)
        self.inner.before_trial(view, view.rank(trial))  # type: ignore[arg-type]

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState,
                    values: Sequence[float] | None) -> None:
        view = self._ranked(study)
        self.inner.after_trial(view, view.rank(trial), state, values)  # type: ignore[arg-type]

    def reseed_rng(self) -> None:
        self.inner.reseed_rng()
