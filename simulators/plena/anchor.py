"""The public PLENA analytic model's GEMM count, kept as the anchor our model must meet.

AICrossSim/PLENA_Simulator (``analytic_models``) prices a GEMM of ``rows x K`` by
``K x N`` as ``ceil(rows/BLEN) * ceil(K/MLEN) * ceil(N/BLEN) * BLEN`` cycles at 1 GHz and
treats HBM transfers as free. It also omits W_O, the second residual add and the LM head,
and prices the K and V projections with a reduction dim of ``nkv * head_dim`` instead of
``hidden``. See docs/simulators.md for the comparison.
"""

from __future__ import annotations

import math


def anchor_gemm_cycles(rows: int, k: int, n: int, mlen: int, blen: int) -> int:
    """Cycles of one GEMM in the public PLENA analytic model."""
    return math.ceil(rows / blen) * math.ceil(k / mlen) * math.ceil(n / blen) * blen
