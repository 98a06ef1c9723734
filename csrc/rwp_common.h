// Shared math of the C++ CPU and CUDA kernels (Philox4x32-10, uniforms, Box-Muller, per-element updates).
// The extension that fills this header in is tracked by its own issue; the noise stream it must
// reproduce is documented in rwp_kernels/stream.py.
#pragma once
