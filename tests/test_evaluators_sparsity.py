"""``evaluators.sparsity_stats`` on grouped and depthwise convolutions, and the dataflow
simulator consuming the result (depthwise stages simulated sparse, not dense)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dse.plugins.dataflow import DataflowEvaluator
from evaluators.sparsity_stats import (
    CHUNK_BYTES,
    conv_window_hist,
    layer_sparsity,
    pointwise_avg,
    window_hist_chunks,
)
from simulators.dataflow.layers import WEIGHT_OPS
from simulators.dataflow.networks import mobilenetv2
from simulators.dataflow.pipeline import Folding, Pipeline
from simulators.dataflow.sparsity import from_record
from simulators.dataflow.trace import trace

torch.set_num_threads(1)


def _brute_window_hist(x: torch.Tensor, w: torch.Tensor, conv: nn.Conv2d) -> np.ndarray:
    """Loop over every (image, channel, filter of its group, output position)."""
    n, c, h, wd = x.shape
    f, cg, kh, kw = w.shape
    g = conv.groups
    (sh, sw), (ph, pw), (dh, dw) = conv.stride, conv.padding, conv.dilation
    xp = F.pad(x, (pw, pw, ph, ph))  # zero padding = zero activations
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (wd + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    ref = np.zeros((c, kh * kw + 1))
    for b, ch in itertools.product(range(n), range(c)):
        q = ch // cg
        for fi in range(q * (f // g), (q + 1) * (f // g)):
            wt = w[fi, ch - q * cg]
            for i, j in itertools.product(range(ho), range(wo)):
                win = xp[b, ch, i * sh : i * sh + dh * (kh - 1) + 1 : dh, j * sw : j * sw + dw * (kw - 1) + 1 : dw]
                ref[ch, int(((win == 0) | (wt == 0)).sum())] += 1
    return ref / ref.sum(1, keepdims=True)


@pytest.mark.parametrize(("c", "f", "groups", "k", "stride", "pad", "dil"), [
    (4, 6, 2, 3, 1, 1, 1),   # grouped
    (6, 6, 6, 3, 2, 1, 1),   # depthwise
    (3, 6, 3, 3, 1, 2, 2),   # depthwise, channel multiplier 2, dilated
    (6, 4, 2, 5, 2, 2, 1),   # grouped 5x5 (MobileNetV3-style window)
    (3, 4, 1, 3, 2, 1, 1),   # dense, unchanged
])
def test_grouped_window_hist_matches_brute_force(c: int, f: int, groups: int, k: int, stride: int,
                                                 pad: int, dil: int) -> None:
    torch.manual_seed(c * 100 + f * 10 + groups)
    conv = nn.Conv2d(c, f, k, stride=stride, padding=pad, dilation=dil, groups=groups)
    x = torch.randn(2, c, 7, 6).relu()
    w = conv.weight.detach().clone()
    w[w.abs() < 0.08] = 0
    w[0, 0] = 0.0  # one fully pruned kernel: every window of channel 0 x filter 0 is all-zero
    got = np.asarray(conv_window_hist(x, w, conv))
    assert got.shape == (c, k * k + 1)
    np.testing.assert_allclose(got, _brute_window_hist(x, w, conv), atol=1e-12)


@pytest.mark.parametrize(("c", "f", "groups"), [(4, 6, 2), (3, 5, 1), (6, 6, 6)])
def test_chunked_window_hist_is_identical(c: int, f: int, groups: int) -> None:
    """Chunk caps that split the batch and the filters into several (uneven) chunks give
    exactly the single-chunk result, which equals the brute-force loop."""
    torch.manual_seed(c + f + groups)
    conv = nn.Conv2d(c, f, 3, stride=1, padding=1, groups=groups)
    x = torch.randn(5, c, 6, 5).relu()
    w = conv.weight.detach().clone()
    w[w.abs() < 0.1] = 0
    positions = 6 * 5
    one = conv_window_hist(x, w, conv)
    assert window_hist_chunks(5, c, f // groups, 9, positions) == (5, f // groups)  # default: one chunk
    ref = _brute_window_hist(x, w, conv)
    np.testing.assert_allclose(np.asarray(one), ref, atol=1e-12)
    per_image = 16 * c * 9 * positions
    caps = {1: (1, 1),  # smallest chunk: one image, one filter
            per_image + 12 * c * positions * 2: (1, min(2, f // groups)),
            3 * (per_image + 12 * c * positions * (f // groups)): (3, f // groups)}  # 5 images -> 3 + 2
    for cap, plan in caps.items():
        assert window_hist_chunks(5, c, f // groups, 9, positions, cap) == plan
        assert conv_window_hist(x, w, conv, max_chunk_bytes=cap) == one  # bit-identical
    with pytest.raises(ValueError, match="max_chunk_bytes"):
        conv_window_hist(x, w, conv, max_chunk_bytes=0)


def test_chunk_plan_bounds_a_large_early_layer() -> None:
    """ResNet-style 64->64 3x3 conv at 56x56, batch 8: unchunked, the (N, C, F, L) counts
    alone are 8*64*64*3136 float32 = 411 MB (3.1 GB peak measured before chunking); the
    plan keeps one chunk's modelled working memory under the default cap."""
    n, c, fg, kk, positions = 8, 64, 64, 9, 56 * 56
    nb, fb = window_hist_chunks(n, c, fg, kk, positions)
    modelled = nb * (16 * c * kk * positions + fb * 12 * c * positions)
    assert (nb, fb) == (1, 64) and modelled <= CHUNK_BYTES
    nb, fb = window_hist_chunks(n, 512, 512, kk, positions)  # too big for one image: filters split
    assert nb == 1 and 1 <= fb < 512 and 16 * 512 * kk * positions + fb * 12 * 512 * positions <= CHUNK_BYTES


def test_grouped_filters_do_not_leak_across_groups() -> None:
    """Group 1's filters are all zero; group 0's channels must not see those zeros."""
    conv = nn.Conv2d(4, 4, 3, padding=1, groups=2)
    w = torch.ones(4, 2, 3, 3)
    w[2:] = 0.0
    x = torch.ones(1, 4, 5, 5)
    hist = np.asarray(conv_window_hist(x, w, conv))
    assert np.all(hist[2:, 9] == 1.0)  # group 1: every product zero
    assert np.all(hist[:2, 9] == 0.0) and np.all(hist[:2, 0] > 0)  # group 0: only padding zeros
    with pytest.raises(ValueError, match="groups"):
        conv_window_hist(x, torch.ones(4, 4, 3, 3), conv)  # weight of a groups=1 conv


def test_grouped_pointwise_avg_matches_brute_force() -> None:
    torch.manual_seed(1)
    c, f, g = 6, 4, 2
    x = torch.randn(2, c, 3, 3).relu()
    w = torch.randn(f, c // g, 1, 1)
    w[w.abs() < 0.5] = 0
    got = pointwise_avg(x, w, g)
    ref = []
    for ch in range(c):
        q = ch // (c // g)
        a0 = (x[:, ch] == 0).reshape(-1)
        wz = (w[q * (f // g) : (q + 1) * (f // g), ch - q * (c // g), 0, 0] == 0)
        ref.append(float((a0[:, None] | wz[None, :]).double().mean()))
    assert got == pytest.approx(ref, abs=1e-12)
    with pytest.raises(ValueError, match="groups"):
        pointwise_avg(x, w)  # weight has C/2 columns: groups=1 is wrong


def test_depthwise_network_measured_and_simulated_sparse() -> None:
    """A MobileNet-style block: every conv (grouped, depthwise, grouped 1x1) gets a
    measured record that the traced network accepts, and its stages run sparse."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(),  # depthwise
                          nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.ReLU(),  # grouped
                          nn.Conv2d(8, 4, 1, groups=2), nn.Flatten(), nn.Linear(4 * 8 * 8, 5)).eval()
    with torch.no_grad():
        model[2].weight[:, :, 1, :] = 0.0  # depthwise: middle row pruned, >= 3 zeros per window
    net = trace(model, (2, 8, 8))
    stats = layer_sparsity(model, torch.randn(3, 2, 8, 8))
    assert set(stats) == {ly.name for ly in net.layers if ly.op in WEIGHT_OPS}
    by = {ly.name: ly for ly in net.layers}
    assert by["2"].groups == 8 and by["4"].groups == 2 and by["6"].groups == 2
    sp = {k: from_record(v, by[k].window, by[k].channels) for k, v in stats.items()}
    assert np.all(sp["2"].hist[:, :3] == 0)
    dense = Pipeline(net, "zcu102").evaluate(Folding.ones(net))
    sparse = Pipeline(net, "zcu102", sparsity=sp).evaluate(Folding.ones(net))
    assert np.all(sparse.ii_cycles <= dense.ii_cycles)
    for name in ("2", "4"):
        assert sparse.ii_cycles[0, net.index(name)] < dense.ii_cycles[0, net.index(name)], name


def test_dataflow_evaluator_runs_mobilenetv2_depthwise_sparse() -> None:
    """Through the ``dataflow`` plug-in: a measured record for one MobileNetV2 depthwise
    stage makes that stage (and only it) faster than the dense engine."""
    name = "features.2.conv.1.0"
    ly = {x.name: x for x in mobilenetv2().layers}[name]
    assert ly.groups == ly.channels == 96 and ly.kernel == (3, 3)
    torch.manual_seed(0)
    conv = nn.Conv2d(96, 96, 3, stride=2, padding=1, groups=96)
    w = conv.weight.detach().clone()
    w[w.abs() < 0.1] = 0
    x = torch.randn(1, 96, ly.rows, ly.cols).relu()
    rec = {"kind": "window_hist", "hist": conv_window_hist(x, w, conv)}
    opts = {"network": "mobilenetv2", "optimise": False, "act_bits": 8, "weight_bits": 8, "weight_memory": "bram"}
    sparse = DataflowEvaluator({**opts, "sparsity": "measured"}).evaluate({}, {"layer_sparsity": {name: rec}})
    dense = DataflowEvaluator({**opts, "sparsity": "dense"}).evaluate({}, {"layer_sparsity": {name: rec}})
    assert sparse["dataflow_sparsity_source"] == "measured"
    assert sparse["zero_product_share"] > 0
    sl, dl = sparse["dataflow_layers"], dense["dataflow_layers"]
    assert sl[name]["ii_cycles"] < dl[name]["ii_cycles"]
    assert all(sl[k]["ii_cycles"] == dl[k]["ii_cycles"] for k in dl if k != name)
