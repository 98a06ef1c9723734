"""Hugging Face Accelerate (the real library, one CPU process): RWPSGD through ``accelerator.prepare``.

Each training path is compared with the same steps done by hand with the public ops (``rwp_kernels.perturb_``,
``rwp_kernels.sgd_step_``), bit for bit where the arithmetic is the same, or is refused with a clear error:

- the perturbed window through the prepared (Accelerated) optimizer: ``opt.optimizer.perturbed()``;
- ``step(closure)`` through ``AcceleratedOptimizer.step`` (no accumulation);
- ``accelerator.accumulate()`` + ``step(closure)``: refused; accumulation the right way (all clean micro-batches,
  one perturbation, all perturbed micro-batches, one step);
- mixed precision: bf16 autocast (Accelerate wraps the forward); fp16 on CPU (Accelerate gives neither autocast
  nor GradScaler there) and Accelerate's GradScaler path, with a CPU GradScaler put where Accelerate puts its
  CUDA one;
- ``accelerator.clip_grad_norm_`` in the perturbed window: refused at step(); ``opt.optimizer.clip_grad_norm_``
  clips the true mix;
- ``accelerator.save_state`` / ``load_state``: resuming is bit-identical to not stopping;
- the examples of docs/integrations.md, "Hugging Face Accelerate", each run as a script.

Accelerate keeps process-wide singletons (AcceleratorState, PartialState, GradientState); the optimizer's
accumulation check reads GradientState. An autouse fixture resets them (and the environment) before and after
every test, so nothing leaks into other tests of the same pytest process.
"""
import copy
import os
import subprocess
import sys
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("accelerate")
from accelerate import Accelerator  # noqa: E402
from accelerate.optimizer import AcceleratedOptimizer  # noqa: E402
from accelerate.state import AcceleratorState, GradientState  # noqa: E402

import rwp_kernels  # noqa: E402
from _doc_examples import example  # noqa: E402
from _optim_common import BACKEND_PARAMS, CPU_BACKENDS, inf_from_backward, one_torch_thread  # noqa: E402, F401
from rwp_kernels.models import small_cnn  # noqa: E402
from rwp_kernels.optim import RWPSGD, freeze_bn_stats  # noqa: E402

LR, MOMENTUM, WEIGHT_DECAY, GAMMA, SEED = 0.05, 0.9, 1e-3, 0.05, 5
BACKEND = CPU_BACKENDS[-1]  # the C++ CPU kernels where built, else the reference; the same for both sides
BATCH = 8


def reset_accelerate():
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(autouse=True)
def fresh_accelerate():
    """No Accelerate singleton state (nor environment variable it may set) enters or leaves a test."""
    environ = dict(os.environ)
    reset_accelerate()
    yield
    reset_accelerate()
    os.environ.clear()
    os.environ.update(environ)


# --- helpers ------------------------------------------------------------------------------------------------

def models(seed=0, factory=small_cnn):
    torch.manual_seed(seed)
    model = factory()
    return model, copy.deepcopy(model)


def dataset(n_batches, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_batches * BATCH, 1, 8, 8, generator=g)
    y = torch.randint(0, 10, (n_batches * BATCH,), generator=g)
    return torch.utils.data.TensorDataset(x, y)


def loader(ds, shuffle=False):
    return torch.utils.data.DataLoader(ds, batch_size=BATCH, shuffle=shuffle)


def plain_batches(ds):
    return [(ds.tensors[0][i:i + BATCH], ds.tensors[1][i:i + BATCH]) for i in range(0, len(ds), BATCH)]


def rwpsgd(model, *, alpha=0.5, seed=SEED):
    return RWPSGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, gamma=GAMMA, alpha=alpha,
                  seed=seed, backend=BACKEND)


def halves(x, y):
    h = len(x) // 2
    return (x[:h], y[:h]), (x[h:], y[h:])


def loss_of(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def assert_same(a, b, *, exact=True, atol=0.0, rtol=0.0):
    """Parameters and buffers (BatchNorm statistics) of two models."""
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        if exact or not x.is_floating_point():
            assert torch.equal(x, y), f"{name}: max diff {(x.double() - y.double()).abs().max().item():.3g}"
        else:
            torch.testing.assert_close(x, y, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


def weights(model):
    return [p.detach().clone() for p in model.parameters()]


class ByHand:
    """RWPSGD's steps from the public ops, on ``model``: perturb_ with the clean gradient scaled by (1 - alpha) /
    alpha, the perturbed backward accumulating onto it, sgd_step_ with grad_scale alpha (spec.md section 5)."""

    def __init__(self, model, alpha=0.5):
        self.model, self.alpha = model, alpha
        self.params = list(model.parameters())
        self.buffers, self.t = [], 0

    def step(self, clean_passes, perturbed_passes, *, clean_aside=False, loss_scale=None):
        """``clean_passes`` / ``perturbed_passes``: callables that each run one backward. ``clean_aside``: the
        perturbed backward starts from zero gradients and the scaled clean gradient enters sgd_step_ as
        clean_grads (what a closure that zeroes the gradients leads to). ``loss_scale``: the gradients are
        that many times the true ones (GradScaler); the step divides by it, as RWPSGD does."""
        params, alpha = self.params, self.alpha
        for p in params:
            p.grad = None
        for run in clean_passes:
            run()
        backups = [torch.empty_like(p) for p in params]
        rwp_kernels.perturb_(params, gamma=GAMMA, seed=SEED, step=self.t, backups=backups,
                             grads=[p.grad for p in params], grad_scale=(1 - alpha) / alpha, backend=BACKEND)
        clean = None
        if clean_aside:
            clean = [p.grad for p in params]
            for p in params:
                p.grad = None
        with freeze_bn_stats(self.model):
            for run in perturbed_passes:
                run()
        grad_scale, found_inf, clean_scale = alpha, None, alpha if clean is not None else 0.0
        if loss_scale is not None:  # as GradScaler hands it over: 1/S from float64, times alpha, in float32
            device = params[0].device
            inv = torch.tensor(loss_scale, dtype=torch.float32, device=device).double().reciprocal().float()
            grad_scale, found_inf = inv * alpha, torch.zeros((), device=device)
            assert all(torch.isfinite(p.grad).all() for p in params)
        first = not self.buffers
        if first:
            self.buffers.extend(torch.zeros_like(p) for p in params)
        rwp_kernels.sgd_step_(params, [p.grad for p in params], self.buffers, lr=LR, momentum=MOMENTUM,
                              weight_decay=WEIGHT_DECAY, grad_scale=grad_scale, found_inf=found_inf, backups=backups,
                              is_first_step=first, clean_grads=clean, clean_scale=clean_scale, backend=BACKEND)
        self.t += 1

    def window_step(self, x, y, *, forward=None, scaler=None):
        """README's loop on one batch: clean pass on its first half, perturbed pass on its second half."""
        forward = forward or self.model
        scale = scaler.scale if scaler is not None else (lambda loss: loss)

        def run(batch):
            return lambda: scale(F.cross_entropy(forward(batch[0]).float(), batch[1])).backward()

        clean, perturbed = halves(x, y)
        self.step([run(clean)], [run(perturbed)], loss_scale=scaler.get_scale() if scaler is not None else None)


def window_loop(accelerator, model, opt, dl, *, before_step=None, after_step=None):
    """The loop of docs/integrations.md on prepared objects: clean pass, the perturbed window on the real
    optimizer (opt.optimizer), ``before_step()`` (e.g. clipping), step through the AcceleratedOptimizer,
    ``after_step()`` (e.g. a scheduler)."""
    for x, y in dl:
        clean, perturbed = halves(x, y)
        opt.zero_grad()
        accelerator.backward(loss_of(model, clean))
        with opt.optimizer.perturbed(), freeze_bn_stats(model):
            accelerator.backward(loss_of(model, perturbed))
        if before_step is not None:
            before_step()
        opt.step()
        if after_step is not None:
            after_step()


# --- 1. the perturbed window through the prepared optimizer ---------------------------------------------------

@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("alpha", [0.5, 0.3])
def test_prepared_window_loop_equals_by_hand(backend, alpha, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "BACKEND", backend)
    model, ref = models()
    ds = dataset(3)
    accelerator = Accelerator(cpu=True)
    model, opt, dl = accelerator.prepare(model, rwpsgd(model, alpha=alpha), loader(ds))
    assert isinstance(opt, AcceleratedOptimizer) and isinstance(opt.optimizer, RWPSGD)
    assert not hasattr(opt, "perturbed")  # what the docs say: the window is on opt.optimizer
    window_loop(accelerator, model, opt, dl)
    assert opt.optimizer.steps == 3 and not opt.optimizer.is_perturbed
    hand = ByHand(ref, alpha)
    for x, y in plain_batches(ds):
        hand.window_step(x, y)
    assert_same(model, ref)


def test_step_without_the_window_is_refused_through_the_accelerated_optimizer():
    """A plain Accelerate loop (one backward, opt.step()) with RWPSGD: refused, nothing changes."""
    model, _ = models()
    accelerator = Accelerator(cpu=True)
    model, opt, dl = accelerator.prepare(model, rwpsgd(model), loader(dataset(1, seed=14)))
    start = weights(model)
    opt.zero_grad()
    accelerator.backward(loss_of(model, next(iter(dl))))
    with pytest.raises(RuntimeError, match=r"step\(\): no perturbation is pending"):
        opt.step()
    assert opt.optimizer.steps == 0
    assert all(torch.equal(p.detach(), w) for p, w in zip(model.parameters(), start))


# --- 2. step(closure) through AcceleratedOptimizer.step -------------------------------------------------------

@pytest.mark.parametrize("zero_in_closure", [False, True], ids=["zero-before", "zero-in-closure"])
def test_step_closure_through_the_accelerated_optimizer_equals_by_hand(zero_in_closure):
    model, ref = models()
    ds = dataset(3, seed=2)
    accelerator = Accelerator(cpu=True)
    model, opt, dl = accelerator.prepare(model, rwpsgd(model, alpha=0.3), loader(ds))
    returned, losses = [], []
    for x, y in dl:
        def closure():
            if zero_in_closure:
                opt.zero_grad()
            loss = loss_of(model, (x, y))
            accelerator.backward(loss)
            losses.append(loss.detach())
            return loss

        if not zero_in_closure:
            opt.zero_grad()
        returned.append(opt.step(closure))
    assert opt.optimizer.steps == 3 and len(losses) == 6  # the closure ran twice per step
    # AcceleratedOptimizer.step does not return what the optimizer's step returns: keep the loss in the closure
    assert returned == [None] * 3
    hand = ByHand(ref, 0.3)
    for batch in plain_batches(ds):
        run = lambda b=batch: loss_of(ref, b).backward()  # noqa: E731
        hand.step([run], [run], clean_aside=zero_in_closure)
    assert_same(model, ref)


# --- 3. gradient accumulation ---------------------------------------------------------------------------------

def test_step_closure_under_accumulate_is_refused():
    """accumulate() with gradient_accumulation_steps=2: AcceleratedOptimizer.step skips the first micro-batch
    (the closure is not even called) and hands step(closure) the last one alone; RWPSGD refuses it."""
    model, _ = models()
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model, opt, dl = accelerator.prepare(model, rwpsgd(model), loader(dataset(2, seed=3)))
    start = weights(model)
    calls = []
    with pytest.raises(RuntimeError, match=r"step\(closure\): Accelerate's gradient accumulation over 2 batches"):
        for x, y in dl:
            with accelerator.accumulate(model):
                def closure():
                    calls.append(1)
                    opt.zero_grad()
                    loss = loss_of(model, (x, y))
                    accelerator.backward(loss)
                    return loss

                opt.step(closure)
    assert calls == [] and opt.optimizer.steps == 0 and not opt.optimizer.is_perturbed
    assert all(torch.equal(p.detach(), w) for p, w in zip(model.parameters(), start))


@pytest.mark.parametrize("who_divides", ["loop", "accelerator"])
def test_accumulation_the_right_way_equals_by_hand(who_divides):
    """All clean micro-batch passes, one perturbed() window with all perturbed micro-batch passes, one step.
    ``loop``: Accelerator() and the loop divides the losses by the number of micro-batches;
    ``accelerator``: Accelerator(gradient_accumulation_steps=k) divides in accelerator.backward (no accumulate())."""
    k = 2
    model, ref = models()
    ds = dataset(4, seed=4)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=k if who_divides == "accelerator" else 1)
    model, opt, dl = accelerator.prepare(model, rwpsgd(model, alpha=0.3), loader(ds))
    divide = 1 if who_divides == "accelerator" else k
    batches = iter(dl)
    for micro in zip(batches, batches):  # k = 2 micro-batches per update
        opt.zero_grad()
        for x, y in micro:
            with accelerator.no_sync(model):
                accelerator.backward(loss_of(model, (x, y)) / divide)
        with opt.optimizer.perturbed(), freeze_bn_stats(model):
            for i, (x, y) in enumerate(micro):
                with accelerator.no_sync(model) if i < k - 1 else nullcontext():
                    accelerator.backward(loss_of(model, (x, y)) / divide)
        opt.step()
    assert opt.optimizer.steps == 2
    hand = ByHand(ref, 0.3)
    data = plain_batches(ds)
    for micro in zip(data[0::2], data[1::2]):
        passes = [lambda b=b: (loss_of(ref, b) / k).backward() for b in micro]
        hand.step(passes, passes)
    assert_same(model, ref)


# --- 4. mixed precision ---------------------------------------------------------------------------------------

def test_bf16_mixed_precision_equals_by_hand_autocast():
    """Accelerate wraps the forward in torch.autocast("cpu", bfloat16) and casts the outputs to float32: the
    same ops by hand give the same bits."""
    model, ref = models()
    ds = dataset(3, seed=5)
    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    model, opt, dl = accelerator.prepare(model, rwpsgd(model), loader(ds))
    assert accelerator.scaler is None and accelerator.native_amp and hasattr(model, "_original_forward")
    window_loop(accelerator, model, opt, dl)

    def autocast_forward(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return ref(x)

    hand = ByHand(ref)
    for x, y in plain_batches(ds):
        hand.window_step(x, y, forward=autocast_forward)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert_same(model, ref)


def test_fp16_on_cpu_is_full_precision_in_accelerate():
    """Accelerate 1.x accepts mixed_precision="fp16" with cpu=True but makes neither an autocast wrapper nor a
    GradScaler (both are for accelerators only): it trains in float32, bit for bit the fp32 steps."""
    model, ref = models()
    ds = dataset(2, seed=6)
    accelerator = Accelerator(cpu=True, mixed_precision="fp16")
    model, opt, dl = accelerator.prepare(model, rwpsgd(model), loader(ds))
    assert accelerator.scaler is None and not accelerator.native_amp and opt.scaler is None
    window_loop(accelerator, model, opt, dl)
    hand = ByHand(ref)
    for x, y in plain_batches(ds):
        hand.window_step(x, y)
    assert_same(model, ref)


INIT_SCALE = 2.0**10


def cpu_scaler_accelerator():
    """Accelerator(mixed_precision="fp16") as on a GPU, on the CPU: Accelerate makes its GradScaler for CUDA
    (and the like) only, so a CPU one is put where it would be, before prepare(). prepare() then wraps the forward
    in fp16 autocast and hands the scaler to AcceleratedOptimizer: the code path of a GPU run."""
    accelerator = Accelerator(cpu=True, mixed_precision="fp16")
    accelerator.scaler, accelerator.native_amp = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE), True
    return accelerator


def test_accelerate_grad_scaler_path_with_a_cpu_scaler_equals_by_hand():
    """accelerator.backward scales the loss, AcceleratedOptimizer.step calls scaler.step(RWPSGD) (which hands over
    the loss scale: RWPSGD divides by it in the fused step) and scaler.update()."""
    model, ref = models()
    ds = dataset(3, seed=7)
    accelerator = cpu_scaler_accelerator()
    model, opt, dl = accelerator.prepare(model, rwpsgd(model, alpha=0.3), loader(ds))
    assert opt.scaler is accelerator.scaler and hasattr(model, "_original_forward")  # fp16 autocast wrapper
    window_loop(accelerator, model, opt, dl)
    assert accelerator.scaler.get_scale() == INIT_SCALE and opt.optimizer.steps == 3

    def autocast_forward(x):
        with torch.autocast("cpu", dtype=torch.float16):
            return ref(x)

    hand = ByHand(ref, 0.3)
    for x, y in plain_batches(ds):
        hand.window_step(x, y, forward=autocast_forward, scaler=torch.amp.GradScaler("cpu", init_scale=INIT_SCALE))
    assert_same(model, ref)


def test_accelerate_grad_scaler_path_unscale_gradients_then_our_clip():
    """fp16 with clipping: accelerator.unscale_gradients() (scaler.unscale_ on the RWPSGD inside), then
    opt.optimizer.clip_grad_norm_: the same bits as the plain loop (RWPSGD + GradScaler, no Accelerate), which
    tests/test_optim_amp.py checks against the same clip without GradScaler."""
    model, ref = models()
    ds = dataset(3, seed=13)
    accelerator = cpu_scaler_accelerator()
    model, opt, dl = accelerator.prepare(model, rwpsgd(model), loader(ds))
    window_loop(accelerator, model, opt, dl,
                before_step=lambda: (accelerator.unscale_gradients(), opt.optimizer.clip_grad_norm_(0.1)))

    ref_opt, scaler = rwpsgd(ref), torch.amp.GradScaler("cpu", init_scale=INIT_SCALE)

    def backward(batch):
        with torch.autocast("cpu", dtype=torch.float16):
            out = ref(batch[0])
        scaler.scale(F.cross_entropy(out.float(), batch[1])).backward()

    for x, y in plain_batches(ds):
        clean, perturbed = halves(x, y)
        ref_opt.zero_grad()
        backward(clean)
        with ref_opt.perturbed(), freeze_bn_stats(ref):
            backward(perturbed)
        scaler.unscale_(ref_opt)
        assert ref_opt.clip_grad_norm_(0.1) > 0.1
        scaler.step(ref_opt)
        scaler.update()
    assert_same(model, ref)


def test_accelerate_grad_scaler_path_overflow_restores_and_skips():
    """An inf in the perturbed gradient: RWPSGD restores the weights and updates nothing, GradScaler backs off.
    Accelerate's step_was_skipped stays False: RWPSGD takes found_inf itself (the fused-optimizer contract), so
    GradScaler calls its step() either way and Accelerate sees a step."""
    model, _ = models()
    accelerator = cpu_scaler_accelerator()
    model, opt, dl = accelerator.prepare(model, rwpsgd(model), loader(dataset(1, seed=8)))
    x, y = next(iter(dl))
    clean, perturbed = halves(x, y)
    start = weights(model)
    opt.zero_grad()
    accelerator.backward(loss_of(model, clean))
    hook = inf_from_backward(next(model.parameters()))
    with opt.optimizer.perturbed(), freeze_bn_stats(model):
        accelerator.backward(loss_of(model, perturbed))
    hook.remove()
    opt.step()
    assert accelerator.scaler.get_scale() == INIT_SCALE / 2
    assert not opt.step_was_skipped  # Accelerate's flag does not see the skip (see the docstring)
    assert all(torch.equal(p.detach(), w) for p, w in zip(model.parameters(), start))
    assert all(b.abs().sum() == 0 for b in (opt.state[p]["momentum_buffer"] for p in model.parameters()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Accelerate's fp16 (GradScaler) path needs a CUDA device: "
                    "on the CPU Accelerate makes neither autocast nor a GradScaler for fp16")
def test_fp16_with_grad_scaler_on_cuda_equals_by_hand(monkeypatch):
    """The real thing on a GPU: Accelerator(mixed_precision="fp16") makes a CUDA GradScaler and fp16 autocast.
    Not asserted bit for bit: cuDNN may choose other convolution algorithms for the two models."""
    monkeypatch.setattr(sys.modules[__name__], "BACKEND", "auto")
    model, ref = models()
    ds = dataset(3, seed=9)
    accelerator = Accelerator(mixed_precision="fp16")
    model, opt, dl = accelerator.prepare(model, rwpsgd(model), loader(ds))
    assert opt.scaler is not None and next(model.parameters()).is_cuda
    window_loop(accelerator, model, opt, dl)
    assert opt.optimizer.steps == 3 and accelerator.scaler.get_scale() == 2.0**16
    ref = ref.cuda()

    def autocast_forward(x):
        with torch.autocast("cuda", dtype=torch.float16):
            return ref(x)

    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**16)
    hand = ByHand(ref)
    for x, y in plain_batches(ds):
        hand.window_step(x.cuda(), y.cuda(), forward=autocast_forward, scaler=scaler)
    assert_same(model.cpu(), ref.cpu(), exact=False, atol=1e-5, rtol=1e-4)


# --- 5. gradient clipping -------------------------------------------------------------------------------------

def test_accelerator_clip_grad_norm_in_the_window_is_refused_and_restores():
    model, _ = models()
    accelerator = Accelerator(cpu=True)
    model, opt, dl = accelerator.prepare(model, rwpsgd(model), loader(dataset(2, seed=10)))
    batches = iter(dl)
    clean, perturbed = halves(*next(batches))
    opt.zero_grad()
    accelerator.backward(loss_of(model, clean))
    start = weights(model)
    with opt.optimizer.perturbed(), freeze_bn_stats(model):
        accelerator.backward(loss_of(model, perturbed))
    accelerator.clip_grad_norm_(model.parameters(), 0.1)
    with pytest.raises(RuntimeError, match=r"step\(\): the gradient of param group 0, parameter 0 .*was changed after "
                                           r"the perturbed pass.*opt.clip_grad_norm_"):
        opt.step()
    assert opt.optimizer.steps == 0 and not opt.optimizer.is_perturbed
    assert all(torch.equal(p.detach(), w) for p, w in zip(model.parameters(), start))
    # training goes on, clipped the right way
    window_loop(accelerator, model, opt, [next(batches)], before_step=lambda: opt.optimizer.clip_grad_norm_(0.1))
    assert opt.optimizer.steps == 1


def test_optimizer_clip_grad_norm_clips_the_true_mix():
    """opt.optimizer.clip_grad_norm_ against torch's clip_grad_norm_ of the mix formed by hand. Not bit for bit:
    RWPSGD forms the norm from alpha * p.grad (p.grad = mix / alpha) and clips the stored pieces, the by-hand side
    forms the mix first; the two differ by float32 rounding."""
    max_norm = 0.1
    model, ref = models()
    ds = dataset(3, seed=11)
    accelerator = Accelerator(cpu=True)
    model, opt, dl = accelerator.prepare(model, rwpsgd(model, alpha=0.3), loader(ds))
    norms = []
    window_loop(accelerator, model, opt, dl, before_step=lambda: norms.append(opt.optimizer.clip_grad_norm_(max_norm)))

    params, alpha, buffers, hand_norms = list(ref.parameters()), 0.3, [], []
    for t, (x, y) in enumerate(plain_batches(ds)):
        clean, perturbed = halves(x, y)
        for p in params:
            p.grad = None
        loss_of(ref, clean).backward()
        g_c = [p.grad for p in params]
        for p in params:
            p.grad = None
        backups = [torch.empty_like(p) for p in params]
        rwp_kernels.perturb_(params, gamma=GAMMA, seed=SEED, step=t, backups=backups, backend=BACKEND)
        with freeze_bn_stats(ref):
            loss_of(ref, perturbed).backward()
        for p, c in zip(params, g_c):
            p.grad = (1 - alpha) * c + alpha * p.grad
        hand_norms.append(torch.nn.utils.clip_grad_norm_(params, max_norm))
        if not buffers:
            buffers.extend(torch.zeros_like(p) for p in params)
        rwp_kernels.sgd_step_(params, [p.grad for p in params], buffers, lr=LR, momentum=MOMENTUM,
                              weight_decay=WEIGHT_DECAY, backups=backups, is_first_step=t == 0, backend=BACKEND)
    assert all(n > max_norm for n in hand_norms), "the test must clip"
    torch.testing.assert_close(torch.stack(norms), torch.stack(hand_norms), rtol=1e-5, atol=0)
    assert_same(model, ref, exact=False, atol=1e-6, rtol=1e-5)


# --- 6. save_state / load_state -------------------------------------------------------------------------------

def dropout_cnn():
    """small_cnn with dropout on the logits: the run then depends on torch's RNG, which save_state keeps."""
    return nn.Sequential(small_cnn(), nn.Dropout(0.25))


def accelerate_run(ds, model, *, steps_per_epoch, epochs, seed=None):
    accelerator = Accelerator(cpu=True)
    opt = RWPSGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, gamma=GAMMA, alpha=0.3,
                 seed=seed, backend=BACKEND)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=steps_per_epoch, gamma=0.5)
    model, opt, dl, sched = accelerator.prepare(model, opt, loader(ds, shuffle=True), sched)
    return accelerator, model, opt, dl, sched


def train_epochs(accelerator, model, opt, dl, sched, epochs):
    for _ in range(epochs):
        window_loop(accelerator, model, opt, dl, after_step=sched.step)


def test_save_state_load_state_resumes_bit_for_bit(tmp_path):
    """N steps, save_state, a new Accelerator with a fresh model and optimizer (other weights, another noise
    seed, another RNG state), load_state, N more steps: the same bits as 2N steps without stopping (weights,
    BatchNorm statistics, momentum, noise seed and step counter, LR schedule, shuffling and dropout RNG)."""
    ds = dataset(3, seed=12)
    torch.manual_seed(0)
    straight = accelerate_run(ds, dropout_cnn(), steps_per_epoch=3, epochs=2)
    train_epochs(*straight, epochs=2)
    reset_accelerate()

    torch.manual_seed(0)
    first = accelerate_run(ds, dropout_cnn(), steps_per_epoch=3, epochs=1)
    train_epochs(*first, epochs=1)
    first[0].save_state(str(tmp_path / "ckpt"))
    saved_seed, saved_lr = first[2].optimizer.seed, first[2].param_groups[0]["lr"]
    reset_accelerate()

    torch.manual_seed(99)
    second = accelerate_run(ds, dropout_cnn(), steps_per_epoch=3, epochs=1)
    assert second[2].optimizer.seed != saved_seed
    second[0].load_state(str(tmp_path / "ckpt"))
    opt = second[2].optimizer
    assert opt.seed == saved_seed and opt.steps == 3 and opt.param_groups[0]["lr"] == saved_lr
    train_epochs(*second, epochs=1)
    assert opt.steps == 6 and straight[2].optimizer.steps == 6
    assert_same(second[1], straight[1])
    for p, q in zip(second[1].parameters(), straight[1].parameters()):
        assert torch.equal(second[2].state[p]["momentum_buffer"], straight[2].state[q]["momentum_buffer"])


# --- the examples of docs/integrations.md ---------------------------------------------------------------------

DOC_EXAMPLES = ["accelerate-loop", "accelerate-closure", "accelerate-accumulation", "accelerate-checkpoint",
                "accelerate-refused"]


def run_script(path, cwd):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "RANK", "WORLD_SIZE", "LOCAL_"))}
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run([sys.executable, str(path)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{path.name} failed:\n{done.stdout}\n{done.stderr}"
    lines = done.stdout.splitlines()
    assert lines and lines[-1].endswith("done"), done.stdout
    return lines


@pytest.mark.slow
@pytest.mark.parametrize("name", DOC_EXAMPLES)
def test_doc_example_runs(name, tmp_path):
    """Each example of docs/integrations.md, "Hugging Face Accelerate", as a user would copy it, in a fresh
    process. The checkpoint example runs twice: it saves the first time and resumes the second."""
    script = tmp_path / f"{name.replace('-', '_')}.py"
    script.write_text(example(name))
    lines = run_script(script, tmp_path)
    if name == "accelerate-checkpoint":
        assert lines == ["saved at step 4, done"]
        assert run_script(script, tmp_path) == ["resumed at step 4", "saved at step 8, done"]
    if name == "accelerate-refused":
        assert sum(line.startswith("refused: ") for line in lines) == 2


def test_accumulation_config_leaves_an_unprepared_optimizer_alone():
    """The refusal is for step(closure) through the AcceleratedOptimizer: an RWP optimizer that Accelerate
    did not prepare, in the same process, trains with step(closure)."""
    Accelerator(cpu=True, gradient_accumulation_steps=2)
    model, _ = models()
    opt = rwpsgd(model)
    batch = plain_batches(dataset(1, seed=5))[0]

    def closure():
        opt.zero_grad()
        loss = loss_of(model, batch)
        loss.backward()
        return loss

    opt.step(closure)
    assert opt.steps == 1
