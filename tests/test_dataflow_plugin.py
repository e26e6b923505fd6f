"""The ``dataflow`` evaluator plug-in and the ``layer_sparsity`` contract."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from dse import registry
from dse.plugins.dataflow import DataflowEvaluator
from simulators.dataflow.layers import WEIGHT_OPS
from simulators.dataflow.networks import resnet18
from simulators.dataflow.pipeline import Folding, Pipeline
from simulators.dataflow.sparsity import binomial_hist, from_record
from simulators.dataflow.trace import trace


def test_registered_and_options_validated() -> None:
    factory = registry.get("dataflow")
    assert factory.validate_options({"network": "resnet18"})["device"] == "u250"
    for bad, field in (({"network": "vgg"}, "network"), ({"network": "resnet18", "device": "vu9p"}, "device"),
                       ({"network": "resnet18", "budget": {"dsps": 3}}, "budget"),
                       ({"network": "resnet18", "colour": 1}, "colour"),
                       ({"network": "resnet18", "act_density": 2.0}, "act_density")):
        with pytest.raises(ValueError, match=field):
            factory.validate_options(bad)


def _measured_binomial(p: float) -> dict:
    out = {}
    for ly in resnet18().layers:
        if ly.op not in WEIGHT_OPS:
            continue
        if ly.window > 1:
            out[ly.name] = {"kind": "window_hist", "hist": binomial_hist(ly.window, p, ly.channels).hist.tolist()}
        else:
            out[ly.name] = {"kind": "pointwise_avg", "avg": [p] * ly.channels}
    return out


def test_measured_equals_synthetic_for_binomial() -> None:
    ev = DataflowEvaluator({"network": "resnet18", "act_bits": 8, "weight_bits": 8, "budget": {"dsp": 2000}})
    syn = ev.evaluate({"sparsity.density": 0.6}, {})
    mea = ev.evaluate({}, {"layer_sparsity": _measured_binomial(0.4)})
    assert syn["dataflow_sparsity_source"] == "synthetic" and mea["dataflow_sparsity_source"] == "measured"
    for k in ("images_per_s", "dsp", "bram18", "lut", "ff", "fits_device"):
        assert mea[k] == pytest.approx(syn[k], rel=1e-9), k
    dense = ev.evaluate({}, {})
    assert dense["images_per_s_per_dsp"] < syn["images_per_s_per_dsp"]
    assert syn["dsp"] <= 2000 and syn["fits_device"] == 1.0
    with pytest.raises(ValueError, match="layer_sparsity"):
        ev.evaluate({}, {"layer_sparsity": {"layer9.conv": {"kind": "pointwise_avg", "avg": [0.1]}}})
    small = ev.evaluate({"sparsity.density": 0.6, "hw.budget.dsp": 500}, {})  # a searched budget
    assert small["dsp"] <= 500 and small["images_per_s"] < syn["images_per_s"]
    with pytest.raises(ValueError, match="hw.budget.dsps"):
        ev.evaluate({"hw.budget.dsps": 5}, {})


def test_fixed_folding_from_params_matches_library() -> None:
    ev = DataflowEvaluator({"network": "resnet18", "optimise": False, "act_bits": 16, "weight_bits": 16,
                            "weight_memory": "bram"})
    params = {"hw.device": "u250", "hw.layer.conv1.coarse_out": 8, "hw.layer.fc.coarse_in": 4}
    got = ev.evaluate(params, {})
    net = resnet18()
    fold = Folding.ones(net)
    fold.coarse_out[0, net.index("conv1")] = 8
    fold.coarse_in[0, net.index("fc")] = 4
    want = Pipeline(net, "u250", 16, 16, weight_memory="bram").evaluate(fold).metrics()
    for k, v in want.items():
        assert got[k] == pytest.approx(v), k
    assert got["dataflow_layers"]["conv1"]["coarse_out"] == 8
    with pytest.raises(ValueError, match="hw.layer.nope.fine"):
        ev.evaluate({"hw.layer.nope.fine": 2}, {})


def test_contract_with_measured_statistics() -> None:
    """layer_sparsity measured by evaluators.sparsity_stats parses for the traced network."""
    from evaluators.sparsity_stats import layer_sparsity

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(4, 6, 1), nn.Flatten(), nn.Linear(6 * 8 * 8, 5)).eval()
    with torch.no_grad():
        model[2].weight[:, :, 0, 0] = 0.0  # pruned taps: at least 1 zero product per window
    net = trace(model, (2, 8, 8))
    stats = layer_sparsity(model, torch.randn(3, 2, 8, 8))
    assert set(stats) == {ly.name for ly in net.layers if ly.op in WEIGHT_OPS}
    by = {ly.name: ly for ly in net.layers}
    sp = {k: from_record(v, by[k].window, by[k].channels) for k, v in stats.items()}
    assert np.all(sp["2"].hist[:, 0] == 0)  # every window of layer "2" has a zero product
    dense = Pipeline(net, "zcu102").evaluate(Folding.ones(net))
    sparse = Pipeline(net, "zcu102", sparsity=sp).evaluate(Folding.ones(net))
    assert np.all(sparse.ii_cycles <= dense.ii_cycles)
    assert sparse.ii_cycles[0, net.index("2")] < dense.ii_cycles[0, net.index("2")]


def test_traced_evaluator_network() -> None:
    """``network = "glyph_cnn"``: the shipped model's architecture is traced (shapes only)."""
    from evaluators.models import GlyphCNN

    ev = DataflowEvaluator({"network": "glyph_cnn", "device": "zcu102", "max_utilisation": 0.9})
    convs = [ly for ly in ev.net.layers if ly.op in WEIGHT_OPS]
    modules = {n for n, m in GlyphCNN().named_modules() if isinstance(m, nn.Conv2d | nn.Linear)}
    assert {ly.name for ly in convs} == modules  # widths come from the weights file, names do not
    assert convs and convs[0].inputs == ()
    out = ev.evaluate({"quant.weights": "int8", "quant.acts": "int8", "sparsity.density": 0.5}, {})
    assert out["fits_device"] == 1.0 and out["dsp"] <= 0.9 * 2520
    assert out["zero_product_share"] == pytest.approx(0.5)
