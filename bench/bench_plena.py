"""Benchmark: PLENA simulator speed (one evaluation, 10,000 points vectorised), the dse
evaluator, the systolic core, and optionally SCALE-Sim itself on the same GEMMs.

Run from the repository root::

    python bench/bench_plena.py [--scalesim /path/to/venv/bin/python]

``--scalesim`` names a Python that has ``scalesim`` installed (a throwaway venv:
``python -m venv /tmp/ss && /tmp/ss/bin/pip install scalesim==3.0.0 'numpy<2.4'``); the
GEMMs of the reference cases are then run through SCALE-Sim in that interpreter and timed.
Prints a Markdown table; results go to docs/benchmarks.md by hand.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repo's packages, whatever the install state

import numpy as np  # noqa: E402

from simulators.plena import Numerics, PlenaHardware, Workload, simulate  # noqa: E402
from simulators.systolic import gemm  # noqa: E402


def _times(fn, n: int) -> list[float]:  # type: ignore[no-untyped-def]
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def _row(name: str, times: list[float], note: str = "") -> str:
    med, best = statistics.median(times), min(times)
    return f"| {name} | {med * 1e3:.3f} | {best * 1e3:.3f} | {len(times)} | {note} |"


def _random_hw(n: int, seed: int = 0) -> PlenaHardware:
    rng = np.random.default_rng(seed)
    return PlenaHardware(
        mlen=rng.choice([256, 512, 1024, 2048, 4096], n), blen=rng.choice([4, 8, 16, 32, 64, 128], n),
        vlen=rng.choice([512, 1024, 2048, 4096], n), hlen=128,
        matrix_sram_bytes=rng.choice([2**22, 2**24, 2**27], n),
        vector_sram_bytes=rng.choice([2**22, 2**24, 2**27], n),
        hbm_gbps=rng.uniform(400, 3200, n), hbm_gb=rng.uniform(16, 128, n),
        clock_ghz=rng.uniform(0.8, 1.6, n))


SCALESIM_SCRIPT = textwrap.dedent('''
    import json, sys, time, os, tempfile, contextlib, io
    from scalesim.scale_sim import scalesim
    cases = json.loads(sys.argv[1])
    out = []
    for c in cases:
        d = tempfile.mkdtemp()
        cfg = os.path.join(d, "c.cfg"); topo = os.path.join(d, "t.csv")
        open(cfg, "w").write(f"""[general]
    run_name = bench
    [architecture_presets]
    ArrayHeight:    {c['rows']}
    ArrayWidth:     {c['cols']}
    IfmapSramSzkB:    64
    FilterSramSzkB:   64
    OfmapSramSzkB:    64
    IfmapOffset:    0
    FilterOffset:   10000000
    OfmapOffset:    20000000
    Bandwidth : 10
    Dataflow : {c['df']}
    MemoryBanks:   1
    ReadRequestBuffer: 32
    WriteRequestBuffer: 32
    [layout]
    IfmapCustomLayout: False
    FilterCustomLayout: False
    IfmapSRAMBankBandwidth: 10
    IfmapSRAMBankNum: 10
    IfmapSRAMBankPort: 2
    FilterSRAMBankBandwidth: 10
    FilterSRAMBankNum: 10
    FilterSRAMBankPort: 2
    [sparsity]
    SparsitySupport : false
    SparseRep : ellpack_block
    OptimizedMapping : false
    BlockSize : 8
    RandomNumberGeneratorSeed : 40
    [run_presets]
    InterfaceBandwidth: CALC
    UseRamulatorTrace: False
    """)
        open(topo, "w").write(f"Layer, M, N, K,\\nl0, {c['M']}, {c['N']}, {c['K']},\\n")
        t = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            s = scalesim(save_disk_space=True, verbose=False, config=cfg, topology=topo, layout=topo,
                         input_type_gemm=True)
            s.run_scale(top_path=d)
        out.append(time.perf_counter() - t)
    print(json.dumps(out))
''')


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scalesim", help="python interpreter with scalesim installed")
    ap.add_argument("--reps", type=int, default=200)
    args = ap.parse_args()

    wl = Workload.of("llama-3.1-8b", batch=4, prompt_len=32768, output_len=1024)
    mx = Numerics("mxint4", "mxint8", "mxint4")
    rows = ["| what | median ms | best ms | runs | note |", "|---|---|---|---|---|"]
    t0 = time.perf_counter()
    simulate(PlenaHardware(), wl, mx)
    rows.append(_row("first PLENA eval (builds and caches the op graphs)",
                     [time.perf_counter() - t0], "cold"))
    rows.append(_row("PLENA eval, llama-3.1-8b S=32k O=1k batch 4",
                     _times(lambda: simulate(PlenaHardware(), wl, mx), args.reps),
                     "target <= 1 ms"))
    hw = _random_hw(10_000)
    simulate(hw, wl, mx)
    tracemalloc.start()
    vec = _times(lambda: simulate(hw, wl, mx), 5)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rows.append(_row("PLENA, 10,000 hardware points vectorised", vec,
                     f"target <= 1 s; numpy peak {peak / 2**20:.0f} MiB"))
    from dse.plugins.plena import plena  # the dse adapter (validation + metrics dict)
    from dse.registry import EvalContext
    ev = plena({"model": "llama-3.1-8b", "batch": 4, "prompt_len": 32768,
                "output_len": 1024}, EvalContext(Path(tempfile.gettempdir())))
    params = {"hw.mlen": 2048, "hw.blen": 32, "hw.hbm_gbps": 2000.0,
              "quant.weights": "mxint4", "quant.acts": "mxint8", "quant.kv": "mxint4"}
    rows.append(_row("dse `plena` evaluator evaluate()",
                     _times(lambda: ev.evaluate(params, {}), args.reps), ""))

    ref = json.loads((ROOT / "tests" / "reference" / "scalesim_cases.json").read_text())
    cases = []
    for r in ref["results"]:
        g = ref["cases"][r["case"]]["gemm_equiv"]
        R, C = (int(x) for x in r["array"].split("x"))
        cases.append({"M": g["M"], "K": g["K"], "N": g["N"], "rows": R, "cols": C,
                      "df": r["dataflow"]})
    one = _times(lambda: [gemm(c["M"], c["K"], c["N"], c["rows"], c["cols"], c["df"])
                          for c in cases], 20)
    rows.append(_row(f"systolic.gemm, the {len(cases)} reference GEMMs one by one", one, ""))
    if args.scalesim:
        pick = [c for c in cases if c["M"] * c["K"] * c["N"] <= 10**6][:6]  # SCALE-Sim is slow
        out = subprocess.run([args.scalesim, "-c", SCALESIM_SCRIPT, json.dumps(pick)],
                             capture_output=True, text=True, check=True, timeout=500)
        ss = json.loads(out.stdout.strip().splitlines()[-1])
        ours = _times(lambda: [gemm(c["M"], c["K"], c["N"], c["rows"], c["cols"], c["df"])
                               for c in pick], 20)
        desc = ", ".join(f"{c['M']}x{c['K']}x{c['N']}@{c['rows']}x{c['cols']}/{c['df']}"
                         for c in pick)
        rows.append(_row(f"SCALE-Sim 3.0.0, {len(pick)} GEMMs ({desc})", [sum(ss)], "one run"))
        rows.append(_row(f"systolic.gemm, the same {len(pick)} GEMMs", ours,
                         f"{sum(ss) / statistics.median(ours):.0f}x faster"))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("\n".join(rows))
    print(f"\npeak RSS {rss:.0f} MiB (process, incl. torch imported by quant)")


if __name__ == "__main__":
    main()
