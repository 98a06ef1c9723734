// Launchers of the CUDA kernels (cuda_kernels.cu): raw pointers and a CUDA stream, no torch types.
// `table` is a device copy of the parameter table; every launch is asynchronous on `cuda_stream`.
#pragma once

#include "simt.h"

#include "../rwp_api.h"

namespace rwp::cuda {

cudaError_t philox(const int64_t* counter, const int64_t* key, int64_t* out, int64_t n, cudaStream_t cuda_stream);
cudaError_t noise(float* out, int64_t numel, int64_t offset, uint32_t param_index, NoiseKey key, cudaStream_t cuda_stream);
cudaError_t perturb(const ParamEntry* table, int64_t num_params, int64_t units, PerturbArgs args, cudaStream_t cuda_stream);
cudaError_t restore(const ParamEntry* table, int64_t num_params, int64_t units, RestoreArgs args, cudaStream_t cuda_stream);
cudaError_t sgd_step(const ParamEntry* table, int64_t num_params, int64_t units, SgdArgs args, cudaStream_t cuda_stream);

}  // namespace rwp::cuda
