"""RWPSGD without perturbation is torch.optim.SGD, bit for bit (a real small CNN on CPU, 20 steps).

gamma=0 with alpha=0.5 and both passes on the same batch: p.grad becomes 1.0 * g + g = 2g and the step
multiplies by 0.5, which is exact in floating point, so the update must equal SGD's bit for bit; alpha=0:
perturb() does nothing and step() is SGD's step.
"""
import copy

import pytest
import torch

from rwp_kernels.optim import RWPSGD, freeze_bn_stats

from _optim_common import (BACKEND_PARAMS, assert_models_equal, backward, batches, model_pair,  # noqa: F401
                           one_torch_thread)

STEPS = 20

CONFIGS = {
    "plain": dict(lr=0.1),
    "momentum+wd": dict(lr=0.1, momentum=0.9, weight_decay=5e-4),
    "nesterov": dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "dampening": dict(lr=0.1, momentum=0.5, dampening=0.3),
    "maximize": dict(lr=0.01, momentum=0.9, maximize=True, weight_decay=1e-4),
}


def _groups(model, split: bool):
    if not split:
        return list(model.parameters())
    decay = [p for p in model.parameters() if p.dim() > 1]
    rest = [p for p in model.parameters() if p.dim() <= 1]
    return [{"params": decay}, {"params": rest, "lr": 0.02, "weight_decay": 0.0}]


def _run_pair(config, mode, *, split_groups=False, set_to_none=True, backend="reference", scheduler=False):
    ours, ref = model_pair(seed=11)
    opt = RWPSGD(_groups(ours, split_groups), **config, gamma=0.0 if mode == "gamma0" else 0.05,
                 alpha=0.0 if mode == "alpha0" else 0.5, seed=3, backend=backend)
    sgd = torch.optim.SGD(_groups(ref, split_groups), **config)
    schedulers = []
    if scheduler:
        schedulers = [torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=STEPS) for o in (opt, sgd)]
    for batch in batches(STEPS, seed=2):
        opt.zero_grad(set_to_none=set_to_none)
        sgd.zero_grad(set_to_none=set_to_none)
        backward(ours, batch)
        if mode == "gamma0":
            with opt.perturbed(), freeze_bn_stats(ours):
                backward(ours, batch)
        elif mode == "alpha0":
            opt.perturb()  # a no-op with alpha=0
        opt.step()
        backward(ref, batch)
        sgd.step()
        for s in schedulers:
            s.step()
    return ours, ref, opt, sgd


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("mode", ["gamma0", "alpha0"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_bit_identical_to_sgd(name, mode, backend):
    ours, ref, opt, sgd = _run_pair(CONFIGS[name], mode, backend=backend)
    assert_models_equal(ours, ref, exact=True)
    for p, q in zip(ours.parameters(), ref.parameters()):
        if "momentum_buffer" in sgd.state[q]:
            assert torch.equal(opt.state[p]["momentum_buffer"], sgd.state[q]["momentum_buffer"])
    assert opt.steps == STEPS


@pytest.mark.parametrize("set_to_none", [True, False])
def test_bit_identical_with_groups_schedulers_and_zeroed_grads(set_to_none):
    """Two param groups (different lr and weight decay), a cosine LR schedule, zero_grad(set_to_none=...)."""
    ours, ref, _, _ = _run_pair(CONFIGS["nesterov"], "gamma0", split_groups=True, set_to_none=set_to_none,
                                scheduler=True)
    assert_models_equal(ours, ref, exact=True)


def test_sgd_state_dict_loads_into_rwpsgd():
    """A checkpoint of torch.optim.SGD resumes in RWPSGD (momentum buffers carry over)."""
    ours, ref = model_pair(seed=4)
    config = CONFIGS["momentum+wd"]
    sgd = torch.optim.SGD(ref.parameters(), **config)
    data = batches(4, seed=9)
    for batch in data[:2]:
        sgd.zero_grad()
        backward(ref, batch)
        sgd.step()
    ours.load_state_dict(ref.state_dict())
    opt = RWPSGD(ours.parameters(), **config, gamma=0.0, alpha=0.0, seed=0)
    opt.load_state_dict(copy.deepcopy(sgd.state_dict()))  # as from a file: no shared buffers
    for batch in data[2:]:
        for model, o in ((ours, opt), (ref, sgd)):
            o.zero_grad()
            backward(model, batch)
            o.step()
    assert_models_equal(ours, ref, exact=True)


@pytest.mark.parametrize("mode", ["gamma0", "alpha0"])
def test_empty_parameters_are_left_alone_as_sgd_does(mode):
    """A zero-size parameter (with a gradient) among the others: torch.optim.SGD keeps an empty momentum buffer
    for it and updates the rest; so does RWPSGD, bit for bit, perturbed or not."""
    ours, ref = model_pair(seed=5)
    for model in (ours, ref):
        model.empty = torch.nn.Parameter(torch.zeros(0, 3))
    config = CONFIGS["momentum+wd"]
    opt = RWPSGD(ours.parameters(), **config, gamma=0.0 if mode == "gamma0" else 0.05,
                 alpha=0.0 if mode == "alpha0" else 0.5, seed=3)
    sgd = torch.optim.SGD(ref.parameters(), **config)
    for batch in batches(3, seed=6):
        for model, o in ((ours, opt), (ref, sgd)):
            o.zero_grad()
            backward(model, batch)
            model.empty.grad = torch.zeros(0, 3)
            if o is opt and mode == "gamma0":
                with opt.perturbed(), freeze_bn_stats(ours):
                    backward(ours, batch)
            elif o is opt:
                opt.perturb()  # a no-op with alpha=0
            o.step()
    assert_models_equal(ours, ref, exact=True)
    assert opt.state[ours.empty]["momentum_buffer"].shape == sgd.state[ref.empty]["momentum_buffer"].shape == (0, 3)
