"""One dataflow stage per layer: shapes, folding, initiation interval and resources.

Model (fpgaConvNet semantics, re-derived; see docs/dataflow.md):

* A convolution stage has ``coarse_in * coarse_group`` input streams,
  ``coarse_out * coarse_group`` output streams and ``fine * coarse_in * coarse_out *
  coarse_group`` multipliers. ``coarse_in`` divides C/g, ``coarse_out`` divides F/g,
  ``coarse_group`` divides g, ``fine`` is in 1..kh*kw.
* Dense II (cycles per image) = max(rows_out*cols_out*(C/(ci*cg))*(F/(co*g))*ceil(K/fine),
  padded input words/(ci*cg), output words/(co*cg)), K = kh*kw. With ``fine`` dividing K the
  first term is MACs/(fine*ci*co*cg).
* Sparse (k*k > 1): a window with n zero products costs ceil((K-n)/fine) cycles, all-zero
  windows are skipped; groups are dealt to the cg lanes and each group's channels to its
  lane's ci streams, in snake order of expected rate; the slowest stream sets the pace.
  1x1 and fully connected: per-channel average sparsity, capped at 1 - 1/(streams per
  cluster).
* Non-weight stages (pool, global pool, eltwise add/mul, concat, softmax) move words at
  ``coarse`` words per cycle (``coarse_in`` is the channel parallelism).
* Attention (``matmul``: QK^T and AV, both operands activations): a grouped linear stage
  with one group per head (rows = query tokens, channels = K x heads, filters = N x heads);
  its second operand (K^T or V of the whole image, the "weights" of the stage) is buffered
  on chip at the activation width and streamed in with the first. ``softmax``: a streaming
  stage over rows of N scores per head with a double-buffered row buffer, one exp table and
  one normalising multiplier per lane.

Everything is vectorised over design points: folding arguments are integer arrays of one
shape; results have that shape.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import numpy as np

from simulators.dataflow.sparsity import PointwiseAvg, Sparsity, WindowHist

WEIGHT_OPS = ("conv", "linear")
#: stages with multipliers folded as a (grouped) convolution: weights, or a buffered operand
MAC_OPS = ("conv", "linear", "matmul")
OPS = ("conv", "linear", "pool", "gap", "add", "mul", "concat", "matmul", "softmax")
WEIGHT_MEMORIES = ("bram", "uram", "auto", "stream")
FOLD_FIELDS = ("coarse_in", "coarse_out", "coarse_group", "fine")

# Xilinx BRAM18 aspect ratios: width (bits) -> depth (words).
_BRAM18_DEPTH = {1: 16384, 2: 8192, 4: 4096, 9: 2048, 18: 1024, 36: 512}
_BRAM18_WIDTHS = np.array(sorted(_BRAM18_DEPTH))
_BRAM18_DEPTHS = np.array([_BRAM18_DEPTH[w] for w in sorted(_BRAM18_DEPTH)])
ACC_BITS = 32
# (histogram digest, shape, coarse_in, coarse_group, groups) -> cycles per window by fine; shared by all models
_TABLE_CACHE: dict[tuple[str, tuple[int, ...], int], np.ndarray] = {}


@dataclass(frozen=True)
class Layer:
    """Shape of one stage. Units: rows/cols in pixels, channels/filters in feature maps.

    Attributes:
        name: qualified name (the torch module's name where it came from a module).
        op: one of ``conv``, ``linear``, ``pool``, ``gap``, ``add``, ``mul``, ``concat``,
            ``matmul`` (activation x activation per head), ``softmax``.
        rows, cols, channels: input feature map (a linear layer: rows = tokens, cols = 1;
            matmul: rows = query tokens, channels = reduction dim x heads, filters = output
            columns x heads, groups = heads; softmax: rows = query tokens, channels = keys x
            heads).
        filters: output channels (equals ``channels`` for pool/gap/add/mul).
        kernel: (kh, kw); stride: (sh, sw); pad: (top, left, bottom, right).
        groups: convolution groups (``channels`` for depthwise).
        inputs: names of the stages feeding this one ("" or empty = network input).
    """

    name: str
    op: str
    rows: int
    cols: int
    channels: int
    filters: int
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    pad: tuple[int, int, int, int] = (0, 0, 0, 0)
    groups: int = 1
    inputs: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"op: expected one of {OPS}, got {self.op!r}")
        for f in ("rows", "cols", "channels", "filters", "groups"):
            if int(getattr(self, f)) < 1:
                raise ValueError(f"{f}: expected a positive integer, got {getattr(self, f)}")
        if self.channels % self.groups or self.filters % self.groups:
            raise ValueError(f"groups: expected a divisor of channels and filters, got {self.groups}")
        if self.rows_out < 1 or self.cols_out < 1:
            raise ValueError(f"kernel: {self.kernel} larger than the padded input of {self.name}")

    @property
    def window(self) -> int:
        """Products per window, kh*kw."""
        return self.kernel[0] * self.kernel[1]

    @property
    def rows_out(self) -> int:
        """Output rows."""
        if self.op == "gap":
            return 1
        return (self.rows + self.pad[0] + self.pad[2] - self.kernel[0]) // self.stride[0] + 1

    @property
    def cols_out(self) -> int:
        """Output columns."""
        if self.op == "gap":
            return 1
        return (self.cols + self.pad[1] + self.pad[3] - self.kernel[1]) // self.stride[1] + 1

    @property
    def in_words(self) -> int:
        """Padded input words per image (one word = one activation; a matmul's buffered
        second operand included)."""
        words = (self.rows + self.pad[0] + self.pad[2]) * (self.cols + self.pad[1] + self.pad[3]) * self.channels
        return words + (self.weights if self.op == "matmul" else 0)

    @property
    def out_words(self) -> int:
        """Output words per image."""
        return self.rows_out * self.cols_out * self.filters

    @property
    def macs(self) -> int:
        """Multiply-accumulates per image (0 for stages without multipliers)."""
        if self.op not in MAC_OPS:
            return 0
        return self.rows_out * self.cols_out * self.filters * (self.channels // self.groups) * self.window

    @property
    def weights(self) -> int:
        """Weight count (a matmul: its buffered second operand; 0 for non-weight stages)."""
        if self.op not in MAC_OPS:
            return 0
        return self.filters * (self.channels // self.groups) * self.window

    def feasible(self, field_name: str) -> list[int]:
        """Feasible values of one folding field (``coarse_in``, ``coarse_out``, ``coarse_group``, ``fine``)."""
        if self.op not in MAC_OPS:
            return {"coarse_in": divisors(self.channels), "coarse_out": [1],
                    "coarse_group": [1], "fine": [1]}[field_name]
        return {
            "coarse_in": divisors(self.channels // self.groups),
            "coarse_out": divisors(self.filters // self.groups),
            "coarse_group": divisors(self.groups),
            "fine": list(range(1, self.window + 1)),
        }[field_name]


def divisors(n: int) -> list[int]:
    """Sorted divisors of ``n``."""
    small = [i for i in range(1, math.isqrt(n) + 1) if n % i == 0]
    return sorted(set(small + [n // i for i in small]))


def bram18_array(depth: np.ndarray | int, width: np.ndarray | int, fifo: bool) -> np.ndarray:
    """BRAM18 blocks for a ``depth`` x ``width``-bit array (Xilinx UltraScale+ aspect ratios).

    Small arrays go to LUTRAM (0 BRAM): a memory below 1024 bits, a FIFO of at most 1024 bits
    or at most 32 words. Wider than 36 bits: ceil(width/36) columns of 512-deep blocks.
    """
    d = np.asarray(depth, dtype=np.int64)
    w = np.asarray(width, dtype=np.int64)
    bits = d * w
    small = (d == 0) | (w == 0) | ((bits <= 1024) if fifo else (bits < 1024))
    if fifo:
        small |= d <= 32
    wc = np.minimum(w, 36)
    idx = np.clip(np.searchsorted(_BRAM18_WIDTHS, wc, side="left"), 0, len(_BRAM18_WIDTHS) - 1)
    bw = _BRAM18_WIDTHS[idx]
    bd = _BRAM18_DEPTHS[idx]
    n = (-(-w // bw)) * (-(-d // bd))
    return np.where(small, 0, n)


def uram_array(depth: np.ndarray | int, width: np.ndarray | int) -> np.ndarray:
    """URAM288 blocks (72 bits x 4096 words each) for a ``depth`` x ``width``-bit array."""
    d = np.asarray(depth, dtype=np.int64)
    w = np.asarray(width, dtype=np.int64)
    return np.where((d == 0) | (w == 0), 0, (-(-w // 72)) * (-(-d // 4096)))


def _window_cycle_table(hist: np.ndarray, window: int, coarse_in: int, coarse_group: int = 1,
                        groups: int = 1) -> np.ndarray:
    """Mean cycles per window of the slowest stream, for every fine in 1..window.

    Returns an array (window + 1,) indexed by ``fine`` (entry 0 unused). The stage has
    ``coarse_group`` lanes of ``coarse_in`` streams; a group's channels go only to the
    streams of its lane. For each fine, with channels ordered by expected rate:

    * ``groups = 1``: all channels are dealt to the ``coarse_in`` streams in snake order
      (row r of the (C/coarse_in, coarse_in) matrix reversed for odd r);
    * depthwise (one channel per group, so ``coarse_in = 1``): the groups (= channels) are
      dealt to the ``coarse_group`` lanes in snake order;
    * grouped (C/g > 1): group q goes to lane q mod coarse_group; a lane lists its groups'
      channels group by group (index order), each group's by rate, and deals the list to
      its ``coarse_in`` streams in snake order. The group order is fixed: a rate-sorted
      group-to-lane dealing broke both monotonicity laws (more zeros, more coarse_in) in
      random tests.
    """
    channels = hist.shape[0]
    lanes, ci = coarse_group, coarse_in
    if groups < 1 or channels % groups or groups % lanes or (channels // groups) % ci:
        raise ValueError(f"coarse_in, coarse_group: expected divisors of {channels // max(groups, 1)} "
                         f"channels per group and {groups} groups, got {ci} and {lanes}")
    per_group, rounds = channels // groups, groups // lanes
    rows = channels // (lanes * ci)  # channels per stream
    fines = np.arange(1, window + 1)
    nzero = np.arange(window + 1)
    cyc = np.ceil((window - nzero)[None, :] / fines[:, None])  # (F, K+1); bin n = n zero products
    with np.errstate(divide="ignore"):  # an all-zero channel has infinite rate
        rate = 1.0 / np.sum(cyc[:, None, :] * hist[None, :, :], axis=2)  # (F, C)
    if per_group == 1:  # depthwise: groups (= channels) snake-dealt to lanes by rate
        gorder = np.argsort(rate, axis=1).reshape(window, rounds, lanes)
        gorder[:, 1::2, :] = gorder[:, 1::2, ::-1]
    else:  # group q -> lane q mod lanes
        gorder = np.broadcast_to(np.arange(groups).reshape(rounds, lanes), (window, rounds, lanes))
    corder = np.argsort(rate.reshape(window, groups, per_group), axis=2) + (np.arange(groups) * per_group)[None, :, None]
    seq = np.take_along_axis(corder, gorder.reshape(window, groups)[:, :, None], axis=1)  # (F, rounds*lanes, pg)
    seq = seq.reshape(window, rounds, lanes, per_group).transpose(0, 2, 1, 3).reshape(window, lanes, rows, ci)
    seq[:, :, 1::2, :] = seq[:, :, 1::2, ::-1]  # each lane snake-deals its list to its streams
    order = seq.transpose(0, 2, 1, 3).reshape(window, rows * lanes * ci)  # stream index = lane*ci + s
    streams = lanes * ci
    ws = hist[order].reshape(window, rows, streams, window + 1).mean(axis=1)
    acc = np.zeros((window, streams))
    for j in range(window):  # sequential sum over bins with j zero products (all-zero bin costs 0)
        acc = acc + cyc[:, j][:, None] * ws[:, :, j]
    out = np.zeros(window + 1)
    out[1:] = acc.max(axis=1)
    return out


def _pointwise_cycle(avg: np.ndarray, coarse_in: int, coarse_group: int, groups: int, clusters: int) -> float:
    """Share of dense cycles a 1x1 stage needs: 1 - average sparsity of its slowest cluster,
    the sparsity capped at 1 - 1/(streams per cluster).

    Channels go to streams in order within their group's lane: channel c of group q goes to
    stream (q mod coarse_group)*coarse_in + (c - q*C/g) mod coarse_in (for groups = 1:
    stream c mod coarse_in). Clusters are runs of consecutive streams.
    """
    channels = avg.shape[0]
    streams = coarse_in * coarse_group
    c = np.arange(channels)
    q = c // (channels // groups)
    stream_of = (q % coarse_group) * coarse_in + (c - q * (channels // groups)) % coarse_in
    per_stream = avg[np.argsort(stream_of, kind="stable").reshape(streams, -1).T]  # (C/streams, streams)
    members = np.arange(streams).reshape(clusters, -1)
    cluster_sparsity = [np.mean(np.array([per_stream[:, i] for i in g])) for g in members]
    capped = np.minimum(cluster_sparsity, 1 - (1 / (streams // clusters)))
    return float(np.max(np.subtract(1, capped)))


@dataclass(frozen=True)
class LayerGrid:
    """Every feasible folding of one stage, evaluated.

    Attributes:
        values: feasible values of coarse_in, coarse_out, coarse_group, fine, use_uram.
        fold: (G, 5) int64, every combination in C order.
        out: ``ii_cycles``, ``dsp``, ``bram18``, ``uram``, ``lut``, ``ff`` arrays shaped
            (len(values[0]), ..., len(values[4])).
    """

    values: tuple[np.ndarray, ...]
    fold: np.ndarray
    out: dict[str, np.ndarray]


@dataclass(eq=False)
class LayerModel:
    """A :class:`Layer` bound to its numerics, sparsity and weight storage.

    Attributes:
        layer: the shape.
        act_bits, weight_bits: operand widths in bits.
        sparsity: None for the dense engine, else a :class:`WindowHist` (k*k > 1) or
            :class:`PointwiseAvg` (1x1 / linear). A sparse engine keeps one weight array
            per multiplier (no data packing), as fpgaConvNet's sparse layers do.
        weight_memory: ``bram`` (default), ``uram``, ``auto`` (per design point, from the
            ``use_uram`` argument of :meth:`evaluate`) or ``stream`` (weights streamed from
            off-chip each image through a double buffer).
        clusters: 1x1 sparse engines: groups of input streams sharing the multipliers.
    """

    layer: Layer
    act_bits: int = 16
    weight_bits: int = 16
    sparsity: Sparsity | None = None
    weight_memory: str = "bram"
    clusters: int = 1
    _tables: dict[tuple[int, int], np.ndarray] = field(default_factory=dict, repr=False)
    _grid: LayerGrid | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        for f in ("act_bits", "weight_bits"):
            if not 1 <= int(getattr(self, f)) <= 64:
                raise ValueError(f"{f}: expected an operand width in 1..64 bits, got {getattr(self, f)}")
        if self.weight_memory not in WEIGHT_MEMORIES:
            raise ValueError(f"weight_memory: expected one of {WEIGHT_MEMORIES}, got {self.weight_memory!r}")
        sp, ly = self.sparsity, self.layer
        if ly.op == "matmul":  # both operands are activations; the buffer cannot be streamed
            self.weight_bits = self.act_bits
            if self.weight_memory == "stream":
                self.weight_memory = "bram"
        if sp is None:
            return
        if ly.op not in WEIGHT_OPS:
            raise ValueError(f"sparsity: layer {ly.name} ({ly.op}) has no weights to skip")
        if sp.channels != ly.channels:
            raise ValueError(f"sparsity: expected {ly.channels} channels for {ly.name}, got {sp.channels}")
        if ly.window > 1 and not isinstance(sp, WindowHist):
            raise ValueError(f"sparsity: {ly.name} has a {ly.kernel} window; expected kind window_hist")
        if ly.window == 1 and not isinstance(sp, PointwiseAvg):
            raise ValueError(f"sparsity: {ly.name} is 1x1/linear; expected kind pointwise_avg")
        if isinstance(sp, WindowHist) and sp.window != ly.window:
            raise ValueError(f"sparsity: expected {ly.window + 1} histogram bins for {ly.name}")
        if self.clusters < 1:
            raise ValueError(f"clusters: expected a positive integer, got {self.clusters}")

    # -- sparse cycle tables ---------------------------------------------------------
    def _table(self, ci: int, cg: int) -> np.ndarray:
        """Cycles per window by fine (k x k) or share of dense cycles (1x1) for ci x cg streams."""
        tab = self._tables.get((ci, cg))
        if tab is None:
            sp, ly = self.sparsity, self.layer
            if isinstance(sp, WindowHist):
                key = (hashlib.sha1(sp.hist.tobytes()).hexdigest(), sp.hist.shape, ci, cg, ly.groups)
                tab = _TABLE_CACHE.get(key)
                if tab is None:
                    tab = _window_cycle_table(sp.hist, ly.window, ci, cg, ly.groups)
                    if len(_TABLE_CACHE) > 4096:
                        _TABLE_CACHE.clear()
                    _TABLE_CACHE[key] = tab
            else:
                assert isinstance(sp, PointwiseAvg)
                if (ci * cg) % self.clusters:
                    raise ValueError(f"clusters: {self.clusters} does not divide {ci * cg} input streams of {ly.name}")
                tab = np.array([_pointwise_cycle(sp.avg, ci, cg, ly.groups, self.clusters)])
            self._tables[(ci, cg)] = tab
        return tab

    def _cycles_per_window(self, ci: np.ndarray, cg: np.ndarray, fine: np.ndarray) -> np.ndarray:
        out = np.empty(ci.shape)
        for a, b in np.unique(np.stack([ci.reshape(-1), cg.reshape(-1)], axis=1), axis=0):
            m = (ci == a) & (cg == b)
            tab = self._table(int(a), int(b))
            out[m] = tab[fine[m]] if isinstance(self.sparsity, WindowHist) else tab[0]
        return out

    # -- every feasible folding at once ------------------------------------------------------
    def grid(self) -> LayerGrid:
        """All feasible foldings of this stage evaluated once (cached): see :class:`LayerGrid`."""
        if self._grid is None:
            ly = self.layer
            vals = [np.asarray(ly.feasible(f), dtype=np.int64) for f in FOLD_FIELDS]
            mems = np.array([0, 1] if (self.weight_memory == "auto" and ly.weights) else [0], dtype=np.int64)
            mesh = np.meshgrid(*vals, mems, indexing="ij")
            flat = [m.reshape(-1) for m in mesh]
            out = self.evaluate(*flat[:4], check=False, use_uram=flat[4].astype(bool))
            shape = mesh[0].shape
            self._grid = LayerGrid(values=(*vals, mems), fold=np.stack(flat, axis=1),
                                   out={k: v.reshape(shape) for k, v in out.items()})
        return self._grid

    def lookup(self, ci: np.ndarray, co: np.ndarray, cg: np.ndarray, fine: np.ndarray,
               use_uram: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Same as :meth:`evaluate` (with its checks), by table look-up in :meth:`grid`."""
        g = self.grid()
        args = [np.asarray(a, dtype=np.int64) for a in (ci, co, cg, fine)]
        uu = np.zeros_like(args[0]) if use_uram is None else np.asarray(use_uram, dtype=np.int64)
        if self.weight_memory != "auto" or not self.layer.weights:
            uu = np.zeros_like(uu)
        idx = []
        for name, vals, a in zip((*FOLD_FIELDS, "use_uram"), g.values, (*args, uu), strict=True):
            i = np.minimum(np.searchsorted(vals, a), len(vals) - 1)
            if (vals[i] != a).any():
                bad = np.unique(a[vals[i] != a]).tolist()
                raise ValueError(f"{name}: expected one of {vals.tolist()} for layer {self.layer.name}, got {bad}")
            idx.append(i)
        flat = np.ravel_multi_index(tuple(idx), g.out["ii_cycles"].shape)
        return {k: v.reshape(-1)[flat] for k, v in g.out.items()}

    # -- folding ------------------------------------------------------------------------
    def check(self, ci: np.ndarray, co: np.ndarray, cg: np.ndarray, fine: np.ndarray) -> None:
        """Raise ValueError when a folding is infeasible for this layer."""
        ly = self.layer
        if ly.op in MAC_OPS:
            limits = (("coarse_in", ci, ly.channels // ly.groups), ("coarse_out", co, ly.filters // ly.groups),
                      ("coarse_group", cg, ly.groups))
            for name, v, n in limits:
                if np.any(v < 1) or np.any(n % v):
                    raise ValueError(f"{name}: expected a divisor of {n} for layer {ly.name}, got {np.unique(v[(v < 1) | (n % np.maximum(v, 1) != 0)]).tolist()}")
            if np.any(fine < 1) or np.any(fine > ly.window):
                raise ValueError(f"fine: expected 1..{ly.window} for layer {ly.name}")
        else:
            if np.any(ci < 1) or np.any(ly.channels % ci):
                raise ValueError(f"coarse_in: expected a divisor of {ly.channels} for layer {ly.name}")

    def evaluate(self, ci: np.ndarray, co: np.ndarray, cg: np.ndarray, fine: np.ndarray,
                 check: bool = True, use_uram: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """II and resources for foldings given as integer arrays of one shape.

        ``use_uram`` (bool array, default False) places the weights in URAM for points
        where ``weight_memory == "auto"``.

        Returns ``ii_cycles`` (int64, cycles per image), ``dsp``, ``bram18``, ``lut``, ``ff``
        (int64 each), arrays of the folding's shape.
        """
        ci, co, cg, fine = (np.asarray(a, dtype=np.int64) for a in (ci, co, cg, fine))
        ci, co, cg, fine = np.broadcast_arrays(ci, co, cg, fine)
        use_uram = np.zeros(ci.shape, dtype=bool) if use_uram is None else np.broadcast_to(np.asarray(use_uram, dtype=bool), ci.shape)
        if check:
            self.check(ci, co, cg, fine)
        ly = self.layer
        if ly.op not in MAC_OPS:
            return self._evaluate_stream(ci)
        si, so = ci * cg, co * cg
        K = ly.window
        ro_co = ly.rows_out * ly.cols_out
        if self.sparsity is None:
            compute = ro_co * (ly.channels // si) * (ly.filters // (co * ly.groups)) * (-(-K // fine))
            ii = np.maximum(compute, np.maximum(-(-ly.in_words // si), -(-ly.out_words // so)))
        else:
            workload = ro_co * (ly.channels / si) * (ly.filters / (co * ly.groups))
            compute_f = workload * self._cycles_per_window(ci, cg, fine)
            ii = np.ceil(np.maximum(compute_f, np.maximum(ly.in_words / si, ly.out_words / so))).astype(np.int64)
        mults = fine * ci * co * cg
        dsp_unit = math.ceil(self.act_bits / 18) * math.ceil(self.weight_bits / 27)
        pack = 4 if (self.act_bits <= 4 and self.weight_bits <= 4) else 2 if (self.act_bits <= 8 and self.weight_bits <= 8) else 1
        dsp = -(-(mults * dsp_unit) // pack)
        bram, uram = self._memory(ci, co, cg, fine, use_uram)
        lut, ff = self._logic(ci, co, cg, fine)
        return {"ii_cycles": ii.astype(np.int64), "dsp": dsp, "bram18": bram, "uram": uram, "lut": lut, "ff": ff}

    def _sliding_window_bram(self, streams: np.ndarray, per_array_streams: np.ndarray) -> np.ndarray:
        ly = self.layer
        kh, kw = ly.kernel
        if kh * kw == 1:
            return np.zeros_like(streams)
        chans = ly.channels // streams
        cols_p = ly.cols + ly.pad[1] + ly.pad[3]
        line = bram18_array(chans * cols_p, (kh - 1) * per_array_streams * self.act_bits, fifo=True)
        win = kh * bram18_array(chans, (kw - 1) * per_array_streams * self.act_bits, fifo=True)
        return line + win

    def _memory(self, ci: np.ndarray, co: np.ndarray, cg: np.ndarray, fine: np.ndarray,
                use_uram: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(BRAM18, URAM) blocks: sliding-window line/window buffers + weight memory."""
        ly = self.layer
        si = ci * cg
        arrays = fine * ci * co * cg
        depth = -(-(ly.weights) // arrays)
        packed = self.sparsity is None
        if packed:  # one wide array, all streams packed side by side
            sw = self._sliding_window_bram(si, si)
            width, n_arrays = self.weight_bits * arrays, np.ones_like(arrays)
        else:  # one narrow array per multiplier and one window per stream
            sw = self._sliding_window_bram(si, np.ones_like(si)) * si
            width, n_arrays = np.full_like(arrays, self.weight_bits), arrays
        zero = np.zeros_like(arrays)
        if self.weight_memory == "stream":  # double-buffered 512-word tiles of streamed weights
            return sw + bram18_array(np.minimum(depth, 1024), width, fifo=False) * n_arrays, zero
        bram = bram18_array(depth, width, fifo=False) * n_arrays
        if self.weight_memory == "bram":
            return sw + bram, zero
        uram = uram_array(depth, width) * n_arrays
        if self.weight_memory == "uram":
            return sw, uram
        # auto: the folding says, per design point
        return sw + np.where(use_uram, 0, bram), np.where(use_uram, uram, 0)

    def _logic(self, ci: np.ndarray, co: np.ndarray, cg: np.ndarray, fine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Own LUT/FF model (docs/dataflow.md): control + per-multiplier operand and adder
        logic + window registers + the sparse engine's zero-skip crossbar."""
        ly = self.layer
        si, so = ci * cg, co * cg
        mults = fine * ci * co * cg
        a, w = self.act_bits, self.weight_bits
        win = ly.window
        lut = 250 + mults * (a + w + ACC_BITS // 2) + si * (win * a // 2) + so * ACC_BITS
        ff = 300 + mults * (a + w + ACC_BITS) + si * win * a + so * ACC_BITS
        if self.sparsity is not None:
            sel = max(1, math.ceil(math.log2(win + 1)))
            lut = lut + mults * (a + w) * sel // 2
            ff = ff + si * win * (a + w)
        if self.weight_memory == "stream":
            lut = lut + 400 + mults * w // 8
        return lut.astype(np.int64), ff.astype(np.int64)

    def _evaluate_stream(self, coarse: np.ndarray) -> dict[str, np.ndarray]:
        """Pool, global pool, eltwise, concat and softmax stages: ``coarse`` words per cycle."""
        ly = self.layer
        if ly.op == "softmax":
            return self._evaluate_softmax(coarse)
        n_in = 2 if ly.op in ("add", "mul") else 1
        ii = np.maximum(-(-(ly.in_words) // coarse), -(-ly.out_words // coarse)).astype(np.int64)
        dsp = np.zeros_like(coarse)
        if ly.op == "mul":
            unit = math.ceil(self.act_bits / 18) * math.ceil(self.act_bits / 27)
            pack = 2 if self.act_bits <= 8 else 1
            dsp = -(-(coarse * unit) // pack)
        if ly.op == "pool":
            bram = self._sliding_window_bram(coarse, coarse)
        else:
            bram = np.zeros_like(coarse)
        a = self.act_bits
        lut = 60 + coarse * (n_in * a + (ly.window * a // 2 if ly.op == "pool" else 0) + (ACC_BITS if ly.op == "gap" else 0))
        ff = 80 + coarse * (n_in * a + (ly.window * a if ly.op == "pool" else 0) + (ACC_BITS if ly.op == "gap" else 0))
        return {"ii_cycles": ii, "dsp": dsp.astype(np.int64), "bram18": bram.astype(np.int64),
                "uram": np.zeros_like(ii), "lut": lut.astype(np.int64), "ff": ff.astype(np.int64)}

    def _evaluate_softmax(self, coarse: np.ndarray) -> dict[str, np.ndarray]:
        """Softmax over rows of ``channels / heads`` scores: ``coarse`` lanes, one word each per
        cycle. A lane keeps two rows (one filling while the other is normalised: running
        max, exp by table, sum, then a multiply by the reciprocal), so II = words / coarse.
        Resources (our model): a double-buffered row buffer of ``2 * channels / coarse``
        words of ``coarse * act_bits`` bits; one multiplier per lane (DSP-packed like an
        eltwise ``mul``); LUT = 60 + coarse * (a + 8a + 32) (compare, exp table, accumulator),
        FF = 80 + coarse * (5a + 32)."""
        ly, a = self.layer, self.act_bits
        ii = np.maximum(-(-ly.in_words // coarse), -(-ly.out_words // coarse)).astype(np.int64)
        unit = math.ceil(a / 18) * math.ceil(a / 27)
        dsp = -(-(coarse * unit) // (2 if a <= 8 else 1))
        bram = bram18_array(2 * (ly.channels // coarse), coarse * a, fifo=True)
        lut = 60 + coarse * (9 * a + ACC_BITS)
        ff = 80 + coarse * (5 * a + ACC_BITS)
        return {"ii_cycles": ii, "dsp": dsp.astype(np.int64), "bram18": bram.astype(np.int64),
                "uram": np.zeros_like(ii), "lut": lut.astype(np.int64), "ff": ff.astype(np.int64)}
