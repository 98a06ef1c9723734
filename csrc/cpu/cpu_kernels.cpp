// CPU kernels: one pass over all parameters of a call, parallel over work units (tiles of rows for
// perturb_, chunks of elements otherwise) with at::parallel_for. A unit is always processed whole by
// one thread in a fixed order, so results do not depend on the number of threads.
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstring>

#include "../rwp_api.h"
#include "cpu_vec.h"

namespace rwp::cpu {
namespace {

constexpr int64_t kNoiseChunk = 1024;  // normals generated at a time, into an L1-resident buffer
constexpr int64_t kRowBuffer = 8192;   // perturb_: rows up to this length get their noise first (see below)

// Runs fn(unit) for every unit in [0, units): threads take units from a shared counter.
template <class Fn>
void parallel_units(int64_t units, const Fn& fn) {
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), units);
  if (threads <= 1 || at::in_parallel_region()) {
    for (int64_t u = 0; u < units; ++u) fn(u);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t u; (u = next.fetch_add(1, std::memory_order_relaxed)) < units;) fn(u);
  });
}


// ---- the noise stream ------------------------------------------------------------------------------

struct ParamNoise {
  uint32_t param_index;
  NoiseKey key;
};

void scalar_block(uint64_t q, const ParamNoise& s, float z[4]) {
  normal_block(static_cast<uint32_t>(q), static_cast<uint32_t>(q >> 32), s.param_index, s.key.step, s.key.key(), z[0],
               z[1], z[2], z[3]);
}

// Spreads prefetches of the bytes [next, end) over the iterations of a compute-bound loop, so that
// the memory reads of the following pass overlap the computation; a call covers 64 normals' worth.
struct Prefetcher {
  const char* next;
  const char* end;
  int64_t bytes_per_call;
  void advance(int64_t calls = 1) {
    for (const char* stop = std::min(next + calls * bytes_per_call, end); next < stop; next += 64)
      __builtin_prefetch(next, 0, 3);
  }
};

#if RWP_CPU_AVX2
// The normals of the Philox blocks q, q + 1, ... (one per lane of U) into out, in noise order.
template <class U>
void vector_blocks(float* out, uint64_t q, const ParamNoise& s) {
  U lo, hi;
  block_counters(q, lo, hi);
  decltype(to_float(lo)) z0, z1, z2, z3;
  normal_block(lo, hi, s.param_index, s.key.step, s.key.key(), z0, z1, z2, z3);
  store_blocks(out, z0, z1, z2, z3);
}

// The same for two vectors' worth of blocks, computed in lockstep.
template <class U>
void vector_block_pairs(float* out, uint64_t q, const ParamNoise& s) {
  constexpr int kBlocks = sizeof(U) / sizeof(uint32_t);
  Pair<U> lo, hi;
  block_counters(q, lo.a, hi.a);
  block_counters(q + kBlocks, lo.b, hi.b);
  Pair<decltype(to_float(lo.a))> z0, z1, z2, z3;
  normal_block(lo, hi, s.param_index, s.key.step, s.key.key(), z0, z1, z2, z3);
  store_blocks(out, z0.a, z1.a, z2.a, z3.a);
  store_blocks(out + 4 * kBlocks, z0.b, z1.b, z2.b, z3.b);
}
#endif

// out[i] = normal of element e + i of the noise stream, i in [0, n). Two vectors of blocks at a time with the
// widest lane type, then single vectors of the narrower ones, a block at a time (the GPU's code path)
// at the ends; all give the same bits.
void fill_normals(float* out, int64_t e, int64_t n, const ParamNoise& s, Prefetcher* pf = nullptr) {
  uint64_t q = static_cast<uint64_t>(e) >> 2;
  auto partial = [&](int from) {
    float z[4];
    scalar_block(q++, s, z);
    const int take = static_cast<int>(std::min<int64_t>(4 - from, n));
    std::memcpy(out, z + from, take * sizeof(float));
    out += take;
    n -= take;
  };
  if (e & 3) partial(static_cast<int>(e & 3));
#if RWP_CPU_AVX2
  constexpr int64_t kPairNormals = 8 * kLanes;  // 2 vectors x kLanes blocks x 4 normals
  for (; n >= kPairNormals; n -= kPairNormals, out += kPairNormals, q += 2 * kLanes) {
    if (pf) pf->advance(kPairNormals / 64);
    vector_block_pairs<VecU>(out, q, s);
  }
#if RWP_CPU_AVX512
  for (; n >= 64; n -= 64, out += 64, q += 16) vector_blocks<V16u>(out, q, s);
#endif
  for (; n >= 32; n -= 32, out += 32, q += 8) vector_blocks<V8u>(out, q, s);
#endif
  while (n > 0) partial(0);
  if (pf) pf->advance(pf->end - pf->next);
}

// dst <- src (n elements) with non-temporal stores where possible: the copy is read back only by a
// later op, so it need not be read into the cache first nor stay there.
template <class T>
void copy_nontemporal(T* dst, const T* src, int64_t n) {
  char* d = reinterpret_cast<char*>(dst);
  const char* s = reinterpret_cast<const char*>(src);
  int64_t bytes = n * static_cast<int64_t>(sizeof(T));
#if RWP_CPU_AVX2
  const int64_t head = std::min<int64_t>(bytes, (32 - reinterpret_cast<uintptr_t>(d) % 32) % 32);
  std::memcpy(d, s, head);
  d += head, s += head, bytes -= head;
  for (; bytes >= 32; bytes -= 32, d += 32, s += 32)
    _mm256_stream_si256(reinterpret_cast<__m256i*>(d), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s)));
#endif
  std::memcpy(d, s, bytes);
}

void nontemporal_fence() {
#if RWP_CPU_AVX2
  _mm_sfence();
#endif
}

// w[i] <- w[i] +/- sigma_i * z[i], i in [0, n); sigma_i = sigma[0], or sigma[i] with per_element.
template <bool Add, class T>
void apply_noise_from(T* w, const float* z, int64_t n, const float* sigma, bool per_element) {
  const float s0 = *sigma;
  for_lanes(n, [&]<class F, bool>(int64_t i) {
    const F sg = per_element ? load<F>(sigma + i) : F(s0);
    const F x = load<F>(w + i);
    const F zz = load<F>(z + i);
    store(w + i, Add ? add_noise(x, sg, zz) : remove_noise(x, sg, zz));
  });
}

// The same with the noise of elements e .. e + n - 1 generated chunk by chunk (w points at element e).
template <bool Add, class T>
void apply_noise(T* w, int64_t e, int64_t n, const float* sigma, bool per_element, const ParamNoise& s) {
  float z[kNoiseChunk];
  for (int64_t c = 0; c < n; c += kNoiseChunk) {
    const int64_t m = std::min(kNoiseChunk, n - c);
    fill_normals(z, e + c, m, s);
    apply_noise_from<Add>(w + c, z, m, per_element ? sigma + c : sigma, per_element);
  }
}

// ---- reductions (double accumulators, fixed order) -------------------------------------------------

template <class T>
double sum_squares(const T* x, int64_t n) {
  int64_t i = 0;
  double s = 0.0;
#if RWP_CPU_AVX2
  __m256d acc[4] = {_mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd()};
  for (; i + 16 <= n; i += 16) {
    for (int h = 0; h < 2; ++h) {
      const __m256 v = load8(x + i + 8 * h).v;
      const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v));
      const __m256d hi = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
      acc[2 * h] = _mm256_fmadd_pd(lo, lo, acc[2 * h]);
      acc[2 * h + 1] = _mm256_fmadd_pd(hi, hi, acc[2 * h + 1]);
    }
  }
  alignas(32) double t[4];
  _mm256_store_pd(t, _mm256_add_pd(_mm256_add_pd(acc[0], acc[1]), _mm256_add_pd(acc[2], acc[3])));
  s = (t[0] + t[1]) + (t[2] + t[3]);
#endif
  for (; i < n; ++i) {
    const double v = to_f32(x[i]);
    s += v * v;
  }
  return s;
}

double sum(const float* x, int64_t n) {
  int64_t i = 0;
  double s = 0.0;
#if RWP_CPU_AVX2
  __m256d a0 = _mm256_setzero_pd(), a1 = _mm256_setzero_pd();
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    a0 = _mm256_add_pd(a0, _mm256_cvtps_pd(_mm256_castps256_ps128(v)));
    a1 = _mm256_add_pd(a1, _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
  }
  alignas(32) double t[4];
  _mm256_store_pd(t, _mm256_add_pd(a0, a1));
  s = (t[0] + t[1]) + (t[2] + t[3]);
#endif
  for (; i < n; ++i) s += x[i];
  return s;
}

// ---- perturb_ --------------------------------------------------------------------------------------

// A unit is a tile of rows. Rows up to kRowBuffer elements: their noise is generated first while the
// row is prefetched, so the compute overlaps the memory reads; then the norm and the update run on
// cached data. Longer rows: a norm pass, then the update with the noise generated chunk by chunk.
template <class T>
void perturb_unit(const ParamEntry& p, int64_t unit, const PerturbArgs& a, float grad_scale, bool scale_grads) {
  const int64_t rows = p.rows;
  const int64_t r0 = (unit - p.first_unit) * p.unit_size;
  const int64_t r1 = std::min(rows, r0 + p.unit_size);
  T* w = static_cast<T*>(p.w);
  T* backup = static_cast<T*>(p.backup);
  const ParamNoise s{p.param_index, a.key};
  const bool adaptive = p.fisher != nullptr;
  const bool buffered = p.gamma != 0.0 && !p.sigma_per_element && p.row_len <= kRowBuffer;
  float* sigmas = a.sigma + p.sigma_offset;
  alignas(64) float z[kRowBuffer];
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t e0 = r * p.row_len, n = p.row_len;
    if (buffered) {
      const char* row = reinterpret_cast<const char*>(w + e0);
      const int64_t bytes = n * static_cast<int64_t>(sizeof(T));
      Prefetcher pf{row, row + bytes, std::max<int64_t>(64, (bytes * 64 / n + 63) / 64 * 64)};
      fill_normals(z, e0, n, s, &pf);
    }
    const double sumsq = sum_squares(w + e0, n);
    if (p.sigma_per_element) {  // one row (the whole tensor) and a Fisher "row" per element
      for (int64_t i = 0; i < n; ++i)
        sigmas[i] = row_sigma(sumsq, p.gamma, true, true, p.fisher[i], p.eta);
    } else {
      const double fsum = adaptive ? sum(p.fisher + e0, n) : 0.0;
      sigmas[r] = row_sigma(sumsq, p.gamma, p.whole_tensor, adaptive, fsum, p.eta);
    }
    if (backup) copy_nontemporal(backup + e0, w + e0, n);
    if (p.gamma == 0.0) continue;
    const float* sigma = p.sigma_per_element ? sigmas : sigmas + r;
    if (buffered) {
      apply_noise_from<true>(w + e0, z, n, sigma, false);
    } else {
      apply_noise<true>(w + e0, e0, n, sigma, p.sigma_per_element, s);
    }
  }
  if (p.grad && scale_grads) {
    T* g = static_cast<T*>(p.grad) + r0 * p.row_len;
    for_lanes((r1 - r0) * p.row_len, [&]<class F, bool>(int64_t i) { store(g + i, load<F>(g + i) * F(grad_scale)); });
  }
  nontemporal_fence();
}

// ---- restore_ and sgd_step_ ------------------------------------------------------------------------

// The scalars are taken by value: as locals, the compiler keeps them in registers (it cannot know that
// stores through the tensor pointers leave a referenced struct unchanged, and would reload them).

// Fisher update from the gradient as it arrives, then the gradient mix, written back to grad.
template <class T>
void mix_range(const ParamEntry& p, int64_t c0, int64_t n, const MixScalars mix) {
  T* g = static_cast<T*>(p.grad) + c0;
  const T* clean = p.clean ? static_cast<const T*>(p.clean) + c0 : nullptr;
  float* fisher = p.fisher ? p.fisher + c0 : nullptr;
  for_lanes(n, [&]<class F, bool>(int64_t i) {
    const F gi = load<F>(g + i);
    if (fisher) store(fisher + i, fisher_update(load<F>(fisher + i), gi, mix));
    store(g + i, mix_grad(gi, clean ? load<F>(clean + i) : F(0.0f), clean != nullptr, mix));
  });
}

template <class T>
void restore_unit(const ParamEntry& p, int64_t unit, const RestoreArgs& a, const MixScalars mix) {
  const int64_t c0 = (unit - p.first_unit) * p.unit_size;
  const int64_t c1 = std::min(p.numel, c0 + p.unit_size);
  T* w = static_cast<T*>(p.w);
  if (p.backup) {
    std::memcpy(w + c0, static_cast<const T*>(p.backup) + c0, (c1 - c0) * sizeof(T));
  } else {
    const ParamNoise s{p.param_index, a.key};
    const float* sigmas = a.sigma + p.sigma_offset;
    for (int64_t e = c0; e < c1;) {  // row by row: sigma is per row (or per element)
      const int64_t r = e / p.row_len;
      const int64_t end = std::min(c1, (r + 1) * p.row_len);
      const float* sigma = p.sigma_per_element ? sigmas + e : sigmas + r;
      apply_noise<false>(w + e, e, end - e, sigma, p.sigma_per_element, s);
      e = end;
    }
  }
  if (p.grad) mix_range<T>(p, c0, c1 - c0, mix);
}

template <class T>
void sgd_unit(const ParamEntry& p, int64_t unit, const SgdArgs& a, const MixScalars mix) {
  const int64_t c0 = (unit - p.first_unit) * p.unit_size;
  const int64_t n = std::min(p.numel, c0 + p.unit_size) - c0;
  T* w = static_cast<T*>(p.w) + c0;
  const T* backup = p.backup ? static_cast<const T*>(p.backup) + c0 : nullptr;
  if (a.found_inf && *a.found_inf != 0.0f) {  // GradScaler overflow: restore only
    if (backup) std::memcpy(w, backup, n * sizeof(T));
    return;
  }
  const T* g = static_cast<const T*>(p.grad) + c0;
  const T* clean = p.clean ? static_cast<const T*>(p.clean) + c0 : nullptr;
  T* buf = p.buf ? static_cast<T*>(p.buf) + c0 : nullptr;
  float* fisher = p.fisher ? p.fisher + c0 : nullptr;
  const SgdScalars sgd = a.sgd;
  const bool read_buf = sgd.has_momentum && !sgd.first_step;
  // Restoring from the backup, w is written without being read: non-temporal stores skip reading it in.
  auto body = [&]<class F, bool NonTemporal>(int64_t i) {
    const F gi = load<F>(g + i);
    if (fisher) store(fisher + i, fisher_update(load<F>(fisher + i), gi, mix));
    const F gm = mix_grad(gi, clean ? load<F>(clean + i) : F(0.0f), clean != nullptr, mix);
    F wi = load<F>(backup ? backup + i : w + i);
    F bi = read_buf ? load<F>(buf + i) : F(0.0f);
    sgd_update(wi, bi, gm, sgd);
    store_nt<NonTemporal>(w + i, wi);
    if (sgd.has_momentum) store(buf + i, bi);
  };
  if (backup) {
    for_lanes<true>(n, body, w);
    nontemporal_fence();
  } else {
    for_lanes(n, body);
  }
}

}  // namespace

int64_t perturb_unit_rows(int64_t row_len) { return std::max<int64_t>(1, kCpuTileElems / row_len); }

void philox(const int64_t* counter, const int64_t* key, int64_t* out, int64_t n) {
  at::parallel_for(0, n, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      uint32_t c[4];
      for (int j = 0; j < 4; ++j) c[j] = static_cast<uint32_t>(counter[4 * i + j]);
      philox4x32_10(c[0], c[1], c[2], c[3],
                    PhiloxKey{static_cast<uint32_t>(key[2 * i]), static_cast<uint32_t>(key[2 * i + 1])});
      for (int j = 0; j < 4; ++j) out[4 * i + j] = c[j];
    }
  });
}

void noise(float* out, int64_t numel, int64_t offset, uint32_t param_index, NoiseKey key) {
  const ParamNoise s{param_index, key};
  const int64_t units = (numel + kCpuChunkElems - 1) / kCpuChunkElems;
  parallel_units(units, [&](int64_t u) {
    const int64_t begin = u * kCpuChunkElems;
    fill_normals(out + begin, offset + begin, std::min(kCpuChunkElems, numel - begin), s);
  });
}

void perturb(const ParamEntry* table, int64_t num_params, int64_t units, const PerturbArgs& args) {
  const float grad_scale = args.grad_scale.get();
  const bool scale_grads = args.grad_scale.ptr != nullptr || grad_scale != 1.0f;  // x * 1.0f == x: skip the pass
  parallel_units(units, [&](int64_t u) {
    const ParamEntry& p = table[owner_of(table, num_params, u)];
    dispatch_dtype<half_t, bf16_t>(p.dtype,
                                   [&](auto t) { perturb_unit<decltype(t)>(p, u, args, grad_scale, scale_grads); });
  });
}

void restore(const ParamEntry* table, int64_t num_params, int64_t units, const RestoreArgs& args) {
  const MixScalars mix = args.mix.get();
  parallel_units(units, [&](int64_t u) {
    const ParamEntry& p = table[owner_of(table, num_params, u)];
    dispatch_dtype<half_t, bf16_t>(p.dtype, [&](auto t) { restore_unit<decltype(t)>(p, u, args, mix); });
  });
}

void sgd_step(const ParamEntry* table, int64_t num_params, int64_t units, const SgdArgs& args) {
  const MixScalars mix = args.mix.get();
  parallel_units(units, [&](int64_t u) {
    const ParamEntry& p = table[owner_of(table, num_params, u)];
    dispatch_dtype<half_t, bf16_t>(p.dtype, [&](auto t) { sgd_unit<decltype(t)>(p, u, args, mix); });
  });
}

}  // namespace rwp::cpu
