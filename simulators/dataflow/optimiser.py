"""Greedy folding optimiser (fpgaConvNet-style, sparse-aware).

Start from the least parallel folding. Repeatedly take the bottleneck stage (largest II)
and move it to the cheapest folding of that stage whose II is at most the next-slowest
stage's II, or, when none fits, to the fastest folding that fits; a move is accepted only
if it strictly lowers that stage's II with the stage's *sparse* cycle model (with
sparsity, more ``fine`` or more streams may not help: such a move is not taken) and the
whole design stays within the budget. Stop when the bottleneck cannot be improved or the
off-chip transfer time already sets the pace. Every stage's folding grid is evaluated
once, vectorised, so the loop itself only does table look-ups.

When even the least parallel folding does not fit, the network is split greedily into
partitions (in topological order) that each fit, and each partition is optimised alone
with the whole budget (the device is reconfigured between partitions).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from simulators.dataflow.pipeline import RESOURCES, Folding, Pipeline, Result


@dataclass
class _Grid:
    fold: np.ndarray  # (G, 5) int64: coarse_in, coarse_out, coarse_group, fine, use_uram
    ii: np.ndarray  # (G,)
    res: np.ndarray  # (G, R)


def _layer_grid(pipe: Pipeline, j: int) -> _Grid:
    """Every feasible folding of stage ``j`` (and both weight memories where it may choose);
    row 0 is the all-ones folding in BRAM, row 1 (if any) the all-ones folding in URAM."""
    model = pipe.models[j]
    g = model.grid()
    fold = g.fold
    if pipe.device.uram == 0:  # no URAM: BRAM rows only
        keep = fold[:, 4] == 0
    else:
        keep = np.ones(len(fold), dtype=bool)
    rows = np.flatnonzero(keep)
    fold = fold[rows]
    order = np.lexsort((fold[:, 4], np.any(fold[:, :4] != 1, axis=1)))  # ones first
    rows, fold = rows[order], fold[order]
    res = np.stack([g.out[k].reshape(-1)[rows] for k in RESOURCES], axis=1)
    return _Grid(fold, g.out["ii_cycles"].reshape(-1)[rows], res)


def _initial(grids: list[_Grid], cap: np.ndarray) -> np.ndarray:
    """All-ones folding; the largest weight memories go to URAM while URAM lasts and the
    move saves BRAM."""
    start = np.zeros(len(grids), dtype=np.int64)
    u, b = RESOURCES.index("uram"), RESOURCES.index("bram18")
    left = cap[u]
    order = sorted(range(len(grids)), key=lambda j: -grids[j].res[0, b])
    for j in order:
        g = grids[j]
        if g.fold.shape[0] > 1 and g.fold[1, 4] == 1 and not np.any(g.fold[1, :4] != 1):
            if g.res[1, u] <= left and g.res[1, b] < g.res[0, b]:
                start[j] = 1
                left -= g.res[1, u]
    return start


def _greedy(grids: list[_Grid], cap: np.ndarray, floor_cycles: float, max_steps: int,
            start: np.ndarray) -> np.ndarray:
    """Chosen grid index per stage, from ``start``."""
    scale = 1.0 / np.maximum(cap, 1.0)
    cur = start.copy()
    ii = np.array([g.ii[c] for g, c in zip(grids, cur, strict=True)], dtype=np.int64)
    res = np.stack([g.res[c] for g, c in zip(grids, cur, strict=True)])
    total = res.sum(axis=0)
    if not np.all(total <= cap):
        return cur
    for _ in range(max_steps):
        b = int(np.argmax(ii))
        if ii[b] <= floor_cycles:
            break
        g = grids[b]
        others = np.delete(ii, b)
        target = others.max() if others.size else 0
        new_total = total - res[b] + g.res
        ok = np.all(new_total <= cap, axis=1) & (g.ii < ii[b])
        if not ok.any():
            break  # the bottleneck cannot improve: the pipeline interval is final
        cost = (g.res * scale).sum(axis=1)
        reach = ok & (g.ii <= max(target, floor_cycles))
        cand = np.flatnonzero(reach if reach.any() else ok)
        if reach.any():  # cheapest folding that reaches the next bottleneck
            pick = cand[np.lexsort((g.ii[cand], cost[cand]))[0]]
        else:  # fastest folding that fits
            pick = cand[np.lexsort((cost[cand], g.ii[cand]))[0]]
        total = new_total[pick]
        res[b] = g.res[pick]
        ii[b] = g.ii[pick]
        cur[b] = pick
    return cur


def optimise(pipe: Pipeline, budget: Mapping[str, float] | None = None,
             max_utilisation: float = 1.0, max_steps: int = 100_000) -> tuple[Folding, Result]:
    """Best folding found greedily for ``pipe`` within a resource budget.

    Args:
        pipe: the network bound to device, widths and sparsity.
        budget: ``{"dsp": .., "bram18": .., "uram": .., "lut": .., "ff": ..}``; missing
            entries come from the device. Each is multiplied by ``max_utilisation``.
        max_utilisation: share of the budget the design may use, in (0, 1].
        max_steps: safety limit on greedy moves.

    Returns:
        (folding with one design point, its :class:`Result` evaluated with the optimiser's
        partitions). When a single stage exceeds the budget even at the least parallel
        folding, ``fits_device`` of the result is 0.
    """
    if not 0.0 < max_utilisation <= 1.0:
        raise ValueError(f"max_utilisation: expected a value in (0, 1], got {max_utilisation}")
    dev = pipe.device.budget()
    budget = dict(budget or {})
    bad = set(budget) - set(RESOURCES)
    if bad:
        raise ValueError(f"budget: unknown resource(s) {sorted(bad)}; expected {RESOURCES}")
    cap = np.array([float(min(budget.get(r, dev[r]), dev[r])) * max_utilisation for r in RESOURCES])
    L = len(pipe.net.layers)
    grids = [_layer_grid(pipe, j) for j in range(L)]
    start = _initial(grids, cap)
    ones = {r: np.stack([g.res[c] for g, c in zip(grids, start, strict=True)])[None, :, k]
            for k, r in enumerate(RESOURCES)}
    total = np.array([ones[r].sum() for r in RESOURCES])
    if np.all(total <= cap) or not pipe.allow_partitions:
        pid = np.zeros(L, dtype=np.int64)
    else:
        pid = pipe.partition(ones, dict(zip(RESOURCES, cap, strict=True)))[0][0]
    f_hz = pipe.device.clock_hz
    cur = np.zeros(L, dtype=np.int64)
    for p in range(int(pid.max()) + 1):
        idx = np.flatnonzero(pid == p)
        floor = 0.0
        if pid.max() == 0:  # one partition: off-chip traffic per image sets a floor
            byts = float(pipe._in_bytes.sum() + pipe._stream_bytes.sum() + pipe._out_bytes[pipe._is_output].sum())
            floor = byts / (pipe.device.mem_bandwidth_gbps * 1e9 / f_hz)
        cur[idx] = _greedy([grids[j] for j in idx], cap, floor, max_steps, start[idx])
    fold = np.stack([grids[j].fold[cur[j]] for j in range(L)])  # (L, 5)
    folding = Folding(*(fold[:, k][None, :] for k in range(5)))
    result = pipe.evaluate(folding, check=False, partitions=pid if pid.max() > 0 else None)
    return folding, result
