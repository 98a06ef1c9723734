"""The Triton kernels compiled for and run on a real GPU (skipped without one): the compiled kernels compute
what the C++ CPU backend computes, bit for bit (the normals; perturb_, restore_ and sgd_step_ over the whole
sweep, every dtype, RWP and ARWP; the sigmas within one float32 rounding), no host synchronization inside
an op, a second GPU. Their correctness on CUDA tensors against the reference (the sweep, tensors of any
alignment, a ResNet-18 step) is in the conformance suite (tests/test_conformance.py, backend "triton" on
device "cuda"); the self-test (python -m rwp_kernels.report --selftest) checks more.
"""
import pytest
import torch

import rwp_kernels as rk
from rwp_kernels import models
from conftest import require_backend, requires
from rwp_kernels import conformance as C
from test_triton_interpret import NOISE_WINDOWS, _table_ops, assert_equal_to_cpp


@pytest.fixture
def gpu(cuda_device):
    require_backend("triton", "cuda")
    return cuda_device


def _resnet_params(device, dtype):
    torch.manual_seed(0)
    return [p.detach().to(device=device, dtype=dtype) for p in models.resnet18().parameters()]


@pytest.mark.parametrize("window", NOISE_WINDOWS + [(1 << 22, 5, 1, 2, 3, 4)], ids=lambda w: f"n{w[0]}-at{w[1]}")
def test_compiled_normals_equal_the_cpp_backend(gpu, cpp_ext, window):
    numel, offset, seed, param_index, step, stream = window
    args = dict(seed=seed, param_index=param_index, step=step, stream=stream, offset=offset)
    z = rk.noise(numel, **args, device=gpu, backend="triton").cpu()
    assert torch.equal(z.view(torch.int32), rk.noise(numel, **args, backend="cpu").view(torch.int32))


@pytest.mark.parametrize("mode", ("rwp", "arwp"))
@pytest.mark.parametrize("dtype", C.DTYPES, ids=lambda d: str(d)[6:])
def test_compiled_table_ops_equal_the_cpp_backend(gpu, cpp_ext, dtype, mode):
    ours = _table_ops("triton", C.sweep_params(dtype, device=gpu), mode)
    cpp = _table_ops("cpu", C.sweep_params(dtype), mode)
    assert_equal_to_cpp({k: [t.cpu() for t in v] for k, v in ours.items()}, cpp)


def test_ops_do_not_synchronize_the_host(gpu):
    params = _resnet_params(gpu, torch.float32)
    grads = [torch.randn_like(p) for p in params]
    bufs = [torch.zeros_like(p) for p in params]
    backups = [torch.empty_like(p) for p in params]
    fisher = [torch.rand_like(p) for p in params]
    scale = torch.tensor(0.5, device=gpu)
    found_inf = torch.zeros((), device=gpu)
    kwargs = dict(seed=3, step=4, backend="triton")
    rk.perturb_(params, gamma=0.01, backups=backups, grads=grads, **kwargs)  # compile outside the check
    rk.sgd_step_(params, grads, bufs, lr=0.1, momentum=0.9, backups=backups, backend="triton")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(3):
            sigmas = rk.perturb_(params, gamma=0.01 * (step + 1), backups=backups, grads=grads, grad_scale=scale,
                                 fisher=fisher, eta=0.1, seed=3, step=step, backend="triton")
            rk.restore_(params, sigmas=sigmas, seed=3, step=step, grads=grads, fisher=fisher, beta=0.9,
                        backend="triton")
            rk.sgd_step_(params, grads, bufs, lr=0.1, momentum=0.9, backups=backups, grad_scale=scale,
                         found_inf=found_inf, backend="triton")
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_second_gpu(gpu, cpp_ext):
    requires(torch.cuda.device_count() > 1, "only one GPU", "multi-gpu")
    device = torch.device("cuda", 1)
    params = _resnet_params(device, torch.float32)[:6]
    expected = [p.cpu() for p in params]
    sigmas = rk.perturb_(params, gamma=0.01, seed=1, step=1, backend="triton")
    sigmas_cpp = rk.perturb_(expected, gamma=0.01, seed=1, step=1, backend="cpu")
    assert_equal_to_cpp({"sigmas": [s.cpu() for s in sigmas], "perturbed": [p.cpu() for p in params]},
                        {"sigmas": sigmas_cpp, "perturbed": expected})
