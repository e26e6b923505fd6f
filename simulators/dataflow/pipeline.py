"""A network of dataflow stages run as a pipeline, vectorised over design points.

* ``interval`` (cycles per image) of a partition = max over its stages of the stage II,
  slowed down to the off-chip transfer time when the partition's bytes per image exceed
  what the device's bandwidth delivers in that time.
* ``latency`` of one image = fill along the longest path (a stage starts once its first
  window is complete: fraction ``start_fraction`` of its II) + the interval.
* Partitions: when the stages do not fit the device together they are split greedily in
  topological order; a batch of images runs through each partition in turn, with one
  bitstream reconfiguration per partition per batch; feature maps between partitions go
  through off-chip memory.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from simulators.dataflow.devices import Device, get_device
from simulators.dataflow.layers import Layer, LayerModel
from simulators.dataflow.sparsity import Sparsity

FIELDS = ("coarse_in", "coarse_out", "coarse_group", "fine")
RESOURCES = ("dsp", "bram18", "uram", "lut", "ff")


@dataclass(frozen=True)
class Network:
    """Stages in topological order; ``Layer.inputs`` name their producers."""

    name: str
    layers: tuple[Layer, ...]

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for ly in self.layers:
            if ly.name in seen:
                raise ValueError(f"layers: duplicate layer name {ly.name!r}")
            for u in ly.inputs:
                if u not in seen:
                    raise ValueError(f"inputs: layer {ly.name!r} reads {u!r}, which is not an earlier layer")
            seen.add(ly.name)
        if not self.layers:
            raise ValueError("layers: expected at least one layer")

    @property
    def names(self) -> list[str]:
        """Layer names in order."""
        return [ly.name for ly in self.layers]

    def index(self, name: str) -> int:
        """Position of a layer by name."""
        try:
            return self.names.index(name)
        except ValueError:
            raise ValueError(f"layer: expected one of the network's layer names, got {name!r}") from None

    @property
    def macs(self) -> int:
        """Multiply-accumulates per image."""
        return sum(ly.macs for ly in self.layers)

    @property
    def weights(self) -> int:
        """Weights in the network."""
        return sum(ly.weights for ly in self.layers)


@dataclass
class Folding:
    """Foldings of P design points: int64 arrays of shape (P, L).

    ``use_uram`` (0/1, default 0) puts a stage's weights in URAM instead of BRAM where the
    pipeline's weight memory is ``auto``.
    """

    coarse_in: np.ndarray
    coarse_out: np.ndarray
    coarse_group: np.ndarray
    fine: np.ndarray
    use_uram: np.ndarray | None = None

    def __post_init__(self) -> None:
        arrs = [np.atleast_2d(np.asarray(getattr(self, f), dtype=np.int64)) for f in FIELDS]
        shape = arrs[0].shape
        if self.use_uram is None:
            self.use_uram = np.zeros(shape, dtype=np.int64)
        self.use_uram = np.atleast_2d(np.asarray(self.use_uram, dtype=np.int64))
        for f, a in zip((*FIELDS, "use_uram"), (*arrs, self.use_uram), strict=True):
            if a.shape != shape:
                raise ValueError(f"{f}: expected shape {shape}, got {a.shape}")
            setattr(self, f, a)

    @classmethod
    def ones(cls, net: Network, n_points: int = 1) -> Folding:
        """The least parallel folding (all factors 1)."""
        one = np.ones((n_points, len(net.layers)), dtype=np.int64)
        return cls(one, one.copy(), one.copy(), one.copy())

    @property
    def n_points(self) -> int:
        """Number of design points P."""
        return int(self.coarse_in.shape[0])

    def point(self, i: int) -> Folding:
        """Design point ``i`` as a one-point folding."""
        return Folding(*(getattr(self, f)[i : i + 1].copy() for f in (*FIELDS, "use_uram")))

    def copy(self) -> Folding:
        """Deep copy."""
        return Folding(*(getattr(self, f).copy() for f in (*FIELDS, "use_uram")))

    def as_dict(self, net: Network, i: int = 0) -> dict[str, dict[str, int]]:
        """Design point ``i`` as ``{layer: {field: value}}``."""
        return {ly.name: {f: int(getattr(self, f)[i, j]) for f in (*FIELDS, "use_uram")}
                for j, ly in enumerate(net.layers)}


def start_fraction(ly: Layer) -> float:
    """Share of a stage's II that passes before its first output (pipeline fill)."""
    if ly.op == "gap":
        return 1.0
    if ly.op in ("linear", "softmax"):
        return 1.0 / ly.rows
    if ly.op == "matmul":  # the whole second operand (K^T or V) first, then one row
        return (ly.weights + ly.channels) / ly.in_words
    rows_p = ly.rows + ly.pad[0] + ly.pad[2]
    cols_p = ly.cols + ly.pad[1] + ly.pad[3]
    kh, kw = ly.kernel
    return ((kh - 1) * cols_p + kw) / (rows_p * cols_p)


@dataclass
class Result:
    """Outputs for P design points (arrays of shape (P,) unless noted).

    Attributes:
        images_per_s: throughput; latency_s: one image through the pipeline (batch time
        when partitioned); interval_cycles: slowest stage II of the (largest) partition
        after the bandwidth slow-down; dsp, bram18, uram, lut, ff: resources of the largest
        partition (all stages when it fits in one); images_per_s_per_dsp: HASS's efficiency;
        fits_device: every partition fits; partitions: count; bottleneck: index of the
        slowest stage; bandwidth_gbps: off-chip traffic at the achieved rate;
        ii_cycles: (P, L) per-stage II; layer_resources: name -> (P, L) arrays.
    """

    images_per_s: np.ndarray
    latency_s: np.ndarray
    interval_cycles: np.ndarray
    dsp: np.ndarray
    bram18: np.ndarray
    uram: np.ndarray
    lut: np.ndarray
    ff: np.ndarray
    images_per_s_per_dsp: np.ndarray
    fits_device: np.ndarray
    partitions: np.ndarray
    bottleneck: np.ndarray
    bandwidth_gbps: np.ndarray
    ii_cycles: np.ndarray
    layer_resources: dict[str, np.ndarray] = field(repr=False)

    def metrics(self, i: int = 0) -> dict[str, float]:
        """Scalar metrics of design point ``i`` (floats, units in the names)."""
        return {
            "images_per_s": float(self.images_per_s[i]),
            "latency_s": float(self.latency_s[i]),
            "interval_cycles": float(self.interval_cycles[i]),
            "dsp": float(self.dsp[i]),
            "bram18": float(self.bram18[i]),
            "uram": float(self.uram[i]),
            "lut": float(self.lut[i]),
            "ff": float(self.ff[i]),
            "images_per_s_per_dsp": float(self.images_per_s_per_dsp[i]),
            "fits_device": float(self.fits_device[i]),
            "partitions": float(self.partitions[i]),
            "bandwidth_gbps": float(self.bandwidth_gbps[i]),
        }


class Pipeline:
    """A network bound to a device, operand widths, sparsity and weight storage.

    Args:
        net: the network.
        device: a :class:`Device` or a device name.
        act_bits, weight_bits: default operand widths (bits).
        bits: per-layer ``{name: (act_bits, weight_bits)}`` overrides.
        sparsity: per-layer :class:`~simulators.dataflow.sparsity.WindowHist` /
            :class:`~simulators.dataflow.sparsity.PointwiseAvg`; layers absent are dense.
        weight_memory: where weights live: ``bram``, ``uram``, ``auto`` (per stage and
            folding, the memory taking the smaller share of the device) or ``stream``
            (from off-chip each image); ``layer_weight_memory`` overrides per layer.
        batch: images per batch when the network needs several partitions.
        allow_partitions: when False a design that does not fit one device does not fit.
    """

    def __init__(
        self,
        net: Network,
        device: Device | str = "u250",
        act_bits: int = 16,
        weight_bits: int = 16,
        bits: Mapping[str, tuple[int, int]] | None = None,
        sparsity: Mapping[str, Sparsity] | None = None,
        weight_memory: str = "auto",
        layer_weight_memory: Mapping[str, str] | None = None,
        batch: int = 256,
        allow_partitions: bool = True,
        clusters: Mapping[str, int] | None = None,
    ) -> None:
        self.net = net
        self.device = get_device(device)
        if batch < 1:
            raise ValueError(f"batch: expected a positive integer, got {batch}")
        self.batch = int(batch)
        self.allow_partitions = allow_partitions
        bits = dict(bits or {})
        sparsity = dict(sparsity or {})
        clusters = dict(clusters or {})
        layer_weight_memory = dict(layer_weight_memory or {})
        for what, names in (("bits", bits), ("sparsity", sparsity), ("weight_memory", layer_weight_memory),
                            ("clusters", clusters)):
            for n in names:
                net.index(n) if n in net.names else _unknown(what, n)
        self.models = [
            LayerModel(ly, *bits.get(ly.name, (act_bits, weight_bits)), sparsity=sparsity.get(ly.name),
                       weight_memory=layer_weight_memory.get(ly.name, weight_memory),
                       clusters=clusters.get(ly.name, 1))
            for ly in net.layers
        ]
        idx = {n: i for i, n in enumerate(net.names)}
        self._inputs = [[idx[u] for u in ly.inputs] for ly in net.layers]
        consumers = {u for ly in net.layers for u in ly.inputs}
        self._is_output = np.array([ly.name not in consumers for ly in net.layers])
        self._act_bytes = np.array([m.act_bits / 8 for m in self.models])
        self._start = np.array([start_fraction(ly) for ly in net.layers])
        self._stream_bytes = np.array([
            ly.weights * m.weight_bits / 8 if m.weight_memory == "stream" else 0.0 for ly, m in zip(net.layers, self.models, strict=True)
        ])
        self._in_bytes = np.array([
            ly.rows * ly.cols * ly.channels * m.act_bits / 8 if not ly.inputs else 0.0
            for ly, m in zip(net.layers, self.models, strict=True)
        ])
        self._out_bytes = np.array([ly.out_words * m.act_bits / 8 for ly, m in zip(net.layers, self.models, strict=True)])

    # ---------------------------------------------------------------------------------
    def layer_arrays(self, folding: Folding, check: bool = True) -> dict[str, np.ndarray]:
        """Per-stage ``ii_cycles``, ``dsp``, ``bram18``, ``uram``, ``lut``, ``ff``: arrays (P, L).

        Each stage's feasible foldings are evaluated once (:meth:`LayerModel.grid`); design
        points are then table look-ups, which also reject infeasible values (``check``
        is kept for API compatibility: look-ups always check).
        """
        del check
        L = len(self.net.layers)
        if folding.coarse_in.shape[1] != L:
            raise ValueError(f"folding: expected {L} layers, got {folding.coarse_in.shape[1]}")
        cols = [m.lookup(folding.coarse_in[:, j], folding.coarse_out[:, j], folding.coarse_group[:, j],
                         folding.fine[:, j], use_uram=folding.use_uram[:, j])
                for j, m in enumerate(self.models)]
        return {k: np.stack([c[k] for c in cols], axis=1) for k in ("ii_cycles", *RESOURCES)}

    def evaluate(self, folding: Folding, check: bool = True, partitions: np.ndarray | None = None) -> Result:
        """Throughput, latency, resources and fit for every design point of ``folding``.

        ``partitions``: optional partition id per stage, (L,) or (P, L), non-decreasing in
        topological order; by default stages are split greedily only when they do not fit.
        """
        per = self.layer_arrays(folding, check=check)
        return self.combine(per, partitions)

    def partition(self, per: Mapping[str, np.ndarray],
                  cap: Mapping[str, float] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Greedy partition ids (P, L) in topological order, and whether each stage fits alone
        (in ``cap``, default the device's resources)."""
        dev = dict(cap) if cap is not None else self.device.budget()
        P, L = per["dsp"].shape
        cols = {r: np.ascontiguousarray(per[r].T) for r in RESOURCES}  # (L, P): stage rows
        pid = np.zeros((L, P), dtype=np.int64)
        alone = np.ones((L, P), dtype=bool)
        acc = {r: np.zeros(P, dtype=np.int64) for r in RESOURCES}
        cur = np.zeros(P, dtype=np.int64)
        for j in range(L):
            over = np.zeros(P, dtype=bool)
            for r in RESOURCES:
                alone[j] &= cols[r][j] <= dev[r]
                over |= acc[r] + cols[r][j] > dev[r]
            if j > 0:
                cur = cur + over
                for r in RESOURCES:
                    acc[r] = np.where(over, cols[r][j], acc[r] + cols[r][j])
            else:
                for r in RESOURCES:
                    acc[r] = cols[r][j].copy()
            pid[j] = cur
        return pid.T.copy(), alone.T.copy()

    def combine(self, per: Mapping[str, np.ndarray], partitions: np.ndarray | None = None) -> Result:
        """Pipeline-level results from per-stage arrays (see :meth:`layer_arrays`)."""
        ii = per["ii_cycles"]
        P, L = ii.shape
        dev = self.device
        f_hz = dev.clock_hz
        bw_bytes_per_cycle = dev.mem_bandwidth_gbps * 1e9 / f_hz
        totals = {r: per[r].sum(axis=1) for r in RESOURCES}
        fits_one = np.ones(P, dtype=bool)
        for r in RESOURCES:
            fits_one &= totals[r] <= getattr(dev, r)
        multi = (~fits_one) & self.allow_partitions
        if partitions is not None:
            pid = np.broadcast_to(np.asarray(partitions, dtype=np.int64), (P, L)).copy()
            if np.any(np.diff(pid, axis=1) < 0) or np.any(pid[:, 0] != 0):
                raise ValueError("partitions: expected ids starting at 0, non-decreasing along the layers")
            alone = np.ones((P, L), dtype=bool)
        elif multi.any():
            pid, alone = self.partition(per)
            pid[~multi] = 0
        else:
            pid, alone = np.zeros((P, L), dtype=np.int64), np.ones((P, L), dtype=bool)
        n_parts = pid.max(axis=1) + 1
        fill = ii * self._start[None, :]
        # bytes per image per stage: network input + streamed weights + crossings
        byts = np.broadcast_to(self._in_bytes + self._stream_bytes, (P, L)).copy()
        dist = np.zeros((P, L))
        for j in range(L):
            prev = np.zeros(P)
            for u in self._inputs[j]:
                cross = pid[:, u] != pid[:, j]
                byts[:, j] += np.where(cross, self._out_bytes[u], 0.0)  # read back in
                byts[:, u] += np.where(cross, self._out_bytes[u], 0.0)  # written out
                prev = np.maximum(prev, np.where(cross, 0.0, dist[:, u]))
            dist[:, j] = prev + fill[:, j]
        byts += np.where(self._is_output[None, :], self._out_bytes[None, :], 0.0)
        # partitions are contiguous runs of stages: reduce each (point, partition) segment
        start = np.ones((P, L), dtype=bool)
        start[:, 1:] = pid[:, 1:] != pid[:, :-1]
        seg = np.flatnonzero(start.reshape(-1))  # first flat index of every segment
        seg_point = seg // L
        interval = np.maximum.reduceat(ii.reshape(-1), seg).astype(np.float64)
        mem_cycles = np.add.reduceat(byts.reshape(-1), seg) / bw_bytes_per_cycle
        interval = np.maximum(interval, mem_cycles)
        fill_p = np.maximum.reduceat(dist.reshape(-1), seg)
        multi_seg = n_parts[seg_point] > 1
        batch = np.where(multi_seg, self.batch, 1)
        t = (fill_p + batch * interval) / f_hz + np.where(multi_seg, dev.reconfig_s, 0.0)
        first_seg = np.flatnonzero(np.r_[True, seg_point[1:] != seg_point[:-1]])
        total_s = np.add.reduceat(t, first_seg)
        worst_interval = np.maximum.reduceat(interval, first_seg)
        lat_cycles = np.where(n_parts == 1, fill_p[first_seg] + interval[first_seg], 0.0)
        part_res = {}
        part_fits = np.ones(P, dtype=bool)
        for r in RESOURCES:
            sums = np.add.reduceat(per[r].reshape(-1), seg)
            part_res[r] = np.maximum.reduceat(sums, first_seg)
            part_fits &= part_res[r] <= getattr(dev, r)
        single = n_parts == 1
        images_per_s = np.where(single, f_hz / worst_interval, self.batch / total_s)
        latency_s = np.where(single, lat_cycles / f_hz, total_s)
        fits = np.where(single, fits_one, part_fits & alone.all(axis=1))
        if not self.allow_partitions:
            fits = fits & single
        dsp = part_res["dsp"]
        total_bytes = byts.sum(axis=1)
        return Result(
            images_per_s=images_per_s,
            latency_s=latency_s,
            interval_cycles=worst_interval,
            dsp=dsp,
            bram18=part_res["bram18"],
            uram=part_res["uram"],
            lut=part_res["lut"],
            ff=part_res["ff"],
            images_per_s_per_dsp=images_per_s / np.maximum(dsp, 1),
            fits_device=fits,
            partitions=n_parts,
            bottleneck=ii.argmax(axis=1),
            bandwidth_gbps=total_bytes * images_per_s / 1e9,
            ii_cycles=ii,
            layer_resources={r: per[r] for r in RESOURCES},
        )


def _unknown(what: str, name: str) -> None:
    raise ValueError(f"{what}: {name!r} is not a layer of the network")


def random_foldings(net: Network, n_points: int, seed: int = 0) -> Folding:
    """``n_points`` foldings drawn uniformly from each stage's feasible values (seeded)."""
    rng = np.random.default_rng(seed)
    out = {f: np.ones((n_points, len(net.layers)), dtype=np.int64) for f in FIELDS}
    for j, ly in enumerate(net.layers):
        for f in FIELDS:
            vals = np.asarray(ly.feasible(f), dtype=np.int64)
            out[f][:, j] = vals[rng.integers(0, len(vals), n_points)]
    return Folding(*(out[f] for f in FIELDS))
