"""The Triton kernels compiled for and run on a real GPU (skipped without one): correctness on CUDA tensors,
no host synchronization inside an op, tensors of any alignment, a second GPU. Tolerances as in
tests/test_triton_interpret.py; the self-test (python -m rwp_kernels.report --selftest) checks more.
"""
import pytest
import torch

import rwp_kernels as rk
from rwp_kernels import backends, models
from conftest import requires


@pytest.fixture
def gpu(cuda_device):
    reason = backends.unavailable_reason("triton", "cuda")
    requires(reason is None, f"Triton backend on CUDA tensors: {reason}", "triton-gpu")
    return cuda_device


def _resnet_params(device, dtype):
    torch.manual_seed(0)
    return [p.detach().to(device=device, dtype=dtype) for p in models.resnet18().parameters()]


def _close(a, b, dtype):
    eps = torch.finfo(dtype).eps
    rtol, atol = (1e-6, 1e-5) if dtype == torch.float32 else (eps, 1e-5)
    for x, y in zip(a, b):
        torch.testing.assert_close(x.float(), y.float(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rwp_step_matches_reference_on_gpu(gpu, dtype):
    params = _resnet_params(gpu, dtype)
    grads = [torch.randn_like(p) for p in params]
    bufs = [torch.randn_like(p) for p in params]
    out = {}
    for backend in ("triton", "reference"):
        p, g, b = [x.clone() for x in params], [x.clone() for x in grads], [x.clone() for x in bufs]
        backups = [torch.empty_like(x) for x in p]
        sigmas = rk.perturb_(p, gamma=0.01, seed=1, step=2, backups=backups, grads=g, grad_scale=0.5, backend=backend)
        perturbed = [x.clone() for x in p]
        rk.sgd_step_(p, g, b, lr=0.1, momentum=0.9, weight_decay=5e-4, backups=backups, grad_scale=2.0,
                     backend=backend)
        out[backend] = perturbed, p, b, sigmas
    for a, b in zip(out["triton"], out["reference"]):
        _close(a, b, dtype if a[0].dtype != torch.float32 else torch.float32)


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


def test_unaligned_views_and_odd_offsets(gpu):
    flat = torch.randn(10_000, device=gpu)
    params = [flat[1:28].view(1, 27), flat[29:29 + 3 * 1001].view(3, 1001), flat[3100:3105]]  # 4-byte aligned only
    expected = [p.clone() for p in params]
    sigmas = rk.perturb_(params, gamma=0.1, seed=9, step=1, backend="triton")
    sigmas_ref = rk.perturb_(expected, gamma=0.1, seed=9, step=1, backend="reference")
    _close(params, expected, torch.float32)
    _close(sigmas, sigmas_ref, torch.float32)


def test_second_gpu(gpu):
    requires(torch.cuda.device_count() > 1, "only one GPU", "multi-gpu")
    device = torch.device("cuda", 1)
    params = _resnet_params(device, torch.float32)[:6]
    expected = [p.clone() for p in params]
    rk.perturb_(params, gamma=0.01, seed=1, step=1, backend="triton")
    rk.perturb_(expected, gamma=0.01, seed=1, step=1, backend="reference")
    _close(params, expected, torch.float32)
