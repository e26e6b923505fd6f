"""Each salience metric on a case whose scores and ranking are known by hand.

One ``Linear(3, 1, bias=False)`` with ``w = [3, -1, 0.5]`` and loss ``L_b = sum(x_b w^T)``,
so the gradient of batch b is its input: ``g_1 = [1, 4, 2]``, ``g_2 = [1, -4, 2]``,
mean ``g = [1, 0, 2]``.

| metric | definition | scores | kept at density 1/3 |
|---|---|---|---|
| magnitude | abs(w) | [3, 1, 0.5] | 0 |
| gradient | abs(g) | [1, 0, 2] | 2 |
| snip | abs(w * g) | [3, 0, 1] | 0 |
| fisher | mean_b 0.5 (w * g_b)^2 | [4.5, 8, 0.5] | 1 |
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from quant import SparsityConfig, apply_sparsity, salience_scores

torch.set_num_threads(1)

BATCHES = [torch.tensor([[1.0, 4.0, 2.0]]), torch.tensor([[1.0, -4.0, 2.0]])]
EXPECTED = {
    "magnitude": ([3.0, 1.0, 0.5], 0),
    "gradient": ([1.0, 0.0, 2.0], 2),
    "snip": ([3.0, 0.0, 1.0], 0),
    "fisher": ([4.5, 8.0, 0.5], 1),
}


def _model() -> nn.Module:
    lin = nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[3.0, -1.0, 0.5]]))
    return nn.Sequential(lin)


def _loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return model(batch).sum()


@pytest.mark.parametrize("salience", sorted(EXPECTED))
def test_salience_scores_and_ranking_by_hand(salience: str) -> None:
    scores, kept = EXPECTED[salience]
    m = _model()
    got = salience_scores(m, salience, ["0"], BATCHES, _loss)["0"]
    assert got.flatten().tolist() == pytest.approx(scores)
    sm, rep = apply_sparsity(m, SparsityConfig(density=1 / 3, salience=salience),
                             calib=BATCHES, loss_fn=_loss)
    assert sm[0].weight_mask.flatten().tolist() == [i == kept for i in range(3)]
    assert rep.per_layer["0"]["kept"] == 1
    assert m[0].weight.requires_grad  # the given model's flags are restored


def test_gradient_and_snip_differ_and_batches_accumulate() -> None:
    m = _model()
    g = salience_scores(m, "gradient", ["0"], BATCHES, _loss)["0"]
    s = salience_scores(m, "snip", ["0"], BATCHES, _loss)["0"]
    assert torch.argmax(g) != torch.argmax(s)
    # one batch alone ranks otherwise: g_1 = [1, 4, 2] -> weight 1 first
    one = salience_scores(m, "gradient", ["0"], BATCHES[:1], _loss)["0"]
    assert one.flatten().tolist() == pytest.approx([1.0, 4.0, 2.0])
    # fisher is not g^2 (no weight term) but 0.5 (w g_b)^2: weight 1 beats weight 2
    f = salience_scores(m, "fisher", ["0"], BATCHES, _loss)["0"].flatten()
    assert f[1] > f[0] > f[2]


def test_random_is_seeded_and_needs_nothing() -> None:
    m = _model()
    a = salience_scores(m, "random", ["0"], seed=3)["0"]
    b = salience_scores(m, "random", ["0"], seed=3)["0"]
    c = salience_scores(m, "random", ["0"], seed=4)["0"]
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (1, 3) and bool(((a >= 0) & (a < 1)).all())
    with pytest.raises(ValueError, match="loss_fn"):
        salience_scores(m, "fisher", ["0"])
    with pytest.raises(ValueError, match="no batches"):
        salience_scores(m, "snip", ["0"], [], _loss)
