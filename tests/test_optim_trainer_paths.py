"""The paths trainers take through the optimizer, each compared with the same step done by hand with the
public ops, or refused with a clear error: zero_grad() inside the perturbation window (trainers zero before
every backward), step(closure) with closures that zero, step() through a wrapper that copies the
optimizer's attributes (Lightning's LightningOptimizer), BatchNorm statistics in step(closure), gradients
accumulated outside the closure, and step() without a perturbation."""
import pytest
import torch
from torch import nn

import rwp_kernels
from rwp_kernels.optim import RWP, RWPSGD, freeze_bn_stats

from _optim_common import BACKEND_PARAMS, assert_models_equal, backward, batches, model_pair  # noqa: F401
from _optim_common import one_torch_thread  # noqa: F401

LR, MOMENTUM, GAMMA, SEED = 0.05, 0.9, 0.05, 5


def make(kind, model, *, alpha=0.5, adaptive=False, backend="reference"):
    kw = dict(gamma=GAMMA, alpha=alpha, adaptive=adaptive, seed=SEED, backend=backend)
    if kind == "rwpsgd":
        return RWPSGD(model.parameters(), lr=LR, momentum=MOMENTUM, **kw)
    return RWP(model.parameters(), torch.optim.SGD, lr=LR, momentum=MOMENTUM, **kw)


def by_hand_step(model, clean_batch, perturbed_batch, *, alpha, step, buffers, backend, zeroed_between):
    """One RWPSGD step from the public ops. ``zeroed_between``: the perturbed backward starts from zero
    gradients and the scaled clean gradient enters sgd_step_ as clean_grads (what zero_grad() inside the
    window leads to); otherwise the perturbed gradient accumulates onto it in p.grad."""
    params = list(model.parameters())
    for p in params:
        p.grad = None
    backward(model, clean_batch)
    backups = [torch.empty_like(p) for p in params]
    grads = [p.grad for p in params]
    rwp_kernels.perturb_(params, gamma=GAMMA, seed=SEED, step=step, backups=backups, grads=grads,
                         grad_scale=(1 - alpha) / alpha, backend=backend)
    clean = None
    if zeroed_between:
        clean = [p.grad for p in params]
        for p in params:
            p.grad = None
    with freeze_bn_stats(model):
        backward(model, perturbed_batch)
    first = not buffers
    if first:
        buffers.extend(torch.zeros_like(p) for p in params)
    rwp_kernels.sgd_step_(params, [p.grad for p in params], buffers, lr=LR, momentum=MOMENTUM,
                          grad_scale=alpha, backups=backups, is_first_step=first, backend=backend,
                          clean_grads=clean, clean_scale=alpha if clean is not None else 0.0)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("alpha", [0.5, 0.3])
def test_zero_grad_inside_the_window_keeps_the_clean_gradient(backend, alpha):
    """A trainer's zero_grad() right before the perturbed backward: the update is still the mix."""
    ours, ref = model_pair()
    opt = make("rwpsgd", ours, alpha=alpha, backend=backend)
    buffers = []
    for t, (clean, perturbed) in enumerate(zip(batches(3, seed=1), batches(3, seed=2))):
        opt.zero_grad()
        backward(ours, clean)
        with opt.perturbed(), freeze_bn_stats(ours):
            opt.zero_grad()
            backward(ours, perturbed)
        opt.step()
        by_hand_step(ref, clean, perturbed, alpha=alpha, step=t, buffers=buffers, backend=backend,
                     zeroed_between=True)
    assert_models_equal(ours, ref, exact=True)


@pytest.mark.parametrize("kind", ["rwpsgd", "wrapper"])
@pytest.mark.parametrize("adaptive", [False, True], ids=["rwp", "arwp"])
def test_zero_grad_inside_the_window_equals_not_zeroing(kind, adaptive):
    """alpha = 0.5 (exact scaling): zeroing inside the window or not gives the same weights bit for bit."""
    a, b = model_pair()
    opt_a, opt_b = make(kind, a, adaptive=adaptive), make(kind, b, adaptive=adaptive)
    for clean, perturbed in zip(batches(3, seed=3), batches(3, seed=4)):
        for model, opt, zero in ((a, opt_a, False), (b, opt_b, True)):
            opt.zero_grad()
            backward(model, clean)
            with opt.perturbed(), freeze_bn_stats(model):
                if zero:
                    opt.zero_grad(set_to_none=False)
                backward(model, perturbed)
            opt.step()
    assert_models_equal(a, b, exact=True)


def test_zero_grad_after_the_perturbed_backward_is_refused_and_changes_nothing():
    model, _ = model_pair()
    opt = make("rwpsgd", model)
    backward(model, batches(1, seed=1)[0])
    opt.perturb()
    backward(model, batches(1, seed=2)[0])
    grads = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"zero_grad\(\): the gradient of param group 0, parameter 0 .*holds the "
                                           r"clean gradient and part of the perturbed one"):
        opt.zero_grad()
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert opt.is_perturbed
    opt.restore()
    opt.zero_grad()  # after restore(): discards the perturbation
    assert not opt.is_perturbed and all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("kind", ["rwpsgd", "wrapper"])
def test_step_without_a_perturbation_is_refused_unless_alpha_is_zero(kind):
    model, _ = model_pair()
    opt = make(kind, model)
    backward(model, batches(1)[0])
    weights = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"step\(\): no perturbation is pending, so this update would be plain "
                                           r"SGD on p.grad, not RWP"):
        opt.step()
    assert all(torch.equal(p.detach(), w) for p, w in zip(model.parameters(), weights)) and opt.steps == 0
    plain = make(kind, model, alpha=0.0)
    plain.step()
    assert plain.steps == 1


@pytest.mark.parametrize("kind", ["rwpsgd", "wrapper"])
def test_step_closure_leaves_batchnorm_statistics_to_the_clean_pass(kind):
    a, b = model_pair()
    opt = make(kind, a)
    batch = batches(1, seed=7)[0]
    opt.zero_grad()
    opt.step(lambda: backward(a, batch))
    b.train()
    with torch.no_grad():
        b(batch[0])  # one clean forward: the statistics step(closure) must leave
    for (name, x), (_, y) in zip(a.named_buffers(), b.named_buffers()):
        assert torch.equal(x, y), f"{name} differs from one clean forward's update"
    assert all(m.track_running_stats for m in a.modules() if isinstance(m, nn.BatchNorm2d))


def test_step_closure_refuses_gradients_accumulated_outside_it():
    """Lightning's accumulate_grad_batches=2: the first micro-batch's backward runs outside step(closure), whose
    closure does not zero; the perturbed pass would cover the last micro-batch alone."""
    model, _ = model_pair()
    opt = make("rwpsgd", model)
    first, second = batches(2, seed=8)
    opt.zero_grad()
    backward(model, first)
    weights = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"step\(closure\): p.grad held gradients of earlier backward passes"):
        opt.step(lambda: backward(model, second))
    assert not opt.is_perturbed and opt.steps == 0
    assert all(torch.equal(p.detach(), w) for p, w in zip(model.parameters(), weights))


def test_step_closure_accepts_stale_gradients_that_the_closure_zeroes():
    """torch's closure pattern: the closure zeroes; p.grad still holds the previous step's gradients."""
    a, b = model_pair()
    opt_a, opt_b = make("rwpsgd", a), make("rwpsgd", b)
    for batch in batches(3, seed=9):
        opt_a.step(lambda: (opt_a.zero_grad(), backward(a, batch))[1])
        opt_b.zero_grad()
        opt_b.step(lambda: backward(b, batch))
    assert_models_equal(a, b, exact=True)


def test_step_closure_with_a_pending_perturbation_runs_it_once_and_applies():
    """A trainer's step() after our perturbed() window (Lightning's manual optimization passes a closure
    that does nothing): the closure runs once and the pending update is applied."""
    a, b = model_pair()
    opt_a, opt_b = make("rwpsgd", a), make("rwpsgd", b)
    clean, perturbed = batches(2, seed=10)
    calls = []
    for model, opt in ((a, opt_a), (b, opt_b)):
        opt.zero_grad()
        backward(model, clean)
        with opt.perturbed(), freeze_bn_stats(model):
            backward(model, perturbed)
    assert opt_a.step(lambda: calls.append(1) or 7.0) == 7.0
    opt_b.step()
    assert calls == [1] and not opt_a.is_perturbed
    assert_models_equal(a, b, exact=True)


class CopyingWrapper:
    """What LightningOptimizer does to an optimizer: a new class deriving from both, with a copy of the
    optimizer's ``__dict__``; its step() goes to the real optimizer."""

    def __init__(self, optimizer):
        self.__dict__ = {k: v for k, v in optimizer.__dict__.items() if k not in ("step", "__del__")}
        self.__class__ = type("Wrapped" + optimizer.__class__.__name__, (self.__class__, optimizer.__class__), {})
        self._optimizer = optimizer

    def step(self, closure=None):
        return self._optimizer.step(closure)


@pytest.mark.parametrize("kind", ["rwpsgd", "wrapper"])
def test_perturb_through_a_copying_wrapper_reaches_the_real_step(kind):
    a, b = model_pair()
    opt_a, opt_b = make(kind, a), make(kind, b)
    wrapped = CopyingWrapper(opt_a)
    for t, (clean, perturbed) in enumerate(zip(batches(2, seed=11), batches(2, seed=12))):
        for model, opt in ((a, wrapped), (b, opt_b)):
            opt.zero_grad()
            backward(model, clean)
            with opt.perturbed(), freeze_bn_stats(model):
                backward(model, perturbed)
            opt.step()
        assert not opt_a.is_perturbed and not wrapped.is_perturbed and opt_a.steps == t + 1
    assert_models_equal(a, b, exact=True)


@pytest.mark.parametrize("kind", ["rwpsgd", "wrapper"])
@pytest.mark.parametrize("scaler", [False, True], ids=["no-scaler", "unscaled-first"])
def test_outside_clipping_after_the_perturbed_pass_is_refused(kind, scaler):
    """torch's clip_grad_norm_ (what Accelerate's and Lightning's clipping call) on p.grad between the
    perturbed pass and step(): p.grad is not the mix there, so step() refuses and restores the weights."""
    model, _ = model_pair()
    opt = make(kind, model)
    grad_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8) if scaler else None
    scale = grad_scaler.scale if scaler else None
    clean, perturbed = batches(2, seed=13)
    backward(model, clean, scale)
    weights = [p.detach().clone() for p in model.parameters()]
    with opt.perturbed(), freeze_bn_stats(model):
        backward(model, perturbed, scale)
    if scaler:
        grad_scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
    with pytest.raises(RuntimeError, match=r"step\(\): the gradient of param group 0, parameter 0 .*was changed after "
                                           r"the perturbed pass.*opt.clip_grad_norm_"):
        grad_scaler.step(opt) if scaler else opt.step()
    assert not opt.is_perturbed and opt.steps == 0
    assert all(torch.equal(p.detach(), w) for p, w in zip(model.parameters(), weights))


@pytest.mark.parametrize("scaler", [False, True], ids=["no-scaler", "unscaled-first"])
@pytest.mark.parametrize("clip", [False, True], ids=["no-clip", "clip"])
def test_unscaling_and_our_clipping_after_the_perturbed_pass_are_accepted(scaler, clip):
    model, _ = model_pair()
    opt = make("rwpsgd", model)
    grad_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8) if scaler else None
    scale = grad_scaler.scale if scaler else None
    clean, perturbed = batches(2, seed=14)
    backward(model, clean, scale)
    with opt.perturbed(), freeze_bn_stats(model):
        backward(model, perturbed, scale)
    if scaler:
        grad_scaler.unscale_(opt)
    if clip:
        opt.clip_grad_norm_(0.1)
    grad_scaler.step(opt) if scaler else opt.step()
    assert opt.steps == 1


class LightningLikeModule:
    """The two attributes of a LightningModule that Lightning's closure wrapper exposes."""

    def __init__(self, gradient_clip_val):
        self._trainer = type("Trainer", (), {"gradient_clip_val": gradient_clip_val})()


def _wrap_closure(module, optimizer, closure):
    return closure()


def test_step_closure_refuses_a_trainer_that_clips_inside_the_closure():
    """Lightning's automatic optimization with gradient_clip_val wraps the closure as
    functools.partial(Precision._wrap_closure, module, optimizer, closure) and clips after every call."""
    import functools

    model, _ = model_pair()
    opt = make("rwpsgd", model)
    batch = batches(1, seed=15)[0]
    weights = [p.detach().clone() for p in model.parameters()]
    clipping = functools.partial(_wrap_closure, LightningLikeModule(1.0), opt, lambda: backward(model, batch))
    with pytest.raises(RuntimeError, match=r"step\(closure\): Lightning's gradient_clip_val=1.0 clips the gradient "
                                           r"inside the closure"):
        opt.step(clipping)
    assert all(torch.equal(p.detach(), w) for p, w in zip(model.parameters(), weights)) and opt.steps == 0
    opt.zero_grad()
    opt.step(functools.partial(_wrap_closure, LightningLikeModule(None), opt, lambda: backward(model, batch)))
    assert opt.steps == 1


@pytest.mark.parametrize("kind", ["rwpsgd", "wrapper"])
@pytest.mark.parametrize("adaptive", [False, True], ids=["rwp", "arwp"])
def test_zero_grad_inside_the_window_under_grad_scaler(kind, adaptive):
    """GradScaler: zeroing before the perturbed backward gives the weights of not zeroing (alpha = 0.5: the
    scaling by 1/S and by alpha is exact either way), and an inf in the kept clean gradient skips the update
    (GradScaler does not see that one, so its scale stays: docs/optim.md, Mixed precision)."""
    a, b = model_pair()
    opt_a, opt_b = make(kind, a, adaptive=adaptive), make(kind, b, adaptive=adaptive)
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**10) for _ in range(2)]
    for clean, perturbed in zip(batches(3, seed=16), batches(3, seed=17)):
        for model, opt, scaler, zero in ((a, opt_a, scalers[0], False), (b, opt_b, scalers[1], True)):
            opt.zero_grad()
            backward(model, clean, scaler.scale)
            with opt.perturbed(), freeze_bn_stats(model):
                if zero:
                    opt.zero_grad()
                backward(model, perturbed, scaler.scale)
            scaler.step(opt)
            scaler.update()
    assert_models_equal(a, b, exact=True)
    # an inf in the clean gradient, kept aside by zero_grad(): the update is skipped
    weights = [p.detach().clone() for p in b.parameters()]
    opt_b.zero_grad()
    backward(b, batches(1, seed=18)[0], scalers[1].scale)
    next(b.parameters()).grad.view(-1)[0] = float("inf")
    with opt_b.perturbed(), freeze_bn_stats(b):
        opt_b.zero_grad()
        backward(b, batches(1, seed=19)[0], scalers[1].scale)
    scalers[1].step(opt_b)
    scalers[1].update()
    assert all(torch.equal(p.detach(), w) for p, w in zip(b.parameters(), weights)) and opt_b.steps == 4


@pytest.mark.slow
def test_step_closure_freezes_batchnorm_inside_a_compiled_model():
    """A torch.compile'd model runs its layers inside a compiled graph, where no hook of theirs fires: the
    perturbed pass of step(closure) still leaves the BatchNorm statistics to the clean pass (as the README
    loop with freeze_bn_stats does), up to the compiled kernels' rounding."""
    a, b = model_pair()
    compiled = torch.compile(a)
    opt_a, opt_b = make("rwpsgd", a), make("rwpsgd", b)
    for batch in batches(3, seed=20):
        opt_a.step(lambda: (opt_a.zero_grad(), backward(compiled, batch))[1])
        opt_b.zero_grad()
        backward(b, batch)
        with opt_b.perturbed(), freeze_bn_stats(b):
            backward(b, batch)
        opt_b.step()
    assert_models_equal(a, b, exact=False, atol=1e-5, rtol=1e-4)
    for (name, x), (_, y) in zip(a.named_buffers(), b.named_buffers()):
        if not x.is_floating_point():
            assert torch.equal(x, y), f"{name}: {x} != {y}"


@pytest.mark.parametrize("where", ["inside the block", "bare perturb()"])
def test_outside_clipping_inside_the_window_is_refused_too(where):
    """The gradient marks are settled at the end of each backward, not at the block's exit: a clip right
    after the perturbed backward, inside the perturbed() block or between bare perturb() and step(), is
    refused the same way."""
    model, _ = model_pair()
    opt = make("rwpsgd", model)
    clean, perturbed = batches(2, seed=21)
    backward(model, clean)
    weights = [p.detach().clone() for p in model.parameters()]
    if where == "inside the block":
        with opt.perturbed(), freeze_bn_stats(model):
            backward(model, perturbed)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
    else:
        opt.perturb()
        backward(model, perturbed)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
    with pytest.raises(RuntimeError, match=r"was changed after the perturbed pass"):
        opt.step()
    assert all(torch.equal(p.detach(), w) for p, w in zip(model.parameters(), weights))


def test_backward_passes_in_the_window_are_not_mistaken_for_outside_changes():
    """Several perturbed backward passes (accumulation) and a zero_grad() between them: all settled."""
    a, b = model_pair()
    opt_a, opt_b = make("rwpsgd", a), make("rwpsgd", b)
    clean, p1, p2 = batches(3, seed=22)
    for model, opt in ((a, opt_a), (b, opt_b)):
        backward(model, clean)
        with opt.perturbed(), freeze_bn_stats(model):
            backward(model, p1)
            backward(model, p2)
        opt.step()
    assert_models_equal(a, b, exact=True)


def test_a_dropped_optimizer_leaves_no_state_behind_on_the_parameters():
    """The gradient hooks stay on the parameters but hold the optimizer's state weakly: its backups go
    with it (a new optimizer per run over one model must not keep every old one's copy of the weights)."""
    import gc
    import weakref

    model, _ = model_pair()
    opt = make("rwpsgd", model)
    backward(model, batches(1, seed=23)[0])
    with opt.perturbed():
        backward(model, batches(1, seed=24)[0])
    opt.step()
    state = weakref.ref(opt._rwp)
    del opt
    gc.collect()
    assert state() is None
    backward(model, batches(1, seed=25)[0])  # the hooks of the dropped optimizer run and do nothing
