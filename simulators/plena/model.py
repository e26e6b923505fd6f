"""PLENA: a flattened-systolic-array LLM inference accelerator, priced in closed form.

Matrix unit: ``mlen x blen`` multipliers. One cycle takes one activation row of ``mlen``
elements against an ``mlen x blen`` weight tile and emits ``blen`` dot products, so a
``rows x K`` by ``K x N`` GEMM takes ``ceil(rows/blen) * ceil(K/mlen) * ceil(N/blen) * blen``
cycles (the public PLENA analytic model's count) plus one fill/drain of
``blen + ceil(log2 mlen)`` cycles (skew + adder tree) per op.

FlashAttention mapping: the reduction lanes split into head slices of ``hlen``, so one pass
of QK^T serves ``mlen // (hlen * ceil(head_dim/hlen))`` heads at once; scores are tiled in
``mlen x mlen`` blocks of queries x keys, causal blocks above the diagonal are skipped when
``causal_skip``; P V reduces over keys on the ``mlen`` lanes, one head at a time; the online
softmax runs on the ``vlen``-wide vector unit. Vector ops take ``ceil(elements * ops / vlen)``
cycles plus ``ceil(log2 vlen)`` fill.

Memory: HBM traffic per op from :mod:`simulators.plena.ops` (weights streamed with reuse
limited by the SRAM sizes, activations on chip when they fit the vector SRAM, KV cache
re-read per query block when one head does not fit half the matrix SRAM). Op time =
max(compute, bytes / bandwidth) + fill.
"""

from __future__ import annotations

import numpy as np

from simulators.plena.costs import DEFAULT_COSTS, CostCoefficients
from simulators.plena.engine import Array, InferenceResult, OpCosts, run
from simulators.plena.hardware import Numerics, PlenaHardware, mult_cost
from simulators.plena.ops import OpGraph, cdiv, kv_bytes_per_element, op_hbm_bytes
from simulators.plena.workload import Workload


class PlenaBackend:
    """Prices op graphs on an array of :class:`PlenaHardware` points."""

    def __init__(self, hw: PlenaHardware, *, causal_skip: bool = True,
                 costs: CostCoefficients = DEFAULT_COSTS) -> None:
        self.hw = hw
        self.causal_skip = causal_skip
        self.costs = costs
        self._shape = hw.shape

    def shape(self) -> tuple[int, ...]:
        """Hardware broadcast shape."""
        return self._shape

    def hbm_bytes_per_s(self) -> Array:
        """HBM bandwidth, bytes/s."""
        return self.hw.hbm_gbps * 1e9

    def hbm_capacity_bytes(self) -> Array:
        """HBM capacity, bytes."""
        return self.hw.hbm_gb * 1e9

    def peak_macs_per_s(self) -> Array:
        """mlen * blen MACs per cycle at the clock."""
        return self.hw.mlen * self.hw.blen * self.hw.clock_ghz * 1e9

    def matrix_cycles(self, ops: OpGraph) -> tuple[Array, Array]:
        """(compute cycles, causal-skip fraction of score blocks) per op, (n_ops, *hw)."""
        hw, nd = self.hw, len(self._shape)
        c = ops.col
        MLEN, BLEN, HLEN = hw.mlen, hw.blen, hw.hlen
        m = ops.masks
        M, K, N = c(ops.M, nd), c(ops.K, nd), c(ops.N, nd)
        inst, heads = c(ops.inst, nd), c(ops.heads, nd)
        gemm = inst * cdiv(M, BLEN) * cdiv(K, MLEN) * cdiv(N, BLEN) * BLEN
        # attention: mlen x mlen blocks of queries x keys
        rows, kv_len, hd = (c(a, nd) for a in ops.attention_dims)
        bq, bk = np.minimum(MLEN, rows), np.minimum(MLEN, kv_len)
        nbq, nbk = cdiv(rows, bq), cdiv(kv_len, bk)
        if self.causal_skip:
            pairs = np.where(c(ops.causal, nd), nbq * (nbq + 1.0) / 2.0, nbq * nbk)
        else:
            pairs = nbq * nbk
        slices = cdiv(hd, HLEN)
        per_pass = np.maximum(np.floor(MLEN / (slices * HLEN)), 1.0)
        q_tiles = pairs * cdiv(bq, BLEN) * BLEN
        qk = inst * cdiv(heads, per_pass) * cdiv(slices * HLEN, MLEN) * q_tiles * cdiv(bk, BLEN)
        pv = inst * heads * q_tiles * cdiv(bk, MLEN) * cdiv(hd, BLEN)
        cycles = np.where(c(m["gemm"], nd), gemm,
                          np.where(c(m["qk"], nd), qk, np.where(c(m["pv"], nd), pv, 0.0)))
        return cycles, pairs / (nbq * nbk)

    def op_costs(self, ops: OpGraph, numerics: Numerics, w_bytes: Array) -> OpCosts:
        """Compute seconds, HBM bytes, fill seconds and energy of every op."""
        hw, k, nd = self.hw, self.costs, len(self._shape)
        c = ops.col
        m = {key: c(v, nd) for key, v in ops.masks.items()}
        a_b = numerics.act_bytes
        kv_b = c(kv_bytes_per_element(ops, numerics)[0], nd)  # per element of a cache read
        mat_cyc, block_frac = self.matrix_cycles(ops)
        vec_work = c(ops.vec_elems * ops.vec_ops, nd) * np.where(m["vec"], block_frac, 1.0)
        vec_cyc = cdiv(vec_work, hw.vlen)
        cycles = np.where(m["mat"], mat_cyc, np.where(m["vec"], vec_cyc, 0.0))
        fill = np.where(m["mat"], hw.blen + np.ceil(np.log2(hw.mlen)),
                        np.where(m["vec"], np.ceil(np.log2(hw.vlen)), 0.0))
        hz = hw.clock_ghz * 1e9
        hbm = op_hbm_bytes(ops, w_bytes, a_b, numerics, nd, vector_sram_bytes=hw.vector_sram_bytes,
                           matrix_sram_bytes=hw.matrix_sram_bytes, q_block=hw.mlen)
        # dynamic energy
        e_wa = mult_cost(numerics.weights, numerics.acts) * k.mult_int8_pj + k.acc_pj
        e_ka = mult_cost(numerics.acts, numerics.kv) * k.mult_int8_pj + k.acc_pj
        macs = c(ops.macs, nd)
        M, K, N, inst = c(ops.M, nd), c(ops.K, nd), c(ops.N, nd), c(ops.inst * ops.heads, nd)
        b_bytes = np.where(m["gemm"], c(w_bytes, nd), kv_b)
        operand_reads = np.where(m["mat"], inst * (M * K * cdiv(N, hw.blen) * a_b
                                                   + K * N * cdiv(M, hw.blen) * b_bytes), 0.0)
        operand_reads = operand_reads * np.where(m["gemm"], 1.0, block_frac)
        vec_io = c((ops.act_in + ops.act_out) * a_b, nd) * m["vec"]
        sram_bits = (hbm + operand_reads + vec_io) * 8.0
        pj = (macs * np.where(m["gemm"], e_wa, e_ka) + vec_work * k.vector_op_pj
              + sram_bits * k.sram_pj_per_bit + hbm * 8.0 * k.hbm_pj_per_bit)
        return OpCosts(compute_s=cycles / hz, hbm_bytes=hbm, fill_s=fill / hz,
                       energy_j=pj * 1e-12)

    def area_mm2(self, numerics: Numerics) -> Array:
        """Silicon area, mm2: MAC array + vector unit + SRAMs + HBM interface."""
        hw, k = self.hw, self.costs
        mult = max(mult_cost(numerics.weights, numerics.acts),
                   mult_cost(numerics.acts, numerics.kv))
        mac_um2 = mult * k.mult_int8_um2 + k.acc_um2
        um2 = (hw.mlen * hw.blen * mac_um2 + hw.vlen * k.vector_lane_um2
               + (hw.matrix_sram_bytes + hw.vector_sram_bytes) * 8.0 * k.sram_um2_per_bit)
        return um2 * 1e-6 + hw.hbm_gbps * k.hbm_phy_mm2_per_gbps


def simulate(hw: PlenaHardware, workload: Workload, numerics: Numerics | None = None, *,
             causal_skip: bool = True, costs: CostCoefficients = DEFAULT_COSTS,
             overlap_vector: bool = False) -> InferenceResult:
    """Price one inference request on one or many PLENA design points.

    Args:
        hw: hardware point(s); array fields broadcast.
        workload: model, batch, prompt length S, output length O.
        numerics: operand formats (default MXINT4 weights, MXINT8 activations, MXINT4 KV).
        causal_skip: skip score blocks above the causal diagonal in prefill.
        costs: energy/area coefficients.
        overlap_vector: run the vector unit concurrently with the matrix unit (pipelined:
            per layer, max of the two units' times and the HBM time) instead of summing
            every op one after another (docs/simulators.md).

    Returns:
        An :class:`InferenceResult` (arrays of ``hw.shape``), with ``area_mm2`` filled.
    """
    numerics = numerics or Numerics()
    backend = PlenaBackend(hw, causal_skip=causal_skip, costs=costs)
    res = run(backend, workload, numerics, overlap_vector=overlap_vector)
    res.area_mm2 = backend.area_mm2(numerics) + np.zeros(hw.shape)
    return res
