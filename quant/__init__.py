"""quant: number formats, bit accounting, LQER, KV-cache quantization, sparsity masks.

A plain library (torch + numpy only; nothing of ``dse``). See docs/quant.md.

Entry points: ``get_format(name)``, ``multiplier_cost(a, b)``, ``QuantConfig`` /
``SparsityConfig`` (``from_params``), ``quantize_model``, ``apply_sparsity``, and the
modules ``QMatmul`` / ``KVQuant`` a model uses for its attention matmuls and KV cache.

Names are imported on first use (PEP 562), so ``import quant.desc`` (format descriptions:
parsing, bits, multiplier cost; no torch) never imports torch; ``quant.get_format`` and the
model-side names do.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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

#: public name -> the module defining it
_MODULES = {
    "SALIENCES": "quant.config",
    "FinetuneConfig": "quant.config",
    "QuantConfig": "quant.config",
    "SparsityConfig": "quant.config",
    "finetune": "quant.finetune",
    "FAMILIES": "quant.formats",
    "BlockFormat": "quant.formats",
    "FloatFormat": "quant.formats",
    "Format": "quant.formats",
    "IntFormat": "quant.formats",
    "LogFormat": "quant.formats",
    "MinifloatFormat": "quant.formats",
    "get_format": "quant.formats",
    "multiplier_cost": "quant.formats",
    "LQERCache": "quant.lqer",
    "KVQuant": "quant.model",
    "QConv2d": "quant.model",
    "QLinear": "quant.model",
    "QMatmul": "quant.model",
    "QuantReport": "quant.model",
    "calibrate_input_scales": "quant.model",
    "kv_attention": "quant.model",
    "kv_recent_mask": "quant.model",
    "lqer_factors": "quant.model",
    "quantize_model": "quant.model",
    "run_batch": "quant.model",
    "ActThreshold": "quant.sparsity",
    "SparsityReport": "quant.sparsity",
    "activation_sparsity": "quant.sparsity",
    "apply_sparsity": "quant.sparsity",
    "prunable_modules": "quant.sparsity",
    "salience_scores": "quant.sparsity",
}

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


def __getattr__(name: str) -> Any:
    module = _MODULES.get(name)
    if module is None:
        raise AttributeError(f"module 'quant' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """``quant`` itself: a submodule named like a public name (``quant.finetune``, the
    module of the function ``quant.finetune``) does not replace that name when imported."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _MODULES and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
