// CUDA kernels: one launch per op for all parameters of a call. The parameter table lives in device
// memory; block b handles work unit b (perturb_: one row, reduced with BlockSum; restore_ and
// sgd_step_: one chunk of kCudaChunkElems elements). A thread works on Philox quads (4 consecutive
// elements, one Philox block), with one vector load/store per quad where the tensors are aligned.
// No torch headers here (see binding.cpp); everything is asynchronous on the given CUDA stream. The same
// source is also compiled as host C++ and run on the CPU (csrc/emu, backend "cuda-emu"): CUDA's
// vocabulary comes from simt.h.
#include <algorithm>

#include "block_sum.h"
#include "cuda_kernels.h"
#include "simt.h"

namespace rwp::cuda {
namespace {

constexpr int kThreads = kCudaThreads;
using RowSum = BlockSum<kThreads>;

// ---- element types ---------------------------------------------------------------------------------

struct half_bits {
  uint16_t bits;
};
struct bf16_bits {
  uint16_t bits;
};

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(half_bits h) { return __half2float(__ushort_as_half(h.bits)); }
__device__ __forceinline__ float to_f32(bf16_bits b) { return __bfloat162float(__ushort_as_bfloat16(b.bits)); }
__device__ __forceinline__ void from_f32(float x, float* p) { *p = x; }
__device__ __forceinline__ void from_f32(float x, half_bits* p) { p->bits = __half_as_ushort(__float2half_rn(x)); }
__device__ __forceinline__ void from_f32(float x, bf16_bits* p) {
  p->bits = __bfloat16_as_ushort(__float2bfloat16_rn(x));
}

// Four consecutive elements as one access: 16 bytes for float32, 8 bytes for the 16-bit types. An aligned
// aggregate of the element type itself, so that reading the elements of a quad is no type punning (which
// host compilers, unlike nvcc, exploit: the emulated build read the 16-bit elements of a vector as 0).
template <class T>
struct alignas(4 * sizeof(T)) QuadRaw {
  T x[4];
};

template <class T>
__device__ __forceinline__ bool quad_aligned(const void* p) {
  return p == nullptr || reinterpret_cast<uintptr_t>(p) % sizeof(QuadRaw<T>) == 0;
}

// The quad of elements e .. e+3 of p (as floats); elements outside [lo, hi) read as 0. `vec`: the quad
// lies inside [lo, hi) and p is quad-aligned, so one vector access does.
template <class T>
__device__ __forceinline__ void load_quad(const T* p, int64_t e, int64_t lo, int64_t hi, bool vec, float v[4]) {
  if (vec) {
    const QuadRaw<T> raw = *reinterpret_cast<const QuadRaw<T>*>(p + e);
#pragma unroll
    for (int j = 0; j < 4; ++j) v[j] = to_f32(raw.x[j]);
    return;
  }
#pragma unroll
  for (int j = 0; j < 4; ++j) v[j] = (e + j >= lo && e + j < hi) ? to_f32(p[e + j]) : 0.0f;
}

template <class T>
__device__ __forceinline__ void store_quad(T* p, int64_t e, int64_t lo, int64_t hi, bool vec, const float v[4]) {
  if (vec) {
    QuadRaw<T> raw;
#pragma unroll
    for (int j = 0; j < 4; ++j) from_f32(v[j], raw.x + j);
    *reinterpret_cast<QuadRaw<T>*>(p + e) = raw;
    return;
  }
#pragma unroll
  for (int j = 0; j < 4; ++j)
    if (e + j >= lo && e + j < hi) from_f32(v[j], p + e + j);
}

// dst <- src bit for bit (exact backups and restores).
template <class T>
__device__ __forceinline__ void copy_quad(T* dst, const T* src, int64_t e, int64_t lo, int64_t hi, bool vec) {
  if (vec) {
    *reinterpret_cast<QuadRaw<T>*>(dst + e) = *reinterpret_cast<const QuadRaw<T>*>(src + e);
    return;
  }
#pragma unroll
  for (int j = 0; j < 4; ++j)
    if (e + j >= lo && e + j < hi) dst[e + j] = src[e + j];
}

__device__ __forceinline__ void quad_normals(int64_t q, const ParamEntry& p, const NoiseKey& key, float z[4]) {
  const uint64_t uq = static_cast<uint64_t>(q);
  normal_block(static_cast<uint32_t>(uq), static_cast<uint32_t>(uq >> 32), p.param_index, key.step, key.k0, key.k1,
               z[0], z[1], z[2], z[3]);
}

// The block's work unit: units first_unit, first_unit + 1, ... go to blocks 0, 1, ... of a launch.
__device__ __forceinline__ int64_t block_unit(int64_t first_unit) { return first_unit + blockIdx.x; }

// The entry of the parameter that owns the block's unit, copied to shared memory.
__device__ __forceinline__ const ParamEntry& block_entry(const ParamEntry* table, int64_t num_params, int64_t first_unit,
                                                        ParamEntry& shared) {
  if (threadIdx.x == 0) shared = table[owner_of(table, num_params, block_unit(first_unit))];
  __syncthreads();
  return shared;
}

// ---- philox4x32_10 and noise -------------------------------------------------------------------------

__global__ void philox_kernel(const int64_t* counter, const int64_t* key, int64_t* out, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    uint32_t c0 = counter[4 * i], c1 = counter[4 * i + 1], c2 = counter[4 * i + 2], c3 = counter[4 * i + 3];
    philox4x32_10(c0, c1, c2, c3, static_cast<uint32_t>(key[2 * i]), static_cast<uint32_t>(key[2 * i + 1]));
    out[4 * i] = c0;
    out[4 * i + 1] = c1;
    out[4 * i + 2] = c2;
    out[4 * i + 3] = c3;
  }
}

__global__ void noise_kernel(float* out, int64_t numel, int64_t offset, uint32_t param_index, NoiseKey key) {
  ParamEntry p{};
  p.param_index = param_index;
  // offset + numel may be 2^63 itself: the block count is summed in pieces that cannot overflow
  const int64_t q_begin = offset >> 2, q_end = q_begin + (((offset & 3) + numel + 3) >> 2);
  const bool aligned = (offset & 3) == 0 && quad_aligned<float>(out);
  for (int64_t q = q_begin + blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; q < q_end;
       q += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float z[4];
    quad_normals(q, p, key, z);
    const int64_t e = 4 * q - offset;  // index in out of the quad's first element
    store_quad(out, e, 0, numel, aligned && e + 4 <= numel, z);
  }
}

// ---- perturb_ ------------------------------------------------------------------------------------------

// A row of at most kStageBytes is read from DRAM once: each thread keeps the quads it summed in shared
// memory, in slots only it uses (so no barrier is needed), and perturbs them from there. 18 KB: the largest
// CNN row (512 * 3 * 3 elements) in float32, twice that in the 16-bit types.
constexpr int kStageBytes = 4608 * 4;
struct alignas(16) Stage {
  unsigned char bytes[kStageBytes];
};

// The quad at e of p as stored (elements outside [lo, hi) are zero bits).
template <class T>
__device__ __forceinline__ QuadRaw<T> load_raw(const T* p, int64_t e, int64_t lo, int64_t hi, bool vec) {
  if (vec) return *reinterpret_cast<const QuadRaw<T>*>(p + e);
  QuadRaw<T> raw{};
#pragma unroll
  for (int j = 0; j < 4; ++j)
    if (e + j >= lo && e + j < hi) raw.x[j] = p[e + j];
  return raw;
}

template <class T>
__device__ __forceinline__ void store_raw(T* p, int64_t e, int64_t lo, int64_t hi, bool vec, const QuadRaw<T>& raw) {
  if (vec) {
    *reinterpret_cast<QuadRaw<T>*>(p + e) = raw;
    return;
  }
#pragma unroll
  for (int j = 0; j < 4; ++j)
    if (e + j >= lo && e + j < hi) p[e + j] = raw.x[j];
}

// The rows of the block's unit: one per group of cuda_row_threads(row_len) threads. kPerElement: a 0-D/1-D
// parameter with ARWP, one sigma per element from its Fisher value.
template <class T, bool kPerElement>
__device__ __forceinline__ void perturb_rows(const ParamEntry& p, int64_t unit, const PerturbArgs& a,
                                             RowSum::TempStorage& tmp, unsigned char* stage_bytes) {
  const unsigned group = kThreads / static_cast<unsigned>(p.unit_size), lane = threadIdx.x & (group - 1);
  const unsigned group_index = threadIdx.x >> (__ffs(group) - 1);  // group is a power of two
  const int64_t row = unit * p.unit_size + group_index;
  const int64_t n = p.row_len;
  const bool has_row = row < p.numel / n;  // the last unit of a parameter may have fewer rows than groups
  const int64_t lo = has_row ? row * n : 0, hi = has_row ? lo + n : 0;
  const int64_t q_lo = lo >> 2, q_hi = (hi + 3) >> 2;
  T* w = static_cast<T*>(p.w);
  T* backup = static_cast<T*>(p.backup);
  T* grad = static_cast<T*>(p.grad);
  const float grad_scale = a.grad_scale.get();
  const bool scale_grad = grad != nullptr && (a.grad_scale.ptr != nullptr || grad_scale != 1.0f);
  const bool row_fisher = p.fisher != nullptr && !kPerElement;
  const bool vec_ok = quad_aligned<T>(w) && quad_aligned<T>(backup) && quad_aligned<T>(grad) &&
                      quad_aligned<float>(p.fisher);
  // Each group stages its row's quads in its share of the stage; slot q - q_lo holds quad q.
  const int64_t group_slots = kStageBytes / sizeof(QuadRaw<T>) / p.unit_size;
  QuadRaw<T>* stage = reinterpret_cast<QuadRaw<T>*>(stage_bytes) + group_index * group_slots - q_lo;
  const bool staged = q_hi - q_lo <= group_slots;

  double sumsq = 0.0, fsum = 0.0;
  for (int64_t q = q_lo + lane; q < q_hi; q += group) {
    const int64_t e = 4 * q;
    const bool vec = vec_ok && e >= lo && e + 4 <= hi;
    const QuadRaw<T> raw = load_raw(w, e, lo, hi, vec);
    if (staged) stage[q] = raw;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const double v = to_f32(raw.x[j]);
      sumsq += v * v;
    }
    if (row_fisher) {
      float f[4];
      load_quad(p.fisher, e, lo, hi, vec, f);
#pragma unroll
      for (int j = 0; j < 4; ++j) fsum += f[j];
    }
  }
  sumsq = RowSum::sum(tmp, sumsq, group);
  if (row_fisher) fsum = RowSum::sum(tmp, fsum, group);
  const float row_sig = row_sigma(sumsq, p.gamma, p.whole_tensor, row_fisher, fsum, p.eta);
  float* sigmas = a.sigma + p.sigma_offset;
  if (!kPerElement && has_row && lane == 0) sigmas[row] = row_sig;

  for (int64_t q = q_lo + lane; q < q_hi; q += group) {
    const int64_t e = 4 * q;
    const bool vec = vec_ok && e >= lo && e + 4 <= hi;
    const QuadRaw<T> raw = staged ? stage[q] : load_raw(w, e, lo, hi, vec);
    if (backup) store_raw(backup, e, lo, hi, vec, raw);
    float sg[4] = {row_sig, row_sig, row_sig, row_sig};
    if (kPerElement) {
      float f[4];
      load_quad(p.fisher, e, lo, hi, vec, f);
#pragma unroll
      for (int j = 0; j < 4; ++j) sg[j] = row_sigma(sumsq, p.gamma, true, true, f[j], p.eta);
      store_quad(sigmas, e, lo, hi, vec && quad_aligned<float>(sigmas), sg);  // any offset in the sigma array
    }
    if (p.gamma != 0.0) {
      float z[4], v[4];
      quad_normals(q, p, a.key, z);
#pragma unroll
      for (int j = 0; j < 4; ++j) v[j] = add_noise(to_f32(raw.x[j]), sg[j], z[j]);
      store_quad(w, e, lo, hi, vec, v);
    }
    if (scale_grad) {
      float g[4];
      load_quad(grad, e, lo, hi, vec, g);
#pragma unroll
      for (int j = 0; j < 4; ++j) g[j] *= grad_scale;
      store_quad(grad, e, lo, hi, vec, g);
    }
  }
}

// Resident blocks per SM that perturb_kernel's registers must allow: 40 warps on sm_80 and sm_90 (32 for the
// per-element variant, which only 1-D ARWP parameters take).
constexpr int kPerturbBlocksPerSm = 5;

// One instantiation per dtype and sigma mode (a launch takes the entries of one), for fewer registers.
template <class T, bool kPerElement>
__global__ void __launch_bounds__(kThreads, kPerElement ? 4 : kPerturbBlocksPerSm) perturb_kernel(const ParamEntry* table, int64_t num_params,
                                                           int64_t first_unit, PerturbArgs a) {
  __shared__ ParamEntry entry;
  __shared__ RowSum::TempStorage tmp;
  __shared__ Stage stage;
  const ParamEntry& p = block_entry(table, num_params, first_unit, entry);
  perturb_rows<T, kPerElement>(p, block_unit(first_unit) - p.first_unit, a, tmp, stage.bytes);
}

// ---- restore_ and sgd_step_ ------------------------------------------------------------------------

// The sigma of each element of the quad at e (per row, or per element for 0-D/1-D ARWP parameters).
__device__ __forceinline__ void quad_sigmas(const ParamEntry& p, const float* sigmas, int64_t e, int64_t hi, float sg[4]) {
  int64_t row = e / p.row_len;
  int64_t in_row = e - row * p.row_len;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    if (in_row == p.row_len) {
      ++row;
      in_row = 0;
    }
    sg[j] = e + j < hi ? sigmas[p.sigma_per_element ? e + j : row] : 0.0f;
    ++in_row;
  }
}

// Fisher update from the gradient as it arrives, and the mixed gradient, for a quad.
__device__ __forceinline__ void mix_quad(float (&g)[4], float (&fisher)[4], bool has_fisher, const float (&clean)[4],
                                         bool has_clean, const MixScalars& mix) {
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    if (has_fisher) fisher[j] = fisher_update(fisher[j], g[j], mix);
    g[j] = mix_grad(g[j], clean[j], has_clean, mix);
  }
}

// Calls quad(e, vec) for this thread's quads e, e+1, e+2, e+3 of [lo, hi) (lo is a multiple of 4), with
// vec a compile-time flag: true for full quads of aligned tensors (one vector access each).
template <bool V>
struct VecFlag {
  static constexpr bool value = V;
};

template <class Quad>
__device__ __forceinline__ void for_quads(int64_t lo, int64_t hi, bool aligned, const Quad& quad) {
  const int64_t full_end = aligned ? lo + (hi - lo) / 4 * 4 : lo;
  for (int64_t e = lo + 4 * threadIdx.x; e < full_end; e += 4 * blockDim.x) quad(e, VecFlag<true>{});
  for (int64_t e = full_end + 4 * threadIdx.x; e < hi; e += 4 * blockDim.x) quad(e, VecFlag<false>{});
}

template <class T>
__device__ __forceinline__ void restore_chunk(const ParamEntry& p, int64_t lo, int64_t hi, const RestoreArgs& a) {
  T* w = static_cast<T*>(p.w);
  const T* backup = static_cast<const T*>(p.backup);
  T* grad = static_cast<T*>(p.grad);
  const T* clean = static_cast<const T*>(p.clean);
  const MixScalars mix = a.mix.get();
  const bool aligned = quad_aligned<T>(w) && quad_aligned<T>(backup) && quad_aligned<T>(grad) &&
                       quad_aligned<T>(clean) && quad_aligned<float>(p.fisher);
  for_quads(lo, hi, aligned, [&](int64_t e, auto flag) {
    constexpr bool vec = decltype(flag)::value;
    if (backup) {
      copy_quad(w, backup, e, lo, hi, vec);
    } else {
      float z[4], sg[4], v[4];
      quad_normals(e >> 2, p, a.key, z);
      quad_sigmas(p, a.sigma + p.sigma_offset, e, hi, sg);
      load_quad(w, e, lo, hi, vec, v);
#pragma unroll
      for (int j = 0; j < 4; ++j) v[j] = remove_noise(v[j], sg[j], z[j]);
      store_quad(w, e, lo, hi, vec, v);
    }
    if (!grad) return;
    float g[4], c[4] = {0.0f, 0.0f, 0.0f, 0.0f}, f[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    load_quad(grad, e, lo, hi, vec, g);
    if (clean) load_quad(clean, e, lo, hi, vec, c);
    if (p.fisher) load_quad(p.fisher, e, lo, hi, vec, f);
    mix_quad(g, f, p.fisher != nullptr, c, clean != nullptr, mix);
    store_quad(grad, e, lo, hi, vec, g);
    if (p.fisher) store_quad(p.fisher, e, lo, hi, vec, f);
  });
}

template <class T>
__device__ __forceinline__ void sgd_chunk(const ParamEntry& p, int64_t lo, int64_t hi, const SgdArgs& a) {
  T* w = static_cast<T*>(p.w);
  const T* backup = static_cast<const T*>(p.backup);
  const T* grad = static_cast<const T*>(p.grad);
  const T* clean = static_cast<const T*>(p.clean);
  T* buf = static_cast<T*>(p.buf);
  const bool aligned = quad_aligned<T>(w) && quad_aligned<T>(backup) && quad_aligned<T>(grad) &&
                       quad_aligned<T>(clean) && quad_aligned<T>(buf) && quad_aligned<float>(p.fisher);
  if (a.found_inf != nullptr && *a.found_inf != 0.0f) {  // GradScaler overflow: restore only
    if (backup) {
      for_quads(lo, hi, aligned, [&](int64_t e, auto flag) {
        copy_quad(w, backup, e, lo, hi, decltype(flag)::value);
      });
    }
    return;
  }
  const SgdScalars& s = a.sgd;
  const MixScalars mix = a.mix.get();
  const bool read_buf = s.has_momentum && !s.first_step;
  for_quads(lo, hi, aligned, [&](int64_t e, auto flag) {
    constexpr bool vec = decltype(flag)::value;
    float g[4], v[4], c[4] = {0.0f, 0.0f, 0.0f, 0.0f}, f[4] = {0.0f, 0.0f, 0.0f, 0.0f}, b[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    load_quad(grad, e, lo, hi, vec, g);
    if (clean) load_quad(clean, e, lo, hi, vec, c);
    if (p.fisher) load_quad(p.fisher, e, lo, hi, vec, f);
    mix_quad(g, f, p.fisher != nullptr, c, clean != nullptr, mix);
    load_quad(backup ? backup : w, e, lo, hi, vec, v);
    if (read_buf) load_quad(buf, e, lo, hi, vec, b);
#pragma unroll
    for (int j = 0; j < 4; ++j) sgd_update(v[j], b[j], g[j], s);
    store_quad(w, e, lo, hi, vec, v);
    if (s.has_momentum) store_quad(buf, e, lo, hi, vec, b);
    if (p.fisher) store_quad(p.fisher, e, lo, hi, vec, f);
  });
}

// Runs body(entry, lo, hi) for the block's chunk [lo, hi) of its parameter's elements.
template <class Body>
__device__ __forceinline__ void for_block_chunk(const ParamEntry* table, int64_t num_params, int64_t first_unit,
                                                const Body& body) {
  __shared__ ParamEntry entry;
  const ParamEntry& p = block_entry(table, num_params, first_unit, entry);
  const int64_t lo = (block_unit(first_unit) - p.first_unit) * p.unit_size;
  const int64_t hi = min(p.numel, lo + p.unit_size);
  body(p, lo, hi);
}

template <class T>
__global__ void __launch_bounds__(kThreads) restore_kernel(const ParamEntry* table, int64_t num_params,
                                                           int64_t first_unit, RestoreArgs a) {
  for_block_chunk(table, num_params, first_unit,
                  [&](const ParamEntry& p, int64_t lo, int64_t hi) { restore_chunk<T>(p, lo, hi, a); });
}

template <class T>
__global__ void __launch_bounds__(kThreads) sgd_kernel(const ParamEntry* table, int64_t num_params, int64_t first_unit,
                                                       SgdArgs a) {
  for_block_chunk(table, num_params, first_unit,
                  [&](const ParamEntry& p, int64_t lo, int64_t hi) { sgd_chunk<T>(p, lo, hi, a); });
}

// One block per work unit: the grid's x dimension holds up to 2^31 - 1 blocks.
bool too_many(int64_t units) { return units > 0x7FFFFFFF; }

unsigned grid_for(int64_t items) {
  return static_cast<unsigned>(std::min<int64_t>(std::max<int64_t>(1, (items + kThreads - 1) / kThreads), 1 << 20));
}

}  // namespace

cudaError_t philox(const int64_t* counter, const int64_t* key, int64_t* out, int64_t n, cudaStream_t cuda_stream) {
  return RWP_LAUNCH(philox_kernel, grid_for(n), kThreads, cuda_stream, counter, key, out, n);
}

cudaError_t noise(float* out, int64_t numel, int64_t offset, uint32_t param_index, NoiseKey key, cudaStream_t cuda_stream) {
  return RWP_LAUNCH(noise_kernel, grid_for((numel + 3) / 4 + 1), kThreads, cuda_stream, out, numel, offset, param_index, key);
}

// Each launcher runs the kernel variant of the launch's dtype (and sigma mode) on its entries.
cudaError_t perturb(const ParamEntry* table, const Launch& l, PerturbArgs args, cudaStream_t cuda_stream) {
  if (too_many(l.units)) return cudaErrorInvalidConfiguration;
  cudaError_t err = cudaSuccess;
  dispatch_dtype<half_bits, bf16_bits>(l.dtype, [&](auto t) {
    using T = decltype(t);
    const auto kernel = l.per_element ? perturb_kernel<T, true> : perturb_kernel<T, false>;
    err = RWP_LAUNCH(kernel, static_cast<unsigned>(l.units), kThreads, cuda_stream, table + l.first, l.count, l.first_unit, args);
  });
  return err;
}

cudaError_t restore(const ParamEntry* table, const Launch& l, RestoreArgs args, cudaStream_t cuda_stream) {
  if (too_many(l.units)) return cudaErrorInvalidConfiguration;
  cudaError_t err = cudaSuccess;
  dispatch_dtype<half_bits, bf16_bits>(l.dtype, [&](auto t) {
    const auto kernel = restore_kernel<decltype(t)>;
    err = RWP_LAUNCH(kernel, static_cast<unsigned>(l.units), kThreads, cuda_stream, table + l.first, l.count, l.first_unit, args);
  });
  return err;
}

cudaError_t sgd_step(const ParamEntry* table, const Launch& l, SgdArgs args, cudaStream_t cuda_stream) {
  if (too_many(l.units)) return cudaErrorInvalidConfiguration;
  cudaError_t err = cudaSuccess;
  dispatch_dtype<half_bits, bf16_bits>(l.dtype, [&](auto t) {
    const auto kernel = sgd_kernel<decltype(t)>;
    err = RWP_LAUNCH(kernel, static_cast<unsigned>(l.units), kThreads, cuda_stream, table + l.first, l.count, l.first_unit, args);
  });
  return err;
}

}  // namespace rwp::cuda
