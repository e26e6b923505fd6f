"""quant.finetune: masks kept, only the chosen parameters move, deterministic; through an
evaluator it trains a copy on the calibration split and is part of the cache key."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from quant import FinetuneConfig, SparsityConfig, apply_sparsity, finetune

torch.set_num_threads(1)


def _data(seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(8, 3, generator=g)
    out = []
    for _ in range(4):
        x = torch.randn(32, 8, generator=g)
        out.append((x, (x @ w).argmax(-1)))
    return out


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.LayerNorm(16), nn.Linear(16, 3))


def _loss(m: nn.Module, b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return nn.functional.cross_entropy(m(b[0]), b[1])


def _pruned() -> nn.Module:
    sm, _ = apply_sparsity(_model(), SparsityConfig(density=0.5))
    return sm


def test_masked_finetune_keeps_the_mask_and_learns() -> None:
    m = _pruned()
    flags = [p.requires_grad for p in m.parameters()]
    before = {k: v.clone() for k, v in m.state_dict().items()}
    info = finetune(m, FinetuneConfig(steps=40, lr=1e-2), _data(), _loss)
    assert info["finetune_loss_last"] < info["finetune_loss_first"]
    for name in ("0", "3"):
        lay = m.get_submodule(name)
        assert torch.equal(lay.weight[~lay.weight_mask], torch.zeros(int((~lay.weight_mask).sum())))
        assert not torch.equal(lay.weight, before[f"{name}.weight"])
        assert not torch.equal(lay.bias, before[f"{name}.bias"])
    assert torch.equal(m[2].weight, before["2.weight"])  # LayerNorm: not in `masked`
    assert info["finetune_trainable_params"] == 8 * 16 // 2 + 16 * 3 // 2 + 16 + 3
    assert [p.requires_grad for p in m.parameters()] == flags  # restored
    assert all(p.grad is None for p in m.parameters())
    again = _pruned()
    finetune(again, FinetuneConfig(steps=40, lr=1e-2), _data(), _loss)
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(),
                                                 again.state_dict().values(), strict=True))


def test_all_and_salience_modes() -> None:
    m = _pruned()
    ln = m[2].weight.clone()
    finetune(m, FinetuneConfig(steps=5, lr=1e-2, params="all"), _data(), _loss)
    assert not torch.equal(m[2].weight, ln)  # norms train too
    assert torch.equal(m[0].weight[~m[0].weight_mask], torch.zeros(64))  # masks still kept
    s = _pruned()
    w0 = s[0].weight.clone()
    b0 = s[0].bias.clone()
    info = finetune(s, FinetuneConfig(steps=5, lr=1e-2, params="salience", density=0.05,
                                      salience="gradient"), _data(), _loss)
    changed = int((s[0].weight != w0).sum())
    assert 0 < changed <= round(0.05 * 128)  # only the salience-chosen 5 % of layer 0
    assert torch.equal(s[0].bias, b0)  # biases frozen in SPEFT mode
    assert info["finetune_trainable_params"] == round(0.05 * 128) + round(0.05 * 48)
    assert finetune(s, FinetuneConfig(steps=0), _data(), _loss) == {}


def test_config_errors() -> None:
    for bad, field in [({"finetune.steps": -1}, "finetune.steps"),
                       ({"finetune.lr": 0}, "finetune.lr"),
                       ({"finetune.params": "some"}, "finetune.params"),
                       ({"finetune.density": 0.0}, "finetune.density"),
                       ({"finetune.salience": "l2"}, "finetune.salience"),
                       ({"finetune.step": 3}, "finetune.step")]:
        with pytest.raises(ValueError, match=field.replace(".", r"\.")):
            FinetuneConfig.from_params(bad)
    assert FinetuneConfig.from_params({"finetune.steps": 3.0, "quant.x": 1}).steps == 3


@pytest.mark.slow
def test_evaluator_finetunes_a_copy_on_the_calibration_split() -> None:
    from evaluators import VisionEvaluator
    from evaluators.models import state_digest

    ev = VisionEvaluator("digits", budget_images=256)
    before = state_digest(ev.model)
    p = {"sparsity.density": 0.3}
    plain = ev.evaluate(p)
    ft = ev.evaluate({**p, "finetune.steps": 15, "finetune.lr": 3e-3})
    assert state_digest(ev.model) == before
    assert ft["loss_nats"] < plain["loss_nats"]
    assert ft["finetune"]["finetune_loss_last"] < ft["finetune"]["finetune_loss_first"]
    assert ft["weight_sparsity"] == pytest.approx(plain["weight_sparsity"])
    assert ev.key({**p, "finetune.steps": 15}) != ev.key(p)
    test_x = {x.numpy().tobytes() for x in ev.images}
    assert not any(im.numpy().tobytes() in test_x
                   for b in ev.finetune_batches(20) for im in b[0])


def test_the_finetune_submodule_does_not_shadow_the_function() -> None:
    """``quant`` loads its names lazily; importing the submodule ``quant.finetune`` keeps
    ``quant.finetune`` the function (as the eager package did)."""
    import importlib

    import quant

    importlib.import_module("quant.finetune")
    assert quant.finetune is importlib.import_module("quant.finetune").finetune
    assert callable(quant.finetune)
