"""The char_lm model family (char_lm_s|m|l): committed weights, recorded perplexity, the
PLENA configs of the same models, and the deterministic training script."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors import safe_open

from evaluators.data import WEIGHTS_DIR
from evaluators.kinds import CHAR_LM_FAMILY
from evaluators.models import state_digest

#: perplexity of each member's committed weights on the default evaluation split (the
#: first 4,096 held-out characters, 64 windows of 64), recorded when the weights were
#: trained (evaluators/train/train_char_lm.py; docs/evaluators.md), and its parameters
RECORDED = {
    "char_lm_s": (5.528148682242073, 431_720),
    "char_lm_m": (5.104452596879714, 1_832_168),
    "char_lm_l": (4.7372414539341, 6_388_328),
}


def test_family_table_and_files() -> None:
    assert list(CHAR_LM_FAMILY) == list(RECORDED)
    shapes = [(s.d_model, s.n_layers, s.n_heads) for s in CHAR_LM_FAMILY.values()]
    assert all(d // h == 32 for d, _, h in shapes)  # one architecture: head width 32
    assert shapes == sorted(shapes)  # sizes grow with the name
    for name, size in CHAR_LM_FAMILY.items():
        with safe_open(str(WEIGHTS_DIR / size.file), framework="pt") as f:
            dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
        assert dtypes == {"F16" if size.dtype == "float16" else "F32"}, name


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RECORDED))
def test_recorded_perplexity(name: str) -> None:
    """Loads the committed weights and scores the fixed split. Tolerance rel 1e-6: on one
    machine the number is reproduced bit for bit; another CPU's float32 kernels may sum in
    another order (a few ulps per window), far below any difference a study reads."""
    from evaluators.lm import CharLMEvaluator

    ev = CharLMEvaluator(model=name)
    ppl, params = RECORDED[name]
    assert sum(p.numel() for p in ev.model.parameters()) == params
    assert ev.unquantized_metrics()["perplexity"] == pytest.approx(ppl, rel=1e-6)
    assert ev.identity()["model"] == state_digest(ev.model)[:16]


def test_bad_member_is_one_line() -> None:
    from evaluators.lm import CharLMEvaluator

    with pytest.raises(ValueError, match="model: expected one of char_lm_s, char_lm_m, "
                                         "char_lm_l, got 'char_lm_xl'"):
        CharLMEvaluator(model="char_lm_xl")


@pytest.mark.parametrize("name", list(RECORDED))
def test_plena_config_is_the_same_model(name: str) -> None:
    """simulators/configs/<name>.json describes the evaluated model: widths, counts,
    vocabulary, context, and the weight-matrix parameters (biases, norms excluded)."""
    from evaluators.models import load_model
    from simulators.plena import load_model_config

    net, _ = load_model(WEIGHTS_DIR / CHAR_LM_FAMILY[name].file)
    c = net.config
    m = load_model_config(name)
    assert (m.hidden_size, m.num_hidden_layers, m.num_attention_heads, m.num_key_value_heads,
            m.head_dim, m.intermediate_size, m.vocab_size, m.position_embeddings) == (
        c["d_model"], c["n_layers"], c["n_heads"], c["n_heads"], c["d_model"] // c["n_heads"],
        4 * c["d_model"], c["vocab_size"], c["context"])
    assert not m.gated_mlp and m.layer_norm and not m.tie_word_embeddings
    matrices = sum(mod.weight.numel() for mod in net.modules()
                   if isinstance(mod, torch.nn.Linear | torch.nn.Embedding))
    assert m.n_params == matrices


@pytest.mark.slow
def test_training_is_deterministic_and_rounds_to_the_stored_dtype() -> None:
    from evaluators.train.train_char_lm import train

    a, meta_a = train(steps=2, batch=2, d_model=64, n_layers=1, n_heads=2, lr=1e-2)
    b, meta_b = train(steps=2, batch=2, d_model=64, n_layers=1, n_heads=2, lr=1e-2)
    assert state_digest(a) == state_digest(b)
    assert meta_a["heldout_loss_nats"] == meta_b["heldout_loss_nats"]
    h, meta_h = train(steps=2, batch=2, d_model=64, n_layers=1, n_heads=2, lr=1e-2,
                      store_dtype="float16")
    assert all(torch.equal(p, p.half().float()) for p in h.parameters())
    assert meta_h["store_dtype"] == "float16" and math.isfinite(meta_h["heldout_loss_nats"])
    with pytest.raises(ValueError, match="store_dtype: expected 'float32' or 'float16'"):
        train(steps=1, batch=2, d_model=64, n_layers=1, n_heads=2, store_dtype="int8")
