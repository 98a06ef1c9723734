// Shared math of the C++ CPU and CUDA kernels: Philox4x32-10, the uint32 -> uniform conversion,
// Box-Muller, and the per-element perturb / restore / gradient-mix / SGD formulas.
//
// Everything is a template over the lane type, so one definition serves every instantiation:
//   float / uint32_t on the GPU, float / uint32_t on the CPU (row ends, scalar builds) and the AVX2 and
//   AVX-512 lane types of cpu/cpu_vec.h. The CPU tests therefore execute the very code the GPU runs.
// Every multiply-add that is meant to be fused is an explicit fma and nothing else may be
// contracted (-ffp-contract=off on the host, --fmad=false for nvcc), so all instantiations
// produce the same bits.
//
// The noise stream (see rwp_kernels/stream.py): element e of a parameter is lane e % 4 of the Philox block
// with counter (q mod 2^32, q >> 32, param_index, step mod 2^32), q = e / 4, and key (k0, k1).
// u(x) = (x >> 8) * 2^-24 + 2^-25;  (z0, z1) = BoxMuller(u(x0), u(x1)), (z2, z3) = BoxMuller(u(x2), u(x3)).
#pragma once

#include <stdint.h>

#include <cmath>
#include <cstring>

#if defined(__CUDACC__)
#define RWP_HD __host__ __device__ __forceinline__
#else
#define RWP_HD inline
#endif

namespace rwp {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;
constexpr int kPhiloxRounds = 10;
constexpr int kNormalsPerBlock = 4;
constexpr double kNormEps = 1e-16;  // sigma of a 0-D/1-D parameter: gamma * (||w|| + kNormEps)

// ---- scalar primitives (the AVX2 lane types provide the same names) -------------------------------

RWP_HD float fmadd(float a, float b, float c) { return fmaf(a, b, c); }
#if defined(__CUDA_ARCH__)
// sqrtf for x = +-0 and x >= 2^-100 (the noise's -2 ln u): the fast path of nvcc's correctly rounded square root
// (sqrt.rn.f32: an approximate reciprocal root, then one Newton step), instruction for instruction, without its
// range check and the branch to its slow path (zero, subnormals, infinities, NaN). The approximation is taken of
// max(x, 2^-100), so a zero comes out as itself, sign included. tests/test_ext_cuda.py compares the SASS.
RWP_HD float vsqrt(float x) {
  float root;
  asm("{\n\t.reg .f32 rsq, y, half_rsq, err;\n\t"
      "max.f32 rsq, %1, 0f0D800000;\n\t"
      "rsqrt.approx.ftz.f32 rsq, rsq;\n\t"
      "mul.ftz.f32 y, %1, rsq;\n\t"
      "mul.ftz.f32 half_rsq, rsq, 0f3F000000;\n\t"
      "neg.f32 err, y;\n\t"
      "fma.rn.f32 err, err, y, %1;\n\t"
      "fma.rn.f32 %0, err, half_rsq, y;\n\t}"
      : "=f"(root)
      : "f"(x));
  return root;
}
#else
RWP_HD float vsqrt(float x) { return sqrtf(x); }
#endif
RWP_HD bool less(float a, float b) { return a < b; }
RWP_HD float select(bool m, float a, float b) { return m ? a : b; }
RWP_HD uint32_t select(bool m, uint32_t a, uint32_t b) { return m ? a : b; }
RWP_HD bool nonzero(uint32_t x) { return x != 0u; }
// -1 (all bits) where m holds, else 0, as an unsigned word.
RWP_HD uint32_t mask_bits(bool m) { return m ? 0xFFFFFFFFu : 0u; }
RWP_HD float to_float(uint32_t x) { return static_cast<float>(static_cast<int32_t>(x)); }
RWP_HD uint32_t as_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
#endif
}
RWP_HD float from_bits(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
#endif
}
// High and low 32-bit words of the 64-bit product a * m (one IMAD.WIDE.U32 on the GPU, where __umulhi plus a
// low multiply would take two).
RWP_HD void mulhilo(uint32_t a, uint32_t m, uint32_t& hi, uint32_t& lo) {
  const uint64_t p = static_cast<uint64_t>(a) * m;
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
}

// ---- Philox4x32-10 ---------------------------------------------------------------------------------

// The key of round r of Philox4x32-10 is (k0 + r * W0, k1 + r * W1) mod 2^32. PhiloxKey adds it up round by
// round; PhiloxRoundKeys holds all ten, computed once (NoiseKey::rounds: the CUDA kernels read them from their
// parameters, so that no round of any block spends an instruction on them).
struct PhiloxKey {
  uint32_t k0, k1;
};

struct PhiloxRoundKeys {
  uint32_t k0[kPhiloxRounds], k1[kPhiloxRounds];
};

// One round on the counter words c0..c3 (lane type U: uint32_t or a vector of lanes) with the round's key.
template <class U>
RWP_HD void philox_round(U& c0, U& c1, U& c2, U& c3, uint32_t k0, uint32_t k1) {
  U hi0, lo0, hi1, lo1;
  mulhilo(c0, kPhiloxM0, hi0, lo0);
  mulhilo(c2, kPhiloxM1, hi1, lo1);
  const U n0 = hi1 ^ c1 ^ k0;
  const U n2 = hi0 ^ c3 ^ k1;
  c0 = n0;
  c1 = lo1;
  c2 = n2;
  c3 = lo0;
}

// Ten rounds with the uniform key; the output replaces the counter.
template <class U>
RWP_HD void philox4x32_10(U& c0, U& c1, U& c2, U& c3, PhiloxKey key) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int r = 0; r < kPhiloxRounds; ++r) {
    philox_round(c0, c1, c2, c3, key.k0, key.k1);
    key.k0 += kPhiloxW0;
    key.k1 += kPhiloxW1;
  }
}

template <class U>
RWP_HD void philox4x32_10(U& c0, U& c1, U& c2, U& c3, const PhiloxRoundKeys& keys) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int r = 0; r < kPhiloxRounds; ++r) philox_round(c0, c1, c2, c3, keys.k0[r], keys.k1[r]);
}

inline PhiloxRoundKeys philox_round_keys(PhiloxKey key) {
  PhiloxRoundKeys out;
  for (int r = 0; r < kPhiloxRounds; ++r) {
    out.k0[r] = key.k0 + static_cast<uint32_t>(r) * kPhiloxW0;
    out.k1[r] = key.k1 + static_cast<uint32_t>(r) * kPhiloxW1;
  }
  return out;
}

// ---- uniforms and Box-Muller -----------------------------------------------------------------------

// u = (x >> 8) * 2^-24 + 2^-25, one rounding: the product is exact, so fma == multiply-then-add.
template <class U, class F = decltype(to_float(U()))>
RWP_HD F uniform(U x) {
  return fmadd(to_float(x >> 8), F(5.9604644775390625e-08f), F(2.98023223876953125e-08f));
}

// Natural logarithm for x in (0, 1] (Cephes logf: reduction to [sqrt(1/2), sqrt(2)) and a degree-9
// polynomial; max relative error ~1e-7). No special cases: the noise stream's uniforms are normal numbers.
template <class F>
RWP_HD F log_unit(F x) {
  using U = decltype(as_bits(x));
  const U bits = as_bits(x);
  const F m = from_bits((bits & 0x007FFFFFu) | 0x3F000000u);  // x = m * 2^e, m in [0.5, 1)
  const auto small = less(m, F(0.707106781186547524f));
  const U e = (bits >> 23) - 126u + mask_bits(small);          // e - 1 where m < sqrt(1/2)
  const F fe = to_float(e);
  const F t = (m - F(1.0f)) + select(small, m, F(0.0f));        // exact: 2m - 1 or m - 1
  const F z = t * t;
  F p = F(7.0376836292e-2f);
  p = fmadd(p, t, F(-1.1514610310e-1f));
  p = fmadd(p, t, F(1.1676998740e-1f));
  p = fmadd(p, t, F(-1.2420140846e-1f));
  p = fmadd(p, t, F(1.4249322787e-1f));
  p = fmadd(p, t, F(-1.6668057665e-1f));
  p = fmadd(p, t, F(2.0000714765e-1f));
  p = fmadd(p, t, F(-2.4999993993e-1f));
  p = fmadd(p, t, F(3.3333331174e-1f));
  F y = (p * t) * z;
  y = fmadd(fe, F(-2.12194440e-4f), y);
  y = fmadd(z, F(-0.5f), y);
  return fmadd(fe, F(0.693359375f), t + y);
}

// (cos(2 pi u), sin(2 pi u)) for u in [0, 1]: u = k/4 + w with |w| <= 1/8 (exact for the noise stream's
// uniforms, which are multiples of 2^-25), Cephes sinf/cosf polynomials on [-pi/4, pi/4], quadrant k.
template <class F>
RWP_HD void sincos_2pi(F u, F& c, F& s) {
  using U = decltype(as_bits(u));
  // k = u * 4 rounded to the nearest integer, ties to even: adding 1.5 * 2^23 to u * 4 (exact, in [0, 4]) rounds
  // at the units place, and the sum's low mantissa bits are k (no float-int conversion).
  const F shifted = fmadd(u, F(4.0f), F(12582912.0f));
  const U q = as_bits(shifted);
  const F k = shifted - F(12582912.0f);
  const F th = fmadd(k, F(-0.25f), u) * F(6.28318530717958647692f);  // u - k/4, exact
  const F z = th * th;
  F ps = fmadd(F(-1.9515295891e-4f), z, F(8.3321608736e-3f));
  ps = fmadd(ps, z, F(-1.6666654611e-1f));
  const F sr = fmadd(ps * z, th, th);
  F pc = fmadd(F(2.443315711809948e-5f), z, F(-1.388731625493765e-3f));
  pc = fmadd(pc, z, F(4.166664568298827e-2f));
  const F cr = fmadd(pc * z, z, fmadd(F(-0.5f), z, F(1.0f)));
  // Rotate by k quarter turns: odd k swaps cos and sin; the signs follow the quadrant.
  const auto odd = nonzero(q & 1u);
  const F cs = select(odd, sr, cr);
  const F sn = select(odd, cr, sr);
  c = from_bits(as_bits(cs) ^ (((q + 1u) & 2u) << 30));
  s = from_bits(as_bits(sn) ^ ((q & 2u) << 30));
}

// Two standard normals from two Philox words.
template <class U, class F = decltype(to_float(U()))>
RWP_HD void box_muller(U xa, U xb, F& za, F& zb) {
  const F r = vsqrt(F(-2.0f) * log_unit(uniform(xa)));
  F c, s;
  sincos_2pi(uniform(xb), c, s);
  za = r * c;
  zb = r * s;
}

// The four normals of Philox block q of a parameter's stream (Keys: PhiloxKey or PhiloxRoundKeys).
template <class U, class Keys, class F = decltype(to_float(U()))>
RWP_HD void normal_block(U q_lo, U q_hi, uint32_t param_index, uint32_t step, const Keys& keys, F& z0, F& z1, F& z2,
                         F& z3) {
  U c0 = q_lo, c1 = q_hi, c2 = U(param_index), c3 = U(step);
  philox4x32_10(c0, c1, c2, c3, keys);
  box_muller(c0, c1, z0, z1);
  box_muller(c2, c3, z2, z3);
}

// ---- per-row noise scale ---------------------------------------------------------------------------

// unscaled_sigma: gamma times the norm (plus kNormEps for a 0-D/1-D parameter); fisher_scaled divides it by
// sqrt(1 + eta * fisher_sum), in double.
RWP_HD double unscaled_sigma(double sumsq, double gamma, bool whole_tensor) {
  const double norm = sqrt(sumsq);
  return whole_tensor ? gamma * (norm + kNormEps) : gamma * norm;
}

RWP_HD double fisher_scaled(double sigma, double fisher_sum, double eta) {
  return sigma / sqrt(1.0 + eta * fisher_sum);
}

// sigma of one row from its sum of squares (and, with an ARWP Fisher state, the row's Fisher sum),
// in double and rounded once, as the reference computes it. `whole_tensor`: a 0-D/1-D parameter.
RWP_HD float row_sigma(double sumsq, double gamma, bool whole_tensor, bool adaptive, double fisher_sum,
                       double eta) {
  double sigma = unscaled_sigma(sumsq, gamma, whole_tensor);
  if (adaptive) sigma = fisher_scaled(sigma, fisher_sum, eta);
  return static_cast<float>(sigma);
}

// ---- per-element updates (F: float or a vector of lanes) ------------------------------------------------
// The noise and gradient-mix formulas follow the reference op for op (no fusion), so with the same
// noise they give the same bits; the SGD update fuses where ATen's vectorized add(alpha=) does.

template <class F>
RWP_HD F add_noise(F w, F sigma, F z) { return w + sigma * z; }

template <class F>
RWP_HD F remove_noise(F w, F sigma, F z) { return w - sigma * z; }

// The uniform scalars of the gradient mix: F <- beta*F + (g*fisher_scale)^2, g <- g*grad_scale + c*clean_scale.
struct MixScalars {
  float grad_scale, fisher_scale, clean_scale, beta;
};

template <class F>
RWP_HD F fisher_update(F fisher, F g, const MixScalars& m) {
  const F t = g * F(m.fisher_scale);
  return F(m.beta) * fisher + t * t;
}

template <class F>
RWP_HD F mix_grad(F g, F clean, bool has_clean, const MixScalars& m) {
  const F scaled = g * F(m.grad_scale);
  return has_clean ? scaled + clean * F(m.clean_scale) : scaled;
}

// torch.optim.SGD's hyperparameters as its kernels see them (float32, 1 - dampening rounded once).
struct SgdScalars {
  float lr, momentum, one_minus_dampening, weight_decay;
  bool nesterov, maximize, first_step, has_momentum;
};

// One element of torch.optim.SGD's step with the (already mixed) gradient g.
template <class F>
RWP_HD void sgd_update(F& w, F& buf, F g, const SgdScalars& s) {
  if (s.maximize) g = -g;
  if (s.weight_decay != 0.0f) g = fmadd(w, F(s.weight_decay), g);
  if (s.has_momentum) {
    buf = s.first_step ? g : fmadd(g, F(s.one_minus_dampening), buf * F(s.momentum));
    g = s.nesterov ? fmadd(buf, F(s.momentum), g) : buf;
  }
  w = fmadd(g, F(-s.lr), w);
}

}  // namespace rwp
