"""The Triton kernels compiled for and run on a real GPU (skipped without one): no host synchronization
inside an op, a second GPU. Their correctness on CUDA tensors against the reference (the sweep, tensors of
any alignment, a ResNet-18 step) is in the conformance suite (tests/test_conformance.py, backend "triton"
on device "cuda"); the self-test (python -m rwp_kernels.report --selftest) checks more.
"""
import pytest
import torch

import rwp_kernels as rk
from rwp_kernels import models
from conftest import require_backend, requires
from rwp_kernels import conformance as C


@pytest.fixture
def gpu(cuda_device):
    require_backend("triton", "cuda")
    return cuda_device


def _resnet_params(device, dtype):
    torch.manual_seed(0)
    return [p.detach().to(device=device, dtype=dtype) for p in models.resnet18().parameters()]


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


def test_second_gpu(gpu):
    requires(torch.cuda.device_count() > 1, "only one GPU", "multi-gpu")
    device = torch.device("cuda", 1)
    params = _resnet_params(device, torch.float32)[:6]
    expected = [p.clone() for p in params]
    rk.perturb_(params, gamma=0.01, seed=1, step=1, backend="triton")
    rk.perturb_(expected, gamma=0.01, seed=1, step=1, backend="reference")
    errors = C.check(C.CLOSE, params, expected, "params")
    assert not errors, "\n".join(errors)
