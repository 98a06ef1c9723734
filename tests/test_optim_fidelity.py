"""Fidelity to the official algorithm.

``official_step`` is a direct PyTorch transcription of the update of the official code (nblt/RWP
train_rwp_parallel.py for the noise and the mix, nblt/mARWP train_marwp.py for m-RWP/m-ARWP: clean pass
on one batch, perturbed pass on the next with BN running statistics frozen through momentum 0, the
Fisher state F <- beta F + g_p**2, noise divided by sqrt(1 + eta * rowsum(F)), 1-D rules), with
``torch.normal(0, std)`` replaced by ``std * z`` for z drawn from ``rwp_kernels.noise`` (the official
code draws from torch's generator) and ``view`` by ``reshape`` (the same values; ``view`` fails on
channels_last weights). Its restore is the official ``sub_``.

Tolerance: the two computations differ by float rounding only (float64 vs float32 norms, exact restore vs
``sub_``, ``alpha * ((1 - alpha) / alpha * g_c + g_p)`` vs ``alpha g_p + (1 - alpha) g_c``). After each of
10 steps the weights agree to 1e-6 (absolute) with an SGD base, while the updates moved them by far more
(checked), and a wrong mix, noise or Fisher would move them apart by about lr * |g| >> 1e-4. Both runs
continue from the same weights after each comparison (the optimizer states evolve independently), so that
a ReLU decision flipped by rounding cannot hide the comparison. The wrapper's mixed gradient (left in p.grad)
is compared at every step (1e-6 + 1e-4 relative); with AdamW the weights are compared by median and
maximum (Adam amplifies rounding where a gradient is ~0).
"""
import pytest
import torch
from torch.nn.modules.batchnorm import _BatchNorm

from conftest import requires
from rwp_kernels import backends
from rwp_kernels.optim import RWP, RWPSGD, freeze_bn_stats

from _optim_common import (CPU_BACKENDS, backward, batches, model_pair, one_torch_thread,  # noqa: F401
                           official_sigma, params_of, stream_noise)

STEPS = 10
SEED = 1234


def _disable_running_stats(model):
    """The official disable_running_stats: BN momentum 0; returns what enable_running_stats needs."""
    saved = [(m, m.momentum) for m in model.modules() if isinstance(m, _BatchNorm)]
    for m, _ in saved:
        m.momentum = 0
    return saved


class Official:
    """The official RWP / m-ARWP update around a torch optimizer, one call per step."""

    def __init__(self, model, base, *, gamma, alpha, adaptive, eta, beta):
        self.model, self.base = model, base
        self.gamma, self.alpha, self.adaptive, self.eta, self.beta = gamma, alpha, adaptive, eta, beta
        self.fisher = []
        self.step_count = 0

    def step(self, clean_batch, perturbed_batch):
        params = list(self.model.parameters())
        g0 = None
        if self.alpha < 1:
            self.base.zero_grad()
            backward(self.model, clean_batch)
            g0 = [p.grad.clone() for p in params]
        with torch.no_grad():
            noise = []
            for ii, mp in enumerate(params):
                sh = mp.shape
                sh_mul = int(torch.tensor(sh[1:]).prod()) if len(sh) > 1 else 1
                z = stream_noise(mp, ii, self.step_count, SEED)
                if len(mp.shape) > 1:
                    temp = mp.reshape(sh[0], -1).norm(dim=1, keepdim=True).repeat(1, sh_mul).view(mp.shape)
                    temp = self.gamma * temp * z
                else:
                    temp = self.gamma * (mp.view(-1).norm().item() + 1e-16) * z
                if self.fisher:
                    fisher = self.fisher[ii].reshape(sh[0], -1).sum(dim=1, keepdim=True).repeat(1, sh_mul).view(sh)
                    temp /= torch.sqrt(1 + self.eta * fisher)
                noise.append(temp)
                mp.data.add_(noise[-1])
        saved = _disable_running_stats(self.model)
        self.base.zero_grad()
        backward(self.model, perturbed_batch)
        for m, momentum in saved:
            m.momentum = momentum
        if self.adaptive:
            if not self.fisher:
                self.fisher = [0 for _ in params]
            for ii, mp in enumerate(params):
                self.fisher[ii] = self.fisher[ii] * self.beta + mp.grad.clone() ** 2
        with torch.no_grad():
            for mp, n in zip(params, noise):
                mp.data.sub_(n)
        if g0 is not None:
            for p, g in zip(params, g0):
                p.grad = self.alpha * p.grad + (1 - self.alpha) * g
        self.base.step()
        self.step_count += 1


def _assert_same_weights(name, ours, theirs, adamw_lr=None):
    diff = torch.cat([(a - b).abs().flatten() for a, b in zip(ours.parameters(), theirs.parameters())])
    if adamw_lr is None:
        assert diff.max() < 1e-6, f"{name}: max |ours - official| = {diff.max():.3g}"
    else:
        # Adam divides by sqrt(v) + eps: where the mixed gradient is ~0, its rounding differences become
        # differences of the update direction (the mixed gradients themselves agree, checked separately).
        assert diff.median() < 1e-7 and diff.max() < 0.1 * adamw_lr, f"{name}: {diff.median():.3g} {diff.max():.3g}"


def _ours_step(model, opt, clean_batch, perturbed_batch, alpha):
    opt.zero_grad()
    if alpha < 1:
        backward(model, clean_batch)
    with opt.perturbed(), freeze_bn_stats(model):
        backward(model, perturbed_batch)
    opt.step()


SGD = dict(lr=0.05, momentum=0.9, weight_decay=1e-3)
ADAMW = dict(lr=3e-3, weight_decay=1e-2)

CASES = [
    # (name, optimizer, base, base kwargs, alpha, adaptive, restore)
    ("RWPSGD rwp", "rwpsgd", torch.optim.SGD, dict(SGD, nesterov=True), 0.5, False, "exact"),
    ("RWPSGD rwp alpha=0.3 regenerate", "rwpsgd", torch.optim.SGD, SGD, 0.3, False, "regenerate"),
    ("RWPSGD arwp", "rwpsgd", torch.optim.SGD, SGD, 0.5, True, "exact"),
    ("RWPSGD arwp alpha=1", "rwpsgd", torch.optim.SGD, SGD, 1.0, True, "exact"),
    ("RWP(SGD) rwp", "wrapper", torch.optim.SGD, SGD, 0.5, False, "exact"),
    ("RWP(SGD) arwp", "wrapper", torch.optim.SGD, dict(SGD, dampening=0.1), 0.7, True, "exact"),
    ("RWP(AdamW) rwp", "wrapper", torch.optim.AdamW, ADAMW, 0.5, False, "exact"),
    ("RWP(AdamW) arwp", "wrapper", torch.optim.AdamW, ADAMW, 0.5, True, "regenerate"),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name,kind,base,kwargs,alpha,adaptive,restore", CASES, ids=[c[0] for c in CASES])
def test_matches_official_update(name, kind, base, kwargs, alpha, adaptive, restore, backend, steps=STEPS):
    gamma, eta, beta = 0.05, 0.1, 0.99
    ours, theirs = model_pair(seed=3)
    start = params_of(ours)
    rwp = dict(gamma=gamma, alpha=alpha, adaptive=adaptive, eta=eta, beta=beta, seed=SEED, restore=restore,
               backend=backend)
    if kind == "rwpsgd":
        opt = RWPSGD(ours.parameters(), **kwargs, **rwp)
    else:
        opt = RWP(ours.parameters(), base, **kwargs, **rwp)
    official = Official(theirs, base(theirs.parameters(), **kwargs), gamma=gamma, alpha=alpha, adaptive=adaptive,
                        eta=eta, beta=beta)
    data = batches(2 * steps, seed=7)
    for t in range(steps):
        clean, perturbed = data[2 * t], data[2 * t + 1]
        _ours_step(ours, opt, clean, perturbed, alpha)
        official.step(clean, perturbed)
        if kind == "wrapper":
            # The wrapper leaves the mixed gradient in p.grad for the base optimizer: the official one.
            for (pn, a), b in zip(ours.named_parameters(), theirs.parameters()):
                torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-4, msg=lambda m: f"step {t} {pn}: {m}")
        _assert_same_weights(name, ours, theirs, adamw_lr=kwargs["lr"] if base is torch.optim.AdamW else None)
        # Continue both from the same weights: a ReLU or max-pool decision flipped by a rounding difference
        # would otherwise change a whole gradient entry and hide what is being compared. The optimizer
        # states (momentum, Adam moments, Fisher) are not synchronized: they evolve independently.
        with torch.no_grad():
            for a, b in zip(ours.parameters(), theirs.parameters()):
                b.copy_(a)

    moved = max((p - s).abs().max().item() for p, s in zip(ours.parameters(), start))
    assert moved > 1e-3, f"the weights hardly moved ({moved}); the comparison would be meaningless"
    for (bn, a), (_, b) in zip(ours.named_buffers(), theirs.named_buffers()):
        if a.is_floating_point():
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=lambda m: f"{bn}: {m}")
    if adaptive:
        # The Fisher state is that of the official code too (bit-for-bit inputs, float rounding only).
        for p, f in zip(ours.parameters(), official.fisher):
            torch.testing.assert_close(opt.state[p]["fisher"], f, rtol=1e-3, atol=1e-9)


TRITON_CASES = [CASES[2], CASES[5]]  # RWPSGD ARWP (Fisher, kept clean gradient, backups); RWP(SGD) ARWP


@pytest.mark.slow
@pytest.mark.parametrize("name,kind,base,kwargs,alpha,adaptive,restore", TRITON_CASES, ids=[c[0] for c in TRITON_CASES])
def test_triton_backend_matches_official_update(name, kind, base, kwargs, alpha, adaptive, restore):
    """The optimizers on the Triton kernels (Triton's interpreter on CPU tensors; slow: 2 steps only)."""
    reason = backends.unavailable_reason("triton", "cpu")
    requires(reason is None, f"the Triton backend cannot run on CPU tensors here: {reason}", "triton-interpret")
    test_matches_official_update(name, kind, base, kwargs, alpha, adaptive, restore, "triton", steps=2)


def test_channels_last_model_matches_official_update():
    """channels_last weights: the noise follows memory order (as the ops define it); the update is the
    official one, and weights and momentum stay channels_last."""
    ours, theirs = model_pair(seed=8)
    ours.to(memory_format=torch.channels_last)
    theirs.to(memory_format=torch.channels_last)
    conv = [p for p in ours.parameters() if p.dim() == 4 and p.shape[1] > 1]
    assert conv and all(not p.is_contiguous() for p in conv)
    opt = RWPSGD(ours.parameters(), **SGD, gamma=0.05, alpha=0.5, seed=SEED, backend="reference")
    official = Official(theirs, torch.optim.SGD(theirs.parameters(), **SGD), gamma=0.05, alpha=0.5,
                        adaptive=False, eta=0.0, beta=0.0)
    data = [(x.to(memory_format=torch.channels_last), y) for x, y in batches(6, seed=2)]
    for t in range(3):
        _ours_step(ours, opt, data[2 * t], data[2 * t + 1], 0.5)
        official.step(data[2 * t], data[2 * t + 1])
        _assert_same_weights("channels_last", ours, theirs)
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in conv)
    assert all(opt.state[p]["momentum_buffer"].is_contiguous(memory_format=torch.channels_last) for p in conv)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_perturbation_is_the_official_noise(backend):
    """One perturb(): the weights become w + gamma * ||row|| * z (1-D: gamma * (||w|| + 1e-16) * z)."""
    model, _ = model_pair(seed=5)
    clean = params_of(model)
    opt = RWPSGD(model.parameters(), lr=0.1, gamma=0.02, seed=SEED, backend=backend)
    opt.perturb()
    for i, (p, w) in enumerate(zip(model.parameters(), clean)):
        z = stream_noise(p, i, 0, SEED)
        torch.testing.assert_close(p.detach(), w + official_sigma(w, 0.02) * z, atol=1e-6, rtol=1e-5)
        assert not torch.equal(p.detach(), w)
    opt.restore()
    for p, w in zip(model.parameters(), clean):
        assert torch.equal(p.detach(), w), "restore='exact' must give the clean weights back bit for bit"
