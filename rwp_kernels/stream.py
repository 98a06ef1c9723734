"""The noise stream every backend reproduces: constants and key/counter layout.

Element ``e`` of the stream of parameter ``param_index`` at optimizer step ``step`` is lane ``e % 4``
of the Philox4x32-10 block with

    key     = (seed + stream * STREAM_STRIDE) mod 2**64, split into (low 32 bits, high 32 bits)
    counter = (q mod 2**32, q >> 32, param_index, step mod 2**32),   q = e // 4

Each block's four 32-bit words become four normals by two Box-Muller transforms of
``u(x) = (x >> 8) * 2**-24 + 2**-25`` (one float32 rounding): (x0, x1) -> (z0, z1), (x2, x3) -> (z2, z3),
``z0 = r cos t``, ``z1 = r sin t``, ``r = sqrt(-2 ln u(x0))``, ``t = 2 pi u(x1)``.

The uniform lies in [2**-25, 1]: it is never 0 (so the logarithm is finite); it rounds up to exactly 1
only for the top value of ``x >> 8``, which gives r = 0, a harmless zero normal.
"""

MASK32 = 0xFFFFFFFF
UINT64_MOD = 1 << 64

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10

STREAM_STRIDE = 0x9E3779B97F4A7C15

UNIFORM_SCALE = 2.0**-24
UNIFORM_OFFSET = 2.0**-25

NORMALS_PER_BLOCK = 4

# sigma of a 0-D / 1-D parameter is gamma * (||w|| + NORM_EPS), as in the official code.
NORM_EPS = 1e-16


def philox_key(seed: int, stream: int) -> tuple[int, int]:
    """The two 32-bit key words for ``seed`` and ``stream``."""
    key = (seed + stream * STREAM_STRIDE) % UINT64_MOD
    return key & MASK32, key >> 32


def step_word(step: int) -> int:
    """The counter word that holds the optimizer step (step mod 2**32)."""
    return step & MASK32
