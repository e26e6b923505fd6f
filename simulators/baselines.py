"""GPU (A100, H100) and TPU v6e baselines over the same op graph as the PLENA model.

Both reuse :mod:`simulators.plena.engine` (op time = max(compute, HBM bytes / bandwidth) +
fixed overhead, closed-form decode sums) and the SRAM-reuse traffic rules of
:mod:`simulators.plena.ops`, so differences against PLENA come from the compute mapping
and the operand formats, not from a different accounting.

* GPU: tensor cores at their dense bf16 peak, with MMA tile padding (m16 n8 k16) of every
  matmul; element-wise work on the CUDA cores' fp32 peak; ``launch_s`` per kernel; L2 is the
  SRAM that bounds reuse; FlashAttention-2 query blocks of 128 rows.
* TPU v6e: ``n_mxu`` 256 x 256 weight-stationary systolic MXUs priced by
  :func:`simulators.systolic.fold_cycles` (SCALE-Sim's count: weight load,
  fill and drain serialised per fold; ``pipelined_folds`` gives the optimistic bound),
  folds shared evenly by the MXUs;
  element-wise work on the vector unit.

``iso_resources(plena_hw)`` rescales a preset to the PLENA point's multiplier count
(``mlen * blen``), HBM bandwidth and capacity and on-chip SRAM (matrix + vector), keeping
the preset's clock: the comparison the PLENA paper makes.

Preset sources: NVIDIA A100 Tensor Core GPU datasheet (SXM4 80 GB: 312 TFLOP/s dense
bf16, 19.5 TFLOP/s fp32, 2039 GB/s, 40 MB L2; 432 tensor cores x 256 FMA/clk at 1.41 GHz);
NVIDIA H100 datasheet / Hopper whitepaper (SXM5 80 GB: 989 TFLOP/s dense bf16, 67 TFLOP/s
fp32, 3350 GB/s, 50 MB L2; 528 tensor cores x 512 FMA/clk at 1.83 GHz); Google Cloud TPU
v6e (Trillium) documentation (918 TFLOP/s bf16, 32 GB HBM at 1640 GB/s, 4 MXUs of 256 x 256
per TensorCore, hence about 1.75 GHz). The TPU's on-chip vector memory size and vector
throughput are not published per chip; the values below are assumptions, marked.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from simulators.plena.costs import DEFAULT_COSTS, CostCoefficients
from simulators.plena.engine import Array, InferenceResult, OpCosts, run
from simulators.plena.hardware import Numerics, PlenaHardware, mult_cost
from simulators.plena.ops import OpGraph, cdiv, kv_bytes_per_element, op_hbm_bytes
from simulators.plena.workload import Workload
from simulators.systolic import fold_cycles

BF16 = Numerics("bf16", "bf16", "bf16")


@dataclass(frozen=True)
class GpuSpec:
    """A tensor-core GPU. Fields may be numpy arrays (iso-resource sweeps).

    Attributes:
        name: label. multipliers: tensor-core multipliers (FMA lanes). clock_ghz: GHz.
        vector_tflops: element-wise peak, TFLOP/s (1 op = 1 flop).
        hbm_gbps: GB/s. hbm_gb: GB. sram_bytes: L2, bytes. launch_s: per-kernel overhead, s.
    """

    name: str
    multipliers: float
    clock_ghz: float
    vector_tflops: float
    hbm_gbps: float
    hbm_gb: float
    sram_bytes: float
    launch_s: float = 2e-6

    @property
    def peak_tflops(self) -> float:
        """Dense matmul peak, TFLOP/s (2 flops per multiply-accumulate)."""
        return 2.0 * self.multipliers * self.clock_ghz * 1e-3

    def iso_resources(self, hw: PlenaHardware) -> GpuSpec:
        """This GPU scaled to ``hw``'s multipliers, HBM and SRAM (clock kept)."""
        scale = hw.multipliers / self.multipliers
        return dataclasses.replace(
            self, name=f"{self.name}-iso", multipliers=hw.multipliers,
            vector_tflops=self.vector_tflops * scale, hbm_gbps=hw.hbm_gbps, hbm_gb=hw.hbm_gb,
            sram_bytes=hw.matrix_sram_bytes + hw.vector_sram_bytes)


@dataclass(frozen=True)
class TpuSpec:
    """A TPU-like chip of 256 x 256 weight-stationary MXUs. Fields may be numpy arrays.

    Attributes:
        name: label. n_mxu: MXUs (fractional allowed in iso sweeps). mxu_dim: MXU side.
        clock_ghz: GHz. vector_ops_per_cycle: element-wise ops per cycle.
        hbm_gbps: GB/s. hbm_gb: GB. sram_bytes: on-chip vector memory, bytes.
        pipelined_folds: optimistic bound: each fold's weight load and fill overlap the
            previous fold (``max(M, 256)`` cycles per fold, one fill/drain per op) instead
            of SCALE-Sim's serial ``M + 3*256 - 2`` per fold.
    """

    name: str
    n_mxu: float
    mxu_dim: int
    clock_ghz: float
    vector_ops_per_cycle: float
    hbm_gbps: float
    hbm_gb: float
    sram_bytes: float
    pipelined_folds: bool = False

    @property
    def multipliers(self) -> float:
        """n_mxu * mxu_dim**2."""
        return self.n_mxu * self.mxu_dim**2

    def iso_resources(self, hw: PlenaHardware) -> TpuSpec:
        """This TPU scaled to ``hw``'s multipliers, HBM and SRAM (clock kept)."""
        n = hw.multipliers / self.mxu_dim**2
        return dataclasses.replace(
            self, name=f"{self.name}-iso", n_mxu=n,
            vector_ops_per_cycle=self.vector_ops_per_cycle * n / self.n_mxu,
            hbm_gbps=hw.hbm_gbps, hbm_gb=hw.hbm_gb,
            sram_bytes=hw.matrix_sram_bytes + hw.vector_sram_bytes)


A100 = GpuSpec("a100", multipliers=432 * 256, clock_ghz=1.41, vector_tflops=19.5,
               hbm_gbps=2039.0, hbm_gb=80.0, sram_bytes=40e6)
H100 = GpuSpec("h100", multipliers=528 * 512, clock_ghz=1.83, vector_tflops=67.0,
               hbm_gbps=3350.0, hbm_gb=80.0, sram_bytes=50e6)
# vector_ops_per_cycle (8 sublanes x 128 lanes x 4 ALUs) and sram_bytes (128 MiB) are
# assumptions: Google does not publish them for v6e.
TPU_V6E = TpuSpec("tpu-v6e", n_mxu=4, mxu_dim=256, clock_ghz=1.75,
                  vector_ops_per_cycle=8 * 128 * 4, hbm_gbps=1640.0, hbm_gb=32.0,
                  sram_bytes=128 * 2**20)
PRESETS: dict[str, GpuSpec | TpuSpec] = {"a100": A100, "h100": H100, "tpu-v6e": TPU_V6E}


def _energy(ops: OpGraph, nd: int, numerics: Numerics, w_bytes: Array, hbm: Array,
            vec_work: Array, k: CostCoefficients) -> Array:
    """Dynamic energy with PLENA's coefficients (same technology for a fair ratio), J."""
    c = ops.col
    gemm = c(ops.masks["gemm"], nd)
    e_wa = mult_cost(numerics.weights, numerics.acts) * k.mult_int8_pj + k.acc_pj
    e_ka = mult_cost(numerics.acts, numerics.kv) * k.mult_int8_pj + k.acc_pj
    macs = c(ops.macs, nd)
    operand = np.where(gemm, c(ops.w_elems * w_bytes, nd),
                       c(ops.kv_read * kv_bytes_per_element(ops, numerics)[0], nd))
    pj = (macs * np.where(gemm, e_wa, e_ka) + vec_work * k.vector_op_pj
          + (hbm + operand) * 8.0 * k.sram_pj_per_bit + hbm * 8.0 * k.hbm_pj_per_bit)
    return pj * 1e-12


class _SpecBackend:
    """Shared plumbing of the baseline backends (spec fields may be numpy arrays)."""

    def __init__(self, spec: GpuSpec | TpuSpec, costs: CostCoefficients = DEFAULT_COSTS
                 ) -> None:
        self.spec, self.costs = spec, costs
        self._shape = np.broadcast_shapes(*(np.shape(getattr(spec, f.name))
                                            for f in dataclasses.fields(spec)
                                            if f.name != "name"))

    def shape(self) -> tuple[int, ...]:
        """Broadcast shape of the spec's array fields."""
        return self._shape

    def hbm_bytes_per_s(self) -> Array:
        """HBM bandwidth, bytes/s."""
        return np.asarray(self.spec.hbm_gbps, dtype=np.float64) * 1e9

    def hbm_capacity_bytes(self) -> Array:
        """HBM capacity, bytes."""
        return np.asarray(self.spec.hbm_gb, dtype=np.float64) * 1e9

    def peak_macs_per_s(self) -> Array:
        """Matrix-unit MACs per second."""
        return np.asarray(self.spec.multipliers * self.spec.clock_ghz * 1e9, dtype=np.float64)

    def _hbm(self, ops: OpGraph, numerics: Numerics, w_bytes: Array, q_block: float) -> Array:
        sram = self.spec.sram_bytes
        return op_hbm_bytes(ops, w_bytes, numerics.act_bytes, numerics, len(self._shape),
                            vector_sram_bytes=sram, matrix_sram_bytes=sram,
                            q_block=q_block)


class GpuBackend(_SpecBackend):
    """Prices op graphs on a :class:`GpuSpec`."""

    spec: GpuSpec

    def op_costs(self, ops: OpGraph, numerics: Numerics, w_bytes: Array) -> OpCosts:
        """Compute seconds (MMA-tile padded), HBM bytes, launch time and energy per op."""
        s, nd = self.spec, len(self._shape)
        c = ops.col
        m = {key: c(v, nd) for key, v in ops.masks.items()}
        M, K, N = c(ops.M, nd), c(ops.K, nd), c(ops.N, nd)
        pad = cdiv(M, 16.0) * 16.0 * cdiv(K, 16.0) * 16.0 * cdiv(N, 8.0) * 8.0
        frac = c(ops.causal_fraction, nd)
        mat_macs = c(ops.inst * ops.heads, nd) * pad * np.where(m["gemm"], 1.0, frac)
        vec_work = c(ops.vec_elems * ops.vec_ops, nd) * np.where(m["vec"], frac, 1.0)
        compute = np.where(m["mat"], mat_macs / self.peak_macs_per_s(),
                           np.where(m["vec"], vec_work / (s.vector_tflops * 1e12), 0.0))
        hbm = self._hbm(ops, numerics, w_bytes, 128.0)
        launch = np.zeros_like(compute) + s.launch_s
        return OpCosts(compute, hbm, launch,
                       _energy(ops, nd, numerics, w_bytes, hbm, vec_work, self.costs))


class TpuBackend(_SpecBackend):
    """Prices op graphs on a :class:`TpuSpec` with the systolic (SCALE-Sim) fold count."""

    spec: TpuSpec

    def op_costs(self, ops: OpGraph, numerics: Numerics, w_bytes: Array) -> OpCosts:
        """Weight-stationary MXU cycles, HBM bytes and energy per op."""
        s, nd = self.spec, len(self._shape)
        c = ops.col
        m = {key: c(v, nd) for key, v in ops.masks.items()}
        M, K, N = (np.maximum(c(a, nd), 1.0) for a in (ops.M, ops.K, ops.N))
        R = float(s.mxu_dim)
        # weight stationary: (Sr, Sc, T) = (K, N, M); one instance per expert / head
        if s.pipelined_folds:
            # next fold's weights load while this one computes; one fill + drain per op
            cyc = cdiv(K, R) * cdiv(N, R) * np.maximum(M, R) + (3.0 * R - 2.0)
        else:
            cyc = fold_cycles(K, N, M, R, R, "ws") + 1.0
        frac = c(ops.causal_fraction, nd)
        mat_cycles = (c(ops.inst * ops.heads, nd) * cyc * np.where(m["gemm"], 1.0, frac)
                      / s.n_mxu)
        vec_work = c(ops.vec_elems * ops.vec_ops, nd) * np.where(m["vec"], frac, 1.0)
        cycles = np.where(m["mat"], mat_cycles,
                          np.where(m["vec"], vec_work / s.vector_ops_per_cycle, 0.0))
        hbm = self._hbm(ops, numerics, w_bytes, R)
        return OpCosts(cycles / (s.clock_ghz * 1e9), hbm, np.zeros_like(cycles),
                       _energy(ops, nd, numerics, w_bytes, hbm, vec_work, self.costs))


def simulate_baseline(spec: GpuSpec | TpuSpec, workload: Workload,
                      numerics: Numerics | None = None, *,
                      costs: CostCoefficients = DEFAULT_COSTS) -> InferenceResult:
    """Price one request on a GPU or TPU spec (default operand formats: bf16).

    Returns an :class:`~simulators.plena.engine.InferenceResult`; ``area_mm2`` is NaN (not
    modelled for the baselines).
    """
    backend = GpuBackend(spec, costs) if isinstance(spec, GpuSpec) else TpuBackend(spec, costs)
    return run(backend, workload, numerics or BF16)
