// Lane types for the CPU kernels: sixteen-lane AVX-512 vectors where the build has AVX-512
// (-march=native), eight-lane AVX2 vectors where it has AVX2 and FMA (also used beside AVX-512 for
// shorter runs), else plain scalars. They provide the primitives rwp_common.h's templates use, plus
// loads and stores that convert fp16/bf16 storage to and from float32 (round to nearest even, as torch).
#pragma once

#include <stdint.h>

#include <cstring>

#include "../rwp_common.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define RWP_CPU_AVX2 1
#include <immintrin.h>
#else
#define RWP_CPU_AVX2 0
#endif
#if RWP_CPU_AVX2 && defined(__AVX512F__) && defined(__AVX512DQ__)
#define RWP_CPU_AVX512 1
#else
#define RWP_CPU_AVX512 0
#endif

namespace rwp::cpu {

// Storage types of the 16-bit dtypes (bits only; arithmetic happens in float32).
struct half_t {
  uint16_t bits;
};
struct bf16_t {
  uint16_t bits;
};

// ---- scalar conversions ----------------------------------------------------------------------------

inline float to_f32(float x) { return x; }

inline float to_f32(half_t h) {
  const uint32_t shifted_exp = 0x7C00u << 13;
  uint32_t o = (static_cast<uint32_t>(h.bits) & 0x7FFFu) << 13;
  const uint32_t exp = shifted_exp & o;
  o += (127u - 15u) << 23;
  if (exp == shifted_exp) {
    o += (128u - 16u) << 23;  // Inf/NaN
  } else if (exp == 0) {      // zero / subnormal: renormalize through a float subtraction
    o += 1u << 23;
    o = as_bits(from_bits(o) - from_bits(113u << 23));
  }
  return from_bits(o | ((static_cast<uint32_t>(h.bits) & 0x8000u) << 16));
}

inline float to_f32(bf16_t b) { return from_bits(static_cast<uint32_t>(b.bits) << 16); }

inline void from_f32(float x, float* out) { *out = x; }

inline void from_f32(float x, half_t* out) {
  const uint32_t f32_inf = 255u << 23;
  const uint32_t f16_max = (127u + 16u) << 23;
  const uint32_t denorm_magic = ((127u - 15u) + (23u - 10u) + 1u) << 23;
  uint32_t u = as_bits(x);
  const uint32_t sign = u & 0x80000000u;
  u ^= sign;
  uint32_t o;
  if (u >= f16_max) {
    o = u > f32_inf ? 0x7E00u : 0x7C00u;
  } else if (u < (113u << 23)) {  // result is subnormal or zero: the float addition rounds it
    o = as_bits(from_bits(u) + from_bits(denorm_magic)) - denorm_magic;
  } else {
    const uint32_t mant_odd = (u >> 13) & 1u;
    u += (static_cast<uint32_t>(15 - 127) << 23) + 0xFFFu + mant_odd;
    o = u >> 13;
  }
  out->bits = static_cast<uint16_t>(o | (sign >> 16));
}

inline void from_f32(float x, bf16_t* out) {
  const uint32_t u = as_bits(x);
  out->bits = x != x ? uint16_t{0x7FC0} : static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

#if RWP_CPU_AVX2

// ---- eight-lane types ------------------------------------------------------------------------------

struct V8u {
  __m256i v;
  V8u() = default;
  V8u(__m256i x) : v(x) {}
  V8u(uint32_t x) : v(_mm256_set1_epi32(static_cast<int32_t>(x))) {}
};
struct V8f {
  __m256 v;
  V8f() = default;
  V8f(__m256 x) : v(x) {}
  V8f(float x) : v(_mm256_set1_ps(x)) {}
};
struct M8 {  // lane mask (all bits set where true)
  __m256 m;
};

inline V8u operator^(V8u a, V8u b) { return _mm256_xor_si256(a.v, b.v); }
inline V8u operator^(V8u a, uint32_t b) { return a ^ V8u(b); }
inline V8u operator&(V8u a, uint32_t b) { return _mm256_and_si256(a.v, V8u(b).v); }
inline V8u operator|(V8u a, uint32_t b) { return _mm256_or_si256(a.v, V8u(b).v); }
inline V8u operator+(V8u a, V8u b) { return _mm256_add_epi32(a.v, b.v); }
inline V8u operator+(V8u a, uint32_t b) { return a + V8u(b); }
inline V8u operator-(V8u a, uint32_t b) { return _mm256_sub_epi32(a.v, V8u(b).v); }
inline V8u operator>>(V8u a, int s) { return _mm256_srli_epi32(a.v, s); }
inline V8u operator<<(V8u a, int s) { return _mm256_slli_epi32(a.v, s); }

inline V8f operator+(V8f a, V8f b) { return _mm256_add_ps(a.v, b.v); }
inline V8f operator-(V8f a, V8f b) { return _mm256_sub_ps(a.v, b.v); }
inline V8f operator*(V8f a, V8f b) { return _mm256_mul_ps(a.v, b.v); }
inline V8f operator-(V8f a) { return _mm256_xor_ps(a.v, _mm256_set1_ps(-0.0f)); }

inline V8f fmadd(V8f a, V8f b, V8f c) { return _mm256_fmadd_ps(a.v, b.v, c.v); }
inline V8f vsqrt(V8f x) { return _mm256_sqrt_ps(x.v); }
inline M8 less(V8f a, V8f b) { return {_mm256_cmp_ps(a.v, b.v, _CMP_LT_OQ)}; }
inline V8f select(M8 m, V8f a, V8f b) { return _mm256_blendv_ps(b.v, a.v, m.m); }
inline M8 nonzero(V8u x) {
  const __m256i zero = _mm256_cmpeq_epi32(x.v, _mm256_setzero_si256());
  return {_mm256_castsi256_ps(_mm256_xor_si256(zero, _mm256_set1_epi32(-1)))};
}
inline V8u mask_bits(M8 m) { return _mm256_castps_si256(m.m); }
inline V8f to_float(V8u x) { return _mm256_cvtepi32_ps(x.v); }
inline V8u as_bits(V8f x) { return _mm256_castps_si256(x.v); }
inline V8f from_bits(V8u x) { return _mm256_castsi256_ps(x.v); }

inline void mulhilo(V8u a, uint32_t m, V8u& hi, V8u& lo) {
  const __m256i mv = _mm256_set1_epi32(static_cast<int32_t>(m));
  const __m256i even = _mm256_mul_epu32(a.v, mv);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a.v, 32), mv);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

// Two independent vectors processed in lockstep: interleaving two dependency chains hides the
// latency of Philox's multiply rounds and of the Box-Muller polynomials (measured: 16 blocks at a time
// take 20% less time per normal than 8 with AVX2 on an AMD EPYC; 32 take 12% less than 16 with
// AVX-512 on a Xeon).
template <class T>
struct Pair {
  T a, b;
  Pair() = default;
  Pair(T x, T y) : a(x), b(y) {}
  template <class S>
  Pair(S s) : a(s), b(s) {}
};
template <class T> inline Pair<T> operator^(Pair<T> x, Pair<T> y) { return {x.a ^ y.a, x.b ^ y.b}; }
template <class T> inline Pair<T> operator^(Pair<T> x, uint32_t y) { return {x.a ^ y, x.b ^ y}; }
template <class T> inline Pair<T> operator&(Pair<T> x, uint32_t y) { return {x.a & y, x.b & y}; }
template <class T> inline Pair<T> operator|(Pair<T> x, uint32_t y) { return {x.a | y, x.b | y}; }
template <class T> inline Pair<T> operator+(Pair<T> x, Pair<T> y) { return {x.a + y.a, x.b + y.b}; }
template <class T> inline Pair<T> operator+(Pair<T> x, uint32_t y) { return {x.a + y, x.b + y}; }
template <class T> inline Pair<T> operator-(Pair<T> x, uint32_t y) { return {x.a - y, x.b - y}; }
template <class T> inline Pair<T> operator-(Pair<T> x, Pair<T> y) { return {x.a - y.a, x.b - y.b}; }
template <class T> inline Pair<T> operator*(Pair<T> x, Pair<T> y) { return {x.a * y.a, x.b * y.b}; }
template <class T> inline Pair<T> operator>>(Pair<T> x, int s) { return {x.a >> s, x.b >> s}; }
template <class T> inline Pair<T> operator<<(Pair<T> x, int s) { return {x.a << s, x.b << s}; }
template <class T> inline Pair<T> fmadd(Pair<T> x, Pair<T> y, Pair<T> z) { return {fmadd(x.a, y.a, z.a), fmadd(x.b, y.b, z.b)}; }
template <class T> inline Pair<T> vsqrt(Pair<T> x) { return {vsqrt(x.a), vsqrt(x.b)}; }
template <class T> inline auto less(Pair<T> x, Pair<T> y) { return Pair<decltype(less(x.a, y.a))>{less(x.a, y.a), less(x.b, y.b)}; }
template <class M, class T> inline Pair<T> select(Pair<M> m, Pair<T> x, Pair<T> y) { return {select(m.a, x.a, y.a), select(m.b, x.b, y.b)}; }
template <class T> inline auto nonzero(Pair<T> x) { return Pair<decltype(nonzero(x.a))>{nonzero(x.a), nonzero(x.b)}; }
template <class M> inline auto mask_bits(Pair<M> m) { return Pair<decltype(mask_bits(m.a))>{mask_bits(m.a), mask_bits(m.b)}; }
template <class T> inline auto to_float(Pair<T> x) { return Pair<decltype(to_float(x.a))>{to_float(x.a), to_float(x.b)}; }
template <class T> inline auto as_bits(Pair<T> x) { return Pair<decltype(as_bits(x.a))>{as_bits(x.a), as_bits(x.b)}; }
template <class T> inline auto from_bits(Pair<T> x) { return Pair<decltype(from_bits(x.a))>{from_bits(x.a), from_bits(x.b)}; }
template <class T> inline void mulhilo(Pair<T> x, uint32_t m, Pair<T>& hi, Pair<T>& lo) {
  mulhilo(x.a, m, hi.a, lo.a);
  mulhilo(x.b, m, hi.b, lo.b);
}

inline V8f load8(const float* p) { return _mm256_loadu_ps(p); }
inline V8f load8(const half_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline V8f load8(const bf16_t* p) {
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
inline __m128i pack_lanes(half_t*, V8f x) { return _mm256_cvtps_ph(x.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline __m128i pack_lanes(bf16_t*, V8f x) {
  const __m256i u = _mm256_castps_si256(x.v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x.v, x.v, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
  return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}
inline void store_lanes(float* p, V8f x) { _mm256_storeu_ps(p, x.v); }
template <class T>
inline void store_lanes(T* p, V8f x) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), pack_lanes(p, x));
}
// Non-temporal stores (p aligned to the vector's size): for data the next op reads from memory anyway.
inline void store_nontemporal(float* p, V8f x) { _mm256_stream_ps(p, x.v); }
template <class T>
inline void store_nontemporal(T* p, V8f x) {
  _mm_stream_si128(reinterpret_cast<__m128i*>(p), pack_lanes(p, x));
}

// Stores the normals of eight consecutive Philox blocks (lane i of z_j is normal j of block i) in
// noise order: 32 floats.
inline void store_blocks(float* out, V8f z0, V8f z1, V8f z2, V8f z3) {
  const __m256 t0 = _mm256_unpacklo_ps(z0.v, z1.v);  // blocks 0,1 | 4,5: z0 z1 pairs
  const __m256 t1 = _mm256_unpackhi_ps(z0.v, z1.v);  // blocks 2,3 | 6,7
  const __m256 t2 = _mm256_unpacklo_ps(z2.v, z3.v);
  const __m256 t3 = _mm256_unpackhi_ps(z2.v, z3.v);
  const __m256 b04 = _mm256_shuffle_ps(t0, t2, 0x44);  // block 0 | block 4
  const __m256 b15 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 b26 = _mm256_shuffle_ps(t1, t3, 0x44);
  const __m256 b37 = _mm256_shuffle_ps(t1, t3, 0xEE);
  _mm256_storeu_ps(out, _mm256_permute2f128_ps(b04, b15, 0x20));
  _mm256_storeu_ps(out + 8, _mm256_permute2f128_ps(b26, b37, 0x20));
  _mm256_storeu_ps(out + 16, _mm256_permute2f128_ps(b04, b15, 0x31));
  _mm256_storeu_ps(out + 24, _mm256_permute2f128_ps(b26, b37, 0x31));
}

// Lane i holds the 32-bit words of q + i (low word, high word).
inline void block_counters(uint64_t q, V8u& lo, V8u& hi) {
  const uint32_t lo0 = static_cast<uint32_t>(q);
  const uint32_t hi0 = static_cast<uint32_t>(q >> 32);
  lo = V8u(lo0) + V8u(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  if (lo0 <= 0xFFFFFFF8u) {
    hi = V8u(hi0);
  } else {  // the low word wraps inside this group
    alignas(32) uint32_t h[8];
    for (int i = 0; i < 8; ++i) h[i] = static_cast<uint32_t>((q + i) >> 32);
    hi = V8u(_mm256_load_si256(reinterpret_cast<const __m256i*>(h)));
  }
}


#if RWP_CPU_AVX512

// ---- sixteen-lane types ----------------------------------------------------------------------------

struct V16u {
  __m512i v;
  V16u() = default;
  V16u(__m512i x) : v(x) {}
  V16u(uint32_t x) : v(_mm512_set1_epi32(static_cast<int32_t>(x))) {}
};
struct V16f {
  __m512 v;
  V16f() = default;
  V16f(__m512 x) : v(x) {}
  V16f(float x) : v(_mm512_set1_ps(x)) {}
};
struct M16 {
  __mmask16 m;
};

inline V16u operator^(V16u a, V16u b) { return _mm512_xor_si512(a.v, b.v); }
inline V16u operator^(V16u a, uint32_t b) { return a ^ V16u(b); }
inline V16u operator&(V16u a, uint32_t b) { return _mm512_and_si512(a.v, V16u(b).v); }
inline V16u operator|(V16u a, uint32_t b) { return _mm512_or_si512(a.v, V16u(b).v); }
inline V16u operator+(V16u a, V16u b) { return _mm512_add_epi32(a.v, b.v); }
inline V16u operator+(V16u a, uint32_t b) { return a + V16u(b); }
inline V16u operator-(V16u a, uint32_t b) { return _mm512_sub_epi32(a.v, V16u(b).v); }
inline V16u operator>>(V16u a, int s) { return _mm512_srli_epi32(a.v, s); }
inline V16u operator<<(V16u a, int s) { return _mm512_slli_epi32(a.v, s); }

inline V16f operator+(V16f a, V16f b) { return _mm512_add_ps(a.v, b.v); }
inline V16f operator-(V16f a, V16f b) { return _mm512_sub_ps(a.v, b.v); }
inline V16f operator*(V16f a, V16f b) { return _mm512_mul_ps(a.v, b.v); }
inline V16f operator-(V16f a) { return _mm512_xor_ps(a.v, _mm512_set1_ps(-0.0f)); }

inline V16f fmadd(V16f a, V16f b, V16f c) { return _mm512_fmadd_ps(a.v, b.v, c.v); }
inline V16f vsqrt(V16f x) { return _mm512_sqrt_ps(x.v); }
inline M16 less(V16f a, V16f b) { return {_mm512_cmp_ps_mask(a.v, b.v, _CMP_LT_OQ)}; }
inline V16f select(M16 m, V16f a, V16f b) { return _mm512_mask_blend_ps(m.m, b.v, a.v); }
inline M16 nonzero(V16u x) { return {_mm512_test_epi32_mask(x.v, x.v)}; }
inline V16u mask_bits(M16 m) { return _mm512_movm_epi32(m.m); }
inline V16f to_float(V16u x) { return _mm512_cvtepi32_ps(x.v); }
inline V16u as_bits(V16f x) { return _mm512_castps_si512(x.v); }
inline V16f from_bits(V16u x) { return _mm512_castsi512_ps(x.v); }

// The 64-bit products of the even and of the odd lanes, then one two-source permute gathers each half.
inline void mulhilo(V16u a, uint32_t m, V16u& hi, V16u& lo) {
  const __m512i mv = _mm512_set1_epi32(static_cast<int32_t>(m));
  const __m512i even = _mm512_mul_epu32(a.v, mv);
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a.v, 32), mv);
  const __m512i lo_idx = _mm512_setr_epi32(0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30);
  const __m512i hi_idx = _mm512_setr_epi32(1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
  lo = _mm512_permutex2var_epi32(even, lo_idx, odd);
  hi = _mm512_permutex2var_epi32(even, hi_idx, odd);
}

inline V16f load16(const float* p) { return _mm512_loadu_ps(p); }
inline V16f load16(const half_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline V16f load16(const bf16_t* p) {
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}
inline __m256i pack_lanes(half_t*, V16f x) {
  return _mm512_cvtps_ph(x.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
inline __m256i pack_lanes(bf16_t*, V16f x) {
  const __m512i u = _mm512_castps_si512(x.v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  r = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(x.v, x.v, _CMP_UNORD_Q), r, _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
}
inline void store_lanes(float* p, V16f x) { _mm512_storeu_ps(p, x.v); }
template <class T>
inline void store_lanes(T* p, V16f x) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), pack_lanes(p, x));
}
inline void store_nontemporal(float* p, V16f x) { _mm512_stream_ps(p, x.v); }
template <class T>
inline void store_nontemporal(T* p, V16f x) {
  _mm256_stream_si256(reinterpret_cast<__m256i*>(p), pack_lanes(p, x));
}

// Stores the normals of sixteen consecutive Philox blocks (lane i of z_j is normal j of block i) in
// noise order: 64 floats. Within each 128-bit lane k the unpacks and shuffles build blocks 4k .. 4k+3,
// then a 4x4 transpose of the 128-bit lanes puts the blocks in order.
inline void store_blocks(float* out, V16f z0, V16f z1, V16f z2, V16f z3) {
  const __m512 t0 = _mm512_unpacklo_ps(z0.v, z1.v);
  const __m512 t1 = _mm512_unpackhi_ps(z0.v, z1.v);
  const __m512 t2 = _mm512_unpacklo_ps(z2.v, z3.v);
  const __m512 t3 = _mm512_unpackhi_ps(z2.v, z3.v);
  const __m512 b0 = _mm512_shuffle_ps(t0, t2, 0x44);  // lane k: block 4k
  const __m512 b1 = _mm512_shuffle_ps(t0, t2, 0xEE);  // block 4k + 1
  const __m512 b2 = _mm512_shuffle_ps(t1, t3, 0x44);
  const __m512 b3 = _mm512_shuffle_ps(t1, t3, 0xEE);
  const __m512 u0 = _mm512_shuffle_f32x4(b0, b1, 0x44);  // b0.0 b0.1 b1.0 b1.1
  const __m512 u1 = _mm512_shuffle_f32x4(b0, b1, 0xEE);  // b0.2 b0.3 b1.2 b1.3
  const __m512 u2 = _mm512_shuffle_f32x4(b2, b3, 0x44);
  const __m512 u3 = _mm512_shuffle_f32x4(b2, b3, 0xEE);
  _mm512_storeu_ps(out, _mm512_shuffle_f32x4(u0, u2, 0x88));  // blocks 0-3
  _mm512_storeu_ps(out + 16, _mm512_shuffle_f32x4(u0, u2, 0xDD));
  _mm512_storeu_ps(out + 32, _mm512_shuffle_f32x4(u1, u3, 0x88));
  _mm512_storeu_ps(out + 48, _mm512_shuffle_f32x4(u1, u3, 0xDD));
}

// Lane i holds the 32-bit words of q + i (low word, high word).
inline void block_counters(uint64_t q, V16u& lo, V16u& hi) {
  const uint32_t lo0 = static_cast<uint32_t>(q);
  lo = V16u(lo0) + V16u(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  if (lo0 <= 0xFFFFFFF0u) {
    hi = V16u(static_cast<uint32_t>(q >> 32));
  } else {  // the low word wraps inside this group
    alignas(64) uint32_t h[16];
    for (int i = 0; i < 16; ++i) h[i] = static_cast<uint32_t>((q + i) >> 32);
    hi = V16u(_mm512_load_si512(h));
  }
}

using VecF = V16f;
using VecU = V16u;
constexpr int kLanes = 16;

#else

using VecF = V8f;
using VecU = V8u;
constexpr int kLanes = 8;

#endif  // RWP_CPU_AVX512

#else

using VecF = float;
constexpr int kLanes = 1;

#endif

// load<F>(p): one float (F = float) or kLanes floats (F = VecF) from storage of type T.
template <class F, class T>
inline F load(const T* p) {
  if constexpr (sizeof(F) == sizeof(float)) {
    return to_f32(*p);
#if RWP_CPU_AVX512
  } else if constexpr (sizeof(F) == sizeof(V16f)) {
    return load16(p);
#endif
  } else {
    return load8(p);
  }
}

template <class F, class T>
inline void store(T* p, F x) {
  if constexpr (sizeof(F) == sizeof(float)) {
    from_f32(x, p);
  } else {
    store_lanes(p, x);
  }
}

// Runs body.template operator()<F, NonTemporal>(i) over [0, n): with F = VecF on groups of kLanes elements,
// with F = float on the rest. The split depends only on n, and with Aligned on the address of
// anchor + i: NonTemporal is true on the vector groups, whose anchor + i is then aligned to the vector's bytes (for
// non-temporal stores). Never on the thread count.
template <bool Aligned = false, class T = float, class Body>
inline void for_lanes(int64_t n, Body&& body, const T* anchor = nullptr) {
  int64_t i = 0;
  if constexpr (kLanes > 1) {
    if constexpr (Aligned) {
      constexpr uintptr_t align = kLanes * sizeof(T);  // what the vector's non-temporal store needs
      const int64_t head = std::min<int64_t>(n, (align - reinterpret_cast<uintptr_t>(anchor) % align) % align / sizeof(T));
      for (; i < head; ++i) body.template operator()<float, false>(i);
      if (reinterpret_cast<uintptr_t>(anchor + i) % align == 0) {
        for (; i + kLanes <= n; i += kLanes) body.template operator()<VecF, true>(i);
      }
    }
    for (; i + kLanes <= n; i += kLanes) body.template operator()<VecF, false>(i);
  }
  for (; i < n; ++i) body.template operator()<float, false>(i);
}

template <bool NonTemporal, class F, class T>
inline void store_nt(T* p, F x) {
  if constexpr (NonTemporal && sizeof(F) != sizeof(float)) {
    store_nontemporal(p, x);
  } else {
    store(p, x);
  }
}

}  // namespace rwp::cpu
