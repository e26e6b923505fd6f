"""Tracking overhead benchmark (run on purpose, not by pytest): does MLflow slow the search?

2,000 instant ZDT1 trials through the inline pool (no Ray; the evaluator takes
microseconds, so any tracking cost shows), ``child_runs = "all"``, with tracking off and
on (a fresh SQLite MLflow store per run). Reports per run: the search loop in ms per trial
(``RunSummary.loop_s``), the end-of-run drain (``finish_s``: waiting for the logging
process to log what is queued, the final artifacts, closing the parent run) as seconds
and as a share of the wall time, and the peak summed RSS of the driver and its children
(the logging process), sampled every 0.2 s; and CPU time (``getrusage``), which a loaded
machine inflates less than wall time: the driver's per trial, and the logging process's
in all (a child's CPU is counted once it has been waited for).

``--per-run`` times one child run's logging alone (MlflowLink.log_trials on a fresh store,
in this process): MLflow's public API against the bulk SQLite writer
(tracking/mlflow_sql.py) in batches of 1 and 50; with ``--server`` also against a real
``mlflow server`` (1 worker) with 1 and 4 client threads.

Usage::

    python bench/bench_tracking.py              # 2,000 trials, tracking off then on
    python bench/bench_tracking.py --trials 500
    python bench/bench_tracking.py --per-run 200 [--server]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil
from peak_rss import PeakRSS  # run as `python bench/...`: bench/ is on sys.path

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
        load0 = psutil.getloadavg()[0]
        me0, kids0 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        with PeakRSS() as peak:
            t0 = time.monotonic()
            d = Driver(spec, root, n_trials=n, address="inline", tracking=tracking, progress=False)
            s = d.run()
            wall_s = time.monotonic() - t0
            if d._tracking is not None and d._tracking._proc is not None:  # (the driver waits for its
                d._tracking._proc.join(30)  # status, not its exit; its CPU counts once waited for)
        me1, kids1 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        assert s.complete == n, s
        extra = {"final_artifacts_s": _final_artifacts_s(spec, root / spec.name)} if tracking else {}
        return extra | {
            "tracking": tracking, "trials": n, "wall_s": round(wall_s, 2), "setup_s": round(s.setup_s, 2),
            "loop_ms_per_trial": round(1000 * s.loop_s / n, 2), "drain_s": round(s.finish_s, 2),
            "drain_share": round(s.finish_s / wall_s, 3), "peak_rss_mb": round(peak.peak_bytes / 2**20),
            "driver_cpu_ms_per_trial": round(1000 * _cpu(me1, me0) / n, 2),
            "logging_cpu_s": round(_cpu(kids1, kids0), 2),
            "load": [round(load0, 1), round(psutil.getloadavg()[0], 1)],
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _final_artifacts_s(spec: Any, sdir: Path) -> float:
    """Wall seconds of the drain's largest fixed part, the final artifact step's tables and
    plots (``write_artifacts`` on the study's trials, here, the second of two calls)."""
    import optuna

    from dse import storage
    from dse.spec import study_info
    from tracking.artifacts import write_artifacts

    trials = optuna.load_study(study_name=spec.name, storage=storage.open_storage(None, sdir)).trials
    info = study_info(spec, sdir)
    for _ in range(2):
        t0 = time.monotonic()
        write_artifacts(trials, info, sdir / "artifacts-bench", plots=True)
    return round(time.monotonic() - t0, 2)


def _cpu(a: Any, b: Any) -> float:
    """User + system CPU seconds between two ``getrusage`` results."""
    return a.ru_utime + a.ru_stime - b.ru_utime - b.ru_stime


def _trials(n: int, spec: Any) -> list[Any]:
    """``n`` COMPLETE ZDT1 trials of ``spec`` (2 variables, 2 objectives)."""
    import optuna

    from dse.spec import sample_params

    study = optuna.create_study(directions=spec.directions, sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(n):
        t = study.ask()
        p = sample_params(t, spec)
        x = [float(v) for v in p.values()]
        f1, f2 = x[0], 1 + 9 * sum(x[1:]) / max(1, len(x) - 1)
        t.set_user_attr("metrics", {"f1": f1, "f2": f2})
        study.tell(t, [f1, f2])
    return [t for t in study.trials if t.state.name == "COMPLETE"]


def _server(db: Path, port: int) -> subprocess.Popen[bytes]:
    """A real ``mlflow server`` (1 worker, job execution off) on 127.0.0.1:port."""
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{db}",
         "--artifacts-destination", str(db.parent / "mlartifacts"), "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    for _ in range(600):
        try:
            if opener.open(f"http://127.0.0.1:{port}/health", timeout=2).status == 200:
                return proc
        except OSError:
            time.sleep(0.5)
    raise RuntimeError("mlflow server did not start")


def per_run(n: int, server: bool) -> None:
    """Milliseconds (wall and CPU of this process) per child run, each way of logging."""
    from dse.spec import load_spec, study_info
    from tracking import mlflow_tracker as mt

    spec = load_spec(ROOT / "examples" / "zdt1.toml")
    trials = _trials(n, spec)
    root = Path(tempfile.mkdtemp(prefix="dse-bench-perrun-"))
    cases: list[tuple[str, str | None, bool, int, int]] = [
        ("sqlite, public API (create_run + log_batch + set_terminated)", None, False, 1, 1),
        ("sqlite, bulk (mlflow_sql), 1 run per transaction", None, True, 1, 1),
        ("sqlite, bulk (mlflow_sql), 50 runs per transaction", None, True, 50, 1),
    ]
    proc = None
    try:
        if server:
            port = 5987
            proc = _server(root / "server.db", port)
            uri = f"http://127.0.0.1:{port}"
            cases += [("mlflow server (1 worker), public API, 1 thread", uri, False, 1, 1),
                      ("mlflow server (1 worker), public API, 4 threads", uri, False, 50, 4)]
        for k, (what, uri, bulk, batch, threads) in enumerate(cases):
            spec.name = f"perrun-{k}"
            info = study_info(spec, root, storage_desc="bench", uri=uri)
            mt.HTTP_THREADS = threads
            link = mt.MlflowLink(info, root, bulk=bulk)
            link.connect()
            w0, c0 = time.monotonic(), time.process_time()
            for i in range(0, len(trials), batch):
                assert link.log_trials(trials[i : i + batch]) == []
            w, c = time.monotonic() - w0, time.process_time() - c0
            print(json.dumps({"case": what, "runs": len(link.logged), "ms_per_run": round(1000 * w / n, 2),
                              "cpu_ms_per_run": round(1000 * c / n, 2),
                              "load": round(psutil.getloadavg()[0], 1)}), flush=True)
    finally:
        if proc is not None:
            os.killpg(proc.pid, 9)
            proc.wait()
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=2000)
    ap.add_argument("--per-run", type=int, default=0, metavar="N", help="time N child runs each way instead")
    ap.add_argument("--server", action="store_true", help="with --per-run: also against an mlflow server")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print(f"load {psutil.getloadavg()[0]:.1f}, {psutil.cpu_count()} cores, {time.strftime('%Y-%m-%d %H:%M')}")
    if args.per_run:
        per_run(args.per_run, args.server)
        return
    for tracking in (False, True):
        print(json.dumps(one_run(args.trials, tracking)), flush=True)


if __name__ == "__main__":
    main()
