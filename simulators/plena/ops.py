"""The op graph of decoder-only LLM inference, shared by PLENA and the GPU/TPU baselines.

An :class:`OpGraph` lists the ops of one phase (prefill, or one decode step at a given KV
length) as a structure of arrays, one entry per op, so a backend prices every op of every
hardware point with a handful of numpy calls. Each op carries its *work* (GEMM sizes,
vector elements) and its *tensors* (elements of weights, activations and KV cache it
touches); bytes follow from the operand formats and SRAM reuse rules in the helpers below.

Kinds: ``GEMM`` (activations x weights), ``QK`` / ``PV`` (FlashAttention matmuls,
activations x KV cache; ``rows`` query rows per packable head unit), ``VEC`` (vector unit
element-wise work), ``MEM`` (pure data movement, the embedding gather).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import cached_property, lru_cache
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from simulators.plena.workload import ModelConfig

if TYPE_CHECKING:
    from simulators.plena.hardware import Numerics

GEMM, QK, PV, VEC, MEM = 0, 1, 2, 3, 4

#: vector-unit operations per element (documented in docs/simulators.md):
#: RMSNorm = square, accumulate, scale by rsqrt, multiply by gain;
#: RoPE = x*cos + rotate(x)*sin (2 mul + 1 add);
#: LayerNorm = accumulate, subtract mean, square, accumulate, scale by rsqrt, gain, bias;
#: SwiGLU = SiLU(gate) (exp, add, divide, multiply) then * up;
#: GELU = scale, erf, add 1, multiply (the non-gated FFN of GPT-2-style models);
#: online softmax per score = running max, subtract+exp, running sum, final scale;
#: residual add = 1 add.
OPS_RMSNORM, OPS_ROPE, OPS_SWIGLU, OPS_SOFTMAX, OPS_ADD = 4.0, 3.0, 5.0, 4.0, 1.0
OPS_LAYERNORM, OPS_GELU = 7.0, 4.0

Array = NDArray[np.float64]


@dataclass(frozen=True, eq=False)
class OpGraph:
    """Ops of one phase as parallel arrays (index i = op ``names[i]``).

    Attributes:
        names: op names (``q_proj``, ``attn_qk``, ...).
        kind: GEMM / QK / PV / VEC / MEM codes.
        reps: how many times the op runs (layers for per-layer ops, 1 otherwise).
        inst: independent instances (MoE experts for GEMMs; batch for QK/PV).
        heads: QK/PV head units that may be packed into one array pass (1 otherwise).
        M, K, N: GEMM rows, reduction and columns per instance and head
            (QK: rows x head_dim x kv_len; PV: rows x kv_len x head_dim).
        causal: QK/PV with a causal mask (prefill).
        q_len: query tokens per sequence (blocks of the causal mask).
        w_elems, w_k: weight elements read and their reduction dim (block axis).
        act_in, act_out: activation elements read and written.
        kv_read, kv_write: KV-cache elements read (one pass) and written.
        kv_part: which cache an op reads or writes: 0 none, 1 K (``attn_qk``, ``k_proj``),
            2 V (``attn_pv``, ``v_proj``).
        kv_len: tokens in each sequence's cache once the pass has run (0 without KV).
        kv_hd: head width of that cache, elements (0 without KV).
        vec_elems, vec_ops: vector-unit elements and operations per element.
    """

    names: tuple[str, ...]
    kind: NDArray[np.int64]
    reps: Array
    inst: Array
    heads: Array
    M: Array
    K: Array
    N: Array
    causal: NDArray[np.bool_]
    q_len: Array
    w_elems: Array
    w_k: Array
    act_in: Array
    act_out: Array
    kv_read: Array
    kv_write: Array
    kv_part: Array
    kv_len: Array
    kv_hd: Array
    vec_elems: Array
    vec_ops: Array

    def col(self, a: Array, ndim: int) -> Array:
        """``a`` reshaped to (n_ops, 1, ..., 1) to broadcast against ``ndim`` hw dims."""
        return a.reshape(a.shape + (1,) * ndim) if ndim else a

    def __len__(self) -> int:
        return len(self.names)

    @cached_property
    def causal_fraction(self) -> Array:
        """Share of the score matrix on or below the diagonal, (S+1)/(2S); 1 if not causal."""
        s = np.maximum(self.q_len, 1.0)
        return np.where(self.causal, (s + 1.0) / (2.0 * s), 1.0)

    @cached_property
    def masks(self) -> dict[str, NDArray[np.bool_]]:
        """Boolean masks by kind: gemm, qk, pv, vec, mem, mat (= gemm | qk | pv)."""
        k = self.kind
        out = {"gemm": k == GEMM, "qk": k == QK, "pv": k == PV, "vec": k == VEC, "mem": k == MEM}
        out["mat"] = out["gemm"] | out["qk"] | out["pv"]
        return out

    @cached_property
    def attention_dims(self) -> tuple[Array, Array, Array]:
        """(query rows, kv length, head dim) of QK/PV ops, each >= 1 (1 elsewhere)."""
        pv = self.kind == PV
        return (np.maximum(self.M, 1.0), np.maximum(np.where(pv, self.K, self.N), 1.0),
                np.maximum(np.where(pv, self.N, self.K), 1.0))

    @cached_property
    def macs(self) -> Array:
        """Useful multiply-accumulates per op per repetition (causal skipping exact)."""
        base = self.inst * self.heads * self.M * self.K * self.N
        return np.where(self.kind == GEMM, base,
                        np.where((self.kind == QK) | (self.kind == PV),
                                 base * self.causal_fraction, 0.0))


def concat(graphs: list[OpGraph]) -> OpGraph:
    """One graph holding the ops of ``graphs`` one after another (priced in one go)."""
    kw = {f.name: np.concatenate([getattr(g, f.name) for g in graphs])
          for f in fields(OpGraph) if f.name != "names"}
    return OpGraph(names=tuple(n for g in graphs for n in g.names), **kw)


def _row(name: str, kind: int, reps: float, **kw: float) -> dict[str, float]:
    base = dict(kind=kind, reps=reps, inst=1.0, heads=1.0, M=0.0, K=0.0, N=0.0,
                causal=False, q_len=1.0, w_elems=0.0, w_k=1.0, act_in=0.0, act_out=0.0,
                kv_read=0.0, kv_write=0.0, kv_part=0.0, kv_len=0.0, kv_hd=0.0,
                vec_elems=0.0, vec_ops=0.0)
    base.update(kw)
    base["name"] = name  # type: ignore[assignment]
    return base


@lru_cache(maxsize=256)
def build_ops(model: ModelConfig, batch: int, q_len: int, kv_len: int) -> OpGraph:
    """Ops of one forward pass of ``batch`` sequences.

    Prefill: ``q_len = kv_len = S`` (every prompt token, causal attention).
    One decode step: ``q_len = 1`` and ``kv_len`` = tokens in the cache including the new one.
    Only the last position of each sequence goes through the final norm and LM head.
    """
    h, hd, nl = model.hidden_size, model.head_dim, float(model.num_hidden_layers)
    nh, nkv = model.num_attention_heads, model.num_key_value_heads
    g = nh // nkv
    T = float(batch * q_len)  # tokens in this pass
    prefill = q_len > 1
    qd, kvd = nh * hd, nkv * hd
    rows: list[dict[str, float]] = []

    def gemm(name: str, K: int, N: int, *, reps: float = nl, M: float = T, inst: float = 1.0,
             kv_out: int = 0) -> None:
        kv = dict(kv_write=inst * M * N, kv_part=float(kv_out), kv_len=float(kv_len),
                  kv_hd=float(hd), q_len=float(q_len)) if kv_out else {}
        rows.append(_row(name, GEMM, reps, inst=inst, M=M, K=K, N=N, w_elems=inst * K * N,
                         w_k=K, act_in=inst * M * K,
                         act_out=0.0 if kv_out else inst * M * N, **kv))

    def vec(name: str, elems: float, ops: float, *, reps: float = nl) -> None:
        rows.append(_row(name, VEC, reps, vec_elems=elems, vec_ops=ops,
                         act_in=elems, act_out=elems))

    norm = OPS_LAYERNORM if model.layer_norm else OPS_RMSNORM
    vec("attn_norm", T * h, norm)
    gemm("q_proj", h, qd)
    gemm("k_proj", h, kvd, kv_out=1)
    gemm("v_proj", h, kvd, kv_out=2)
    if model.qk_norm:
        vec("qk_norm", T * (qd + kvd), OPS_RMSNORM)
    if not model.position_embeddings:
        vec("rope", T * (qd + kvd), OPS_ROPE)
    # FlashAttention. Prefill: every query head's S rows against the S keys (causal).
    # Decode: the g query heads sharing one KV head form g rows against L keys.
    att_heads, att_rows = (nh, float(q_len)) if prefill else (nkv, float(g))
    kv_once = float(batch) * nkv * kv_len * hd
    common = dict(inst=float(batch), heads=float(att_heads), causal=prefill,
                  q_len=float(q_len), kv_len=float(kv_len), kv_hd=float(hd))
    rows.append(_row("attn_qk", QK, nl, M=att_rows, K=hd, N=kv_len, kv_read=kv_once,
                     kv_part=1.0, act_in=T * qd, **common))  # type: ignore[arg-type]
    # softmax over the full score matrix; backends scale by their causal-skip fraction
    rows.append(_row("attn_softmax", VEC, nl, vec_elems=float(batch) * nh * q_len * kv_len,
                     vec_ops=OPS_SOFTMAX, causal=prefill, q_len=float(q_len), M=q_len,
                     N=kv_len))
    rows.append(_row("attn_pv", PV, nl, M=att_rows, K=kv_len, N=hd, kv_read=kv_once,
                     kv_part=2.0, act_out=T * qd, **common))  # type: ignore[arg-type]
    gemm("o_proj", qd, h)
    vec("residual_attn", T * h, OPS_ADD)
    vec("ffn_norm", T * h, norm)
    if model.num_experts:
        e, k, im = model.num_experts, model.num_experts_per_tok, model.moe_intermediate_size
        touched = e * (1.0 - (1.0 - k / e) ** T)  # expected distinct experts hit
        per_expert = T * k / touched
        gemm("router", h, e)
        gemm("gate_proj", h, im, M=per_expert, inst=touched)
        gemm("up_proj", h, im, M=per_expert, inst=touched)
        vec("swiglu", T * k * im, OPS_SWIGLU)
        gemm("down_proj", im, h, M=per_expert, inst=touched)
    else:
        im = model.intermediate_size
        if model.gated_mlp:
            gemm("gate_proj", h, im)
            gemm("up_proj", h, im)
            vec("swiglu", T * im, OPS_SWIGLU)
        else:
            gemm("up_proj", h, im)
            vec("gelu", T * im, OPS_GELU)
        gemm("down_proj", im, h)
    vec("residual_ffn", T * h, OPS_ADD)
    # once per pass
    if model.position_embeddings:  # token and position rows gathered, then added
        rows.append(_row("embed", MEM, 1.0, w_elems=2.0 * T * h, w_k=h, act_out=T * h))
        vec("pos_add", T * h, OPS_ADD, reps=1.0)
    else:
        rows.append(_row("embed", MEM, 1.0, w_elems=T * h, w_k=h, act_out=T * h))
    vec("final_norm", float(batch) * h, norm, reps=1.0)
    gemm("lm_head", h, model.vocab_size, reps=1.0, M=float(batch))

    def arr(key: str, dtype: type = np.float64) -> NDArray:
        a = np.array([r[key] for r in rows], dtype=dtype)
        a.setflags(write=False)
        return a

    return OpGraph(
        names=tuple(str(r["name"]) for r in rows),
        kind=arr("kind", np.int64), reps=arr("reps"), inst=arr("inst"), heads=arr("heads"),
        M=arr("M"), K=arr("K"), N=arr("N"), causal=arr("causal", np.bool_),
        q_len=arr("q_len"), w_elems=arr("w_elems"), w_k=arr("w_k"), act_in=arr("act_in"),
        act_out=arr("act_out"), kv_read=arr("kv_read"), kv_write=arr("kv_write"),
        kv_part=arr("kv_part"), kv_len=arr("kv_len"), kv_hd=arr("kv_hd"),
        vec_elems=arr("vec_elems"), vec_ops=arr("vec_ops"),
    )


@lru_cache(maxsize=1024)
def kv_bytes_per_element(ops: OpGraph, numerics: Numerics) -> tuple[Array, Array]:
    """(read, write) bytes per K/V-cache element of every op, (n_ops,), 0 without KV.

    Read (``attn_qk`` reads K, ``attn_pv`` V): one head's cache of ``kv_len`` tokens,
    :meth:`Numerics.kv_cache_bytes` / (kv_len * head_dim). Write (``k_proj``, ``v_proj``):
    a pass that fills the cache (prefill, ``q_len == kv_len``) writes all of it, the same
    bytes per element; a decode step writes :meth:`Numerics.kv_step_write_bytes` per head
    and new token (a token leaving the full-precision window is re-written in ``kv``).
    """
    read, write = np.zeros(len(ops.names)), np.zeros(len(ops.names))
    for i in np.flatnonzero(ops.kv_part):
        part = "k" if ops.kv_part[i] == 1 else "v"
        tokens, hd = int(ops.kv_len[i]), int(ops.kv_hd[i])
        whole = numerics.kv_cache_bytes(part, tokens, hd) / (tokens * hd)
        if ops.kind[i] in (QK, PV):
            read[i] = whole
        elif ops.q_len[i] == ops.kv_len[i]:
            write[i] = whole
        else:
            write[i] = numerics.kv_step_write_bytes(tokens, hd) / hd
    read.setflags(write=False)
    write.setflags(write=False)
    return read, write


def cdiv(a: Array, b: Array) -> Array:
    """Ceiling division of non-negative float arrays holding integers."""
    return np.ceil(a / b)


def gemm_hbm_bytes(ops: OpGraph, w_bytes: Array, a_bytes: float, ndim: int,
                   vector_sram_bytes: Array, matrix_sram_bytes: Array) -> Array:
    """HBM bytes of the GEMM/MEM ops' weights and activations, with SRAM reuse.

    Activations stay on chip when an op's input and output fit the vector SRAM; otherwise
    the cheaper of two loop orders is taken: (a) hold a row chunk of activations in half the
    vector SRAM and stream all weights once per chunk, or (b) hold a column chunk of weights
    in half the matrix SRAM and stream the activations once per chunk (double buffering:
    half of each SRAM holds the working set while the other half fills). MEM ops (the
    embedding gather) read their weight rows once.

    Args:
        ops: the op graph; w_bytes: bytes per weight element per op, shape (n_ops,).
        a_bytes: bytes per activation element. ndim: number of hardware-point dims.
        vector_sram_bytes, matrix_sram_bytes: SRAM sizes, hw arrays.
    Returns:
        (n_ops, *hw) bytes per repetition of each op (0 for attention/vector ops).
    """
    c = ops.col
    W = c(ops.w_elems * w_bytes, ndim)
    a_in, a_out = c(ops.act_in * a_bytes, ndim), c(ops.act_out * a_bytes, ndim)
    resident = a_in + a_out <= vector_sram_bytes
    M, K, N, wb = c(ops.M, ndim), c(ops.K, ndim), c(ops.N, ndim), c(w_bytes, ndim)
    rows_fit = np.maximum(np.floor(vector_sram_bytes / 2.0 / np.maximum((K + N) * a_bytes, 1.0)), 1.0)
    cols_fit = np.maximum(np.floor(matrix_sram_bytes / 2.0 / np.maximum(K * wb, 1.0)), 1.0)
    loop_a = W * cdiv(M, rows_fit) + a_in + a_out
    loop_b = W + a_in * cdiv(N, cols_fit) + a_out
    streamed = np.where(resident, W, np.minimum(loop_a, loop_b))
    return np.where(c(ops.kind == GEMM, ndim), streamed,
                    np.where(c(ops.kind == MEM, ndim), W, 0.0))


def attention_hbm_bytes(ops: OpGraph, kv_bytes: Array, a_bytes: float, ndim: int,
                        q_block: Array, sram_bytes: Array, vector_sram_bytes: Array) -> Array:
    """HBM bytes of the QK/PV ops.

    KV cache (``kv_bytes``: bytes per element of each op's cache read, (n_ops,), from
    :func:`kv_bytes_per_element`): read once when one KV head's keys (or values),
    ``kv_len * head_dim`` elements, fit half of ``sram_bytes``; otherwise re-read for every query block of
    ``q_block`` rows (a causal prefill visits on average (nb+1)/2 of its nb key blocks per
    query block). Q in / O out cost HBM traffic only when they do not fit the vector SRAM.

    Returns:
        (n_ops, *hw) bytes per repetition (0 for non-attention ops).
    """
    c = ops.col
    att = c((ops.kind == QK) | (ops.kind == PV), ndim)
    q_len = c(ops.q_len, ndim)
    nb = cdiv(q_len, np.minimum(q_block, q_len))
    passes = np.where(c(ops.causal, ndim), (nb + 1.0) / 2.0, nb)
    all_heads = c(ops.kv_read * kv_bytes, ndim)
    one_head = c(ops.K * ops.N * kv_bytes, ndim)  # QK: hd x L, PV: L x hd
    kv = np.where(one_head <= sram_bytes / 2.0, all_heads, all_heads * passes)
    a_io = c((ops.act_in + ops.act_out) * a_bytes, ndim)
    act = np.where(a_io <= vector_sram_bytes, 0.0, a_io)
    return np.where(att, kv + act, 0.0)


def vector_hbm_bytes(ops: OpGraph, a_bytes: float, ndim: int, vector_sram_bytes: Array) -> Array:
    """HBM bytes of VEC ops: their activations when they do not fit the vector SRAM."""
    c = ops.col
    io = c((ops.act_in + ops.act_out) * a_bytes, ndim)
    return np.where(c(ops.kind == VEC, ndim) & (io > vector_sram_bytes), io, 0.0)


def kv_write_bytes(ops: OpGraph, kv_bytes: Array, ndim: int) -> Array:
    """HBM bytes of new K/V cache entries written by the K and V projections
    (``kv_bytes``: bytes per written element of each op, (n_ops,))."""
    return ops.col(ops.kv_write * kv_bytes, ndim)


def op_hbm_bytes(ops: OpGraph, w_bytes: Array, a_bytes: float, numerics: Numerics, ndim: int,
                 *, vector_sram_bytes: Array, matrix_sram_bytes: Array, q_block: Array
                 ) -> Array:
    """All HBM bytes of every op per repetition: GEMM/MEM weights and activations,
    attention KV reads and Q/O, vector-op activations and new KV entries, (n_ops, *hw).
    KV bytes follow ``numerics`` (format, layout, window; :func:`kv_bytes_per_element`)."""
    kv_read, kv_written = kv_bytes_per_element(ops, numerics)
    return (gemm_hbm_bytes(ops, w_bytes, a_bytes, ndim, vector_sram_bytes, matrix_sram_bytes)
            + attention_hbm_bytes(ops, kv_read, a_bytes, ndim, q_block, matrix_sram_bytes,
                                  vector_sram_bytes)
            + vector_hbm_bytes(ops, a_bytes, ndim, vector_sram_bytes)
            + kv_write_bytes(ops, kv_written, ndim))
