"""The reference backend's float32 primitives that torch lacks or gets wrong, against exact arithmetic.

``reference._fma32`` (fmaf: a * b + c rounded once to float32) is checked against exact rational arithmetic
(``fractions.Fraction``) rounded to float32 here, and against ``math.fma`` where Python has it (3.13+), on
random triples over a wide exponent range, on cancellation, and on the cases that break naive emulation: an
exact sum just beside a float32 midpoint that rounding to float64 moves onto it (double rounding), for
both signs and both parities of the neighbouring float32. ``reference._sqrt32`` (sqrtf) is checked against
numpy's float32 square root (a hardware instruction, correctly rounded). ``reference._f32`` (the float32
constants of csrc/rwp_common.h) against exact rounding.
"""
import math
import struct
from fractions import Fraction

import numpy as np
import pytest
import torch

from rwp_kernels import reference as R

F32_TINY = 2.0**-126


def f32_bits(x: float) -> int:
    return struct.unpack("<I", struct.pack("<f", x))[0]


def round_to_f32(x: Fraction) -> float:
    """The float32 nearest to the rational x, ties to even (normal range and below; no overflow here)."""
    if x == 0:
        return 0.0
    sign, x = (-1.0 if x < 0 else 1.0), abs(x)
    e = x.numerator.bit_length() - x.denominator.bit_length()  # 2^e <= x < 2^(e+2)
    while Fraction(2) ** e > x:
        e -= 1
    while Fraction(2) ** (e + 1) <= x:
        e += 1
    quantum = Fraction(2) ** max(e - 23, -149)  # the spacing of float32 at x (subnormals: 2^-149)
    q, rem = divmod(x, quantum)
    if rem * 2 > quantum or (rem * 2 == quantum and q % 2 == 1):
        q += 1
    return sign * float(q * quantum)


def exact_fma(a: float, b: float, c: float) -> float:
    return round_to_f32(Fraction(a) * Fraction(b) + Fraction(c))


def as_f32(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def check_fma(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> None:
    got = R._fma32(a, b, c)
    assert got.dtype == torch.float32 and got.shape == a.shape
    bad = []
    for x, y, z, g in zip(a.tolist(), b.tolist(), c.tolist(), got.tolist()):
        want = exact_fma(x, y, z)
        if g != want:
            bad.append((x.hex(), y.hex(), z.hex(), g, want))
    assert not bad, f"{len(bad)} wrong results, e.g. {bad[:3]}"


def test_round_to_f32_helper():
    assert round_to_f32(Fraction(1) + Fraction(1, 2**24)) == 1.0  # tie to even
    assert round_to_f32(Fraction(1) + Fraction(3, 2**24)) == 1.0 + 2**-22  # tie to even (upwards)
    assert round_to_f32(Fraction(1) + Fraction(1, 2**24) + Fraction(1, 2**80)) == 1.0 + 2**-23
    assert round_to_f32(Fraction(-1, 3)) == float(np.float32(-1 / 3))
    assert round_to_f32(Fraction(1, 2**149)) == 2.0**-149 and round_to_f32(Fraction(1, 2**151)) == 0.0


def test_fma_random_wide_range():
    gen = torch.Generator().manual_seed(0)
    n = 6000
    mant = lambda: torch.rand(n, generator=gen, dtype=torch.float64) + 0.5  # noqa: E731
    exps = lambda lo, hi: torch.randint(lo, hi, (n,), generator=gen).double()  # noqa: E731
    sign = lambda: torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0).double()  # noqa: E731
    a = (sign() * mant() * 2.0 ** exps(-30, 30)).float()
    b = (sign() * mant() * 2.0 ** exps(-30, 30)).float()
    # c from far below a*b (a sticky bit) to far above it (a*b is the sticky part)
    c = (sign() * mant() * (a.double() * b.double()).abs() * 2.0 ** exps(-40, 40)).float()
    check_fma(a, b, c)


def test_fma_cancellation():
    """c close to -a*b: the exact sum is tiny and exact, or a few bits of the product survive."""
    gen = torch.Generator().manual_seed(1)
    n = 3000
    a, b = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    c = -(a.double() * b.double()).float()  # -a*b rounded: the result is the product's rounding error
    c2 = c + c * torch.randint(-3, 4, (n,), generator=gen).float() * 2.0**-23  # a few ulps off
    check_fma(torch.cat([a, a]), torch.cat([b, b]), torch.cat([c, c2]))


def _double_rounding_triples():
    """a * b = +-h (1 - k^2 2^-46) with h half the spacing of float32 at c: the exact sum c +- h -+ tiny lies
    just inside a float32 midpoint, and the float64 sum rounds onto the midpoint (k^2 < 2^17), where a
    naive rounding to float32 picks the even neighbour: wrong for one parity of c."""
    gen = torch.Generator().manual_seed(2)
    triples = []
    for _ in range(400):
        mant = 2**23 + int(torch.randint(0, 2**23, (1,), generator=gen))
        exp = int(torch.randint(-60, 60, (1,), generator=gen))
        k = int(torch.randint(1, 362, (1,), generator=gen))
        for c_sign in (1.0, -1.0):
            for parity in (0, 1):
                c = c_sign * float((mant & ~1) | parity) * 2.0**exp
                h = 2.0 ** (exp - 1)  # half the spacing at c (c's mantissa is not the binade's first)
                for p_sign in (1.0, -1.0):
                    a = p_sign * (1 + k * 2.0**-23)
                    b = (1 - k * 2.0**-23) * h
                    triples.append((a, b, c))
                    triples.append((b, a, c))
    # the midpoint next to a power of two (spacing halves below it)
    for exp in (-20, 0, 7):
        for k in (1, 5, 300):
            for c_sign in (1.0, -1.0):
                c = c_sign * 2.0**exp
                a, b = 1 + k * 2.0**-23, (1 - k * 2.0**-23) * 2.0 ** (exp - 25)
                triples += [(a, b, c), (-a, b, c), (a, 2 * b, c), (-a, 2 * b, c)]
    return triples


def test_fma_double_rounding_traps():
    triples = _double_rounding_triples()
    a, b, c = (as_f32([t[i] for t in triples]) for i in range(3))
    assert all(float(x) == t for x, t in zip(a.tolist(), (t[0] for t in triples))), "inputs are float32 values"
    naive = (a.double() * b.double() + c.double()).float()
    want = as_f32([exact_fma(*t) for t in triples])
    assert (naive != want).sum() > len(triples) // 8, "the cases must include ones that naive rounding gets wrong"
    check_fma(a, b, c)


def test_fma_exact_results_signed_zeros_and_subnormals():
    a = as_f32([1.5, 3.0, 0.0, -0.0, -0.0, 1.0, 2.0**-70, 2.0**-75, -(2.0**-60), 1.0 + 2**-23])
    b = as_f32([2.0, -1.0, 5.0, 1.0, 1.0, -1.0, 2.0**-70, 3.0 * 2.0**-76, 2.0**-66, 1.0 - 2**-23])
    c = as_f32([1.0, 3.0, -0.0, 0.0, -0.0, 1.0, 2.0**-140, 0.0, 2.0**-127, -1.0])
    check_fma(a, b, c)
    got = R._fma32(a, b, c)
    # IEEE: an exact zero sum is +0 in round-to-nearest, except (-0) + (-0) = -0
    assert [math.copysign(1, v) for v in got[[1, 2, 3, 4, 5]].tolist()] == [1, 1, 1, -1, 1]
    assert got[9].item() == -(2.0**-46)  # (1 + e)(1 - e) - 1 = -e^2: kept exactly, as fmaf does


def test_fma_scalar_operands():
    """The header's constants enter as Python floats (float32 values) in any position."""
    gen = torch.Generator().manual_seed(3)
    t = torch.randn(2000, generator=gen)
    k1, k2 = R._LOG_POLY[0], R._LOG_POLY[1]
    got = R._fma32(k1, t, k2)
    assert got.tolist() == [exact_fma(k1, x, k2) for x in t.tolist()]
    got = R._fma32(t, -0.5, 1.0)
    assert got.tolist() == [exact_fma(x, -0.5, 1.0) for x in t.tolist()]


def test_sqrt32_is_correctly_rounded():
    gen = torch.Generator().manual_seed(4)
    x = torch.cat([torch.rand(200_000, generator=gen) * 40, torch.rand(20_000, generator=gen) * 1e-6,
                   as_f32([0.0, 2.0**-149, F32_TINY, 1.0, 2.0, 4.0, 34.657359, 3.4028235e38])])
    want = np.sqrt(x.numpy())
    got = R._sqrt32(x)
    assert got.dtype == torch.float32
    assert np.array_equal(got.numpy(), want)


def test_header_constants_are_the_float32_roundings_of_its_literals():
    """reference._f32 rounds a decimal literal straight to float32 (as the C++ compiler does)."""
    for literal in ("0.707106781186547524", "7.0376836292e-2", "-2.12194440e-4", "6.28318530717958647692",
                    "2.443315711809948e-5", "-1.388731625493765e-3", "4.166664568298827e-2", "0.1", "1e-45"):
        assert R._f32(literal) == round_to_f32(Fraction(literal)), literal
    assert f32_bits(R._TWO_PI) == 0x40C90FDB and f32_bits(R._SQRT_HALF) == 0x3F3504F3


@pytest.mark.skipif(not hasattr(math, "fma"), reason="math.fma needs Python 3.13 or newer")
def test_fma_against_math_fma():
    """math.fma is the float64 fma: rounding it to float32 is fmaf except where it lands on a float32 midpoint
    (double rounding), so there the exact rounding decides."""
    gen = torch.Generator().manual_seed(5)
    triples = [tuple(v) for v in (torch.randn(20_000, 3, generator=gen) * 10).tolist()] + _double_rounding_triples()
    a, b, c = (as_f32([t[i] for t in triples]) for i in range(3))
    got = R._fma32(a, b, c).tolist()
    for x, y, z, g in zip(a.tolist(), b.tolist(), c.tolist(), got):
        d = math.fma(x, y, z)
        f = float(np.float32(d))
        step = abs(float(np.nextafter(np.float32(f), np.float32(math.copysign(math.inf, d - f)))) - f)
        at_midpoint = d != f and abs(d - f) == step / 2
        assert g == (exact_fma(x, y, z) if at_midpoint else f), (x, y, z)
