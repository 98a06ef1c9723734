"""Gradient clipping between the perturbed backward and step() clips the true mix
(1 - alpha) g_c + alpha g_p: the update equals torch.optim.SGD on that mix, clipped by hand."""
import copy

import pytest
import torch

from rwp_kernels.optim import RWP, RWPSGD, freeze_bn_stats

from _optim_common import assert_models_equal, backward, batches, model_pair, one_torch_thread  # noqa: F401

SGD = dict(lr=0.1, momentum=0.9, weight_decay=1e-3)


@pytest.mark.parametrize("kind,adaptive", [("rwpsgd", False), ("rwpsgd", True), ("wrapper", False),
                                           ("wrapper", True)])
@pytest.mark.parametrize("norm_type", [2.0, float("inf")])
def test_clipping_clips_the_true_mix(kind, adaptive, norm_type):
    alpha = 0.3
    model, ref = model_pair(seed=41)
    rwp = dict(gamma=0.05, alpha=alpha, adaptive=adaptive, seed=5, backend="reference")
    opt = RWPSGD(model.parameters(), **SGD, **rwp) if kind == "rwpsgd" else RWP(model.parameters(), **SGD, **rwp)
    clean, perturbed = batches(2, seed=42)

    backward(model, clean)
    g_c = [p.grad.clone() for p in model.parameters()]
    opt.perturb()
    probe = copy.deepcopy(model)  # the perturbed weights: the perturbed gradient alone
    probe.zero_grad()
    with freeze_bn_stats(probe):
        backward(probe, perturbed)
    g_p = [p.grad.clone() for p in probe.parameters()]
    with freeze_bn_stats(model):
        backward(model, perturbed)

    mix = [(1 - alpha) * c + alpha * p for c, p in zip(g_c, g_p)]
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(m, norm_type) for m in mix]), norm_type)
    max_norm = 0.25 * total.item()  # clipping is active
    returned = opt.clip_grad_norm_(max_norm, norm_type)
    torch.testing.assert_close(returned, total, rtol=1e-5, atol=0)
    opt.step()

    unclipped = copy.deepcopy(ref)
    for target, coef in ((ref, min(1.0, max_norm / (total.item() + 1e-6))), (unclipped, 1.0)):
        sgd = torch.optim.SGD(target.parameters(), **SGD)
        for p, m in zip(target.parameters(), mix):
            p.grad = m * coef
        sgd.step()
    assert_models_equal(model, ref, exact=False, atol=2e-7, rtol=1e-6, buffers=False)
    far = max((p - q).abs().max().item() for p, q in zip(model.parameters(), unclipped.parameters()))
    assert far > 1e-3, "the clipping must matter in this test"


def test_clipping_outside_the_window_is_torch_clip():
    a, b = model_pair(seed=43)
    opt = RWPSGD(a.parameters(), lr=0.1, gamma=0.05, seed=1, backend="reference")
    batch = batches(1, seed=44)[0]
    backward(a, batch)
    backward(b, batch)
    ours = opt.clip_grad_norm_(0.1)
    theirs = torch.nn.utils.clip_grad_norm_(b.parameters(), 0.1)
    torch.testing.assert_close(ours, theirs)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=0)
