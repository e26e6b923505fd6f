"""Accuracy evaluators: fp32 reproduction, format ladders, cache, fidelity, errors,
layer sparsity, training determinism."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from evaluators import CharLMEvaluator, EvaluationError, VisionEvaluator, cache_key
from evaluators.models import load_model, save_model, state_digest
from evaluators.sparsity_stats import conv_window_hist, pointwise_avg


@pytest.fixture(scope="module")
def char_lm() -> CharLMEvaluator:
    return CharLMEvaluator(budget_tokens=2048)


@pytest.fixture(scope="module")
def glyph_cnn() -> VisionEvaluator:
    return VisionEvaluator("glyph_cnn", budget_images=576)


def test_fp32_reproduces_unquantized_char_lm(char_lm: CharLMEvaluator) -> None:
    with torch.no_grad():
        logits = char_lm.model(char_lm.inputs)
        loss = F.cross_entropy(logits.flatten(0, 1), char_lm.targets.flatten()).item()
    r = char_lm.evaluate({"quant.weights": "fp32", "quant.acts": "fp32", "quant.kv": "fp32"})
    assert r["fidelity"] == "full"
    assert r["loss_nats"] == pytest.approx(loss, rel=1e-5)
    assert r["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
    assert r["kl_to_fp_nats"] == pytest.approx(0.0, abs=1e-6)
    assert r["avg_weight_bits"] == 32.0 and r["memory_density"] == 1.0
    assert r["quant_ratio_params"] == 0.0 and r["weight_sparsity"] == 0.0
    assert char_lm.unquantized_metrics()["loss_nats"] == pytest.approx(loss, rel=1e-5)
    # The shipped model is sensitive but trained: perplexity well below the 100-char vocab.
    assert 3.0 < r["perplexity"] < 8.0


def test_fp32_reproduces_unquantized_cnn(glyph_cnn: VisionEvaluator) -> None:
    with torch.no_grad():
        logits = glyph_cnn.model(glyph_cnn.images)
    acc = float((logits.argmax(-1) == glyph_cnn.labels).double().mean())
    r = glyph_cnn.evaluate({})
    assert r["accuracy"] == pytest.approx(acc, abs=1e-12)
    assert r["loss_nats"] == pytest.approx(F.cross_entropy(logits, glyph_cnn.labels).item(),
                                           rel=1e-5)
    assert r["kl_to_fp_nats"] == pytest.approx(0.0, abs=1e-6)
    assert acc > 0.6  # 36 classes from fonts never seen in training


LADDER = ["fp32", "int8", "int4", "int2"]


@pytest.mark.parametrize("which", ["char_lm", "glyph_cnn"])
def test_format_ladder_worsens_loss(which: str, request: pytest.FixtureRequest) -> None:
    ev = request.getfixturevalue(which)
    losses = [ev.evaluate({"quant.weights": f, "quant.acts": f})["loss_nats"] for f in LADDER]
    kls = [ev.evaluate({"quant.weights": f, "quant.acts": f})["kl_to_fp_nats"] for f in LADDER]
    assert losses[0] <= losses[1] + 1e-3 < losses[2] < losses[3], losses
    assert kls[0] < kls[1] < kls[2] < kls[3], kls
    assert losses[3] > losses[0] + 0.5  # int2 is far worse


def test_metrics_bits_and_kv(char_lm: CharLMEvaluator) -> None:
    r = char_lm.evaluate({"quant.weights": "mxint4", "quant.acts": "mxint8", "quant.kv": "mxint4",
                          "hw.mlen": 1024})
    assert r["avg_weight_bits"] == pytest.approx(4.25)
    assert r["memory_density"] == pytest.approx(32 / 4.25)
    assert r["kv_bits"] == pytest.approx(4.25)
    assert r["quant_ratio_params"] == 1.0 and r["quant_ratio_matmuls"] == 1.0
    assert 0 < r["kl_to_fp_nats"] < 0.5
    assert r["layers"]["blocks.0.mlp.0"]["weight_format"] == "mxint4"
    import json

    json.dumps(r, allow_nan=False)  # everything JSON-able


def test_cache_hit_does_not_touch_model(tmp_path: Path) -> None:
    params = {"quant.weights": "int4", "hw.mlen": 512}
    ev = CharLMEvaluator(budget_tokens=512, cache_dir=tmp_path)
    first = ev.evaluate(params)
    assert len(list(tmp_path.glob("*.json"))) == 1

    class Poison(nn.Module):
        def __getattr__(self, name: str):  # any use of the model fails the test
            raise AssertionError(f"model touched on a cache hit ({name})")

    ev2 = CharLMEvaluator(budget_tokens=512, cache_dir=tmp_path)
    ev2.model = Poison()
    # a hardware-only change and key order do not matter
    again = ev2.evaluate({"hw.mlen": 4096, "hw.blen": 8, "quant.weights": "int4"})
    assert again == json_roundtrip(first)
    # a software change, a budget change or another fidelity is a different key
    ident = ev.identity()
    k = cache_key(params, ident)
    assert k != cache_key({**params, "quant.weights": "int8"}, ident)
    assert k != cache_key(params, {**ident, "budget_tokens": 1024})
    assert k == cache_key({"quant.weights": "int4", "hw.mlen": 1}, ident)
    assert cache_key({"quant.lqer.rank": 8}, ident) == cache_key({"quant.lqer.rank": 8.0}, ident)


def json_roundtrip(d: dict) -> dict:
    import json

    return json.loads(json.dumps(d))


def test_model_never_mutated(char_lm: CharLMEvaluator) -> None:
    before = state_digest(char_lm.model)
    char_lm.evaluate({"quant.weights": "int2", "sparsity.density": 0.3,
                      "sparsity.act_threshold": 0.05, "quant.lqer.rank": 4})
    assert state_digest(char_lm.model) == before


def test_fidelity_levels() -> None:
    gated = CharLMEvaluator(budget_tokens=1024, proxy_tokens=128, fidelity="gated",
                            gate_kl_nats=0.5)
    bad = gated.evaluate({"quant.weights": "int2"})
    good = gated.evaluate({"quant.weights": "int8"})
    assert bad["fidelity"] == "proxy" and good["fidelity"] == "full"
    assert bad["proxy_kl_nats"] > 0.5 and bad["kl_to_fp_nats"] == bad["proxy_kl_nats"]
    proxy = CharLMEvaluator(budget_tokens=1024, proxy_tokens=128, fidelity="proxy")
    p = proxy.evaluate({"quant.weights": "int8"})
    assert p["fidelity"] == "proxy"
    assert p["weight_sqnr_db"] == pytest.approx(good["weight_sqnr_db"])
    assert 30 < p["weight_sqnr_db"] < 60  # int8: ~6 dB per bit
    with pytest.raises(ValueError, match="fidelity"):
        CharLMEvaluator(fidelity="fast")


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"quant.layer.blocks.9.mlp.*.weights": "int4"}, "quant.layer.blocks.9.mlp.*.weights"),
        ({"sparsity.layer.decoder.*.density": 0.5}, "sparsity.layer.decoder.*.density"),
        ({"quant.weights": "int99x"}, "quant.weights"),
        ({"quant.kv": "mxfoo"}, "quant.kv"),
        ({"sparsity.density": 1.5}, "sparsity.density"),
        ({"sparsity.density": -0.1}, "sparsity.density"),
    ],
)
def test_bad_candidates_name_the_field(char_lm: CharLMEvaluator, params: dict, field: str) -> None:
    with pytest.raises(ValueError) as err:
        char_lm.evaluate(params)
    msg = str(err.value)
    assert field in msg and "\n" not in msg


def test_nan_metric_is_a_failure(tmp_path: Path) -> None:
    model, meta = load_model(Path(__file__).resolve().parents[1]
                             / "evaluators/weights/char_lm.safetensors")
    with torch.no_grad():
        model.blocks[0].mlp[0].weight[0, 0] = float("nan")
    path = tmp_path / "nan.safetensors"
    save_model(model, path, meta)
    ev = CharLMEvaluator(path, budget_tokens=128, cache_dir=tmp_path / "cache")
    with pytest.raises(EvaluationError, match="loss_nats|perplexity|kl_to_fp_nats|nan"):
        ev.evaluate({})
    assert not list((tmp_path / "cache").glob("*.json"))  # failures are not cached


def test_layer_sparsity_contract(glyph_cnn: VisionEvaluator) -> None:
    r = glyph_cnn.evaluate({"quant.weights": "int4", "quant.acts": "int4",
                            "sparsity.density": 0.6})
    ls = r["layer_sparsity"]
    convs = {n: m for n, m in glyph_cnn.model.named_modules() if isinstance(m, nn.Conv2d)}
    lins = {n for n, m in glyph_cnn.model.named_modules() if isinstance(m, nn.Linear)}
    assert set(ls) == set(convs) | lins
    for name, entry in ls.items():
        if name in convs and convs[name].kernel_size != (1, 1):
            k = convs[name].kernel_size
            assert entry["kind"] == "window_hist"
            h = np.asarray(entry["hist"])
            assert h.shape == (convs[name].in_channels, k[0] * k[1] + 1)
            np.testing.assert_allclose(h.sum(1), 1.0, atol=1e-9)
        else:
            assert entry["kind"] == "pointwise_avg"
            assert all(0.0 <= a <= 1.0 for a in entry["avg"])
    # 40% of weights pruned: every 3x3 layer has many zero products
    assert np.asarray(ls["features.3"]["hist"])[:, 3:].sum(1).mean() > 0.5


def test_window_hist_matches_brute_force() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1, stride=2)
    x = torch.randn(2, 3, 7, 6).relu()
    w = conv.weight.detach().clone()
    w[w.abs() < 0.1] = 0
    got = np.asarray(conv_window_hist(x, w, conv))
    xp = F.pad(x, (1, 1, 1, 1))
    ref = np.zeros((3, 10))
    for n, c, f in itertools.product(range(2), range(3), range(4)):
        for i in range(0, 7, 2):
            for j in range(0, 6, 2):
                win = xp[n, c, i : i + 3, j : j + 3]
                ref[c, int(((win == 0) | (w[f, c] == 0)).sum())] += 1
    np.testing.assert_allclose(got, ref / ref.sum(1, keepdims=True), atol=1e-12)
    lin_w = torch.tensor([[0.0, 1.0], [2.0, 0.0], [1.0, 1.0]])
    lin_x = torch.tensor([[0.0, 3.0], [1.0, 0.0]])
    # channel 0: 3 rows x 2 samples = 6 products, zero when x==0 (3) or w==0 (1 more)
    assert pointwise_avg(lin_x, lin_w) == pytest.approx([4 / 6, 4 / 6])


@pytest.mark.slow
def test_threads_option_and_vit_digits() -> None:
    vit = VisionEvaluator("glyph_vit", budget_images=256, num_threads=1)
    r = vit.evaluate({"quant.attn": "int4", "quant.kv": "int4"})
    assert r["layers"]["blocks.0.attn.qk"]["act_format"] == "int4"
    assert 0 < r["kl_to_fp_nats"] and r["accuracy"] > 0.3
    dig = VisionEvaluator("digits")
    d = dig.evaluate({})
    assert d["accuracy"] > 0.9
    with pytest.raises(ValueError, match="num_threads"):
        VisionEvaluator("digits", num_threads=0)
    with pytest.raises(ValueError, match="kind"):
        VisionEvaluator("mnist")


@pytest.mark.slow
def test_training_is_deterministic() -> None:
    from evaluators.train.train_char_lm import train as train_lm
    from evaluators.train.train_vision import train as train_vision

    a, _ = train_lm(steps=3, seed=3, batch=4)
    b, _ = train_lm(steps=3, seed=3, batch=4)
    c, _ = train_lm(steps=3, seed=4, batch=4)
    assert state_digest(a) == state_digest(b) != state_digest(c)
    v1, _ = train_vision("glyph_cnn", n_per_glyph=1, max_steps=2, seed=1)
    v2, _ = train_vision("glyph_cnn", n_per_glyph=1, max_steps=2, seed=1)
    assert state_digest(v1) == state_digest(v2)


def test_lqer_svd_cached_across_candidates_and_processes(tmp_path: Path) -> None:
    """An evaluator computes each layer's LQER SVD once (in memory and under its cache
    dir); another rank or a fresh evaluator on the same dir computes none, and the
    metrics equal those of an evaluator that computes everything afresh."""
    ev = CharLMEvaluator(budget_tokens=512, cache_dir=tmp_path)
    r8 = ev.evaluate({"quant.weights": "mxint4", "quant.lqer.rank": 8})
    assert ev.lqer_cache.svd_calls == 13  # every quantized Linear (2 x 6 + head), once
    r4 = ev.evaluate({"quant.weights": "mxint4", "quant.lqer.rank": 4})
    assert ev.lqer_cache.svd_calls == 13
    assert len(list((tmp_path / "lqer").glob("*.safetensors"))) == 13
    fresh = CharLMEvaluator(budget_tokens=512, cache_dir=tmp_path / "other")
    assert fresh.evaluate({"quant.weights": "mxint4", "quant.lqer.rank": 4}) == r4
    assert fresh.evaluate({"quant.weights": "mxint4", "quant.lqer.rank": 8}) == r8
    disk = CharLMEvaluator(budget_tokens=512, cache_dir=tmp_path)
    disk.cache = type(disk.cache)(None)  # results not cached: the model runs again
    assert disk.evaluate({"quant.weights": "mxint4", "quant.lqer.rank": 4}) == r4
    assert disk.lqer_cache.svd_calls == 0
    assert r4["kl_to_fp_nats"] > r8["kl_to_fp_nats"]


def test_quant_ratio_through_the_evaluator(char_lm: CharLMEvaluator) -> None:
    """quant.ratio picks layers by a rule; the reported ratio is the low format's share."""
    plain = char_lm.evaluate({"quant.weights": "int4"})
    rs = {}
    for rule in ("depth", "sensitivity", "random"):
        r = char_lm.evaluate({"quant.weights": "int4", "quant.ratio": 0.5,
                              "quant.ratio_rule": rule})
        low = [n for n, e in r["layers"].items() if e.get("weight_format") == "int4"]
        assert low and all(r["layers"][n]["ratio_low"] for n in low)
        share = sum(char_lm.model.get_submodule(n).weight.numel() for n in low) / sum(
            m.weight.numel() for m in char_lm.model.modules() if isinstance(m, nn.Linear))
        assert r["quant_ratio_params"] == pytest.approx(share) and 0.3 < share < 0.7
        assert 4 < r["avg_weight_bits"] < 16
        assert r["kl_to_fp_nats"] < plain["kl_to_fp_nats"]
        rs[rule] = r
    assert len({tuple(sorted(n for n, e in r["layers"].items()
                             if e.get("weight_format") == "int4")) for r in rs.values()}) == 3
