"""Backend-independent inference timing: prefill + closed-form decode sums.

A *backend* (PLENA, GPU, TPU) prices every op of an :class:`~simulators.plena.ops.OpGraph`
for an array of hardware points: compute seconds, HBM bytes, fixed fill/launch seconds and
dynamic energy. This module turns those into request-level metrics:

* op time = max(compute, HBM bytes / bandwidth) + fill, per repetition (layer);
* prefill = one pass over the S prompt tokens (its LM head yields the first token);
* decode = O steps with KV lengths L = S+1 ... S+O. Every per-step quantity is affine in
  L between the exact costs at the first and last step, so the sum over steps of
  ``max(compute, memory)`` is a closed form (split at the step where the two lines cross)
  instead of a loop over tokens.

All sums over ops run in a fixed order, so one hardware point priced alone or inside an
array gives bit-identical results.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from functools import lru_cache
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

from simulators.plena.hardware import Numerics, format_bits
from simulators.plena.ops import GEMM, MEM, VEC, OpGraph, build_ops, concat
from simulators.plena.workload import ModelConfig, Workload

Array = NDArray[np.float64]


@dataclass(frozen=True)
class OpCosts:
    """Per-op costs per repetition, arrays of shape (n_ops, *hw).

    Attributes:
        compute_s: time on the op's unit, s.
        hbm_bytes: bytes moved to/from HBM.
        fill_s: fixed pipeline fill/drain (or kernel launch) time, s.
        energy_j: dynamic energy, J (compute + SRAM + HBM).
    """

    compute_s: Array
    hbm_bytes: Array
    fill_s: Array
    energy_j: Array


class Backend(Protocol):
    """What the engine needs from a hardware model."""

    def shape(self) -> tuple[int, ...]: ...
    def hbm_bytes_per_s(self) -> Array: ...
    def hbm_capacity_bytes(self) -> Array: ...
    def peak_macs_per_s(self) -> Array: ...
    def op_costs(self, ops: OpGraph, numerics: Numerics, w_bytes: Array) -> OpCosts: ...


def opsum(x: Array) -> Array:
    """Sum over the op axis (axis 0) in a fixed, shape-independent order."""
    return np.cumsum(x, axis=0)[-1]  # strictly sequential, unlike np.sum's pairwise sum


def overlapped_sum(t: Array, mem_s: Array, reps: NDArray[np.float64],
                   vec: NDArray[np.bool_]) -> Array:
    """Phase time with the vector unit overlapped with the matrix unit (pipelined).

    Ops that run the same number of times (the per-layer ops, the once-per-pass ops) form
    one group; a group costs ``max(sum of its matrix-unit op times, sum of its vector-unit
    op times, sum of its HBM times)``: the two units work concurrently on different tiles,
    while HBM stays one shared resource. Groups follow one another.

    Args:
        t: (n_ops, *hw) op times already multiplied by their repetitions, s.
        mem_s: (n_ops, *hw) HBM times likewise, s.
        reps: (n_ops,) repetitions; vec: (n_ops,) True for vector-unit ops.
    Returns:
        (*hw) phase time, s.
    """
    zeros = np.zeros(t.shape[1:])
    total = zeros
    for r in np.unique(reps):  # sorted: a fixed, shape-independent order
        sel = reps == r
        lanes = [opsum(x[m]) if m.any() else zeros
                 for x, m in ((t, sel & ~vec), (t, sel & vec), (mem_s, sel))]
        total = total + np.maximum(np.maximum(lanes[0], lanes[1]), lanes[2])
    return total


def sum_relu_affine(h0: Array, h1: Array, n: int) -> Array:
    """``sum_{t=0}^{n-1} max(h0 + h1*t, 0)`` in closed form (elementwise)."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        root = np.where(h1 != 0, -h0 / np.where(h1 != 0, h1, 1.0), 0.0)
    lo = np.where(h1 > 0, np.clip(np.floor(root) + 1.0, 0, n), 0.0)
    hi = np.where(h1 < 0, np.clip(np.ceil(root), 0, n), float(n))
    flat = h1 == 0
    lo = np.where(flat, 0.0, lo)
    hi = np.where(flat, np.where(h0 > 0, float(n), 0.0), hi)
    cnt = np.maximum(hi - lo, 0.0)
    return cnt * h0 + h1 * cnt * (lo + hi - 1.0) / 2.0


@lru_cache(maxsize=1024)
def weight_bytes_per_element(ops: OpGraph, weights_fmt: str) -> Array:
    """Bytes per weight element of each op (blocks along the op's reduction dim)."""
    out = np.zeros(len(ops.names))
    for i, k in enumerate(ops.kind):
        if k in (GEMM, MEM) and ops.w_elems[i] > 0:
            kk = int(ops.w_k[i])
            rows = max(int(round(ops.w_elems[i] / kk)), 1)
            out[i] = format_bits(weights_fmt, "quant.weights", (rows, kk)) / 8.0
    out.setflags(write=False)
    return out


@lru_cache(maxsize=1024)
def stored_weight_bytes(model: ModelConfig, weights_fmt: str) -> float:
    """HBM bytes of all weights stored in ``weights_fmt`` (norm gains ignored)."""
    total = 0.0
    for _, k, n in model.weight_matrices():
        total += n * format_bits(weights_fmt, "quant.weights", (n // k, k)) / 8.0
    return total


@dataclass
class OpBreakdown:
    """Totals of one op over the request (all layers), arrays over hardware points.

    Attributes:
        time_s: wall time, s. compute_s / memory_s: time if only compute / only HBM
            counted, s. hbm_bytes: bytes. macs: useful MACs.
    """

    time_s: Array
    compute_s: Array
    memory_s: Array
    hbm_bytes: Array
    macs: Array

    @property
    def bottleneck(self) -> NDArray[np.str_]:
        """Which of compute and HBM bounds the op ("compute" | "memory")."""
        return np.where(self.compute_s >= self.memory_s, "compute", "memory")


@dataclass
class PhaseTable:
    """Per-op totals of one phase as (n_ops, *hw) arrays (see :class:`OpBreakdown`)."""

    names: tuple[str, ...]
    time_s: Array
    compute_s: Array
    memory_s: Array
    hbm_bytes: Array
    macs: Array

    def ops(self) -> dict[str, OpBreakdown]:
        """``{op name: OpBreakdown}``."""
        shape = np.broadcast_shapes(*(a.shape[1:] for a in (
            self.time_s, self.compute_s, self.memory_s, self.hbm_bytes, self.macs)))
        zeros = np.zeros(shape)
        return {n: OpBreakdown(self.time_s[i] + zeros, self.compute_s[i] + zeros,
                               self.memory_s[i] + zeros, self.hbm_bytes[i] + zeros,
                               self.macs[i] + zeros)
                for i, n in enumerate(self.names)}


@dataclass
class InferenceResult:
    """Request-level results, numpy arrays of the hardware shape.

    Attributes:
        ttft_s: time to first token (prefill incl. LM head), s.
        tpot_s: mean time per output token over the O decode steps, s.
        tokens_per_s: batch * O / (ttft_s + O * tpot_s), generated tokens per second.
        prefill_s, decode_s: phase times, s.
        utilisation_prefill / _decode / _overall: useful MACs / (peak MAC/s * time).
        hbm_bytes: bytes moved to/from HBM over the whole request.
        energy_j: dynamic energy of the request, J; energy_per_token_j = energy_j /
            (batch * O).
        memory_required_bytes: weights + KV cache at S+O tokens + peak activations.
        fits_memory: memory_required_bytes <= HBM capacity.
        prefill_table / decode_table: per-op totals (``prefill_ops`` / ``decode_ops``
            give them as ``{name: OpBreakdown}``).
        area_mm2: silicon area when the backend models it (NaN otherwise).
    """

    ttft_s: Array
    tpot_s: Array
    tokens_per_s: Array
    prefill_s: Array
    decode_s: Array
    utilisation_prefill: Array
    utilisation_decode: Array
    utilisation_overall: Array
    hbm_bytes: Array
    energy_j: Array
    energy_per_token_j: Array
    memory_required_bytes: Array
    fits_memory: NDArray[np.bool_]
    prefill_table: PhaseTable
    decode_table: PhaseTable
    area_mm2: Array = field(default_factory=lambda: np.asarray(np.nan))

    @property
    def prefill_ops(self) -> dict[str, OpBreakdown]:
        """Per-op totals of the prefill."""
        return self.prefill_table.ops()

    @property
    def decode_ops(self) -> dict[str, OpBreakdown]:
        """Per-op totals summed over all decode steps."""
        return self.decode_table.ops()

    def point(self, i: int) -> InferenceResult:
        """The result of hardware point ``i`` of a 1-d sweep (``hw.shape == (n,)``), as a
        single-point result: the same values a scalar :func:`simulate` of that point gives
        (element-wise arithmetic, no reduction across points)."""
        shape = np.shape(self.ttft_s)
        if len(shape) != 1:
            raise ValueError(f"point(): expected a 1-d sweep, got shape {shape}")

        def pick(a: Any) -> Any:
            return np.broadcast_to(a, shape)[i]

        def table(t: PhaseTable) -> PhaseTable:
            n_ops = len(t.names)
            return PhaseTable(t.names, *(np.broadcast_to(a, (n_ops, *shape))[:, i] for a in (
                t.time_s, t.compute_s, t.memory_s, t.hbm_bytes, t.macs)))

        kw = {f.name: pick(getattr(self, f.name)) for f in fields(self)
              if f.name not in ("prefill_table", "decode_table")}
        return InferenceResult(**kw, prefill_table=table(self.prefill_table),
                               decode_table=table(self.decode_table))

    def metrics(self) -> dict[str, float]:
        """Flat float metrics of a single hardware point (units in the names)."""
        if np.ndim(self.ttft_s) != 0:
            raise ValueError("metrics(): expected a single hardware point, got shape "
                             f"{np.shape(self.ttft_s)}")
        out = {k: float(getattr(self, k)) for k in (
            "ttft_s", "tpot_s", "tokens_per_s", "prefill_s", "decode_s",
            "utilisation_prefill", "utilisation_decode", "utilisation_overall",
            "hbm_bytes", "energy_j", "energy_per_token_j", "memory_required_bytes",
            "area_mm2")}
        out["utilisation"] = out["utilisation_overall"]
        out["fits_memory"] = 1.0 if bool(self.fits_memory) else 0.0
        return out

    def breakdown(self) -> dict[str, dict[str, float | str]]:
        """Per-op totals of a single hardware point: ``{"prefill.q_proj": {...}}``."""
        out: dict[str, dict[str, float | str]] = {}
        for phase, table in (("prefill", self.prefill_ops), ("decode", self.decode_ops)):
            for name, op in table.items():
                out[f"{phase}.{name}"] = {
                    "time_s": float(op.time_s), "compute_s": float(op.compute_s),
                    "memory_s": float(op.memory_s), "hbm_bytes": float(op.hbm_bytes),
                    "macs": float(op.macs), "bottleneck": str(op.bottleneck),
                }
        return out


@lru_cache(maxsize=256)
def request_ops(model: ModelConfig, batch: int, prompt_len: int, output_len: int
                ) -> tuple[OpGraph, int]:
    """Prefill, first decode step (L=S+1) and last decode step (L=S+O) as one graph,
    and the op count of each part."""
    parts = [build_ops(model, batch, prompt_len, prompt_len),
             build_ops(model, batch, 1, prompt_len + 1),
             build_ops(model, batch, 1, prompt_len + output_len)]
    return concat(parts), len(parts[0])


def run(backend: Backend, workload: Workload, numerics: Numerics, *,
        overlap_vector: bool = False) -> InferenceResult:
    """Price one request (prefill + O decode steps) on every hardware point of ``backend``.

    ``overlap_vector``: the vector unit runs concurrently with the matrix unit (a pipelined
    implementation; :func:`overlapped_sum`) instead of every op after the other. The per-op
    tables keep each op's own time either way. In decode the overlap is applied to the
    totals over all steps (sum over steps of a max >= max of the sums), which is exact when
    the same unit dominates at every step and otherwise a slightly optimistic bound.
    """
    model, b = workload.model, workload.batch
    S, n = workload.prompt_len, workload.output_len
    shape = backend.shape()
    nd = len(shape)
    graph, k = request_ops(model, b, S, n)
    costs = backend.op_costs(graph, numerics, weight_bytes_per_element(graph, numerics.weights))
    mem_s = costs.hbm_bytes / backend.hbm_bytes_per_s()
    comp, fill, hbm_b, energy = costs.compute_s, costs.fill_s, costs.hbm_bytes, costs.energy_j
    reps = graph.col(graph.reps, nd)[:k]
    macs = graph.col(graph.macs, nd)
    p, d0, d1 = slice(0, k), slice(k, 2 * k), slice(2 * k, 3 * k)

    # ---- prefill
    p_time = (np.maximum(comp[p], mem_s[p]) + fill[p]) * reps
    vec = graph.kind[p] == VEC
    rep_k = graph.reps[p]
    prefill_s = overlapped_sum(p_time, mem_s[p] * reps, rep_k, vec) if overlap_vector \
        else opsum(p_time)
    p_macs = macs[p] * reps

    # ---- decode: affine in L between the first (L=S+1) and last (L=S+O) step
    def steps(a: Array) -> Array:
        return n * (a[d0] + a[d1]) / 2.0 * reps

    span = float(max(n - 1, 1))
    h0 = comp[d0] - mem_s[d0]
    h1 = ((comp[d1] - comp[d0]) - (mem_s[d1] - mem_s[d0])) / span
    d_time = steps(mem_s) + (sum_relu_affine(h0, h1, n) + n * fill[d0]) * reps
    decode_s = overlapped_sum(d_time, steps(mem_s), rep_k, vec) if overlap_vector \
        else opsum(d_time)
    d_macs = steps(macs)

    gen = float(b * n)
    macs_p, macs_d = opsum(p_macs), opsum(d_macs)
    peak = backend.peak_macs_per_s()
    hbm = opsum(hbm_b[p] * reps) + opsum(steps(hbm_b))
    joules = opsum(energy[p] * reps) + opsum(steps(energy))

    # ---- capacity
    pre_io = (graph.act_in[p] + graph.act_out[p]) * (graph.kind[p] != MEM)
    kv_cache = (b * model.num_hidden_layers * model.num_key_value_heads
                * (numerics.kv_cache_bytes("k", S + n, model.head_dim)
                   + numerics.kv_cache_bytes("v", S + n, model.head_dim)))
    required = (stored_weight_bytes(model, numerics.weights) + kv_cache
                + float(np.max(pre_io)) * numerics.act_bytes)

    zeros = np.zeros(shape)

    def full(x: Array) -> Array:
        return x + zeros

    def table(t: Array, c: Array, m: Array, hb: Array, mc: Array) -> PhaseTable:
        return PhaseTable(graph.names[:k], t, c, m, hb, mc)

    return InferenceResult(
        ttft_s=full(prefill_s), tpot_s=full(decode_s / n),
        tokens_per_s=full(gen / (prefill_s + decode_s)),
        prefill_s=full(prefill_s), decode_s=full(decode_s),
        utilisation_prefill=full(macs_p / (peak * prefill_s)),
        utilisation_decode=full(macs_d / (peak * decode_s)),
        utilisation_overall=full((macs_p + macs_d) / (peak * (prefill_s + decode_s))),
        hbm_bytes=full(hbm), energy_j=full(joules), energy_per_token_j=full(joules / gen),
        memory_required_bytes=full(required),
        fits_memory=(required <= backend.hbm_capacity_bytes()) | (zeros != 0),
        prefill_table=table(p_time, comp[p] * reps, mem_s[p] * reps, hbm_b[p] * reps, p_macs),
        decode_table=table(d_time, steps(comp), steps(mem_s), steps(hbm_b), d_macs),
    )
