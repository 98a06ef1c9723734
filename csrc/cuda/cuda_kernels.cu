// CUDA kernels: one launch per op and kernel variant (dtype, and for perturb_ the sigma mode) for all
// parameters of a call. The parameter table lives in device memory; block b handles work unit first_unit + b
// (perturb_: a few rows, one per group of threads, each summed with BlockSum; restore_ and sgd_step_: one
// chunk of kCudaChunkElems elements). A thread works on vectors: the elements of one 16-byte access (whole
// Philox quads), with one access per vector where the tensors are aligned.
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
// Resident blocks per SM that the table kernels' registers must allow: 40 warps on sm_80 and sm_90.
constexpr int kBlocksPerSm = 5;
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

// A vector: the elements of one 16-byte access, whole Philox quads (four float32, eight 16-bit values). An
// aligned aggregate of the element type itself, so that reading its elements is no type punning (which host
// compilers, unlike nvcc, exploit: the emulated build read the 16-bit elements of a punned vector as 0).
template <class T>
constexpr int kVecElems = 16 / static_cast<int>(sizeof(T));

template <class T>
struct alignas(16) Vec {
  T x[kVecElems<T>];
};

__device__ __forceinline__ bool aligned16(const void* p) {
  return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

// Elements e .. e+N-1 of p (as floats; N a multiple of p's vector length); elements outside [lo, hi) read
// as 0. `vec`: they lie inside [lo, hi) and p + e is 16-byte aligned, so N / kVecElems<T> vector accesses do.
template <int N, class T>
__device__ __forceinline__ void load_elems(const T* p, int64_t e, int64_t lo, int64_t hi, bool vec, float (&v)[N]) {
  constexpr int K = kVecElems<T>;
  if (vec) {
#pragma unroll
    for (int c = 0; c < N / K; ++c) {
      const Vec<T> raw = *reinterpret_cast<const Vec<T>*>(p + e + c * K);
#pragma unroll
      for (int j = 0; j < K; ++j) v[c * K + j] = to_f32(raw.x[j]);
    }
    return;
  }
#pragma unroll
  for (int j = 0; j < N; ++j) v[j] = (e + j >= lo && e + j < hi) ? to_f32(p[e + j]) : 0.0f;
}

template <int N, class T>
__device__ __forceinline__ void store_elems(T* p, int64_t e, int64_t lo, int64_t hi, bool vec, const float (&v)[N]) {
  constexpr int K = kVecElems<T>;
  if (vec) {
#pragma unroll
    for (int c = 0; c < N / K; ++c) {
      Vec<T> raw;
#pragma unroll
      for (int j = 0; j < K; ++j) from_f32(v[c * K + j], raw.x + j);
      *reinterpret_cast<Vec<T>*>(p + e + c * K) = raw;
    }
    return;
  }
#pragma unroll
  for (int j = 0; j < N; ++j)
    if (e + j >= lo && e + j < hi) from_f32(v[j], p + e + j);
}

// The vector at e of p as stored (elements outside [lo, hi) are zero bits), and back.
template <class T>
__device__ __forceinline__ Vec<T> load_raw(const T* p, int64_t e, int64_t lo, int64_t hi, bool vec) {
  if (vec) return *reinterpret_cast<const Vec<T>*>(p + e);
  Vec<T> raw{};
#pragma unroll
  for (int j = 0; j < kVecElems<T>; ++j)
    if (e + j >= lo && e + j < hi) raw.x[j] = p[e + j];
  return raw;
}

template <class T>
__device__ __forceinline__ void store_raw(T* p, int64_t e, int64_t lo, int64_t hi, bool vec, const Vec<T>& raw) {
  if (vec) {
    *reinterpret_cast<Vec<T>*>(p + e) = raw;
    return;
  }
#pragma unroll
  for (int j = 0; j < kVecElems<T>; ++j)
    if (e + j >= lo && e + j < hi) p[e + j] = raw.x[j];
}

// A compile-time flag of a loop body: true where its vectors are whole and aligned (16-byte accesses).
template <bool V>
struct VecFlag {
  static constexpr bool value = V;
};

// The vector that holds element e >= 0 (unsigned: no rounding towards zero to handle).
template <class T>
__device__ __forceinline__ int64_t vector_of(int64_t e) {
  return static_cast<int64_t>(static_cast<uint64_t>(e) / kVecElems<T>);
}

// The key of the Philox rounds: the round keys precomputed (NoiseKey::rounds, which the compiler keeps in uniform
// registers), or the key whose rounds add them up as they go.
template <bool kRoundKeys>
__device__ __forceinline__ decltype(auto) philox_keys(const NoiseKey& key) {
  if constexpr (kRoundKeys) {
    return (key.rounds);  // (a reference)
  } else {
    return key.key();
  }
}

// The normals of elements e .. e+N-1 (e a multiple of 4): N / 4 Philox blocks, with philox_keys<kRoundKeys>.
template <bool kRoundKeys = true, int N>
__device__ __forceinline__ void normals(int64_t e, uint32_t param_index, const NoiseKey& key, float (&z)[N]) {
#pragma unroll
  for (int c = 0; c < N / 4; ++c) {
    const uint64_t q = static_cast<uint64_t>(e / 4 + c);
    normal_block(static_cast<uint32_t>(q), static_cast<uint32_t>(q >> 32), param_index, key.step,
                 philox_keys<kRoundKeys>(key), z[4 * c], z[4 * c + 1], z[4 * c + 2], z[4 * c + 3]);
  }
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
    philox4x32_10(c0, c1, c2, c3, PhiloxKey{static_cast<uint32_t>(key[2 * i]), static_cast<uint32_t>(key[2 * i + 1])});
    out[4 * i] = c0;
    out[4 * i + 1] = c1;
    out[4 * i + 2] = c2;
    out[4 * i + 3] = c3;
  }
}

__global__ void noise_kernel(float* out, int64_t numel, int64_t offset, uint32_t param_index, NoiseKey key) {
  // offset + numel may be 2^63 itself: the block count is summed in pieces that cannot overflow
  const int64_t q_begin = offset >> 2, q_end = q_begin + (((offset & 3) + numel + 3) >> 2);
  const bool aligned = (offset & 3) == 0 && aligned16(out);
  for (int64_t q = q_begin + blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; q < q_end;
       q += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float z[4];
    normals(4 * q, param_index, key, z);
    const int64_t e = 4 * q - offset;  // index in out of the block's first element
    store_elems(out, e, 0, numel, aligned && e + 4 <= numel, z);
  }
}

// ---- perturb_ ------------------------------------------------------------------------------------------

// A row that fits its share of the stage (kCudaStageBytes: 6144 float32 elements, twice that in the 16-bit
// types; WRN-28-10's longest row has 640 * 3 * 3 = 5760, ResNets' 512 * 3 * 3 = 4608) is read from DRAM once:
// each thread keeps the vectors it summed in shared memory, in slots only it uses (so no barrier is needed),
// and perturbs them from there. Five blocks per SM fit in sm_80's 164 KB of shared memory. Longer rows are
// split into segments (cuda_row_segments): partials_kernel, then perturb_kernel<T, kPerElement, true>.
struct alignas(16) Stage {
  unsigned char bytes[kCudaStageBytes];
};

// The vectors that a row (or a segment of one) [lo, hi) of a parameter touches, with 32-bit offsets inside it:
// element first + e for e in [lo, hi), first a multiple of the vector length N; vector v holds e = N*v ...
// N*v + N-1. Vectors full_lo .. full_hi - 1 lie wholly inside [lo, hi); at most one at each end does not.
struct Span {
  int64_t first;
  int lo, hi, vectors, full_lo, full_hi;
};

template <class T>
__device__ __forceinline__ Span span_of(int64_t lo, int64_t hi) {
  constexpr int N = kVecElems<T>;
  const int64_t first = N * vector_of<T>(lo);
  const int l = static_cast<int>(lo - first), h = static_cast<int>(hi - first);
  const int full_lo = (l + N - 1) / N;
  return {first, l, h, (h + N - 1) / N, full_lo, max(full_lo, h / N)};
}

// Calls body(v, VecFlag<vec>{}) for this thread's vectors of the span, lane, lane + group, ...: the same vectors
// in every loop over the span. vec: the vector is whole and the parameter aligned (16-byte accesses). A copy of
// the body per case, so that a whole vector's words go from the load to their uses without being split into
// elements to meet the other case's (the update: 2-10 % fewer instructions than one body with a run-time flag).
template <class Body>
__device__ __forceinline__ void for_span_cases(const Span& s, bool aligned, unsigned lane, unsigned group,
                                               const Body& body) {
  const int whole_lo = aligned ? s.full_lo : s.vectors, whole_hi = aligned ? s.full_hi : 0;
  for (int v = lane; v < s.vectors; v += group) {
    if (v >= whole_lo && v < whole_hi) {
      body(v, VecFlag<true>{});
    } else {
      body(v, VecFlag<false>{});
    }
  }
}

// for_span_cases in the same order with the whole vectors of an aligned span (all but its first and last, at
// most) in a loop of their own, which tests nothing per vector: for a short body (the norm: 20 instead of 32
// instructions per float32 vector on sm_90), not the update's: at 48 registers, the 16-bit types spill so.
template <class Body>
__device__ __forceinline__ void for_span_runs(const Span& s, bool aligned, unsigned lane, unsigned group,
                                              const Body& body) {
  const int whole_lo = aligned ? s.full_lo : s.vectors, whole_hi = aligned ? s.full_hi : 0;
  int v = lane;
  if (v < whole_lo) {  // vector 0 of an aligned span (whole_lo <= 1), or the first of an unaligned one
    body(v, VecFlag<false>{});
    v += group;
  }
#pragma unroll 1  // one vector per iteration, as the report counts it (rwp_kernels/gpu_model.py)
  for (; v < whole_hi; v += group) body(v, VecFlag<true>{});
  for (; v < s.vectors; v += group) body(v, VecFlag<false>{});
}

// This thread's sums of squares of w and of the Fisher state (unless null) over its vectors of the span (w and
// fisher point at its element `first`); kStage: vector v is also kept in stage[v].
template <class T, bool kStage>
__device__ __forceinline__ void sum_vectors(const T* w, const float* fisher, const Span& s, unsigned lane,
                                            unsigned group, bool aligned, Vec<T>* stage, double& sumsq, double& fsum) {
  constexpr int N = kVecElems<T>;
  auto body = [&](int v, auto flag, auto with_fisher) {
    constexpr bool vec = decltype(flag)::value;
    const int e = N * v;
    const Vec<T> raw = load_raw(w, e, s.lo, s.hi, vec);
    if (kStage) stage[v] = raw;
#pragma unroll
    for (int j = 0; j < N; ++j) {
      const double x = to_f32(raw.x[j]);
      sumsq = fma(x, x, sumsq);  // x * x is exact in double: the same sum as sumsq + x * x, one instruction
    }
    if (decltype(with_fisher)::value) {
      float f[N];
      load_elems(fisher, e, s.lo, s.hi, vec, f);
#pragma unroll
      for (int j = 0; j < N; ++j) fsum += f[j];
    }
  };
  // rows with a Fisher state (ARWP) in a loop of their own: the other loop tests nothing for it per vector
  if (fisher) {
    for_span_runs(s, aligned, lane, group, [&](int v, auto flag) { body(v, flag, VecFlag<true>{}); });
  } else {
    for_span_runs(s, aligned, lane, group, [&](int v, auto flag) { body(v, flag, VecFlag<false>{}); });
  }
}

// Sigmas of a 0-D/1-D ARWP parameter, one per element of the span: the tensor's unscaled sigma over
// sqrt(1 + eta * its Fisher value), written to the sigma buffer. A loop of its own, before the update and a
// barrier, one element per iteration (lane, lane + group, ...: a warp's accesses are still 128 contiguous bytes):
// the float64 square root and division call slow-path subroutines that need about 28 registers, so at 48 the
// loop keeps little else live across them (a 16-byte vector's four values spilled).
__device__ __forceinline__ void element_sigmas(const ParamEntry& p, const PerturbArgs& a, const Span& s, unsigned lane,
                                               unsigned group, double sumsq) {
  const float* const fisher = p.fisher + s.first;
  float* const sigmas = a.sigma + p.sigma_offset + s.first;
  const double tensor_sig = unscaled_sigma(sumsq, p.gamma, true), eta = p.eta;
#pragma unroll 1
  for (int e = s.lo + static_cast<int>(lane); e < s.hi; e += static_cast<int>(group))
    sigmas[e] = static_cast<float>(fisher_scaled(tensor_sig, fisher[e], eta));
}

// The update of this thread's vectors of the span once the row's sums are known: backup <- w,
// w <- w + sigma * z with the row's sigma (or, kPerElement, one per element from the Fisher state: element_sigmas
// writes them, this loop reads back the thread's own), and grad <- grad * grad_scale. kStage: w comes from the
// stage.
template <class T, bool kPerElement, bool kStage>
__device__ __forceinline__ void update_vectors(const ParamEntry& p, const PerturbArgs& a, const Span& s, unsigned lane,
                                               unsigned group, bool aligned, const Vec<T>* stage, float row_sig) {
  constexpr int N = kVecElems<T>;
  const float* const sigmas = a.sigma + p.sigma_offset + s.first;
  // The entry lives in shared memory: the fields the loop uses are copied to registers once; but the 16-bit
  // updates read the parameter's index there in each vector (a register less: at 48, the staged one spilled).
  const uint32_t param_index = p.param_index;
  auto index = [&] { return sizeof(T) == 4 ? param_index : p.param_index; };
  const bool add = p.gamma != 0.0;
  T* w = static_cast<T*>(p.w) + s.first;
  T* backup = p.backup ? static_cast<T*>(p.backup) + s.first : nullptr;
  T* grad = p.grad ? static_cast<T*>(p.grad) + s.first : nullptr;
  const float grad_scale = a.grad_scale.get();
  const bool scale_grad = grad != nullptr && (a.grad_scale.ptr != nullptr || grad_scale != 1.0f);
  // (the staged and the per-element 16-bit updates keep no precomputed round keys: with them they spill at 48
  // registers)
  constexpr bool kRoundKeys = sizeof(T) == 4 || !(kStage || kPerElement);
  auto scale_grad_vector = [&](int v, auto flag) {
    constexpr bool vec = decltype(flag)::value;
    const int e = N * v;
    float g[N];
    load_elems(grad, e, s.lo, s.hi, vec, g);
#pragma unroll
    for (int j = 0; j < N; ++j) g[j] *= grad_scale;
    store_elems(grad, e, s.lo, s.hi, vec, g);
  };
  // A split row's per-element update scales the gradient in a loop of its own (it reads the gradient once either
  // way): in the update, the 16-bit ones spill 4-12 bytes at 48 registers.
  constexpr bool kGradLoop = kPerElement && !kStage;
  for_span_cases(s, aligned, lane, group, [&](int v, auto flag) {
    constexpr bool vec = decltype(flag)::value;
    const int e = N * v;
    const Vec<T> raw = kStage ? stage[v] : load_raw(w, e, s.lo, s.hi, vec);
    if (backup) store_raw(backup, e, s.lo, s.hi, vec, raw);
    if (add) {
      Vec<T> out;  // one Philox block at a time, each result rounded to T at once: fewer live registers
#pragma unroll
      for (int c = 0; c < N / 4; ++c) {
        float sg[4] = {row_sig, row_sig, row_sig, row_sig}, z[4];
        if (kPerElement) load_elems(sigmas, e + 4 * c, s.lo, s.hi, vec && aligned16(sigmas), sg);
        normals<kRoundKeys>(s.first + e + 4 * c, index(), a.key, z);
#pragma unroll
        for (int j = 0; j < 4; ++j) from_f32(add_noise(to_f32(raw.x[4 * c + j]), sg[j], z[j]), out.x + 4 * c + j);
      }
      store_raw(w, e, s.lo, s.hi, vec, out);
    }
    if (!kGradLoop && scale_grad) scale_grad_vector(v, flag);
  });
  if (kGradLoop && scale_grad) for_span_cases(s, aligned, lane, group, scale_grad_vector);
}

__device__ __forceinline__ bool entry_aligned(const ParamEntry& p) {
  return aligned16(p.w) && aligned16(p.backup) && aligned16(p.grad) && aligned16(p.fisher);
}

// Row `row` of a parameter as a span (empty past its last row: the last unit of a parameter may have fewer
// rows than groups).
template <class T>
__device__ __forceinline__ Span row_span(const ParamEntry& p, int64_t row) {
  const bool has_row = row < p.rows;
  const int64_t lo = has_row ? row * p.row_len : 0;
  return span_of<T>(lo, has_row ? lo + p.row_len : 0);
}

// This thread's group of threads in a block of perturb_rows (a power of two: ParamEntry::row_threads) and its
// place in it.
struct RowGroup {
  unsigned size, lane, index;
};

// kPerElement: a 0-D/1-D parameter, one row and so a unit of its own, which the whole block takes (fewer
// registers than finding the row's group: at 48, the 16-bit types spilled 20-44 bytes).
template <bool kPerElement>
__device__ __forceinline__ RowGroup row_group(const ParamEntry& p) {
  if (kPerElement) return {kThreads, threadIdx.x, 0};
  const unsigned size = static_cast<unsigned>(p.row_threads);
  return {size, threadIdx.x & (size - 1), threadIdx.x >> (__ffs(size) - 1)};
}

// The rows of the block's unit: one per group of cuda_row_threads() threads, each staged whole. kPerElement:
// a 0-D/1-D parameter with ARWP, one sigma per element from its Fisher value. What the update needs of the
// entry (the group, the row's span and stage, the Fisher test) is found again after the norm, from the entry in
// shared memory, rather than kept in registers across the norm loop: in the 16-bit types that would spill.
template <class T, bool kPerElement>
__device__ __forceinline__ void perturb_rows(const ParamEntry& p, int64_t first_unit, const PerturbArgs& a,
                                             RowSum::TempStorage& tmp, unsigned char* stage_bytes) {
  auto row = [&](const RowGroup& g) -> int64_t {
    return kPerElement ? 0 : (block_unit(first_unit) - p.first_unit) * p.unit_size + g.index;
  };
  auto row_fisher = [&] { return p.fisher != nullptr && !kPerElement; };
  // Each group stages its row in its share of the stage (the row fits: cuda_row_segments).
  auto stage = [&](const RowGroup& g) {
    return reinterpret_cast<Vec<T>*>(stage_bytes) + g.index * cuda_stage_vectors(g.size);
  };

  double sumsq = 0.0, fsum = 0.0;
  {
    const RowGroup g = row_group<kPerElement>(p);
    const Span span = row_span<T>(p, row(g));
    sum_vectors<T, true>(static_cast<const T*>(p.w) + span.first, row_fisher() ? p.fisher + span.first : nullptr,
                         span, g.lane, g.size, entry_aligned(p), stage(g), sumsq, fsum);
  }
  const RowGroup g = row_group<kPerElement>(p);
  sumsq = RowSum::sum(tmp, sumsq, g.size);
  if (row_fisher()) fsum = RowSum::sum(tmp, fsum, g.size);
  const float row_sig = row_sigma(sumsq, p.gamma, p.whole_tensor, row_fisher(), fsum, p.eta);
  if (kPerElement) {
    element_sigmas(p, a, row_span<T>(p, row(g)), g.lane, g.size, sumsq);
    __syncthreads();
  }
  const RowGroup u = row_group<kPerElement>(p);  // (found again rather than kept across element_sigmas' calls)
  const Span span = row_span<T>(p, row(u));
  if (!kPerElement && span.vectors > 0 && u.lane == 0) a.sigma[p.sigma_offset + row(u)] = row_sig;
  update_vectors<T, kPerElement, true>(p, a, span, u.lane, u.size, entry_aligned(p), stage(u), row_sig);
}

// The row of segment `unit` of a split parameter. kOneRow: the parameter is one row (0-D/1-D), which spares the
// 64-bit division (and, at 48 registers, 36-64 bytes of spills in the 16-bit per-element kernels).
template <bool kOneRow>
__device__ __forceinline__ int64_t segment_row(const ParamEntry& p, int64_t unit) {
  return kOneRow ? 0 : unit / p.segments;
}

// Segment `unit` of a split parameter (its partial sums are entry p.partial_offset + unit of args.partials).
template <class T, bool kOneRow = false>
__device__ __forceinline__ Span segment_span(const ParamEntry& p, int64_t unit) {
  const int64_t row = segment_row<kOneRow>(p, unit);
  const int64_t lo = row * p.row_len + (unit - row * p.segments) * kCudaSegmentElems;
  return span_of<T>(lo, min(lo + kCudaSegmentElems, (row + 1) * p.row_len));
}

// First launch for split rows: each block sums the squares (and the Fisher state of an ARWP row) of its segment.
template <class T>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm) partials_kernel(const ParamEntry* table, int64_t num_params,
                                                                          int64_t first_unit, PerturbArgs a) {
  __shared__ ParamEntry entry;
  __shared__ RowSum::TempStorage tmp;
  const ParamEntry& p = block_entry(table, num_params, first_unit, entry);
  const int64_t unit = block_unit(first_unit) - p.first_unit, segment = p.partial_offset + unit;
  const Span span = segment_span<T>(p, unit);
  const bool row_fisher = p.fisher != nullptr && !p.sigma_per_element;
  double sumsq = 0.0, fsum = 0.0;
  sum_vectors<T, false>(static_cast<const T*>(p.w) + span.first, row_fisher ? p.fisher + span.first : nullptr, span,
                        threadIdx.x, kThreads, entry_aligned(p), nullptr, sumsq, fsum);
  sumsq = RowSum::sum(tmp, sumsq);
  if (row_fisher) fsum = RowSum::sum(tmp, fsum);
  if (threadIdx.x == 0) {
    a.partials[2 * segment] = sumsq;
    a.partials[2 * segment + 1] = fsum;
  }
}

// Second launch for split rows: each block adds its row's partial sums in segment order (every segment of a
// row gets the same sigma) and updates its segment, reading w again.
template <class T, bool kPerElement>
__device__ __forceinline__ void perturb_segment(const ParamEntry& p, int64_t unit, const PerturbArgs& a) {
  const int64_t row = segment_row<kPerElement>(p, unit);
  const double* partials = a.partials + 2 * (p.partial_offset + row * p.segments);
  double sumsq = 0.0, fsum = 0.0;
  for (int64_t s = 0; s < p.segments; ++s) {
    sumsq += partials[2 * s];
    fsum += partials[2 * s + 1];
  }
  const bool row_fisher = p.fisher != nullptr && !kPerElement;
  const float row_sig = row_sigma(sumsq, p.gamma, p.whole_tensor, row_fisher, fsum, p.eta);
  if (!kPerElement && unit == row * p.segments && threadIdx.x == 0) a.sigma[p.sigma_offset + row] = row_sig;
  if (kPerElement) {
    element_sigmas(p, a, segment_span<T, kPerElement>(p, unit), threadIdx.x, kThreads, sumsq);
    __syncthreads();
  }
  update_vectors<T, kPerElement, false>(p, a, segment_span<T, kPerElement>(p, unit), threadIdx.x, kThreads,
                                        entry_aligned(p), nullptr, row_sig);
}

// One instantiation per dtype, sigma mode and row split (a launch takes the entries of one), for fewer
// registers.
template <class T, bool kPerElement, bool kSplit>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm)
    perturb_kernel(const ParamEntry* table, int64_t num_params, int64_t first_unit, PerturbArgs a) {
  __shared__ ParamEntry entry;
  const ParamEntry& p = block_entry(table, num_params, first_unit, entry);
  if constexpr (kSplit) {
    perturb_segment<T, kPerElement>(p, block_unit(first_unit) - p.first_unit, a);
  } else {
    __shared__ RowSum::TempStorage tmp;
    __shared__ Stage stage;
    perturb_rows<T, kPerElement>(p, first_unit, a, tmp, stage.bytes);
  }
}

// ---- restore_ and sgd_step_ ------------------------------------------------------------------------

// The sigma of each element e .. e+N-1 (per row, or per element for 0-D/1-D ARWP parameters).
template <int N>
__device__ __forceinline__ void elem_sigmas(const ParamEntry& p, const float* sigmas, int64_t e, int64_t hi,
                                            float (&sg)[N]) {
  int64_t row = e / p.row_len;
  int64_t in_row = e - row * p.row_len;
#pragma unroll
  for (int j = 0; j < N; ++j) {
    if (in_row == p.row_len) {
      ++row;
      in_row = 0;
    }
    sg[j] = e + j < hi ? sigmas[p.sigma_per_element ? e + j : row] : 0.0f;
    ++in_row;
  }
}

// Fisher update from the gradient as it arrives, and the mixed gradient, for N elements.
template <int N>
__device__ __forceinline__ void mix_elems(float (&g)[N], float (&fisher)[N], bool has_fisher, const float (&clean)[N],
                                          bool has_clean, const MixScalars& mix) {
#pragma unroll
  for (int j = 0; j < N; ++j) {
    if (has_fisher) fisher[j] = fisher_update(fisher[j], g[j], mix);
    g[j] = mix_grad(g[j], clean[j], has_clean, mix);
  }
}

// Calls vector(e, vec) for this thread's vectors e .. e+N-1 of [lo, hi) (lo a multiple of N), with vec a
// compile-time flag: true for whole vectors of aligned tensors (16-byte accesses).

template <int N, class Body>
__device__ __forceinline__ void for_vectors(int64_t lo, int64_t hi, bool aligned, const Body& vector) {
  const int64_t full_end = aligned ? lo + (hi - lo) / N * N : lo;
  for (int64_t e = lo + N * threadIdx.x; e < full_end; e += N * blockDim.x) vector(e, VecFlag<true>{});
  for (int64_t e = full_end + N * threadIdx.x; e < hi; e += N * blockDim.x) vector(e, VecFlag<false>{});
}

template <class T>
__device__ __forceinline__ void restore_chunk(const ParamEntry& p, int64_t lo, int64_t hi, const RestoreArgs& a) {
  constexpr int N = kVecElems<T>;
  T* w = static_cast<T*>(p.w);
  const T* backup = static_cast<const T*>(p.backup);
  T* grad = static_cast<T*>(p.grad);
  const T* clean = static_cast<const T*>(p.clean);
  const MixScalars mix = a.mix.get();
  const uint32_t param_index = p.param_index;
  float* const fisher = p.fisher;
  const bool aligned = aligned16(w) && aligned16(backup) && aligned16(grad) && aligned16(clean) && aligned16(fisher);
  for_vectors<N>(lo, hi, aligned, [&](int64_t e, auto flag) {
    constexpr bool vec = decltype(flag)::value;
    if (backup) {
      store_raw(w, e, lo, hi, vec, load_raw(backup, e, lo, hi, vec));
    } else {
      float sg[N];
      elem_sigmas(p, a.sigma + p.sigma_offset, e, hi, sg);
      const Vec<T> raw = load_raw(w, e, lo, hi, vec);
      Vec<T> out;  // one Philox block at a time, each result rounded to T at once: fewer live registers
#pragma unroll
      for (int c = 0; c < N / 4; ++c) {
        float z[4];
        normals(e + 4 * c, param_index, a.key, z);
#pragma unroll
        for (int j = 0; j < 4; ++j)
          from_f32(remove_noise(to_f32(raw.x[4 * c + j]), sg[4 * c + j], z[j]), out.x + 4 * c + j);
      }
      store_raw(w, e, lo, hi, vec, out);
    }
    if (!grad) return;
    float g[N], c[N] = {}, f[N] = {};
    load_elems(grad, e, lo, hi, vec, g);
    if (clean) load_elems(clean, e, lo, hi, vec, c);
    if (fisher) load_elems(fisher, e, lo, hi, vec, f);
    mix_elems(g, f, fisher != nullptr, c, clean != nullptr, mix);
    store_elems(grad, e, lo, hi, vec, g);
    if (fisher) store_elems(fisher, e, lo, hi, vec, f);
  });
}

template <class T>
__device__ __forceinline__ void sgd_chunk(const ParamEntry& p, int64_t lo, int64_t hi, const SgdArgs& a) {
  constexpr int N = kVecElems<T>;
  T* w = static_cast<T*>(p.w);
  const T* backup = static_cast<const T*>(p.backup);
  const T* grad = static_cast<const T*>(p.grad);
  const T* clean = static_cast<const T*>(p.clean);
  T* buf = static_cast<T*>(p.buf);
  float* const fisher = p.fisher;
  const bool aligned = aligned16(w) && aligned16(backup) && aligned16(grad) && aligned16(clean) && aligned16(buf) &&
                       aligned16(fisher);
  if (a.found_inf != nullptr && *a.found_inf != 0.0f) {  // GradScaler overflow: restore only
    if (backup) {
      for_vectors<N>(lo, hi, aligned, [&](int64_t e, auto flag) {
        constexpr bool vec = decltype(flag)::value;
        store_raw(w, e, lo, hi, vec, load_raw(backup, e, lo, hi, vec));
      });
    }
    return;
  }
  const SgdScalars& s = a.sgd;
  const MixScalars mix = a.mix.get();
  const bool read_buf = s.has_momentum && !s.first_step;
  for_vectors<N>(lo, hi, aligned, [&](int64_t e, auto flag) {
    constexpr bool vec = decltype(flag)::value;
    float g[N], x[N], c[N] = {}, f[N] = {}, b[N] = {};
    load_elems(grad, e, lo, hi, vec, g);
    if (clean) load_elems(clean, e, lo, hi, vec, c);
    if (fisher) load_elems(fisher, e, lo, hi, vec, f);
    mix_elems(g, f, fisher != nullptr, c, clean != nullptr, mix);
    load_elems(backup ? backup : w, e, lo, hi, vec, x);
    if (read_buf) load_elems(buf, e, lo, hi, vec, b);
#pragma unroll
    for (int j = 0; j < N; ++j) sgd_update(x[j], b[j], g[j], s);
    store_elems(w, e, lo, hi, vec, x);
    if (s.has_momentum) store_elems(buf, e, lo, hi, vec, b);
    if (fisher) store_elems(fisher, e, lo, hi, vec, f);
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
__global__ void __launch_bounds__(kThreads, kBlocksPerSm) restore_kernel(const ParamEntry* table, int64_t num_params,
                                                           int64_t first_unit, RestoreArgs a) {
  for_block_chunk(table, num_params, first_unit,
                  [&](const ParamEntry& p, int64_t lo, int64_t hi) { restore_chunk<T>(p, lo, hi, a); });
}

template <class T>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm) sgd_kernel(const ParamEntry* table, int64_t num_params, int64_t first_unit,
                                                       SgdArgs a) {
  for_block_chunk(table, num_params, first_unit,
                  [&](const ParamEntry& p, int64_t lo, int64_t hi) { sgd_chunk<T>(p, lo, hi, a); });
}

// One block per work unit: the grid's x dimension holds up to 2^31 - 1 blocks.
bool too_many(int64_t units) { return units > 0x7FFFFFFF; }

unsigned grid_for(int64_t items) {
  return static_cast<unsigned>(std::min<int64_t>(std::max<int64_t>(1, (items + kThreads - 1) / kThreads), 1 << 20));
}

// Launches kernel_for(T{}) of the launch's dtype T on its entries: one block per work unit.
template <class Args, class KernelFor>
cudaError_t launch_table(const ParamEntry* table, const Launch& l, const Args& args, cudaStream_t cuda_stream,
                         const KernelFor& kernel_for) {
  if (too_many(l.units)) return cudaErrorInvalidConfiguration;
  cudaError_t err = cudaSuccess;
  dispatch_dtype<half_bits, bf16_bits>(l.dtype, [&](auto t) {
    const auto kernel = kernel_for(t);
    err = RWP_LAUNCH(kernel, static_cast<unsigned>(l.units), kThreads, cuda_stream, table + l.first, l.count,
                     l.first_unit, args);
  });
  return err;
}

}  // namespace

cudaError_t philox(const int64_t* counter, const int64_t* key, int64_t* out, int64_t n, cudaStream_t cuda_stream) {
  return RWP_LAUNCH(philox_kernel, grid_for(n), kThreads, cuda_stream, counter, key, out, n);
}

cudaError_t noise(float* out, int64_t numel, int64_t offset, uint32_t param_index, NoiseKey key, cudaStream_t cuda_stream) {
  return RWP_LAUNCH(noise_kernel, grid_for((numel + 3) / 4 + 1), kThreads, cuda_stream, out, numel, offset, param_index, key);
}

cudaError_t perturb(const ParamEntry* table, const Launch& l, PerturbArgs args, cudaStream_t cuda_stream) {
  if (l.split) {
    const cudaError_t err =
        launch_table(table, l, args, cuda_stream, [](auto t) { return partials_kernel<decltype(t)>; });
    if (err != cudaSuccess) return err;
    return launch_table(table, l, args, cuda_stream, [&](auto t) {
      using T = decltype(t);
      return l.per_element ? perturb_kernel<T, true, true> : perturb_kernel<T, false, true>;
    });
  }
  return launch_table(table, l, args, cuda_stream, [&](auto t) {
    using T = decltype(t);
    return l.per_element ? perturb_kernel<T, true, false> : perturb_kernel<T, false, false>;
  });
}

cudaError_t restore(const ParamEntry* table, const Launch& l, RestoreArgs args, cudaStream_t cuda_stream) {
  return launch_table(table, l, args, cuda_stream, [](auto t) { return restore_kernel<decltype(t)>; });
}

cudaError_t sgd_step(const ParamEntry* table, const Launch& l, SgdArgs args, cudaStream_t cuda_stream) {
  return launch_table(table, l, args, cuda_stream, [](auto t) { return sgd_kernel<decltype(t)>; });
}

}  // namespace rwp::cuda
