"""Per-trial overhead of the study storage: PostgreSQL vs the journal file (run on purpose).

The same study (ZDT1, 2 variables, NSGA-II, instant trials: the evaluation costs
nothing, so the time is the driver's and its storage's) runs to ``--n-trials`` COMPLETE
on the default journal file and on a private PostgreSQL server (tests/postgres.py: the
machine's ``initdb``, 127.0.0.1, fsync on, like a real server). Reported per storage:
loop wall time, ms per trial, and peak RSS of the driver process and of the PostgreSQL
server's processes (sampled every 0.2 s), and for PostgreSQL the SQL statements per trial:
those of Optuna's RDB storage (counted with a SQLAlchemy ``after_cursor_execute`` event)
and those of ``dse.storage.PostgresDriverStorage`` on its own connection (one round trip
each). The storages run alternately ``--repeat`` times (the machine's load moves).
Target: PostgreSQL within 3x of the journal.

Usage::

    python bench/bench_storage.py                 # 300 trials, inline pool (no Ray), 2 rounds
    python bench/bench_storage.py --ray           # through 2 Ray actors, as `dse run`
    python bench/bench_storage.py --n-trials 100 --repeat 1
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
from peak_rss import PeakRSS, tree  # bench/: on sys.path when run as a script

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class Statements:
    """SQL statements while counting: Optuna's (SQLAlchemy) and the driver storage's own."""

    def __init__(self) -> None:
        import sqlalchemy
        from sqlalchemy import event

        from dse.storage import PostgresDriverStorage

        self.orm = self.own = 0
        self.on = False

        def orm(*_: Any) -> None:
            self.orm += self.on

        event.listen(sqlalchemy.engine.Engine, "after_cursor_execute", orm)
        execute = PostgresDriverStorage._execute

        def own(st: PostgresDriverStorage, *a: Any, **kw: Any) -> Any:
            self.own += self.on
            return execute(st, *a, **kw)

        PostgresDriverStorage._execute = own  # type: ignore[method-assign]


def run(tmp: Path, name: str, n_trials: int, storage: str | None, ray: bool,
        server_pid: int | None, count: Statements) -> dict[str, Any]:
    from bench.bench_driver import spec_text
    from dse.driver import Driver
    from dse.spec import parse_spec

    spec = parse_spec(spec_text(name, n_trials, 0.0, storage=storage, inline=not ray))
    count.orm = count.own = 0
    count.on = True
    with PeakRSS(lambda: [os.getpid()]) as drv, \
            PeakRSS(lambda: tree(server_pid) if server_pid else []) as srv:
        t0 = time.perf_counter()
        s = Driver(spec, tmp, progress=False).run()
        wall_s = time.perf_counter() - t0
    count.on = False
    assert s.complete == n_trials, s
    out = {
        "loop_s": round(s.loop_s, 3), "wall_s": round(wall_s, 3),
        "ms_per_trial": round(1000 * s.loop_s / n_trials, 2),
        "driver_peak_rss_mb": round(drv.peak_bytes / 2**20, 1),
    }
    if server_pid:  # whole run, set-up (schema, study) included
        out["server_peak_rss_mb"] = round(srv.peak_bytes / 2**20, 1)
        out["sql_statements_per_trial"] = round((count.orm + count.own) / n_trials, 2)
        out["own_connection_statements_per_trial"] = round(count.own / n_trials, 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-trials", type=int, default=300)
    ap.add_argument("--ray", action="store_true", help="2 Ray actors instead of the inline pool")
    ap.add_argument("--repeat", type=int, default=2, help="rounds of journal then PostgreSQL")
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
                   + (f" --n-trials {args.n_trials}" if args.n_trials != 300 else "")
                   + (f" --repeat {args.repeat}" if args.repeat != 2 else ""),
        "journal": [], "postgresql": [],
    }
    count = Statements()
    try:
        with tempfile.TemporaryDirectory() as d:
            for i in range(args.repeat):
                out["journal"].append(run(Path(d), f"bench_journal{i}", args.n_trials, None,
                                          args.ray, None, count))
                url = server.url(f"bench{i}")
                out["postgresql"].append(run(Path(d), f"bench_pg{i}", args.n_trials, url, args.ray,
                                             server.proc.pid, count))
    finally:
        server.stop()
    out["load_1min_after"] = os.getloadavg()[0]
    out["ratio_pg_over_journal"] = [round(p["loop_s"] / j["loop_s"], 2)
                                    for j, p in zip(out["journal"], out["postgresql"], strict=True)]
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
