"""Benchmark: which Optuna sampler finds the most of the true Pareto front per trial.

Problems (all minimised after sign flips; hypervolume as % of the true front's, at a fixed
reference point per problem):

* ``zdt1``, ``zdt2``, ``zdt3`` (2 objectives, 4 continuous variables) and ``dtlz2`` (3
  objectives, 6 variables). Analytic fronts (ZDT3's sampled densely); reference point 1.1
  in every objective. With the standard 30 (ZDT) or 12 (DTLZ2) variables no sampler gets
  a point inside that box in 500 trials (with 6, ZDT2 none in 200), so every share is 0.
* ``plena``: PLENA formats x hardware, 3 objectives (numerics error in dB, area_mm2,
  tokens_per_s), 92,160 points: quant.weights (6) x acts (4) x kv (4) x hw.mlen (4) x
  blen (5) x vlen (4) x hbm_gbps (4) x matrix_sram_bytes (3); Llama-3.1-8B, 2k prompt,
  256 new tokens, batch 4. The numerics error is 10 log10 of the summed relative MSE of
  the three formats on a fixed heavy-tailed tensor (real quantisation, quant/).
* ``dataflow``: foldings x sparsity of a 3-conv CNN on a ZCU102 (simulators/dataflow),
  3 objectives (images_per_s, dsp, pruned weight share as the accuracy proxy),
  1,492,992 points: per layer coarse_in, coarse_out (1-8), fine (1, 3, 9) and weight
  density (0.3, 0.65, 1.0).

Both simulator spaces are enumerated exhaustively with the vectorised simulators (a few
seconds each on one core; cached under ``--cache``). Their objectives are normalised by
the true front's ideal and nadir points, reference point 1.1 each.

Samplers are driven with plain Optuna ask/tell against the problem functions (no Ray, no
driver). All seeds of one (problem, sampler) run in one fresh process (one thread) that
reports CPU time per trial and peak RSS; results are appended to a JSON-lines file, so a
run can be stopped and its results still tabulated::

    nohup python bench/bench_samplers.py run --out /tmp/samplers.jsonl &   # ~40 min CPU
    python bench/bench_samplers.py table /tmp/samplers.jsonl              # Markdown
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

for _v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import optuna  # noqa: E402

from dse.pareto import hypervolume, nondominated_mask  # noqa: E402
from dse.plugins.benchmarks import (  # noqa: E402
    dtlz2_objectives,
    true_hypervolume,
    zdt1_objectives,
    zdt2_objectives,
    zdt3_objectives,
)
from dse.samplers import ParEGOSampler, Ranked, warmup_trials  # noqa: E402

CHECKPOINTS = (50, 100, 200, 500, 1000)
CURVE_EVERY = 10  # hypervolume recorded every this many trials
N_VARS = {"zdt1": 4, "zdt2": 4, "zdt3": 4, "dtlz2": 6}  # decision variables


# ----------------------------------------------------------------------------- problems


@dataclass
class Problem:
    """A benchmark problem: its space, objective function and true front.

    ``space``: (name, kind, values) with kind ``cat`` (values = choices) or ``float``
    (values = (low, high)). ``f(params) -> objective vector`` (minimised). ``ref``: the
    reference point; ``true_hv``: the true front's hypervolume at ``ref``.
    """

    name: str
    space: list[tuple[str, str, tuple[Any, ...]]]
    f: Callable[[dict[str, Any]], np.ndarray]
    ref: np.ndarray
    true_hv: float
    n_points: int | None = None  # a finite space's size
    build_s: float = 0.0  # seconds to enumerate it and find its front


def _analytic(name: str) -> Problem:
    space = [(f"x.{i}", "float", (0.0, 1.0)) for i in range(N_VARS[name])]
    n_obj = 3 if name == "dtlz2" else 2
    fn = {"zdt1": zdt1_objectives, "zdt2": zdt2_objectives, "zdt3": zdt3_objectives,
          "dtlz2": lambda x: dtlz2_objectives(x, 3)}[name]
    ref = np.full(n_obj, 1.1)
    hv = true_hypervolume(name, 1.1, n_obj=n_obj) if name == "dtlz2" else true_hypervolume(name, [1.1, 1.1])
    return Problem(name, space, lambda p: fn(np.array([p[n] for n, _, _ in space])), ref, hv)


@dataclass
class Table:
    """An enumerated finite space: axis values and objectives (N, M) in C order."""

    axes: list[tuple[str, tuple[Any, ...]]]
    f: np.ndarray  # normalised, minimised


def _normalise(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Objectives scaled so the true front's ideal is 0 and its nadir 1; the front mask."""
    mask = nondominated_mask(raw)
    front = raw[mask]
    lo, hi = front.min(axis=0), front.max(axis=0)
    return (raw - lo) / np.where(hi > lo, hi - lo, 1.0), mask


FORMATS_W = ("mxint4", "mxfp4_e2m1", "mxint6", "mxint8", "int4(asym,group=128)", "bf16")
FORMATS_A = ("mxint8", "mxfp8_e4m3", "mxint6", "bf16")
FORMATS_KV = ("mxint4", "mxint8", "int4(asym,group=32)", "bf16")
PLENA_HW = (("hw.mlen", (512, 1024, 2048, 4096)), ("hw.blen", (8, 16, 32, 64, 128)),
            ("hw.vlen", (512, 1024, 2048, 4096)), ("hw.hbm_gbps", (400.0, 800.0, 1600.0, 3200.0)),
            ("hw.matrix_sram_bytes", (2**22, 2**24, 2**26)))


def _format_errors(names: set[str]) -> dict[str, float]:
    """Relative MSE of each format on a fixed heavy-tailed tensor (Student t, nu = 4)."""
    import torch

    from quant import get_format

    torch.set_num_threads(1)
    x = torch.from_numpy(np.random.default_rng(0).standard_t(4, (16, 4096)).astype(np.float32))
    return {n: float(((get_format(n).quantize(x) - x) ** 2).sum() / (x**2).sum()) for n in names}


def build_plena() -> Table:
    """Every point of the PLENA space: [numerics error dB, area_mm2, -tokens_per_s]."""
    import itertools

    from simulators.plena import Numerics, PlenaHardware, Workload, simulate

    wl = Workload.of("llama-3.1-8b", batch=4, prompt_len=2048, output_len=256)
    err = _format_errors(set(FORMATS_W) | set(FORMATS_A) | set(FORMATS_KV))
    grids = np.meshgrid(*(np.asarray(v, dtype=float) for _, v in PLENA_HW), indexing="ij")
    hw = PlenaHardware(**{k.removeprefix("hw."): g.ravel() for (k, _), g in zip(PLENA_HW, grids, strict=True)},
                       hbm_gb=80.0)
    rows = []
    for w, a, kv in itertools.product(FORMATS_W, FORMATS_A, FORMATS_KV):
        r = simulate(hw, wl, Numerics(w, a, kv))
        e = np.full(r.area_mm2.shape, 10 * math.log10(err[w] + err[a] + err[kv]))
        rows.append(np.stack([e, r.area_mm2, -r.tokens_per_s], axis=1))
    axes = [("quant.weights", FORMATS_W), ("quant.acts", FORMATS_A), ("quant.kv", FORMATS_KV),
            *PLENA_HW]
    return Table(axes, np.concatenate(rows))


DF_FOLD = {"conv1": ((1, 3), (1, 2, 4, 8), (1, 3, 9)),
           "conv2": ((1, 2, 4, 8), (1, 2, 4, 8), (1, 3, 9)),
           "conv3": ((1, 2, 4, 8), (1, 2, 4, 8), (1, 3, 9))}
DENSITIES = (0.3, 0.65, 1.0)  # float low 0.3, high 1.0, step 0.35


def _df_network() -> Any:
    from simulators.dataflow import Layer, Network

    p = (1, 1, 1, 1)
    return Network("tiny3", (
        Layer("conv1", "conv", 32, 32, 3, 16, kernel=(3, 3), pad=p),
        Layer("conv2", "conv", 32, 32, 16, 32, kernel=(3, 3), stride=(2, 2), pad=p, inputs=("conv1",)),
        Layer("conv3", "conv", 16, 16, 32, 32, kernel=(3, 3), pad=p, inputs=("conv2",)),
    ))


def build_dataflow() -> Table:
    """Every point of the dataflow space: [-images_per_s, dsp, pruned weight share]."""
    import itertools

    from simulators.dataflow import Folding, Pipeline, synthetic

    net = _df_network()
    names = [ly.name for ly in net.layers]
    fold_axes = [v for n in names for v in DF_FOLD[n]]
    grids = [g.ravel() for g in np.meshgrid(*(np.asarray(v) for v in fold_axes), indexing="ij")]
    n_fold = grids[0].size
    ci = np.stack(grids[0::3], axis=1)
    co = np.stack(grids[1::3], axis=1)
    fi = np.stack(grids[2::3], axis=1)
    fold = Folding(ci, co, np.ones_like(ci), fi)
    w = np.array([ly.weights for ly in net.layers], dtype=float)
    out = np.empty((len(DENSITIES) ** 3, n_fold, 3))
    for k, dens in enumerate(itertools.product(DENSITIES, repeat=3)):
        sp = {ly.name: synthetic(ly.window, ly.channels, d)
              for ly, d in zip(net.layers, dens, strict=True) if d < 1.0}
        res = Pipeline(net, "zcu102", act_bits=8, weight_bits=8, sparsity=sp).evaluate(fold)
        pruned = 1.0 - float((w * np.array(dens)).sum() / w.sum())
        out[k] = np.stack([-res.images_per_s, res.dsp, np.full(n_fold, pruned)], axis=1)
    # C order of the table: densities (3 axes) then the folding axes
    axes = [(f"sparsity.layer.{n}.density", DENSITIES) for n in names]
    axes += [(f"hw.layer.{n}.{f}", v) for n in names for f, v in zip(("coarse_in", "coarse_out", "fine"),
                                                                      DF_FOLD[n], strict=True)]
    return Table(axes, out.reshape(-1, 3))


def _finite(name: str, cache: Path) -> Problem:
    path = cache / f"{name}.npz"
    t0 = time.process_time()
    builder = {"plena": build_plena, "dataflow": build_dataflow}[name]
    if path.exists():
        z = np.load(path, allow_pickle=True)
        axes, f, build_s = list(z["axes"]), z["f"], float(z["build_s"])
    else:
        table = builder()
        f, _ = _normalise(table.f)
        axes = table.axes
        build_s = time.process_time() - t0
        cache.mkdir(parents=True, exist_ok=True)
        np.savez(path, axes=np.array(axes, dtype=object), f=f, build_s=build_s)
    ref = np.full(f.shape[1], 1.1)
    front = f[nondominated_mask(f)]
    shape = tuple(len(v) for _, v in axes)
    index = [{v: i for i, v in enumerate(vals)} for _, vals in axes]
    space: list[tuple[str, str, tuple[Any, ...]]] = []
    for n, vals in axes:
        if n.endswith(".density"):
            space.append((n, "step", (0.3, 1.0, 0.35)))
        else:
            space.append((n, "cat", tuple(vals)))

    def fn(p: dict[str, Any]) -> np.ndarray:
        idx = []
        for (n, kind, _), ix in zip(space, index, strict=True):
            v = p[n]
            idx.append(min(ix, key=lambda c: abs(c - v)) if kind == "step" else v)
        return f[np.ravel_multi_index(tuple(ix[i] for ix, i in zip(index, idx, strict=True)), shape)]

    return Problem(name, space, fn, ref, hypervolume(front, ref), n_points=len(f), build_s=build_s)


def get_problem(name: str, cache: Path) -> Problem:
    """The benchmark problem ``name`` (see the module docstring)."""
    if name in ("plena", "dataflow"):
        return _finite(name, cache)
    return _analytic(name)


PROBLEMS = ("zdt1", "zdt2", "zdt3", "dtlz2", "plena", "dataflow")


# ----------------------------------------------------------------------------- samplers
#: name -> (factory(seed, n_params) -> sampler, trials run, trials pending while asking).
#: ``*-2w`` keep one trial running while the next is asked (two workers, constant liar); GP
#: and the 2w ones run fewer trials (GP costs ~0.3-1 s per trial by 60 trials on one core).
#: ``tpe-mv-w``: multivariate TPE with a warm-up of 2 (n_params + 1) random trials (the
#: default's, dse.samplers.warmup_trials). ``*-rank``: the same sampler wrapped in
#: :class:`Ranked` (numeric choices searched by rank; only run on the simulator spaces).
SAMPLERS: dict[str, tuple[Callable[[int, int], optuna.samplers.BaseSampler], int, int]] = {
    "random": (lambda s, d: optuna.samplers.RandomSampler(seed=s), 1000, 0),
    "nsga2-p50": (lambda s, d: optuna.samplers.NSGAIISampler(seed=s, population_size=50), 500, 0),
    "nsga2-p20": (lambda s, d: optuna.samplers.NSGAIISampler(seed=s, population_size=20), 500, 0),
    "nsga2-p10": (lambda s, d: optuna.samplers.NSGAIISampler(seed=s, population_size=10), 500, 0),
    "tpe": (lambda s, d: optuna.samplers.TPESampler(seed=s), 500, 0),
    "tpe-mv": (lambda s, d: optuna.samplers.TPESampler(seed=s, multivariate=True, group=True), 500, 0),
    "tpe-mv-w": (lambda s, d: optuna.samplers.TPESampler(seed=s, multivariate=True,
                                                         n_startup_trials=warmup_trials(d)), 500, 0),
    "tpe-2w": (lambda s, d: optuna.samplers.TPESampler(seed=s, constant_liar=True), 200, 1),
    "tpe-mv-2w": (lambda s, d: optuna.samplers.TPESampler(seed=s, multivariate=True, group=True,
                                                          constant_liar=True), 200, 1),
    "gp": (lambda s, d: optuna.samplers.GPSampler(seed=s), 100, 0),
    "tpe-mv-rank": (lambda s, d: Ranked(optuna.samplers.TPESampler(seed=s, multivariate=True)), 200, 0),
    "tpe-mv-w-rank": (lambda s, d: Ranked(optuna.samplers.TPESampler(
        seed=s, multivariate=True, n_startup_trials=warmup_trials(d))), 200, 0),
    "nsga2-p20-rank": (lambda s, d: Ranked(optuna.samplers.NSGAIISampler(seed=s, population_size=20)), 200, 0),
    "parego": (lambda s, d: ParEGOSampler(seed=s, n_startup_trials=warmup_trials(d)), 200, 0),
    "parego-onehot": (lambda s, d: ParEGOSampler(seed=s, n_startup_trials=warmup_trials(d), ordinal=False), 200, 0),
}


def _suggest(trial: optuna.Trial, space: list[tuple[str, str, tuple[Any, ...]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for n, kind, vals in space:
        if kind == "float":
            out[n] = trial.suggest_float(n, vals[0], vals[1])
        elif kind == "step":
            out[n] = trial.suggest_float(n, vals[0], vals[1], step=vals[2])
        else:
            out[n] = trial.suggest_categorical(n, list(vals))
    return out


def run_seeds(problem: str, sampler: str, seeds: list[int], cache: str,
              n_trials: int | None = None) -> list[dict[str, Any]]:
    """:func:`run_one` for each seed, in this one process (peak RSS: the process's so far)."""
    return [run_one(problem, sampler, seed, cache, n_trials) for seed in seeds]


def run_one(problem: str, sampler: str, seed: int, cache: str, n_trials: int | None = None) -> dict[str, Any]:
    """One study; returns its hypervolume curve (% of true), CPU s per trial, peak RSS."""
    import warnings

    warnings.filterwarnings("ignore")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass
    prob = get_problem(problem, Path(cache))
    make, n_default, pending = SAMPLERS[sampler]
    n = n_trials or n_default
    study = optuna.create_study(sampler=make(seed, len(prob.space)), directions=["minimize"] * len(prob.ref))
    ys = np.empty((n, len(prob.ref)))
    queue: list[tuple[int, optuna.Trial]] = []
    t0 = time.process_time()
    w0 = time.perf_counter()
    asked = told = 0
    while told < n:
        while asked < n and len(queue) <= pending:
            tr = study.ask()
            queue.append((asked, tr))
            asked += 1
            params = _suggest(tr, prob.space)
            ys[asked - 1] = prob.f(params)
        i, tr = queue.pop(0)
        study.tell(tr, ys[i].tolist())
        told += 1
    cpu_s = time.process_time() - t0
    wall_s = time.perf_counter() - w0
    curve = [100.0 * hypervolume(ys[:k], prob.ref) / prob.true_hv
             for k in range(CURVE_EVERY, n + 1, CURVE_EVERY)]
    return {"problem": problem, "sampler": sampler, "seed": seed, "n_trials": n,
            "curve_every": CURVE_EVERY, "hv_pct": curve, "cpu_s": cpu_s, "wall_s": wall_s,
            "ms_per_trial": 1e3 * cpu_s / n,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


# ----------------------------------------------------------------------------- driver


def cmd_run(args: argparse.Namespace) -> None:
    cache = Path(args.cache)
    done = set()
    out = Path(args.out)
    if out.exists():
        for line in out.read_text().splitlines():
            r = json.loads(line)
            if "sampler" in r:
                done.add((r["problem"], r["sampler"], r["seed"]))
    with out.open("a") as fh:
        for name in args.problems:  # enumerate the finite spaces first (cached)
            p = get_problem(name, cache)
            fh.write(json.dumps({"problem": name, "n_points": p.n_points, "build_cpu_s": p.build_s,
                                 "true_hv": p.true_hv, "ref": p.ref.tolist()}) + "\n")
            fh.flush()
        late = ("gp", "tpe-2w", "tpe-mv-2w")  # the expensive or secondary ones after all seeds of the rest
        order = [[s for s in args.samplers if s not in late], [s for s in args.samplers if s in late]]
        seeds = args.seed_list if args.seed_list is not None else list(range(args.seeds))
        jobs = [(p, s, [seed for seed in seeds if (p, s, seed) not in done])
                for group in order for s in group for p in args.problems]
        spent = 0.0
        with ProcessPoolExecutor(max_workers=1, max_tasks_per_child=1) as ex:
            for p, s, todo in jobs:  # all seeds of one (problem, sampler) in one process
                if not todo:
                    continue
                if spent > args.max_cpu_s:
                    print(f"CPU budget {args.max_cpu_s:.0f} s spent; {p}/{s} and later skipped", flush=True)
                    break
                w0 = time.perf_counter()
                rs = ex.submit(run_seeds, p, s, todo, str(cache), args.n_trials).result()
                for r in rs:
                    spent += r["cpu_s"]
                    fh.write(json.dumps(r) + "\n")
                fh.flush()
                print(f"{p:9s} {s:10s} seeds {todo}: median {np.median([r['hv_pct'][-1] for r in rs]):.1f}% "
                      f"at {rs[0]['n_trials']}, {np.median([r['ms_per_trial'] for r in rs]):.1f} ms/trial, "
                      f"{max(r['peak_rss_mb'] for r in rs):.0f} MB, {time.perf_counter() - w0:.0f} s wall; "
                      f"total {spent:.0f} s CPU", flush=True)


def load(paths: list[str]) -> tuple[dict[str, dict[str, Any]], dict[tuple[str, str], list[dict[str, Any]]]]:
    """Problem records and runs by (problem, sampler) from results files."""
    probs: dict[str, dict[str, Any]] = {}
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    lines = [ln for p in paths for ln in Path(p).read_text().splitlines()]
    seen = set()
    for line in lines:
        r = json.loads(line)
        key = (r["problem"], r.get("sampler"), r.get("seed"))
        if key in seen:  # the same run in two files: the first counts
            continue
        seen.add(key)
        if "sampler" in r:
            runs.setdefault((r["problem"], r["sampler"]), []).append(r)
        else:
            probs[r["problem"]] = r
    return probs, runs


def hv_at(r: dict[str, Any], k: int) -> float | None:
    """% of the true front's hypervolume after ``k`` trials (None: the run was shorter)."""
    if k > r["n_trials"]:
        return None
    return float(r["hv_pct"][k // r["curve_every"] - 1])


def median_at(rs: list[dict[str, Any]], k: int) -> float | None:
    """Median over seeds of :func:`hv_at`."""
    vals = [v for r in rs if (v := hv_at(r, k)) is not None]
    return float(np.median(vals)) if vals else None


def trials_to(rs: list[dict[str, Any]], target: float) -> float | None:
    """Median over seeds of the first trial count (step CURVE_EVERY) reaching ``target`` %."""
    out = []
    for r in rs:
        hit = [i for i, v in enumerate(r["hv_pct"]) if v >= target - 1e-9]
        out.append((hit[0] + 1) * r["curve_every"] if hit else math.inf)
    return float(np.median(out))


def bench_key(name: str, options: dict[str, Any]) -> str | None:
    """The :data:`SAMPLERS` entry that is ``name`` with ``options`` (None: not benchmarked)."""
    opts = {k: v for k, v in options.items() if k != "group"}  # no conditional parameters here
    if name in ("random", "gp") and not opts:
        return name
    if name == "tpe" and opts in ({}, {"multivariate": False}):
        return "tpe"
    if name == "tpe" and opts == {"multivariate": True}:
        return "tpe-mv"
    if name == "tpe" and set(opts) == {"multivariate", "n_startup_trials"} and opts["multivariate"]:
        return "tpe-mv-w"  # the warm-up is warmup_trials(n_params) for the problem's space
    if name == "nsga2" and set(opts) <= {"population_size"}:
        return f"nsga2-p{opts.get('population_size', 50)}"
    if name == "parego" and set(opts) <= {"n_startup_trials"}:
        return "parego"  # the warm-up is warmup_trials(n_params) for the problem's space
    return None


def default_rows(probs: dict[str, dict[str, Any]], runs: dict[tuple[str, str], list[dict[str, Any]]],
                 seeds: int = 5) -> list[str]:
    """The default's row per problem (dse.samplers.default_sampler for each budget) and the
    targets: random@1000 reached within 200 trials; within 5 points of the best at 200."""
    from dse.samplers import default_sampler

    out = []
    for p in probs:
        n_obj = 3 if p in ("dtlz2", "plena", "dataflow") else 2
        cont = p not in ("plena", "dataflow")  # only float ranges
        d = {"plena": 8, "dataflow": 12}.get(p, N_VARS.get(p, 0))  # searched parameters
        cells, keys = [], []
        for k in CHECKPOINTS[:4]:
            key = bench_key(*default_sampler(n_obj, k, continuous=cont, n_params=d))
            keys.append(key or "?")
            m = median_at(runs.get((p, key or ""), []), k)
            cells.append("" if m is None else f"{m:.1f}")
        key200 = bench_key(*default_sampler(n_obj, 200, continuous=cont, n_params=d)) or ""
        rand = runs.get((p, "random"), [])
        target = median_at(rand, 1000) if rand else None
        reach = trials_to(runs.get((p, key200), []), target) if target is not None and runs.get((p, key200)) else None
        best = max(((m, s) for (q, s), rs in runs.items()  # samplers with every seed run
                    if q == p and len(rs) >= seeds and (m := median_at(rs, 200)) is not None),
                   default=(None, ""))
        d200 = median_at(runs.get((p, key200), []), 200)
        longest = max((r["n_trials"] for r in runs.get((p, key200), [])), default=0)
        gap = "" if best[0] is None or d200 is None else f"{best[0] - d200:.1f} behind {best[1]}"
        out.append(f"| {p} | **default** ({' / '.join(dict.fromkeys(keys))}) | | " + " | ".join(cells)
                   + f" | {'' if reach is None else (f'> {longest}' if reach == math.inf else f'{reach:.0f}')}"
                   + f" | at 200: {gap} | |")
    return out


def cmd_table(args: argparse.Namespace) -> None:
    probs, runs = load(args.files)
    samplers = [s for s in SAMPLERS if any((p, s) in runs for p in probs)]
    print("| problem | sampler | seeds | " + " | ".join(f"@{k}" for k in CHECKPOINTS[:4])
          + " | trials to random@1000 | ms/trial (CPU) | peak RSS MB |")
    print("|---|---|---|" + "---|" * 7)
    for p in probs:
        rand = runs.get((p, "random"), [])
        target = median_at(rand, 1000) if rand else None
        for s in samplers:
            rs = runs.get((p, s))
            if not rs:
                continue
            cells = []
            for k in CHECKPOINTS[:4]:
                m = median_at(rs, k)
                cells.append("" if m is None else f"{m:.1f}")
            reach = "" if target is None else trials_to(rs, target)
            reach_s = "" if reach == "" else ("> " + str(rs[0]["n_trials"]) if reach == math.inf else f"{reach:.0f}")
            print(f"| {p} | {s} | {len(rs)} | " + " | ".join(cells)
                  + f" | {reach_s} | {np.median([r['ms_per_trial'] for r in rs]):.1f}"
                  + f" | {max(r['peak_rss_mb'] for r in rs):.0f} |")
        if target is not None:
            print(f"| {p} | random@1000 | {len(rand)} | {target:.1f} (the target) | | | | | | |")
    print()
    print("| problem | the default, by budget | | @50 | @100 | @200 | @500 | trials to random@1000 "
          "(n_trials = 200 default) | gap to the best sampler | |")
    print("|---|---|---|" + "---|" * 7)
    print("\n".join(default_rows(probs, runs)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run the benchmark, appending to --out")
    r.add_argument("--out", default="bench_samplers.jsonl")
    r.add_argument("--cache", default="/tmp/dse_bench_samplers")
    r.add_argument("--problems", nargs="+", default=list(PROBLEMS), choices=PROBLEMS)
    r.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=list(SAMPLERS))
    r.add_argument("--seeds", type=int, default=5, help="seeds 0 .. SEEDS-1")
    r.add_argument("--seed-list", type=int, nargs="+", help="these seeds instead (split a run "
                   "over processes, each with its own --out; `table` takes several files)")
    r.add_argument("--n-trials", type=int, help="trials per run instead of each sampler's own")
    r.add_argument("--max-cpu-s", type=float, default=2400.0, help="stop starting runs after this")
    t = sub.add_parser("table", help="print the Markdown table of a results file")
    t.add_argument("files", nargs="+")
    args = ap.parse_args()
    {"run": cmd_run, "table": cmd_table}[args.cmd](args)


if __name__ == "__main__":
    main()
