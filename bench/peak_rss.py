"""Run a command; report its wall time and the peak summed RSS of it and its descendants.

Usage::

    python bench/peak_rss.py dse run examples/quickstart.toml

Samples every 0.5 s with psutil (shared pages count once per process, so the sum is an
upper bound). Prints one line: exit code, wall seconds, peak MB, process count, load.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil


def main() -> int:
    """Run ``sys.argv[1:]`` and print the measurement; returns the command's exit code."""
    if len(sys.argv) < 2:
        print("usage: python bench/peak_rss.py COMMAND [ARGS...]", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    p = subprocess.Popen(sys.argv[1:])
    root = psutil.Process(p.pid)
    peak = peak_n = 0
    while p.poll() is None:
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            procs = []
        total = 0
        for q in procs:
            try:
                total += q.memory_info().rss
            except psutil.Error:
                pass
        if total > peak:
            peak, peak_n = total, len(procs)
        time.sleep(0.5)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"rc {p.returncode}; wall {time.perf_counter() - t0:.1f} s; peak summed RSS "
          f"{peak / 2**20:.0f} MB over {peak_n} processes; load average {load}", flush=True)
    return p.returncode


if __name__ == "__main__":
    sys.exit(main())
