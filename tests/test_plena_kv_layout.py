"""PLENA prices the KV-cache layout (quant.kv_k_layout / kv_v_layout / kv_window).

Every expected number is computed by hand in the comments: mxint4 stores 4 bits per
element plus one 8-bit scale per 32 elements along the block axis (4.25 bits asymptotic);
the full-precision window costs 16 bits per element (bf16).
"""

from __future__ import annotations

import pytest

from simulators.plena import Numerics, PlenaHardware, Workload, simulate
from simulators.plena.ops import PV, QK, build_ops, kv_bytes_per_element
from simulators.plena.workload import load_model_config


def nx(**kw: object) -> Numerics:
    return Numerics("mxint4", "mxint8", **{"kv": "mxint4", **kw})  # type: ignore[arg-type]


def test_cache_bytes_per_layout_and_window() -> None:
    # 100 tokens x head_dim 64, blocks along head_dim: 100*64*4.25/8 = 3400 bytes
    assert nx().kv_cache_bytes("k", 100, 64) == 3400.0
    # K per channel: blocks of 32 tokens, ceil(100/32) = 4 scales per channel:
    # (100*64*4 + 4*64*8) / 8 = (25600 + 2048) / 8 = 3456; V stays per token
    ch = nx(kv_k_layout="channel")
    assert ch.kv_cache_bytes("k", 100, 64) == 3456.0
    assert ch.kv_cache_bytes("v", 100, 64) == 3400.0
    # window 16: 84 tokens in mxint4 (84*64*4.25 = 22848 bits) + 16 at 16 bits (16384)
    assert nx(kv_window=16).kv_cache_bytes("k", 100, 64) == (22848 + 16384) / 8
    # a window longer than the cache: every token at 16 bits, 10*64*2 bytes
    assert nx(kv_window=16).kv_cache_bytes("v", 10, 64) == 1280.0
    # an unquantized cache ignores the window (as the accuracy side does): 100*64*4 bytes
    assert Numerics("bf16", "bf16", "fp32", kv_window=16).kv_cache_bytes("k", 100, 64) == 25600.0


def test_decode_write_bytes() -> None:
    # one token of head_dim 64 in mxint4: 64*4.25/8 = 34 bytes
    assert nx().kv_step_write_bytes(100, 64) == 34.0
    # window 16: the new token at 16 bits (128 bytes) ...
    assert nx(kv_window=16).kv_step_write_bytes(10, 64) == 128.0
    # ... plus, once the cache is longer than the window, the token leaving it in mxint4
    assert nx(kv_window=16).kv_step_write_bytes(20, 64) == 128.0 + 34.0


def test_per_op_bytes_follow_the_cache_each_op_touches() -> None:
    m = load_model_config("llama-3.2-1b")  # head_dim 64
    ops = build_ops(m, 1, 1, 100)  # one decode step, 100 tokens cached
    read, write = kv_bytes_per_element(ops, nx(kv_k_layout="channel"))
    qk, pv = ops.names.index("attn_qk"), ops.names.index("attn_pv")
    assert ops.kind[qk] == QK and ops.kind[pv] == PV
    assert read[qk] == 3456.0 / 6400 and read[pv] == 3400.0 / 6400
    k, v = ops.names.index("k_proj"), ops.names.index("v_proj")
    assert write[k] == write[v] == 34.0 / 64  # asymptotic bits for the new token
    assert read.sum() + write.sum() == pytest.approx(3456 / 6400 + 3400 / 6400 + 2 * 34 / 64)
    # prefill writes the whole cache of its 100 tokens: the cache's own bytes per element
    pre = build_ops(m, 1, 100, 100)
    _, w = kv_bytes_per_element(pre, nx(kv_k_layout="channel"))
    assert w[pre.names.index("k_proj")] == 3456.0 / 6400
    assert w[pre.names.index("v_proj")] == 3400.0 / 6400


def test_capacity_and_prefill_traffic_of_a_window() -> None:
    # llama-3.2-1b: 16 layers x 8 KV heads, head_dim 64; batch 1, 100 + 28 = 128 tokens.
    # A 16-token window costs 16*64*(16 - 4.25)/8 = 1504 bytes more per head, for K and V:
    # 1504 * 2 * 16 * 8 = 385,024 bytes of capacity.
    wl = Workload.of("llama-3.2-1b", 1, 100, 28)
    hw = PlenaHardware()
    base, win = simulate(hw, wl, nx()), simulate(hw, wl, nx(kv_window=16))
    assert win.metrics()["memory_required_bytes"] - base.metrics()["memory_required_bytes"] \
        == 385024.0
    # prefill of 100 tokens: each head's K cache written once (k_proj) and read once by QK
    # (it fits the SRAM): 1504 bytes more each, times 16 layers x 8 heads = 192,512
    for op in ("k_proj", "attn_qk"):
        d = win.prefill_ops[op].hbm_bytes - base.prefill_ops[op].hbm_bytes
        assert float(d) == pytest.approx(192512.0, rel=1e-12)
    # per-channel K over 128 tokens (4 whole groups of 32): the same bytes as per token
    ch = simulate(hw, wl, nx(kv_k_layout="channel"))
    assert ch.metrics()["memory_required_bytes"] == base.metrics()["memory_required_bytes"]
    # over 100 tokens it pays for a partial group: (3456 - 3400) * 16 * 8 = 7168 bytes
    d = ch.prefill_ops["k_proj"].hbm_bytes - base.prefill_ops["k_proj"].hbm_bytes
    assert float(d) == pytest.approx(7168.0, rel=1e-12)


def test_layout_parameters_are_read_and_checked() -> None:
    n = Numerics.from_params({"quant.kv": "mxint2", "quant.kv_k_layout": "channel",
                              "quant.kv_window": 32})
    assert (n.kv, n.kv_k_layout, n.kv_v_layout, n.kv_window) == ("mxint2", "channel", "token", 32)
    with pytest.raises(ValueError, match="quant.kv_v_layout: expected one of token, channel"):
        Numerics(kv_v_layout="head")
    with pytest.raises(ValueError, match="quant.kv_window: expected an integer >= 0"):
        Numerics(kv_window=-1)


def test_plena_evaluator_reads_the_layout_parameters() -> None:
    """The study evaluator passes quant.kv_window through: the same 385,024 bytes."""
    from dse.plugins.plena import PlenaEvaluator

    ev = PlenaEvaluator({"model": "llama-3.2-1b", "batch": 1, "prompt_len": 100,
                         "output_len": 28})
    base = {"quant.weights": "mxint4", "quant.acts": "mxint8", "quant.kv": "mxint4"}
    a = ev.evaluate(base, {})["memory_required_bytes"]
    b = ev.evaluate({**base, "quant.kv_window": 16}, {})["memory_required_bytes"]
    assert b - a == 385024.0
