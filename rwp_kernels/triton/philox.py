"""Device functions of the noise stream (rwp_kernels/stream.py, docs/spec.md section 3) in Triton.

Philox4x32-10 is written out with ``tl.umulhi`` (``tl.randn`` has a 32-bit counter and spends a
whole Philox call per normal). Each call yields four normals: element ``e`` of a parameter is lane
``e % 4`` of block ``q = e // 4`` with counter ``(q lo, q hi, param_index, step)``.

The uniforms and Box-Muller are ``uniform``, ``log_unit``, ``sincos_2pi``, ``box_muller`` and
``normal_block`` of csrc/rwp_common.h, op for op: each ``fmadd`` there is ``tl.fma`` here (one
rounding; ``rounding.py`` makes the interpreter's exact too), every other multiply and add is a separate,
rounded operation (the kernels are compiled with ``enable_fp_fusion=False``, ``tables.COMPILE_OPTIONS``,
so neither LLVM nor ptxas contracts them), the square root is correctly rounded (``rounding.noise_sqrt``),
and the float32 constants are the header's literals (each rounds to the same float32 from its double value
here as from the decimal in C++). So the normals equal the C++ CPU and CUDA
backends' bit for bit, on a GPU and in Triton's interpreter. No libdevice call: its ``logf``/``sinf``/
``cosf`` differ from the header's, and ``sinf``/``cosf`` carry a slow path for huge arguments (a stack
frame, spills).

Constants above 2**31 are written as their int32 two's complement and reinterpreted as uint32:
the interpreter (TRITON_INTERPRET=1) rejects integer literals outside the int32 range.
"""
import triton
import triton.language as tl

from .. import stream as S
from .rounding import noise_sqrt


def as_int32(word: int) -> int:
    """The int32 with the bits of the uint32 ``word`` (how 32-bit words travel as kernel arguments)."""
    return word - (1 << 32) if word >= 1 << 31 else word


M0: tl.constexpr = tl.constexpr(as_int32(S.PHILOX_M0))
M1: tl.constexpr = tl.constexpr(as_int32(S.PHILOX_M1))
W0: tl.constexpr = tl.constexpr(as_int32(S.PHILOX_W0))
W1: tl.constexpr = tl.constexpr(as_int32(S.PHILOX_W1))
ROUNDS: tl.constexpr = tl.constexpr(S.PHILOX_ROUNDS)
UNIFORM_SCALE: tl.constexpr = tl.constexpr(S.UNIFORM_SCALE)  # 2**-24
UNIFORM_OFFSET: tl.constexpr = tl.constexpr(S.UNIFORM_OFFSET)  # 2**-25

# csrc/rwp_common.h's float32 literals (each rounds to the same float32 from its double value here).
SQRT_HALF: tl.constexpr = tl.constexpr(0.707106781186547524)
LOG_P0: tl.constexpr = tl.constexpr(7.0376836292e-2)
LOG_P1: tl.constexpr = tl.constexpr(-1.1514610310e-1)
LOG_P2: tl.constexpr = tl.constexpr(1.1676998740e-1)
LOG_P3: tl.constexpr = tl.constexpr(-1.2420140846e-1)
LOG_P4: tl.constexpr = tl.constexpr(1.4249322787e-1)
LOG_P5: tl.constexpr = tl.constexpr(-1.6668057665e-1)
LOG_P6: tl.constexpr = tl.constexpr(2.0000714765e-1)
LOG_P7: tl.constexpr = tl.constexpr(-2.4999993993e-1)
LOG_P8: tl.constexpr = tl.constexpr(3.3333331174e-1)
LN2_LO: tl.constexpr = tl.constexpr(-2.12194440e-4)
LN2_HI: tl.constexpr = tl.constexpr(0.693359375)
TWO_PI: tl.constexpr = tl.constexpr(6.28318530717958647692)
SIN_P0: tl.constexpr = tl.constexpr(-1.9515295891e-4)
SIN_P1: tl.constexpr = tl.constexpr(8.3321608736e-3)
SIN_P2: tl.constexpr = tl.constexpr(-1.6666654611e-1)
COS_P0: tl.constexpr = tl.constexpr(2.443315711809948e-5)
COS_P1: tl.constexpr = tl.constexpr(-1.388731625493765e-3)
COS_P2: tl.constexpr = tl.constexpr(4.166664568298827e-2)
ROUND_MAGIC: tl.constexpr = tl.constexpr(12582912.0)  # 1.5 * 2**23: adding it rounds |x| < 2**22 to an integer


@triton.jit
def _u32(value):
    """A uint32 constant from its int32 bit pattern."""
    return tl.full((), value, tl.int32).to(tl.uint32, bitcast=True)


@triton.jit
def _mulhilo(a, b, WIDE: tl.constexpr):
    """The high and low words of the uint32 product a * b: ``tl.umulhi`` and the low product, or (``WIDE``) the
    words of one 64-bit product, which Triton 3.6 compiles to one multiply (IMAD.WIDE.U32) instead of two."""
    if WIDE:
        product = a.to(tl.uint64) * b.to(tl.uint64)
        return (product >> 32).to(tl.uint32), product.to(tl.uint32)
    else:
        return tl.umulhi(a, b), a * b


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1, WIDE: tl.constexpr = False):
    """Philox4x32-10 (Random123) on uint32 counter words and key words; returns the four output words. ``WIDE``:
    each round's two products as 64-bit ones (``_mulhilo``)."""
    m0 = _u32(M0)
    m1 = _u32(M1)
    w0 = _u32(W0)
    w1 = _u32(W1)
    for r in tl.static_range(ROUNDS):
        if r > 0:
            k0 = k0 + w0
            k1 = k1 + w1
        hi0, lo0 = _mulhilo(m0, c0, WIDE)
        hi1, lo1 = _mulhilo(m1, c2, WIDE)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


@triton.jit
def uniform(x):
    """u(x) = (x >> 8) * 2**-24 + 2**-25 in float32: exact product, one rounding (rwp_common.h ``uniform``)."""
    return tl.fma((x >> 8).to(tl.float32), UNIFORM_SCALE, UNIFORM_OFFSET)


@triton.jit
def log_unit(x):
    """ln x for x in (0, 1], Cephes logf as rwp_common.h ``log_unit`` writes it (no special cases)."""
    bits = x.to(tl.uint32, bitcast=True)
    m = ((bits & 0x007FFFFF) | 0x3F000000).to(tl.float32, bitcast=True)  # x = m * 2^e, m in [0.5, 1)
    small = m < SQRT_HALF
    e = (bits >> 23).to(tl.int32) - 126 - small.to(tl.int32)  # e - 1 where m < sqrt(1/2)
    fe = e.to(tl.float32)
    t = (m - 1.0) + tl.where(small, m, 0.0)  # exact: 2m - 1 or m - 1
    z = t * t
    p = tl.fma(LOG_P0, t, LOG_P1)
    p = tl.fma(p, t, LOG_P2)
    p = tl.fma(p, t, LOG_P3)
    p = tl.fma(p, t, LOG_P4)
    p = tl.fma(p, t, LOG_P5)
    p = tl.fma(p, t, LOG_P6)
    p = tl.fma(p, t, LOG_P7)
    p = tl.fma(p, t, LOG_P8)
    y = (p * t) * z
    y = tl.fma(fe, LN2_LO, y)
    y = tl.fma(z, -0.5, y)
    return tl.fma(fe, LN2_HI, t + y)


@triton.jit
def sincos_2pi(u):
    """(cos 2 pi u, sin 2 pi u) for u in [0, 1] as rwp_common.h ``sincos_2pi``: u = k/4 + w exactly, the
    Cephes sinf/cosf polynomials on [-pi/4, pi/4], rotation by k quarter turns with bit operations."""
    shifted = tl.fma(u, 4.0, ROUND_MAGIC)  # u * 4 rounded to an integer k (ties to even), in the low bits
    q = shifted.to(tl.uint32, bitcast=True)
    k = shifted - ROUND_MAGIC
    th = tl.fma(k, -0.25, u) * TWO_PI  # u - k / 4, exact
    z = th * th
    ps = tl.fma(SIN_P0, z, SIN_P1)
    ps = tl.fma(ps, z, SIN_P2)
    sr = tl.fma(ps * z, th, th)
    pc = tl.fma(COS_P0, z, COS_P1)
    pc = tl.fma(pc, z, COS_P2)
    cr = tl.fma(pc * z, z, tl.fma(-0.5, z, 1.0))
    odd = (q & 1) != 0
    cs = tl.where(odd, sr, cr)
    sn = tl.where(odd, cr, sr)
    c = (cs.to(tl.uint32, bitcast=True) ^ (((q + 1) & 2) << 30)).to(tl.float32, bitcast=True)
    s = (sn.to(tl.uint32, bitcast=True) ^ ((q & 2) << 30)).to(tl.float32, bitcast=True)
    return c, s


@triton.jit
def box_muller(xa, xb):
    """Two standard normals from two Philox words (rwp_common.h ``box_muller``)."""
    r = noise_sqrt(-2.0 * log_unit(uniform(xa)))
    c, s = sincos_2pi(uniform(xb))
    return r * c, r * s


@triton.jit
def key_words(k0, k1):
    """The uint32 key words from the int32 bit patterns the host passes."""
    return k0.to(tl.uint32, bitcast=True), k1.to(tl.uint32, bitcast=True)


@triton.jit
def _quads(first_quad, step_q, Q: tl.constexpr):
    """The uint32 words (lo, hi) of the block counters ``first_quad + step_q * i`` for i < Q (int64 scalar
    ``first_quad``; the carry into the high word where the low word wraps)."""
    first_lo = first_quad.to(tl.uint32)
    q_lo = first_lo + (step_q * tl.arange(0, Q)).to(tl.uint32)
    q_hi = (first_quad >> 32).to(tl.uint32) + (q_lo < first_lo).to(tl.uint32)
    return q_lo, q_hi


@triton.jit
def _normals(first_quad, param_index, step, k0, k1, STRIDE: tl.constexpr, Q: tl.constexpr):
    """The four normals of the blocks ``first_quad + STRIDE * i`` for i < Q (``normal_block``), float32 [Q] each.
    STRIDE 2 (a 16-bit tile's two blocks per thread) takes the 64-bit products: fewer instructions under Triton
    3.6, the same code under 3.8 (in float32's kept-row kernel they spill)."""
    q_lo, q_hi = _quads(first_quad, STRIDE, Q)
    zero = tl.zeros([Q], tl.uint32)
    x0, x1, x2, x3 = philox4x32_10(q_lo, q_hi, zero + param_index, zero + step, k0, k1, STRIDE == 2)
    z0, z1 = box_muller(x0, x1)
    z2, z3 = box_muller(x2, x3)
    return z0, z1, z2, z3


@triton.jit
def _int64(x):
    """``x`` (an integer scalar tensor, or a Python int in the interpreter's loops) as an int64 scalar tensor."""
    return tl.zeros([], tl.int64) + x


@triton.jit
def normal_tile(first_quad, param_index, step, k0, k1, BLOCK: tl.constexpr, PER_THREAD: tl.constexpr = 4):
    """Normals of elements 4*first_quad .. 4*first_quad + BLOCK - 1 of one parameter's stream, float32 [BLOCK]
    (rwp_common.h ``normal_block`` for BLOCK // 4 consecutive blocks).

    ``first_quad`` is an int64 scalar, ``param_index``, ``step``, ``k0``, ``k1`` uint32 scalars. ``PER_THREAD``:
    the consecutive elements a thread holds in the caller's layout, 4 (one Philox block: float32 tensors, whose
    16-byte accesses hold 4 elements) or 8 (two consecutive blocks: 16-bit tensors), so that the normals come
    out in the layout of the loads and stores and no shared-memory shuffle sits between them.
    """
    first_quad = _int64(first_quad)
    if PER_THREAD == 8:
        # Blocks 2i (x) and 2i + 1 (y) in one lane: [Q, blk, a, b] = (x, y)[blk][2a + b], in element order.
        x0, x1, x2, x3 = _normals(first_quad, param_index, step, k0, k1, 2, BLOCK // 8)
        y0, y1, y2, y3 = _normals(first_quad + 1, param_index, step, k0, k1, 2, BLOCK // 8)
        return tl.reshape(tl.join(tl.join(tl.join(x0, y0), tl.join(x2, y2)), tl.join(tl.join(x1, y1), tl.join(x3, y3))),
                          [BLOCK])
    else:
        z0, z1, z2, z3 = _normals(first_quad, param_index, step, k0, k1, 1, BLOCK // 4)
        return interleave(z0, z1, z2, z3)


@triton.jit
def block_normals(first_quad, param_index, step, k0, k1, Q: tl.constexpr):
    """The normals of the blocks first_quad .. first_quad + Q - 1 by lane: float32 [Q] tensors z0, z1, z2, z3
    (element 4 * (first_quad + q) + k is zk[q]); arguments as ``normal_tile``'s."""
    return _normals(_int64(first_quad), param_index, step, k0, k1, 1, Q)


@triton.jit
def interleave(z0, z1, z2, z3):
    """``block_normals``' lanes as one tile in element order, float32 [4 Q], a block's 4 elements in one thread."""
    # [Q, 2, 2] with [q, a, b] = (z0, z1, z2, z3)[2a + b]; row-major order is element order.
    return tl.reshape(tl.join(tl.join(z0, z2), tl.join(z1, z3)), [4 * z0.shape[0]])
