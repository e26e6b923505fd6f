"""Cluster benchmark: a study on 2 Ray nodes against 1 node (run on purpose, not by pytest).

Real Ray nodes on this machine, each in its own network namespace (``clusters/netns.py``;
needs root and iproute2), 1 CPU each. The same study (ZDT1, an evaluator sleeping
``--delay-s`` = 0.5 s per trial, random sampler, no tracking) runs

1. on the head node alone with 1 worker (one actor), and
2. on head + worker node with 2 workers (one actor per node),

driven by ``dse.driver.Driver`` inside the head node's namespace, joining the cluster by
address (as ``dse run --address`` does). Throughput = trials / loop time (first ask to
last tell; Ray connect and actor start-up are reported apart). Target: 2 nodes >= 1.9x
the throughput of 1. Peak memory: the summed RSS of every process in the namespaces (Ray
GCS, raylets, agents, actors, the driver), sampled every 0.2 s (an upper bound: shared
pages count twice).

Usage::

    sudo python bench/bench_cluster.py              # 32 trials per run (~1.5 min)
    sudo python bench/bench_cluster.py --trials 64
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "clusters"))
import netns  # noqa: E402  (clusters/netns.py)
from peak_rss import PeakRSS  # noqa: E402  (bench/: on sys.path when run as a script)

DRIVE = """
import json, sys
from pathlib import Path
from dse.driver import Driver
from dse.spec import parse_spec
spec = parse_spec(Path(sys.argv[1]).read_text())
s = Driver(spec, sys.argv[2], address=sys.argv[3], progress=False).run()
print(json.dumps({"complete": s.complete, "running": s.running, "setup_s": s.setup_s,
                  "loop_s": s.loop_s, "wall_s": s.wall_s}))
"""


def run_once(two_nodes: bool, n_trials: int, delay_s: float, work: Path) -> dict[str, Any]:
    """One study on a fresh 1- or 2-node cluster; its summary, throughput and peak RSS."""
    from dse.plugins.benchmarks import study_spec

    workers = 2 if two_nodes else 1
    name = f"cluster{workers}"
    spec = work / f"{name}.toml"
    spec.write_text(study_spec(name, n_trials=n_trials, sampler="random", workers=workers,
                               options={"delay_s": delay_s}, tracking={"enabled": False}))
    with netns.TwoNodes(cpus=1, workers=two_nodes) as nodes:
        used = [nodes.head, nodes.worker] if two_nodes else [nodes.head]
        with PeakRSS(lambda: [p for n in used for p in n.pids()]) as rss:
            proc = nodes.popen([sys.executable, "-c", DRIVE, str(spec), str(work / "studies"),
                                nodes.address], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, cwd=work)
            out, err = proc.communicate(timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"driver failed ({proc.returncode}): {err[-2000:]}")
        res: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    res.update(nodes=2 if two_nodes else 1, workers=workers, n_trials=n_trials,
               trials_per_s=n_trials / res["loop_s"], ideal_loop_s=n_trials * delay_s / workers,
               peak_rss_mb=rss.peak_bytes / 2**20)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=32)
    ap.add_argument("--delay-s", type=float, default=0.5)
    args = ap.parse_args()
    if why := netns.unavailable():
        print(f"bench_cluster: {why}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="dse-bench-cluster-") as tmp:
        one = run_once(False, args.trials, args.delay_s, Path(tmp))
        two = run_once(True, args.trials, args.delay_s, Path(tmp))
    for r in (one, two):
        print(f"{r['nodes']} node(s), {r['workers']} worker(s): {r['complete']} COMPLETE "
              f"{r['running']} RUNNING; loop {r['loop_s']:.2f} s (ideal {r['ideal_loop_s']:.2f}), "
              f"{r['trials_per_s']:.2f} trials/s; setup {r['setup_s']:.1f} s; "
              f"peak RSS {r['peak_rss_mb']:.0f} MB")
    speedup = two["trials_per_s"] / one["trials_per_s"]
    print(f"speed-up 2 nodes / 1 node: {speedup:.2f}x (target >= 1.9x); "
          f"load {os.getloadavg()[0]:.1f}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    return 0 if speedup >= 1.9 else 1


if __name__ == "__main__":
    sys.exit(main())
