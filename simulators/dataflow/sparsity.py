"""Per-layer sparsity descriptions for the dataflow simulator.

Two kinds, matching fpgaConvNet's sparse layers (and the ``layer_sparsity`` contract in
docs/dataflow.md):

* :class:`WindowHist` (convolutions with a k x k window, k*k > 1): ``hist[c, n]`` is the
  share of (window, filter) pairs of input channel ``c`` whose k*k products contain
  exactly ``n`` zeros (zeros from pruned weights OR zero activations). Rows sum to 1.
* :class:`PointwiseAvg` (1x1 convolutions and fully connected layers): ``avg[c]`` is the
  share of zero products of input channel ``c``.

numpy only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

_SUM_TOL = 1e-6


@dataclass(frozen=True, eq=False)
class WindowHist:
    """Per-input-channel histogram of zero products per window.

    Attributes:
        hist: float array (channels, k*k + 1); ``hist[c, n]`` = share of windows of channel
            ``c`` with exactly ``n`` zero products. Each row sums to 1.
    """

    hist: np.ndarray

    def __post_init__(self) -> None:
        h = np.asarray(self.hist, dtype=np.float64)
        if h.ndim != 2 or h.shape[1] < 2:
            raise ValueError(f"hist: expected a 2-D array (channels, k*k+1), got shape {h.shape}")
        if np.any(h < 0) or np.any(np.abs(h.sum(axis=1) - 1.0) > _SUM_TOL):
            raise ValueError("hist: expected non-negative rows that each sum to 1")
        object.__setattr__(self, "hist", h)

    @property
    def window(self) -> int:
        """Products per window, k*k."""
        return int(self.hist.shape[1] - 1)

    @property
    def channels(self) -> int:
        """Input channels described."""
        return int(self.hist.shape[0])

    @property
    def zero_fraction(self) -> float:
        """Mean share of zero products over all channels."""
        n = np.arange(self.hist.shape[1])
        return float((self.hist @ n).mean() / self.window)


@dataclass(frozen=True, eq=False)
class PointwiseAvg:
    """Per-input-channel average share of zero products (1x1 convs, linear layers).

    Attributes:
        avg: float array (channels,), each in [0, 1].
    """

    avg: np.ndarray

    def __post_init__(self) -> None:
        a = np.asarray(self.avg, dtype=np.float64)
        if a.ndim != 1 or a.size == 0:
            raise ValueError(f"avg: expected a 1-D array (channels,), got shape {a.shape}")
        if np.any(a < 0) or np.any(a > 1):
            raise ValueError("avg: expected zero-product fractions in [0, 1]")
        object.__setattr__(self, "avg", a)

    @property
    def channels(self) -> int:
        """Input channels described."""
        return int(self.avg.shape[0])

    @property
    def zero_fraction(self) -> float:
        """Mean share of zero products."""
        return float(self.avg.mean())


Sparsity = WindowHist | PointwiseAvg


def binomial_hist(window: int, p_zero: float, channels: int) -> WindowHist:
    """Histogram when each of ``window`` products is zero independently with ``p_zero``.

    Args:
        window: products per window (k*k).
        p_zero: probability that one product is zero, in [0, 1].
        channels: number of input channels (all get the same row).
    """
    if not 0.0 <= p_zero <= 1.0:
        raise ValueError(f"p_zero: expected a probability in [0, 1], got {p_zero}")
    row = [math.comb(window, n) * p_zero**n * (1.0 - p_zero) ** (window - n) for n in range(window + 1)]
    return WindowHist(np.tile(np.asarray(row), (channels, 1)))


def synthetic(window: int, channels: int, density: float) -> Sparsity:
    """Sparsity with a share ``1 - density`` of zero products, i.i.d. per product.

    ``window == 1`` gives :class:`PointwiseAvg`, larger windows a binomial :class:`WindowHist`.
    """
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density: expected a value in [0, 1], got {density}")
    if window == 1:
        return PointwiseAvg(np.full(channels, 1.0 - density))
    return binomial_hist(window, 1.0 - density, channels)


def from_record(record: Mapping[str, Any], window: int, channels: int) -> Sparsity:
    """Parse one ``layer_sparsity`` value (see docs/dataflow.md) for a layer.

    Args:
        record: ``{"kind": "window_hist", "hist": [[...], ...]}`` or
            ``{"kind": "pointwise_avg", "avg": [...]}``.
        window: the layer's k*k.
        channels: the layer's input channels per group times groups (all input channels).
    """
    kind = record.get("kind")
    if kind == "window_hist":
        sp: Sparsity = WindowHist(np.asarray(record["hist"], dtype=np.float64))
        if sp.window != window:
            raise ValueError(f"hist: expected {window + 1} bins per channel, got {sp.window + 1}")
    elif kind == "pointwise_avg":
        sp = PointwiseAvg(np.asarray(record["avg"], dtype=np.float64))
    else:
        raise ValueError(f"kind: expected 'window_hist' or 'pointwise_avg', got {kind!r}")
    if sp.channels != channels:
        raise ValueError(f"layer_sparsity: expected {channels} channels, got {sp.channels}")
    return sp
