// The CUDA vocabulary of the kernels, from CUDA itself or, in the emulated build (RWP_EMULATE_CUDA: the
// kernels compiled as host C++ and run on the CPU), from csrc/emu/simt_emu.h. RWP_LAUNCH(kernel, grid,
// block, stream, args...) is kernel<<<grid, block, 0, stream>>>(args...) and yields the launch's
// cudaError_t in both builds.
#pragma once

#if defined(RWP_EMULATE_CUDA)
#include "../emu/simt_emu.h"
#define RWP_LAUNCH(kernel, grid, block, cuda_stream, ...) \
  ::rwp::simt::launch((grid), (block), (cuda_stream), kernel __VA_OPT__(, ) __VA_ARGS__)
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#define RWP_LAUNCH(kernel, grid, block, cuda_stream, ...) \
  (kernel<<<(grid), (block), 0, (cuda_stream)>>>(__VA_ARGS__), cudaGetLastError())
#endif
