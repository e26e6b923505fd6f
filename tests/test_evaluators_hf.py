"""HFCausalLMEvaluator / hf_lm on a tiny random Llama built locally (no download): the
quantizable attention equals transformers' SDPA in fp32, and quant.kv / quant.attn reach
the real attention."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256)
    model = LlamaForCausalLM(cfg)
    tk = Tokenizer(models.WordLevel({chr(i): i for i in range(128)}, unk_token=chr(0)))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token=chr(0))
    d = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.mark.slow
def test_quant_attention_equals_sdpa_and_kv_reaches_it(tiny_llama_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    from evaluators.lm import HFCausalLMEvaluator

    ev = HFCausalLMEvaluator(tiny_llama_dir, window=64, budget_tokens=256, proxy_tokens=64)
    ref = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    assert ref.config._attn_implementation != "dse_quant"
    with torch.no_grad():
        logits = ref(input_ids=ev.inputs).logits
    loss = F.cross_entropy(logits.flatten(0, 1), ev.targets.flatten()).item()
    r = ev.evaluate({})
    assert r["loss_nats"] == pytest.approx(loss, rel=1e-5)
    assert r["kl_to_fp_nats"] == pytest.approx(0.0, abs=1e-7)
    kv = ev.evaluate({"quant.kv": "int2"})
    assert kv["kl_to_fp_nats"] > 1e-4 and kv["kv_bits"] == pytest.approx(2.0, abs=0.5)
    assert kv["layers"]["model.layers.1.self_attn.v_cache"]["kv_format"].startswith("int2")
    attn = ev.evaluate({"quant.attn": "int2"})
    assert attn["kl_to_fp_nats"] > 1e-4
    assert attn["layers"]["model.layers.0.self_attn.qk"]["act_format"].startswith("int2")


@pytest.mark.slow
def test_hf_lm_plugin(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from dse import registry
    from dse.registry import EvalContext

    ev = registry.get("hf_lm")({"model_dir": str(tiny_llama_dir), "window": 32,
                                "budget_tokens": 64, "proxy_tokens": 32},
                               EvalContext(study_dir=tmp_path, name="hf_lm"))
    r = ev.evaluate({"quant.weights": "mxint8", "hw.mlen": 64}, {})
    assert r["avg_weight_bits"] == pytest.approx(8.25) and r["fidelity"] == "full"
    assert len(list((tmp_path / "cache" / "hf_lm").glob("*.json"))) == 1
    with pytest.raises(ValueError, match="model_dir"):
        registry.get("hf_lm")({"model_dir": str(tmp_path / "nope")},
                              EvalContext(study_dir=tmp_path, name="hf_lm"))


@pytest.mark.slow
def test_weights_digest_tracks_content(tiny_llama_dir: Path, tmp_path: Path) -> None:
    import shutil

    from safetensors.torch import load_file, save_file

    from evaluators.hf import weights_digest

    other = tmp_path / "finetuned"
    shutil.copytree(tiny_llama_dir, other)
    assert weights_digest(other) == weights_digest(tiny_llama_dir)
    sd = load_file(other / "model.safetensors")
    for t in sd.values():
        t.add_(1e-3)  # same shapes and sizes, other values: a "fine-tune"
    save_file(sd, other / "model.safetensors", metadata={"format": "pt"})
    assert weights_digest(other) != weights_digest(tiny_llama_dir)


def _attention_with_repeat(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           fmt: str) -> torch.Tensor:
    """The plain formulation: K/V repeated per query head, quantized, causal softmax."""
    from quant import get_format

    f = get_format(fmt)
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = f.quantize(q, -1) @ f.quantize(k.transpose(-2, -1), -2) * q.shape[-1] ** -0.5
    t = scores.shape[-1]
    causal = torch.ones(t, t, dtype=torch.bool).triu_(1)
    probs = scores.masked_fill(causal, float("-inf")).softmax(-1)
    return (f.quantize(probs, -1) @ f.quantize(v, -2)).transpose(1, 2).contiguous()


@pytest.mark.parametrize("fmt", ["fp32", "mxint8", "int8", "int4(asym,channel)", "int4(group=8)", "mxfp4_e2m1"])
def test_grouped_attention_bit_exact_against_repeated_kv(fmt: str) -> None:
    """The evaluator's GQA attention (no K/V repeat) is bit-identical to repeating K/V."""
    from evaluators.hf import _quant_attention
    from quant import KVQuant, QMatmul

    torch.manual_seed(1)
    q, k, v = torch.randn(2, 6, 40, 16), torch.randn(2, 2, 40, 16), torch.randn(2, 2, 40, 16)
    mod = torch.nn.Module()
    mod.qk, mod.pv = QMatmul(fmt), QMatmul(fmt)
    mod.k_cache, mod.v_cache = KVQuant(), KVQuant()
    got, _ = _quant_attention(mod, q, k, v, None)
    assert torch.equal(got, _attention_with_repeat(q, k, v, fmt))


def test_shared_input_quantized_once_and_exactly() -> None:
    """QLinear layers fed one tensor reuse its quantized copy; an in-place change or an
    other format quantizes afresh, and results equal quantizing each time."""
    from quant import QLinear, get_format

    torch.manual_seed(2)
    a = QLinear(torch.nn.Linear(32, 8), get_format("fp32"), get_format("mxint4"))
    b = QLinear(torch.nn.Linear(32, 8), get_format("fp32"), get_format("mxint4"))
    c = QLinear(torch.nn.Linear(32, 8), get_format("fp32"), get_format("int8"))
    x = torch.randn(5, 32)
    with torch.no_grad():
        xa = a.quantized_input(x)
        assert b.quantized_input(x) is xa  # reused
        assert torch.equal(c.quantized_input(x), get_format("int8").quantize(x, -1))
        assert torch.equal(b(x), torch.nn.functional.linear(
            get_format("mxint4").quantize(x, -1), b.weight, b.bias))
        x.mul_(3.0)  # in place: the kept copy is stale
        assert torch.equal(a.quantized_input(x), get_format("mxint4").quantize(x, -1))
    xg = torch.randn(5, 32, requires_grad=True)
    a(xg).sum().backward()  # with gradients: no reuse, straight-through gradient
    assert xg.grad is not None and not hasattr(xg, "_dse_xq")


@pytest.mark.slow
def test_hf_calibration_windows_come_from_the_training_topics(tiny_llama_dir: Path) -> None:
    """The HF evaluator calibrates on windows of the training topics: none of them occurs
    in the scored stream, and LQER / saliences feed the model only those."""
    from evaluators.lm import HFCausalLMEvaluator

    ev = HFCausalLMEvaluator(tiny_llama_dir, window=32, budget_tokens=256, proxy_tokens=32,
                             calib_batches=3)
    assert ev.identity()["calib"].startswith("pydoc_data.topics/train:")
    scored = ev.inputs.flatten().to(torch.uint8).numpy().tobytes()
    calib = ev.calibration_inputs()
    assert len(calib) == 3
    assert all(c.flatten().to(torch.uint8).numpy().tobytes() not in scored for c in calib)
    seen: list[torch.Tensor] = []

    class Rec:
        def __deepcopy__(self, memo: dict) -> Rec:
            return self

        def __call__(self, mod: torch.nn.Module, args: tuple) -> None:
            seen.append(args[0].detach().clone())

    h = ev.model.model.embed_tokens.register_forward_pre_hook(Rec())
    try:
        ev.transform({"quant.weights": "int4", "quant.lqer.rank": 2, "sparsity.density": 0.5,
                      "sparsity.salience": "snip"})
    finally:
        h.remove()
    assert {s.numpy().tobytes() for s in seen} == {c.numpy().tobytes() for c in calib}


def _windowed_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fmt: str,
                        k_layout: str, v_layout: str, window: int) -> torch.Tensor:
    """Query by query: keys/values among its `window` most recent are the unquantized
    ones, older ones quantized in their layout (per token: along head_dim; per channel:
    along tokens), causal softmax; K/V repeated per query head."""
    from quant import get_format

    f = get_format(fmt)
    kq = f.quantize(k, -1 if k_layout == "token" else -2)
    vq = f.quantize(v, -1 if v_layout == "token" else -2)
    rep = q.shape[1] // k.shape[1]
    k, v, kq, vq = (x.repeat_interleave(rep, dim=1) for x in (k, v, kq, vq))
    t = q.shape[2]
    out = torch.empty_like(q)
    for i in range(t):
        recent = (i - torch.arange(i + 1)) < window
        ki = torch.where(recent[:, None], k[:, :, : i + 1], kq[:, :, : i + 1])
        vi = torch.where(recent[:, None], v[:, :, : i + 1], vq[:, :, : i + 1])
        p = (q[:, :, i : i + 1] @ ki.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(-1)
        out[:, :, i] = (p @ vi)[:, :, 0]
    return out.transpose(1, 2)


@pytest.mark.parametrize(("k_layout", "v_layout", "window"), [
    ("token", "token", 0), ("channel", "token", 0), ("channel", "token", 5),
    ("token", "channel", 3), ("channel", "channel", 64)])
def test_kv_layouts_and_window_match_a_per_query_reference(k_layout: str, v_layout: str,
                                                           window: int) -> None:
    from evaluators.hf import _quant_attention
    from quant import KVQuant, QMatmul

    torch.manual_seed(3)
    q, k, v = torch.randn(2, 4, 24, 16), torch.randn(2, 2, 24, 16), torch.randn(2, 2, 24, 16)
    fmt = "int2(asym,group=8)"
    mod = torch.nn.Module()
    mod.qk, mod.pv = QMatmul(), QMatmul()
    mod.k_cache = KVQuant(fmt, layout=k_layout, window=window)
    mod.v_cache = KVQuant(fmt, layout=v_layout, window=window)
    got, _ = _quant_attention(mod, q, k, v, None)
    ref = _windowed_reference(q, k, v, fmt, k_layout, v_layout, window)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    if window >= 24:  # every key recent: the unquantized attention
        plain = torch.nn.Module()
        plain.qk, plain.pv, plain.k_cache, plain.v_cache = QMatmul(), QMatmul(), KVQuant(), \
            KVQuant()
        torch.testing.assert_close(got, _quant_attention(plain, q, k, v, None)[0])


@pytest.mark.slow
def test_kv_layout_params_reach_the_model(tiny_llama_dir: Path) -> None:
    from evaluators import CharLMEvaluator
    from evaluators.lm import HFCausalLMEvaluator

    ev = HFCausalLMEvaluator(tiny_llama_dir, window=64, budget_tokens=256, proxy_tokens=64)
    base = {"quant.kv": "int2(asym,group=16)"}
    plain = ev.evaluate(base)
    kivi = ev.evaluate({**base, "quant.kv_k_layout": "channel", "quant.kv_window": 16})
    lay = kivi["layers"]
    assert lay["model.layers.0.self_attn.k_cache"]["kv_layout"] == "channel"
    assert lay["model.layers.0.self_attn.v_cache"]["kv_layout"] == "token"
    assert lay["model.layers.1.self_attn.v_cache"]["kv_window"] == 16
    assert kivi["kl_to_fp_nats"] != plain["kl_to_fp_nats"]
    allfp = ev.evaluate({**base, "quant.kv_window": 64})  # every past token in the window
    assert allfp["kl_to_fp_nats"] == pytest.approx(0.0, abs=1e-6)
    # the char GPT shares the attention (quant.kv_attention): a window covering the whole
    # context reads nothing quantized; the glyph ViT (not causal) refuses a window
    ch = CharLMEvaluator(budget_tokens=128)
    assert ch.evaluate({"quant.kv": "int2", "quant.kv_window": 64})["kl_to_fp_nats"] == \
        pytest.approx(0.0, abs=1e-6)
    part = ch.evaluate({"quant.kv": "int2", "quant.kv_window": 8})["kl_to_fp_nats"]
    assert 0 < part < ch.evaluate({"quant.kv": "int2"})["kl_to_fp_nats"]
    from evaluators import VisionEvaluator

    with pytest.raises(ValueError, match="quant.kv_window"):
        VisionEvaluator("glyph_vit", budget_images=64).evaluate({"quant.kv": "mxint4",
                                                                 "quant.kv_window": 8})
    with pytest.raises(ValueError, match="quant.kv_k_layout"):
        ev.evaluate({"quant.kv": "mxint4", "quant.kv_k_layout": "head"})
