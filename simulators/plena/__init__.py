"""PLENA LLM inference accelerator model (closed form, vectorised over hardware points).

>>> from simulators.plena import PlenaHardware, Workload, Numerics, simulate
>>> res = simulate(PlenaHardware(), Workload.of("llama-3.1-8b", batch=4,
...                prompt_len=32768, output_len=1024), Numerics("mxint4", "mxint8", "mxint4"))
>>> res.metrics()["tokens_per_s"] > 0
True
"""

from simulators.plena.anchor import anchor_gemm_cycles
from simulators.plena.costs import DEFAULT_COSTS, CostCoefficients
from simulators.plena.engine import InferenceResult, OpBreakdown
from simulators.plena.hardware import Numerics, PlenaHardware
from simulators.plena.model import PlenaBackend, simulate
from simulators.plena.workload import ModelConfig, Workload, load_model_config, shipped_models

__all__ = [
    "DEFAULT_COSTS",
    "CostCoefficients",
    "InferenceResult",
    "ModelConfig",
    "Numerics",
    "OpBreakdown",
    "PlenaBackend",
    "PlenaHardware",
    "Workload",
    "anchor_gemm_cycles",
    "load_model_config",
    "shipped_models",
    "simulate",
]
