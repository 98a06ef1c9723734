// Launchers of the CUDA kernels (cuda_kernels.cu): raw pointers and a CUDA stream, no torch types.
// `table` is a device copy of the parameter table; every launch is asynchronous on `cuda_stream`.
#pragma once

#include "simt.h"

#include "../rwp_api.h"

namespace rwp::cuda {

cudaError_t philox(const int64_t* counter, const int64_t* key, int64_t* out, int64_t n, cudaStream_t cuda_stream);
cudaError_t noise(float* out, int64_t numel, int64_t offset, uint32_t param_index, NoiseKey key, cudaStream_t cuda_stream);

// One launch of a table op: the entries table[first .. first + count), all of dtype `dtype` (and for
// perturb_ all with or all without per-element sigmas, and all with or all without split rows), whose work
// units first_unit .. first_unit + units - 1 are numbered across the whole table. The kernels are compiled
// per variant, for fewer registers.
struct Launch {
  int64_t first, count, first_unit, units;
  int32_t dtype;
  bool per_element;
  bool split;  // perturb_: rows split into segments (ParamEntry::segments); two launches
};

cudaError_t perturb(const ParamEntry* table, const Launch& launch, PerturbArgs args, cudaStream_t cuda_stream);
cudaError_t restore(const ParamEntry* table, const Launch& launch, RestoreArgs args, cudaStream_t cuda_stream);
cudaError_t sgd_step(const ParamEntry* table, const Launch& launch, SgdArgs args, cudaStream_t cuda_stream);

}  // namespace rwp::cuda
