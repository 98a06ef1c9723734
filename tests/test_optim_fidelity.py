"""Fidelity to the official algorithm.

The official update is ``rwp_kernels.official.OfficialRWP``, a direct PyTorch transcription of the official
code (nblt/RWP train_rwp_parallel.py for the noise and the mix, nblt/mARWP train_marwp.py for m-RWP/m-ARWP:
clean pass on one batch, perturbed pass on the next with BN running statistics frozen through momentum 0,
the Fisher state F <- beta F + g_p**2, noise divided by sqrt(1 + eta * rowsum(F)), 1-D rules, the mix
through flat gradient vectors), the same loop the benchmarks time. Here its noise is ``std * z`` with z drawn
from ``rwp_kernels.noise`` instead of ``torch.normal(0, std)`` (the official code draws from torch's
generator). Its restore is the official ``sub_``.

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

from conftest import require_backend
from rwp_kernels.official import OfficialRWP
from rwp_kernels.optim import RWP, RWPSGD, freeze_bn_stats

from _optim_common import (BACKEND_PARAMS, backward, batches, model_pair, one_torch_thread,  # noqa: F401
                           StepNoise, official_sigma, params_of, stream_noise)

STEPS = 10
SEED = 1234


def _official(model, base, *, gamma, alpha, adaptive, eta, beta):
    """The official update (rwp_kernels.official) with the noise stream of the fused ops."""
    return OfficialRWP(model, base, gamma=gamma, alpha=alpha, adaptive=adaptive, eta=eta, beta=beta,
                       noise=StepNoise(model.parameters(), SEED))


def _official_step(official, clean_batch, perturbed_batch):
    official.step(lambda: backward(official.model, clean_batch), lambda: backward(official.model, perturbed_batch))


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


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
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
    official = _official(theirs, base(theirs.parameters(), **kwargs), gamma=gamma, alpha=alpha, adaptive=adaptive,
                         eta=eta, beta=beta)
    data = batches(2 * steps, seed=7)
    for t in range(steps):
        clean, perturbed = data[2 * t], data[2 * t + 1]
        _ours_step(ours, opt, clean, perturbed, alpha)
        _official_step(official, clean, perturbed)
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
    require_backend("triton", "cpu")
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
    official = _official(theirs, torch.optim.SGD(theirs.parameters(), **SGD), gamma=0.05, alpha=0.5,
                         adaptive=False, eta=0.0, beta=0.0)
    data = [(x.to(memory_format=torch.channels_last), y) for x, y in batches(6, seed=2)]
    for t in range(3):
        _ours_step(ours, opt, data[2 * t], data[2 * t + 1], 0.5)
        _official_step(official, data[2 * t], data[2 * t + 1])
        _assert_same_weights("channels_last", ours, theirs)
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in conv)
    assert all(opt.state[p]["momentum_buffer"].is_contiguous(memory_format=torch.channels_last) for p in conv)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
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
