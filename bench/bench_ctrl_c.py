"""Ctrl-C at five moments: seconds from the last press to `dse`'s exit and to its last
process gone (MLflow logging process, Ray's processes, reaper), and the peak summed RSS of
its process tree (issue 13, item 6: "exits within 2 s of the second press").

Runs ``tests/test_ctrl_c.py`` ``--repeat`` times (pytest, ``-s``), reads the line each case
prints, and prints per moment the median and worst of each, with the machine's load::

    python bench/bench_ctrl_c.py --repeat 3
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINE = re.compile(r"ctrl-c (.+): exit ([\d.]+) s, every process gone ([\d.]+) s after the last "
                  r"Ctrl-C; peak RSS (\d+) MB")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3, help="runs of the test file")
    args = ap.parse_args()
    got: dict[str, list[tuple[float, float, int]]] = defaultdict(list)
    loads: list[float] = []
    t0 = time.monotonic()
    for _ in range(args.repeat):
        loads.append(os.getloadavg()[0])
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        r = subprocess.run([sys.executable, "-m", "pytest", "tests/test_ctrl_c.py", "-q", "-s", "-p", "no:cacheprovider"],
                           cwd=ROOT, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            print(r.stdout[-3000:], r.stderr[-2000:], file=sys.stderr)
            return 1
        for m in LINE.finditer(r.stdout):
            got[m[1]].append((float(m[2]), float(m[3]), int(m[4])))
    print(f"{args.repeat} runs of tests/test_ctrl_c.py in {time.monotonic() - t0:.0f} s; load average "
          f"(1 min) at each start {', '.join(f'{x:.1f}' for x in loads)}; {os.cpu_count()} CPUs")
    print("| moment | exit after the last Ctrl-C, median / worst (s) | every process gone (s) | peak RSS (MB) |")
    print("|---|---|---|---|")
    for name, xs in got.items():
        ex, gone, rss = zip(*xs, strict=True)
        print(f"| {name} | {statistics.median(ex):.2f} / {max(ex):.2f} | {statistics.median(gone):.2f} / "
              f"{max(gone):.2f} | {max(rss)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
