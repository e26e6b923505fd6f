"""Per-trial overhead of the study storage: PostgreSQL vs the journal file (run on purpose).

The same study (ZDT1, 2 variables, NSGA-II, instant trials: the evaluation costs
nothing, so the time is the driver's and its storage's) runs to ``--n-trials`` COMPLETE
on the default journal file and on a private PostgreSQL server (tests/postgres.py: the
machine's ``initdb``, 127.0.0.1, fsync on, like a real server). Reported per storage:
loop wall time, ms per trial, and peak RSS of the driver process and of the PostgreSQL
server's processes (sampled every 0.2 s). Target: PostgreSQL within 3x of the journal.

Usage::

    python bench/bench_storage.py                 # 300 trials, inline pool (no Ray)
    python bench/bench_storage.py --ray           # through 2 Ray actors, as `dse run`
    python bench/bench_storage.py --n-trials 100
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class Peak:
    """Peak summed RSS (bytes) of some processes, sampled every ``period_s``."""

    def __init__(self, pids: list[int], children: bool, period_s: float = 0.2) -> None:
        self.pids, self.children, self.period_s = pids, children, period_s
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            total = 0
            for pid in self.pids:
                try:
                    p = psutil.Process(pid)
                    procs = [p, *p.children(recursive=True)] if self.children else [p]
                    total += sum(q.memory_info().rss for q in procs)
                except psutil.Error:
                    pass
            self.peak_bytes = max(self.peak_bytes, total)
            self._stop.wait(self.period_s)

    def __enter__(self) -> Peak:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()


def run(tmp: Path, name: str, n_trials: int, storage: str | None, ray: bool,
        server_pid: int | None) -> dict[str, Any]:
    from bench.bench_driver import spec_text
    from dse.driver import Driver
    from dse.spec import parse_spec

    spec = parse_spec(spec_text(name, n_trials, 0.0, storage=storage, inline=not ray))
    with Peak([os.getpid()], children=False) as drv, \
            Peak([server_pid] if server_pid else [], children=True) as srv:
        t0 = time.perf_counter()
        s = Driver(spec, tmp, progress=False).run()
        wall_s = time.perf_counter() - t0
    assert s.complete == n_trials, s
    return {
        "loop_s": round(s.loop_s, 3), "wall_s": round(wall_s, 3),
        "ms_per_trial": round(1000 * s.loop_s / n_trials, 2),
        "driver_peak_rss_mb": round(drv.peak_bytes / 2**20, 1),
        "server_peak_rss_mb": round(srv.peak_bytes / 2**20, 1) if server_pid else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-trials", type=int, default=300)
    ap.add_argument("--ray", action="store_true", help="2 Ray actors instead of the inline pool")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    from tests import postgres

    if args.ray:
        import ray

        ray.init(address="local", num_cpus=2, include_dashboard=False,
                 object_store_memory=100 * 2**20, logging_level=logging.WARNING)
    server = postgres.start(fsync=True)
    out: dict[str, Any] = {
        "machine": f"{platform.node()} {platform.machine()}, {psutil.cpu_count()} CPUs, "
                   f"{psutil.virtual_memory().total / 2**30:.0f} GB",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_1min_before": os.getloadavg()[0],
        "n_trials": args.n_trials, "pool": "ray (2 actors)" if args.ray else "inline",
        "command": "python bench/bench_storage.py" + (" --ray" if args.ray else "")
                   + (f" --n-trials {args.n_trials}" if args.n_trials != 300 else ""),
    }
    try:
        with tempfile.TemporaryDirectory() as d:
            out["journal"] = run(Path(d), "bench_journal", args.n_trials, None, args.ray, None)
            url = server.url("bench")
            out["postgresql"] = run(Path(d), "bench_pg", args.n_trials, url, args.ray, server.proc.pid)
    finally:
        server.stop()
    out["load_1min_after"] = os.getloadavg()[0]
    out["ratio_pg_over_journal"] = round(out["postgresql"]["loop_s"] / out["journal"]["loop_s"], 2)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
