// The kernels' interface: plain structs and raw pointers, no torch types, so that the CUDA sources
// compile without torch headers. binding.cpp fills these from tensors.
#pragma once

#include <stdint.h>

#include "rwp_common.h"

namespace rwp {

enum DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// One parameter of a call and its companions (nullptr where absent). Plain data: the CUDA kernels
// read a device copy of the same table, which is cached while its contents stay the same (so the
// sigmas, new every step, are addressed by offset). Every companion has the parameter's dtype and
// memory layout, except fisher (float32).
struct ParamEntry {
  void* w;
  void* backup;
  void* grad;
  void* clean;          // clean gradient of the mix
  void* buf;            // momentum buffer
  float* fisher;        // ARWP Fisher state
  int64_t numel;
  int64_t row_len;      // elements of one norm row (numel for a 0-D/1-D parameter)
  int64_t rows;         // numel / row_len
  int64_t first_unit;   // index of this parameter's first work unit; units are numbered across the call
  int64_t unit_size;    // rows per unit (perturb_) or elements per unit (restore_, sgd_step_)
  int64_t sigma_offset; // index of the parameter's first sigma in the call's sigma array (args.sigma)
  int64_t segments;     // CUDA perturb_ of rows longer than the stage: segments per row, one unit each (else 0)
  int64_t partial_offset;  // with segments: index of the parameter's first segment in args.partials
  double gamma;
  double eta;
  uint32_t param_index;
  int32_t dtype;         // DType
  int32_t whole_tensor;  // 0-D/1-D parameter: norm of the whole tensor, plus kNormEps
  int32_t sigma_per_element;  // 0-D/1-D parameter with ARWP: one sigma per element
  int32_t row_threads;   // CUDA perturb_: threads per row (cuda_row_threads); 0 elsewhere
};

// The index of the parameter that owns work unit `unit`: the last entry whose first_unit is <= unit (the
// entries are in unit order). The one lookup of the CPU and the CUDA kernels.
RWP_HD int64_t owner_of(const ParamEntry* table, int64_t num_params, int64_t unit) {
  int64_t lo = 0, hi = num_params - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (table[mid].first_unit <= unit) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// fn(T{}) with T the storage type of `dtype`: float, or the build's 16-bit types Half and BF16 (the CPU and
// the CUDA kernels have their own). The functor may be device-only: no host/device call check here.
#if defined(__CUDACC__)
#pragma nv_exec_check_disable
#endif
template <class Half, class BF16, class Fn>
RWP_HD void dispatch_dtype(int32_t dtype, const Fn& fn) {
  switch (dtype) {
    case kFloat16: fn(Half{}); break;
    case kBFloat16: fn(BF16{}); break;
    default: fn(float{}); break;
  }
}

// Number of work units of a parameter (the table's first_unit of the next parameter minus this one's).
inline int64_t units_of(const ParamEntry& e, bool per_row) {
  if (per_row && e.segments) return e.rows * e.segments;
  const int64_t n = per_row ? e.rows : e.numel;
  return (n + e.unit_size - 1) / e.unit_size;
}

// A uniform float argument: a value, or a float32 scalar in memory (a device tensor: no host sync).
struct ScalarArg {
  const float* ptr;
  float value;
  RWP_HD float get() const { return ptr ? *ptr : value; }
};

// The noise stream's key (its ten Philox round keys, round 0's being the key itself) and step.
struct NoiseKey {
  uint32_t step;
  PhiloxRoundKeys rounds;
  RWP_HD PhiloxKey key() const { return {rounds.k0[0], rounds.k1[0]}; }
};

inline NoiseKey noise_key(uint32_t k0, uint32_t k1, uint32_t step) { return {step, philox_round_keys({k0, k1})}; }

struct PerturbArgs {
  NoiseKey key;
  ScalarArg grad_scale;
  float* sigma;  // written: sigma of each row (or element, see ParamEntry::sigma_per_element)
  double* partials;  // CUDA scratch: per segment of a split row, its sum of squares and of the Fisher state
};

struct MixArgs {
  ScalarArg grad_scale, fisher_scale, clean_scale;
  float beta;
  RWP_HD MixScalars get() const { return {grad_scale.get(), fisher_scale.get(), clean_scale.get(), beta}; }
};

struct RestoreArgs {
  NoiseKey key;        // used when regenerating the noise (the entries have no backup)
  const float* sigma;  // with the regenerated noise: the sigmas perturb_ wrote
  MixArgs mix;
};

struct SgdArgs {
  SgdScalars sgd;
  MixArgs mix;
  const float* found_inf;  // nonzero: restore only
};

// Work-unit sizes. CPU: rows are grouped into cache-sized tiles; CUDA: perturb_ takes a block of rows
// (cuda_row_threads), restore_ and sgd_step_ a chunk of elements.
constexpr int64_t kCpuTileElems = 16384;
constexpr int64_t kCpuChunkElems = 16384;
constexpr int64_t kCudaChunkElems = 8192;
constexpr int kCudaThreads = 256;

inline int64_t dtype_bytes(int32_t dtype) { return dtype == kFloat32 ? 4 : 2; }

// CUDA perturb_ reads a row from DRAM once: its block keeps it in shared memory (the stage) between the norm
// and the update. Each of a block's rows gets an equal share of the stage, in 16-byte vectors: as many per
// thread of its group of row_threads.
constexpr int64_t kCudaStageBytes = 6144 * 4;
static_assert(kCudaStageBytes / 16 % kCudaThreads == 0, "the stage divides evenly among the threads");
RWP_HD int64_t cuda_stage_vectors(int64_t row_threads) { return kCudaStageBytes / 16 / kCudaThreads * row_threads; }

// The most 16-byte vectors a row of row_len elements touches, wherever it starts.
RWP_HD int64_t row_vectors_at_most(int64_t row_len, int64_t vec_elems) { return (row_len - 1) / vec_elems + 2; }

// CUDA perturb_: a row goes to a group of threads, the smallest power of two from 8 to kCudaThreads whose
// share of the stage holds the row (each thread then takes 3 to 6 of its vectors), and a block holds
// kCudaThreads / group rows: a block's prologue, BlockSum and sigma serve as many elements as the stage
// allows, and short rows do not leave most of a block idle.
inline int cuda_row_threads(int64_t row_len, int32_t dtype) {
  const int64_t vectors = row_vectors_at_most(row_len, 16 / dtype_bytes(dtype));
  int group = 8;
  while (cuda_stage_vectors(group) < vectors && group < kCudaThreads) group *= 2;
  return group;
}

// A row longer than its share of the stage is split into segments of kCudaSegmentElems elements, one block
// each, and summed in two launches: each segment's partial sums first, then the update, which adds the
// row's partial sums in order (so every segment computes the same sigma). Segments per row, or 0 for a row
// that fits the stage.
constexpr int64_t kCudaSegmentElems = 8192;
inline int64_t cuda_row_segments(int64_t row_len, int32_t dtype) {
  if (row_vectors_at_most(row_len, 16 / dtype_bytes(dtype)) <= cuda_stage_vectors(cuda_row_threads(row_len, dtype))) {
    return 0;
  }
  return (row_len + kCudaSegmentElems - 1) / kCudaSegmentElems;
}

// CPU entry points (cpu/cpu_kernels.cpp). `units` is the total over the table.
namespace cpu {
int64_t perturb_unit_rows(int64_t row_len);
void philox(const int64_t* counter, const int64_t* key, int64_t* out, int64_t n);
void noise(float* out, int64_t numel, int64_t offset, uint32_t param_index, NoiseKey key);
void perturb(const ParamEntry* table, int64_t num_params, int64_t units, const PerturbArgs& args);
void restore(const ParamEntry* table, int64_t num_params, int64_t units, const RestoreArgs& args);
void sgd_step(const ParamEntry* table, int64_t num_params, int64_t units, const SgdArgs& args);
}  // namespace cpu

}  // namespace rwp
