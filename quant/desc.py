"""What a number format is, without torch: parsing, bit accounting, multiplier cost; and
the vocabularies of the ``quant.*`` / ``sparsity.*`` / ``finetune.*`` parameters.

A *format description* is a small frozen, hashable value parsed from a format string
(``describe("mxint8")``): its family and fields (element bits, block size, scale bits, ...),
``bits_per_element(shape=None, axis=-1)`` (storage bits per element including shared
scales and zero points), ``tensor_bytes`` / ``memory_density``, and ``multiplier_cost(a,
b)``. This module imports neither torch nor numpy, so the performance simulators and the
spec validator use it without paying for torch (about 2.5 s of start-up).

:mod:`quant.formats` subclasses every description with its fake quantizer
(``Format.quantize``, torch): ``quant.get_format(name)`` is ``describe(name)`` with
quantization, equal in every field, and ``get_format(name)`` is an instance of the
description class of its family (``isinstance(get_format("mxint8"), BlockDesc)``).
Semantics of the fields and of the bit accounting: docs/quant.md.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

__all__ = [
    "FormatDesc",
    "FloatDesc",
    "MinifloatDesc",
    "BlockDesc",
    "IntDesc",
    "LogDesc",
    "describe",
    "multiplier_cost",
    "FAMILIES",
    "ROUNDINGS",
    "SCALE_RULES",
    "SALIENCES",
    "RATIO_RULES",
    "KV_LAYOUTS",
    "FINETUNE_PARAMS",
]

#: ``sparsity.salience`` / ``finetune.salience``: how weights are ranked (quant.SparsityConfig)
SALIENCES = ("magnitude", "gradient", "snip", "fisher", "random")
#: ``quant.ratio_rule``: which layers go to the low-precision format first
RATIO_RULES = ("depth", "sensitivity", "random")
#: ``quant.kv_k_layout`` / ``quant.kv_v_layout``: the KV-cache layouts (docs/quant.md)
KV_LAYOUTS = ("token", "channel")
#: ``finetune.params``: which parameters a fine-tune trains
FINETUNE_PARAMS = ("masked", "all", "salience")

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


def minifloat_params(e: int, m: int, special: str) -> tuple[int, int, float]:
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


def _axis_len(shape: tuple[int, ...] | None, axis: int) -> int | None:
    if shape is None:
        return None
    if len(shape) == 0:
        return 1
    return int(shape[axis])


# ----------------------------------------------------------------------------- base
class FormatDesc:
    """Base class of all format descriptions (see the module docstring)."""

    name: str

    @property
    def is_identity(self) -> bool:
        """True when quantization is the identity on float32 (only ``fp32``)."""
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

    def __str__(self) -> str:
        return self.name


# ----------------------------------------------------------------------------- float
@dataclass(frozen=True)
class FloatDesc(FormatDesc):
    """IEEE float32 / bfloat16 / float16; ``fp32`` is the identity."""

    kind: str = "fp32"
    name: str = field(default="fp32", compare=False)

    @property
    def is_identity(self) -> bool:  # noqa: D102
        return self.kind == "fp32"

    def bits_per_element(self, shape: tuple[int, ...] | None = None, axis: int = -1) -> float:  # noqa: D102
        return {"fp32": 32.0, "bf16": 16.0, "fp16": 16.0}[self.kind]


@dataclass(frozen=True)
class MinifloatDesc(FormatDesc):
    """Sign + ``e`` exponent bits + ``m`` mantissa bits; ``special`` is ``ieee``, ``fn``
    or ``none`` (which codes are inf/NaN), ``rounding`` ``rne`` or ``away``."""

    e: int = 4
    m: int = 3
    special: str = "fn"
    rounding: str = "rne"
    name: str = field(default="fp8_e4m3", compare=False)

    @property
    def params(self) -> tuple[int, int, float]:
        """(emin, emax, max_value) of the element grid."""
        return minifloat_params(self.e, self.m, self.special)

    def bits_per_element(self, shape: tuple[int, ...] | None = None, axis: int = -1) -> float:  # noqa: D102
        return float(1 + self.e + self.m)


# ----------------------------------------------------------------------------- block
@dataclass(frozen=True)
class BlockDesc(FormatDesc):
    """Block format: ``block`` elements along the axis share one ``exp_bits``-bit
    power-of-two scale (OCP MX, ``bfp``, ``block_minifloat``); elements are ``bits``-bit
    integers (``elem="int"``) or sign + ``e`` + ``m`` minifloats (``elem="fp"``)."""

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
        _, emax, maxv = minifloat_params(self.e, self.m, self.special)
        return emax, maxv

    def bits_per_element(self, shape: tuple[int, ...] | None = None, axis: int = -1) -> float:  # noqa: D102
        n = _axis_len(shape, axis)
        if n is None or n == 0:
            return self.elem_bits + self.exp_bits / self.block
        nblk = -(-n // self.block)
        return self.elem_bits + self.exp_bits * nblk / n


# ----------------------------------------------------------------------------- int
@dataclass(frozen=True)
class IntDesc(FormatDesc):
    """Uniform ``bits``-bit integers with a float32 scale (and a zero point if ``asym``),
    per ``tensor``, ``channel`` or ``group`` of ``group`` elements along the axis.

    Bits: ``b + (32 [+ b for the zero point]) / elements-per-scale``; per-tensor and
    per-channel overheads are amortised over the tensor / row when ``shape`` is given and
    count as zero when it is ``None`` (so ``int8`` is 8.0 asymptotically).
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


# ----------------------------------------------------------------------------- log
@dataclass(frozen=True)
class LogDesc(FormatDesc):
    """Logarithmic format: sign + (w-1)-bit exponent code, values ``+-2**k`` or 0, one
    8-bit shared exponent per tensor. Bits: ``w + 8/numel`` (``w`` when shape is None)."""

    w: int = 4
    name: str = field(default="log(w=4)", compare=False)

    def bits_per_element(self, shape: tuple[int, ...] | None = None, axis: int = -1) -> float:  # noqa: D102
        if shape is None:
            return float(self.w)
        return self.w + 8.0 / max(math.prod(shape), 1)


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
def describe(name: str) -> FormatDesc:
    """Parse a format string (e.g. ``"mxint8"``, ``"int4(asym,group=128)"``) into its description.

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
        return FloatDesc(kind=fam, name=canon)
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
        return MinifloatDesc(e=e, m=m, special=special, rounding=rnd, name=canon)
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
        return BlockDesc(block=block, exp_bits=exp_bits, rounding=rnd, scale_rule=rule,
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
        return IntDesc(bits=bits, asym=asym, granularity=gran, group=group, rounding=rnd,
                         name=canon)
    if fam == "log":
        w = _int_arg(name, kv, "w", None, 2, 8)
        _no_rest(name, kv, flags)
        return LogDesc(w=w, name=canon)
    raise _bad(name, f"unknown family {fam!r}")


# ----------------------------------------------------------------------------- cost
def _operand_widths(fmt: FormatDesc) -> tuple[int, int, int]:
    """(significand width incl. sign/implicit bit, exponent bits, extra adder bits)."""
    if isinstance(fmt, FloatDesc):
        e, m = {"fp32": (8, 23), "bf16": (8, 7), "fp16": (5, 10)}[fmt.kind]
        return m + 1, e, 0
    if isinstance(fmt, MinifloatDesc):
        return fmt.m + 1, fmt.e, 0
    if isinstance(fmt, BlockDesc):
        if fmt.elem == "int":
            return fmt.bits, 0, 0
        return fmt.m + 1, fmt.e, 0
    if isinstance(fmt, IntDesc):
        return fmt.bits, 0, (fmt.bits + 1 if fmt.asym else 0)
    if isinstance(fmt, LogDesc):
        return 1, fmt.w - 1, 0
    raise ValueError(f"multiplier_cost: unsupported format {fmt!r}")


def multiplier_cost(fmt_a: FormatDesc | str, fmt_b: FormatDesc | str) -> float:
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
    fa = describe(fmt_a) if isinstance(fmt_a, str) else fmt_a
    fb = describe(fmt_b) if isinstance(fmt_b, str) else fmt_b
    wa, ea, za = _operand_widths(fa)
    wb, eb, zb = _operand_widths(fb)
    cells = float(wa * wb + za + zb)
    emax = max(ea, eb)
    if emax:
        cells += (emax + 1) + (wa + wb) * emax
    for f in (fa, fb):
        if isinstance(f, BlockDesc):
            cells += (f.exp_bits + 1) / f.block
    return cells / 64.0
