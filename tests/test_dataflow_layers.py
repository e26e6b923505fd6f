"""Exactness of the dataflow layer model against fpgaConvNet's own numbers, and its laws."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from simulators.dataflow.layers import Layer, LayerModel, _window_cycle_table, divisors
from simulators.dataflow.sparsity import PointwiseAvg, binomial_hist, synthetic
from tests.conftest import reference_files


def _records() -> list[tuple[str, dict]]:
    out = []
    for path in reference_files("fpgaconvnet_layers*.json"):
        data = json.loads(path.read_text())
        for i, rec in enumerate(data["results"]):
            out.append((f"{path.name}:{i}:{rec['layer']}", rec))
    return out


RECORDS = _records()


def _model(rec: dict) -> LayerModel:
    s = rec["shape"]
    k, p = s["k"], s["pad"]
    layer = Layer(rec["layer"], "conv", s["rows"], s["cols"], s["channels"], s["filters"],
                  kernel=(k, k), stride=(s["stride"], s["stride"]), pad=(p, p, p, p),
                  groups=s["groups"])
    width = rec["width"]  # "w16a16"
    wbits, abits = (int(x) for x in width[1:].split("a"))
    sp = rec["sparsity"]
    sparsity = None
    if sp is not None:
        if sp["kind"] == "window_hist_binomial":
            if not sp.get("skip_all_zero_window", True):
                raise AssertionError("record without all-zero window skipping: not modelled")
            sparsity = binomial_hist(k * k, sp["p_zero_product"], s["channels"])
        elif sp["kind"] == "pointwise_avg":
            sparsity = PointwiseAvg(np.full(s["channels"], sp["p_zero_product"]))
        else:
            raise AssertionError(f"unknown sparsity kind {sp['kind']!r}")
    return LayerModel(layer, act_bits=abits, weight_bits=wbits, sparsity=sparsity)


def _eval(rec: dict) -> dict[str, int]:
    f = rec["folding"]
    r = _model(rec).evaluate(np.array([f["coarse_in"]]), np.array([f["coarse_out"]]),
                             np.array([f["coarse_group"]]), np.array([f["fine"]]))
    return {k: int(v[0]) for k, v in r.items()}


@pytest.mark.parametrize("rec", [r for _, r in RECORDS], ids=[i for i, _ in RECORDS])
def test_reference_exact(rec: dict) -> None:
    """Latency (integer cycles), DSP and BRAM18 equal fpgaConvNet's for every record."""
    got = _eval(rec)
    assert got["ii_cycles"] == rec["latency_cycles_per_image"]
    assert got["dsp"] == rec["resources"]["DSP"]
    assert got["bram18"] == rec["resources"]["BRAM"]
    assert rec["resources"].get("URAM", 0) == 0  # no URAM in the model: records must not use it


def test_reference_images_per_s() -> None:
    for path in reference_files("fpgaconvnet_layers*.json"):
        data = json.loads(path.read_text())
        f_hz = data["freq_mhz_for_images_per_s"] * 1e6
        for rec in data["results"]:
            assert f_hz / _eval(rec)["ii_cycles"] == pytest.approx(rec["images_per_s_if_bottleneck"], rel=1e-12)


CONV3 = Layer("c3", "conv", 28, 28, 32, 48, kernel=(3, 3), pad=(1, 1, 1, 1))
CONV1 = Layer("c1", "conv", 14, 14, 48, 96)
DW = Layer("dw", "conv", 28, 28, 32, 32, kernel=(3, 3), stride=(2, 2), pad=(1, 1, 1, 1), groups=32)
GRP = Layer("grp", "conv", 14, 14, 32, 48, kernel=(3, 3), pad=(1, 1, 1, 1), groups=4)


def _all_foldings(layer: Layer) -> tuple[np.ndarray, ...]:
    grids = np.meshgrid(*(layer.feasible(f) for f in ("coarse_in", "coarse_out", "coarse_group", "fine")),
                        indexing="ij")
    return tuple(g.reshape(-1) for g in grids)


@pytest.mark.parametrize("layer", [CONV3, CONV1, DW, GRP], ids=lambda x: x.name)
def test_dense_equals_sparse_at_zero(layer: Layer) -> None:
    fold = _all_foldings(layer)
    dense = LayerModel(layer).evaluate(*fold)["ii_cycles"]
    sparse = LayerModel(layer, sparsity=synthetic(layer.window, layer.channels, 1.0)).evaluate(*fold)["ii_cycles"]
    np.testing.assert_array_equal(dense, sparse)


@pytest.mark.parametrize("layer", [CONV3, CONV1, DW, GRP], ids=lambda x: x.name)
def test_more_sparsity_never_slower(layer: Layer) -> None:
    fold = _all_foldings(layer)
    prev = None
    for density in (1.0, 0.8, 0.6, 0.4, 0.2, 0.05, 0.0):
        ii = LayerModel(layer, sparsity=synthetic(layer.window, layer.channels, density)).evaluate(*fold)["ii_cycles"]
        if prev is not None:
            assert np.all(ii <= prev)
        prev = ii


def test_more_sparsity_never_slower_heterogeneous() -> None:
    """Per-channel histograms: raising one channel's zero share never slows the layer."""
    rng = np.random.default_rng(0)
    p = rng.uniform(0.0, 0.8, CONV3.channels)
    fold = _all_foldings(CONV3)
    from simulators.dataflow.sparsity import WindowHist
    def hist(pp: np.ndarray) -> WindowHist:
        return WindowHist(np.vstack([binomial_hist(9, float(x), 1).hist for x in pp]))
    base = LayerModel(CONV3, sparsity=hist(p)).evaluate(*fold)["ii_cycles"]
    for c in (0, 7, 31):
        q = p.copy()
        q[c] = min(1.0, q[c] + 0.3)
        more = LayerModel(CONV3, sparsity=hist(q)).evaluate(*fold)["ii_cycles"]
        assert np.all(more <= base)


@pytest.mark.parametrize("density", [None, 1.0, 0.5, 0.1])
@pytest.mark.parametrize("layer", [CONV3, CONV1, DW, GRP], ids=lambda x: x.name)
def test_more_folding_never_slower_never_fewer_dsp(layer: Layer, density: float | None) -> None:
    sp = None if density is None else synthetic(layer.window, layer.channels, density)
    model = LayerModel(layer, act_bits=8, weight_bits=8, sparsity=sp)
    fields = ("coarse_in", "coarse_out", "coarse_group", "fine")
    base = _all_foldings(layer)
    r0 = model.evaluate(*base)
    for i, name in enumerate(fields):
        feas = layer.feasible(name)
        # next larger feasible value of one field (a divisor multiple for coarse, +1 for fine)
        up = []
        for v in base[i]:
            larger = [x for x in feas if x > v and (name == "fine" or x % v == 0)]
            up.append(larger[0] if larger else v)
        fold = list(base)
        fold[i] = np.array(up)
        r1 = model.evaluate(*fold)
        assert np.all(r1["ii_cycles"] <= r0["ii_cycles"]), name
        assert np.all(r1["dsp"] >= r0["dsp"]), name
        assert np.all(r1["lut"] >= r0["lut"]) and np.all(r1["ff"] >= r0["ff"]), name


def _rows(p: np.ndarray, window: int = 9) -> np.ndarray:
    """Per-channel binomial window histograms with zero-product shares ``p``."""
    return np.vstack([binomial_hist(window, float(x), 1).hist for x in p])


def test_more_folding_never_slower_heterogeneous_grouped() -> None:
    """Per-channel sparsity on a grouped layer: every next larger coarse_in, coarse_group
    or fine never raises the sparse II."""
    from simulators.dataflow.sparsity import WindowHist
    rng = np.random.default_rng(5)
    model = LayerModel(GRP, sparsity=WindowHist(_rows(rng.beta(0.3, 0.3, GRP.channels))))
    base = _all_foldings(GRP)
    r0 = model.evaluate(*base)["ii_cycles"]
    for i, name in ((0, "coarse_in"), (2, "coarse_group"), (3, "fine")):
        feas = GRP.feasible(name)
        fold = list(base)
        fold[i] = np.array([next((x for x in feas if x > v and (name == "fine" or x % v == 0)), v) for v in base[i]])
        assert np.all(model.evaluate(*fold)["ii_cycles"] <= r0), name


def test_grouped_vectorised_equals_scalar() -> None:
    """Grouped layer, per-channel sparsity: all foldings at once equal one at a time, and
    the grid look-up equals both."""
    from simulators.dataflow.sparsity import WindowHist
    sp = WindowHist(_rows(np.random.default_rng(6).beta(0.4, 0.4, GRP.channels)))
    fold = _all_foldings(GRP)
    vec = LayerModel(GRP, sparsity=sp).evaluate(*fold)
    look = LayerModel(GRP, sparsity=sp).lookup(*fold)
    for i in range(0, fold[0].size, 7):
        one = LayerModel(GRP, sparsity=sp).evaluate(*(int(f[i]) for f in fold))
        assert all(int(one[k]) == int(vec[k][i]) == int(look[k][i]) for k in vec)


def _best_legal_stream_load(cycles: np.ndarray, groups: int, ci: int, cg: int) -> float:
    """Brute force: the smallest slowest-stream load (sum of its channels' cycles) over every
    legal schedule (each lane holds g/cg whole groups, each stream C/(g*ci) channels of
    each of its lane's groups)."""
    pg = cycles.size // groups
    splits = []  # per group: every split of its channels into ci streams -> (ci,) loads
    for q in range(groups):
        chans = cycles[q * pg:(q + 1) * pg]
        splits.append({tuple(sorted(chans[list(p)].reshape(ci, -1).sum(1))) for p in itertools.permutations(range(pg))})
    best = np.inf
    for lanes_of in itertools.product(range(cg), repeat=groups):
        if any(lanes_of.count(j) != groups // cg for j in range(cg)):
            continue
        worst = 0.0
        for j in range(cg):
            members = [splits[q] for q in range(groups) if lanes_of[q] == j]
            # streams of a lane are interchangeable per group: try every pairing
            lane_best = min(max(np.sum([np.asarray(c)[list(perm)] for c, perm in zip(combo, perms, strict=True)], axis=0))
                            for combo in itertools.product(*members)
                            for perms in itertools.product(list(itertools.permutations(range(ci))), repeat=len(members)))
            worst = max(worst, lane_best)
        best = min(best, worst)
    return float(best)


def test_grouped_dealing_keeps_channels_on_their_group_streams() -> None:
    """Grouped 3x3 conv, 2 groups of 2 channels, coarse_in = 2: channel cycles (fine = 1)
    9 and 0 in group 0, 8 and 2 in group 1. Dealing across groups (the old model) pairs
    9 with 0 and 8 with 2 (slowest stream 10/2 = 5 cycles per window), which hardware cannot
    do: each stream takes one channel of each group. The model deals 9, 0 then 2, 8 (slowest
    stream 11/2 = 5.5), the best legal schedule (brute force)."""
    from simulators.dataflow.sparsity import WindowHist
    hist = np.zeros((4, 10))
    for c, n_zero in enumerate((0, 9, 1, 7)):  # channel cycles at fine 1: 9, 0, 8, 2
        hist[c, n_zero] = 1.0
    layer = Layer("g", "conv", 8, 8, 4, 4, kernel=(3, 3), pad=(1, 1, 1, 1), groups=2)
    assert _window_cycle_table(hist, 9, 2)[1] == 5.0  # across groups (optimistic)
    assert _window_cycle_table(hist, 9, 2, 1, 2)[1] == 5.5
    assert _best_legal_stream_load(np.array([9.0, 0.0, 8.0, 2.0]), 2, 2, 1) / 2 == 5.5
    ii = LayerModel(layer, sparsity=WindowHist(hist)).evaluate(2, 1, 1, 1)["ii_cycles"]
    assert int(ii) == 64 * (4 // 2) * (4 // 2) * 5.5  # workload 256 vector-dot products per stream


@pytest.mark.parametrize(("channels", "groups", "ci", "cg"), [
    (4, 2, 2, 1), (8, 2, 2, 1), (8, 2, 4, 1), (6, 3, 2, 1), (8, 4, 2, 2), (8, 4, 2, 4), (12, 6, 2, 3), (8, 8, 1, 2), (6, 6, 1, 3),
])
def test_grouped_dealing_is_a_legal_schedule(channels: int, groups: int, ci: int, cg: int) -> None:
    """Random per-channel histograms: the modelled slowest stream is never faster than the
    best legal schedule (brute force), for every fine."""
    rng = np.random.default_rng(channels * 100 + groups * 10 + ci + cg)
    for _ in range(3):
        hist = _rows(rng.beta(0.4, 0.4, channels))
        tab = _window_cycle_table(hist, 9, ci, cg, groups)
        for fine in (1, 2, 4, 9):
            cyc = np.ceil((9 - np.arange(10)) / fine)
            cyc[-1] = 0.0
            best = _best_legal_stream_load(hist @ cyc, groups, ci, cg) * ci * cg / channels
            assert tab[fine] >= best - 1e-9, fine


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_depthwise_dealing_unchanged(seed: int) -> None:
    """Depthwise (one channel per group, coarse_in = 1): channels are dealt to the
    coarse_group streams exactly as a groups = 1 stage deals them to its streams (the
    model before group-aware dealing), bit for bit; 1x1 likewise."""
    from simulators.dataflow.layers import _pointwise_cycle
    rng = np.random.default_rng(seed)
    channels = int(rng.choice([4, 6, 8, 12, 16, 32]))
    hist = rng.dirichlet(np.full(10, rng.uniform(0.2, 3.0)), size=channels)
    hist[int(rng.integers(channels))] = np.eye(10)[9]  # an all-zero channel
    avg = rng.uniform(0.0, 1.0, channels)
    for s in divisors(channels):
        np.testing.assert_array_equal(_window_cycle_table(hist, 9, 1, s, channels), _window_cycle_table(hist, 9, s))
        for clusters in divisors(s):
            assert _pointwise_cycle(avg, 1, s, channels, clusters) == _pointwise_cycle(avg, s, 1, 1, clusters)


@settings(max_examples=60, deadline=None)
@given(
    shape=st.sampled_from([(4, 2, 2, 1), (8, 2, 2, 2), (12, 3, 2, 1), (12, 4, 3, 2), (16, 4, 2, 2),
                           (24, 6, 2, 3), (12, 2, 6, 2), (16, 8, 2, 4)]),
    seed=st.integers(0, 2**31 - 1),
    bump=st.floats(0.0, 0.6),
)
def test_grouped_table_monotone_in_any_channel(shape: tuple[int, int, int, int], seed: int, bump: float) -> None:
    """Grouped stages (channels, groups, coarse_in, coarse_group): raising one channel's
    zero share never raises the slowest stream's cycles, for every fine."""
    channels, groups, ci, cg = shape
    rng = np.random.default_rng(seed)
    p = rng.beta(0.4, 0.4, channels)
    c = int(rng.integers(channels))
    q = p.copy()
    q[c] = min(1.0, q[c] + bump)
    before = _window_cycle_table(_rows(p), 9, ci, cg, groups)
    after = _window_cycle_table(_rows(q), 9, ci, cg, groups)
    assert np.all(after[1:] <= before[1:] + 1e-12)


def test_logic_model_is_the_documented_formula() -> None:
    """LUT/FF are our own model (docs/dataflow.md); pin the documented formula."""
    a = w = 8
    ci, co, cg, f = 4, 2, 1, 3
    m = f * ci * co * cg
    dense = LayerModel(CONV3, act_bits=a, weight_bits=w).evaluate(ci, co, cg, f)
    assert int(dense["lut"]) == 250 + m * (a + w + 16) + ci * cg * (9 * a // 2) + co * cg * 32
    assert int(dense["ff"]) == 300 + m * (a + w + 32) + ci * cg * 9 * a + co * cg * 32
    sparse = LayerModel(CONV3, act_bits=a, weight_bits=w, sparsity=synthetic(9, 32, 0.5)).evaluate(ci, co, cg, f)
    assert int(sparse["lut"]) == int(dense["lut"]) + m * (a + w) * 4 // 2  # ceil(log2(10)) = 4 select bits
    assert int(sparse["ff"]) == int(dense["ff"]) + ci * cg * 9 * (a + w)


def test_bad_folding_is_rejected() -> None:
    with pytest.raises(ValueError, match="coarse_in"):
        LayerModel(CONV3).evaluate(np.array([3]), np.array([1]), np.array([1]), np.array([1]))
    with pytest.raises(ValueError, match="fine"):
        LayerModel(CONV3).evaluate(np.array([1]), np.array([1]), np.array([1]), np.array([10]))


def test_divisors() -> None:
    assert divisors(12) == [1, 2, 3, 4, 6, 12]


@settings(max_examples=60, deadline=None)
@given(
    shape=st.sampled_from([(4, 2), (6, 3), (8, 4), (12, 6), (12, 4), (8, 8)]),
    seed=st.integers(0, 2**31 - 1),
    bump=st.floats(0.0, 0.5),
)
def test_sparse_table_monotone_in_any_channel(shape: tuple[int, int], seed: int, bump: float) -> None:
    """Per-channel binomial histograms of random sparsity: raising one channel's zero
    share never raises the slowest stream's cycles, for every fine and stream count."""
    channels, streams = shape
    rng = np.random.default_rng(seed)
    p = rng.uniform(0.0, 0.95, channels)
    c = int(rng.integers(channels))
    q = p.copy()
    q[c] = min(1.0, q[c] + bump)
    rows = lambda v: np.vstack([binomial_hist(9, float(x), 1).hist for x in v])  # noqa: E731
    before = _window_cycle_table(rows(p), 9, streams)
    after = _window_cycle_table(rows(q), 9, streams)
    assert np.all(after[1:] <= before[1:] + 1e-12)


def test_attention_matmul_stage_hand_computed() -> None:
    """QK^T of 4 heads, 16 tokens x 16 dims: a grouped stage whose K^T is buffered on chip."""
    from simulators.dataflow.pipeline import start_fraction

    ly = Layer("qk", "matmul", 16, 1, 64, 64, groups=4)
    m = LayerModel(ly, act_bits=8, weight_bits=16, weight_memory="stream")
    assert (m.weight_bits, m.weight_memory) == (8, "bram")  # both operands are activations
    assert ly.macs == 16 * 16 * 16 * 4 and ly.weights == 1024 and ly.in_words == 2048
    out = m.evaluate(np.array([2]), np.array([4]), np.array([2]), np.array([1]))
    # compute 16 rows * (64/(2*2)) * (64/(4*4)) = 1024; input 2048/4 = 512; output 1024/8 = 128
    assert int(out["ii_cycles"][0]) == 1024
    assert int(out["dsp"][0]) == 8  # 16 multipliers, two 8-bit products per DSP
    assert int(out["bram18"][0]) == 4  # 64 words x 128 bits: 4 columns of 36-bit BRAM18
    assert int(out["lut"][0]) == 250 + 16 * 32 + 4 * 4 + 8 * 32
    assert int(out["ff"][0]) == 300 + 16 * 48 + 4 * 8 + 8 * 32
    assert start_fraction(ly) == (1024 + 64) / 2048
    assert ly.feasible("fine") == [1] and ly.feasible("coarse_group") == [1, 2, 4]


def test_softmax_stage_hand_computed() -> None:
    m = LayerModel(Layer("sm", "softmax", 16, 1, 64, 64), act_bits=8)
    out = m.evaluate(np.array([4]), np.array([1]), np.array([1]), np.array([1]))
    assert int(out["ii_cycles"][0]) == 256  # 1024 words / 4 lanes
    assert int(out["dsp"][0]) == 2 and int(out["bram18"][0]) == 0  # 2 x 16-word rows: LUTRAM
    assert int(out["lut"][0]) == 60 + 4 * (72 + 32) and int(out["ff"][0]) == 80 + 4 * (40 + 32)
    big = LayerModel(Layer("sm", "softmax", 1024, 1, 4096, 4096), act_bits=8)
    # 2 rows of 2048 words per lane pair, 16 bits wide: 4096 x 16 -> 4 BRAM18 of 1024 x 18
    assert int(big.evaluate(np.array([2]), np.array([1]), np.array([1]), np.array([1]))["bram18"][0]) == 4
