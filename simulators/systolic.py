"""Closed-form systolic-array GEMM model, cycle-exact against SCALE-Sim v3.

An ``rows x cols`` array computes ``ifmap (M x K) @ filter (K x N) = ofmap (M x N)`` with
one of three dataflows. Each dataflow maps the GEMM onto the array as
``(Sr, Sc, T)`` = spatial rows, spatial columns, temporal length:

====  =========  ==================================  ================================
df    (Sr,Sc,T)  stationary in the array             cycles per fold
====  =========  ==================================  ================================
os    (M, N, K)  outputs (one per PE)                ``T + R + C - 2``
ws    (K, N, M)  weights                             ``T + 2R + C - 2``
is    (K, M, N)  inputs                              ``T + 2R + C - 2``
====  =========  ==================================  ================================

``folds = ceil(Sr/R) * ceil(Sc/C)`` and ``compute_cycles = folds * per_fold - 1``, which is
SCALE-Sim's "Total Cycles" (compute incl. fill and drain, no initial prefetch, no stalls).

SRAM counts are element accesses at the array edge (one per operand element moved), the
unit SCALE-Sim uses. DRAM counts model double-buffered scratchpads: each scratchpad is split
into two halves (one computes, one prefetches), so an operand's reuse working set must fit
in *half* its scratchpad to be fetched once. See ``docs/simulators.md`` for each place where
these counts differ from SCALE-Sim's and why.

All size arguments broadcast as numpy arrays; the dataflow is one string per call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

Dataflow = Literal["os", "ws", "is"]
DATAFLOWS: tuple[str, ...] = ("os", "ws", "is")

#: SCALE-Sim's default scratchpad sizes (64 kB each), bytes.
DEFAULT_SRAM_BYTES = 64 * 1024

IntArray = NDArray[np.int64]
FloatArray = NDArray[np.float64]


def _cdiv(a: IntArray, b: IntArray) -> IntArray:
    """Ceiling division of non-negative integer arrays."""
    return -(-a // b)


@dataclass(frozen=True)
class GemmResult:
    """Result of :func:`gemm`; every field is a numpy array of the broadcast shape.

    Attributes:
        compute_cycles: array cycles, fill and drain included (SCALE-Sim "Total Cycles").
        utilisation: useful MACs / (rows * cols * compute_cycles), in [0, 1].
        macs: useful multiply-accumulates, M*K*N.
        folds: number of array-sized tiles the mapping is cut into.
        mapping_efficiency: mean share of the array's PEs a fold maps, in [0, 1].
        sram_reads_ifmap: ifmap (M x K) element reads from its scratchpad.
        sram_reads_filter: filter (K x N) element reads from its scratchpad.
        sram_writes_ofmap: ofmap element writes (partial sums of every K-fold for ws/is).
        sram_reads_psum: partial sums read back to accumulate (0 for os; SCALE-Sim does
            not count these).
        dram_reads_ifmap / dram_reads_filter: elements fetched from DRAM into the
            double-buffered scratchpads.
        dram_writes_ofmap / dram_reads_psum: elements written to DRAM (final outputs, plus
            spilled partial sums when a K-fold's output tile does not fit the ofmap
            scratchpad half) and partial sums read back from DRAM.
    """

    compute_cycles: IntArray
    utilisation: FloatArray
    macs: IntArray
    folds: IntArray
    mapping_efficiency: FloatArray
    sram_reads_ifmap: IntArray
    sram_reads_filter: IntArray
    sram_writes_ofmap: IntArray
    sram_reads_psum: IntArray
    dram_reads_ifmap: IntArray
    dram_reads_filter: IntArray
    dram_writes_ofmap: IntArray
    dram_reads_psum: IntArray

    @property
    def dram_elements(self) -> IntArray:
        """All DRAM traffic, elements (reads + writes)."""
        return (
            self.dram_reads_ifmap
            + self.dram_reads_filter
            + self.dram_writes_ofmap
            + self.dram_reads_psum
        )


def _positive_ints(name: str, value: ArrayLike) -> IntArray:
    if type(value) is int and value >= 1:
        return np.asarray(value, dtype=np.int64)
    arr = np.asarray(value)
    if arr.dtype.kind not in "iuf" or not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}: expected positive integers, got {value!r}")
    iarr = arr.astype(np.int64)
    if np.any(iarr != arr) or np.any(iarr < 1):
        raise ValueError(f"{name}: expected positive integers, got {value!r}")
    return iarr


def fold_cycles(
    Sr: ArrayLike, Sc: ArrayLike, T: ArrayLike, rows: ArrayLike, cols: ArrayLike, dataflow: str
) -> IntArray:
    """Compute cycles of an already-mapped problem (spatial Sr x Sc, temporal T).

    Returns ``folds * (T + R + C - 2) - 1`` (os) or ``folds * (T + 2R + C - 2) - 1``
    (ws/is), array cycles.
    """
    R = np.asarray(rows, dtype=np.int64)
    C = np.asarray(cols, dtype=np.int64)
    folds = _cdiv(np.asarray(Sr, dtype=np.int64), R) * _cdiv(np.asarray(Sc, dtype=np.int64), C)
    fill = R + C - 2 if dataflow == "os" else 2 * R + C - 2
    return folds * (np.asarray(T, dtype=np.int64) + fill) - 1


def gemm(
    M: ArrayLike,
    K: ArrayLike,
    N: ArrayLike,
    rows: ArrayLike,
    cols: ArrayLike,
    dataflow: str = "os",
    *,
    ifmap_sram_bytes: ArrayLike = DEFAULT_SRAM_BYTES,
    filter_sram_bytes: ArrayLike = DEFAULT_SRAM_BYTES,
    ofmap_sram_bytes: ArrayLike = DEFAULT_SRAM_BYTES,
    word_bytes: ArrayLike = 1,
) -> GemmResult:
    """Model ``(M x K) @ (K x N)`` on a ``rows x cols`` systolic array.

    Args:
        M, K, N: GEMM sizes (M = rows of the ifmap / tokens, K = reduction, N = outputs).
        rows, cols: array height R and width C, processing elements.
        dataflow: ``"os"`` (output stationary), ``"ws"`` (weight stationary) or ``"is"``
            (input stationary).
        ifmap_sram_bytes, filter_sram_bytes, ofmap_sram_bytes: scratchpad sizes, bytes
            (double buffered: half of each holds the working set).
        word_bytes: bytes per element in the scratchpads.

    Returns:
        A :class:`GemmResult` of arrays with the broadcast shape of the inputs.

    Raises:
        ValueError: a size that is not a positive integer, or an unknown dataflow.
    """
    if dataflow not in DATAFLOWS:
        raise ValueError(f"dataflow: expected one of {DATAFLOWS}, got {dataflow!r}")
    m, k, n, R, C = np.broadcast_arrays(
        _positive_ints("M", M),
        _positive_ints("K", K),
        _positive_ints("N", N),
        _positive_ints("rows", rows),
        _positive_ints("cols", cols),
    )
    wb = np.asarray(word_bytes, dtype=np.float64)
    if np.any(wb <= 0):
        raise ValueError(f"word_bytes: expected > 0, got {word_bytes!r}")
    half = {}
    for name, size in (
        ("ifmap_sram_bytes", ifmap_sram_bytes),
        ("filter_sram_bytes", filter_sram_bytes),
        ("ofmap_sram_bytes", ofmap_sram_bytes),
    ):
        s = np.asarray(size, dtype=np.float64)
        if np.any(s < 0):
            raise ValueError(f"{name}: expected >= 0 bytes, got {size!r}")
        half[name] = np.floor(s / wb) // 2  # elements one buffer half holds

    if dataflow == "os":
        Sr, Sc, T = m, n, k
    elif dataflow == "ws":
        Sr, Sc, T = k, n, m
    else:
        Sr, Sc, T = k, m, n
    row_folds = _cdiv(Sr, R)
    col_folds = _cdiv(Sc, C)
    folds = row_folds * col_folds
    cycles = fold_cycles(Sr, Sc, T, R, C, dataflow)
    macs = m * k * n
    util = macs / (R * C * cycles).astype(np.float64)
    mapping = (Sr * Sc) / (folds * R * C).astype(np.float64)

    mk, kn, mn = m * k, k * n, m * n
    zero = np.zeros_like(mk)
    ifmap_fits = mk <= half["ifmap_sram_bytes"]
    filter_fits = kn <= half["filter_sram_bytes"]
    if dataflow == "os":
        # loop: column folds (filter K x C tiles) outer, row folds (ifmap R x K) inner
        sram_if, sram_f, sram_o, sram_ps = mk * col_folds, kn * row_folds, mn, zero
        tile_fits = k * np.minimum(C, n) <= half["filter_sram_bytes"]
        dram_if = np.where(ifmap_fits, mk, sram_if)
        dram_f = np.where(tile_fits, kn, sram_f)
        dram_o, dram_ps = mn, zero
    else:
        k_folds = row_folds  # Sr = K for ws and is
        sram_o = mn * k_folds
        sram_ps = mn * (k_folds - 1)
        if dataflow == "ws":
            # loop: column folds over N outer, K folds inner; weights read once
            sram_if, sram_f = mk * col_folds, kn
            dram_if = np.where(ifmap_fits, mk, sram_if)
            dram_f = kn
            psum_tile = m * np.minimum(C, n)
        else:
            # loop: column folds over M outer, K folds inner; inputs read once
            sram_if, sram_f = mk, kn * col_folds
            dram_if = mk
            dram_f = np.where(filter_fits, kn, sram_f)
            psum_tile = np.minimum(C, m) * n
        psum_fits = (psum_tile <= half["ofmap_sram_bytes"]) | (k_folds == 1)
        dram_o = np.where(psum_fits, mn, sram_o)
        dram_ps = np.where(psum_fits, 0, sram_ps)

    def i64(x: ArrayLike) -> IntArray:
        out = np.empty(m.shape, dtype=np.int64)
        out[...] = x
        return out

    return GemmResult(
        compute_cycles=i64(cycles),
        utilisation=np.asarray(util, dtype=np.float64),
        macs=i64(macs),
        folds=i64(folds),
        mapping_efficiency=np.asarray(mapping, dtype=np.float64),
        sram_reads_ifmap=i64(sram_if),
        sram_reads_filter=i64(sram_f),
        sram_writes_ofmap=i64(sram_o),
        sram_reads_psum=i64(sram_ps),
        dram_reads_ifmap=i64(dram_if),
        dram_reads_filter=i64(dram_f),
        dram_writes_ofmap=i64(dram_o),
        dram_reads_psum=i64(dram_ps),
    )
