"""Helpers shared by the tests of rwp_kernels.optim (test_optim_*.py)."""
import copy
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import rwp_kernels
from rwp_kernels import reference
from rwp_kernels.contract import NoiseKey
from rwp_kernels.models import small_cnn

# The backends the optimizer tests run on for CPU tensors: the reference always, the C++ CPU kernels
# where they are built.
CPU_BACKENDS = ["reference"] + [name for name in ("cpu",) if name in rwp_kernels.available_backends("cpu")]
# Their parametrization: where the C++ kernels are built, the reference's cases are in the slow tier (what the
# optimizer does is the same Python on either backend, and tests/test_conformance.py checks the two backends' ops
# against each other in the fast tier).
BACKEND_PARAMS = [pytest.param(b, marks=pytest.mark.slow) if b == "reference" and len(CPU_BACKENDS) > 1 else b
                  for b in CPU_BACKENDS]


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The tests use tiny tensors: one intra-op thread is faster, and far less noisy on a shared 2-core box.
    Import this fixture into a test module to apply it there."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def batches(n: int, batch: int = 8, seed: int = 0, size: int = 8, channels: int = 1):
    """``n`` random (x, y) batches of digits-sized images (1 x 8 x 8, 10 classes)."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, channels, size, size, generator=g), torch.randint(0, 10, (batch,), generator=g))
            for _ in range(n)]


def model_pair(seed: int = 0, factory=small_cnn):
    """Two identical models."""
    torch.manual_seed(seed)
    model = factory()
    return model, copy.deepcopy(model)


def backward(model, batch, scale=None) -> torch.Tensor:
    x, y = batch
    loss = F.cross_entropy(model(x), y)
    (loss if scale is None else scale(loss)).backward()
    return loss.detach()


def params_of(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def assert_models_equal(a, b, *, exact=True, atol=0.0, rtol=0.0, buffers=True):
    for (name, x), (_, y) in zip(a.named_parameters(), b.named_parameters()):
        if exact:
            assert torch.equal(x, y), f"{name}: max diff {(x - y).abs().max().item():.3g}"
        else:
            torch.testing.assert_close(x, y, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")
    if buffers:
        for (name, x), (_, y) in zip(a.named_buffers(), b.named_buffers()):
            if x.is_floating_point():
                torch.testing.assert_close(x, y, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


def max_param_diff(a, b) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a.parameters(), b.parameters()))


def official_sigma(w: torch.Tensor, gamma: float) -> torch.Tensor:
    """The noise std of the official code, broadcastable to ``w``: gamma * ||row|| per output filter,
    gamma * (||w|| + 1e-16) for a 0-D/1-D tensor."""
    if w.dim() > 1:
        return gamma * w.reshape(w.shape[0], -1).norm(dim=1).view(-1, *([1] * (w.dim() - 1)))
    return gamma * (w.norm() + 1e-16)


def _in_memory_order(p: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """``flat`` (float32, p.numel() values) laid out over a float32 tensor like ``p``: element e at offset e."""
    z = torch.empty_like(p, dtype=torch.float32)
    z.as_strided((p.numel(),), (1,)).copy_(flat)
    return z


def stream_noise(p: torch.Tensor, index: int, step: int, seed: int, stream: int = 0) -> torch.Tensor:
    """The noise z of parameter ``p`` as the fused ops draw it (element e = offset e in memory order)."""
    return _in_memory_order(p, rwp_kernels.noise(p.numel(), seed=seed, param_index=index, step=step, stream=stream,
                                                 device=p.device, backend="reference"))


class StepNoise:
    """``stream_noise`` as a ``noise(p, index, step)`` function for rwp_kernels.official: at a step's first call
    the normals of all of ``params`` (index i = params[i]) are drawn in one pass of the reference."""

    def __init__(self, params, seed: int, stream: int = 0):
        self.params, self.seed, self.stream = list(params), seed, stream
        self.step, self.normals = None, None

    def __call__(self, p: torch.Tensor, index: int, step: int) -> torch.Tensor:
        assert p is self.params[index], "StepNoise draws the noise of the parameters it was given"
        if step != self.step:
            key = NoiseKey(self.seed, self.stream, step)
            self.step = step
            self.normals = list(reference.params_noise(self.params, range(len(self.params)), key))
        return _in_memory_order(p, self.normals[index])


def spawn_gloo(worker, world: int, args: tuple, timeout_s: float) -> None:
    """Run ``worker(rank, *args)`` in ``world`` spawned processes; fail the test if they do not all finish
    within ``timeout_s`` (a hung collective must not hang the suite) and kill what is left."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    context = mp.start_processes(worker, args=args, nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"the {world} processes did not finish within {timeout_s} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()


def inf_from_backward(param: torch.Tensor):
    """Makes the next backward passes put an inf into ``param``'s gradient (as an overflowing fp16 backward
    would, unlike a write into p.grad, which step() refuses between the perturbed pass and the update).
    Returns the hook's handle: ``.remove()`` it."""
    return param.register_hook(
        lambda g: g.flatten().index_fill(0, torch.tensor([0], device=g.device), float("inf")).view_as(g))
