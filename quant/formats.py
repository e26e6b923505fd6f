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

import dataclasses
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch

from quant.desc import (
    FAMILIES,
    BlockDesc,
    FloatDesc,
    FormatDesc,
    IntDesc,
    LogDesc,
    MinifloatDesc,
    describe,
    minifloat_params,
    multiplier_cost,
)

__all__ = [
    "Format",
    "FloatFormat",
    "MinifloatFormat",
    "BlockFormat",
    "IntFormat",
    "LogFormat",
    "get_format",
    "as_format",
    "multiplier_cost",
    "FAMILIES",
]


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
class Format(FormatDesc):
    """Base class of all number formats: a :class:`quant.desc.FormatDesc` (fields, bits,
    multiplier cost) with its fake quantizer (see module docstring for the contract)."""

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


# ----------------------------------------------------------------------------- float
@dataclass(frozen=True)
class FloatFormat(Format, FloatDesc):
    """IEEE float32 / bfloat16 / float16 (torch casts: round half to even).

    ``fp32`` is the identity. ``bf16``/``fp16`` follow IEEE: overflow becomes +-inf, NaN and
    inf pass through, subnormals kept (fp16) as the torch cast does.
    """

    def _qdq(self, x: torch.Tensor, axis: int) -> torch.Tensor:
        dt = torch.bfloat16 if self.kind == "bf16" else torch.float16
        return x.to(dt).to(x.dtype)


@dataclass(frozen=True)
class MinifloatFormat(Format, MinifloatDesc):
    """Sign + ``e`` exponent bits + ``m`` mantissa bits, IEEE-style with subnormals.

    Rounding in the value domain (``rne`` default, or ``away``), finite overflow saturates
    to +-max. ``special``: ``ieee`` (top exponent reserved; inf inputs stay inf, e.g.
    fp8_e5m2, max 57344), ``fn`` (OCP E4M3: no infinities, max 448, inf saturates to +-max),
    ``none`` (every code finite; inf saturates). NaN stays NaN.
    """

    def _qdq(self, x: torch.Tensor, axis: int) -> torch.Tensor:
        xf, dt = _prep(x)
        emin, _, maxv = self.params
        q = _round_minifloat(xf, self.m, emin, maxv, self.rounding)
        if self.special == "ieee":
            q = torch.where(torch.isinf(xf), xf, q)
        return q.to(dt)


# ----------------------------------------------------------------------------- block
@dataclass(frozen=True)
class BlockFormat(Format, BlockDesc):
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
        emin, _, maxv = minifloat_params(self.e, self.m, self.special)
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
        emin, _, maxv = minifloat_params(self.e, self.m, self.special)
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
class IntFormat(Format, IntDesc):
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
class LogFormat(Format, LogDesc):
    """Logarithmic format: sign + (w-1)-bit exponent code, values ``+-2**k`` or 0.

    Per-tensor: ``kmax = floor(log2(amax))`` (exact, stored as an 8-bit shared exponent),
    ``k`` in ``[kmax - (2**(w-1) - 2), kmax]`` (one code is zero). Rounding in the log domain:
    ``|x|`` rounds up to ``2**(E+1)`` when its mantissa ``|x|/2**E >= sqrt(2)``; values whose
    rounded ``k < kmin`` flush to 0. Bits: ``w + 8/numel`` (``w`` when shape is None).
    NaN/inf anywhere make the whole tensor NaN.
    """

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
#: the quantizing class of each description class
_QUANTIZERS: dict[type[FormatDesc], type[Format]] = {
    FloatDesc: FloatFormat, MinifloatDesc: MinifloatFormat, BlockDesc: BlockFormat,
    IntDesc: IntFormat, LogDesc: LogFormat,
}


@lru_cache(maxsize=512)
def get_format(name: str) -> Format:
    """Parse a format string (e.g. ``"mxint8"``, ``"int4(asym,group=128)"``) into a Format:
    :func:`quant.desc.describe` (the one parser) with its fake quantizer.

    Raises:
        ValueError: unknown family or malformed arguments; the message lists the families.
    """
    return as_format(describe(name))


def as_format(fmt: FormatDesc | str) -> Format:
    """The quantizing Format of a format name or :class:`quant.desc.FormatDesc` (a Format is
    returned as it is). ``QuantConfig`` holds descriptions (no torch); the modules that
    quantize tensors turn them into Formats with this."""
    if isinstance(fmt, Format):
        return fmt
    if isinstance(fmt, str):
        return get_format(fmt)
    return _quantizer(fmt)


@lru_cache(maxsize=512)
def _quantizer(d: FormatDesc) -> Format:
    return _QUANTIZERS[type(d)](**{f.name: getattr(d, f.name) for f in dataclasses.fields(d)})
