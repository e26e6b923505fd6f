"""GPU/TPU baselines, iso-resource scaling, the PLENA-vs-baseline direction, dse plug-ins."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from dse import registry
from dse.registry import EvalContext
from simulators.baselines import A100, H100, TPU_V6E, GpuBackend, TpuBackend, simulate_baseline
from simulators.plena import Numerics, PlenaHardware, Workload, load_model_config, simulate
from simulators.plena.engine import weight_bytes_per_element
from simulators.plena.ops import build_ops
from simulators.systolic import gemm

BF16 = Numerics("bf16", "bf16", "bf16")
MX = Numerics("mxint4", "mxint8", "mxint4")
# PLENA's public A100-class design point (AICrossSim/PLENA_Simulator configs/config_3_a100)
PLENA_A100 = PlenaHardware(mlen=4096, blen=32, vlen=4096, hlen=128,
                           matrix_sram_bytes=128 * 2**20, vector_sram_bytes=128 * 2**20,
                           hbm_gbps=2039.0, hbm_gb=80.0, clock_ghz=1.41)
CTX = EvalContext(Path("/nonexistent"))


def test_presets_match_datasheets() -> None:
    assert A100.peak_tflops == pytest.approx(312.0, rel=0.01)
    assert H100.peak_tflops == pytest.approx(989.0, rel=0.01)
    assert 2 * TPU_V6E.multipliers * TPU_V6E.clock_ghz * 1e-3 == pytest.approx(918.0, rel=0.01)


def test_iso_resources() -> None:
    for spec in (A100, H100, TPU_V6E):
        iso = spec.iso_resources(PLENA_A100)
        assert float(iso.multipliers) == 4096 * 32
        assert float(iso.hbm_gbps) == 2039.0 and float(iso.hbm_gb) == 80.0
        assert float(iso.sram_bytes) == 256 * 2**20
        assert iso.clock_ghz == spec.clock_ghz


def test_tpu_gemm_is_the_systolic_core() -> None:
    m = load_model_config("llama-3.1-8b")
    ops = build_ops(m, 2, 512, 512)
    costs = TpuBackend(TPU_V6E).op_costs(ops, BF16, weight_bytes_per_element(ops, "bf16"))
    i = ops.names.index("gate_proj")
    ref = gemm(1024, m.hidden_size, m.intermediate_size, 256, 256, "ws")
    cycles = float(costs.compute_s[i]) * TPU_V6E.clock_ghz * 1e9 * TPU_V6E.n_mxu
    assert cycles == pytest.approx(int(ref.compute_cycles) + 1, rel=1e-12)


def test_gpu_decode_is_memory_bound() -> None:
    m = load_model_config("llama-3.1-8b")
    spec = dataclasses.replace(A100, launch_s=0.0)
    res = simulate_baseline(spec, Workload(m, 1, 512, 32), BF16)
    streamed = sum(n for nm, _, n in m.weight_matrices() if nm != "embed_tokens") * 2.0
    assert float(res.tpot_s) == pytest.approx(streamed / 2039e9, rel=0.05)
    assert float(res.tpot_s) >= streamed / 2039e9
    ops = GpuBackend(spec)
    assert ops.shape() == ()


def test_baselines_vectorise_and_bandwidth_monotone() -> None:
    wl = Workload.of("llama-3.1-8b", 2, 4096, 128)
    gbps = np.geomspace(300, 5000, 12)
    for spec in (A100, TPU_V6E):
        vec = simulate_baseline(dataclasses.replace(spec, hbm_gbps=gbps), wl)
        assert np.all(np.diff(vec.tokens_per_s) >= 0)
        one = simulate_baseline(dataclasses.replace(spec, hbm_gbps=float(gbps[5])), wl)
        assert float(one.tokens_per_s) == float(vec.tokens_per_s[5])


@pytest.mark.parametrize("model,batch,S,O", [("llama-3.1-8b", 4, 32768, 1024),
                                             ("llama-3.1-8b", 1, 32768, 4096),
                                             ("qwen3-32b", 1, 32768, 1024)])
def test_direction_of_the_paper_claim(model: str, batch: int, S: int, O: int) -> None:  # noqa: E741
    """PLENA (MX formats) beats an iso-resource A100 and, by more, an iso TPU v6e on
    long-context decode-heavy workloads; docs/simulators.md reports the ratios."""
    wl = Workload.of(model, batch, S, O)
    plena = float(simulate(PLENA_A100, wl, MX).tokens_per_s)
    gpu = float(simulate_baseline(A100.iso_resources(PLENA_A100), wl, BF16).tokens_per_s)
    tpu_serial = float(simulate_baseline(TPU_V6E.iso_resources(PLENA_A100), wl).tokens_per_s)
    tpu_piped = float(simulate_baseline(
        dataclasses.replace(TPU_V6E.iso_resources(PLENA_A100), pipelined_folds=True),
        wl).tokens_per_s)
    assert 1.2 < plena / gpu < 3.5
    assert plena / tpu_serial > plena / tpu_piped > plena / gpu


def test_plugins_via_registry() -> None:
    opts = {"model": "llama-3.2-1b", "batch": 2, "prompt_len": 1024, "output_len": 64}
    ev = registry.get("plena")(opts, CTX)
    params = {"hw.mlen": 1024, "hw.blen": 16, "hw.hbm_gbps": 1200.0, "quant.weights": "mxint4",
              "quant.acts": "mxint8", "quant.kv": "mxint4", "other.param": 3}
    out = ev.evaluate(params, {})
    metrics = {k: v for k, v in out.items() if isinstance(v, float)}
    for key in ("ttft_s", "tpot_s", "tokens_per_s", "area_mm2", "energy_per_token_j",
                "hbm_bytes", "utilisation", "fits_memory"):
        assert np.isfinite(metrics[key]), key
    assert metrics["fits_memory"] == 1.0
    assert isinstance(out["plena_bottleneck"], str)
    small = ev.evaluate({**params, "hw.hbm_gb": 0.5}, {})
    assert small["fits_memory"] == 0.0
    faster = ev.evaluate({**params, "hw.hbm_gbps": 2400.0}, {})
    assert faster["tokens_per_s"] >= out["tokens_per_s"]
    assert faster["area_mm2"] > out["area_mm2"]
    wl_over = ev.evaluate({**params, "workload.model": "llama-3.1-8b"}, {})
    assert wl_over["ttft_s"] > out["ttft_s"]
    for name, prefix in (("gpu", "a100_iso_"), ("tpu", "tpu_v6e_iso_")):
        base = registry.get(name)({**opts, "iso": True}, CTX).evaluate(params, out)
        assert base[f"{prefix}tokens_per_s"] > 0 and f"{prefix}area_mm2" not in base
        assert base[f"speedup_vs_{prefix[:-1]}"] == pytest.approx(
            out["tokens_per_s"] / base[f"{prefix}tokens_per_s"])
    h100 = registry.get("gpu")({**opts, "preset": "h100"}, CTX).evaluate(params, {})
    assert "h100_tokens_per_s" in h100 and not any(k.startswith("speedup") for k in h100)
    brk = registry.get("plena")({**opts, "breakdown": True}, CTX).evaluate(params, {})
    assert brk["plena_ops"]["decode.q_proj"]["bottleneck"] in ("compute", "memory")


@pytest.mark.parametrize("name,options,match", [
    ("plena", {"nope": 1}, "nope"),
    ("plena", {"model": "gpt-9"}, "workload.model"),
    ("plena", {"hw": {"mlen": -4}}, "hw.mlen"),
    ("plena", {"hw": {"mlem": 4}}, "hw.mlem"),
    ("gpu", {"quant": {"weight": "bf16"}}, "quant.weight"),
    ("plena", {"quant": {"weights": "int99"}}, "quant.weights"),
    ("plena", {"batch": 0}, "option batch"),
    ("gpu", {"preset": "tpu-v6e"}, "preset"),
    ("tpu", {"iso": "yes"}, "iso"),
])
def test_bad_options(name: str, options: dict, match: str) -> None:
    factory = registry.get(name)
    with pytest.raises(ValueError, match=match):
        factory.validate_options(options)
    with pytest.raises(ValueError, match=match):
        factory(options, CTX)
