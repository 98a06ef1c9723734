// Self-test of the emulated SIMT layer (csrc/emu): compiled and run by tests/test_cuda_emu.py, also under
// AddressSanitizer. Prints one line per check ("ok name" or "FAIL name: why"); exit status 1 on a failure.
#include <cstdio>
#include <set>
#include <string>
#include <vector>

#include "../../csrc/cuda/block_sum.h"
#include "../../csrc/cuda/simt.h"

namespace {

int failures = 0;

void report(bool ok, const char* name, const std::string& why = "") {
  std::printf(ok ? "ok %s\n" : "FAIL %s: %s\n", name, why.c_str());
  failures += !ok;
}

constexpr int kThreads = 256;

// Thread 0 publishes a value that the others read, with or without the barrier in between.
__global__ void publish(int* out, bool with_barrier) {
  __shared__ int value;
  if (threadIdx.x == 0) value = 0;
  __syncthreads();
  if (threadIdx.x == 0) value = 1;
  if (with_barrier) __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = value;
}

__global__ void divergent_barriers() {
  if (threadIdx.x < 16) {
    __syncthreads();
  } else {
    __syncthreads();
  }
}

__global__ void early_return() {
  if (threadIdx.x == 3) return;
  __syncthreads();
}

__global__ void block_sums(double* out) {
  __shared__ rwp::cuda::BlockSum<kThreads>::TempStorage tmp;
  const double total = rwp::cuda::BlockSum<kThreads>::sum(tmp, threadIdx.x + 0.5 * blockIdx.x);
  out[blockIdx.x * blockDim.x + threadIdx.x] = total;
}

__global__ void indices(int* seen) {
  const unsigned t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const unsigned b = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  seen[b * blockDim.x * blockDim.y * blockDim.z + t] += 1;
}

std::vector<int> run_publish(bool with_barrier, uint64_t seed) {
  std::vector<int> out(4 * kThreads, -1);
  rwp::simt::set_schedule_seed(seed);
  RWP_LAUNCH(publish, 4, kThreads, nullptr, out.data(), with_barrier);
  return out;
}

}  // namespace

int main() {
  {  // a missing barrier changes the result from seed to seed; with it, every thread reads 1
    std::set<std::vector<int>> outcomes;
    int stale = 0;
    for (uint64_t seed = 0; seed < 8; ++seed) {
      const std::vector<int> out = run_publish(false, seed);
      for (int v : out) stale += v == 0;
      outcomes.insert(out);
    }
    report(stale > 0 && outcomes.size() == 8, "race_shows_up",
           std::to_string(stale) + " stale reads, " + std::to_string(outcomes.size()) + " distinct outcomes of 8");
    bool all_one = true;
    for (uint64_t seed = 0; seed < 8; ++seed)
      for (int v : run_publish(true, seed)) all_one = all_one && v == 1;
    report(all_one, "barrier_orders_threads");
    report(run_publish(false, 5) == run_publish(false, 5), "seed_reproduces_order");
  }
  {
    const cudaError_t err = RWP_LAUNCH(divergent_barriers, 1, kThreads, nullptr);
    report(err == cudaErrorLaunchFailure && rwp::simt::last_error().find("different __syncthreads") != std::string::npos,
           "divergent_barriers_fail", rwp::simt::last_error());
  }
  {
    const cudaError_t err = RWP_LAUNCH(early_return, 1, kThreads, nullptr);
    report(err == cudaErrorLaunchFailure && rwp::simt::last_error().find("not reached by every thread") != std::string::npos,
           "early_return_fails", rwp::simt::last_error());
  }
  {  // every thread gets its block's exact total, whatever the order
    const int blocks = 9;
    bool ok = true;
    for (uint64_t seed = 0; seed < 3; ++seed) {
      std::vector<double> out(blocks * kThreads);
      rwp::simt::set_schedule_seed(seed);
      ok = ok && RWP_LAUNCH(block_sums, blocks, kThreads, nullptr, out.data()) == cudaSuccess;
      for (int b = 0; b < blocks; ++b)
        for (int t = 0; t < kThreads; ++t) ok = ok && out[b * kThreads + t] == kThreads * (kThreads - 1) / 2 + 0.5 * b * kThreads;
    }
    report(ok, "block_sum_exact");
  }
  {  // 3-D grids and blocks: every (block, thread) runs exactly once
    const dim3 grid(3, 2, 2), block(8, 4, 2);
    std::vector<int> seen(3 * 2 * 2 * 8 * 4 * 2, 0);
    const bool launched = RWP_LAUNCH(indices, grid, block, nullptr, seen.data()) == cudaSuccess;
    bool once = launched;
    for (int v : seen) once = once && v == 1;
    report(once, "every_thread_once");
  }
  {
    report(RWP_LAUNCH(early_return, 1, 2048, nullptr) == cudaErrorInvalidConfiguration, "too_many_threads_refused");
    report(RWP_LAUNCH(early_return, dim3(1, 70000), 32, nullptr) == cudaErrorInvalidConfiguration, "grid_y_limit_refused");
  }
  return failures ? 1 : 0;
}
