"""Formats: exactness vs an independent rational-arithmetic model, options, bits, errors."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from quant import BlockFormat, get_format, multiplier_cost

MX_NAMES = ["mxint8", "mxint4", "mxfp8_e4m3", "mxfp8_e5m2", "mxfp6_e3m2", "mxfp6_e2m3",
            "mxfp4_e2m1"]


def _flog2(v: Fraction) -> int:
    """floor(log2(v)) of a positive Fraction, exactly."""
    e = v.numerator.bit_length() - v.denominator.bit_length()
    while Fraction(2) ** e > v:
        e -= 1
    while Fraction(2) ** (e + 1) <= v:
        e += 1
    return e


def _rint(v: Fraction, mode: str) -> int:
    if mode == "rne":
        return round(v)  # Fraction.__round__ is half-to-even
    s = 1 if v >= 0 else -1
    return s * math.floor(abs(v) + Fraction(1, 2))


def _ref_block(xs: list[float], f: BlockFormat) -> list[float]:
    """Exact rational model of one block (written from the OCP MX v1.0 text)."""
    vals = [Fraction(v) for v in xs]
    amax = max(abs(v) for v in vals)
    if amax == 0:
        return [0.0] * len(xs)
    emax, maxv = f.elem_params
    fl = _flog2(amax)
    s = fl - emax
    if f.scale_rule == "ceil" and amax != Fraction(2) ** fl:
        s += 1
    if f.scale_rule == "rceil" and amax > Fraction(maxv) * Fraction(2) ** s:
        s += 1
    lim = 2 ** (f.exp_bits - 1) - 1
    s = max(-lim, min(lim, s))
    out = []
    for v in vals:
        y = v / Fraction(2) ** s
        if f.elem == "int":
            k = _rint(y * 2 ** (f.bits - 2), f.rounding)
            qmax = 2 ** (f.bits - 1) - 1
            q = Fraction(max(-qmax, min(qmax, k)), 2 ** (f.bits - 2))
        else:
            bias = 2 ** (f.e - 1) - 1
            emin = 1 - bias
            e_y = emin if y == 0 else max(_flog2(abs(y)), emin)
            step = Fraction(2) ** (e_y - f.m)
            q = _rint(y / step, f.rounding) * step
            q = max(-Fraction(maxv), min(Fraction(maxv), q))
        out.append(float(q * Fraction(2) ** s))
    return out


def _ref(x: np.ndarray, f: BlockFormat) -> np.ndarray:
    rows = x.reshape(-1, x.shape[-1])
    res = np.zeros_like(rows)
    with np.errstate(over="ignore"):  # ceil/rceil can round a block near 2**128 up to inf
        for r, row in enumerate(rows):
            for b0 in range(0, len(row), f.block):
                res[r, b0:b0 + f.block] = _ref_block([float(v) for v in row[b0:b0 + f.block]], f)
    return res.reshape(x.shape)


def _hard_inputs() -> np.ndarray:
    rng = np.random.default_rng(1)
    rows = [
        rng.standard_normal(40) * 3.0,  # tail block of 8
        rng.standard_normal(40) * 1e-3,
        np.ldexp(rng.integers(-64, 64, 40).astype(np.float64) + 0.5, -4),  # ties
        np.concatenate([[np.nextafter(np.float32(2.0), np.float32(0))], rng.uniform(-2, 2, 39)]),
        np.concatenate([[1e-40, -3e-41, 1.4e-45], np.zeros(37)]),  # subnormal block
        np.concatenate([[3e38], rng.standard_normal(39)]),  # huge amax
        np.concatenate([[0.0] * 32, rng.standard_normal(8) * 5]),  # zero block + tail
        np.concatenate([[6.0 * 1.999], rng.uniform(-7, 7, 39)]),
    ]
    return np.stack(rows).astype(np.float32)


@pytest.mark.parametrize("opts", ["", "(round=away)", "(scale=ceil)", "(scale=rceil)",
                                  "(round=away,scale=rceil,block=16)"])
@pytest.mark.parametrize("base", MX_NAMES + ["bfp(w=5,block=8)",
                                             "block_minifloat(e=3,m=1,block=8,exp_bits=6)"])
def test_block_formats_match_rational_model(base: str, opts: str) -> None:
    if "(" not in base:
        name = base + opts
    else:  # merge the option list into the base's own arguments (base wins on block)
        extra = [a for a in opts.strip("()").split(",") if a and not a.startswith("block=")]
        name = base[:-1] + "".join("," + a for a in extra) + ")"
    f = get_format(name)
    x = _hard_inputs()
    got = f.quantize(torch.from_numpy(x)).numpy()
    want = _ref(x, f)
    np.testing.assert_array_equal(got, want.astype(np.float32))
    # row by row too: a tensor with an extreme block takes the two-step path for all its
    # blocks, a row of ordinary blocks the one-step fast path; both must be exact
    for r in range(x.shape[0]):
        row = f.quantize(torch.from_numpy(x[r:r + 1])).numpy()
        np.testing.assert_array_equal(row, want[r:r + 1].astype(np.float32))
    # blocks run along the axis argument: axis=0 on the transpose gives the transpose
    got0 = f.quantize(torch.from_numpy(x.T.copy()), axis=0).numpy()
    np.testing.assert_array_equal(got0, got.T)


@pytest.mark.parametrize("name", MX_NAMES + ["mxfp4_e2m1(round=away,scale=ceil)"])
def test_fast_path_equals_two_step_path(name: str) -> None:
    f = get_format(name)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 96, generator=g) * torch.exp2(torch.randint(-90, 90, (64, 1),
                                                                      generator=g).float())
    xb, _, _ = f._blocks(x, -1)
    amax = xb.abs().amax(-1, keepdim=True)
    s = f.shared_exponent(amax)
    fast = f._qdq_fast(xb, s)
    assert fast is not None
    slow = f._elements(xb * 2.0 ** (-s).double().float()) * 2.0 ** s.double().float()
    assert torch.equal(fast, slow)


def test_mxint8_symmetric_and_carry() -> None:
    f = get_format("mxint8")
    x = torch.tensor([[1.0, -1.0] + [0.0] * 30])
    assert f.quantize(x)[0, 1] == -1.0
    # 1.9999 in a block with amax 1.9999 -> 127/64 saturation (not the unused -128 code)
    x = torch.tensor([[1.9999, -1.9999] + [0.0] * 30])
    assert f.quantize(x)[0, :2].tolist() == [127 / 64, -127 / 64]
    codes, exps = f.encode(x)
    assert codes[0, 0, :2].tolist() == [127, -127] and exps.flatten().tolist() == [0]


def test_e4m3_and_e5m2_grids() -> None:
    e4 = get_format("fp8_e4m3")
    x = torch.tensor([500.0, 448.0, 464.0, 2.0**-9, 2.0**-10, 2.0**-10 * 1.5, float("inf"),
                      float("nan")])
    q = e4.quantize(x)
    assert q[:6].tolist() == [448.0, 448.0, 448.0, 2.0**-9, 0.0, 2.0**-9]
    assert q[6] == 448.0 and torch.isnan(q[7])
    # cross-check with torch's own float8 cast on in-range values
    y = torch.randn(1000) * 20
    assert torch.equal(e4.quantize(y), y.to(torch.float8_e4m3fn).float())
    e5 = get_format("fp8_e5m2")
    assert torch.equal(e5.quantize(y * 100), (y * 100).to(torch.float8_e5m2).float())
    assert e5.quantize(torch.tensor([1e6, float("-inf")])).tolist() == [57344.0, float("-inf")]


def test_nonfinite_block_becomes_nan_and_empty_passthrough() -> None:
    f = get_format("mxint8")
    x = torch.randn(2, 64)
    x[0, 3] = float("inf")
    q = f.quantize(x)
    assert torch.isnan(q[0, :32]).all() and torch.isfinite(q[0, 32:]).all()
    assert torch.isfinite(q[1]).all()
    e = torch.empty(0, 32)
    assert f.quantize(e).shape == (0, 32)
    for name in ("int4(group=32)", "int4(asym,group=32)"):
        q = get_format(name).quantize(x)
        assert torch.isnan(q[0, :32]).all() and torch.isfinite(q[0, 32:]).all()
    assert torch.isnan(get_format("int8").quantize(x)).all()


@pytest.mark.parametrize("name", ["mxint8", "int8", "fp8_e4m3", "log(w=4)", "bf16"])
def test_non_float_dtype_rejected(name: str) -> None:
    with pytest.raises(ValueError, match="dtype"):
        get_format(name).quantize(torch.arange(10))


@pytest.mark.parametrize("bad", ["mxint9", "foo", "int4(asym,group=0)", "bfp(w=6", "int4(bogus)",
                                 "minifloat(e=3)", "mxint8(round=up)", "bfp(w=x)", "fp32(a=1)"])
def test_bad_names_list_families(bad: str) -> None:
    with pytest.raises(ValueError, match="valid families"):
        get_format(bad)


def test_bits_per_element() -> None:
    assert get_format("mxint8").bits_per_element() == 8.25
    assert get_format("mxfp4_e2m1").bits_per_element() == 4.25
    assert get_format("mxfp6_e3m2").bits_per_element() == 6.25
    assert get_format("bfp(w=6,block=16)").bits_per_element() == 6.5
    assert get_format("fp32").bits_per_element() == 32
    assert get_format("bf16").bits_per_element() == 16
    assert get_format("fp16").bits_per_element() == 16
    assert get_format("fp8_e5m2").bits_per_element() == 8
    assert get_format("int8").bits_per_element() == 8
    assert get_format("int8").bits_per_element((16, 32)) == 8 + 32 / 512
    assert get_format("int8(channel)").bits_per_element((16, 32)) == 8 + 32 / 32
    assert get_format("int4(asym,group=128)").bits_per_element() == 4 + 36 / 128
    assert get_format("log(w=4)").bits_per_element() == 4
    assert get_format("block_minifloat(e=2,m=1,block=16,exp_bits=6)").bits_per_element() == 4.375
    # a row of 40 along the axis: 2 blocks of 32 (tail padded, its scale stored)
    assert get_format("mxint8").bits_per_element((3, 40)) == 8 + 16 / 40
    assert get_format("mxint8").bits_per_element((40, 3), axis=0) == 8 + 16 / 40
    assert get_format("mxint8").tensor_bytes((4096, 4096)) == 4096 * 4096 * 8.25 / 8
    assert get_format("mxfp4_e2m1").memory_density() == 32 / 4.25
    assert get_format("fp32").is_identity and not get_format("bf16").is_identity


def test_formats_hashable_and_equal_by_value() -> None:
    a, b = get_format("mxint8"), get_format("mxint8(round=rne, block=32)")
    assert a == b and hash(a) == hash(b) and {a: 1}[b] == 1
    assert a != get_format("mxint8(round=away)")
    with pytest.raises(Exception):  # noqa: B017 - frozen dataclass
        a.block = 16  # type: ignore[misc]


def test_multiplier_cost_model() -> None:
    assert multiplier_cost("int8", "int8") == 1.0
    assert multiplier_cost("int4", "int4") == 0.25
    assert multiplier_cost("int4", "int8") == 0.5
    assert multiplier_cost("int8", "int4") == multiplier_cost("int4", "int8")
    order = ["int4", "fp8_e4m3", "int8", "bf16", "fp16", "fp32"]
    costs = [multiplier_cost(n, n) for n in order]
    assert costs == sorted(costs)
    assert 1.0 < multiplier_cost("mxint8", "mxint8") < 1.05


def test_straight_through_gradient() -> None:
    x = torch.randn(4, 64, requires_grad=True)
    for name in ["mxint4", "mxfp4_e2m1", "int4(asym,group=16)", "fp8_e4m3", "log(w=3)"]:
        y = get_format(name).quantize(x)
        (g,) = torch.autograd.grad((y * 3).sum(), x)
        assert torch.equal(g, torch.full_like(x, 3.0))


def test_dtypes_preserved() -> None:
    x = torch.randn(2, 64)
    for dt in (torch.float16, torch.bfloat16, torch.float64):
        q = get_format("mxint4").quantize(x.to(dt))
        assert q.dtype == dt
        assert torch.equal(q.float(), get_format("mxint4").quantize(x.to(dt).float()))


@pytest.mark.parametrize("name", ["int8", "int4(asym,group=16)", "int3(channel)"])
def test_int_encode_decodes_to_quantize(name: str) -> None:
    f = get_format(name)
    x = torch.randn(6, 40)
    codes, s, z = f.encode(x)
    assert codes.dtype == torch.int32
    deq = (codes.float() - z) * s
    q = f.quantize(x)
    if f.granularity == "group":
        deq = deq.reshape(6, -1)[:, :40]
    assert torch.allclose(deq.reshape(q.shape), q, rtol=1e-6, atol=1e-7)
    lo, hi = (0, 2**f.bits - 1) if f.asym else (-(2 ** (f.bits - 1) - 1), 2 ** (f.bits - 1) - 1)
    assert lo <= int(codes.min()) and int(codes.max()) <= hi


def test_int_scale_is_correctly_rounded() -> None:
    """s = amax / qmax rounded once (CUDA tensor / python-scalar multiplies by 1/qmax)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 64, generator=g) * 300
    _, s, _ = get_format("int4(channel)").encode(x)
    want = (x.abs().amax(1, keepdim=True).double() / 7).float()
    assert torch.equal(s, want)


@pytest.mark.parametrize("name", ["fp8_e4m3", "mxfp4_e2m1", "mxint8", "int4(group=32)", "log(w=4)"])
def test_non_contiguous_inputs(name: str) -> None:
    f = get_format(name)
    x = torch.randn(64, 96)
    assert torch.equal(f.quantize(x.t()), f.quantize(x.t().contiguous()))
    assert torch.equal(f.quantize(x[:, ::2]), f.quantize(x[:, ::2].contiguous()))


_PIN_X = [[0.3, -1.7, 2.5, -0.05, 7.0, 0.0, -3.25, 1e-3],
          [1.5, 0.5, -0.5, 100.0, -2.0, 0.125, 3.3, -6.6]]
# Outputs of the IntFormat fake quantizer before its speed-up (commit f720c60), pinned
# bit for bit (signs of zeros included) so optimisations cannot drift the values.
_PINNED_INT = [
    ("int8", -1, [[0.0, -1.574803113937378, 2.3622045516967773, -0.0, 7.08661413192749, 0.0,
                   -3.149606227874756, 0.0],
                  [1.574803113937378, 0.787401556968689, -0.787401556968689, 100.0,
                   -2.3622045516967773, 0.0, 3.149606227874756, -6.299212455749512]]),
    ("int4", -1, [[0.0, -0.0, 0.0, -0.0, 0.0, 0.0, -0.0, 0.0],
                  [0.0, 0.0, -0.0, 100.0, -0.0, 0.0, 0.0, -0.0]]),
    ("int4(asym,group=4)", -1,
     [[0.2800000011920929, -1.6800000667572021, 2.5199999809265137, 0.0, 6.833333492279053,
       0.0, -3.4166667461395264, 0.0],
      [0.0, 0.0, 0.0, 100.5, -1.9799998998641968, 0.0, 3.299999713897705, -6.59999942779541]]),
    ("int3(channel)", 0,
     [[0.5, -1.7000000476837158, 2.5, -0.0, 7.0, 0.0, -3.3000001907348633, 0.0],
      [1.5, 0.5666666626930237, -0.8333333134651184, 100.0, -2.3333332538604736, 0.125,
       3.3000001907348633, -6.600000381469727]]),
    ("int4(round=away,group=3)", -1,
     [[0.3571428656578064, -1.7857143878936768, 2.5, 0.0, 7.0, 0.0, -3.25, 0.0],
      [1.5, 0.4285714328289032, -0.4285714328289032, 100.0, 0.0, 0.0, 3.7714285850524902,
       -6.599999904632568]]),
    ("int8(asym,channel)", -1,
     [[0.2813725471496582, -1.6882354021072388, 2.492156982421875, -0.04019607976078987,
       6.994117736816406, 0.0, -3.255882501602173, 0.0],
      [1.672156810760498, 0.4180392026901245, -0.4180392026901245, 99.91136932373047,
       -2.090196132659912, 0.0, 3.344313621520996, -6.688627243041992]]),
]


@pytest.mark.parametrize(("name", "axis", "want"), _PINNED_INT)
def test_int_quantize_pinned_bits(name: str, axis: int, want: list[list[float]]) -> None:
    x = torch.tensor(_PIN_X)
    keep = x.clone()
    q = get_format(name).quantize(x, axis=axis)
    assert torch.equal(q.view(torch.int32), torch.tensor(want).view(torch.int32))
    assert torch.equal(x, keep)  # input untouched (the fast path works in place on copies)


def test_int_quantize_pinned_bf16_and_nan() -> None:
    q = get_format("int4(asym)").quantize(torch.tensor(_PIN_X).bfloat16())
    assert q.dtype == torch.bfloat16
    want = [[0.0, 0.0, 0.0, 0.0, 7.09375, 0.0, 0.0, 0.0],
            [0.0, 0.0, 0.0, 99.5, 0.0, 0.0, 0.0, -7.09375]]
    assert torch.equal(q.float().view(torch.int32), torch.tensor(want).view(torch.int32))
    x = torch.tensor([[1.0, float("nan"), 300.0, -2.0]])
    # symmetric: a NaN amax gives scale 1 (NaN > 0 is false), the NaN stays, the rest clamp
    q = get_format("int8").quantize(x)
    assert q[0, [0, 2, 3]].tolist() == [1.0, 127.0, -2.0] and bool(torch.isnan(q[0, 1]))
    assert bool(torch.isnan(get_format("int8(asym)").quantize(x)).all())
