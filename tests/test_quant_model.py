"""quantize_model / LQER / configs / sparsity on a tiny transformer and a tiny CNN."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import quant
from quant import (
    KVQuant,
    QLinear,
    QMatmul,
    QuantConfig,
    SparsityConfig,
    activation_sparsity,
    apply_sparsity,
    get_format,
    quantize_model,
)


class Attn(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.h = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.qk, self.pv = QMatmul(), QMatmul()
        self.k_cache, self.v_cache = KVQuant(), KVQuant()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        sh = (b, t, self.h, d // self.h)
        q = self.q(x).view(sh).transpose(1, 2)
        k = self.k_cache(self.k(x).view(sh).transpose(1, 2))
        v = self.v_cache(self.v(x).view(sh).transpose(1, 2))
        s = self.qk(q, k.transpose(-2, -1)) / math.sqrt(d // self.h)
        mask = torch.triu(torch.ones(t, t, dtype=torch.bool, device=x.device), 1)
        p = s.masked_fill(mask, float("-inf")).softmax(-1)
        return self.o(self.pv(p, v).transpose(1, 2).reshape(b, t, d))


class TinyGPT(nn.Module):
    def __init__(self, vocab: int = 16, d: int = 64, layers: int = 2) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"attn": Attn(d, 2), "mlp": nn.Sequential(
                nn.Linear(d, 4 * d), nn.ReLU(), nn.Linear(4 * d, d))})
            for _ in range(layers))
        self.head = nn.Linear(d, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.emb(idx)
        for blk in self.blocks:
            x = x + blk["attn"](x)
            x = x + blk["mlp"](x)
        return self.head(x)


def tiny_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(32, 32, 3, padding=1, padding_mode="reflect"), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


@pytest.fixture(scope="module")
def gpt() -> TinyGPT:
    torch.manual_seed(0)
    return TinyGPT().eval()


def _tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 16, (2, 12), generator=torch.Generator().manual_seed(seed))


def _state(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in m.state_dict().items()}


def test_quantize_transformer_round_trip(gpt: TinyGPT) -> None:
    before = _state(gpt)
    x = _tokens()
    with torch.no_grad():
        y0 = gpt(x)
    cfg = QuantConfig.from_params({"quant.weights": "mxint4", "quant.acts": "mxint8",
                                   "quant.kv": "mxint4", "quant.attn": "mxint8",
                                   "other.param": 3})
    qm, rep = quantize_model(gpt, cfg)
    with torch.no_grad():
        y1 = qm(x)
        y0b = gpt(x)
    assert not torch.equal(y0, y1)
    assert torch.equal(y0, y0b)  # original untouched
    for k, v in gpt.state_dict().items():
        assert torch.equal(v, before[k])
    assert all(isinstance(m, KVQuant) and m.fmt.is_identity
               for n, m in gpt.named_modules() if n.endswith("_cache"))
    n_lin = 2 * 6 + 1
    assert sum(isinstance(m, QLinear) for m in qm.modules()) == n_lin
    assert rep.quant_ratio_params == 1.0 and rep.quant_ratio_matmuls == 1.0
    assert rep.avg_weight_bits == pytest.approx(4.25)
    assert rep.avg_act_bits == pytest.approx(8.25)
    assert rep.kv_bits == 4.25
    assert rep.memory_density == pytest.approx(32 / 4.25)
    kinds = [v["kind"] for v in rep.per_layer.values()]
    assert kinds.count("matmul") == 4 and kinds.count("kv") == 4
    import json

    json.dumps(rep.per_layer)
    # the quantized weights are on the mxint4 grid, stored once
    w = qm.blocks[0]["mlp"][0].weight
    assert torch.equal(get_format("mxint4").quantize(w), w)


def test_overrides_and_ratios(gpt: TinyGPT) -> None:
    params = {"quant.weights": "mxint4", "quant.acts": "mxint8",
              "quant.layer.head.weights": "fp32",
              "quant.layer.blocks.*.mlp.*.weights": "int8",
              "quant.layer.blocks.0.mlp.0.weights": "bf16",  # longer pattern wins
              "quant.layer.blocks.1.attn.qk.acts": "fp32"}
    cfg = QuantConfig.from_params(params)
    assert cfg.weight_format("blocks.0.mlp.0").name == "bf16"
    assert cfg.weight_format("blocks.1.mlp.2").name == "int8"
    assert cfg.weight_format("blocks.1.attn.q").name == "mxint4"
    qm, rep = quantize_model(gpt, cfg)
    pl = rep.per_layer
    assert pl["head"]["weight_format"] == "fp32" and pl["blocks.0.mlp.0"]["weight_bits"] == 16
    assert pl["blocks.1.attn.qk"]["act_format"] == "fp32"
    assert pl["blocks.1.attn.pv"]["act_format"] == "mxint8"  # attn defaults to acts
    n_head = gpt.head.weight.numel()
    n_all = sum(m.weight.numel() for m in gpt.modules() if isinstance(m, nn.Linear))
    # the low-precision share counts the lowest-bit format only (mxint4: the attention
    # projections), not every format under 32 bits (int8 / bf16 MLPs, arXiv 2410.06722)
    n_attn = sum(m.weight.numel() for n, m in gpt.named_modules()
                 if isinstance(m, nn.Linear) and ".attn." in n)
    assert rep.quant_ratio_params == pytest.approx(n_attn / n_all) and n_head < n_all
    # 13 linears + 4 attention matmuls; head and one qk are fp32 -> 15/17 low precision
    assert rep.quant_ratio_matmuls == pytest.approx(15 / 17)
    assert isinstance(qm.head, QLinear)  # fp32 weight but mxint8 inputs -> still wrapped


def test_cnn_round_trip() -> None:
    torch.manual_seed(1)
    cnn = tiny_cnn().eval()
    before = _state(cnn)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        y0 = cnn(x)
    qm, rep = quantize_model(cnn, QuantConfig(weights="mxint8", acts="mxint8"))
    with torch.no_grad():
        y1 = qm(x)
    assert not torch.equal(y0, y1)
    assert (y0 - y1).abs().max() < 0.05 * y0.abs().max()
    assert all(torch.equal(v, before[k]) for k, v in cnn.state_dict().items())
    assert rep.quant_ratio_params == 1.0
    # conv weights (32,3,3,3) and (32,32,3,3): blocks along 3 or 32 input channels
    n = [32 * 27, 32 * 288, 320]
    bits = [8 + 8 / 3, 8 + 8 / 32, 8 + 8 / 32]
    assert rep.avg_weight_bits == pytest.approx(sum(a * b for a, b in zip(n, bits, strict=True))
                                                / sum(n))
    # fp32 everywhere is the identity
    qm2, rep2 = quantize_model(cnn, QuantConfig())
    with torch.no_grad():
        assert torch.equal(qm2(x), y0)
    assert rep2.quant_ratio_params == 0.0 and rep2.avg_weight_bits == 32.0


def test_lqer_full_rank_recovers_fp_layer() -> None:
    torch.manual_seed(2)
    lin = nn.Linear(48, 24)
    calib = [torch.randn(16, 48) * torch.linspace(0.1, 5, 48) for _ in range(3)]
    x = torch.randn(8, 48)
    errs = {}
    for rank in (0, 4, 24):
        cfg = QuantConfig(weights="mxint4", lqer_rank=rank)
        qm, rep = quantize_model(lin, cfg, calib=calib)
        with torch.no_grad():
            errs[rank] = float((qm(x) - lin(x)).abs().max())
    assert errs[24] < 1e-5  # full rank (min(out, in) = 24): the fp layer
    assert errs[0] > errs[4] > errs[24]
    assert rep.per_layer[""]["lqer_rank"] == 24
    # rows of 48 hold 2 blocks (tail padded); LQER factors 48x24 + 24x24 fp32 add their bits
    assert rep.avg_weight_bits == pytest.approx(4 + 16 / 48 + 32 * (24 * 24 + 24 * 48) / (24 * 48))
    # factors in a low-bit format still help but are not exact
    qm8, _ = quantize_model(lin, QuantConfig(weights="mxint4", lqer_rank=24,
                                             lqer_format="mxint8"), calib=calib)
    with torch.no_grad():
        e8 = float((qm8(x) - lin(x)).abs().max())
    assert errs[24] < e8 < errs[0]


def test_hf_style_kv_projection_hook() -> None:
    class Proj(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.k_proj, self.v_proj, self.o_proj = nn.Linear(64, 64), nn.Linear(64, 64), \
                nn.Linear(64, 64)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.k_proj(x), self.v_proj(x), self.o_proj(x)

    torch.manual_seed(3)
    m = Proj()
    x = torch.randn(3, 64)
    qm, rep = quantize_model(m, QuantConfig(kv="mxint4"))
    k, v, o = qm(x)
    fmt = get_format("mxint4")
    with torch.no_grad():
        assert torch.equal(k, fmt.quantize(m.k_proj(x)))
        assert torch.equal(v, fmt.quantize(m.v_proj(x)))
        assert torch.equal(o, m.o_proj(x))
    assert rep.per_layer["k_proj"]["kv_output_format"] == "mxint4"
    qm2, _ = quantize_model(m, QuantConfig(kv="mxint4", kv_proj_patterns=()))
    with torch.no_grad():
        assert torch.equal(qm2(x)[0], m.k_proj(x))


def test_config_from_params_errors_and_defaults() -> None:
    c = QuantConfig.from_params({})
    assert c.weights.is_identity and c.attn_format.is_identity and c.lqer_rank == 0
    c = QuantConfig.from_params({"quant.acts": "mxint8"})
    assert c.attn_format.name == "mxint8"
    for bad, field in [({"quant.weights": "mxint99"}, "quant.weights"),
                       ({"quant.lqer.rank": -1}, "quant.lqer.rank"),
                       ({"quant.lqer.rank": 2.5}, "quant.lqer.rank"),
                       ({"quant.kv": 4}, "quant.kv"),
                       ({"quant.layer.x.bits": "int8"}, "quant.layer.x.bits"),
                       ({"quant.weight": "int8"}, "quant.weight")]:
        with pytest.raises(ValueError, match=field.replace(".", r"\.")):
            QuantConfig.from_params(bad)
    s = SparsityConfig.from_params({"sparsity.density": 0.5, "sparsity.salience": "fisher",
                                    "sparsity.layer.a.*.density": 0.25,
                                    "sparsity.layer.a.b.act_threshold": 0.1, "quant.x": 1})
    assert s.density_for("a.c") == 0.25 and s.density_for("z") == 0.5
    assert s.threshold_for("a.b") == 0.1 and s.threshold_for("a.c") == 0.0
    for bad, field in [({"sparsity.density": 1.5}, "sparsity.density"),
                       ({"sparsity.salience": "l2"}, "sparsity.salience"),
                       ({"sparsity.act_threshold": -1}, "sparsity.act_threshold"),
                       ({"sparsity.layer.q.density": -0.1}, "sparsity.layer.q.density"),
                       ({"sparsity.dens": 0.1}, "sparsity.dens")]:
        with pytest.raises(ValueError, match=field.replace(".", r"\.")):
            SparsityConfig.from_params(bad)


def _lm_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    logits = model(batch[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                       batch[:, 1:].reshape(-1))


@pytest.mark.parametrize("salience", quant.SALIENCES)
def test_masks_hit_density(gpt: TinyGPT, salience: str) -> None:
    before = _state(gpt)
    calib = [_tokens(i) for i in range(2)]
    cfg = SparsityConfig(density=0.3, salience=salience,
                         layer_density=(("blocks.0.mlp.*", 0.7),), seed=1)
    sm, rep = apply_sparsity(gpt, cfg, calib=calib, loss_fn=_lm_loss)
    assert all(torch.equal(v, before[k]) for k, v in gpt.state_dict().items())
    mods = dict(sm.named_modules())
    for name, info in rep.per_layer.items():
        w = mods[name].weight
        target = 0.7 if name.startswith("blocks.0.mlp.") else 0.3
        assert abs(int(mods[name].weight_mask.sum()) - target * w.numel()) <= 1
        assert int((w != 0).sum()) <= int(mods[name].weight_mask.sum())
        assert info["density_target"] == target
    kept = sum(i["kept"] for i in rep.per_layer.values())
    total = sum(i["params"] for i in rep.per_layer.values())
    assert rep.weight_sparsity == pytest.approx(1 - kept / total, abs=1e-3)
    assert rep.weight_sparsity == pytest.approx((0.7 * 66560 + 0.3 * 32768) / 99328, abs=1e-3)
    assert rep.act_sparsity is not None
    # second mlp layer sees ReLU outputs: measurable natural activation sparsity
    assert rep.per_layer["blocks.0.mlp.2"]["act_sparsity"] > 0.2


def test_salience_choices_differ_and_random_is_seeded(gpt: TinyGPT) -> None:
    calib = [_tokens(i) for i in range(2)]
    masks = {}
    for sal in ("magnitude", "gradient", "snip", "fisher", "random"):
        sm, _ = apply_sparsity(gpt, SparsityConfig(density=0.5, salience=sal, seed=0),
                               calib=calib, loss_fn=_lm_loss)
        masks[sal] = sm.blocks[0]["mlp"][0].weight_mask
    assert not torch.equal(masks["magnitude"], masks["gradient"])
    assert not torch.equal(masks["gradient"], masks["fisher"])
    assert not torch.equal(masks["gradient"], masks["snip"])
    sm2, _ = apply_sparsity(gpt, SparsityConfig(density=0.5, salience="random", seed=0))
    assert torch.equal(sm2.blocks[0]["mlp"][0].weight_mask, masks["random"])
    with pytest.raises(ValueError, match="loss_fn"):
        apply_sparsity(gpt, SparsityConfig(density=0.5, salience="snip"))
    # magnitude keeps the largest weights
    w = gpt.blocks[0]["mlp"][0].weight.abs()
    m = masks["magnitude"]
    assert w[m].min() >= w[~m].max()


def test_activation_threshold_and_quant_after_sparsity(gpt: TinyGPT) -> None:
    calib = [_tokens(i) for i in range(2)]
    cfg = SparsityConfig(act_threshold=0.5)
    sm, rep = apply_sparsity(gpt, cfg, calib=calib)
    assert rep.weight_sparsity == 0.0
    assert rep.per_layer["blocks.0.attn.q"]["act_sparsity"] > 0.2
    # the hook zeroes small inputs: equals thresholding the input by hand
    lin = sm.blocks[0]["attn"].q
    x = torch.randn(4, 64)
    with torch.no_grad():
        assert torch.equal(lin(x), gpt.blocks[0]["attn"].q(torch.where(x.abs() < 0.5, 0.0, x)))
    # the thresholds survive quantize_model, and activation_sparsity reads them
    qm, _ = quantize_model(sm, QuantConfig(weights="mxint8"))
    activation_sparsity(qm, reset=True)
    with torch.no_grad():
        qm(_tokens(5))
    sp = activation_sparsity(qm)
    assert set(sp) == set(rep.per_layer) and all(0 < v < 1 for v in sp.values())


def test_lqer_cache_bit_identical_across_ranks_and_disk(tmp_path) -> None:
    """The SVD runs once per (weights, format, scaling); every rank is a slice of it,
    bit-identical to computing that rank directly, also after a round trip to disk."""
    from quant import LQERCache
    from quant.lqer import tensor_digest

    torch.manual_seed(5)
    lin = nn.Linear(40, 24)
    calib = [torch.randn(16, 40) * torch.linspace(0.1, 5, 40) for _ in range(2)]
    x = torch.randn(6, 40)
    cache = LQERCache(tmp_path / "lqer", store_rank=16)
    for rank in (8, 2, 16, 24):  # 24 = full rank: above the stored 16, computed again
        for lf in ("fp32", "mxint8"):
            cfg = QuantConfig(weights="mxint4", lqer_rank=rank, lqer_format=lf)
            plain, _ = quantize_model(lin, cfg, calib=calib)
            cached, _ = quantize_model(lin, cfg, calib=calib, lqer_cache=cache)
            assert torch.equal(plain.lqer_A, cached.lqer_A), (rank, lf)
            assert torch.equal(plain.lqer_B, cached.lqer_B), (rank, lf)
            with torch.no_grad():
                assert torch.equal(plain(x), cached(x))
    assert cache.svd_calls == 2  # rank 8 (stored up to 16), then rank 24
    # another weight format or another scaling is another SVD
    quantize_model(lin, QuantConfig(weights="int4", lqer_rank=4), calib=calib, lqer_cache=cache)
    quantize_model(lin, QuantConfig(weights="mxint4", lqer_rank=4), lqer_cache=cache)
    assert cache.svd_calls == 4
    # a fresh cache on the same directory serves every rank from disk
    disk = LQERCache(tmp_path / "lqer", store_rank=16)
    for rank in (1, 8, 24):
        cfg = QuantConfig(weights="mxint4", lqer_rank=rank)
        plain, _ = quantize_model(lin, cfg, calib=calib)
        cached, _ = quantize_model(lin, cfg, calib=calib, lqer_cache=disk)
        assert torch.equal(plain.lqer_A, cached.lqer_A) and torch.equal(plain.lqer_B, cached.lqer_B)
    assert disk.svd_calls == 0 and disk.hits == 3
    # other weights (same shape) never hit: the key is the weights' content
    lin2 = nn.Linear(40, 24)
    assert tensor_digest(lin2.weight) != tensor_digest(lin.weight)
    quantize_model(lin2, QuantConfig(weights="mxint4", lqer_rank=4), calib=calib,
                   lqer_cache=disk)
    assert disk.svd_calls == 1
    with torch.no_grad():  # an in-place change is a new digest
        d0 = tensor_digest(lin2.weight)
        lin2.weight.add_(1.0)
        assert tensor_digest(lin2.weight) != d0


def _linear_params(m: nn.Module) -> dict[str, int]:
    return {n: x.weight.numel() for n, x in m.named_modules() if isinstance(x, nn.Linear)}


def test_ratio_report_counts_the_low_format_only(gpt: TinyGPT) -> None:
    sizes = _linear_params(gpt)
    half = [n for n in sizes if n.startswith("blocks.0.")]
    params = {"quant.weights": "mxint4",
              **{f"quant.layer.{n}.weights": "bf16" for n in half}}
    _, rep = quantize_model(gpt, QuantConfig.from_params(params))
    n_low = sum(v for n, v in sizes.items() if n not in half)
    assert rep.quant_ratio_params == pytest.approx(n_low / sum(sizes.values()))
    _, rep16 = quantize_model(gpt, QuantConfig(weights="bf16"))
    assert rep16.quant_ratio_params == 1.0  # bf16 everywhere: bf16 is the low format
    _, rep32 = quantize_model(gpt, QuantConfig(acts="int8"))
    assert rep32.quant_ratio_params == 0.0


def test_ratio_depth_rule_by_hand(gpt: TinyGPT) -> None:
    sizes = _linear_params(gpt)  # module order: blocks.0 attn q,k,v,o, mlp.0, mlp.2, ...
    total = sum(sizes.values())
    names = list(sizes)
    for ratio in (0.0, 0.1, 0.3, 0.5, 0.9, 1.0):
        cfg = QuantConfig.from_params({"quant.weights": "mxint4", "quant.ratio": ratio})
        _, rep = quantize_model(gpt, cfg)
        prefixes = [names[:j] for j in range(len(names) + 1)]  # closest share, then shorter
        low = min(prefixes, key=lambda p: (abs(sum(sizes[n] for n in p) - ratio * total),
                                           len(p)))
        cum = sum(sizes[n] for n in low)
        got = [n for n in names if rep.per_layer[n]["weight_format"] == "mxint4"]
        assert got == low, ratio
        assert all(rep.per_layer[n]["weight_format"] == "bf16" for n in names if n not in low)
        assert rep.quant_ratio_params == pytest.approx(cum / total)
        assert abs(cum - ratio * total) <= max(sizes.values()) / 2
    full, _ = quantize_model(gpt, QuantConfig(weights="mxint4", ratio=1.0))
    plain, _ = quantize_model(gpt, QuantConfig(weights="mxint4"))
    with torch.no_grad():
        assert torch.equal(full(_tokens()), plain(_tokens()))


def test_ratio_overrides_sensitivity_and_random(gpt: TinyGPT) -> None:
    sizes = _linear_params(gpt)
    # an explicit override is kept and takes no part in the selection
    cfg = QuantConfig.from_params({"quant.weights": "mxint4", "quant.ratio": 1.0,
                                   "quant.ratio_high": "int8",
                                   "quant.layer.head.weights": "fp32"})
    _, rep = quantize_model(gpt, cfg)
    assert rep.per_layer["head"]["weight_format"] == "fp32"
    assert "ratio_low" not in rep.per_layer["head"]
    # sensitivity: a layer with one outlier per 32-block (10x the other weights) loses its
    # small weights in mxint4 (relative error ~0.12 vs ~0.02) and is the last to go low
    torch.manual_seed(7)
    m = TinyGPT().eval()
    with torch.no_grad():
        q = m.blocks[0]["attn"].q.weight
        q[:, ::32] = 10 * float(q.abs().mean())
    from quant.ratio import select_low, sensitivity

    cfg = QuantConfig(weights="mxint4", ratio=1.0, ratio_rule="sensitivity")
    mods = {n: x for n, x in m.named_modules() if isinstance(x, nn.Linear)}
    order = select_low(mods, cfg, None)
    assert order[-1] == "blocks.0.attn.q"
    sens = [sensitivity(mods[n], cfg, None) for n in order]
    assert sens == sorted(sens)
    calib = [_tokens(i) for i in range(2)]
    cfg_half = QuantConfig(weights="mxint4", ratio=0.5, ratio_rule="sensitivity")
    _, rep = quantize_model(m, cfg_half, calib=calib)
    assert rep.per_layer["blocks.0.attn.q"]["weight_format"] == "bf16"
    # random: seeded
    picks = []
    for seed in (0, 0, 1):
        c = QuantConfig(weights="mxint4", ratio=0.5, ratio_rule="random", seed=seed)
        _, r = quantize_model(gpt, c)
        picks.append({n for n in sizes if r.per_layer[n]["weight_format"] == "mxint4"})
    assert picks[0] == picks[1] != picks[2]
    for bad, field in [({"quant.ratio": 1.5}, "quant.ratio"),
                       ({"quant.ratio_rule": "size"}, "quant.ratio_rule"),
                       ({"quant.weights": "bf16", "quant.ratio": 0.5}, "quant.ratio_high")]:
        with pytest.raises(ValueError, match=field.replace(".", r"\.")):
            QuantConfig.from_params(bad)
