"""PyTorch Lightning drives RWPSGD: automatic optimization (Lightning's closure through step(closure)), manual
optimization (the perturbed() window in training_step, with opt.clip_grad_norm_), the refused configurations
(accumulate_grad_batches > 1, gradient_clip_val, '16-mixed' automatic), bf16-mixed and a 16-mixed GradScaler
path, checkpoint/resume through the Trainer, DDP on 2 CPU processes, and the runnable examples of
docs/integrations.md. Each training run is compared with the same steps done by hand with the public ops
(rwp_kernels.perturb_ / sgd_step_), bit for bit where the arithmetic is the same.

What Lightning does with the optimizer (lightning 2.6):

- automatic optimization: ``optimizer.step(closure)`` with ``closure = functools.partial(Precision._wrap_closure,
  module, optimizer, Closure)``; each closure call runs training_step, zero_grad, backward, then the
  on_before_optimizer_step hooks and the Trainer's gradient clipping. RWPSGD calls it twice (clean, then
  perturbed with BatchNorm statistics frozen); the zero_grad of the second call sets the clean gradient
  aside (so the by-hand step is ``zeroed_between=True``).
- manual optimization: ``self.optimizers()`` is a LightningOptimizer (a copy of the optimizer's attributes
  in a subclass of its class); its step() ends in ``optimizer.step(closure)`` with a closure that does
  nothing: RWPSGD runs it once and applies the pending perturbation.
"""
import contextlib
import copy
import os

import pytest

L = pytest.importorskip("lightning")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import rwp_kernels  # noqa: E402
from _doc_examples import run_example  # noqa: E402
from _optim_common import BACKEND_PARAMS, CPU_BACKENDS, one_torch_thread  # noqa: E402, F401
from rwp_kernels.models import small_cnn  # noqa: E402
from rwp_kernels.optim import RWPSGD, freeze_bn_stats  # noqa: E402

LR, MOMENTUM, GAMMA, SEED = 0.05, 0.9, 0.05, 5
BATCH = 8
BACKEND = CPU_BACKENDS[-1]  # the C++ CPU kernels where built, else the reference

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*does not have many workers.*",  # Lightning's hint about DataLoader(num_workers=...)
    "ignore:.*smaller than the logging interval.*",
    "ignore:.*callbacks used to create the checkpoint need to be provided.*",
    "ignore:.*manual optimization and every_n_train_steps.*",  # Lightning 2.6: the state after the step is saved
    "ignore:.*treespec, LeafSpec.*",  # lightning 2.6 with torch 2.14
)


# --- data, model, Trainer -------------------------------------------------------------------------------

def dataset(n_batches: int, batch: int = BATCH, seed: int = 0) -> TensorDataset:
    """Digits-sized images (1 x 8 x 8, 10 classes), n_batches * batch of them."""
    g = torch.Generator().manual_seed(seed)
    n = n_batches * batch
    return TensorDataset(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g))


def loader(data: TensorDataset, batch: int = BATCH) -> DataLoader:
    return DataLoader(data, batch_size=batch, shuffle=False)


def batches_of(data: TensorDataset, batch: int = BATCH) -> list:
    return [(x, y) for x, y in loader(data, batch)]


def net(seed: int = 0):
    torch.manual_seed(seed)
    return small_cnn()


class RWPModule(L.LightningModule):
    """small_cnn with RWPSGD. Automatic optimization: training_step returns the loss of the whole batch (both
    passes use it). Manual: the README's loop, clean pass on the first half of the batch, perturbed pass on
    the second half, optionally opt.clip_grad_norm_ before opt.step().

    After each training batch it records whether the real optimizer is still perturbed, its step counter and
    the weights."""

    def __init__(self, *, alpha=0.5, manual=False, clip=None, unscale=False, backend=BACKEND, seed=SEED, net_seed=0,
                 record_dir=None):
        super().__init__()
        self.net = net(net_seed)
        self.alpha, self.clip, self.unscale, self.backend, self.seed = alpha, clip, unscale, backend, seed
        self.automatic_optimization = not manual
        self.record_dir = record_dir
        self.records, self.seen = [], []

    def forward(self, x):
        return self.net(x)

    def configure_optimizers(self):
        return RWPSGD(self.parameters(), lr=LR, momentum=MOMENTUM, gamma=GAMMA, alpha=self.alpha, seed=self.seed,
                      backend=self.backend)

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.automatic_optimization:
            return F.cross_entropy(self(x), y)
        h = len(x) // 2
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(F.cross_entropy(self(x[:h]), y[:h]))
        with opt.perturbed(), freeze_bn_stats(self):
            self.manual_backward(F.cross_entropy(self(x[h:]), y[h:]))
        if self.unscale:
            self.trainer.precision_plugin.scaler.unscale_(opt.optimizer)
        if self.clip is not None:
            opt.clip_grad_norm_(self.clip)
        opt.step()

    def on_train_batch_end(self, outputs, batch, batch_idx):
        opt = self.trainer.optimizers[0]
        if self.record_dir is not None:
            self.seen.append(batch)
        self.records.append((opt.is_perturbed, opt.steps, [p.detach().clone() for p in self.net.parameters()]))

    def on_train_end(self):
        if self.record_dir is not None:  # DDP: each rank leaves its final weights and records
            torch.save({"state": self.net.state_dict(), "perturbed": [r[0] for r in self.records],
                        "steps": [r[1] for r in self.records], "batches": self.seen},
                       os.path.join(self.record_dir, f"rank{self.global_rank}.pt"))


def trainer(max_steps, **kw):
    kw = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False,
          "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0, **kw}
    return L.Trainer(max_steps=max_steps, **kw)


def fit(module, data, max_steps, **kw):
    t = trainer(max_steps, **kw)
    t.fit(module, loader(data))
    return t


# --- the same steps by hand with the public ops -------------------------------------------------------------

def loss_backward(model, batch, *, autocast=None, backward_in_autocast=False, scale=None):
    """Forward (under ``autocast`` = a torch.autocast dtype on CPU, as Lightning's MixedPrecision opens it)
    and backward of the mean cross-entropy (times ``scale``, GradScaler's loss scale)."""
    x, y = batch
    ctx = torch.autocast("cpu", dtype=autocast, cache_enabled=False) if autocast else contextlib.nullcontext()
    with ctx:
        loss = F.cross_entropy(model(x), y)
        if backward_in_autocast:
            (loss if scale is None else loss * scale).backward()
    if not backward_in_autocast:
        (loss if scale is None else loss * scale).backward()


class ByHand:
    """RWPSGD's steps from rwp_kernels.perturb_ / sgd_step_ on a model of its own."""

    def __init__(self, model, *, alpha=0.5, backend=BACKEND, seed=SEED):
        self.model, self.alpha, self.backend, self.seed = model, alpha, backend, seed
        self.buffers, self.steps = [], 0
        model.train()

    def step(self, clean_batch, perturbed_batch, *, zeroed_between, clip=None, loss_scale=None, **fwd):
        """One update. ``zeroed_between``: the perturbed backward starts from zero gradients and the scaled
        clean gradient enters sgd_step_ as clean_grads (what a zero_grad() inside the window leads to).
        ``clip``: the true mix (1 - alpha) g_c + alpha g_p computed explicitly and clipped to this norm as
        torch.nn.utils.clip_grad_norm_ does. ``loss_scale``: GradScaler's scale S (the losses are multiplied
        by it; the step divides by it, as RWPSGD does under GradScaler)."""
        params, alpha = list(self.model.parameters()), self.alpha
        for p in params:
            p.grad = None
        loss_backward(self.model, clean_batch, scale=loss_scale, **fwd)
        backups = [torch.empty_like(p) for p in params]
        clean = None
        if clip is None:
            rwp_kernels.perturb_(params, gamma=GAMMA, seed=self.seed, step=self.steps, backups=backups,
                                 grads=[p.grad for p in params], grad_scale=(1 - alpha) / alpha, backend=self.backend)
            if zeroed_between:
                clean = [p.grad for p in params]
                for p in params:
                    p.grad = None
        else:
            g_c = [p.grad for p in params]
            rwp_kernels.perturb_(params, gamma=GAMMA, seed=self.seed, step=self.steps, backups=backups,
                                 backend=self.backend)
            for p in params:
                p.grad = None
        with freeze_bn_stats(self.model):
            loss_backward(self.model, perturbed_batch, scale=loss_scale, **fwd)
        grad_scale, found_inf = alpha, None
        if clip is not None:
            unscale = 1.0 if loss_scale is None else 1.0 / loss_scale
            mix = [((1 - alpha) * c + alpha * p.grad) * unscale for c, p in zip(g_c, params)]
            total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(m) for m in mix]))
            coef = torch.clamp(clip / (total + 1e-6), max=1.0)
            grads, grad_scale = [m * coef for m in mix], 1.0
        else:
            grads = [p.grad for p in params]
        if loss_scale is not None and clip is None:
            assert all(torch.isfinite(g).all() for g in grads), "the by-hand step overflowed: pick another scale"
            # What RWPSGD does under GradScaler: alpha / S as a 0-d float32 tensor, the reciprocal in float64.
            grad_scale = torch.tensor(loss_scale, dtype=torch.float32).double().reciprocal().float() * alpha
            found_inf = torch.zeros((), dtype=torch.float32)
        first = not self.buffers
        if first:
            self.buffers.extend(torch.zeros_like(p) for p in params)
        rwp_kernels.sgd_step_(params, grads, self.buffers, lr=LR, momentum=MOMENTUM, grad_scale=grad_scale,
                              found_inf=found_inf, backups=backups, is_first_step=first, backend=self.backend,
                              clean_grads=clean, clean_scale=grad_scale if clean is not None else 0.0)
        self.steps += 1
        return [p.detach().clone() for p in params]


def assert_same_weights(got, want, *, exact=True, atol=0.0, rtol=0.0, what="weights"):
    for i, (x, y) in enumerate(zip(got, want)):
        if exact:
            assert torch.equal(x, y), f"{what}, parameter {i}: max diff {(x - y).abs().max().item():.3g}"
        else:
            torch.testing.assert_close(x, y, atol=atol, rtol=rtol, msg=lambda m: f"{what}, parameter {i}: {m}")


def assert_same_buffers(a, b):
    """BatchNorm running_mean, running_var and num_batches_tracked, bit for bit."""
    for (name, x), (_, y) in zip(a.named_buffers(), b.named_buffers()):
        assert torch.equal(x, y), f"{name} differs"


def assert_steps_match(module, hand_weights):
    """After each of Lightning's steps: the optimizer is not perturbed, it counted the step, and the weights
    are the by-hand ones (clean weights: never left perturbed)."""
    assert len(module.records) == len(hand_weights)
    for t, ((perturbed, steps, weights), want) in enumerate(zip(module.records, hand_weights)):
        assert not perturbed and steps == t + 1, f"after step {t}: perturbed={perturbed}, steps={steps}"
        assert_same_weights(weights, want, what=f"after step {t}")


def halves(batch):
    x, y = batch
    h = len(x) // 2
    return (x[:h], y[:h]), (x[h:], y[h:])


# --- 1. automatic optimization ----------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("alpha", [0.5, 0.3])
def test_automatic_optimization_equals_the_steps_by_hand(alpha, backend):
    """Lightning's closure twice on the same batch (clean, then perturbed): the by-hand steps with the
    perturbed backward starting from zeroed gradients, BatchNorm statistics from the clean pass only."""
    data = dataset(3)
    module = RWPModule(alpha=alpha, backend=backend)
    hand = ByHand(copy.deepcopy(module.net), alpha=alpha, backend=backend)
    fit(module, data, max_steps=3)
    want = [hand.step(b, b, zeroed_between=True) for b in batches_of(data)]
    assert_steps_match(module, want)
    assert_same_buffers(module.net, hand.model)
    assert module.net[1].num_batches_tracked.item() == 3  # one per step: the perturbed pass leaves BN alone
    assert all(m.track_running_stats for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d))


# --- 2. manual optimization -------------------------------------------------------------------------------

def test_manual_optimization_equals_the_steps_by_hand():
    data = dataset(3)
    module = RWPModule(manual=True)
    hand = ByHand(copy.deepcopy(module.net))
    t = fit(module, data, max_steps=3)
    want = [hand.step(*halves(b), zeroed_between=False) for b in batches_of(data)]
    assert t.global_step == 3
    assert_steps_match(module, want)
    assert_same_buffers(module.net, hand.model)


def test_manual_optimization_with_clip_grad_norm_clips_the_true_mix():
    """opt.clip_grad_norm_(0.5) before opt.step(): the by-hand step forms (1 - alpha) g_c + alpha g_p
    explicitly, clips it and steps with it. Tolerance: RWPSGD never forms that sum; it holds
    (1 - alpha)/alpha g_c + g_p in p.grad, takes alpha times its norm, scales it and multiplies by alpha in
    the step, which rounds differently from the direct sum (a few float32 ulps per step)."""
    data = dataset(3)
    module = RWPModule(manual=True, clip=0.5, alpha=0.3)
    hand = ByHand(copy.deepcopy(module.net), alpha=0.3)
    fit(module, data, max_steps=3)
    unclipped = ByHand(copy.deepcopy(module.net), alpha=0.3)
    for b in batches_of(data):
        want = hand.step(*halves(b), zeroed_between=False, clip=0.5)
        free = unclipped.step(*halves(b), zeroed_between=False)
    for (perturbed, _, _) in module.records:
        assert not perturbed
    assert_same_weights(module.records[-1][2], want, exact=False, atol=1e-6, rtol=1e-5)
    # The clipping did something: without it the weights are elsewhere.
    assert max((x - y).abs().max().item() for x, y in zip(module.records[-1][2], free)) > 1e-3


# --- 3. and 4. what is refused in automatic optimization -----------------------------------------------

@pytest.mark.parametrize("batches,trainer_kwargs,message", [
    (2, dict(accumulate_grad_batches=2), r"(?s)p.grad held gradients of earlier backward passes.*accumulate"),
    (1, dict(gradient_clip_val=1.0), r"Lightning's gradient_clip_val=1.0 clips the gradient inside the closure"),
], ids=["accumulate_grad_batches", "gradient_clip_val"])
def test_trainer_settings_that_are_not_rwp_are_refused_in_automatic_optimization(batches, trainer_kwargs, message):
    data = dataset(batches)
    module = RWPModule()
    clean = [p.detach().clone() for p in module.net.parameters()]
    with pytest.raises(RuntimeError, match=message):
        fit(module, data, max_steps=1, **trainer_kwargs)
    opt = module.trainer.optimizers[0]
    assert not opt.is_perturbed and opt.steps == 0
    assert_same_weights([p.detach() for p in module.net.parameters()], clean)


class LightningClipModule(RWPModule):
    """Manual optimization clipping with Lightning's self.clip_gradients (torch's clip on p.grad)."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(F.cross_entropy(self(x), y))
        with opt.perturbed(), freeze_bn_stats(self):
            self.manual_backward(F.cross_entropy(self(x), y))
        self.clip_gradients(opt, gradient_clip_val=0.1, gradient_clip_algorithm="norm")
        opt.step()


def test_lightning_clip_gradients_in_manual_optimization_is_refused():
    """self.clip_gradients clips p.grad, which holds the mix divided by alpha there: step() refuses and
    restores the weights (Lightning itself refuses Trainer(gradient_clip_val) in manual optimization)."""
    module = LightningClipModule(manual=True)
    clean = [p.detach().clone() for p in module.net.parameters()]
    with pytest.raises(RuntimeError, match=r"(?s)was changed after the perturbed pass.*opt.clip_grad_norm_"):
        fit(module, dataset(1), max_steps=1)
    opt = module.trainer.optimizers[0]
    assert not opt.is_perturbed and opt.steps == 0
    assert_same_weights([p.detach() for p in module.net.parameters()], clean)


class HookClipModule(RWPModule):
    """Automatic optimization clipping in a configure_gradient_clipping override (no gradient_clip_val)."""

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        torch.nn.utils.clip_grad_norm_(self.parameters(), 1e-3)


def test_configure_gradient_clipping_override_in_automatic_optimization_is_refused():
    """Lightning calls configure_gradient_clipping after each closure call, so each pass's gradient would be
    clipped on its own: refused like gradient_clip_val."""
    module = HookClipModule()
    with pytest.raises(RuntimeError, match=r"step\(closure\): HookClipModule.configure_gradient_clipping \(an "
                                           r"override"):
        fit(module, dataset(1), max_steps=1)


# --- 5. mixed precision ---------------------------------------------------------------------------------

@pytest.mark.parametrize("manual", [False, True], ids=["automatic", "manual"])
def test_bf16_mixed_equals_the_steps_by_hand_under_autocast(manual):
    """precision='bf16-mixed' runs training_step under torch.autocast('cpu', bfloat16, cache_enabled=False),
    no GradScaler: the by-hand steps under the same autocast are bit for bit the same (manual: the backward
    runs inside training_step, so inside autocast; automatic: outside it)."""
    data = dataset(2)
    module = RWPModule(manual=manual)
    hand = ByHand(copy.deepcopy(module.net))
    fit(module, data, max_steps=2, precision="bf16-mixed")
    if manual:
        want = [hand.step(*halves(b), zeroed_between=False, autocast=torch.bfloat16, backward_in_autocast=True)
                for b in batches_of(data)]
    else:
        want = [hand.step(b, b, zeroed_between=True, autocast=torch.bfloat16) for b in batches_of(data)]
    assert_steps_match(module, want)
    assert_same_buffers(module.net, hand.model)


def test_16_mixed_on_cpu_is_replaced_by_bf16_mixed():
    """Lightning 2.6 does not run fp16 AMP on CPU: Trainer(accelerator='cpu', precision='16-mixed') warns and
    uses 'bf16-mixed' (which RWP supports in both modes, above). The GradScaler path of '16-mixed' is tested
    below with an explicit MixedPrecision('16-mixed', 'cpu') plugin, and is Lightning's GPU path."""
    with pytest.warns(UserWarning, match="AMP with fp16 is not supported on CPU. Using `precision='bf16-mixed'`"):
        t = trainer(1, precision="16-mixed")
    assert t.precision == "bf16-mixed" and t.precision_plugin.scaler is None


def fp16_plugin():
    from lightning.pytorch.plugins.precision import MixedPrecision

    return MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=2.0**10))


def test_16_mixed_automatic_optimization_is_refused():
    """With a GradScaler, Lightning's MixedPrecision.optimizer_step runs the closure itself (the clean pass)
    and then scaler.step(optimizer), i.e. step() without a closure and without a perturbation: refused."""
    data = dataset(1)
    module = RWPModule()
    clean = [p.detach().clone() for p in module.net.parameters()]
    with pytest.raises(RuntimeError, match=r"(?s)step\(\): no perturbation is pending.*'16-mixed'"):
        fit(module, data, max_steps=1, plugins=[fp16_plugin()])
    opt = module.trainer.optimizers[0]
    assert not opt.is_perturbed and opt.steps == 0
    assert_same_weights([p.detach() for p in module.net.parameters()], clean)


def test_16_mixed_manual_optimization_equals_the_steps_by_hand_with_a_grad_scaler():
    """Manual optimization with the GradScaler: manual_backward scales the loss, opt.step() goes through
    scaler.step(optimizer), which hands RWPSGD the scale and the overflow flag. By hand: the losses times
    S under fp16 autocast, the step with grad_scale alpha / S and found_inf 0 (no overflow at S = 2**10),
    bit for bit."""
    data = dataset(2)
    module = RWPModule(manual=True)
    hand = ByHand(copy.deepcopy(module.net))
    plugin = fp16_plugin()
    fit(module, data, max_steps=2, plugins=[plugin])
    want = [hand.step(*halves(b), zeroed_between=False, autocast=torch.float16, backward_in_autocast=True,
                      loss_scale=2.0**10) for b in batches_of(data)]
    assert plugin.scaler.get_scale() == 2.0**10  # no overflow, no growth within 2 steps
    assert_steps_match(module, want)


def test_16_mixed_manual_optimization_unscale_then_clip_grad_norm_():
    """Under the GradScaler, clipping needs the unscaled mix: scaler.unscale_(opt.optimizer) (the real
    optimizer: GradScaler keeps its per-optimizer state by identity, and Lightning's scaler.step gets the
    real one), then opt.clip_grad_norm_. By hand: the true mix computed explicitly, divided by S, clipped.
    Tolerance as in the fp32 clipping test (RWPSGD scales the stored pieces instead of forming the sum)."""
    data = dataset(2)
    module = RWPModule(manual=True, clip=0.5, alpha=0.3, unscale=True)
    hand = ByHand(copy.deepcopy(module.net), alpha=0.3)
    plugin = fp16_plugin()
    fit(module, data, max_steps=2, plugins=[plugin])
    for b in batches_of(data):
        want = hand.step(*halves(b), zeroed_between=False, clip=0.5, autocast=torch.float16,
                         backward_in_autocast=True, loss_scale=2.0**10)
    assert [r[:2] for r in module.records] == [(False, 1), (False, 2)]
    assert_same_weights(module.records[-1][2], want, exact=False, atol=1e-6, rtol=1e-5)


# --- 6. checkpoint and resume ---------------------------------------------------------------------------

@pytest.mark.parametrize("manual", [False, True], ids=["automatic", "manual"])
def test_resume_from_a_trainer_checkpoint_is_bit_exact(tmp_path, manual):
    """fit 2 steps with ModelCheckpoint(every_n_train_steps=2), then a new Trainer fits on to 4 from that
    checkpoint (ckpt_path; the new module's weights and its optimizer's seed differ: the checkpoint restores
    the weights, the momentum buffers and RWP's seed and step counter): weights and BN statistics equal an
    uninterrupted 4-step run, bit for bit. Lightning loads the checkpoint with torch.load's default
    weights_only=True, which the RWP state dict passes (tensors, numbers, strings).

    Not trainer.save_checkpoint() after a fit that stopped at max_steps on an epoch's last batch, nor an
    end-of-epoch ModelCheckpoint: resuming from those, Lightning 2.6 replays the epoch's first batch once
    more (with torch.optim.SGD too), so no optimizer could match the uninterrupted run."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    data = dataset(2)
    straight = RWPModule(manual=manual)
    fit(straight, data, max_steps=4)

    first = RWPModule(manual=manual)
    checkpoints = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1)
    fit(first, data, max_steps=2, enable_checkpointing=True, callbacks=[checkpoints])
    (path,) = tmp_path.glob("*.ckpt")
    saved = torch.load(path, weights_only=True)["optimizer_states"][0]
    assert saved["rwp"] == {"seed": SEED, "steps": 2} and len(saved["state"]) == len(list(first.parameters()))

    resumed = RWPModule(manual=manual, seed=SEED + 1, net_seed=1)
    t = trainer(4)
    t.fit(resumed, loader(data), ckpt_path=path)
    assert t.global_step == 4 and t.optimizers[0].steps == 4 and t.optimizers[0].seed == SEED
    assert [r[1] for r in resumed.records] == [3, 4] and not any(r[0] for r in resumed.records)
    assert_same_weights([p.detach() for p in resumed.net.parameters()],
                        [p.detach() for p in straight.net.parameters()])
    assert_same_buffers(resumed.net, straight.net)


# --- 7. DDP on 2 CPU processes ----------------------------------------------------------------------------

@pytest.mark.slow
def test_ddp_spawn_on_two_cpu_processes(tmp_path):
    """strategy='ddp_spawn', 2 CPU processes (gloo), automatic optimization, 2 steps. Lightning replaces the
    training DataLoader's sampler by a DistributedSampler that shuffles (always, for training; seeded, so the
    same split on every rank): each rank records the batches it got. Each pass's gradient is all-reduced
    (DDP divides by the world size, then sums). By hand on one process: each pass's gradient is
    the mean of the two shards' gradients at the same weights (BatchNorm normalizes per shard, as on each
    rank; the running statistics are rank 0's, which DDP broadcasts before each forward). Both ranks end with
    the same weights, and they equal the by-hand ones bit for bit: g0 / 2 + g1 / 2 is the same float32
    arithmetic as DDP's division then gloo's sum of two (for two ranks the order of the sum does not
    matter)."""
    world, steps = 2, 2
    data = dataset(world * steps)
    module = RWPModule(record_dir=str(tmp_path))
    t = trainer(steps, strategy="ddp_spawn", devices=world)
    t.fit(module, loader(data))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]
    for r in ranks:
        assert r["perturbed"] == [False] * steps and r["steps"] == list(range(1, steps + 1))
    w0 = [v for k, v in ranks[0]["state"].items() if "running" not in k and "num_batches" not in k]
    w1 = [v for k, v in ranks[1]["state"].items() if "running" not in k and "num_batches" not in k]
    assert_same_weights(w0, w1, what="rank 0 vs rank 1")

    shards = [r["batches"] for r in ranks]
    seen = torch.cat([x for shard in shards for x, _ in shard]).flatten(1)
    assert len(seen) == len(data) and torch.equal(seen.sort(0)[0], data.tensors[0].flatten(1).sort(0)[0])
    model = copy.deepcopy(RWPModule().net)
    params = list(model.parameters())
    buffers, model_steps = [], 0
    for t_ in range(steps):
        def mean_grad(frozen_all):
            grads = []
            for r in range(world):
                for p in params:
                    p.grad = None
                if frozen_all or r > 0:
                    with freeze_bn_stats(model):
                        loss_backward(model, shards[r][t_])
                else:
                    loss_backward(model, shards[r][t_])
                grads.append([p.grad.clone() for p in params])
            return [g0 / world + g1 / world for g0, g1 in zip(*grads)]

        g_c = mean_grad(False)
        for p, g in zip(params, g_c):
            p.grad = g
        backups = [torch.empty_like(p) for p in params]
        rwp_kernels.perturb_(params, gamma=GAMMA, seed=SEED, step=model_steps, backups=backups,
                             grads=[p.grad for p in params], grad_scale=1.0, backend=BACKEND)
        g_p = mean_grad(True)
        first = not buffers
        if first:
            buffers.extend(torch.zeros_like(p) for p in params)
        rwp_kernels.sgd_step_(params, g_p, buffers, lr=LR, momentum=MOMENTUM, grad_scale=0.5, backups=backups,
                              is_first_step=first, backend=BACKEND, clean_grads=g_c, clean_scale=0.5)
        model_steps += 1
    assert_same_weights(w0, [p.detach() for p in params], what="DDP vs by hand")
    rank0_buffers = {k: v for k, v in ranks[0]["state"].items() if "running" in k or "num_batches" in k}
    for name, buf in model.named_buffers():
        assert torch.equal(rank0_buffers[name], buf), f"{name} differs from rank 0's"


# --- the examples of docs/integrations.md -----------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("name", ["lightning-automatic", "lightning-manual"])
def test_docs_example_runs(name, tmp_path):
    done = run_example(name, tmp_path, timeout=300)
    assert "steps: 4" in done.stdout and "perturbed: False" in done.stdout, done.stdout
