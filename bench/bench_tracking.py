"""Tracking overhead benchmark (run on purpose, not by pytest): does MLflow slow the search?

2,000 instant ZDT1 trials through the inline pool (no Ray; the evaluator takes
microseconds, so any tracking cost shows), ``child_runs = "all"``, with tracking off and
on (a fresh SQLite MLflow store per run). Reports per run: the search loop in ms per trial
(``RunSummary.loop_s``), the end-of-run drain (``finish_s``: waiting for the logging
process to log what is queued, the final artifacts, closing the parent run) as seconds
and as a share of the wall time, and the peak summed RSS of the driver and its children
(the logging process), sampled every 0.2 s.

Usage::

    python bench/bench_tracking.py              # 2,000 trials
    python bench/bench_tracking.py --trials 500
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
from bench_driver import PeakRSS  # run as `python bench/...`: bench/ is on sys.path

ROOT = Path(__file__).resolve().parents[1]


def one_run(n: int, tracking: bool) -> dict[str, Any]:
    """One study of ``n`` inline ZDT1 trials in a fresh directory."""
    from dse.driver import Driver
    from dse.spec import load_spec

    spec = load_spec(ROOT / "examples" / "zdt1.toml")
    spec.name = f"bench-{'on' if tracking else 'off'}"
    spec.child_runs = "all"
    root = Path(tempfile.mkdtemp(prefix="dse-bench-tracking-"))
    try:
        with PeakRSS() as peak:
            t0 = time.monotonic()
            s = Driver(spec, root, n_trials=n, address="inline", tracking=tracking, progress=False).run()
            wall_s = time.monotonic() - t0
        assert s.complete == n, s
        return {
            "tracking": tracking, "trials": n, "wall_s": round(wall_s, 2), "setup_s": round(s.setup_s, 2),
            "loop_ms_per_trial": round(1000 * s.loop_s / n, 2), "drain_s": round(s.finish_s, 2),
            "drain_share": round(s.finish_s / wall_s, 3), "peak_rss_mb": round(peak.peak_bytes / 2**20),
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=2000)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print(f"load {psutil.getloadavg()[0]:.1f}, {psutil.cpu_count()} cores, {time.strftime('%Y-%m-%d %H:%M')}")
    for tracking in (False, True):
        print(json.dumps(one_run(args.trials, tracking)), flush=True)


if __name__ == "__main__":
    main()
