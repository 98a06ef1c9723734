"""DDP, single-device sequential mode on each rank (2 processes, gloo, CPU): the clean backward runs under
no_sync(), so there is one all-reduce per step, of p.grad = (1 - alpha) / alpha * g_c + g_p; the step
multiplies by alpha. The result equals one process on the concatenated batches, and every rank draws the
same noise (same seed), so the replicas stay identical.

The model is the small CNN in eval mode: BatchNorm then normalizes with its running statistics, so the
loss of the whole batch is the mean of the per-rank losses (in training mode each rank would normalize
with its own half batch and no single-process run could match).
"""
import os

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from rwp_kernels.models import small_cnn
from rwp_kernels.optim import RWPSGD
from rwp_kernels.train.parallel import exit_process

from _optim_common import backward, batches, one_torch_thread, spawn_gloo  # noqa: F401

pytestmark = pytest.mark.slow  # builds, compiles, subprocesses or torchrun: see README, Tests

WORLD = 2
STEPS = 4
TIMEOUT_S = 180
OPT = dict(lr=0.1, momentum=0.9, weight_decay=1e-3, gamma=0.05, alpha=0.3, seed=77, backend="reference")


def _model():
    torch.manual_seed(0)
    return small_cnn().eval()


def _data():
    return batches(2 * STEPS, batch=8, seed=5)


def _worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        model = DistributedDataParallel(_model())
        all_reduces = []

        def counting_hook(state, bucket):
            all_reduces.append(bucket.index())
            fut = dist.all_reduce(bucket.buffer().div_(WORLD), async_op=True).get_future()
            return fut.then(lambda f: f.value()[0])

        model.register_comm_hook(None, counting_hook)
        opt = RWPSGD(model.parameters(), **OPT)
        data = _data()
        shard = slice(rank * 4, (rank + 1) * 4)
        for t in range(STEPS):
            (xc, yc), (xp, yp) = data[2 * t], data[2 * t + 1]
            opt.zero_grad()
            with model.no_sync():
                backward(model, (xc[shard], yc[shard]))
            with opt.perturbed():
                backward(model, (xp[shard], yp[shard]))
            opt.step()
        torch.save({"params": [p.detach() for p in model.module.parameters()], "all_reduces": all_reduces},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    exit_process(0)  # skips the interpreter's shutdown, where gloo's threads can abort the process


def _single_process():
    model = _model()
    opt = RWPSGD(model.parameters(), **OPT)
    data = _data()
    for t in range(STEPS):
        opt.zero_grad()
        backward(model, data[2 * t])
        with opt.perturbed():
            backward(model, data[2 * t + 1])
        opt.step()
    return [p.detach() for p in model.parameters()]


def test_ddp_two_processes_equal_one_process(tmp_path):
    spawn_gloo(_worker, WORLD, (str(tmp_path / "init"), str(tmp_path)), TIMEOUT_S)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    assert all(r["all_reduces"] == [0] * STEPS for r in results), "expected one all-reduce (one bucket) per step"
    for a, b in zip(results[0]["params"], results[1]["params"]):
        assert torch.equal(a, b), "the replicas must stay identical"
    single = _single_process()
    start = [p.detach() for p in _model().parameters()]
    assert max((a - s).abs().max().item() for a, s in zip(single, start)) > 1e-2
    for a, b in zip(results[0]["params"], single):
        # The same computation but for the order of summation over the batch: float rounding only.
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
