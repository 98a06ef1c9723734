// The sum of one double per thread over each aligned group of `group` threads of a block (a power of two
// that divides the block; the whole block by default), returned to the group's threads: a tree in shared
// memory. The CUDA and the emulated build run this same code, so both add in the same order.
#pragma once

#include "simt.h"

namespace rwp::cuda {

template <int kThreads>
struct BlockSum {
  static_assert(kThreads > 0 && (kThreads & (kThreads - 1)) == 0, "a power of two threads");
  struct TempStorage {
    double partial[kThreads];
  };

  __device__ __forceinline__ static double sum(TempStorage& tmp, double x, unsigned group = kThreads) {
    const unsigned t = threadIdx.x, lane = t & (group - 1);
    tmp.partial[t] = x;
    __syncthreads();
    for (unsigned half = group / 2; half > 0; half /= 2) {
      if (lane < half) tmp.partial[t] += tmp.partial[t + half];
      __syncthreads();
    }
    const double total = tmp.partial[t - lane];
    __syncthreads();  // tmp is free again once every thread has read the total
    return total;
  }
};

}  // namespace rwp::cuda
