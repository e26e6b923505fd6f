"""PLENA model: anchor agreement, memory-bound decode, capacity, vectorisation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from simulators.plena import (
    ModelConfig,
    Numerics,
    PlenaBackend,
    PlenaHardware,
    Workload,
    anchor_gemm_cycles,
    load_model_config,
    shipped_models,
    simulate,
)
from simulators.plena.anchor import (
    anchor_head_dim,
    anchor_prefill_softmax_cycles,
    anchor_tokens_per_s,
    anchor_ttft_s,
    anchor_utilisation_softmax_cycles,
)
from simulators.plena.engine import stored_weight_bytes, sum_relu_affine
from simulators.plena.ops import GEMM, build_ops

BF16 = Numerics("bf16", "bf16", "bf16")
MX = Numerics("mxint4", "mxint8", "mxint4")


def test_shipped_configs_match_public_numbers() -> None:
    want = {  # (hidden, layers, heads, kv heads, head_dim, vocab, tied, params / 1e9)
        "llama-3.2-1b": (2048, 16, 32, 8, 64, 128256, True, 1.24),
        "llama-3.1-8b": (4096, 32, 32, 8, 128, 128256, False, 8.03),
        "llama-3.1-70b": (8192, 80, 64, 8, 128, 128256, False, 70.55),
        "qwen2.5-7b": (3584, 28, 28, 4, 128, 152064, False, 7.62),
        "qwen3-32b": (5120, 64, 64, 8, 128, 151936, False, 32.76),
    }
    # the char_lm family's configs are checked against the models in test_char_lm_family.py
    assert set(shipped_models()) == set(want) | {"char_lm_s", "char_lm_m", "char_lm_l"}
    for name, (h, nl, nh, nkv, hd, v, tied, bn) in want.items():
        m = load_model_config(name)
        assert (m.hidden_size, m.num_hidden_layers, m.num_attention_heads,
                m.num_key_value_heads, m.head_dim, m.vocab_size, m.tie_word_embeddings) == (
            h, nl, nh, nkv, hd, v, tied)
        assert m.n_params / 1e9 == pytest.approx(bn, abs=0.01)
    assert load_model_config("qwen3-32b").qk_norm


def test_any_config_json_and_bad_input(tmp_path) -> None:
    cfg = {"hidden_size": 512, "intermediate_size": 1024, "num_hidden_layers": 2,
           "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 1000,
           "num_local_experts": 8, "num_experts_per_tok": 2, "model_type": "mixtral"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    m = load_model_config(str(tmp_path))
    assert m.head_dim == 64 and m.num_experts == 8 and m.moe_intermediate_size == 1024
    r = simulate(PlenaHardware(), Workload(m, 2, 64, 8))
    assert r.metrics()["tokens_per_s"] > 0
    with pytest.raises(ValueError, match="workload.model"):
        load_model_config("no-such-model")
    with pytest.raises(ValueError, match="hidden_size"):
        ModelConfig.from_dict({"hidden_size": 0})
    with pytest.raises(ValueError, match="workload.batch"):
        Workload(m, 0, 8, 8)
    with pytest.raises(ValueError, match="hw.blen"):
        PlenaHardware(blen=2.5)
    with pytest.raises(ValueError, match="hw.hbm_gbps"):
        PlenaHardware(hbm_gbps=-1.0)
    with pytest.raises(ValueError, match="hw.hlen"):
        PlenaHardware(mlen=64, hlen=128)
    with pytest.raises(ValueError, match="quant.kv"):
        Numerics(kv="not_a_format")


@pytest.mark.parametrize("model", ["llama-3.1-8b", "qwen2.5-7b", "llama-3.2-1b"])
@pytest.mark.parametrize("mlen,blen", [(2048, 128), (512, 16), (1024, 4)])
def test_prefill_gemms_equal_anchor_when_bandwidth_infinite(model: str, mlen: int,
                                                            blen: int) -> None:
    m = load_model_config(model)
    batch, S = 2, 1024
    hw = PlenaHardware(mlen=mlen, blen=blen, hbm_gbps=1e12, clock_ghz=1.0)
    res = simulate(hw, Workload(m, batch, S, 4), BF16)
    h, hd, nh, nkv = m.hidden_size, m.head_dim, m.num_attention_heads, m.num_key_value_heads
    # (K, N) per projection; K and V reduce over `hidden` (the anchor uses nkv*head_dim)
    shapes = {"q_proj": (h, nh * hd), "k_proj": (h, nkv * hd), "v_proj": (h, nkv * hd),
              "o_proj": (nh * hd, h), "gate_proj": (h, m.intermediate_size),
              "up_proj": (h, m.intermediate_size), "down_proj": (m.intermediate_size, h)}
    fill = blen + math.ceil(math.log2(mlen))
    ops = res.prefill_ops
    for name, (k, n) in shapes.items():
        anchor = anchor_gemm_cycles(batch * S, k, n, mlen, blen)
        op = ops[name]
        assert str(op.bottleneck) == "compute"
        cycles_per_layer = float(op.compute_s) * 1e9 / m.num_hidden_layers
        assert cycles_per_layer == pytest.approx(anchor, rel=1e-12)
        assert float(op.time_s) * 1e9 / m.num_hidden_layers == pytest.approx(anchor + fill,
                                                                              rel=1e-12)
    # the anchor's own (too small) K/V count, for the record in docs/simulators.md
    assert anchor_gemm_cycles(batch * S, nkv * hd, nkv * hd, mlen, blen) < \
        anchor_gemm_cycles(batch * S, h, nkv * hd, mlen, blen) or h <= mlen


def test_decode_8b_batch1_is_memory_bound_at_weight_bytes_over_bandwidth() -> None:
    m = load_model_config("llama-3.1-8b")
    hw = PlenaHardware(hbm_gbps=1000.0)
    res = simulate(hw, Workload(m, 1, 512, 64), BF16)
    for name, op in res.decode_ops.items():
        if name.endswith("_proj") or name == "lm_head":
            assert str(op.bottleneck) == "memory", name
    streamed = sum(n for nm, _, n in m.weight_matrices() if nm != "embed_tokens") * 2.0
    per_token_s = streamed / (1000.0 * 1e9)
    assert float(res.tpot_s) == pytest.approx(per_token_s, rel=0.05)
    assert float(res.tpot_s) >= per_token_s


def test_more_bandwidth_never_slows() -> None:
    gbps = np.geomspace(100.0, 10000.0, 25)
    for numerics in (BF16, MX):
        for wl in (Workload.of("llama-3.1-8b", 4, 4096, 256), Workload.of("qwen3-32b", 1, 512, 32)):
            r = simulate(PlenaHardware(hbm_gbps=gbps, blen=16), wl, numerics)
            assert np.all(np.diff(r.tokens_per_s) >= 0)
            assert np.all(np.diff(r.ttft_s) <= 0) and np.all(np.diff(r.tpot_s) <= 0)


def test_capacity() -> None:
    r70 = simulate(PlenaHardware(hbm_gb=16.0), Workload.of("llama-3.1-70b", 1, 1024, 128), MX)
    assert not bool(r70.fits_memory) and r70.metrics()["fits_memory"] == 0.0
    r8 = simulate(PlenaHardware(hbm_gb=16.0), Workload.of("llama-3.1-8b", 1, 1024, 128), MX)
    assert bool(r8.fits_memory)
    # weights are stored at their exact bits per element (MXINT4: 4 + 8/32 bits)
    m = load_model_config("llama-3.1-8b")
    assert stored_weight_bytes(m, "mxint4") == pytest.approx(m.n_params * 4.25 / 8)
    assert float(r8.memory_required_bytes) > stored_weight_bytes(m, "mxint4")


def test_scalar_equals_vectorised() -> None:
    rng = np.random.default_rng(0)
    n = 40
    hw = PlenaHardware(mlen=rng.choice([256, 512, 1024, 2048], n),
                       blen=rng.choice([4, 16, 64, 128], n),
                       vlen=rng.choice([256, 1024, 2048], n),
                       hlen=rng.choice([64, 128], n),
                       matrix_sram_bytes=rng.choice([2**20, 2**24, 2**26], n),
                       vector_sram_bytes=rng.choice([2**20, 2**24], n),
                       hbm_gbps=rng.uniform(200, 4000, n), hbm_gb=rng.uniform(8, 100, n),
                       clock_ghz=rng.uniform(0.5, 2.0, n))
    wl = Workload.of("qwen2.5-7b", 3, 3000, 100)
    vec = simulate(hw, wl, MX)
    for i in range(n):
        one = simulate(PlenaHardware(**{f: float(np.asarray(getattr(hw, f))[i]) for f in (
            "mlen", "blen", "vlen", "hlen", "matrix_sram_bytes", "vector_sram_bytes",
            "hbm_gbps", "hbm_gb", "clock_ghz")}), wl, MX)
        for key, value in one.metrics().items():
            got = getattr(vec, "utilisation_overall" if key == "utilisation" else key)[i]
            assert float(got) == value, key
        for name, op in one.decode_ops.items():
            assert float(op.time_s) == float(vec.decode_ops[name].time_s[i])


@settings(max_examples=300, deadline=None)
@given(h0=st.floats(-1e3, 1e3), h1=st.floats(-50, 50), n=st.integers(1, 200))
def test_sum_relu_affine_is_exact(h0: float, h1: float, n: int) -> None:
    brute = sum(max(h0 + h1 * t, 0.0) for t in range(n))
    assert float(sum_relu_affine(np.float64(h0), np.float64(h1), n)) == pytest.approx(
        brute, rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("S,n_out,rel", [
    (4200, 250, 1e-5),  # same 3 MLEN key blocks every step: exact but for per-step ceils
    (4000, 250, 1e-2),  # crosses a block boundary: linearised between the end steps
])
def test_decode_closed_form_matches_step_loop(S: int, n_out: int, rel: float) -> None:
    from simulators.plena.engine import weight_bytes_per_element
    m = load_model_config("llama-3.1-8b")
    hw = PlenaHardware(blen=16, hbm_gbps=800.0)
    b = 2
    res = simulate(hw, Workload(m, b, S, n_out), MX)
    backend = PlenaBackend(hw)
    total = 0.0
    for L in range(S + 1, S + n_out + 1):
        g = build_ops(m, b, 1, L)
        c = backend.op_costs(g, MX, weight_bytes_per_element(g, MX.weights))
        t = np.maximum(c.compute_s, c.hbm_bytes / (800.0 * 1e9)) + c.fill_s
        total += float(np.sum(t * g.reps))
    assert float(res.decode_s) == pytest.approx(total, rel=rel)


def test_formats_and_options_move_the_numbers() -> None:
    wl = Workload.of("llama-3.1-8b", 1, 2048, 64)
    hw = PlenaHardware(blen=8, hbm_gbps=500.0)
    mx, bf = simulate(hw, wl, MX), simulate(hw, wl, BF16)
    assert float(mx.hbm_bytes) < float(bf.hbm_bytes)
    assert float(mx.tokens_per_s) > float(bf.tokens_per_s)
    assert float(mx.area_mm2) < float(bf.area_mm2)
    assert float(mx.energy_per_token_j) < float(bf.energy_per_token_j)
    skip = simulate(hw, Workload.of("llama-3.1-8b", 1, 16384, 8), MX)
    full = simulate(hw, Workload.of("llama-3.1-8b", 1, 16384, 8), MX, causal_skip=False)
    assert float(skip.ttft_s) < float(full.ttft_s)
    longer = simulate(hw, Workload.of("llama-3.1-8b", 1, 4096, 64), MX)
    assert float(longer.ttft_s) > float(mx.ttft_s) and float(longer.tpot_s) > float(mx.tpot_s)
    met = mx.metrics()
    assert 0 < met["utilisation_prefill"] <= 1 and 0 < met["utilisation_decode"] <= 1
    assert met["tokens_per_s"] == pytest.approx(64 / (met["ttft_s"] + 64 * met["tpot_s"]))
    assert all(isinstance(v, float) for v in met.values())
    g = build_ops(load_model_config("llama-3.1-8b"), 1, 1, 100)
    assert {"o_proj", "residual_ffn", "lm_head", "final_norm", "rope"} <= set(g.names)
    assert int(np.sum(g.kind == GEMM)) == 8


TINY = ModelConfig(name="tiny", hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                   num_attention_heads=2, num_key_value_heads=2, head_dim=128, vocab_size=256)
TINY_HW = PlenaHardware(mlen=256, blen=16, vlen=64, hlen=128, hbm_gbps=1e12, clock_ghz=1.0)


def test_overlap_vector_hand_computed() -> None:
    # One layer, 16 prompt tokens, bandwidth ~infinite, 1 GHz. Matrix fill 16 + log2 256 = 24,
    # vector fill log2 64 = 6 cycles. Matrix unit per layer: q, k, v, o 1*1*16*16 + 24 = 280
    # each; gate, up, down 2*16*16 + 24 = 536 each (down: ceil(512/256) = 2 K tiles);
    # QK^T 1 head pass * 16 + 24 = 40; PV 2 heads * 16 * ceil(128/16) + 24 = 280 -> 3048.
    # Vector unit: 2 RMSNorms 16*256*4/64 + 6 = 262, RoPE 16*512*3/64 + 6 = 390, softmax
    # 2*16*16*4/64 + 6 = 38, 2 residuals 16*256/64 + 6 = 70, SwiGLU 16*512*5/64 + 6 = 646
    # -> 1738. Once per pass: LM head 280 (matrix), final norm 256*4/64 + 6 = 22 (vector).
    bf = Numerics("bf16", "bf16", "bf16")
    wl = Workload(TINY, 1, 16, 1)
    serial = simulate(TINY_HW, wl, bf)
    piped = simulate(TINY_HW, wl, bf, overlap_vector=True)
    assert float(serial.prefill_s) * 1e9 == pytest.approx(3048 + 1738 + 280 + 22, rel=1e-9)
    assert float(piped.prefill_s) * 1e9 == pytest.approx(max(3048, 1738) + max(280, 22),
                                                         rel=1e-9)
    # per-op times are each op's own, either way
    assert float(piped.prefill_ops["swiglu"].time_s) * 1e9 == pytest.approx(646, rel=1e-9)
    assert float(piped.ttft_s) == float(piped.prefill_s)


def test_overlap_vector_bounds_and_vectorises() -> None:
    rng = np.random.default_rng(1)
    n = 24
    hw = PlenaHardware(mlen=rng.choice([512, 2048, 4096], n), blen=rng.choice([8, 32, 128], n),
                       vlen=rng.choice([256, 1024, 4096], n), hbm_gbps=rng.uniform(300, 4000, n),
                       vector_sram_bytes=rng.choice([2**20, 2**24], n))
    for wl in (Workload.of("llama-3.1-8b", 2, 8192, 64), Workload.of("qwen3-32b", 1, 2048, 16)):
        serial = simulate(hw, wl, MX)
        piped = simulate(hw, wl, MX, overlap_vector=True)
        assert np.all(piped.prefill_s <= serial.prefill_s)
        assert np.all(piped.decode_s <= serial.decode_s)
        for table, total in ((piped.prefill_table, piped.prefill_s),
                             (piped.decode_table, piped.decode_s)):
            assert np.all(total >= np.sum(table.memory_s, axis=0) * (1 - 1e-12))
        for i in (0, 7, 23):
            one = simulate(PlenaHardware(**{f: float(np.asarray(getattr(hw, f))[i]) for f in (
                "mlen", "blen", "vlen", "hbm_gbps", "vector_sram_bytes")}), wl, MX,
                overlap_vector=True)
            assert float(one.tokens_per_s) == float(piped.tokens_per_s[i])


def test_anchor_conventions_hand_computed() -> None:
    # Llama-3.1-8B prefill S = 2048, MLEN 2048, batch 1: one query tile x one key tile,
    # 32 query heads in 8 KV groups of 4: 13 * 2048 * 4 * 1 * 1 * 8 * 1 cycles per layer
    assert anchor_prefill_softmax_cycles(2048, 2048, 32, 8, 1, 2048) == 851_968
    # 4096 tokens, MLEN 2048, batch 2: 2 x 2 tiles -> 4x the rows, 2x the batch
    assert anchor_prefill_softmax_cycles(4096, 4096, 32, 8, 2, 2048) == 851_968 * 8
    # utilisation model: 10 * MLEN per block per head group
    assert anchor_utilisation_softmax_cycles(4096, 4096, 2, 2048) == 10 * 2048 * 2 * 4
    m = load_model_config("qwen3-32b")
    assert anchor_head_dim(m.hidden_size, m.num_attention_heads) == 80 and m.head_dim == 128
    assert anchor_ttft_s(1.5, 0.01) == pytest.approx(1.52)
    assert anchor_tokens_per_s(4, 1024, 2.0) == pytest.approx(1024.0)
