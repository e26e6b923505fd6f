"""quant: number formats, bit accounting, LQER, KV-cache quantization, sparsity masks.

A plain library (torch + numpy only; nothing of ``dse``). See docs/quant.md.

Entry points: ``get_format(name)``, ``multiplier_cost(a, b)``, ``QuantConfig`` /
``SparsityConfig`` (``from_params``), ``quantize_model``, ``apply_sparsity``, and the
modules ``QMatmul`` / ``KVQuant`` a model uses for its attention matmuls and KV cache.
"""

from quant.config import SALIENCES, FinetuneConfig, QuantConfig, SparsityConfig
from quant.finetune import finetune
from quant.formats import (
    FAMILIES,
    BlockFormat,
    FloatFormat,
    Format,
    IntFormat,
    LogFormat,
    MinifloatFormat,
    get_format,
    multiplier_cost,
)
from quant.lqer import LQERCache
from quant.model import (
    KVQuant,
    QConv2d,
    QLinear,
    QMatmul,
    QuantReport,
    calibrate_input_scales,
    kv_attention,
    kv_recent_mask,
    lqer_factors,
    quantize_model,
    run_batch,
)
from quant.sparsity import (
    ActThreshold,
    SparsityReport,
    activation_sparsity,
    apply_sparsity,
    prunable_modules,
    salience_scores,
)

__all__ = [
    "FAMILIES",
    "SALIENCES",
    "ActThreshold",
    "BlockFormat",
    "FinetuneConfig",
    "FloatFormat",
    "Format",
    "IntFormat",
    "KVQuant",
    "LQERCache",
    "LogFormat",
    "MinifloatFormat",
    "QConv2d",
    "QLinear",
    "QMatmul",
    "QuantConfig",
    "QuantReport",
    "SparsityConfig",
    "SparsityReport",
    "activation_sparsity",
    "apply_sparsity",
    "calibrate_input_scales",
    "finetune",
    "get_format",
    "kv_attention",
    "kv_recent_mask",
    "lqer_factors",
    "multiplier_cost",
    "prunable_modules",
    "quantize_model",
    "run_batch",
    "salience_scores",
]
