"""The public PLENA analytic model (the anchor): the counts and conventions we compare with.

AICrossSim/PLENA_Simulator, ``analytic_models/performance`` (``perf_model.py`` +
``llama_model.py``, read at commits b4bbd8f / 6833ca7, April 2026) and
``analytic_models/utilisation/utilisation_model.py``. Only what docs/simulators.md's anchor
table quotes is restated here, each with the anchor's own rule:

* GEMM: ``ceil(rows/BLEN) * ceil(K/MLEN) * ceil(N/BLEN) * BLEN`` cycles (``M_MM`` = BLEN
  pipelined); HBM transfers free. Our model meets this count exactly (tested).
* Decode: every decode instruction count is multiplied by 2 ("instruction issue + memory
  access pipeline stages"), :data:`ANCHOR_DECODE_FACTOR`.
* TTFT = prefill + one decode step (itself doubled); TPS = batch * O / decode time (the
  prefill is left out of the throughput).
* head_dim = hidden_size // num_attention_heads, whatever ``config.json`` says (Qwen3-32B:
  80 instead of its 128).
* Softmax: the latency model charges, per query head, key tile and query tile,
  ``min(MLEN, kv_len)`` rows of 13 scalar/vector instructions (online softmax
  ``4 V_BASIC + 2 S_BASIC + S_EXP_FP`` = 7 plus output scaling ``V_BASIC + 4 + S_RECI_FP``
  = 6, every latency 1 cycle in ``plena_settings.toml``); the utilisation model's
  ``10 * MLEN`` per score block is a different (utilisation) quantity.
* Omitted: W_O, the second residual add, the LM head; K and V projections reduce over
  ``nkv * head_dim`` instead of ``hidden``; the Q projection's width is ``hidden`` (not
  ``nh * head_dim``).
"""

from __future__ import annotations

import math

#: the anchor multiplies every decode instruction count by this
ANCHOR_DECODE_FACTOR = 2
#: cycles per score row (of min(MLEN, kv_len) rows) per key tile per query tile per query
#: head in the anchor's prefill flash-attention latency (7 online softmax + 6 scaling)
ANCHOR_SOFTMAX_CYCLES_PER_ROW = 13
#: the anchor's utilisation model: softmax cycles per MLEN x MLEN score block, in MLENs
ANCHOR_UTILISATION_SOFTMAX_MLENS = 10


def anchor_gemm_cycles(rows: int, k: int, n: int, mlen: int, blen: int) -> int:
    """Cycles of one GEMM in the public PLENA analytic model."""
    return math.ceil(rows / blen) * math.ceil(k / mlen) * math.ceil(n / blen) * blen


def anchor_head_dim(hidden_size: int, num_attention_heads: int) -> int:
    """The anchor's head_dim: ``hidden_size // num_attention_heads`` (config ignored)."""
    return hidden_size // num_attention_heads


def anchor_prefill_softmax_cycles(q_len: int, kv_len: int, heads: int, kv_heads: int,
                                  batch: int, mlen: int) -> int:
    """Softmax + output-scaling cycles of one layer's prefill attention in the anchor:
    ``13 * min(mlen, kv_len) * (heads // kv_heads) * ceil(q_len/mlen) * ceil(kv_len/mlen)
    * kv_heads * batch`` (no causal skipping, not divided by any vector width)."""
    return (ANCHOR_SOFTMAX_CYCLES_PER_ROW * min(mlen, kv_len) * (heads // kv_heads)
            * math.ceil(q_len / mlen) * math.ceil(kv_len / mlen) * kv_heads * batch)


def anchor_utilisation_softmax_cycles(q_len: int, kv_len: int, head_groups: int,
                                      mlen: int) -> int:
    """Softmax cycles of one layer in the anchor's *utilisation* model:
    ``10 * mlen`` per (query tile, key tile) block per packed head group."""
    return (ANCHOR_UTILISATION_SOFTMAX_MLENS * mlen * head_groups
            * math.ceil(q_len / mlen) * math.ceil(kv_len / mlen))


def anchor_ttft_s(prefill_s: float, first_step_s: float) -> float:
    """TTFT, s, as the anchor reports it: prefill plus one decode step counted twice."""
    return prefill_s + ANCHOR_DECODE_FACTOR * first_step_s


def anchor_tokens_per_s(batch: int, output_len: int, decode_s: float) -> float:
    """Throughput as the anchor reports it: ``batch * O / (2 * decode_s)`` tokens/s, where
    ``decode_s`` is the undoubled decode time; the prefill is not in the denominator."""
    return batch * output_len / (ANCHOR_DECODE_FACTOR * decode_s)
