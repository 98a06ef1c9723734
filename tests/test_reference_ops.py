"""perturb_, restore_ and sgd_step_ of the reference backend against independent facts:
filter norms computed here in float64, the noise stream, and torch.optim.SGD itself."""
import itertools
import math

import pytest
import torch

import rwp_kernels as R
from rwp_kernels.models import resnet18, small_cnn

REF = dict(backend="reference")


def clone_all(tensors):
    return [t.detach().clone() for t in tensors]


def expected_sigma(w: torch.Tensor, gamma: float, fisher=None, eta=0.0) -> torch.Tensor:
    """sigma per row, as the official code computes it (float64)."""
    w = w.double()
    if w.dim() >= 2:
        sigma = gamma * w.reshape(w.shape[0], -1).norm(dim=1)
    else:
        sigma = gamma * (w.norm() + 1e-16).reshape(1)
    if fisher is not None:
        rows = fisher.double().reshape(w.shape[0], -1).sum(1) if w.dim() >= 2 else fisher.double().reshape(-1)
        sigma = sigma / torch.sqrt(1 + eta * rows)
    return sigma


def noise_like(p, index, seed, step, stream=0):
    """The stream of parameter ``index`` laid out over ``p`` in memory order."""
    z = R.noise(p.numel(), seed=seed, param_index=index, step=step, stream=stream, **REF)
    out = torch.empty_like(p, dtype=torch.float32)
    out.as_strided((p.numel(),), (1,)).copy_(z)
    return out


def rowwise(t: torch.Tensor, rows: int) -> torch.Tensor:
    return t.double().reshape(rows, -1)


def assert_perturbation(clean, perturbed, sigma, z):
    """perturbed - clean == sigma * z up to the float32 roundings of sigma, sigma * z and w + sigma * z."""
    rows = sigma.numel()
    delta = rowwise(perturbed, rows) - rowwise(clean, rows)
    want = sigma.double()[:, None] * rowwise(z, rows)
    bound = 2 * torch.finfo(torch.float32).eps * (rowwise(clean, rows).abs() + want.abs())
    assert ((delta - want).abs() <= bound).all()
    return delta


@pytest.fixture(scope="module")
def resnet_params():
    torch.manual_seed(0)
    return [p.detach() for p in resnet18().parameters()]


@pytest.mark.slow
def test_perturb_std_matches_filter_norms_on_resnet18(resnet_params):
    gamma = 0.01
    params = clone_all(resnet_params)
    sigmas = R.perturb_(params, gamma=gamma, seed=11, step=3, **REF)
    pooled = []
    for i, (clean, p, sigma) in enumerate(zip(resnet_params, params, sigmas)):
        want = expected_sigma(clean, gamma)
        assert sigma.dtype == torch.float32 and sigma.shape == want.shape
        torch.testing.assert_close(sigma.double(), want, rtol=1e-6, atol=0)
        # exactly the stream, scaled per row
        delta = assert_perturbation(clean, p, want, noise_like(clean, i, 11, 3))
        # and statistically: each long row's empirical std is gamma * ||row||
        if delta.shape[1] >= 500:
            ratio = delta.std(dim=1) / want
            assert ((ratio - 1).abs() < 6 / math.sqrt(2 * delta.shape[1])).all(), f"params[{i}]"
        pooled.append((delta / want[:, None]).flatten())
    pooled = torch.cat(pooled)
    assert abs(pooled.std().item() - 1) < 0.005
    assert abs(pooled.mean().item()) < 0.005


def test_perturb_1d_rule_uses_the_whole_tensor_norm(resnet_params):
    bn = [p for p in resnet_params if p.dim() == 1]
    assert len(bn) > 10
    params = clone_all(bn)
    sigmas = R.perturb_(params, gamma=0.5, seed=1, step=0, **REF)
    for clean, p, s in zip(bn, params, sigmas):
        assert s.shape == (1,)
        assert s.item() == pytest.approx(0.5 * (clean.double().norm().item() + 1e-16), rel=1e-6)
    ratios = torch.cat([(p - c).double() / s for c, p, s in zip(bn, params, sigmas)])
    assert abs(ratios.std().item() - 1) < 0.05


def test_perturb_zero_weights_give_zero_sigma():
    w = [torch.zeros(4, 3), torch.zeros(5)]
    sigmas = R.perturb_(w, gamma=0.1, seed=0, step=0, **REF)
    assert torch.equal(sigmas[0], torch.zeros(4))
    assert sigmas[1].item() == pytest.approx(0.1 * 1e-16)
    assert torch.equal(w[0], torch.zeros(4, 3))
    assert w[1].abs().max().item() < 1e-15


def test_arwp_divides_each_row_by_its_fisher():
    torch.manual_seed(1)
    params = [torch.randn(6, 3, 3, 3), torch.randn(6), torch.randn(5, 7)]
    fisher = [torch.rand_like(p) * 10 for p in params]
    clean = clone_all(params)
    eta, gamma = 0.3, 0.05
    sigmas = R.perturb_(params, gamma=gamma, eta=eta, fisher=fisher, seed=2, step=9, **REF)
    for i, (c, p, f, s) in enumerate(zip(clean, params, fisher, sigmas)):
        want = expected_sigma(c, gamma, f, eta)
        torch.testing.assert_close(s.double(), want, rtol=1e-6, atol=0)
        assert_perturbation(c, p, want, noise_like(c, i, 2, 9))
    assert sigmas[1].shape == (6,), "a 1-D parameter's Fisher rows are single elements"


def test_perturb_backups_grads_and_per_tensor_gamma():
    torch.manual_seed(2)
    params = [torch.randn(8, 4), torch.randn(8), torch.randn(3, 2, 2)]
    clean = clone_all(params)
    grads = [torch.randn_like(p) for p in params]
    grads_before = clone_all(grads)
    backups = [torch.empty_like(p) for p in params]
    R.perturb_(params, gamma=[0.1, 0.0, 0.2], seed=3, step=1, backups=backups,
               grads=[grads[0], None, grads[2]], grad_scale=0.25, **REF)
    assert all(torch.equal(b, c) for b, c in zip(backups, clean))
    assert torch.equal(params[1], clean[1]), "gamma 0 leaves the tensor untouched"
    assert not torch.equal(params[0], clean[0]) and not torch.equal(params[2], clean[2])
    assert torch.equal(grads[0], grads_before[0] * 0.25)
    assert torch.equal(grads[1], grads_before[1]), "a None grad entry is skipped"
    assert torch.equal(grads[2], grads_before[2] * 0.25)


def test_param_indices_select_the_stream():
    torch.manual_seed(3)
    a = torch.randn(4, 9)
    b = a.clone()
    R.perturb_([a], gamma=0.1, seed=4, step=2, param_indices=[5], **REF)
    R.perturb_([torch.zeros(1), b], gamma=0.1, seed=4, step=2, param_indices=[0, 5], **REF)
    assert torch.equal(a, b)


def test_channels_last_uses_memory_order():
    torch.manual_seed(4)
    w = torch.randn(4, 3, 2, 2)
    cl = w.clone().to(memory_format=torch.channels_last)
    s = R.perturb_([cl], gamma=0.1, seed=1, step=0, **REF)[0]
    assert cl.is_contiguous(memory_format=torch.channels_last)
    z = noise_like(cl, 0, 1, 0)
    assert z.stride() == cl.stride()
    assert_perturbation(w, cl, s, z)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_restore_exact_is_bit_identical(dtype):
    torch.manual_seed(5)
    params = [p.detach().to(dtype) for p in small_cnn().parameters()]
    clean = clone_all(params)
    backups = [torch.empty_like(p) for p in params]
    R.perturb_(params, gamma=0.05, seed=6, step=7, backups=backups, **REF)
    assert any(not torch.equal(p, c) for p, c in zip(params, clean))
    R.restore_(params, backups=backups, **REF)
    assert all(torch.equal(p, c) for p, c in zip(params, clean))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_restore_regenerated_noise_is_within_rounding(dtype):
    """Bound: |restored - w| <= eps(dtype) * (|w| + |sigma z|) per element (two roundings of w +- sigma z)."""
    torch.manual_seed(6)
    params = [p.detach().to(dtype) for p in small_cnn().parameters()]
    clean = clone_all(params)
    sigmas = R.perturb_(params, gamma=0.05, seed=8, step=2, stream=1, **REF)
    R.restore_(params, sigmas=sigmas, seed=8, step=2, stream=1, **REF)
    eps = torch.finfo(dtype).eps
    for i, (p, c, s) in enumerate(zip(params, clean, sigmas)):
        rows = s.numel()
        delta = (s.double()[:, None] * rowwise(noise_like(c, i, 8, 2, stream=1), rows)).reshape(c.shape)
        err = (p.double() - c.double()).abs()
        assert (err <= eps * (c.double().abs() + delta.abs())).all(), f"params[{i}]"


def test_restore_mixes_gradients_and_updates_fisher():
    torch.manual_seed(7)
    params = [torch.randn(3, 4), torch.randn(4)]
    backups = clone_all(params)
    grads = [torch.randn_like(p) for p in params]
    clean_grads = [torch.randn_like(p) for p in params]
    fisher = [torch.rand_like(p) for p in params]
    g0, f0 = clone_all(grads), clone_all(fisher)
    R.restore_(params, backups=backups, grads=grads, grad_scale=0.7, fisher=fisher, beta=0.9,
               fisher_scale=0.5, clean_grads=clean_grads, clean_scale=0.3, **REF)
    for g, g_in, c, f, f_in in zip(grads, g0, clean_grads, fisher, f0):
        torch.testing.assert_close(f, 0.9 * f_in + (0.5 * g_in) ** 2)
        torch.testing.assert_close(g, 0.7 * g_in + 0.3 * c)


SGD_SETTINGS = [
    dict(momentum=m, dampening=d, nesterov=n, weight_decay=wd, maximize=mx)
    for m, d, n, wd, mx in itertools.product((0.0, 0.9), (0.0, 0.3), (False, True), (0.0, 5e-3), (False, True))
    if not (n and (m == 0 or d != 0))
]


@pytest.mark.parametrize("settings", SGD_SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_sgd_step_is_bit_identical_to_torch_sgd(settings):
    torch.manual_seed(8)
    model = small_cnn()
    ours = [p.detach().clone() for p in model.parameters()]
    theirs = [p.detach().clone().requires_grad_() for p in model.parameters()]
    opt = torch.optim.SGD(theirs, lr=0.05, foreach=False, **settings)
    bufs = [torch.zeros_like(p) for p in ours]
    backups = [torch.empty_like(p) for p in ours]
    for step in range(20):
        grads = [torch.randn_like(p) for p in ours]
        for p, g in zip(theirs, grads):
            p.grad = g.clone()
        opt.step()
        # perturb with gamma 0 and restore from backups inside the step: still plain SGD
        R.perturb_(ours, gamma=0.0, seed=1, step=step, backups=backups, **REF)
        R.sgd_step_(ours, [g.clone() for g in grads], bufs, lr=0.05, is_first_step=step == 0,
                    backups=backups, **settings, **REF)
        for i, (a, b) in enumerate(zip(ours, theirs)):
            assert torch.equal(a, b.detach()), f"step {step}, params[{i}]"


def test_sgd_step_restores_before_updating():
    torch.manual_seed(9)
    params = [torch.randn(6, 5), torch.randn(5)]
    clean = clone_all(params)
    backups = [torch.empty_like(p) for p in params]
    grads = [torch.randn_like(p) for p in params]
    R.perturb_(params, gamma=0.1, seed=2, step=0, backups=backups, **REF)
    R.sgd_step_(params, grads, None, lr=0.1, weight_decay=0.01, backups=backups, **REF)
    for p, c, g in zip(params, clean, grads):
        assert torch.equal(p, c.add(g.add(c, alpha=0.01), alpha=-0.1))


def test_sgd_step_found_inf_restores_only():
    torch.manual_seed(10)
    params = [torch.randn(4, 3), torch.randn(3)]
    clean = clone_all(params)
    backups = [torch.empty_like(p) for p in params]
    bufs = [torch.randn_like(p) for p in params]
    bufs_before = clone_all(bufs)
    fisher = [torch.rand_like(p) for p in params]
    fisher_before = clone_all(fisher)
    grads = [torch.full_like(p, float("inf")) for p in params]
    R.perturb_(params, gamma=0.1, seed=2, step=0, backups=backups, **REF)
    R.sgd_step_(params, grads, bufs, lr=0.1, momentum=0.9, backups=backups, fisher=fisher, beta=0.9,
                found_inf=torch.tensor(1.0), grad_scale=torch.tensor(0.5), **REF)
    assert all(torch.equal(p, c) for p, c in zip(params, clean))
    assert all(torch.equal(b, c) for b, c in zip(bufs, bufs_before))
    assert all(torch.equal(f, c) for f, c in zip(fisher, fisher_before))
    # found_inf == 0 updates as usual, with the tensor grad_scale applied
    grads = [torch.ones_like(p) for p in params]
    R.sgd_step_(params, grads, None, lr=0.1, found_inf=torch.tensor(0.0), grad_scale=torch.tensor(0.5), **REF)
    for p, c in zip(params, clean):
        torch.testing.assert_close(p, c - 0.05)


def test_sgd_step_low_precision_math_in_float32():
    torch.manual_seed(11)
    w32 = torch.randn(64, 3)
    g32 = torch.randn(64, 3) * 1e-3
    for dtype in (torch.float16, torch.bfloat16):
        w = w32.to(dtype)
        R.sgd_step_([w], [g32.to(dtype)], None, lr=0.5, weight_decay=1e-2, **REF)
        want = w32.to(dtype).float()
        want = (want - 0.5 * (g32.to(dtype).float() + 1e-2 * want)).to(dtype)
        assert torch.equal(w, want)


def test_sgd_step_fisher_and_clean_gradient_mix():
    torch.manual_seed(12)
    p = torch.randn(5, 2)
    g, c, f = torch.randn_like(p), torch.randn_like(p), torch.rand_like(p)
    p0, f0 = p.clone(), f.clone()
    R.sgd_step_([p], [g], None, lr=0.1, fisher=[f], beta=0.99, fisher_scale=2.0, grad_scale=0.5,
                clean_grads=[c], clean_scale=0.25, **REF)
    torch.testing.assert_close(f, 0.99 * f0 + (2.0 * g) ** 2)
    torch.testing.assert_close(p, p0 - 0.1 * (0.5 * g + 0.25 * c))
