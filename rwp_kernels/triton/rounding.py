"""Conversions between the parameter dtype and float32 that are exact (and round to nearest even) on
every target.

For bfloat16 both directions are written out in integer operations: Triton's interpreter converts
float32 to bfloat16 by truncation and bfloat16 subnormals to float32 wrongly, so ``.to()`` would make
the CPU tests disagree with a GPU and with the reference. The integer versions give the GPU's results
on both (the widening is a shift; the narrowing rounds to nearest even and keeps NaNs NaN).
"""
import triton
import triton.language as tl


@triton.jit
def to_dtype(x, DTYPE: tl.constexpr):
    if DTYPE == tl.bfloat16:
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
