"""ZDT1, ZDT2, ZDT3 and DTLZ2: objective functions on their true fronts, exact hypervolumes."""

from __future__ import annotations

import numpy as np
import pytest

from dse.pareto import hypervolume
from dse.plugins.benchmarks import (
    BenchmarkProblem,
    dtlz2,
    dtlz2_objectives,
    true_front,
    true_hypervolume,
    zdt1,
    zdt1_objectives,
    zdt2_objectives,
    zdt3_objectives,
)
from dse.registry import EvalContext


@pytest.mark.parametrize(("problem", "fn"), [("zdt1", zdt1_objectives), ("zdt2", zdt2_objectives)])
def test_zdt_optimal_set_maps_to_true_front(problem: str, fn: object) -> None:
    rng = np.random.default_rng(0)
    f1 = rng.random(50)
    for x0 in f1:  # Pareto-optimal set: x0 free, all other x = 0
        x = np.zeros(30)
        x[0] = x0
        f = fn(x)  # type: ignore[operator]
        expect = 1 - np.sqrt(x0) if problem == "zdt1" else 1 - x0**2
        assert f == pytest.approx([x0, expect])
    # any other point is dominated-or-equal by the front: f2 >= front value
    for _ in range(50):
        x = rng.random(30)
        f = fn(x)  # type: ignore[operator]
        front_f2 = 1 - np.sqrt(f[0]) if problem == "zdt1" else 1 - f[0] ** 2
        assert f[1] >= front_f2 - 1e-12


@pytest.mark.parametrize("n_obj", [2, 3, 4])
def test_dtlz2_front_is_unit_sphere(n_obj: int) -> None:
    rng = np.random.default_rng(n_obj)
    for _ in range(20):
        x = rng.random(n_obj + 9)
        x[n_obj - 1 :] = 0.5  # g = 0
        f = dtlz2_objectives(x, n_obj)
        assert np.linalg.norm(f) == pytest.approx(1.0)
        y = rng.random(n_obj + 9)
        assert np.linalg.norm(dtlz2_objectives(y, n_obj)) >= 1.0 - 1e-12
    assert np.allclose(np.linalg.norm(true_front("dtlz2", 100, n_obj), axis=1), 1.0)


@pytest.mark.parametrize("problem", ["zdt1", "zdt2"])
def test_zdt_true_hypervolume(problem: str) -> None:
    front = true_front(problem, 20001)
    for ref in ([1.1, 1.1], [2.0, 3.0]):
        assert hypervolume(front, ref) == pytest.approx(true_hypervolume(problem, ref), rel=1e-4)
    assert true_hypervolume("zdt1", [1.1, 1.1]) == pytest.approx(0.1 + 2 / 3 + 0.11)


@pytest.mark.parametrize("n_obj", [2, 3])
def test_dtlz2_true_hypervolume(n_obj: int) -> None:
    exact = true_hypervolume("dtlz2", 1.1, n_obj)
    assert exact == pytest.approx(1.1**n_obj - (np.pi / 4 if n_obj == 2 else np.pi / 6))
    # Monte-Carlo check of the exact value (independent of moocore): dominated = outside the sphere
    rng = np.random.default_rng(0)
    pts = rng.random((400_000, n_obj)) * 1.1
    mc = np.mean(np.linalg.norm(pts, axis=1) >= 1.0) * 1.1**n_obj
    assert mc == pytest.approx(exact, rel=0.01)


def test_evaluators_and_options(tmp_path: object) -> None:
    ctx = EvalContext(study_dir=tmp_path)  # type: ignore[arg-type]
    ev = zdt1({"n_vars": 3}, ctx)
    assert ev.evaluate({"x.0": 0.25, "x.1": 0.0, "x.2": 0.0}, {}) == pytest.approx({"f1": 0.25, "f2": 0.5})
    ev3 = dtlz2({"n_obj": 3, "n_vars": 4, "prefix": "d"}, ctx)
    out = ev3.evaluate({f"d.{i}": 0.5 for i in range(4)}, {})
    assert sorted(out) == ["f1", "f2", "f3"]
    with pytest.raises(ValueError, match="parameter 'x.2' missing"):
        ev.evaluate({"x.0": 0.1, "x.1": 0.1}, {})
    with pytest.raises(ValueError, match=r"expected values in \[0, 1\]"):
        ev.evaluate({"x.0": 1.5, "x.1": 0.1, "x.2": 0.0}, {})
    for bad, msg in [({"n_vars": 1}, "n_vars: expected an integer >= 2"),
                     ({"delay_s": -1}, "delay_s: expected a number >= 0"),
                     ({"n_obj": 3}, "'n_obj' is unknown"),
                     ({"prefix": ""}, "prefix: expected a non-empty string")]:
        with pytest.raises(ValueError, match=msg):
            BenchmarkProblem("zdt1", bad)
    with pytest.raises(ValueError, match="n_vars: expected an integer >= 3"):
        BenchmarkProblem("dtlz2", {"n_vars": 2})


def test_zdt3_front_and_hypervolume() -> None:
    rng = np.random.default_rng(3)
    for x0 in rng.random(20):  # Pareto-optimal set: x0 free, all other x = 0
        x = np.zeros(4)
        x[0] = x0
        assert zdt3_objectives(x) == pytest.approx([x0, 1 - np.sqrt(x0) - x0 * np.sin(10 * np.pi * x0)])
    front = true_front("zdt3", 20001)
    assert len(front) < 20001 / 2  # the dominated parts of the curve are gone (5 pieces remain)
    assert front[:, 0].max() == pytest.approx(0.8518, abs=1e-3)  # the last piece ends there
    pts = np.array([zdt3_objectives(rng.random(4)) for _ in range(500)])
    for p in pts:  # no random point dominates a front point
        assert not np.any(np.all(p < front - 1e-9, axis=1))
    exact = true_hypervolume("zdt3", 1.1)
    assert hypervolume(front, [1.1, 1.1]) == pytest.approx(exact, rel=1e-3)
    assert true_hypervolume("zdt3", [1.1, 2.0]) == pytest.approx(exact + 0.9 * 1.1, rel=1e-4)
    with pytest.raises(ValueError, match="ref: expected every coordinate >= 1"):
        true_hypervolume("zdt3", 0.5)
