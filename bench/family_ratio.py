"""Perplexity against ``quant.ratio`` for the three sizes of the ``char_lm`` family.

The question of arXiv 2410.06722 (do larger models tolerate a higher share of weights in a
low-precision format?) asked of ``char_lm_s|m|l``: for each size, each layer-selection
rule and each ratio, perplexity and KL to the unquantized model on the default evaluation
split (4,096 held-out characters), the rest of the weights in bf16, activations and KV
unquantized. One torch thread; prints a markdown table and the CPU time.

Usage::

    python bench/family_ratio.py                       # int3, depth and sensitivity
    python bench/family_ratio.py --low int4 --rules depth --ratios 0.5 1
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--low", default="int3", help="the low-precision weight format")
    ap.add_argument("--rules", nargs="+", default=["depth", "sensitivity"])
    ap.add_argument("--ratios", nargs="+", type=float, default=[0.25, 0.5, 0.75, 1.0])
    ap.add_argument("--sizes", nargs="+", default=["char_lm_s", "char_lm_m", "char_lm_l"])
    args = ap.parse_args()

    import torch

    from evaluators.lm import CharLMEvaluator

    torch.set_num_threads(1)
    c0, t0 = time.process_time(), time.perf_counter()
    head = " | ".join(f"r = {r:g}: share / ppl / KL" for r in args.ratios)
    print(f"| model (params) | fp32 ppl | rule | {head} |")
    print("|---|---|---|" + "---|" * len(args.ratios))
    for size in args.sizes:
        ev = CharLMEvaluator(model=size)
        n = sum(p.numel() for p in ev.model.parameters())
        fp = ev.unquantized_metrics()["perplexity"]
        for rule in args.rules:
            cells = []
            for r in args.ratios:
                m = ev.evaluate({"quant.weights": args.low, "quant.ratio": r,
                                 "quant.ratio_rule": rule})
                cells.append(f"{m['quant_ratio_params']:.2f} / {m['perplexity']:.3f} / "
                             f"{m['kl_to_fp_nats']:.3f}")
            print(f"| {size} ({n / 1e6:.2f} M) | {fp:.3f} | {rule} | {' | '.join(cells)} |",
                  flush=True)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\nlow format {args.low}, rest bf16; CPU {time.process_time() - c0:.1f} s, wall "
          f"{time.perf_counter() - t0:.1f} s, peak RSS {rss:.0f} MB")


if __name__ == "__main__":
    main()
