// The fiber scheduler behind simt_emu.h. The context switch is a few lines of assembly on x86-64 (saving
// the callee-saved registers and the stack pointer) and ucontext elsewhere.
#include "simt_emu.h"

#include <algorithm>
#include <atomic>
#include <memory>
#include <mutex>
#include <random>
#include <thread>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define RWP_SIMT_ASAN 1
#endif

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace rwp::simt {
namespace {

#if defined(RWP_SIMT_ASAN)
constexpr size_t kStackBytes = 1 << 19;  // AddressSanitizer's redzones make frames larger
#else
constexpr size_t kStackBytes = 1 << 16;
#endif

// ---- context switch ---------------------------------------------------------------------------------------

#if defined(__x86_64__)
extern "C" void rwp_simt_switch(void** save_sp, void* resume_sp);
asm(R"(
.text
.p2align 4
.globl rwp_simt_switch
.hidden rwp_simt_switch
.type rwp_simt_switch, @function
rwp_simt_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size rwp_simt_switch, .-rwp_simt_switch
)");

struct Context {
  void* sp = nullptr;
};

void switch_context(Context& from, const Context& to) { rwp_simt_switch(&from.sp, to.sp); }

// A context that starts entry() on the stack [base, base + bytes): six zero registers, then entry's address
// for the switch's ret, then a zero return address, with the stack 16-byte aligned at entry's call.
void make_context(Context& ctx, char* base, size_t bytes, void (*entry)()) {
  auto top = reinterpret_cast<uintptr_t>(base + bytes) & ~uintptr_t{15};
  auto* words = reinterpret_cast<void**>(top);
  words[-1] = nullptr;
  words[-2] = reinterpret_cast<void*>(entry);
  for (int i = 3; i <= 8; ++i) words[-i] = nullptr;
  ctx.sp = words - 8;
}
#else
struct Context {
  ucontext_t uc;
};

void switch_context(Context& from, const Context& to) { swapcontext(&from.uc, &to.uc); }

void make_context(Context& ctx, char* base, size_t bytes, void (*entry)()) {
  getcontext(&ctx.uc);
  ctx.uc.uc_stack.ss_sp = base;
  ctx.uc.uc_stack.ss_size = bytes;
  ctx.uc.uc_link = nullptr;
  makecontext(&ctx.uc, entry, 0);
}
#endif

// ---- blocks -------------------------------------------------------------------------------------------------

struct Fiber {
  Context ctx;
  uint3 index{};
  const char* barrier_file = nullptr;  // where it waits
  int barrier_line = 0;
  bool done = false;
  void* asan_fake_stack = nullptr;
};

// The block an OS thread is running, with its fibers and their stacks (reused from block to block).
struct Block {
  dim3 grid, dim;
  uint3 index{};
  const std::function<void()>* body = nullptr;
  std::vector<Fiber> fibers;
  std::unique_ptr<char[]> stacks;
  Fiber* current = nullptr;
  Context scheduler;
  const void* scheduler_stack = nullptr;  // for AddressSanitizer: the OS thread's stack
  size_t scheduler_stack_bytes = 0;
  std::string error;
};

thread_local Block* tl_block = nullptr;
thread_local std::string tl_last_error;

std::atomic<uint64_t> g_seed{0};
std::atomic<uint64_t> g_launches{0};

// AddressSanitizer must be told when the stack changes (no-ops without it).
void asan_start_switch(void** fake_stack, const void* bottom, size_t bytes) {
#if defined(RWP_SIMT_ASAN)
  __sanitizer_start_switch_fiber(fake_stack, bottom, bytes);
#else
  (void)fake_stack, (void)bottom, (void)bytes;
#endif
}

void asan_finish_switch(void* fake_stack, const void** old_bottom, size_t* old_bytes) {
#if defined(RWP_SIMT_ASAN)
  __sanitizer_finish_switch_fiber(fake_stack, old_bottom, old_bytes);
#else
  (void)fake_stack, (void)old_bottom, (void)old_bytes;
#endif
}

char* stack_of(Block& b, const Fiber& f) { return b.stacks.get() + (&f - b.fibers.data()) * kStackBytes; }

// From the running fiber back to the scheduler; `dying`: the fiber will not be resumed.
void yield_to_scheduler(Block& b, Fiber& f, bool dying) {
  asan_start_switch(dying ? nullptr : &f.asan_fake_stack, b.scheduler_stack, b.scheduler_stack_bytes);
  switch_context(f.ctx, b.scheduler);
  asan_finish_switch(f.asan_fake_stack, &b.scheduler_stack, &b.scheduler_stack_bytes);
}

void fiber_main() {
  Block& b = *tl_block;
  Fiber& f = *b.current;
  asan_finish_switch(nullptr, &b.scheduler_stack, &b.scheduler_stack_bytes);
  (*b.body)();
  f.done = true;
  yield_to_scheduler(b, f, /*dying=*/true);
  __builtin_trap();  // a finished fiber is never resumed
}

void resume(Block& b, Fiber& f) {
  b.current = &f;
  void* fake_stack = nullptr;
  asan_start_switch(&fake_stack, stack_of(b, f), kStackBytes);
  switch_context(b.scheduler, f.ctx);
  asan_finish_switch(fake_stack, nullptr, nullptr);
  b.current = nullptr;
}

std::string where(const Fiber& f) {
  return "thread (" + std::to_string(f.index.x) + "," + std::to_string(f.index.y) + "," + std::to_string(f.index.z) +
         ") at " + f.barrier_file + ":" + std::to_string(f.barrier_line);
}

// Runs one block to completion; false (and b.error) on a barrier misuse.
bool run_block(Block& b, uint64_t seed) {
  const size_t n = b.fibers.size();
  for (size_t i = 0; i < n; ++i) {
    Fiber& f = b.fibers[i];
    f = Fiber{};
    f.index = {static_cast<unsigned>(i % b.dim.x), static_cast<unsigned>(i / b.dim.x % b.dim.y),
               static_cast<unsigned>(i / (b.dim.x * b.dim.y))};
    make_context(f.ctx, stack_of(b, f), kStackBytes, fiber_main);
  }
  std::mt19937_64 rng(seed);
  std::vector<size_t> order(n);
  for (size_t i = 0; i < n; ++i) order[i] = i;
  while (!order.empty()) {
    std::shuffle(order.begin(), order.end(), rng);
    for (size_t i : order) {
      b.fibers[i].barrier_file = nullptr;
      resume(b, b.fibers[i]);
    }
    std::vector<size_t> waiting;
    for (size_t i : order)
      if (!b.fibers[i].done) waiting.push_back(i);
    if (waiting.empty()) break;
    const Fiber& first = b.fibers[waiting.front()];
    if (waiting.size() != n) {
      const auto exited = std::find_if(b.fibers.begin(), b.fibers.end(), [](const Fiber& f) { return f.done; });
      b.error = "__syncthreads() not reached by every thread: " + where(first) + " waits, thread (" +
                std::to_string(exited->index.x) + ",...) has returned";
      return false;
    }
    for (size_t i : waiting) {
      const Fiber& f = b.fibers[i];
      if (f.barrier_line != first.barrier_line || std::strcmp(f.barrier_file, first.barrier_file) != 0) {
        b.error = "threads wait at different __syncthreads(): " + where(first) + ", " + where(f);
        return false;
      }
    }
    order = std::move(waiting);
  }
  return true;
}

uint64_t mix(uint64_t a, uint64_t b) {  // splitmix64 of a combination: well-spread seeds per block
  uint64_t z = a * 0x9E3779B97F4A7C15ull + b + 0x632BE59BD9B4E019ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

unsigned worker_count(uint64_t blocks) {
  const unsigned hw = std::max(1u, std::thread::hardware_concurrency());
  return static_cast<unsigned>(std::min<uint64_t>({hw, 8, blocks}));
}

}  // namespace

const uint3& thread_index() { return tl_block->current->index; }
const uint3& block_index() { return tl_block->index; }
const dim3& block_dim() { return tl_block->dim; }
const dim3& grid_dim() { return tl_block->grid; }

void sync_threads(const char* file, int line) {
  Block& b = *tl_block;
  Fiber& f = *b.current;
  f.barrier_file = file;
  f.barrier_line = line;
  yield_to_scheduler(b, f, /*dying=*/false);
}

const std::string& last_error() { return tl_last_error; }

void set_schedule_seed(uint64_t seed) {
  g_seed = seed;
  g_launches = 0;
}

cudaError_t run_grid(dim3 grid, dim3 block, const std::function<void()>& thread_body) {
  const uint64_t threads = uint64_t{block.x} * block.y * block.z;
  const uint64_t blocks = uint64_t{grid.x} * grid.y * grid.z;
  if (threads == 0 || threads > 1024 || block.z > 64 || blocks == 0 || grid.x > 0x7FFFFFFFu || grid.y > 65535 ||
      grid.z > 65535) {
    tl_last_error = "invalid launch configuration";
    return cudaErrorInvalidConfiguration;
  }
  const uint64_t launch_seed = mix(g_seed.load(), g_launches.fetch_add(1));
  std::atomic<uint64_t> next{0};
  std::mutex error_mu;
  std::string error;
  auto work = [&] {
    Block b;
    b.grid = grid;
    b.dim = block;
    b.body = &thread_body;
    b.fibers.resize(threads);
    b.stacks.reset(new char[threads * kStackBytes]);
    tl_block = &b;
    for (uint64_t i; (i = next.fetch_add(1)) < blocks;) {
      b.index = {static_cast<unsigned>(i % grid.x), static_cast<unsigned>(i / grid.x % grid.y),
                 static_cast<unsigned>(i / (uint64_t{grid.x} * grid.y))};
      if (!run_block(b, mix(launch_seed, i))) {
        const std::lock_guard<std::mutex> lock(error_mu);
        if (error.empty()) error = b.error;
        next = blocks;
      }
    }
    tl_block = nullptr;
  };
  const unsigned workers = worker_count(blocks);
  std::vector<std::thread> pool;
  for (unsigned w = 1; w < workers; ++w) pool.emplace_back(work);
  work();
  for (std::thread& t : pool) t.join();
  if (!error.empty()) {
    tl_last_error = error;
    return cudaErrorLaunchFailure;
  }
  return cudaSuccess;
}

}  // namespace rwp::simt
