"""PLENA hardware parameters and operand formats, validated, scalar or numpy arrays."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from functools import cached_property, lru_cache
from typing import Any

import numpy as np
from numpy.typing import NDArray

from quant.desc import KV_LAYOUTS, describe, multiplier_cost

#: the integer-valued fields of PlenaHardware
INT_FIELDS = ("mlen", "blen", "vlen", "hlen")


@dataclass(frozen=True)
class PlenaHardware:
    """One PLENA design point, or many: every field may be a numpy array (broadcast).

    Attributes:
        mlen: reduction length of the flattened systolic array, multipliers (elements).
        blen: width of the array, output columns; the array has mlen * blen multipliers.
        vlen: vector-unit width, elements per cycle.
        hlen: head slice, elements; one array pass packs mlen // hlen head slices.
        matrix_sram_bytes: matrix (weight / KV) SRAM, bytes.
        vector_sram_bytes: vector (activation) SRAM, bytes.
        hbm_gbps: HBM bandwidth, GB/s (1e9 bytes/s).
        hbm_gb: HBM capacity, GB (1e9 bytes).
        clock_ghz: clock, GHz.

    Defaults follow the public PLENA analytic settings (MLEN 2048, BLEN 128, 1 GHz) with
    A100-80GB-class memory (2039 GB/s, 80 GB) and 16 MiB per SRAM.
    """

    mlen: Any = 2048
    blen: Any = 128
    vlen: Any = 2048
    hlen: Any = 128
    matrix_sram_bytes: Any = 16 * 2**20
    vector_sram_bytes: Any = 16 * 2**20
    hbm_gbps: Any = 2039.0
    hbm_gb: Any = 80.0
    clock_ghz: Any = 1.0

    def __post_init__(self) -> None:
        for f in fields(self):
            raw = getattr(self, f.name)
            if type(raw) in (int, float) and raw > 0 and math.isfinite(raw) and (
                    f.name not in INT_FIELDS or raw == int(raw)):
                object.__setattr__(self, f.name, np.float64(raw))
                continue
            arr = np.asarray(raw, dtype=np.float64) if _numeric(raw) else None
            if arr is None or not np.all(np.isfinite(arr)) or np.any(arr <= 0):
                raise ValueError(f"hw.{f.name}: expected a positive number, got {raw!r}")
            if f.name in INT_FIELDS and np.any(arr != np.round(arr)):
                raise ValueError(f"hw.{f.name}: expected a positive integer, got {raw!r}")
            object.__setattr__(self, f.name, arr)
        if np.any(self.hlen > self.mlen):
            raise ValueError(f"hw.hlen: expected <= hw.mlen ({self.mlen}), got {self.hlen}")

    @property
    def shape(self) -> tuple[int, ...]:
        """Broadcast shape of all fields (() for one design point)."""
        return self._shape

    @cached_property
    def _shape(self) -> tuple[int, ...]:
        return np.broadcast_shapes(*(np.shape(getattr(self, f.name)) for f in fields(self)))

    @property
    def multipliers(self) -> NDArray[np.float64]:
        """Multipliers in the matrix unit, mlen * blen."""
        return self.mlen * self.blen

    @classmethod
    def from_params(cls, params: Mapping[str, Any], defaults: Mapping[str, Any] | None = None
                    ) -> PlenaHardware:
        """Read ``hw.<field>`` names from a flat parameter dict (others ignored)."""
        kw = dict(defaults or {})
        for f in fields(cls):
            if f"hw.{f.name}" in params:
                kw[f.name] = params[f"hw.{f.name}"]
        return cls(**kw)


def _numeric(x: Any) -> bool:
    if isinstance(x, bool | str) or x is None:
        return False
    try:
        return np.asarray(x).dtype.kind in "iuf"
    except (TypeError, ValueError):
        return False


@lru_cache(maxsize=4096)
def format_bits(name: str, field: str, shape: tuple[int, ...] | None = None,
                axis: int = -1) -> float:
    """Bits per element of format ``name`` (scales included) via ``quant.desc.describe``,
    for a tensor of ``shape`` with blocks/groups along ``axis`` (``None``: asymptotic).

    Raises:
        ValueError: naming ``field`` when the format string does not parse.
    """
    try:
        fmt = describe(name)
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{field}: expected a quant format name, got {name!r} ({e})") from None
    return float(fmt.bits_per_element(shape, axis))


@lru_cache(maxsize=512)
def mult_cost(a: str, b: str) -> float:
    """``quant.multiplier_cost(a, b)``: multiplier gates relative to int8 x int8."""
    return float(multiplier_cost(a, b))


#: bits per element of the full-precision window of recent tokens (``quant.kv_window``):
#: bf16, as KIVI keeps its residual tokens in 16-bit floats
KV_WINDOW_BITS = 16.0
#: the Numerics fields a flat parameter dict may set as ``quant.<field>``
NUMERICS_KEYS = ("weights", "acts", "kv", "kv_k_layout", "kv_v_layout", "kv_window")


@dataclass(frozen=True)
class Numerics:
    """Operand formats (``quant`` format strings) of weights, activations and KV cache,
    and the KV-cache layout.

    Attributes:
        weights, acts, kv: format names (``quant.get_format``).
        kv_k_layout, kv_v_layout: ``token`` (blocks/groups along head_dim, one scale per
            token and group) or ``channel`` (along the token axis, one scale per channel
            and group of consecutive tokens from position 0; KIVI's K), as the accuracy
            side's ``quant.KVQuant``.
        kv_window: the most recent tokens of each sequence's cache held at
            :data:`KV_WINDOW_BITS` instead of ``kv`` (0 = none; ignored when ``kv`` is an
            identity format such as fp32, as on the accuracy side).
    """

    weights: str = "mxint4"
    acts: str = "mxint8"
    kv: str = "mxint4"
    kv_k_layout: str = "token"
    kv_v_layout: str = "token"
    kv_window: int = 0

    def __post_init__(self) -> None:
        for key in ("weights", "acts", "kv"):
            name = getattr(self, key)
            if not isinstance(name, str):
                raise ValueError(f"quant.{key}: expected a format name string, got {name!r}")
            format_bits(name, f"quant.{key}")
        for key in ("kv_k_layout", "kv_v_layout"):
            if getattr(self, key) not in KV_LAYOUTS:
                raise ValueError(f"quant.{key}: expected one of {', '.join(KV_LAYOUTS)}, "
                                 f"got {getattr(self, key)!r}")
        w = self.kv_window
        if isinstance(w, bool) or not isinstance(w, int | np.integer) or w < 0:
            raise ValueError(f"quant.kv_window: expected an integer >= 0, got {w!r}")
        object.__setattr__(self, "kv_window", int(w))

    @classmethod
    def from_params(cls, params: Mapping[str, Any], defaults: Mapping[str, Any] | None = None
                    ) -> Numerics:
        """Read ``quant.weights|acts|kv|kv_k_layout|kv_v_layout|kv_window`` from a flat
        parameter dict."""
        kw = dict(defaults or {})
        for key in NUMERICS_KEYS:
            if f"quant.{key}" in params:
                kw[key] = params[f"quant.{key}"]
        return cls(**kw)

    @cached_property
    def _window_active(self) -> bool:
        return self.kv_window > 0 and not describe(self.kv).is_identity

    def kv_cache_bytes(self, part: str, tokens: int, head_dim: int) -> float:
        """Bytes of one KV head's K (``part = "k"``) or V (``"v"``) cache of ``tokens``
        tokens, scales included: the ``min(kv_window, tokens)`` most recent tokens at
        :data:`KV_WINDOW_BITS`, the others in ``kv`` as a ``(tokens, head_dim)`` tensor with
        blocks along head_dim (layout ``token``) or along tokens (``channel``; partial
        token groups pay a whole group's scales, as ``Format.bits_per_element`` counts).
        """
        layout = self.kv_k_layout if part == "k" else self.kv_v_layout
        w = min(self.kv_window, tokens) if self._window_active else 0
        q = tokens - w
        bits = w * head_dim * KV_WINDOW_BITS
        if q > 0:
            axis = -1 if layout == "token" else -2
            bits += q * head_dim * format_bits(self.kv, "quant.kv", (q, head_dim), axis)
        return bits / 8.0

    def kv_step_write_bytes(self, tokens: int, head_dim: int) -> float:
        """Bytes one decode step writes to one KV head's K (or V) cache holding ``tokens``
        tokens after the step: the new token, at :data:`KV_WINDOW_BITS` under a window
        (plus the token that leaves the window, re-written in ``kv``, once ``tokens >
        kv_window``), else in ``kv``; ``kv`` at its asymptotic bits per element (per-token
        and per-channel layouts then cost the same per token)."""
        q = format_bits(self.kv, "quant.kv") * head_dim
        if not self._window_active:
            return q / 8.0
        return (head_dim * KV_WINDOW_BITS + (q if tokens > self.kv_window else 0.0)) / 8.0

    def weight_bytes(self, rows: int, k: int) -> float:
        """Bytes per weight element of a rows x k matrix (blocks along k)."""
        return format_bits(self.weights, "quant.weights", (int(rows), int(k))) / 8.0

    @property
    def act_bytes(self) -> float:
        """Bytes per activation element (asymptotic: per-block scales included)."""
        return format_bits(self.acts, "quant.acts") / 8.0
