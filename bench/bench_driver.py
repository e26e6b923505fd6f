"""Orchestration benchmark of the dse driver (run on purpose, not by pytest).

Measures, on one local Ray cluster shared by all dse runs:

1. overhead: 2 workers, an evaluator sleeping 0.5 s, 16 trials: loop wall time over the
   ideal 16 x 0.5 / 2 = 4.0 s (target <= 1.05x);
2. instant trials: 2,000 trials of ZDT1 (no sleep) with nsga2: ms per trial amortised,
   with the default journal storage, with the inline pool (``[ray] address = "inline"``:
   no Ray hop), with SQLite (300 trials only), and with MLflow
   tracking on (target:
   <= 2 ms per trial of overhead);
3. Ray Tune + OptunaSearch on the same 16 x 0.5 s workload, side by side;
4. memory: peak RSS of the driver, and peak summed RSS of the driver and every process
   it started (Ray's GCS, raylet, workers; MLflow runs in the driver), sampled every
   0.2 s (summed RSS double-counts shared pages: an upper bound).
5. ``--determinism``: the cost of the deterministic mode (the default; results told in
   trial order, trial n asked once trial n - workers is told, a fresh sampler per ask)
   against ``deterministic = false``: 2 workers, 32 trials of 0.5 s (ideal 8.0 s; target
   <= 1.05x), 32 trials of 0.25-0.75 s (uniform, from the trial's parameters; ideal =
   the summed durations / 2), and 2,000 instant inline trials (ms per trial).

Usage::

    python bench/bench_driver.py            # everything (a few minutes on 2 shared cores)
    python bench/bench_driver.py --quick    # 200 instant trials instead of 2,000
    python bench/bench_driver.py --determinism   # section 5 only
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from peak_rss import PeakRSS  # bench/: on sys.path when run as a script

ROOT = Path(__file__).resolve().parents[1]


def spec_text(name: str, n_trials: int, delay_s: float, *, storage: str | None = None,
              tracking: bool = False, inline: bool = False) -> str:
    from dse.plugins.benchmarks import study_spec

    text = study_spec(name, n_trials=n_trials, options={"delay_s": delay_s}, storage=storage,
                      tracking={"enabled": tracking, "artifact_every": 1000000})
    return text.replace("[ray]\n", '[ray]\naddress = "inline"\n', 1) if inline else text


def run_dse(tmp: Path, name: str, n_trials: int, delay_s: float, *, deterministic: bool | None = None,
            **kw: Any) -> dict[str, Any]:
    from dse.driver import Driver
    from dse.spec import parse_spec

    spec = parse_spec(spec_text(name, n_trials, delay_s, **kw))
    s = Driver(spec, tmp, progress=False, deterministic=deterministic).run()
    assert s.complete == n_trials, s
    return {
        "loop_s": round(s.loop_s, 3),
        "setup_s": round(s.setup_s, 3),
        "finish_s": round(s.finish_s, 3),
        "ms_per_trial_loop": round(1000 * s.loop_s / n_trials, 3),
        "ms_per_trial_total": round(1000 * (s.loop_s + s.finish_s) / n_trials, 3),
    }


def run_optuna_only(n_trials: int) -> dict[str, Any]:
    """The sampler's own cost: a plain in-process ask/tell loop, in-memory storage."""
    import numpy as np
    import optuna

    from dse.plugins.benchmarks import zdt1_objectives

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=["minimize"] * 2, sampler=optuna.samplers.NSGAIISampler(seed=0))
    t0 = time.monotonic()
    for _ in range(n_trials):
        t = study.ask()
        x = np.array([t.suggest_float("x.0", 0.0, 1.0), t.suggest_float("x.1", 0.0, 1.0)])
        study.tell(t, list(zdt1_objectives(x)))
    wall = time.monotonic() - t0
    return {"loop_s": round(wall, 3), "ms_per_trial": round(1000 * wall / n_trials, 3)}


def run_tune(tmp: Path, n_trials: int, delay_s: float) -> dict[str, Any]:
    import optuna
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    from dse.plugins.benchmarks import BenchmarkProblem

    problem = BenchmarkProblem("zdt1", {"n_vars": 2})

    def trainable(config: dict[str, float]) -> dict[str, float]:
        time.sleep(delay_s)
        return problem.evaluate({"x.0": config["x0"], "x.1": config["x1"]}, {})

    search = OptunaSearch(
        metric=["f1", "f2"], mode=["min", "min"], sampler=optuna.samplers.NSGAIISampler(seed=0)
    )
    t0 = time.monotonic()
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": 1}),
        param_space={"x0": tune.uniform(0.0, 1.0), "x1": tune.uniform(0.0, 1.0)},
        tune_config=tune.TuneConfig(search_alg=search, num_samples=n_trials, max_concurrent_trials=2),
        run_config=tune.RunConfig(storage_path=str(tmp / "tune"), name="tune", verbose=0),
    )
    results = tuner.fit()
    wall = time.monotonic() - t0
    assert len(results) == n_trials
    return {"wall_s": round(wall, 3), "ratio_to_ideal": round(wall / (n_trials * delay_s / 2), 3)}


class VariedSleep:
    """ZDT1 after a sleep of 0.25-0.75 s, a function of the trial's parameters (so a study's
    durations are the same in every run; the finishing order is not the asking order)."""

    def __init__(self, options: dict[str, Any], ctx: Any) -> None:
        from dse.plugins.benchmarks import BenchmarkProblem

        self.inner = BenchmarkProblem("zdt1", {"n_vars": 2})

    @staticmethod
    def duration_s(params: Any) -> float:
        return 0.25 + 0.5 * ((params["x.0"] * 7919.0 + params["x.1"] * 104729.0) % 1.0)

    def evaluate(self, params: Any, upstream: Any) -> dict[str, Any]:
        time.sleep(self.duration_s(params))
        return self.inner.evaluate(params, upstream)


def determinism(tmp: Path, n_fast: int) -> dict[str, Any]:
    """Section 5: deterministic mode against ``deterministic = false`` (see module doc)."""
    import optuna

    from dse import registry
    from dse.driver import open_storage

    registry.register("bench_varied", VariedSleep)
    out: dict[str, Any] = {}
    for det in (True, False):
        mode = "deterministic" if det else "throughput"
        ov = run_dse(tmp, f"ov_{mode}", 32, 0.5, deterministic=det)
        ov["ratio_to_ideal"] = round(ov["loop_s"] / 8.0, 3)
        out[f"32x0.5s_{mode}"] = ov
        name = f"var_{mode}"
        text = spec_text(name, 32, 0.0).replace('name = "zdt1"', 'name = "bench_varied"', 1)
        text = text.replace(", delay_s = 0.0", "")
        from dse.driver import Driver
        from dse.spec import parse_spec

        s = Driver(parse_spec(text), tmp, progress=False, deterministic=det).run()
        trials = optuna.load_study(study_name=name, storage=open_storage(None, tmp / name)).trials
        ideal = sum(VariedSleep.duration_s(t.params) for t in trials) / 2
        out[f"32x0.25-0.75s_{mode}"] = {"loop_s": round(s.loop_s, 3), "ideal_s": round(ideal, 3),
                                        "ratio_to_ideal": round(s.loop_s / ideal, 3)}
        out[f"instant_inline_{mode}"] = run_dse(tmp, f"fast_{mode}", n_fast, 0.0, inline=True,
                                                deterministic=det)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="200 instant trials instead of 2,000")
    ap.add_argument("--no-tune", action="store_true")
    ap.add_argument("--determinism", action="store_true", help="only section 5 (deterministic mode)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import ray

    if args.determinism:
        tmp = Path(tempfile.mkdtemp(prefix="bench_driver_"))
        try:
            with PeakRSS() as mem:
                ray.init(address="local", num_cpus=2, include_dashboard=False,
                         object_store_memory=100 * 1024 * 1024, logging_level=logging.WARNING)
                out = determinism(tmp, 200 if args.quick else 2000)
                out["peak_rss_dse_mb"] = round(mem.peak_bytes / 2**20, 1)
            out["driver_maxrss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
            ray.shutdown()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        print(json.dumps(out, indent=2))
        return

    n_fast = 200 if args.quick else 2000
    out: dict[str, Any] = {"n_instant_trials": n_fast}
    tmp = Path(tempfile.mkdtemp(prefix="bench_driver_"))
    try:
        with PeakRSS() as mem:
            t0 = time.monotonic()
            ray.init(address="local", num_cpus=2, include_dashboard=False,
                     object_store_memory=100 * 1024 * 1024, logging_level=logging.WARNING)
            out["ray_init_s"] = round(time.monotonic() - t0, 3)
            ov = run_dse(tmp, "overhead", 16, 0.5)
            ov["ratio_to_ideal"] = round(ov["loop_s"] / 4.0, 3)
            out["overhead_16x0.5s"] = ov
            out["optuna_only_inmemory"] = run_optuna_only(n_fast)
            out["instant_journal"] = run_dse(tmp, "fast_journal", n_fast, 0.0)
            out["instant_inline"] = run_dse(tmp, "fast_inline", n_fast, 0.0, inline=True)
            n_sql = min(n_fast, 300)  # ~0.25 s per trial here: 2,000 would take 8 minutes
            out["instant_sqlite"] = {"n_trials": n_sql, **run_dse(
                tmp, "fast_sqlite", n_sql, 0.0, storage=f"sqlite:///{tmp / 'optuna.db'}"
            )}
            out["instant_journal_tracking"] = run_dse(tmp, "fast_tracked", n_fast, 0.0, tracking=True)
            out["peak_rss_dse_mb"] = round(mem.peak_bytes / 2**20, 1)
        out["driver_maxrss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        if not args.no_tune:
            with PeakRSS() as mem_tune:
                out["tune_optunasearch_16x0.5s"] = run_tune(tmp, 16, 0.5)
            out["peak_rss_with_tune_mb"] = round(mem_tune.peak_bytes / 2**20, 1)
        ray.shutdown()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
