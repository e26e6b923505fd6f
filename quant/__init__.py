"""quant: number formats, bit accounting, LQER, KV-cache quantization, sparsity masks.

A plain library (torch + numpy only). See docs/quant.md.
"""

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

__all__ = [
    "FAMILIES",
    "BlockFormat",
    "FloatFormat",
    "Format",
    "IntFormat",
    "LogFormat",
    "MinifloatFormat",
    "get_format",
    "multiplier_cost",
]
