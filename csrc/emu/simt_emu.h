// The emulated CUDA runtime: enough of CUDA for the kernels of csrc/cuda to compile as host C++ and run on
// the CPU with their real launch geometry (grid, blocks, threads, shared memory, barriers).
//
// The threads of a block are fibers on one OS thread. A fiber runs until it reaches __syncthreads() or
// returns; when every thread of the block has arrived, the barrier opens and the fibers run on, in a new
// order drawn from a seeded generator, so a missing barrier or a race between threads of a block shows up
// as a different result under another seed. A barrier that not every thread reaches, or threads that wait
// at different barriers, fail the launch with a message (CUDA leaves both undefined).
// `__shared__` variables are `static thread_local`: one instance per OS thread, which runs its blocks one
// after the other, so each block has its own. Blocks are spread over a few OS threads.
// No CUDA header is used: the types and intrinsics the kernels need are defined here.
#pragma once

#include <stdint.h>

#include <cmath>
#include <cstring>
#include <functional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static thread_local
#define __syncthreads() ::rwp::simt::sync_threads(__FILE__, __LINE__)
#define threadIdx (::rwp::simt::thread_index())
#define blockIdx (::rwp::simt::block_index())
#define blockDim (::rwp::simt::block_dim())
#define gridDim (::rwp::simt::grid_dim())

enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidConfiguration = 9, cudaErrorLaunchFailure = 719 };
struct CUstream_st;
using cudaStream_t = CUstream_st*;

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

inline int __ffs(int x) { return __builtin_ffs(x); }  // 1 + the index of the lowest set bit; 0 for 0

struct alignas(16) float4 {
  float x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline void __stcg(float4* p, float4 v) { *p = v; }  // a store that bypasses L1: a plain store here

template <class T>
inline T min(T a, T b) {
  return b < a ? b : a;
}

template <class T>
inline T max(T a, T b) {
  return a < b ? b : a;
}

// ---- 16-bit floating point types, with CUDA's conversions (round to nearest even; NaN becomes 0x7FFF) ----

struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};

namespace rwp::simt {
inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
}  // namespace rwp::simt

inline __half __ushort_as_half(unsigned short b) { return {b}; }
inline unsigned short __half_as_ushort(__half h) { return h.bits; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short b) { return {b}; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.bits; }

inline float __half2float(__half h) {
  const uint32_t sign = static_cast<uint32_t>(h.bits & 0x8000u) << 16;
  const uint32_t exponent = (h.bits >> 10) & 0x1Fu, mantissa = h.bits & 0x3FFu;
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24, exact in float
    const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-08f;
    return sign ? -magnitude : magnitude;
  }
  if (exponent == 31) return ::rwp::simt::bits_float(sign | 0x7F800000u | (mantissa << 13));
  return ::rwp::simt::bits_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

inline __half __float2half_rn(float f) {
  const uint32_t x = ::rwp::simt::float_bits(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t magnitude = x & 0x7FFFFFFFu;
  if (magnitude > 0x7F800000u) return {0x7FFF};
  if (magnitude >= 0x477FF000u) return {static_cast<uint16_t>(sign | 0x7C00u)};  // 65520 and up: infinity
  if (magnitude < 0x38800000u) {  // below 2^-14: a multiple of 2^-24, rounded (the scaling is exact)
    const float scaled = ::rwp::simt::bits_float(magnitude) * 16777216.0f;
    return {static_cast<uint16_t>(sign | static_cast<uint32_t>(std::nearbyint(scaled)))};
  }
  const uint32_t rebiased = magnitude - 0x38000000u;  // exponent bias 127 -> 15
  return {static_cast<uint16_t>(sign | ((rebiased + 0xFFFu + ((rebiased >> 13) & 1u)) >> 13))};
}

inline float __bfloat162float(__nv_bfloat16 b) { return ::rwp::simt::bits_float(static_cast<uint32_t>(b.bits) << 16); }

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  const uint32_t x = ::rwp::simt::float_bits(f);
  if ((x & 0x7FFFFFFFu) > 0x7F800000u) return {0x7FFF};
  return {static_cast<uint16_t>((x + 0x7FFFu + ((x >> 16) & 1u)) >> 16)};
}

// ---- threads, barriers, launches ---------------------------------------------------------------------------

namespace rwp::simt {

const uint3& thread_index();
const uint3& block_index();
const dim3& block_dim();
const dim3& grid_dim();
void sync_threads(const char* file, int line);

// Runs thread_body once per thread of every block of the grid; cudaErrorInvalidConfiguration for a
// geometry CUDA would refuse, cudaErrorLaunchFailure for a barrier misuse (last_error() says what).
cudaError_t run_grid(dim3 grid, dim3 block, const std::function<void()>& thread_body);

// The message of the last failed launch of this OS thread.
const std::string& last_error();

// The seed of the thread order: launch n of a process uses (seed, n); one seed gives one order.
void set_schedule_seed(uint64_t seed);

// kernel<<<grid, block, 0, stream>>>(args...): every thread gets its own copy of the arguments, converted
// to the kernel's parameter types as a call would. The stream is ignored: launches run to completion.
template <class... Params, class... Args>
cudaError_t launch(dim3 grid, dim3 block, cudaStream_t, void (*kernel)(Params...), Args&&... args) {
  const std::tuple<std::decay_t<Params>...> values(std::forward<Args>(args)...);
  return run_grid(grid, block, [&] {
    std::tuple<std::decay_t<Params>...> own = values;
    std::apply(kernel, own);
  });
}

}  // namespace rwp::simt
