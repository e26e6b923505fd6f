"""Layer-pipelined dataflow accelerator (fpgaConvNet/HASS style) with sparsity.

Every layer of a CNN (or every linear layer of a ViT) gets its own hardware stage;
stages run as a pipeline whose throughput is set by the slowest stage. Zero products
(pruned weights or zero activations) let a stage skip work. numpy only at import; torch
is imported lazily by :func:`simulators.dataflow.trace.trace` alone. See docs/dataflow.md.

Typical use::

    from simulators.dataflow import Pipeline, get_network, optimise, synthetic
    net = get_network("resnet18")
    sp = {ly.name: synthetic(ly.window, ly.channels, 0.5) for ly in net.layers if ly.weights}
    folding, result = optimise(Pipeline(net, "u250", act_bits=8, weight_bits=8, sparsity=sp))
    result.metrics()  # images_per_s, latency_s, dsp, bram18, ..., fits_device
"""

from simulators.dataflow.devices import DEVICES, Device, get_device
from simulators.dataflow.layers import (
    Layer,
    LayerModel,
    bram18_array,
    divisors,
    uram_array,
)
from simulators.dataflow.networks import (
    NETWORKS,
    get_network,
    mobilenetv2,
    mobilenetv3_small,
    resnet18,
)
from simulators.dataflow.optimiser import optimise
from simulators.dataflow.pipeline import Folding, Network, Pipeline, Result, random_foldings
from simulators.dataflow.sparsity import (
    PointwiseAvg,
    WindowHist,
    binomial_hist,
    from_record,
    synthetic,
)

__all__ = [
    "DEVICES",
    "Device",
    "Folding",
    "Layer",
    "LayerModel",
    "NETWORKS",
    "Network",
    "Pipeline",
    "PointwiseAvg",
    "Result",
    "WindowHist",
    "binomial_hist",
    "bram18_array",
    "divisors",
    "from_record",
    "get_device",
    "get_network",
    "mobilenetv2",
    "mobilenetv3_small",
    "optimise",
    "random_foldings",
    "resnet18",
    "synthetic",
    "uram_array",
]
