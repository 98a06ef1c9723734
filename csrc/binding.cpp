// The torch binding: the op schemas (TORCH_LIBRARY(rwp_kernels)), and one implementation per op that
// turns tensor lists into the kernels' parameter table and calls the CPU or the CUDA kernels.
// This is the only translation unit that includes torch headers.
//
// Three builds: CPU kernels only; CPU and CUDA kernels (RWP_WITH_CUDA); and the emulated build
// (RWP_EMULATE_CUDA, csrc/emu): the CUDA kernels compiled as host C++ run on CPU tensors, through this same
// table building and argument packing, as the ops of the library rwp_kernels_emu (backend "cuda-emu").
//
// Absent companions: an empty list (the whole list absent) or an empty tensor (absent for one parameter).
// Float arguments that may live on the device come as (Tensor? t, float value): t's value if t is given.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <mutex>
#include <optional>
#include <tuple>
#include <vector>

#include "rwp_api.h"

#if defined(RWP_EMULATE_CUDA)
#include "cuda/cuda_kernels.h"
#define RWP_OPS rwp_kernels_emu
#define RWP_OPS_PREFIX "rwp_kernels_emu::"
#define RWP_CUDA_KERNELS
#elif defined(RWP_WITH_CUDA)
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/cuda_kernels.h"
#define RWP_CUDA_KERNELS
#endif
#if !defined(RWP_OPS)
#define RWP_OPS rwp_kernels
#define RWP_OPS_PREFIX "rwp_kernels::"
#endif

namespace rwp {
namespace {

using at::Tensor;
using at::TensorList;
using OptTensor = std::optional<Tensor>;

// Whether the CUDA kernels run on tensors like t: CUDA tensors, and in the emulated build CPU tensors.
bool on_cuda_kernels(const Tensor& t) {
#if defined(RWP_EMULATE_CUDA)
  return t.is_cpu();
#else
  return t.is_cuda();
#endif
}

int32_t dtype_code(const Tensor& t, const char* op, size_t i) {
  switch (t.scalar_type()) {
    case at::kFloat: return kFloat32;
    case at::kHalf: return kFloat16;
    case at::kBFloat16: return kBFloat16;
    default: TORCH_CHECK(false, RWP_OPS_PREFIX, op, ": params[", i, "] has unsupported dtype ", t.scalar_type());
  }
}

// A dense tensor whose rows (shape[0]) are contiguous runs: the layouts the kernels can walk.
void check_param(const Tensor& p, const Tensor& first, const char* op, size_t i) {
  TORCH_CHECK(p.device() == first.device(), RWP_OPS_PREFIX, op, ": params[", i, "] is on ", p.device(),
              " but params[0] is on ", first.device());
  TORCH_CHECK(p.numel() > 0, RWP_OPS_PREFIX, op, ": params[", i, "] is empty");
  TORCH_CHECK(p.is_non_overlapping_and_dense() && (p.dim() < 2 || p.size(0) == 1 || p.stride(0) == p.numel() / p.size(0)),
              RWP_OPS_PREFIX, op, ": params[", i, "] is not dense with contiguous rows");
}

// Same strides wherever the size is not 1 (as rwp_kernels._validate compares layouts).
bool same_layout(const Tensor& a, const Tensor& b) {
  if (a.sizes() != b.sizes()) return false;
  for (int64_t d = 0; d < a.dim(); ++d)
    if (a.size(d) != 1 && a.stride(d) != b.stride(d)) return false;
  return true;
}

// The companion `list[i]` of params[i] (nullptr if absent), checked to share its dtype, shape and layout.
void* companion(TensorList list, size_t i, const Tensor& p, const char* op, const char* name,
                std::optional<at::ScalarType> dtype = std::nullopt) {
  if (list.empty()) return nullptr;
  const Tensor& t = list[i];
  if (!t.defined() || t.numel() == 0) return nullptr;
  TORCH_CHECK(t.scalar_type() == dtype.value_or(p.scalar_type()) && same_layout(t, p) && t.device() == p.device(),
              RWP_OPS_PREFIX, op, ": ", name, "[", i, "] does not match params[", i, "] in dtype, shape, layout or device");
  return t.data_ptr();
}

void check_length(TensorList list, size_t n, const char* op, const char* name) {
  TORCH_CHECK(list.empty() || list.size() == n, RWP_OPS_PREFIX, op, ": ", name, " has ", list.size(),
              " entries but params has ", n);
}

ScalarArg scalar_arg(const OptTensor& t, double value, const Tensor& like, const char* op, const char* name) {
  if (!t.has_value()) return {nullptr, static_cast<float>(value)};
  TORCH_CHECK(t->numel() == 1 && t->scalar_type() == at::kFloat && t->device() == like.device(),
              RWP_OPS_PREFIX, op, ": ", name, " must be a one-element float32 tensor on ", like.device());
  return {t->data_ptr<float>(), 1.0f};
}

uint32_t word(int64_t v, const char* op, const char* name) {
  TORCH_CHECK(v >= 0 && v < (int64_t{1} << 32), RWP_OPS_PREFIX, op, ": ", name, " must be in [0, 2**32), got ", v);
  return static_cast<uint32_t>(v);
}

NoiseKey checked_noise_key(int64_t k0, int64_t k1, int64_t step, const char* op) {
  return noise_key(word(k0, op, "key0"), word(k1, op, "key1"), word(step, op, "step"));
}

// The parameter table of one call: common fields of every entry; units of kind rows (perturb_) or chunks.
struct Table {
  std::vector<ParamEntry> entries;
  int64_t units = 0;
  int64_t segments = 0;  // CUDA perturb_: segments of the rows split across blocks (ParamEntry::segments)
  bool cuda = false;
  bool by_rows = false;
};

// The per-parameter plan of a call, as rwp_kernels.ext_backend packs rwp_kernels.layout.ParamPlan: four
// words per parameter (row length, elements per sigma, param_index, 1 for a 0-D/1-D tensor).
constexpr size_t kPlanWords = 4;

Table make_table(TensorList params, at::IntArrayRef plan, bool by_rows, const char* op) {
  TORCH_CHECK(!params.empty(), RWP_OPS_PREFIX, op, ": params is empty");
  TORCH_CHECK(plan.size() == kPlanWords * params.size(), RWP_OPS_PREFIX, op, ": plan has ", plan.size(),
              " words but params needs ", kPlanWords * params.size());
  Table table;
  table.cuda = on_cuda_kernels(params[0]);
  table.by_rows = by_rows;
  TORCH_CHECK(table.cuda || params[0].is_cpu(), RWP_OPS_PREFIX, op, ": tensors on ", params[0].device(),
              " are not supported");
  for (size_t i = 0; i < params.size(); ++i) {
    const Tensor& p = params[i];
    check_param(p, params[0], op, i);
    const int64_t* words = plan.data() + kPlanWords * i;
    ParamEntry e{};
    e.w = p.data_ptr();
    e.numel = p.numel();
    e.row_len = words[0];
    const int64_t sigma_len = words[1];
    TORCH_CHECK(e.row_len > 0 && e.numel % e.row_len == 0 && sigma_len > 0 && e.numel % sigma_len == 0,
                RWP_OPS_PREFIX, op, ": the plan of params[", i, "] does not fit its ", e.numel, " elements");
    e.param_index = word(words[2], op, "param_index");
    e.whole_tensor = words[3] != 0;
    e.sigma_per_element = e.whole_tensor && sigma_len == 1 && e.numel > 1;
    e.dtype = dtype_code(p, op, i);
    e.rows = e.numel / e.row_len;
    if (by_rows) {
      e.row_threads = table.cuda ? cuda_row_threads(e.row_len, e.dtype) : 0;
      e.unit_size = table.cuda ? kCudaThreads / e.row_threads : cpu::perturb_unit_rows(e.row_len);
      e.segments = table.cuda ? cuda_row_segments(e.row_len, e.dtype) : 0;
      e.partial_offset = table.segments;
      table.segments += e.segments * e.rows;
    } else {
      e.unit_size = table.cuda ? kCudaChunkElems : kCpuChunkElems;
    }
    e.first_unit = table.units;
    table.units += units_of(e, by_rows);
    table.entries.push_back(e);
  }
  return table;
}

#if defined(RWP_WITH_CUDA)
using CudaStream = c10::cuda::CUDAStream;

// Device copy of a call's table, cached per (op, device, CUDA stream) and uploaded again only when its
// contents change (new addresses, shapes or per-parameter hyperparameters). The upload is an
// asynchronous copy from pinned memory on the current CUDA stream; no host synchronization.
const ParamEntry* device_table(const std::vector<ParamEntry>& entries, const char* op, c10::cuda::CUDAStream cuda_stream) {
  struct Cached {
    std::vector<ParamEntry> host;
    Tensor device;
  };
  static std::mutex mu;
  static std::map<std::tuple<std::string, int, int64_t>, Cached> cache;
  std::lock_guard<std::mutex> lock(mu);
  Cached& c = cache[{op, cuda_stream.device_index(), cuda_stream.id()}];
  const size_t bytes = entries.size() * sizeof(ParamEntry);
  if (!(c.device.defined() && c.host.size() == entries.size() &&
        std::memcmp(c.host.data(), entries.data(), bytes) == 0)) {
    Tensor pinned = at::empty({static_cast<int64_t>(bytes)}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
    std::memcpy(pinned.data_ptr(), entries.data(), bytes);
    c.device = at::empty({static_cast<int64_t>(bytes)}, at::TensorOptions().dtype(at::kByte).device(cuda_stream.device()));
    c.device.copy_(pinned, /*non_blocking=*/true);
    c.host = entries;
  }
  return static_cast<const ParamEntry*>(c.device.data_ptr());
}
#elif defined(RWP_EMULATE_CUDA)
// The emulated kernels read the host table itself, on an emulated stream.
struct CudaStream {
  cudaStream_t stream() const { return nullptr; }
};

const ParamEntry* device_table(const std::vector<ParamEntry>& entries, const char*, CudaStream) { return entries.data(); }
#endif

// RWP_CUDA(code): the code in a build with CUDA kernels, nullptr in one without (where it could not compile).
#ifdef RWP_CUDA_KERNELS
#define RWP_CUDA(...) __VA_ARGS__
#else
#define RWP_CUDA(...) nullptr
#endif

// launch(cuda_stream) on the current CUDA stream of like's device; in a build without CUDA kernels (launch is
// then nullptr) a clear error instead.
template <class Launch>
void launch_cuda(const Tensor& like, const char* op, const Launch& launch) {
#if defined(RWP_WITH_CUDA)
  const c10::cuda::CUDAGuard guard(like.device());
  const c10::cuda::CUDAStream cuda_stream = c10::cuda::getCurrentCUDAStream(like.device().index());
  C10_CUDA_CHECK(launch(cuda_stream));
#elif defined(RWP_EMULATE_CUDA)
  (void)like;
  const cudaError_t err = launch(CudaStream{});
  TORCH_CHECK(err == cudaSuccess, RWP_OPS_PREFIX, op, ": the emulated CUDA launch failed (error ", static_cast<int>(err),
              "): ", simt::last_error());
#else
  (void)like;
  (void)launch;
  TORCH_CHECK(false, RWP_OPS_PREFIX, op, ": this build of the extension has no CUDA kernels");
#endif
}

// Runs a table op on the table's device: cpu_fn(entries, n, units) or cuda_fn(device table, n, units, cuda_stream).
#ifdef RWP_CUDA_KERNELS
// The table as the CUDA kernels take it: the entries grouped by kernel variant (dtype, and for perturb_ the
// sigma mode and whether rows are split; order kept within a group), work units renumbered in that order,
// one launch per group.
struct CudaTable {
  std::vector<ParamEntry> entries;
  std::vector<cuda::Launch> launches;
};

CudaTable by_variant(const Table& t) {
  CudaTable c{t.entries, {}};
  auto variant = [&](const ParamEntry& e) {
    return std::make_tuple(e.dtype, t.by_rows && e.sigma_per_element, e.segments != 0);
  };
  std::stable_sort(c.entries.begin(), c.entries.end(),
                   [&](const ParamEntry& a, const ParamEntry& b) { return variant(a) < variant(b); });
  int64_t unit = 0;
  for (size_t i = 0; i < c.entries.size(); ++i) {
    ParamEntry& e = c.entries[i];
    if (i == 0 || variant(c.entries[i - 1]) != variant(e))
      c.launches.push_back({static_cast<int64_t>(i), 0, unit, 0, e.dtype, std::get<1>(variant(e)),
                            std::get<2>(variant(e))});
    const int64_t units = units_of(e, t.by_rows);
    e.first_unit = unit;
    c.launches.back().count += 1;
    c.launches.back().units += units;
    unit += units;
  }
  return c;
}
#endif

template <class CpuFn, class CudaFn>
void run(const Table& t, const Tensor& like, const char* op, const CpuFn& cpu_fn, const CudaFn& cuda_fn) {
  if (!t.cuda) {
    cpu_fn(t.entries.data(), static_cast<int64_t>(t.entries.size()), t.units);
    return;
  }
  (void)cuda_fn;
  launch_cuda(like, op, RWP_CUDA([&](CudaStream cuda_stream) {
    const CudaTable c = by_variant(t);
    const ParamEntry* table = device_table(c.entries, op, cuda_stream);
    for (const cuda::Launch& launch : c.launches) {
      const cudaError_t err = cuda_fn(table, launch, cuda_stream.stream());
      if (err != cudaSuccess) return err;
    }
    return cudaSuccess;
  }));
}

// ---- ops -------------------------------------------------------------------------------------------

Tensor philox_op(const Tensor& counter, const Tensor& key) {
  TORCH_CHECK(counter.scalar_type() == at::kLong && key.scalar_type() == at::kLong && counter.dim() == 2 &&
                  key.dim() == 2 && counter.size(1) == 4 && key.size(1) == 2 && counter.size(0) == key.size(0) &&
                  counter.device() == key.device(),
              RWP_OPS_PREFIX "philox4x32_10: expects int64 counter [n, 4] and key [n, 2] on one device");
  const Tensor c = counter.contiguous(), k = key.contiguous();
  Tensor out = at::empty({c.size(0), 4}, c.options());
  if (c.size(0) == 0) return out;
  if (on_cuda_kernels(c)) {
    launch_cuda(c, "philox4x32_10", RWP_CUDA([&](CudaStream cuda_stream) {
      return cuda::philox(c.data_ptr<int64_t>(), k.data_ptr<int64_t>(), out.data_ptr<int64_t>(), c.size(0),
                          cuda_stream.stream());
    }));
  } else {
    cpu::philox(c.data_ptr<int64_t>(), k.data_ptr<int64_t>(), out.data_ptr<int64_t>(), c.size(0));
  }
  return out;
}

void noise_op(const Tensor& out, int64_t key0, int64_t key1, int64_t param_index, int64_t step, int64_t offset) {
  const char* op = "noise_";
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous(), RWP_OPS_PREFIX "noise_: out must be a contiguous float32 tensor");
  TORCH_CHECK(offset >= 0, RWP_OPS_PREFIX "noise_: offset must be >= 0");
  const NoiseKey key = checked_noise_key(key0, key1, step, op);
  const uint32_t pi = word(param_index, op, "param_index");
  if (out.numel() == 0) return;
  if (on_cuda_kernels(out)) {
    launch_cuda(out, op, RWP_CUDA([&](CudaStream cuda_stream) {
      return cuda::noise(out.data_ptr<float>(), out.numel(), offset, pi, key, cuda_stream.stream());
    }));
  } else {
    cpu::noise(out.data_ptr<float>(), out.numel(), offset, pi, key);
  }
}

Tensor perturb_op(TensorList params, TensorList backups, TensorList grads, TensorList fisher, at::ArrayRef<double> gammas,
                  at::ArrayRef<double> etas, at::IntArrayRef plan, int64_t key0, int64_t key1, int64_t step,
                  const OptTensor& grad_scale_t, double grad_scale) {
  const char* op = "perturb_";
  Table t = make_table(params, plan, /*by_rows=*/true, op);
  const size_t n = params.size();
  check_length(backups, n, op, "backups");
  check_length(grads, n, op, "grads");
  check_length(fisher, n, op, "fisher");
  TORCH_CHECK(gammas.size() == n && etas.size() == n, RWP_OPS_PREFIX "perturb_: gammas and etas need one entry per param");
  int64_t sigma_rows = 0;
  for (size_t i = 0; i < n; ++i) {
    ParamEntry& e = t.entries[i];
    const Tensor& p = params[i];
    e.backup = companion(backups, i, p, op, "backups");
    e.grad = companion(grads, i, p, op, "grads");
    e.fisher = static_cast<float*>(companion(fisher, i, p, op, "fisher", at::kFloat));
    e.gamma = gammas[i];
    e.eta = etas[i];
    TORCH_CHECK(!e.sigma_per_element || (e.whole_tensor && e.fisher), RWP_OPS_PREFIX "perturb_: the plan gives params[",
                i, "] one sigma per element, which only a 0-D/1-D tensor with a Fisher state has");
    e.sigma_offset = sigma_rows;
    sigma_rows += e.sigma_per_element ? e.numel : e.rows;
  }
  Tensor sigmas = at::empty({sigma_rows}, params[0].options().dtype(at::kFloat));
  Tensor partials = at::empty({2 * t.segments}, params[0].options().dtype(at::kDouble));
  const PerturbArgs args{checked_noise_key(key0, key1, step, op), scalar_arg(grad_scale_t, grad_scale, params[0], op, "grad_scale"),
                         sigmas.data_ptr<float>(), partials.data_ptr<double>()};
  run(t, params[0], op,
      [&](const ParamEntry* table, int64_t np, int64_t units) { cpu::perturb(table, np, units, args); },
      RWP_CUDA([&](const ParamEntry* table, const cuda::Launch& launch, cudaStream_t cuda_stream) {
        return cuda::perturb(table, launch, args, cuda_stream);
      }));
  return sigmas;
}

MixArgs mix_args(const Tensor& like, const char* op, const OptTensor& grad_scale_t, double grad_scale, double beta,
                 const OptTensor& fisher_scale_t, double fisher_scale, const OptTensor& clean_scale_t, double clean_scale) {
  return {scalar_arg(grad_scale_t, grad_scale, like, op, "grad_scale"),
          scalar_arg(fisher_scale_t, fisher_scale, like, op, "fisher_scale"),
          scalar_arg(clean_scale_t, clean_scale, like, op, "clean_scale"), static_cast<float>(beta)};
}

// The gradient-mix companions shared by restore_ and sgd_step_.
void fill_mix(Table& t, TensorList params, TensorList grads, TensorList fisher, TensorList clean_grads, const char* op) {
  const size_t n = params.size();
  check_length(grads, n, op, "grads");
  check_length(fisher, n, op, "fisher");
  check_length(clean_grads, n, op, "clean_grads");
  for (size_t i = 0; i < n; ++i) {
    ParamEntry& e = t.entries[i];
    e.grad = companion(grads, i, params[i], op, "grads");
    e.fisher = static_cast<float*>(companion(fisher, i, params[i], op, "fisher", at::kFloat));
    e.clean = companion(clean_grads, i, params[i], op, "clean_grads");
    TORCH_CHECK(e.grad || (!e.fisher && !e.clean), RWP_OPS_PREFIX, op, ": fisher or clean_grads[", i,
                "] given without grads[", i, "]");
  }
}

void restore_op(TensorList params, TensorList backups, TensorList sigmas, TensorList grads, TensorList fisher,
                TensorList clean_grads, at::IntArrayRef plan, int64_t key0, int64_t key1, int64_t step,
                const OptTensor& grad_scale_t, double grad_scale, double beta, const OptTensor& fisher_scale_t,
                double fisher_scale, const OptTensor& clean_scale_t, double clean_scale) {
  const char* op = "restore_";
  Table t = make_table(params, plan, /*by_rows=*/false, op);
  const size_t n = params.size();
  check_length(backups, n, op, "backups");
  TORCH_CHECK(backups.empty() != sigmas.empty(), RWP_OPS_PREFIX "restore_: pass either backups or sigmas");
  TORCH_CHECK(sigmas.empty() || sigmas.size() == n, RWP_OPS_PREFIX "restore_: sigmas needs one entry per param");
  fill_mix(t, params, grads, fisher, clean_grads, op);
  const float* sigma_base = sigmas.empty() ? nullptr : sigmas[0].data_ptr<float>();
  for (size_t i = 0; i < n; ++i) {
    ParamEntry& e = t.entries[i];
    if (!backups.empty()) {
      e.backup = companion(backups, i, params[i], op, "backups");
      TORCH_CHECK(e.backup, RWP_OPS_PREFIX "restore_: backups[", i, "] is missing");
      continue;
    }
    const Tensor& s = sigmas[i];
    const int64_t count = e.sigma_per_element ? e.numel : e.rows;
    TORCH_CHECK(s.scalar_type() == at::kFloat && s.is_contiguous() && s.device() == params[i].device() &&
                    s.numel() == count,
                RWP_OPS_PREFIX "restore_: sigmas[", i, "] does not fit params[", i, "] and its plan");
    // Views of one buffer (as perturb_ returns them) keep the same offsets from step to step.
    e.sigma_offset = (reinterpret_cast<intptr_t>(s.data_ptr<float>()) - reinterpret_cast<intptr_t>(sigma_base)) /
                     static_cast<intptr_t>(sizeof(float));
  }
  const RestoreArgs args{checked_noise_key(key0, key1, step, op), sigma_base,
                         mix_args(params[0], op, grad_scale_t, grad_scale, beta, fisher_scale_t, fisher_scale,
                                  clean_scale_t, clean_scale)};
  run(t, params[0], op,
      [&](const ParamEntry* table, int64_t np, int64_t units) { cpu::restore(table, np, units, args); },
      RWP_CUDA([&](const ParamEntry* table, const cuda::Launch& launch, cudaStream_t cuda_stream) {
        return cuda::restore(table, launch, args, cuda_stream);
      }));
}

void sgd_step_op(TensorList params, TensorList grads, TensorList momentum_buffers, TensorList backups, TensorList fisher,
                 TensorList clean_grads, at::IntArrayRef plan, double lr, double momentum, double dampening, double weight_decay, bool nesterov,
                 bool maximize, bool is_first_step, const OptTensor& grad_scale_t, double grad_scale,
                 const OptTensor& found_inf, double beta, const OptTensor& fisher_scale_t, double fisher_scale,
                 const OptTensor& clean_scale_t, double clean_scale) {
  const char* op = "sgd_step_";
  Table t = make_table(params, plan, /*by_rows=*/false, op);
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n, RWP_OPS_PREFIX "sgd_step_: grads needs one entry per param");
  check_length(momentum_buffers, n, op, "momentum_buffers");
  check_length(backups, n, op, "backups");
  TORCH_CHECK(momentum == 0.0 || !momentum_buffers.empty(), RWP_OPS_PREFIX "sgd_step_: momentum needs momentum_buffers");
  fill_mix(t, params, grads, fisher, clean_grads, op);
  for (size_t i = 0; i < n; ++i) {
    ParamEntry& e = t.entries[i];
    TORCH_CHECK(e.grad, RWP_OPS_PREFIX "sgd_step_: grads[", i, "] is missing");
    e.backup = companion(backups, i, params[i], op, "backups");
    e.buf = momentum != 0.0 ? companion(momentum_buffers, i, params[i], op, "momentum_buffers") : nullptr;
    TORCH_CHECK(momentum == 0.0 || e.buf, RWP_OPS_PREFIX "sgd_step_: momentum_buffers[", i, "] is missing");
  }
  const SgdScalars sgd{static_cast<float>(lr), static_cast<float>(momentum), static_cast<float>(1.0 - dampening),
                       static_cast<float>(weight_decay), nesterov, maximize, is_first_step, momentum != 0.0};
  const float* inf = nullptr;
  if (found_inf.has_value()) inf = scalar_arg(found_inf, 0.0, params[0], op, "found_inf").ptr;
  const SgdArgs args{sgd,
                     mix_args(params[0], op, grad_scale_t, grad_scale, beta, fisher_scale_t, fisher_scale,
                              clean_scale_t, clean_scale),
                     inf};
  run(t, params[0], op,
      [&](const ParamEntry* table, int64_t np, int64_t units) { cpu::sgd_step(table, np, units, args); },
      RWP_CUDA([&](const ParamEntry* table, const cuda::Launch& launch, cudaStream_t cuda_stream) {
        return cuda::sgd_step(table, launch, args, cuda_stream);
      }));
}

}  // namespace
}  // namespace rwp

TORCH_LIBRARY(RWP_OPS, m) {
  m.set_python_module("rwp_kernels.ext_backend");  // holds the fake (meta) implementations
  m.def("philox4x32_10(Tensor counter, Tensor key) -> Tensor");
  m.def("noise_(Tensor(a!) out, int key0, int key1, int param_index, int step, int offset) -> ()");
  m.def(
      "perturb_(Tensor(a!)[] params, Tensor(b!)[] backups, Tensor(c!)[] grads, Tensor[] fisher, float[] gammas, "
      "float[] etas, int[] plan, int key0, int key1, int step, Tensor? grad_scale_tensor, float grad_scale) "
      "-> Tensor");
  m.def(
      "restore_(Tensor(a!)[] params, Tensor[] backups, Tensor[] sigmas, Tensor(b!)[] grads, Tensor(c!)[] fisher, "
      "Tensor[] clean_grads, int[] plan, int key0, int key1, int step, Tensor? grad_scale_tensor, "
      "float grad_scale, float beta, Tensor? fisher_scale_tensor, float fisher_scale, Tensor? clean_scale_tensor, "
      "float clean_scale) -> ()");
  m.def(
      "sgd_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, Tensor[] backups, "
      "Tensor(c!)[] fisher, Tensor[] clean_grads, int[] plan, float lr, float momentum, float dampening, float weight_decay, "
      "bool nesterov, bool maximize, bool is_first_step, Tensor? grad_scale_tensor, float grad_scale, "
      "Tensor? found_inf, float beta, Tensor? fisher_scale_tensor, float fisher_scale, Tensor? clean_scale_tensor, "
      "float clean_scale) -> ()");
}

#if defined(RWP_EMULATE_CUDA)
TORCH_LIBRARY_FRAGMENT(RWP_OPS, m) {
  // The seed of the emulated threads' order (launch n of the process runs in the order of (seed, n)).
  m.def("set_schedule_seed(int seed) -> ()", [](int64_t seed) { rwp::simt::set_schedule_seed(static_cast<uint64_t>(seed)); });
}
#endif

TORCH_LIBRARY_IMPL(RWP_OPS, CPU, m) {
  m.impl("philox4x32_10", &rwp::philox_op);
  m.impl("noise_", &rwp::noise_op);
  m.impl("perturb_", &rwp::perturb_op);
  m.impl("restore_", &rwp::restore_op);
  m.impl("sgd_step_", &rwp::sgd_step_op);
}

#ifdef RWP_WITH_CUDA
TORCH_LIBRARY_IMPL(RWP_OPS, CUDA, m) {
  m.impl("philox4x32_10", &rwp::philox_op);
  m.impl("noise_", &rwp::noise_op);
  m.impl("perturb_", &rwp::perturb_op);
  m.impl("restore_", &rwp::restore_op);
  m.impl("sgd_step_", &rwp::sgd_step_op);
}
#endif
