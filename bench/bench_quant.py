"""Fake-quant throughput of quant formats vs the per-tensor int floor ``torch.round(x/s)*s``.

Each method runs in its own child process (so its peak memory is its own): the child
allocates a 4096 x 4096 float32 tensor, measures the extra peak RSS of one quantize call
(ru_maxrss after minus before, MiB), then times the method and the floor interleaved
(``--reps`` each, median), one torch thread. Prints a Markdown table.

    python bench/bench_quant.py [--formats mxint8 mxfp4_e2m1] [--reps 7] [--size 4096]
    python bench/bench_quant.py --device cuda   # GPU: synchronised timing, peak = CUDA
                                                # max_memory_allocated minus the input
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere

FLOOR = "floor"


def _child(method: str, size: int, reps: int, device: str) -> dict[str, float]:
    import torch

    import quant

    torch.set_num_threads(1)
    cuda = device.startswith("cuda")
    x = torch.randn(size, size, generator=torch.Generator().manual_seed(0)).to(device)
    s = max(float(x.amax()), -float(x.amin())) / 127.0  # no tensor-sized temporary

    def floor() -> torch.Tensor:
        return torch.round(x / s) * s

    fmt = None if method == FLOOR else quant.get_format(method)

    def fn() -> torch.Tensor:
        return floor() if fmt is None else fmt.quantize(x)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    if cuda:
        for _ in range(3):  # warm-up: kernels, allocator
            fn()
        sync()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        sync()
        peak_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        fn()
        peak_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024.0
    t_m: list[float] = []
    t_f: list[float] = []
    inner = 20 if cuda else 1
    for _ in range(reps):
        for f, ts in ((fn, t_m), (floor, t_f)):
            sync()
            t0 = time.perf_counter()
            for _ in range(inner):
                f()
            sync()
            ts.append((time.perf_counter() - t0) / inner)
    med_m, med_f = statistics.median(t_m), statistics.median(t_f)
    return {"method": method, "time_s": med_m, "floor_time_s": med_f,
            "elems_per_s": size * size / med_m, "ratio_to_floor": med_m / med_f,
            "extra_peak_rss_mib": peak_mib}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--formats", nargs="+", default=["mxint8", "mxfp4_e2m1", "mxfp8_e4m3",
                                                     "int8", "int4(asym,group=128)"])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(_child(a.child, a.size, a.reps, a.device)))
        return
    rows = []
    for m in [FLOOR, *a.formats]:
        out = subprocess.run([sys.executable, __file__, "--child", m, "--size", str(a.size),
                              "--reps", str(a.reps), "--device", a.device],
                             capture_output=True, text=True,
                             check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    mem = "extra peak CUDA memory" if a.device.startswith("cuda") else "extra peak RSS"
    print(f"tensor {a.size}x{a.size} float32 on {a.device}, 1 torch thread, median of {a.reps}")
    print("| method | time (ms) | floor time same run (ms) | Melem/s | x floor | "
          f"{mem} (MiB) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| `{r['method']}` | {r['time_s'] * 1e3:.2f} | {r['floor_time_s'] * 1e3:.2f} | "
              f"{r['elems_per_s'] / 1e6:.1f} | {r['ratio_to_floor']:.2f} | "
              f"{r['extra_peak_rss_mib']:.0f} |")


if __name__ == "__main__":
    main()
