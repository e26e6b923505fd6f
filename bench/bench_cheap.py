"""Cheap evaluators in the driver process (no Ray): start-up, throughput, overhead.

Run on purpose, not by pytest. A PLENA-only study (the closed-form simulator, ~1 ms per
evaluation) is run through the real ``dse`` command in a subprocess:

1. time to first trial: from the command's start until the journal holds the first
   COMPLETE trial (the file polled every 10 ms), with and without tracking (target <= 3 s);
   and the whole ``dse run SPEC --n-trials 1`` command to its exit;
2. end to end: ``dse run SPEC --n-trials 2000`` with MLflow tracking on (a child run per
   trial, the default), from the command to its exit (target <= 10 s); also without
   tracking; each with ``--batch 1`` (one trial per evaluation) and ``--batch B`` (B asked
   trials priced in one vectorised PLENA call, ``--batch-size``, default 16);
3. driver overhead: the same 2,000 trials, same sampler (NSGA-II, seed 0), same space,
   same evaluator and the same storage (the buffered journal file) in a plain Optuna
   ask -> PLENA -> tell loop in one process, against the dse run's own loop time
   (``RunSummary.loop_s``, in-process, no tracking) (target within 2x).

Peak memory: the peak summed RSS of the command and every process it starts (MLflow's
logging process), sampled every 0.1 s. ``cpu_s``: user + system CPU seconds of the command
and the processes it waited for (on the shared, overloaded box wall time is mostly waiting
for a core; ``cpu_s`` is what an idle machine's wall time approaches for this
single-threaded loop, plus the overlapping MLflow process).

Usage::

    python bench/bench_cheap.py            # 2,000 trials (about a minute on 2 shared cores)
    python bench/bench_cheap.py --n 500    # fewer
    python bench/bench_cheap.py --only end_to_end_no_tracking   # one measurement
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]

SPEC = """
[study]
name = "plena_cheap"
seed = 0
n_trials = 2000

[[objectives]]
metric = "tokens_per_s"
direction = "maximize"

[[objectives]]
metric = "area_mm2"
direction = "minimize"

[[constraints]]
metric = "fits_memory"
op = ">="
bound = 1.0

[space.hw]
mlen = { choices = [512, 1024, 2048, 4096] }
blen = { choices = [4, 8, 16, 32, 64, 128] }
vlen = { choices = [512, 1024, 2048, 4096, 8192] }
hlen = { value = 128 }
matrix_sram_bytes = { type = "int", low = 16777216, high = 268435456, log = true }
vector_sram_bytes = { type = "int", low = 16777216, high = 268435456, log = true }
hbm_gbps = { type = "float", low = 500.0, high = 4000.0 }
hbm_gb = { value = 80.0 }
clock_ghz = { type = "float", low = 0.8, high = 2.0 }

[space.quant]
weights = { choices = ["mxint4", "mxint6", "mxint8", "bf16"] }
acts = { choices = ["mxint8", "bf16"] }
kv = { choices = ["mxint4", "mxint8", "bf16"] }

[[evaluators]]
name = "plena"
options = { model = "llama-3.1-8b", batch = 4, prompt_len = 32768, output_len = 1024 }
"""


def peak_rss_of(proc: subprocess.Popen[bytes], journal: Path, t0: float, period_s: float = 0.01) -> dict[str, float]:
    """Wait for ``proc``; its wall time from ``t0``, when ``journal`` first held a COMPLETE
    trial (a ``"op_code":6`` record with ``"state":1``), the peak summed RSS of its tree."""
    peak, first, n = 0, float("nan"), 0
    p = psutil.Process(proc.pid)
    while proc.poll() is None:
        n += 1
        if first != first and journal.exists():
            text = journal.read_text(errors="replace")
            if '"op_code":6' in text and '"state":1' in text:
                first = time.perf_counter() - t0
        if n % 10:
            time.sleep(period_s)
            continue
        total = 0
        try:
            for q in [p, *p.children(recursive=True)]:
                total += q.memory_info().rss
        except psutil.Error:
            pass
        peak = max(peak, total)
        time.sleep(period_s)
    return {"wall_s": time.perf_counter() - t0, "first_trial_s": first, "peak_rss_mb": peak / 1e6}


def command(tmp: Path, n: int, tracking: bool, batch: int = 1) -> dict[str, Any]:
    """``dse run`` in a subprocess: wall from the command to its exit, peak RSS."""
    spec = tmp / "plena_cheap.toml"
    spec.write_text(SPEC)
    root = tmp / f"studies-{n}-{tracking}-{time.monotonic_ns()}"
    args = [sys.executable, "-m", "dse.cli", "run", str(spec), "--dir", str(root), "--n-trials", str(n),
            "--progress", "log", "--batch", str(batch)] + ([] if tracking else ["--no-tracking"])
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen(args, env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=tmp,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    out = peak_rss_of(proc, root / "plena_cheap" / "optuna.journal", t0)
    out["wall_s"] = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    # CPU of the command and the processes it waited for (its MLflow logging process):
    # what a quiet machine's wall time approaches (the shared box's load inflates wall)
    out["cpu_s"] = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.read().decode()[-2000:] if proc.stderr else "failed")
    return {"n_trials": n, "tracking": tracking, "batch": batch, **out}


def in_process(tmp: Path, n: int) -> dict[str, Any]:
    """The dse run's own loop (no tracking) and a plain Optuna loop, same sampler/storage."""
    import optuna

    from dse.driver import Driver
    from dse.registry import EvalContext, get
    from dse.spec import complete_params, parse_spec, sample_params
    from dse.storage import flush, open_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = parse_spec(SPEC)
    s = Driver(spec, tmp / "dse", n_trials=n, tracking=False, progress=False).run()
    assert s.complete == n

    # plain Optuna: ask -> suggest the same space -> PLENA -> tell, on the same buffered
    # journal, flushed as often as the driver flushes (every 0.2 s)
    spec = parse_spec(SPEC)
    e = spec.evaluators[0]
    ev = get(e.name)(dict(e.options), EvalContext(tmp / "plain", seed=0))
    study = optuna.create_study(study_name="plain", storage=open_storage(None, tmp / "plain", buffered=True),
                                sampler=spec.make_sampler(), directions=spec.directions)
    t0 = last = time.perf_counter()
    done = 0
    while done < n:
        trial = study.ask()
        params = complete_params(sample_params(trial, spec), spec)
        m = ev.evaluate(params, {})
        for c in spec.constraints:
            trial.set_constraint(c.key, c.violation(float(m[c.metric])))
        study.tell(trial, [float(m[o.metric]) for o in spec.objectives])
        done += 1
        if time.perf_counter() - last >= 0.2:
            flush(study)
            last = time.perf_counter()
    flush(study)
    plain_s = time.perf_counter() - t0
    return {"n_trials": n, "dse_loop_s": s.loop_s, "dse_setup_s": s.setup_s, "plain_optuna_s": plain_s,
            "dse_ms_per_trial": 1e3 * s.loop_s / n, "plain_ms_per_trial": 1e3 * plain_s / n,
            "ratio": s.loop_s / plain_s}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000, help="trials of the long runs")
    ap.add_argument("--batch-size", type=int, default=16, help="--batch of the batched runs")
    ap.add_argument("--only", nargs="*", help="run only these measurements (keys of the output)")
    args = ap.parse_args()
    results: dict[str, Any] = {"load_avg": os.getloadavg()}
    b = args.batch_size
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        sys.path.insert(0, str(ROOT))
        todo = {
            "first_trial_no_tracking": lambda: command(tmp, 1, False),
            "first_trial_tracking": lambda: command(tmp, 1, True),
            "end_to_end_tracking": lambda: command(tmp, args.n, True),
            f"end_to_end_tracking_batch{b}": lambda: command(tmp, args.n, True, b),
            "end_to_end_no_tracking": lambda: command(tmp, args.n, False),
            f"end_to_end_no_tracking_batch{b}": lambda: command(tmp, args.n, False, b),
            "overhead": lambda: in_process(tmp, args.n),
        }
        for key, fn in todo.items():
            if not args.only or key in args.only:
                results[key] = fn()
                print(key, json.dumps(results[key]), file=sys.stderr, flush=True)
    results["load_avg_after"] = os.getloadavg()
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
