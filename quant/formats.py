"""Number formats: parsing, fake quantization, bit accounting and multiplier cost.

A *format* is a small frozen, hashable value parsed from a string (``get_format("mxint8")``).
Every format offers:

* ``quantize(x, axis=-1)``: fake quantization (quantize then dequantize), returning a tensor
  of ``x``'s dtype and shape whose values lie on the format's grid. Gradients pass straight
  through (straight-through estimator). Blocks and groups run along ``axis`` (the reduction
  axis of the matmul that consumes the tensor), row-local: a block never spans two rows,
  the tail of a row is zero-padded, never borrowed from the next row.
* ``bits_per_element(shape=None, axis=-1)``: storage bits per element including shared
  scales and zero points, and ``tensor_bytes(shape, axis)`` / ``memory_density()``.

Common special cases (each class docstring adds its own):

* Non-float dtypes raise ``ValueError``. Arithmetic is done in float32 (float64 inputs are
  rounded to float32 first) and the result is cast back to the input dtype.
* Empty tensors are returned unchanged (an empty tensor of the same shape and dtype).
* NaN/inf: see each class. Block and group formats turn a whole block/group into NaN when it
  holds a NaN or an infinity (the OCP MX scale then is the E8M0 NaN code 0xFF).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import torch

__all__ = [
    "Format",
    "FloatFormat",
    "MinifloatFormat",
    "BlockFormat",
    "IntFormat",
    "LogFormat",
    "get_format",
    "multiplier_cost",
    "FAMILIES",
]

ROUNDINGS = ("rne", "away")
SCALE_RULES = ("floor", "ceil", "rceil")

FAMILIES = (
    "fp32, bf16, fp16",
    "fp8_e4m3, fp8_e5m2, minifloat(e=,m=[,special=ieee|fn|none])",
    "mxint2..mxint8, mxfp8_e4m3, mxfp8_e5m2, mxfp6_e3m2, mxfp6_e2m3, mxfp4_e2m1 "
    "[(block=32,round=rne|away,scale=floor|ceil|rceil)]",
    "bfp(w=,block=16)",
    "block_minifloat(e=,m=,block=[,exp_bits=8])",
    "int2..int16[(sym|asym, tensor|channel|group=N, round=)]",
    "log(w=)",
)


# ----------------------------------------------------------------------------- helpers
def _check_input(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"quantize: x must be a torch.Tensor, got {type(x).__name__}")
    if not torch.is_floating_point(x):
        raise ValueError(f"quantize: x.dtype must be a floating-point dtype, got {x.dtype}")


def _exp2i(e: torch.Tensor) -> torch.Tensor:
    """Exact float32 2**e for an int32 tensor ``e`` in [-149, 127], built from the bits."""
    e = e.to(torch.int32)
    normal = (e + 127).clamp(min=0) << 23
    sub = torch.ones_like(e) << (e + 149).clamp(0, 22)
    return torch.where(e >= -126, normal, sub).view(torch.float32)


def _floor_log2(a: torch.Tensor) -> torch.Tensor:
    """Exact floor(log2(a)) (int32) for finite positive float32 ``a`` (subnormals too)."""
    return torch.frexp(a)[1] - 1


def _round(y: torch.Tensor, mode: str) -> torch.Tensor:
    """Round to integer: ``rne`` half to even, ``away`` half away from zero (both exact)."""
    if mode == "rne":
        return torch.round(y)
    t = torch.trunc(y)
    return t + torch.where((y - t).abs() >= 0.5, torch.sign(y), torch.zeros_like(y))


class _STE(torch.autograd.Function):
    """Straight-through estimator: forward is the quantizer, backward the identity."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, fn: Any, axis: int) -> torch.Tensor:  # noqa: D102
        return fn(x, axis)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # noqa: D102
        return grad, None, None


def _minifloat_params(e: int, m: int, special: str) -> tuple[int, int, float]:
    """(emin, emax, max_value) of a sign + e-bit exponent + m-bit mantissa minifloat.

    ``special``: ``ieee`` (top exponent code reserved for inf/NaN), ``fn`` (OCP E4M3: only the
    all-ones code is NaN, no infinities), ``none`` (every code finite, MX FP6/FP4).
    """
    bias = 2 ** (e - 1) - 1
    emin = 1 - bias
    if special == "ieee":
        emax = 2**e - 2 - bias
        maxv = (2.0 - 2.0**-m) * 2.0**emax
    elif special == "fn":
        emax = 2**e - 1 - bias
        maxv = (2.0 - 2.0 ** (1 - m)) * 2.0**emax
    else:
        emax = 2**e - 1 - bias
        maxv = (2.0 - 2.0**-m) * 2.0**emax
    return emin, emax, maxv


def _round_minifloat(
    y: torch.Tensor, m: int, emin: int, maxv: float, rnd: str
) -> torch.Tensor:
    """Round float32 ``y`` to a minifloat grid in the value domain, then saturate to +-maxv.

    The step of a value in binade ``2**E`` is ``2**(max(E, emin) - m)`` (subnormals kept);
    rounding may carry into the next binade, as value-domain rounding does.
    """
    bits = y.view(torch.int32)
    ex = ((bits >> 23) & 0xFF) - 127  # exponent of |y| (subnormal inputs give -127)
    step = (((ex.clamp(min=emin) - m) + 127) << 23).view(torch.float32)
    q = _round(y / step, rnd).mul_(step)
    return q.clamp_(-maxv, maxv)


def _prep(x: torch.Tensor) -> tuple[torch.Tensor, torch.dtype]:
    _check_input(x)
    dt = x.dtype
    return (x if dt == torch.float32 else x.to(torch.float32)), dt


# ----------------------------------------------------------------------------- base
class Format:
    """Base class of all number formats (see module docstring for the shared contract)."""

    name: str

    @property
    def is_identity(self) -> bool:
        """True when ``quantize`` is the identity on float32 (only ``fp32``)."""
        return False

    def bits_per_element(self, shape: tuple[int, ...] | None = None, axis: int = -1) -> float:
        """Storage bits per element, including shared scales and zero points.

        Args:
            shape: tensor shape; ``None`` gives the asymptotic value (per-tensor and
                per-channel overheads amortised to zero, block/group overheads per block).
            axis: the axis blocks and groups run along.
        """
        raise NotImplementedError

    def tensor_bytes(self, shape: tuple[int, ...], axis: int = -1) -> float:
        """Storage bytes of a whole tensor of ``shape`` (bits_per_element * numel / 8)."""
        n = math.prod(shape)
        total_bits = self.bits_per_element(tuple(shape), axis) * n
        b = total_bits / 8.0
        return int(round(b)) if abs(b - round(b)) < 1e-9 else b

    def memory_density(self, shape: tuple[int, ...] | None = None, axis: int = -1) -> float:
        """32 / bits_per_element: how many times denser than float32 (dimensionless)."""
        return 32.0 / self.bits_per_element(shape, axis)

    def quantize(self, x: torch.Tensor, axis: int = -1) -> torch.Tensor:
        """Fake-quantize ``x`` (blocks/groups along ``axis``); straight-through gradient."""
        _check_input(x)
        if x.numel() == 0 or self.is_identity:
            return x
        if x.requires_grad and torch.is_grad_enabled():
            return _STE.apply(x, self._qdq, axis)
        return self._qdq(x, axis)

    def _qdq(self, x: torch.Tensor, axis: int) -> torch.Tensor:
        raise NotImplementedError

    def __str__(self) -> str:
        return self.name


def _axis_len(shape: tuple[int, ...] | None, axis: int) -> int | None:
    if shape is None:
        return None
    if len(shape) == 0:
        return 1
    return int(shape[axis])


# ----------------------------------------------------------------------------- float
@dataclass(frozen=True)
class FloatFormat(Format):
    """IEEE float32 / bfloat16 / float16 (torch casts: round half to even).

    ``fp32`` is the identity. ``bf16``/``fp16`` follow IEEE: overflow becomes +-inf, NaN and
    inf pass through, subnormals kept (fp16) as the torch cast does.
    """

    kind: str = "fp32"
    name: str = field(default="fp32", compare=False)

    @property
    def is_identity(self) -> bool:  # noqa: D102
        return self.kind == "fp32"

    def bits_per_element(self, shape: tuple[int, ...] | None = None, axis: int = -1) -> float:  # noqa: D102
        return {"fp32": 32.0, "bf16": 16.0, "fp16": 16.0}[self.kind]

    def _qdq(self, x: torch.Tensor, axis: int) -> torch.Tensor:
        dt = torch.bfloat16 if self.kind == "bf16" else torch.float16
        return x.to(dt).to(x.dtype)


@dataclass(frozen=True)
class MinifloatFormat(Format):
    """Sign + ``e`` exponent bits + ``m`` mantissa bits, IEEE-style with subnormals.

    Rounding in the value domain (``rne`` default, or ``away``), finite overflow saturates
    to +-max. ``special``: ``ieee`` (top exponent reserved; inf inputs stay inf, e.g.
    fp8_e5m2, max 57344), ``fn`` (OCP E4M3: no infinities, max 448, inf saturates to +-max),
    ``none`` (every code finite; inf saturates). NaN stays NaN.
    """

    e: int = 4
    m: int = 3
    special: str = "fn"
    rounding: str = "rne"
    name: str = field(default="fp8_e4m3", compare=False)

    @property
    def params(self) -> tuple[int, int, float]:
        """(emin, emax, max_value) of the element grid."""
        return _minifloat_params(self.e, self.m, self.special)

    def bits_per_element(self, shape: tuple[int, ...] | None = None, axis: int = -1) -> float:  # noqa: D102
        return float(1 + self.e + self.m)

    def _qdq(self, x: torch.Tensor, axis: int) -> torch.Tensor:
        xf, dt = _prep(x)
        emin, _, maxv = self.params
        q = _round_minifloat(xf, self.m, emin, maxv, self.rounding)
        if self.special == "ieee":
            q = torch.where(torch.isinf(xf), xf, q)
        return q.to(dt)


# ----------------------------------------------------------------------------- block
@dataclass(frozen=True)
class BlockFormat(Format):
    """Block format: ``block`` elements along ``axis`` share one power-of-two scale.

    Covers OCP MX v1.0 (``mxint8``, ``mxfp8_e4m3``, ..., block 32, E8M0 scale), block
    floating point ``bfp(w=,block=)`` (integer elements, like MXINT) and block minifloat
    ``block_minifloat(e=,m=,block=,exp_bits=)``.

    Shared exponent (``scale`` rule, exact from the float bits via ``torch.frexp``):

    * ``floor`` (OCP MX spec, default): ``floor(log2(amax)) - emax_elem``;
    * ``ceil``: ``ceil(log2(amax)) - emax_elem`` (one step coarser unless amax is 2**k);
    * ``rceil``: smallest ``s`` with ``max_elem * 2**s >= amax`` (never saturates; NVIDIA's
      round-up E8M0 conversion of ``amax / max_elem``).

    It is clamped to ``[-(2**(exp_bits-1)-1), 2**(exp_bits-1)-1]`` ([-127, 127] for E8M0).
    Elements ``x / 2**s`` are rounded in the value domain (``rne`` default or ``away``),
    subnormals kept, saturated to +-max_elem. Integer elements (``elem="int"``) are
    ``k * 2**-(bits-2)`` with ``|k| <= 2**(bits-1)-1`` (symmetric; the most negative code is
    unused), i.e. emax_elem = 0. An all-zero block gives zeros. A block holding a NaN or
    +-inf becomes all NaN (scale = E8M0 NaN).
    """

    elem: str = "int"  # "int" or "fp"
    bits: int = 8  # element bits incl. sign (int elements)
    e: int = 0  # element exponent bits (fp elements)
    m: int = 0  # element mantissa bits (fp elements)
    special: str = "none"
    block: int = 32
    exp_bits: int = 8
    rounding: str = "rne"
    scale_rule: str = "floor"
    name: str = field(default="mxint8", compare=False)

    @property
    def elem_bits(self) -> int:
        """Bits of one element code (incl. sign)."""
        return self.bits if self.elem == "int" else 1 + self.e + self.m

    @property
    def elem_params(self) -> tuple[int, float]:
        """(emax_elem, max_elem) of the element format."""
        if self.elem == "int":
            return 0, (2 ** (self.bits - 1) - 1) * 2.0 ** -(self.bits - 2)
        _, emax, maxv = _minifloat_params(self.e, self.m, self.special)
        return emax, maxv

    def bits_per_element(self, shape: tuple[int, ...] | None = None, axis: int = -1) -> float:  # noqa: D102
        n = _axis_len(shape, axis)
        if n is None or n == 0:
            return self.elem_bits + self.exp_bits / self.block
        nblk = -(-n // self.block)
        return self.elem_bits + self.exp_bits * nblk / n

    def shared_exponent(self, amax: torch.Tensor) -> torch.Tensor:
        """Shared exponent (int32) of blocks with float32 max magnitude ``amax``."""
        emax, maxv = self.elem_params
        fl = _floor_log2(amax)
        s = fl - emax
        if self.scale_rule == "ceil":
            s = s + (torch.frexp(amax)[0] != 0.5).to(torch.int32)
        elif self.scale_rule == "rceil":
            top = _exp2i((s + emax).clamp(-149, 127)) * (maxv / 2.0**emax)
            s = s + (amax > top).to(torch.int32)
        lim = 2 ** (self.exp_bits - 1) - 1
        return s.clamp(-lim, lim)

    def _blocks(self, x: torch.Tensor, axis: int) -> tuple[torch.Tensor, tuple[int, ...], int]:
        xt = x.movedim(axis, -1)
        shape = tuple(xt.shape)
        n = shape[-1]
        pad = (-n) % self.block
        if pad:
            xt = torch.nn.functional.pad(xt, (0, pad))
        return xt.reshape(*shape[:-1], -1, self.block), shape, n

    def _elements(self, y: torch.Tensor) -> torch.Tensor:
        """Round scaled values ``y`` (in element units) to the element grid, saturated."""
        if self.elem == "int":
            k = 2.0 ** (self.bits - 2)
            qmax = float(2 ** (self.bits - 1) - 1)
            return _round(y * k, self.rounding).clamp_(-qmax, qmax).div_(k)
        emin, _, maxv = _minifloat_params(self.e, self.m, self.special)
        return _round_minifloat(y, self.m, emin, maxv, self.rounding)

    def _qdq(self, x: torch.Tensor, axis: int) -> torch.Tensor:
        xf, dt = _prep(x)
        xb, shape, n = self._blocks(xf, axis)
        amax = torch.maximum(xb.amax(-1, keepdim=True), -xb.amin(-1, keepdim=True))
        s = self.shared_exponent(amax)
        q = self._qdq_fast(xb, s)
        if q is None:  # extreme block exponents: the two-step reference path
            q = self._elements(xb * _exp2i(-s)).mul_(_exp2i(s))
        bad = ~torch.isfinite(amax)
        if bool(bad.any()):
            q = torch.where(bad, torch.full_like(q, float("nan")), q)
        q = q.reshape(*shape[:-1], -1)[..., :n].movedim(-1, axis)
        return q.to(dt)

    def _qdq_fast(self, xb: torch.Tensor, s: torch.Tensor) -> torch.Tensor | None:
        """Same result as ``_elements(xb / 2**s) * 2**s`` in one scaling step, in place.

        Exact for the same reasons (power-of-two steps, value-domain rounding); used only
        when every step and inverse step is a normal float32 (else returns None).
        """
        if s.numel() == 0:
            return None
        smin = int(s.min())
        if self.elem == "int":
            k = self.bits - 2
            if k - smin > 127:
                return None
            qmax = float(2 ** (self.bits - 1) - 1)
            q = torch.mul(xb, _exp2i(k - s))
            q = q.round_() if self.rounding == "rne" else _round(q, self.rounding)
            return q.clamp_(-qmax, qmax).mul_(_exp2i(s - k))
        emin, _, maxv = _minifloat_params(self.e, self.m, self.special)
        if smin + emin - self.m < -126:
            return None
        # step of each x: 2**(max(exponent(x), emin + s) - m), from the float bits
        f = xb.view(torch.int32) >> 23
        f.bitwise_and_(0xFF)
        torch.maximum(f, (s + (emin + 127)).to(torch.int32), out=f)
        step = f.sub_(self.m).bitwise_left_shift_(23).view(torch.float32)
        q = torch.div(xb, step)
        q = q.round_() if self.rounding == "rne" else _round(q, self.rounding)
        bound = _exp2i(s) * maxv
        return q.mul_(step).clamp_(-bound, bound)

    def encode(self, x: torch.Tensor, axis: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
        """Element values and shared exponents: ``(elements, exponents)``.

        ``elements`` has shape ``(..., nblocks, block)`` (``axis`` moved last, tail padded):
        for integer elements the int32 codes ``k``, for minifloat elements their float32
        values; ``exponents`` (int32, ``(..., nblocks, 1)``) are the shared exponents ``s``.
        Dequantized value = ``k * 2**-(bits-2) * 2**s`` (int) or ``element * 2**s`` (fp).
        """
        xf, _ = _prep(x)
        xb, _, _ = self._blocks(xf, axis)
        s = self.shared_exponent(xb.abs().amax(-1, keepdim=True))
        el = self._elements(xb * _exp2i(-s))
        if self.elem == "int":
            el = (el * 2.0 ** (self.bits - 2)).round().to(torch.int32)
        return el, s


# ----------------------------------------------------------------------------- int
@dataclass(frozen=True)
class IntFormat(Format):
    """Uniform integer quantization with a float32 scale (and zero point if asymmetric).

    * ``sym`` (default): ``q = clamp(round(x / s), -(2**(b-1)-1), 2**(b-1)-1)``,
      ``s = amax / (2**(b-1)-1)`` (the most negative code is unused).
    * ``asym``: ``s = (max - min) / (2**b - 1)``, zero point ``z = round(-min / s)``,
      ``q = clamp(round(x / s) + z, 0, 2**b - 1)``, value ``(q - z) * s``. The range is
      widened to include 0.
    * granularity ``tensor`` (default), ``channel`` (one scale per slice along ``axis``,
      i.e. per output channel of a weight whose reduction axis is ``axis``), ``group=N``
      (groups of N consecutive elements along ``axis``, tail zero-padded).

    Bits: ``b + (32 [+ b for the zero point]) / elements-per-scale``; per-tensor and
    per-channel overheads are amortised over the tensor / row when ``shape`` is given and
    count as zero when it is ``None`` (so ``int8`` is 8.0 asymptotically).
    An all-zero group gives zeros; a group holding NaN or inf becomes NaN.
    """

    bits: int = 8
    asym: bool = False
    granularity: str = "tensor"  # tensor | channel | group
    group: int = 0
    rounding: str = "rne"
    name: str = field(default="int8", compare=False)

    def _overhead_bits(self) -> int:
        return 32 + (self.bits if self.asym else 0)

    def bits_per_element(self, shape: tuple[int, ...] | None = None, axis: int = -1) -> float:  # noqa: D102
        if self.granularity == "group":
            n = _axis_len(shape, axis)
            if n is None or n == 0:
                return self.bits + self._overhead_bits() / self.group
            return self.bits + self._overhead_bits() * (-(-n // self.group)) / n
        if shape is None:
            return float(self.bits)
        per = math.prod(shape) if self.granularity == "tensor" else _axis_len(shape, axis)
        return self.bits + self._overhead_bits() / max(int(per or 1), 1)

    def _groups(self, x: torch.Tensor, axis: int) -> tuple[torch.Tensor, tuple[int, ...], int]:
        if self.granularity == "tensor":
            return x.reshape(1, -1), tuple(x.shape), -1
        xt = x.movedim(axis, -1)
        shape = tuple(xt.shape)
        n = shape[-1]
        if self.granularity == "channel":
            return xt.reshape(-1, n), shape, n
        pad = (-n) % self.group
        if pad:
            xt = torch.nn.functional.pad(xt, (0, pad))
        return xt.reshape(-1, self.group), shape, n

    def _ungroup(self, q: torch.Tensor, x: torch.Tensor, shape: tuple[int, ...], n: int,
                 axis: int) -> torch.Tensor:
        if self.granularity == "tensor":
            return q.reshape(x.shape)
        return q.reshape(*shape[:-1], -1)[..., :n].movedim(-1, axis)

    def _scale_zero(self, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float, float]:
        """(scale, zero point, lowest code, highest code) per row of the grouped tensor.

        Row minimum and maximum give both the asymmetric range and the symmetric
        ``amax = max(-min, max)`` (== ``abs().amax()``; a NaN propagates) without
        materialising ``|g|`` (``amin`` + ``amax`` are vectorised reductions; ``aminmax``
        is ~5x slower on CPU). All-zero rows (and NaN rows, as ``NaN > 0`` is false) get
        scale 1.
        """
        mn = g.amin(-1, keepdim=True)
        mx = g.amax(-1, keepdim=True)
        if self.asym:
            lo = mn.clamp_(max=0.0)
            hi = mx.clamp_(min=0.0)
            qmax = float(2**self.bits - 1)
            # tensor / tensor division: correctly rounded on every device (a CUDA tensor /
            # python-scalar division multiplies by the rounded reciprocal instead)
            s = (hi - lo).div_(torch.full_like(hi, qmax))
            s = torch.where(s > 0, s, torch.ones_like(s))
            return s, torch.round(-lo / s), 0.0, qmax
        qmax = float(2 ** (self.bits - 1) - 1)
        amax = torch.maximum(mn.neg_(), mx)
        s = amax.div_(torch.full_like(amax, qmax))
        s = torch.where(s > 0, s, torch.ones_like(s))
        return s, torch.zeros_like(s), -qmax, qmax

    def encode(self, x: torch.Tensor, axis: int = -1
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Integer codes, scales and zero points: ``(codes, scale, zero_point)``.

        ``codes`` (int32) has the grouped shape (``(1, numel)`` per tensor, ``(rows, n)`` per
        channel, ``(groups, group)`` per group, ``axis`` moved last); ``scale`` and
        ``zero_point`` (float32) one entry per row. Value = ``(codes - zero_point) * scale``.
        """
        xf, _ = _prep(x)
        g, _, _ = self._groups(xf, axis)
        s, z, lo, hi = self._scale_zero(g)
        codes = (_round(g / s, self.rounding) + z).clamp_(lo, hi)
        return codes.to(torch.int32), s, z

    def _qdq(self, x: torch.Tensor, axis: int) -> torch.Tensor:
        # One fresh full-size float32 buffer (the quotient; it reuses the float32 copy of a
        # non-float32 input or the zero-padded group copy when there is one) and in-place
        # ops on it; the quotient is a true tensor / tensor division (see _scale_zero).
        xf, dt = _prep(x)
        g, shape, n = self._groups(xf, axis)
        owned = g.is_contiguous() and (
            g.untyped_storage().data_ptr() != x.untyped_storage().data_ptr())
        s, z, lo, hi = self._scale_zero(g)
        q = g.div_(s) if owned else torch.div(g, s)
        if self.rounding == "rne":
            q = q.round_()
        else:
            q = _round(q, self.rounding)
        if self.asym:
            q = q.add_(z).clamp_(lo, hi).sub_(z)
        else:
            q = q.clamp_(lo, hi)
        q = q.mul_(s)
        bad = ~torch.isfinite(s)
        if bool(bad.any()):
            q = torch.where(bad, torch.full_like(q, float("nan")), q)
        return self._ungroup(q, xf, shape, n, axis).to(dt)


# ----------------------------------------------------------------------------- log
@dataclass(frozen=True)
class LogFormat(Format):
    """Logarithmic format: sign + (w-1)-bit exponent code, values ``+-2**k`` or 0.

    Per-tensor: ``kmax = floor(log2(amax))`` (exact, stored as an 8-bit shared exponent),
    ``k`` in ``[kmax - (2**(w-1) - 2), kmax]`` (one code is zero). Rounding in the log domain:
    ``|x|`` rounds up to ``2**(E+1)`` when its mantissa ``|x|/2**E >= sqrt(2)``; values whose
    rounded ``k < kmin`` flush to 0. Bits: ``w + 8/numel`` (``w`` when shape is None).
    NaN/inf anywhere make the whole tensor NaN.
    """

    w: int = 4
    name: str = field(default="log(w=4)", compare=False)

    def bits_per_element(self, shape: tuple[int, ...] | None = None, axis: int = -1) -> float:  # noqa: D102
        if shape is None:
            return float(self.w)
        return self.w + 8.0 / max(math.prod(shape), 1)

    def _qdq(self, x: torch.Tensor, axis: int) -> torch.Tensor:
        xf, dt = _prep(x)
        a = xf.abs()
        amax = a.amax()
        if not bool(torch.isfinite(amax)):
            return torch.full_like(x, float("nan"))
        if float(amax) == 0.0:
            return torch.zeros_like(x)
        kmax = int(_floor_log2(amax))
        kmin = kmax - (2 ** (self.w - 1) - 2)
        mant, ex = torch.frexp(a)  # a = mant * 2**ex, mant in [0.5, 1)
        k = (ex - 1) + (mant * 2.0 >= math.sqrt(2.0)).to(torch.int32)
        k = k.clamp(max=kmax)
        keep = (k >= kmin) & (a > 0)
        mag = _exp2i(k.clamp(min=-149, max=127))
        q = torch.where(keep, mag, torch.zeros_like(mag)) * torch.sign(xf)
        return q.to(dt)


# ----------------------------------------------------------------------------- parsing
_MX_FP = {
    "mxfp8_e4m3": (4, 3, "fn"),
    "mxfp8_e5m2": (5, 2, "ieee"),
    "mxfp6_e3m2": (3, 2, "none"),
    "mxfp6_e2m3": (2, 3, "none"),
    "mxfp4_e2m1": (2, 1, "none"),
}
_NAME_RE = re.compile(r"^([a-z][a-z0-9_]*)(?:\((.*)\))?$")


def _bad(name: str, why: str) -> ValueError:
    return ValueError(
        f"format {name!r}: {why}; valid families: " + "; ".join(FAMILIES)
    )


def _parse_args(name: str, s: str | None) -> tuple[dict[str, str], list[str]]:
    kv: dict[str, str] = {}
    flags: list[str] = []
    if s is None:
        return kv, flags
    for part in s.split(","):
        part = part.strip()
        if not part:
            raise _bad(name, "empty argument")
        if "=" in part:
            k, v = (t.strip() for t in part.split("=", 1))
            if not k or not v or k in kv:
                raise _bad(name, f"malformed argument {part!r}")
            kv[k] = v
        else:
            flags.append(part)
    return kv, flags


def _int_arg(name: str, kv: dict[str, str], key: str, default: int | None, lo: int,
             hi: int) -> int:
    if key not in kv:
        if default is None:
            raise _bad(name, f"missing argument {key}=")
        return default
    try:
        v = int(kv.pop(key))
    except ValueError:
        raise _bad(name, f"{key} must be an integer") from None
    if not lo <= v <= hi:
        raise _bad(name, f"{key} must be in [{lo}, {hi}], got {v}")
    return v


def _choice_arg(name: str, kv: dict[str, str], key: str, options: tuple[str, ...]) -> str:
    v = kv.pop(key, options[0])
    if v not in options:
        raise _bad(name, f"{key} must be one of {', '.join(options)}, got {v!r}")
    return v


def _no_rest(name: str, kv: dict[str, str], flags: list[str]) -> None:
    if kv or flags:
        raise _bad(name, f"unexpected arguments {sorted(kv) + flags}")


@lru_cache(maxsize=512)
def get_format(name: str) -> Format:
    """Parse a format string (e.g. ``"mxint8"``, ``"int4(asym,group=128)"``) into a Format.

    Raises:
        ValueError: unknown family or malformed arguments; the message lists the families.
    """
    if not isinstance(name, str):
        raise ValueError(f"format name must be a string, got {type(name).__name__}")
    canon = re.sub(r"\s+", "", name.lower())
    mt = _NAME_RE.match(canon)
    if not mt:
        raise _bad(name, "malformed format string")
    fam, argstr = mt.group(1), mt.group(2)
    kv, flags = _parse_args(name, argstr)

    if fam in ("fp32", "bf16", "fp16"):
        _no_rest(name, kv, flags)
        return FloatFormat(kind=fam, name=canon)
    if fam in ("fp8_e4m3", "fp8_e5m2", "minifloat"):
        if fam == "minifloat":
            e = _int_arg(name, kv, "e", None, 1, 8)
            m = _int_arg(name, kv, "m", None, 0, 10)
            special = _choice_arg(name, kv, "special", ("ieee", "fn", "none"))
            if special == "ieee" and e < 2:
                raise _bad(name, "special=ieee needs e >= 2")
        else:
            e, m, special = (4, 3, "fn") if fam == "fp8_e4m3" else (5, 2, "ieee")
        rnd = _choice_arg(name, kv, "round", ROUNDINGS)
        _no_rest(name, kv, flags)
        return MinifloatFormat(e=e, m=m, special=special, rounding=rnd, name=canon)
    mxint = re.fullmatch(r"mxint(\d+)", fam)
    if mxint or fam in _MX_FP or fam in ("bfp", "block_minifloat"):
        if mxint:
            bits = int(mxint.group(1))
            if not 2 <= bits <= 8:
                raise _bad(name, "mxint element bits must be in [2, 8]")
            common: dict[str, Any] = {"elem": "int", "bits": bits}
            block_default, exp_default = 32, 8
        elif fam in _MX_FP:
            e, m, special = _MX_FP[fam]
            common = {"elem": "fp", "e": e, "m": m, "special": special}
            block_default, exp_default = 32, 8
        elif fam == "bfp":
            common = {"elem": "int", "bits": _int_arg(name, kv, "w", None, 2, 16)}
            block_default, exp_default = 16, 8
        else:
            common = {
                "elem": "fp",
                "e": _int_arg(name, kv, "e", None, 1, 6),
                "m": _int_arg(name, kv, "m", None, 0, 10),
                "special": "none",
            }
            block_default, exp_default = 16, 8
        block = _int_arg(name, kv, "block", block_default, 1, 1 << 20)
        exp_bits = _int_arg(name, kv, "exp_bits", exp_default, 2, 8)
        rnd = _choice_arg(name, kv, "round", ROUNDINGS)
        rule = _choice_arg(name, kv, "scale", SCALE_RULES)
        _no_rest(name, kv, flags)
        return BlockFormat(block=block, exp_bits=exp_bits, rounding=rnd, scale_rule=rule,
                           name=canon, **common)
    intm = re.fullmatch(r"int(\d+)", fam)
    if intm:
        bits = int(intm.group(1))
        if not 2 <= bits <= 16:
            raise _bad(name, "int bits must be in [2, 16]")
        asym = False
        gran = "tensor"
        for f in flags:
            if f in ("sym", "asym"):
                asym = f == "asym"
            elif f in ("tensor", "channel"):
                gran = f
            else:
                raise _bad(name, f"unknown flag {f!r} (sym, asym, tensor, channel)")
        group = 0
        if "group" in kv:
            group = _int_arg(name, kv, "group", None, 1, 1 << 20)
            gran = "group"
        rnd = _choice_arg(name, kv, "round", ROUNDINGS)
        _no_rest(name, kv, [])
        return IntFormat(bits=bits, asym=asym, granularity=gran, group=group, rounding=rnd,
                         name=canon)
    if fam == "log":
        w = _int_arg(name, kv, "w", None, 2, 8)
        _no_rest(name, kv, flags)
        return LogFormat(w=w, name=canon)
    raise _bad(name, f"unknown family {fam!r}")


# ----------------------------------------------------------------------------- cost
def _operand_widths(fmt: Format) -> tuple[int, int, int]:
    """(significand width incl. sign/implicit bit, exponent bits, extra adder bits)."""
    if isinstance(fmt, FloatFormat):
        e, m = {"fp32": (8, 23), "bf16": (8, 7), "fp16": (5, 10)}[fmt.kind]
        return m + 1, e, 0
    if isinstance(fmt, MinifloatFormat):
        return fmt.m + 1, fmt.e, 0
    if isinstance(fmt, BlockFormat):
        if fmt.elem == "int":
            return fmt.bits, 0, 0
        return fmt.m + 1, fmt.e, 0
    if isinstance(fmt, IntFormat):
        return fmt.bits, 0, (fmt.bits + 1 if fmt.asym else 0)
    if isinstance(fmt, LogFormat):
        return 1, fmt.w - 1, 0
    raise ValueError(f"multiplier_cost: unsupported format {fmt!r}")


def multiplier_cost(fmt_a: Format | str, fmt_b: Format | str) -> float:
    """Area cost of one multiply-accumulate A x B relative to int8 x int8 (dimensionless).

    Model (gate-count, one full-adder-equivalent cell per unit):

    * significand multiplier: ``w_a * w_b`` cells, an array multiplier has one partial-
      product cell per pair of operand bits, so its area grows with the product of the
      operand widths (Weste & Harris, *CMOS VLSI Design*, 4th ed., sec. 11.9 "Multipliers";
      Horowitz, "Computing's energy problem", ISSCC 2014: 8-bit int mult 0.2 pJ vs 32-bit
      float mult 3.7 pJ). ``w`` = int bits, or mantissa bits + 1 (implicit bit) for floats;
      the sign of a float is an XOR (free);
    * for floats: exponent adder ``max(e_a, e_b) + 1`` cells plus an alignment shifter for
      the product before accumulation, ``(w_a + w_b) * max(e_a, e_b)`` mux cells (barrel
      shifter, log-depth in the shift range 2**e);
    * block formats: the shared-scale exponent add happens once per block: ``(exp_bits+1)
      / block`` cells per element; asymmetric int adds a zero-point subtractor (b+1 cells).

    Normalised by int8 x int8 = 64 cells. Examples: int4 x int4 = 0.25, mxint8 x mxint8 ~
    1.01, fp8_e4m3 x fp8_e4m3 ~ 0.83, bf16 x bf16 ~ 3.1, fp32 x fp32 ~ 15. Float
    normalisation/rounding and the accumulator are not modelled, so floats come out below
    Horowitz's 45 nm areas (fp32/int8 27, fp16/int8 5.8): an ordering and rough magnitude.
    """
    fa = get_format(fmt_a) if isinstance(fmt_a, str) else fmt_a
    fb = get_format(fmt_b) if isinstance(fmt_b, str) else fmt_b
    wa, ea, za = _operand_widths(fa)
    wb, eb, zb = _operand_widths(fb)
    cells = float(wa * wb + za + zb)
    emax = max(ea, eb)
    if emax:
        cells += (emax + 1) + (wa + wb) * emax
    for f in (fa, fb):
        if isinstance(f, BlockFormat):
            cells += (f.exp_bits + 1) / f.block
    return cells / 64.0
