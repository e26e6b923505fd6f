"""Peak summed RSS: :class:`PeakRSS` for the benchmarks (``from peak_rss import PeakRSS``:
they run as ``python bench/X.py``, so ``bench/`` is on ``sys.path``), and a command line
that runs a command and reports its wall time and the peak summed RSS of it and its
descendants.

Usage::

    python bench/peak_rss.py dse run examples/quickstart.toml

Samples with psutil (shared pages count once per process, so a sum is an upper bound).
Prints one line: exit code, wall seconds, peak MB, process count, load.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable

import psutil


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (``[]`` once it is gone)."""
    try:
        p = psutil.Process(pid)
        return [pid, *(c.pid for c in p.children(recursive=True))]
    except psutil.Error:
        return []


def rss_bytes(pids: Iterable[int]) -> int:
    """Summed RSS (bytes) of ``pids``; processes that are gone count 0."""
    total = 0
    for pid in pids:
        try:
            total += psutil.Process(pid).memory_info().rss
        except psutil.Error:
            pass
    return total


class PeakRSS:
    """Peak summed RSS (``peak_bytes``) of the processes ``pids()`` names at each sample,
    every ``period_s`` seconds while the ``with`` block runs; by default this process and
    all its descendants."""

    def __init__(self, pids: Callable[[], Iterable[int]] | None = None, period_s: float = 0.2) -> None:
        self.pids = pids or (lambda: tree(os.getpid()))
        self.period_s = period_s
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, rss_bytes(self.pids()))
            self._stop.wait(self.period_s)

    def __enter__(self) -> PeakRSS:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()


def main() -> int:
    """Run ``sys.argv[1:]`` and print the measurement; returns the command's exit code."""
    if len(sys.argv) < 2:
        print("usage: python bench/peak_rss.py COMMAND [ARGS...]", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    p = subprocess.Popen(sys.argv[1:])
    peak = peak_n = 0
    while p.poll() is None:
        procs = tree(p.pid)
        total = rss_bytes(procs)
        if total > peak:
            peak, peak_n = total, len(procs)
        time.sleep(0.5)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"rc {p.returncode}; wall {time.perf_counter() - t0:.1f} s; peak summed RSS "
          f"{peak / 2**20:.0f} MB over {peak_n} processes; load average {load}", flush=True)
    return p.returncode


if __name__ == "__main__":
    sys.exit(main())
