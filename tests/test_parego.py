"""ParEGO (dse/samplers.py): the scalarisation, and the sampler against Optuna's study."""

from __future__ import annotations

import math

import numpy as np
import optuna
import pytest

from dse.pareto import hypervolume
from dse.samplers import ParEGOSampler, chebyshev

X = [round(0.1 * i, 1) for i in range(11)]  # an ordered choice (the GP sees its rank)


def test_chebyshev() -> None:
    v = np.array([[0.0, 10.0], [1.0, 20.0], [2.0, 30.0]])
    # normalised per column: z = [[0, 0], [.5, .5], [1, 1]]; weights (0.25, 0.75)
    got = chebyshev(v, np.array([0.25, 0.75]), rho=0.1)
    assert got.tolist() == pytest.approx([0.0, 0.375 + 0.05, 0.75 + 0.1])
    # +inf and NaN are the worst, -inf the best; a constant column is 0; finite bounds only
    v = np.array([[1.0, 5.0, math.inf], [3.0, 5.0, 0.0], [math.nan, 5.0, -math.inf], [2.0, 5.0, 4.0]])
    got = chebyshev(v, np.array([1.0, 1.0, 1.0]), rho=0.0)
    assert got.tolist() == [1.0, 1.0, 1.0, 1.0]
    got = chebyshev(v, np.array([0.0, 0.0, 1.0]), rho=0.0)
    assert got.tolist() == [1.0, 0.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="n_startup_trials: expected an integer >= 0, got -1"):
        ParEGOSampler(n_startup_trials=-1)


def _zdt1(p: dict[str, float]) -> tuple[float, float]:
    g = 1.0 + 9.0 * (p["b"] + p["c"]) / 2.0
    return p["a"], g * (1.0 - math.sqrt(p["a"] / g))


def _run(sampler: optuna.samplers.BaseSampler, n: int, *, pending: int = 0,
         feasible_a_le: float | None = None) -> optuna.Study:
    """``n`` trials of a ZDT1 on ordered choices; ``pending`` trials stay RUNNING while the
    next is asked (workers); with ``feasible_a_le``, trials with a > it violate a constraint."""
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=sampler)
    queue: list[optuna.Trial] = []
    told = 0
    while told < n:
        while len(queue) <= pending and told + len(queue) < n:
            t = study.ask()
            for name in "abc":
                t.suggest_categorical(name, X)
            t.suggest_int("sram_bytes", 1 << 24, 1 << 28, log=True)  # 2.5e8 values: a float to the GP
            if feasible_a_le is not None:
                t.set_constraint("a_le", t.params["a"] - feasible_a_le)
            queue.append(t)
        t = queue.pop(0)
        study.tell(t, list(_zdt1(t.params)))
        told += 1
    return study


def _hv(study: optuna.Study) -> float:
    y = np.array([t.values for t in study.trials if t.state.name == "COMPLETE"])
    return hypervolume(y, np.array([1.1, 11.0]))


@pytest.mark.slow
def test_parego_models_the_study() -> None:
    """Seeded runs repeat; after its random warm-up ParEGO finds more of the front than
    random search, with one trial pending at each ask too; the study stores the choices'
    values and whole numbers (the ranks and floats the GP sees stay inside the sampler);
    constraints steer it."""
    a = _run(ParEGOSampler(seed=0, n_startup_trials=6), 16)
    b = _run(ParEGOSampler(seed=0, n_startup_trials=6), 16)
    assert [t.params for t in a.trials] == [t.params for t in b.trials]
    rnd = _run(optuna.samplers.RandomSampler(seed=0), 16)
    assert [t.params for t in a.trials[:6]] != [t.params for t in rnd.trials[:8]]  # its own seed
    assert all(t.params[n] in X for t in a.trials for n in "abc")
    assert all(type(t.params["sram_bytes"]) is int and (1 << 24) <= t.params["sram_bytes"] <= (1 << 28)
               for t in a.trials)
    assert all(t.distributions["a"] == optuna.distributions.CategoricalDistribution(X) for t in a.trials)
    hv_rnd = _hv(rnd)
    assert _hv(a) > hv_rnd + 1.0, (_hv(a), hv_rnd)
    two = _run(ParEGOSampler(seed=0, n_startup_trials=6), 16, pending=1)
    assert _hv(two) > hv_rnd + 1.0, (_hv(two), hv_rnd)
    # constrained: a <= 0.3 feasible (4 of 11 values); after the warm-up most asks comply
    con = _run(ParEGOSampler(seed=0, n_startup_trials=6), 16, feasible_a_le=0.3)
    late = [t.params["a"] <= 0.3 for t in con.trials[6:]]
    assert sum(late) >= 0.8 * len(late), late
