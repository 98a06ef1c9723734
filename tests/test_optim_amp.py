"""Mixed precision: torch.amp.GradScaler through the fused-optimizer contract, and bf16 autocast (CPU)."""
import copy

import pytest
import torch

from rwp_kernels.optim import RWP, RWPSGD, freeze_bn_stats

from _optim_common import (assert_models_equal, backward, batches, inf_from_backward, model_pair,  # noqa: F401
                           one_torch_thread, params_of)

RWP_KW = dict(gamma=0.05, seed=21, backend="reference")
INIT_SCALE = 2.0**10


def _make(kind, model, **kw):
    kw = {**RWP_KW, **kw}
    if kind == "rwpsgd":
        return RWPSGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3, **kw)
    return RWP(model.parameters(), torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=1e-3, **kw)


def _step(model, opt, clean, perturbed, scaler=None, *, alpha, inject=None, clip=None):
    """One RWP update; ``inject`` = "clean" or "perturbed" puts an inf into that pass's gradient."""
    scale = scaler.scale if scaler is not None else None
    opt.zero_grad()
    if alpha < 1:
        backward(model, clean, scale)
        if inject == "clean":
            next(model.parameters()).grad.view(-1)[0] = float("inf")
    hook = inf_from_backward(list(model.parameters())[-1]) if inject == "perturbed" else None
    with opt.perturbed(), freeze_bn_stats(model):
        backward(model, perturbed, scale)
    if hook is not None:
        hook.remove()
    if clip is not None:
        if scaler is not None:
            scaler.unscale_(opt)
        opt.clip_grad_norm_(clip)
    if scaler is None:
        opt.step()
    else:
        scaler.step(opt)
        scaler.update()


CASES = [("rwpsgd", False, 0.5), ("rwpsgd", True, 0.5), ("rwpsgd", True, 1.0), ("wrapper", False, 0.5),
         ("wrapper", True, 0.5)]


@pytest.mark.parametrize("kind,adaptive,alpha", CASES)
def test_grad_scaler_steps_equal_unscaled_steps(kind, adaptive, alpha):
    """With a power-of-two loss scale every gradient is exactly S times the unscaled one, and the fused
    step multiplies by alpha / S: the run is bit-identical to the run without GradScaler."""
    a, b = model_pair(seed=1)
    opt_a, opt_b = _make(kind, a, alpha=alpha, adaptive=adaptive), _make(kind, b, alpha=alpha, adaptive=adaptive)
    scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE)
    data = batches(6, seed=2)
    for t in range(3):
        _step(a, opt_a, data[2 * t], data[2 * t + 1], scaler, alpha=alpha)
        _step(b, opt_b, data[2 * t], data[2 * t + 1], alpha=alpha)
    assert scaler.get_scale() == INIT_SCALE
    assert_models_equal(a, b, exact=True)


@pytest.mark.parametrize("kind,adaptive,alpha,inject", [
    case + (inject,) for case in CASES for inject in ("perturbed", "clean") if not (inject == "clean" and case[2] == 1)
])
def test_overflow_restores_and_skips_the_update(kind, adaptive, alpha, inject):
    """An inf in either pass (alpha=1 has no clean pass): the weights are restored bit for bit, momentum and
    Fisher state are untouched, nothing is updated, and training goes on."""
    model, _ = model_pair(seed=3)
    opt = _make(kind, model, alpha=alpha, adaptive=adaptive)
    scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE)
    data = batches(6, seed=4)
    _step(model, opt, data[0], data[1], scaler, alpha=alpha)
    weights, state = params_of(model), copy.deepcopy(opt.state_dict())
    _step(model, opt, data[2], data[3], scaler, alpha=alpha, inject=inject)
    for p, w in zip(model.parameters(), weights):
        assert torch.equal(p.detach(), w), "an overflowed step must leave the clean weights"
    after = opt.state_dict()
    for section in ("state", "base_state"):
        for key, value in state.get(section, {}).items():
            for name, t in value.items():
                assert torch.equal(after[section][key][name], t), f"{name} changed on an overflowed step"
    assert sum(len(state.get(s, {})) for s in ("state", "base_state")) > 0
    if inject == "perturbed" or opt.param_groups[0]["adaptive"] is False:
        assert scaler.get_scale() == INIT_SCALE / 2, "GradScaler must see the overflow and back off"
    _step(model, opt, data[4], data[5], scaler, alpha=alpha)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not all(torch.equal(p.detach(), w) for p, w in zip(model.parameters(), weights))


@pytest.mark.parametrize("kind", ["rwpsgd", "wrapper"])
def test_unscale_then_clip_equals_clip_without_scaler(kind):
    a, b = model_pair(seed=5)
    opt_a, opt_b = _make(kind, a, alpha=0.5), _make(kind, b, alpha=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE)
    data = batches(4, seed=6)
    for t in range(2):
        _step(a, opt_a, data[2 * t], data[2 * t + 1], scaler, alpha=0.5, clip=0.5)
        _step(b, opt_b, data[2 * t], data[2 * t + 1], alpha=0.5, clip=0.5)
    assert_models_equal(a, b, exact=True)


@pytest.mark.parametrize("kind", ["rwpsgd", "wrapper"])
def test_unscale_is_refused_where_it_cannot_be_honoured(kind):
    """ARWP with 0 < alpha < 1 keeps the clean gradient aside, where scaler.unscale_ cannot reach it."""
    model, _ = model_pair(seed=7)
    opt = _make(kind, model, alpha=0.5, adaptive=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE)
    weights = params_of(model)
    clean, perturbed = batches(2, seed=8)
    backward(model, clean, scaler.scale)
    opt.perturb()
    backward(model, perturbed, scaler.scale)
    scaler.unscale_(opt)
    with pytest.raises(RuntimeError, match="unscale_"):
        scaler.step(opt)
    assert not opt.is_perturbed
    for p, w in zip(model.parameters(), weights):
        assert torch.equal(p.detach(), w)


def test_bf16_autocast():
    """bf16 autocast forward passes: RWPSGD and RWP(SGD) (different code paths, the same math) agree."""
    a, b = model_pair(seed=9)
    opt_a, opt_b = _make("rwpsgd", a, alpha=0.5), _make("wrapper", b, alpha=0.5)
    start = params_of(a)
    data = batches(4, seed=10)
    for t in range(2):
        for model, opt in ((a, opt_a), (b, opt_b)):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                _step(model, opt, data[2 * t], data[2 * t + 1], alpha=0.5)
    assert_models_equal(a, b, exact=False, atol=1e-6, rtol=1e-5)
    assert all(p.dtype == torch.float32 for p in a.parameters())
    assert any(not torch.equal(p.detach(), w) for p, w in zip(a.parameters(), start))
