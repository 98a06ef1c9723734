"""Device functions of the noise stream (rwp_kernels/stream.py, docs/spec.md section 3) in Triton.

Philox4x32-10 is written out with ``tl.umulhi`` (``tl.randn`` has a 32-bit counter and spends a
whole Philox call per normal). Each call yields four normals: element ``e`` of a parameter is lane
``e % 4`` of block ``q = e // 4`` with counter ``(q lo, q hi, param_index, step)``.

Constants above 2**31 are written as their int32 two's complement and reinterpreted as uint32:
the interpreter (TRITON_INTERPRET=1) rejects integer literals outside the int32 range.
"""
import triton
import triton.language as tl

from .. import stream as S


def as_int32(word: int) -> int:
    """The int32 with the bits of the uint32 ``word`` (how 32-bit words travel as kernel arguments)."""
    return word - (1 << 32) if word >= 1 << 31 else word


M0: tl.constexpr = tl.constexpr(as_int32(S.PHILOX_M0))
M1: tl.constexpr = tl.constexpr(as_int32(S.PHILOX_M1))
W0: tl.constexpr = tl.constexpr(as_int32(S.PHILOX_W0))
W1: tl.constexpr = tl.constexpr(as_int32(S.PHILOX_W1))
ROUNDS: tl.constexpr = tl.constexpr(S.PHILOX_ROUNDS)
UNIFORM_SCALE: tl.constexpr = tl.constexpr(S.UNIFORM_SCALE)
UNIFORM_OFFSET: tl.constexpr = tl.constexpr(S.UNIFORM_OFFSET)
TWO_PI: tl.constexpr = tl.constexpr(6.283185307179586)


@triton.jit
def _u32(value):
    """A uint32 constant from its int32 bit pattern."""
    return tl.full((), value, tl.int32).to(tl.uint32, bitcast=True)


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 (Random123) on uint32 counter words and key words; returns the four output words."""
    m0 = _u32(M0)
    m1 = _u32(M1)
    w0 = _u32(W0)
    w1 = _u32(W1)
    for r in tl.static_range(ROUNDS):
        if r > 0:
            k0 = k0 + w0
            k1 = k1 + w1
        hi0 = tl.umulhi(m0, c0)
        lo0 = m0 * c0
        hi1 = tl.umulhi(m1, c2)
        lo1 = m1 * c2
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


@triton.jit
def uniform(x):
    """u(x) = (x >> 8) * 2**-24 + 2**-25 in float32: exact product, one rounding."""
    return (x >> 8).to(tl.float32) * UNIFORM_SCALE + UNIFORM_OFFSET


@triton.jit
def cos_sin_2pi(v):
    """(cos 2 pi v, sin 2 pi v) for v in (0, 1], within ~1e-7: an exact reduction to the nearest quarter turn
    and Taylor polynomials on [-pi/4, pi/4]. Unlike tl.cos / tl.sin (libdevice), no call to a slow path for
    huge arguments, which costs a stack frame and spills around the call."""
    quarter = (v * 4.0 + 0.5).to(tl.int32)  # v > 0: truncation is floor
    x = (v - quarter.to(tl.float32) * 0.25) * TWO_PI  # v - quarter / 4 is exact; |x| <= pi / 4
    x2 = x * x
    s = x * (1.0 + x2 * (-1.0 / 6 + x2 * (1.0 / 120 + x2 * (-1.0 / 5040 + x2 * (1.0 / 362880)))))
    c = 1.0 + x2 * (-0.5 + x2 * (1.0 / 24 + x2 * (-1.0 / 720 + x2 * (1.0 / 40320))))
    quadrant = quarter & 3
    odd = (quadrant & 1) != 0
    c_q = tl.where(odd, s, c)
    s_q = tl.where(odd, c, s)
    return tl.where((quadrant == 1) | (quadrant == 2), -c_q, c_q), tl.where(quadrant >= 2, -s_q, s_q)


@triton.jit
def box_muller(xa, xb):
    r = tl.sqrt(-2.0 * tl.log(uniform(xa)))
    c, s = cos_sin_2pi(uniform(xb))
    return r * c, r * s


@triton.jit
def key_words(k0, k1):
    """The uint32 key words from the int32 bit patterns the host passes."""
    return k0.to(tl.uint32, bitcast=True), k1.to(tl.uint32, bitcast=True)


@triton.jit
def normal_tile(first_quad, param_index, step, k0, k1, BLOCK: tl.constexpr):
    """Normals of elements 4*first_quad .. 4*first_quad + BLOCK - 1 of one parameter's stream, float32 [BLOCK].

    ``first_quad`` is an int64 scalar, ``param_index``, ``step``, ``k0``, ``k1`` uint32 scalars.
    """
    first_quad = tl.to_tensor(first_quad).to(tl.int64)  # a Python int in the interpreter's loops
    first_lo = first_quad.to(tl.uint32)
    q_lo = first_lo + tl.arange(0, BLOCK // 4).to(tl.uint32)
    q_hi = (first_quad >> 32).to(tl.uint32) + (q_lo < first_lo).to(tl.uint32)  # carry
    zero = tl.zeros([BLOCK // 4], tl.uint32)
    x0, x1, x2, x3 = philox4x32_10(q_lo, q_hi, zero + param_index, zero + step, k0, k1)
    z0, z1 = box_muller(x0, x1)
    z2, z3 = box_muller(x2, x3)
    # [Q, 2, 2] with [q, a, b] = (z0, z1, z2, z3)[2a + b]; row-major order is element order.
    return tl.reshape(tl.join(tl.join(z0, z2), tl.join(z1, z3)), [BLOCK])
