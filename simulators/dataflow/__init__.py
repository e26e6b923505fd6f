"""Layer-pipelined dataflow accelerator (fpgaConvNet/HASS style) with sparsity.

Every layer of a CNN gets its own hardware stage; stages run as a pipeline whose
throughput is set by the slowest stage. Zero products (pruned weights or zero
activations) let a stage skip work. numpy only at import; torch is imported lazily by
:func:`trace` alone. See docs/dataflow.md.
"""

from simulators.dataflow.layers import Layer, LayerModel, bram18_array, divisors, dsp_per_multiplier
from simulators.dataflow.sparsity import (
    PointwiseAvg,
    WindowHist,
    binomial_hist,
    from_record,
    synthetic,
)

__all__ = [
    "Layer",
    "LayerModel",
    "PointwiseAvg",
    "WindowHist",
    "binomial_hist",
    "bram18_array",
    "divisors",
    "dsp_per_multiplier",
    "from_record",
    "synthetic",
]
