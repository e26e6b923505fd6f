"""Our PLENA model against the public PLENA analytic model (the anchor), op group by op group.

    python examples/reproduce/plena_anchor.py [--anchor-repo PATH] [--model llama-3.1-8b]
        [--batch 4] [--prompt-len 2048] [--output-len 1024] [--mlen 2048 --blen 128 ...]

``--anchor-repo`` names a checkout of AICrossSim/PLENA_Simulator (its
``analytic_models/performance`` and ``plena_settings.toml`` are imported from there, not
from this repository; it needs ``pydantic`` and ``toml``). Without it only our side and our
restatement of the anchor's conventions (``simulators.plena.anchor``) are printed.

Both sides are priced at 1 GHz with free HBM (our bandwidth set to 1e12 GB/s) and no causal
skipping (the anchor computes every score block), so only the counting rules differ.
Prints Markdown: per-layer prefill cycles by the anchor's groups, the request-level TTFT and
throughput under each model's conventions, and the effect of overlapping the vector unit
with the matrix unit (``overlap_vector``) at the chosen point with real HBM.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from simulators.plena import Numerics, PlenaHardware, Workload, load_model_config, simulate  # noqa: E402
from simulators.plena.anchor import (  # noqa: E402
    ANCHOR_DECODE_FACTOR,
    anchor_head_dim,
    anchor_tokens_per_s,
    anchor_ttft_s,
)
from simulators.plena.workload import CONFIG_DIR  # noqa: E402

BF16 = Numerics("bf16", "bf16", "bf16")
#: our ops in the anchor's per-layer groups (None: the anchor has no such op)
GROUPS = {
    "rms_layer x2": ("attn_norm", "ffn_norm"),
    "projection (Q, K, V, RoPE)": ("q_proj", "k_proj", "v_proj", "rope", "qk_norm"),
    "flash_attention": ("attn_qk", "attn_softmax", "attn_pv"),
    "residual": ("residual_attn",),
    "feed_forward": ("gate_proj", "up_proj", "swiglu", "down_proj"),
    "(not in anchor) o_proj, 2nd residual": ("o_proj", "residual_ffn"),
}


def anchor_side(repo: Path, model: str, a: argparse.Namespace) -> dict[str, float]:
    """Per-layer prefill cycles by group, TTFT and TPS from the anchor's own code."""
    perf_dir = repo / "analytic_models" / "performance"
    sys.path.insert(0, str(perf_dir))
    from llama_model import LLaMAModel  # type: ignore[import-not-found]
    from perf_model import load_hardware_config_from_toml  # type: ignore[import-not-found]

    cfg = load_hardware_config_from_toml(str(repo / "plena_settings.toml"))
    cfg = cfg.model_copy(update={"MLEN": a.mlen, "BLEN": a.blen, "VLEN": a.vlen,
                                 "HLEN": a.hlen})
    lm = LLaMAModel(str(CONFIG_DIR / f"{model}.json"), cfg, str(perf_dir / "customISA_lib.json"),
                    batch_size=a.batch, input_seq_len=a.prompt_len, output_seq_len=a.output_len)
    p, S, b = lm.perf, a.prompt_len, a.batch
    out = {
        "rms_layer x2": 2 * p.rms_layer(lm.hidden_size, S, b, "prefill"),
        "projection (Q, K, V, RoPE)": p.projection(lm.hidden_size, lm.num_attention_heads,
                                                   lm.num_key_value_heads, lm.head_dim, S, b,
                                                   "prefill"),
        "flash_attention": p.flash_attention(lm.num_attention_heads, lm.num_key_value_heads,
                                             lm.head_dim, S, S, b, "prefill"),
        "residual": p.residual(lm.hidden_size, S, b, "prefill"),
        "feed_forward": p.feed_forward(lm.hidden_size, lm.intermediate_size, S, b, "prefill"),
    }
    ttft, tps = lm.compute_performance(verbose=False)
    out["ttft_s"], out["tokens_per_s"], out["head_dim"] = ttft, tps, lm.head_dim
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--anchor-repo", type=Path)
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=2048)
    ap.add_argument("--output-len", type=int, default=1024)
    ap.add_argument("--mlen", type=int, default=2048)
    ap.add_argument("--blen", type=int, default=128)
    ap.add_argument("--vlen", type=int, default=2048)
    ap.add_argument("--hlen", type=int, default=128)
    ap.add_argument("--hbm-gbps", type=float, default=2039.0,
                    help="bandwidth of the overlap measurement (the comparison uses free HBM)")
    a = ap.parse_args(argv)
    m = load_model_config(a.model)
    wl = Workload(m, a.batch, a.prompt_len, a.output_len)
    free = PlenaHardware(mlen=a.mlen, blen=a.blen, vlen=a.vlen, hlen=a.hlen, hbm_gbps=1e12,
                         clock_ghz=1.0)
    ours = simulate(free, wl, BF16, causal_skip=False)
    step = simulate(free, Workload(m, a.batch, a.prompt_len, 1), BF16, causal_skip=False)
    anchor = anchor_side(a.anchor_repo, a.model, a) if a.anchor_repo else None
    if a.anchor_repo and (a.anchor_repo / ".git").exists():
        rev = subprocess.run(["git", "-C", str(a.anchor_repo), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True).stdout.strip()
        print(f"anchor: {a.anchor_repo} at {rev}\n")
    print(f"{a.model}, batch {a.batch}, S {a.prompt_len}, O {a.output_len}; MLEN {a.mlen}, "
          f"BLEN {a.blen}, VLEN {a.vlen}, HLEN {a.hlen}; 1 GHz, free HBM, no causal skip. "
          f"head_dim: ours {m.head_dim}, anchor "
          f"{anchor_head_dim(m.hidden_size, m.num_attention_heads)}\n")
    print("| prefill group, cycles per layer | anchor | ours | ours / anchor |")
    print("|---|---|---|---|")
    ops = ours.prefill_ops
    for group, names in GROUPS.items():
        cyc = sum(float(ops[n].time_s) for n in names if n in ops) * 1e9 / m.num_hidden_layers
        if anchor and group in anchor:
            print(f"| {group} | {anchor[group]:,.0f} | {cyc:,.0f} | {cyc / anchor[group]:.3f} |")
        else:
            print(f"| {group} | - | {cyc:,.0f} | |")
    lm_cyc = float(ops["lm_head"].time_s) * 1e9
    print(f"| (not in anchor) LM head, once | - | {lm_cyc:,.0f} | |")
    prefill, decode = float(ours.prefill_s), float(ours.decode_s)
    first = float(step.decode_s)
    print("\n| request | anchor | ours, anchor conventions | ours |")
    print("|---|---|---|---|")
    conv_ttft = anchor_ttft_s(prefill, first)
    conv_tps = anchor_tokens_per_s(a.batch, a.output_len, decode)
    a_ttft = f"{anchor['ttft_s']:.4f}" if anchor else "-"
    a_tps = f"{anchor['tokens_per_s']:,.0f}" if anchor else "-"
    print(f"| TTFT, s | {a_ttft} | {conv_ttft:.4f} | {float(ours.ttft_s):.4f} |")
    print(f"| tokens/s | {a_tps} | {conv_tps:,.0f} | {float(ours.tokens_per_s):,.0f} |")
    print(f"\nanchor conventions: decode x{ANCHOR_DECODE_FACTOR}, TTFT = prefill + one "
          "doubled decode step, tokens/s over decode time only.\n")
    real = PlenaHardware(mlen=a.mlen, blen=a.blen, vlen=a.vlen, hlen=a.hlen,
                         hbm_gbps=a.hbm_gbps, clock_ghz=1.0)
    mx = Numerics("mxint4", "mxint8", "mxint4")
    print(f"| overlap_vector at {a.hbm_gbps:g} GB/s, MX formats | TTFT s | TPOT ms | tokens/s |")
    print("|---|---|---|---|")
    for ov in (False, True):
        r = simulate(real, wl, mx, overlap_vector=ov)
        print(f"| {'pipelined' if ov else 'serial'} | {float(r.ttft_s):.4f} | "
              f"{float(r.tpot_s) * 1e3:.3f} | {float(r.tokens_per_s):,.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
