"""quant: number formats, bit accounting, LQER, KV-cache quantization, sparsity masks.

A plain library (torch + numpy only; nothing of ``dse``). See docs/quant.md.

Entry points: ``get_format(name)``, ``multiplier_cost(a, b)``, ``QuantConfig`` /
``SparsityConfig`` (``from_params``), ``quantize_model``, ``apply_sparsity``, and the
modules ``QMatmul`` / ``KVQuant`` a model uses for its attention matmuls and KV cache.

The public names are the ``TYPE_CHECKING`` imports below (their one list: type checkers
read them, and ``__getattr__`` finds each name's module there). They are imported on first
use (PEP 562), so ``import quant.desc`` (format descriptions:
parsing, bits, multiplier cost; no torch) never imports torch; ``quant.get_format`` and the
model-side names do.
"""

# ruff: noqa: F401  (the TYPE_CHECKING imports are the public names: _exports() reads them)
from __future__ import annotations

import ast
import importlib
import sys
import types
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from quant.config import SALIENCES, FinetuneConfig, QuantConfig, SparsityConfig
    from quant.desc import multiplier_cost
    from quant.finetune import finetune
    from quant.formats import (
        FAMILIES,
        BlockFormat,
        FloatFormat,
        Format,
        IntFormat,
        LogFormat,
        MinifloatFormat,
        as_format,
        get_format,
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

def _exports() -> dict[str, str]:
    """Public name -> the module defining it, read from the ``TYPE_CHECKING`` imports above
    (the one list of the public names: type checkers read it there, ``__getattr__`` here)."""
    tree = ast.parse(Path(__file__).read_text(encoding="utf-8"))
    block = next(n for n in tree.body if isinstance(n, ast.If) and ast.unparse(n.test) == "TYPE_CHECKING")
    return {a.asname or a.name: str(n.module) for n in block.body if isinstance(n, ast.ImportFrom)
            for a in n.names}


#: public name -> the module defining it
_MODULES = _exports()

__all__ = sorted(_MODULES)


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
