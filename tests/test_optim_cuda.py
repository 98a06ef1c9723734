"""rwp_kernels.optim on a CUDA device (skipped without a GPU; RWP_KERNELS_REQUIRE=gpu makes that a failure).

- No host synchronization in perturb() and in step() under GradScaler (torch.cuda.set_sync_debug_mode
  turns any synchronizing call into an error).
- fp16 autocast with GradScaler: an injected inf restores the weights and skips the update, on the GPU.
- The CUDA run agrees with the CPU run of the same update (both on the backend "auto" picks).
"""
import copy

import pytest
import torch

from rwp_kernels.models import small_cnn
from rwp_kernels.optim import RWPSGD, freeze_bn_stats

from _optim_common import backward, batches, inf_from_backward, params_of


def _to(batch, device):
    return tuple(t.to(device) for t in batch)


class _NoSync:
    """Inside the block, a synchronizing CUDA call raises."""

    def __enter__(self):
        torch.cuda.set_sync_debug_mode("error")

    def __exit__(self, *exc):
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.parametrize("adaptive", [False, True])
def test_no_host_sync_under_grad_scaler(cuda_device, adaptive):
    torch.manual_seed(0)
    model = small_cnn().to(cuda_device)
    opt = RWPSGD(model.parameters(), lr=0.1, momentum=0.9, adaptive=adaptive, gamma=0.05, seed=1)
    scaler = torch.amp.GradScaler("cuda")
    data = [_to(b, cuda_device) for b in batches(6, seed=2)]
    for t in range(3):
        opt.zero_grad()
        with torch.autocast("cuda", dtype=torch.float16):
            backward(model, data[2 * t], scaler.scale)
        with _NoSync():
            opt.perturb()
        with torch.autocast("cuda", dtype=torch.float16), freeze_bn_stats(model):
            backward(model, data[2 * t + 1], scaler.scale)
        with _NoSync():
            scaler.step(opt)
        scaler.update()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_overflow_on_gpu_restores_and_skips(cuda_device):
    torch.manual_seed(0)
    model = small_cnn().to(cuda_device)
    opt = RWPSGD(model.parameters(), lr=0.1, momentum=0.9, gamma=0.05, seed=1)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**10)
    clean, perturbed = (_to(b, cuda_device) for b in batches(2, seed=3))
    weights = params_of(model)
    with torch.autocast("cuda", dtype=torch.float16):
        backward(model, clean, scaler.scale)
    opt.perturb()
    hook = inf_from_backward(next(model.parameters()))
    with torch.autocast("cuda", dtype=torch.float16):
        backward(model, perturbed, scaler.scale)
    hook.remove()
    scaler.step(opt)
    scaler.update()
    for p, w in zip(model.parameters(), weights):
        assert torch.equal(p.detach(), w)
    assert scaler.get_scale() == 2.0**9


def test_cuda_matches_cpu(cuda_device):
    torch.manual_seed(0)
    cpu_model = small_cnn().eval()  # eval: no batch-statistics reductions that differ between devices
    gpu_model = copy.deepcopy(cpu_model).to(cuda_device)
    kw = dict(lr=0.05, momentum=0.9, weight_decay=1e-3, gamma=0.05, seed=4, adaptive=True, alpha=0.5)
    cpu_opt, gpu_opt = RWPSGD(cpu_model.parameters(), **kw), RWPSGD(gpu_model.parameters(), **kw)
    data = batches(4, seed=5)
    for t in range(2):
        for model, opt, device in ((cpu_model, cpu_opt, "cpu"), (gpu_model, gpu_opt, cuda_device)):
            opt.zero_grad()
            backward(model, _to(data[2 * t], device))
            with opt.perturbed():
                backward(model, _to(data[2 * t + 1], device))
            opt.step()
    for p, q in zip(cpu_model.parameters(), gpu_model.parameters()):
        torch.testing.assert_close(p, q.cpu(), atol=1e-4, rtol=1e-4)
