"""Parallel RWP (rwp_kernels.optim.ParallelRWP) on gloo with spawned CPU processes.

Each spawned run trains the small CNN (BatchNorm, training mode) with ParallelRWP for 32 steps, every rank
on its own batches, then compares in this process:

- after 3 steps, rank 0's weights and BatchNorm statistics with a single-process computation that uses
  no rwp_kernels optimizer code: per rank, the gradient at the clean weights or (perturbed ranks) at the
  weights perturbed by ``rwp_kernels.perturb_`` with ``stream = rank``; the mix
  alpha * mean(perturbed) + (1 - alpha) * mean(clean); torch.optim.SGD; running statistics from rank 0;
- after 32 steps, the weights of all ranks, bit for bit;
- a pass that raises on every rank, after the perturbed forward: the perturbed ranks' weights are back to
  the clean ones bit for bit, and training goes on;
- with 2 processes, RWP around AdamW, and RWPSGD under a GradScaler whose step overflows on one rank:
  the replicas stay identical too;
- with 2 processes, the official scheme (perturbed rank adds its noise, losses scaled by 2 alpha and
  2 (1 - alpha), DDP's averaging all-reduce, ``p.sub_(noise)``, torch.optim.SGD): its replicas drift apart.
"""
import contextlib
import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import rwp_kernels
from rwp_kernels.models import small_cnn
from rwp_kernels.optim import RWP, ParallelRWP, RWPSGD, freeze_bn_stats
from rwp_kernels.train.parallel import exit_process

from _optim_common import CPU_BACKENDS, backward, batches, official_sigma, one_torch_thread, spawn_gloo  # noqa: F401

pytestmark = pytest.mark.slow  # builds, compiles, subprocesses or torchrun: see README, Tests

STEPS = 32
CHECK_AT = 3  # steps compared with the single-process computation (rounding grows with more)
FAIL_AT = 10  # before this step, a pass raises on every rank
SEED = 100  # rank r constructs its optimizer with seed SEED + r; ParallelRWP must give everyone rank 0's
SGD = dict(lr=0.05, momentum=0.9, weight_decay=1e-3)
GAMMA, ALPHA = 0.05, 0.3
TIMEOUT_S = 240


def _model():
    torch.manual_seed(0)
    return small_cnn()


def _data(world: int):
    """Batch of (step t, rank r): index t * world + r."""
    return batches(STEPS * world, batch=8, seed=11)


def _state(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _train_parallel(rank: int, world: int, perturbed, backend: str) -> dict:
    model = DistributedDataParallel(_model())
    opt = RWPSGD(model.parameters(), **SGD, gamma=GAMMA, alpha=ALPHA, seed=SEED + rank, backend=backend)
    errors = []
    for bad in ([0], [world]):
        try:
            ParallelRWP(model, opt, perturbed_ranks=bad)
        except ValueError as err:
            errors.append(str(err))
    par = ParallelRWP(model, opt, perturbed_ranks=perturbed)
    try:
        opt.step(lambda: backward(model, _data(world)[rank]))
    except RuntimeError as err:
        errors.append(str(err))
    data = _data(world)
    record = dict(seed=opt.seed, stream=opt.stream, perturbed=par.is_perturbed_rank, errors=errors)
    for t in range(STEPS):
        if t == FAIL_AT:
            clean = [p.detach().clone() for p in model.parameters()]
            opt.zero_grad()
            with contextlib.suppress(FloatingPointError):
                with par.pass_():
                    F.cross_entropy(model(data[t * world + rank][0]), data[t * world + rank][1])
                    record["weights_perturbed_in_pass"] = any(not torch.equal(p, c) for p, c in zip(model.parameters(), clean))
                    raise FloatingPointError("injected failure")
            record["restored_after_failure"] = (
                all(torch.equal(p, c) for p, c in zip(model.parameters(), clean)) and not opt.is_perturbed
            )
        opt.zero_grad()
        with par.pass_():
            backward(model, data[t * world + rank])
        opt.step()
        if t + 1 == CHECK_AT:
            record["early"] = _state(model.module)
    record["final"] = [p.detach().clone() for p in model.parameters()]
    return record


def _train_parallel_adamw(rank: int, world: int, backend: str) -> list[torch.Tensor]:
    """The RWP wrapper around AdamW in parallel mode (default split)."""
    model = DistributedDataParallel(_model())
    opt = RWP(model.parameters(), torch.optim.AdamW, lr=1e-3, gamma=GAMMA, alpha=ALPHA, seed=SEED, backend=backend)
    par = ParallelRWP(model, opt)
    data = _data(world)
    for t in range(10):
        opt.zero_grad()
        with par.pass_():
            backward(model, data[t * world + rank])
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def _train_parallel_amp(rank: int, world: int, backend: str) -> dict:
    """RWPSGD under a GradScaler in parallel mode; at step 3 rank 1's gradient overflows (its loss is
    multiplied by inf): the mixed gradient is inf on every rank, so every rank skips the update and the
    perturbed rank restores its weights."""
    model = DistributedDataParallel(_model())
    opt = RWPSGD(model.parameters(), **SGD, gamma=GAMMA, alpha=ALPHA, seed=SEED, backend=backend)
    par = ParallelRWP(model, opt)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    data = _data(world)
    record = {}
    for t in range(6):
        before = [p.detach().clone() for p in model.parameters()]
        opt.zero_grad()
        with par.pass_():
            x, y = data[t * world + rank]
            loss = F.cross_entropy(model(x), y) * (float("inf") if t == 3 and rank == 1 else 1.0)
            scaler.scale(loss).backward()
        scale = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        if t == 3:
            record["skipped"] = all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
            record["scale_halved"] = scaler.get_scale() == scale / 2
    record["final"] = [p.detach().clone() for p in model.parameters()]
    return record


def _train_official(rank: int, world: int) -> list[torch.Tensor]:
    model = DistributedDataParallel(_model())
    sgd = torch.optim.SGD(model.parameters(), **SGD)
    generator = torch.Generator().manual_seed(1 + rank)
    data = _data(world)
    perturbed = rank % 2 == 1
    for t in range(STEPS):
        sgd.zero_grad()
        noise = []
        if perturbed:
            with torch.no_grad():
                for p in model.parameters():
                    noise.append(torch.randn(p.shape, generator=generator) * official_sigma(p, GAMMA))
                    p.add_(noise[-1])
        x, y = data[t * world + rank]
        with freeze_bn_stats(model) if perturbed else contextlib.nullcontext():
            loss = F.cross_entropy(model(x), y) * (2 * ALPHA if perturbed else 2 * (1 - ALPHA))
            loss.backward()
        if perturbed:
            with torch.no_grad():
                for p, n in zip(model.parameters(), noise):
                    p.sub_(n)
        sgd.step()
    return [p.detach().clone() for p in model.parameters()]


def _worker(rank, world, perturbed, backend, official, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        result = {"ours": _train_parallel(rank, world, perturbed, backend)}
        if official:
            result["official"] = _train_official(rank, world)
            result["adamw"] = _train_parallel_adamw(rank, world, backend)
            result["amp"] = _train_parallel_amp(rank, world, backend)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    exit_process(0)  # skips the interpreter's shutdown, where gloo's threads can abort the process


def _single_process(world: int, perturbed_ranks, steps: int, *, gamma: float = GAMMA) -> dict:
    """The parallel update computed in one process, without the optimizer under test."""
    model = _model()
    sgd = torch.optim.SGD(model.parameters(), **SGD)
    data = _data(world)
    for t in range(steps):
        grads = []
        for r in range(world):
            replica = copy.deepcopy(model)
            if r in perturbed_ranks:
                with torch.no_grad():
                    rwp_kernels.perturb_(list(replica.parameters()), gamma=gamma, seed=SEED, step=t, stream=r,
                                         backend="reference")
            with freeze_bn_stats(replica) if r in perturbed_ranks else contextlib.nullcontext():
                x, y = data[t * world + r]
                grads.append(torch.autograd.grad(F.cross_entropy(replica(x), y), list(replica.parameters())))
            if r == 0:
                for mine, theirs in zip(model.buffers(), replica.buffers()):
                    mine.copy_(theirs)
        clean = [r for r in range(world) if r not in perturbed_ranks]
        for i, p in enumerate(model.parameters()):
            g_p = torch.stack([grads[r][i] for r in perturbed_ranks]).mean(0)
            g_c = torch.stack([grads[r][i] for r in clean]).mean(0)
            p.grad = ALPHA * g_p + (1 - ALPHA) * g_c
        sgd.step()
    return _state(model)


def _max_diff(a: dict, b: dict) -> float:
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())


@pytest.mark.parametrize("world, perturbed, backend, official", [
    (2, None, CPU_BACKENDS[-1], True),  # default split: rank 1 perturbed
    (4, [1], "reference", False),  # unequal split: one perturbed rank, three clean ones
])
def test_parallel_rwp(tmp_path, world, perturbed, backend, official):
    spawn_gloo(_worker, world, (world, perturbed, backend, official, str(tmp_path / "init"), str(tmp_path)), TIMEOUT_S)
    runs = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    ours = [run["ours"] for run in runs]
    perturbed_ranks = sorted(perturbed if perturbed is not None else range(1, world, 2))

    assert [o["seed"] for o in ours] == [SEED] * world, "every rank must use rank 0's seed"
    assert [o["stream"] for o in ours] == list(range(world)), "the noise stream of a rank is its rank"
    assert [r for r in range(world) if ours[r]["perturbed"]] == perturbed_ranks
    for o in ours:
        assert len(o["errors"]) == 3, o["errors"]
        assert "rank 0 must be a clean rank" in o["errors"][0]
        assert f"are not all in 0..{world - 1}" in o["errors"][1]
        assert "in parallel mode (ParallelRWP)" in o["errors"][2]

    # the mix of one step, against the single-process computation
    expected = _single_process(world, perturbed_ranks, CHECK_AT)
    start = _state(_model())
    got = ours[0]["early"]
    assert _max_diff(expected, start) > 1e-2, "the test must move the weights"
    unperturbed = _single_process(world, perturbed_ranks, CHECK_AT, gamma=0.0)
    assert _max_diff(expected, unperturbed) > 1e-4, "the perturbation must matter at this tolerance"
    for key in expected:
        if expected[key].is_floating_point():
            torch.testing.assert_close(got[key], expected[key], atol=2e-6, rtol=1e-5, msg=lambda m: f"{key}: {m}")
        else:
            assert torch.equal(got[key], expected[key]), key

    # the failed pass: perturbed weights inside it, clean ones after it
    for r, o in enumerate(ours):
        assert o["weights_perturbed_in_pass"] == (r in perturbed_ranks), f"rank {r}"
        assert o["restored_after_failure"], f"rank {r} was left with perturbed weights after the failed pass"

    # replicas stay identical bit for bit after STEPS steps
    for r in range(1, world):
        for i, (a, b) in enumerate(zip(ours[0]["final"], ours[r]["final"])):
            assert torch.equal(a, b), f"rank {r}, parameter {i}: max diff {(a - b).abs().max().item():.3g}"

    if official:
        start = list(_model().parameters())
        assert max((a - s).abs().max().item() for a, s in zip(runs[0]["adamw"], start)) > 1e-3
        for a, b in zip(runs[0]["adamw"], runs[1]["adamw"]):
            assert torch.equal(a, b), "RWP(AdamW): the replicas must stay identical"
        for r, run in enumerate(runs):
            assert run["amp"]["skipped"] and run["amp"]["scale_halved"], f"GradScaler overflow on rank {r}"
        for a, b in zip(runs[0]["amp"]["final"], runs[1]["amp"]["final"]):
            assert torch.equal(a, b), "GradScaler: the replicas must stay identical"
        drift = max((a - b).abs().max().item() for a, b in zip(runs[0]["official"], runs[1]["official"]))
        print(f"\nafter {STEPS} steps: official scheme's replicas differ by up to {drift:.3g}; ParallelRWP's by 0")
        assert drift > 0, "the official sub_ restore was expected to let the replicas drift apart"


@pytest.fixture
def one_process_group(tmp_path):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("make, error, message", [
    (lambda m: (m, RWPSGD(m.parameters(), lr=0.1)), TypeError, "needs a DistributedDataParallel model"),
    (lambda m: (DistributedDataParallel(m), torch.optim.SGD(m.parameters(), lr=0.1)), TypeError,
     "needs an rwp_kernels.optim optimizer"),
    (lambda m: (DistributedDataParallel(m), RWPSGD(m.parameters(), lr=0.1, adaptive=True)), ValueError,
     "does not support adaptive=True"),
    (lambda m: (DistributedDataParallel(m), RWPSGD(m.parameters(), lr=0.1, restore="regenerate")), ValueError,
     "needs restore='exact'"),
    (lambda m: (DistributedDataParallel(m), RWPSGD(m.parameters(), lr=0.1)), ValueError,
     "at least one perturbed and one clean rank; world size 1"),
])
def test_parallel_rwp_rejects(one_process_group, make, error, message):
    model, opt = make(_model())
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        ParallelRWP(model, opt)
