"""Float operations that round exactly as csrc/rwp_common.h does, on a GPU and in Triton's interpreter.

* ``to_dtype`` / ``to_float32``: conversions between the parameter dtype and float32, to nearest even. For
  bfloat16 the widening is a shift, and the narrowing, where the kernels are interpreted, integer operations:
  Triton's interpreter converts float32 to bfloat16 by truncation and bfloat16 subnormals to float32 wrongly,
  so ``.to()`` would make the CPU tests disagree with a GPU and with the other backends. The integer
  narrowing rounds to nearest even and keeps NaNs NaN, as a GPU's ``cvt.rn.bf16x2.f32`` (one instruction for
  two elements, where the integer version takes about seven per element) does, NaN payloads aside: compiled
  kernels use ``.to()``.
* ``tl.fma`` in the interpreter: Triton's interpreter computes it as ``x * y + z`` in float32 (two
  roundings), not as the one-rounding fma a GPU (``fma.rn.f32``) and the header's ``fmadd`` compute.
  ``exact_interpreter_fma`` replaces it with a correctly rounded one (float64 product, sum rounded to odd,
  then to float32), so the kernels can use ``tl.fma`` and be tested in the interpreter bit for bit.
* ``noise_sqrt``: the square root of the noise's -2 ln u (+-0 or at least 2**-100), correctly rounded. Compiled,
  the header's CUDA ``vsqrt`` in the same PTX: the fast path of ``sqrt.rn.f32`` (an approximate reciprocal root
  and a Newton step) without its range check and branch to the slow path; interpreted, ``tl.sqrt_rn``.

Every other multiply and add of the kernels is a plain Triton operation, rounded on its own: the
launchers compile with ``enable_fp_fusion=False`` (``tables.COMPILE_OPTIONS``), and the interpreter
rounds each numpy operation anyway. tests/test_triton_ptx.py checks the compiled PTX for it.
"""
import numpy as np
import triton
import triton.language as tl

# True when the kernels are interpreted (the knob triton.jit reads when it creates them).
INTERPRETED: tl.constexpr = tl.constexpr(bool(triton.knobs.runtime.interpret))


@triton.jit
def to_dtype(x, DTYPE: tl.constexpr):
    if (DTYPE == tl.bfloat16) and INTERPRETED:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        quiet_nan = (bits >> 16) | 0x40
        out = tl.where((bits & 0x7FFFFFFF) > 0x7F800000, quiet_nan, rounded)
        return out.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)


@triton.jit
def to_float32(x):
    if x.dtype == tl.bfloat16:
        return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return x.to(tl.float32)


# csrc/rwp_common.h's CUDA vsqrt, operand for operand (tests/test_triton_ptx.py compares the two).
NOISE_SQRT_PTX: tl.constexpr = tl.constexpr(
    "{\n\t.reg .f32 rsq, y, half_rsq, err;\n\t"
    "max.f32 rsq, $1, 0f0D800000;\n\t"
    "rsqrt.approx.ftz.f32 rsq, rsq;\n\t"
    "mul.ftz.f32 y, $1, rsq;\n\t"
    "mul.ftz.f32 half_rsq, rsq, 0f3F000000;\n\t"
    "neg.f32 err, y;\n\t"
    "fma.rn.f32 err, err, y, $1;\n\t"
    "fma.rn.f32 $0, err, half_rsq, y;\n\t}")


@triton.jit
def noise_sqrt(x):
    if INTERPRETED:
        return tl.sqrt_rn(x)
    else:
        return tl.inline_asm_elementwise(NOISE_SQRT_PTX, "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1)


def _fma_float32(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Correctly rounded float32 fma of numpy arrays: the product of two float32 values is exact in float64;
    the sum is rounded to odd (to nearest, then, where inexact and the last bit is even, one ulp towards the
    exact sum, which Knuth's TwoSum gives), and rounding that to float32 is the correctly rounded result
    (53 >= 24 + 2 bits: Boldo and Melquiond, "Emulation of FMA and correctly rounded sums", 2008)."""
    p = x.astype(np.float64) * y.astype(np.float64)
    c = z.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        s = p + c
        back = s - p
        err = (p - (s - back)) + (c - back)  # p + c == s + err exactly (s finite)
    bits = np.asarray(s).view(np.int64)
    towards = np.where((err > 0) == (s > 0), 1, -1)  # the exact sum is larger / smaller in magnitude than s
    fix = np.isfinite(s) & (err != 0) & ((bits & 1) == 0)
    odd = np.where(fix, bits + towards, bits).view(np.float64)
    with np.errstate(over="ignore"):
        return odd.astype(np.float32)


def exact_interpreter_fma() -> None:
    """Make ``tl.fma`` on float32 one rounding in Triton's interpreter, as on a GPU (idempotent). Called when
    the kernels are interpreted; without the interpreter it changes nothing that runs."""
    from triton.runtime.interpreter import InterpreterBuilder, TensorHandle

    if getattr(InterpreterBuilder.create_fma, "_rwp_exact", False):
        return
    original = InterpreterBuilder.create_fma

    def create_fma(self, x, y, z):
        if x.data.dtype == y.data.dtype == z.data.dtype == np.float32:
            return TensorHandle(_fma_float32(x.data, y.data, z.data), z.dtype.scalar)
        return original(self, x, y, z)

    create_fma._rwp_exact = True
    InterpreterBuilder.create_fma = create_fma


if triton.knobs.runtime.interpret:
    exact_interpreter_fma()
