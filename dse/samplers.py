"""The default sampler: which Optuna sampler (and settings) a study gets when its spec
names none.

Chosen by measurement (``bench/bench_samplers.py``, table and reasoning in
docs/benchmarks.md and docs/driver.md "How the default sampler is chosen"). An explicit
``[study] sampler`` always wins. The choice is recorded in the study (user attribute
:data:`SAMPLER_ATTR`), so ``dse resume`` and ``dse status`` use and show the sampler the
study was started with, even when the run's ``--n-trials`` changes what would be chosen.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import optuna

#: study user attribute holding ``{"name": ..., "options": {...}, "auto": bool}``
SAMPLER_ATTR = "dse:sampler"


#: largest budget given the GP sampler: it costs ~0.4-0.9 s per trial by 100 trials on one
#: core (more with each trial) and ~0.6-0.9 GB of memory (torch)
GP_MAX_TRIALS = 100
#: largest budget given multivariate TPE on a space with choices (NSGA-II beyond)
TPE_MAX_TRIALS = 200


def warmup_trials(n_params: int) -> int:
    """Random trials before multivariate TPE models a space with choices: 2 (d + 1) for d
    searched parameters (the size of Ax's initial Sobol design), at least Optuna's 10.

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
    * a continuous space (only int/float ranges): the GP sampler for two objectives and
      at most :data:`GP_MAX_TRIALS` trials (ZDT1-3: 96-99% of the true front by 100
      trials, every other sampler at most 53%), else independent TPE (best at 200 trials on
      ZDT1-3 and DTLZ2);
    * a space with ``choices`` (formats, array shapes, foldings): multivariate TPE up to
      :data:`TPE_MAX_TRIALS` trials, after :func:`warmup_trials` random ones (PLENA
      space: 84% at 200 trials, 20-seed median, the best; dataflow space: 48%, 2.4 points
      behind NSGA-II with a population of 20), NSGA-II beyond, with a population of
      ``n_trials // 50`` within [10, 50] (at 500 trials within 2.5 points of the best on
      PLENA and the best on dataflow; ~1 ms per trial against TPE's 15-45 ms, which grows
      with the trials). Numeric choices stay categorical: searched by rank (an integer
      0..k-1) multivariate TPE lost 10 points on PLENA and gained nothing on dataflow.

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
