"""Standard multi-objective test problems (ZDT1, ZDT2, DTLZ2) as evaluators.

They have known true Pareto fronts, so samplers, the hypervolume and the driver can be
tested against ground truth independent of the project's simulators.

Parameters are ``<prefix>.0 ... <prefix>.<n_vars-1>`` (default prefix ``x``), each in
[0, 1]; metrics are ``f1 ... fM`` (dimensionless, all minimised). Options (``n_vars``,
``n_obj``, ``prefix``, ``delay_s``): the schemas below, ``dse evaluators zdt1``.

References: Zitzler, Deb, Thiele, "Comparison of multiobjective evolutionary algorithms:
empirical results", Evol. Comput. 8(2), 2000; Deb, Thiele, Laumanns, Zitzler, "Scalable
test problems for evolutionary multiobjective optimization", 2005.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from dse.schema import EvaluatorSchema, Metric, Option, Param, Plugin, positive_int


def _finish(problem: str) -> Any:
    def finish(o: dict[str, Any]) -> dict[str, Any]:
        o.setdefault("n_obj", 2)  # ZDT: always 2 objectives
        if o["n_vars"] is None:
            o["n_vars"] = o["n_obj"] + 9 if problem == "dtlz2" else 30
        minimum = o["n_obj"] if problem == "dtlz2" else 2
        if o["n_vars"] < minimum:
            raise ValueError(f"{problem} option n_vars: expected an integer >= {minimum}, "
                             f"got {o['n_vars']!r}")
        o["delay_s"] = float(o["delay_s"])
        return o

    return finish


def _schema(problem: str, doc: str) -> EvaluatorSchema:
    options = [
        positive_int("n_vars", "number of decision variables (default: ZDT 30, DTLZ2 "
                     "n_obj + 9)", low=2),
        Option("prefix", "str", "the parameter-name prefix", default="x"),
        Option("delay_s", "float", "seconds to sleep per evaluation (orchestration "
               "benchmarks)", low=0.0, default=0.0),
    ]
    if problem == "dtlz2":
        options.insert(1, positive_int("n_obj", "number of objectives", default=3, low=2))
        metrics: tuple[Metric, ...] = (Metric("f{i}", "objective i (dimensionless, minimised)",
                                              repeat=("n_obj", 1)),)
    else:
        metrics = tuple(Metric(f"f{i}", f"objective {i} (dimensionless, minimised)")
                        for i in (1, 2))
    return EvaluatorSchema(
        problem, doc, options=tuple(options),
        params=(Param("{prefix}.{i}", "float", "decision variable i", low=0.0, high=1.0,
                      repeat=("n_vars", 0)),),
        metrics=metrics,
        finish=_finish(problem),
        cheap=lambda o: float(o["delay_s"]) == 0.0, cheap_doc="delay_s = 0",
    )


SCHEMAS = {
    "zdt1": _schema("zdt1", "ZDT1: 2 objectives, convex front f2 = 1 - sqrt(f1)"),
    "zdt2": _schema("zdt2", "ZDT2: 2 objectives, concave front f2 = 1 - f1^2"),
    "dtlz2": _schema("dtlz2", "DTLZ2: n_obj objectives, front the positive unit sphere"),
}


def zdt1_objectives(x: np.ndarray) -> np.ndarray:
    """ZDT1 objectives ``[f1, f2]`` of one point ``x`` in [0, 1]^n (n >= 2)."""
    f1 = x[0]
    g = 1.0 + 9.0 * float(np.mean(x[1:]))
    return np.array([f1, g * (1.0 - math.sqrt(f1 / g))])


def zdt2_objectives(x: np.ndarray) -> np.ndarray:
    """ZDT2 objectives ``[f1, f2]`` of one point ``x`` in [0, 1]^n (n >= 2)."""
    f1 = x[0]
    g = 1.0 + 9.0 * float(np.mean(x[1:]))
    return np.array([f1, g * (1.0 - (f1 / g) ** 2)])


def zdt3_objectives(x: np.ndarray) -> np.ndarray:
    """ZDT3 objectives ``[f1, f2]`` of one point ``x`` in [0, 1]^n (n >= 2); disconnected front."""
    f1 = x[0]
    g = 1.0 + 9.0 * float(np.mean(x[1:]))
    r = f1 / g
    return np.array([f1, g * (1.0 - math.sqrt(r) - r * math.sin(10.0 * math.pi * f1))])


def dtlz2_objectives(x: np.ndarray, n_obj: int) -> np.ndarray:
    """DTLZ2 objectives ``[f1 .. f_n_obj]`` of one point ``x`` in [0, 1]^n (n >= n_obj)."""
    g = float(np.sum((x[n_obj - 1 :] - 0.5) ** 2))
    angles = x[: n_obj - 1] * (math.pi / 2.0)
    f = np.empty(n_obj)
    for m in range(n_obj):  # f_{m+1}
        val = 1.0 + g
        val *= float(np.prod(np.cos(angles[: n_obj - 1 - m])))
        if m > 0:
            val *= math.sin(angles[n_obj - 1 - m])
        f[m] = val
    return f


def true_front(problem: str, n_points: int = 1000, n_obj: int = 2) -> np.ndarray:
    """Points on the true Pareto front, shape ``(n_points, n_obj)`` (DTLZ2: a sample).

    Args:
        problem: ``"zdt1"``, ``"zdt2"``, ``"zdt3"`` or ``"dtlz2"``.
        n_points: number of points (ZDT3: the non-dominated ones among ``n_points`` on
            the curve f2 = 1 - sqrt(f1) - f1 sin(10 pi f1); DTLZ2: a sample).
        n_obj: objectives (DTLZ2 only).
    """
    if problem in ("zdt1", "zdt2"):
        f1 = np.linspace(0.0, 1.0, n_points)
        f2 = 1.0 - np.sqrt(f1) if problem == "zdt1" else 1.0 - f1**2
        return np.stack([f1, f2], axis=1)
    if problem == "zdt3":
        f1 = np.linspace(0.0, 1.0, n_points)
        pts = np.stack([f1, 1.0 - np.sqrt(f1) - f1 * np.sin(10.0 * np.pi * f1)], axis=1)
        from dse.pareto import nondominated_mask

        return pts[nondominated_mask(pts)]
    if problem == "dtlz2":
        rng = np.random.default_rng(0)
        v = np.abs(rng.standard_normal((n_points, n_obj)))
        return v / np.linalg.norm(v, axis=1, keepdims=True)
    raise ValueError(f"problem: expected 'zdt1', 'zdt2', 'zdt3' or 'dtlz2', got {problem!r}")


def true_hypervolume(problem: str, ref: float | list[float], n_obj: int = 2) -> float:
    """Exact hypervolume of the true Pareto front for reference point ``ref`` (minimisation).

    ``ref`` must dominate-bound the front: every coordinate >= 1 (the front lies in
    [0, 1]^M; ZDT3's f2 goes down to -0.77). DTLZ2 takes one value used for every
    coordinate. ZDT3's value is computed from 200,001 front points (relative error ~1e-5).
    """
    if problem in ("zdt1", "zdt2"):
        r1, r2 = (ref, ref) if isinstance(ref, int | float) else ref
        if r1 < 1 or r2 < 1:
            raise ValueError(f"ref: expected every coordinate >= 1, got {ref!r}")
        # integral over f1 in [0, 1] of (r2 - f2(f1)) plus the strip f1 in [1, r1].
        area = r2 - 1.0 + (2.0 / 3.0 if problem == "zdt1" else 1.0 / 3.0)
        return area + (r1 - 1.0) * r2
    if problem == "zdt3":  # numeric: the front is 5 disconnected curve pieces
        from dse.pareto import hypervolume

        r = [ref, ref] if isinstance(ref, int | float) else list(ref)
        if min(r) < 1:
            raise ValueError(f"ref: expected every coordinate >= 1, got {ref!r}")
        return hypervolume(true_front("zdt3", 200_001), r)
    if problem == "dtlz2":
        if not isinstance(ref, int | float):
            raise ValueError(f"ref: expected one number for DTLZ2, got {ref!r}")
        if ref < 1:
            raise ValueError(f"ref: expected >= 1, got {ref!r}")
        ball = math.pi ** (n_obj / 2.0) / math.gamma(n_obj / 2.0 + 1.0)
        return float(ref) ** n_obj - ball / 2.0**n_obj
    raise ValueError(f"problem: expected 'zdt1', 'zdt2', 'zdt3' or 'dtlz2', got {problem!r}")


class BenchmarkProblem:
    """A warm evaluator for one test problem; see the module docstring for options."""

    def __init__(self, problem: str, options: Mapping[str, Any]) -> None:
        opts = SCHEMAS[problem].check_options(options)
        self.problem = problem
        self.n_vars: int = opts["n_vars"]
        self.n_obj: int = opts["n_obj"]
        self.delay_s: float = opts["delay_s"]
        self.names = [f"{opts['prefix']}.{i}" for i in range(self.n_vars)]

    def evaluate(self, params: Mapping[str, Any], upstream: Mapping[str, Any]) -> dict[str, Any]:
        """Objectives ``f1..fM`` of the point given by ``params`` (values in [0, 1])."""
        try:
            x = np.array([float(params[n]) for n in self.names])
        except KeyError as e:
            raise ValueError(f"parameter {e.args[0]!r} missing; expected {self.names}") from None
        if np.any(x < 0) or np.any(x > 1):
            raise ValueError(f"parameters {self.names[0]}..: expected values in [0, 1]")
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.problem == "zdt1":
            f = zdt1_objectives(x)
        elif self.problem == "zdt2":
            f = zdt2_objectives(x)
        else:
            f = dtlz2_objectives(x, self.n_obj)
        return {f"f{i + 1}": float(v) for i, v in enumerate(f)}


zdt1 = Plugin(SCHEMAS["zdt1"], lambda o, ctx: BenchmarkProblem("zdt1", o))
zdt2 = Plugin(SCHEMAS["zdt2"], lambda o, ctx: BenchmarkProblem("zdt2", o))
dtlz2 = Plugin(SCHEMAS["dtlz2"], lambda o, ctx: BenchmarkProblem("dtlz2", o))


def _toml(value: Any) -> str:
    """``value`` as a TOML literal (bool, int, float or str)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    return repr(value)


def study_spec(
    name: str,
    *,
    n_trials: int,
    problem: str = "zdt1",
    n_vars: int = 2,
    seed: int = 0,
    sampler: str | None = "nsga2",
    options: Mapping[str, Any] | None = None,
    sampler_options: Mapping[str, Any] | None = None,
    constraints: Sequence[tuple[str, str, float]] = (),
    storage: str | None = None,
    workers: int = 2,
    tracking: Mapping[str, Any] | None = None,
) -> str:
    """TOML text of a ready two-objective study of a benchmark problem.

    For tests, benchmarks and notebooks: variables ``x.0 .. x.<n_vars-1>`` in [0, 1],
    objectives ``f1``, ``f2`` (minimised, hypervolume reference 1.1 each), evaluator
    ``problem`` (any registered name taking ``n_vars``) with ``options`` added,
    ``constraints`` as ``(metric, op, bound)``, ``tracking`` as the ``[tracking]`` table.
    """
    lines = ["[study]", f"name = {_toml(name)}", f"seed = {seed}", f"n_trials = {n_trials}"]
    if sampler is not None:  # None: no sampler line, the study gets the default
        lines.insert(3, f"sampler = {_toml(sampler)}")
    if storage is not None:
        lines.append(f"storage = {_toml(storage)}")
    if sampler_options:
        lines.append("[study.sampler_options]")
        lines += [f"{k} = {_toml(v)}" for k, v in sampler_options.items()]
    for metric in ("f1", "f2"):
        lines += ["[[objectives]]", f'metric = "{metric}"', "ref = 1.1"]
    for metric, op, bound in constraints:
        lines += ["[[constraints]]", f"metric = {_toml(metric)}", f"op = {_toml(op)}",
                  f"bound = {_toml(bound)}"]
    lines.append("[space.x]")
    lines += [f'{i} = {{ type = "float", low = 0.0, high = 1.0 }}' for i in range(n_vars)]
    opts = ", ".join(f"{k} = {_toml(v)}" for k, v in {"n_vars": n_vars, **(options or {})}.items())
    lines += ["[[evaluators]]", f"name = {_toml(problem)}", f"options = {{ {opts} }}",
              "[ray]", f"workers = {workers}", "[tracking]"]
    lines += [f"{k} = {_toml(v)}" for k, v in (tracking or {}).items()]
    return "\n".join(lines) + "\n"
