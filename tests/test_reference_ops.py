"""perturb_, restore_ and sgd_step_ of the reference backend against independent facts:
filter norms computed here in float64, the noise stream, and torch.optim.SGD itself (bounds from
rwp_kernels.conformance, docs/spec.md section 6). The op contracts every backend shares (missing gradients,
the found_inf skip, the gradient mix) are in the conformance suite, tests/test_conformance.py."""
import itertools
import math

import pytest
import torch

import rwp_kernels as R
from rwp_kernels import conformance as C
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
    bound = C.REFERENCE_PERTURB_EPS32 * torch.finfo(torch.float32).eps * (rowwise(clean, rows).abs() + want.abs())
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
        torch.testing.assert_close(sigma.double(), want, rtol=C.REFERENCE_SIGMA_RTOL, atol=0)
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
        torch.testing.assert_close(s.double(), want, rtol=C.REFERENCE_SIGMA_RTOL, atol=0)
        assert_perturbation(c, p, want, noise_like(c, i, 2, 9))
    assert sigmas[1].shape == (6,), "a 1-D parameter's Fisher rows are single elements"


def test_param_indices_select_the_stream():
    torch.manual_seed(3)
    a = torch.randn(4, 9)
    b = a.clone()
    R.perturb_([a], gamma=0.1, seed=4, step=2, param_indices=[5], **REF)
    R.perturb_([torch.zeros(1), b], gamma=0.1, seed=4, step=2, param_indices=[0, 5], **REF)
    assert torch.equal(a, b)


@pytest.mark.parametrize("chunk_blocks", [16, 1 << 16], ids=["groups-split-by-chunk", "one-group"])
def test_parameters_batched_into_one_pass_get_their_own_streams(monkeypatch, chunk_blocks):
    """The reference draws several parameters' normals in one pass: each still gets the noise of its own
    parameter index from offset 0 (sizes that end inside a Philox block, one longer than a chunk),
    and a regenerating restore_ subtracts the same."""
    from rwp_kernels import reference

    monkeypatch.setattr(reference, "_CHUNK_BLOCKS", chunk_blocks)
    torch.manual_seed(5)
    shapes = [(3, 5), (7,), (2, 3, 3, 3), (90,), (1,), (4, 4)]
    clean = [torch.randn(s) for s in shapes]
    params = clone_all(clean)
    indices = [3, 0, 1, 7, 2, 8]
    sigmas = R.perturb_(params, gamma=0.1, seed=6, step=4, param_indices=indices, **REF)
    for w, p, sigma, index in zip(clean, params, sigmas, indices):
        assert_perturbation(w, p, expected_sigma(w, 0.1), noise_like(w, index, 6, 4))
    R.restore_(params, sigmas=sigmas, seed=6, step=4, param_indices=indices, **REF)
    for w, p in zip(clean, params):
        torch.testing.assert_close(p, w, atol=1e-6, rtol=0)


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
    for i, (p, c, s) in enumerate(zip(params, clean, sigmas)):
        rows = s.numel()
        delta = (s.double()[:, None] * rowwise(noise_like(c, i, 8, 2, stream=1), rows)).reshape(c.shape)
        err = (p.double() - c.double()).abs()
        assert (err <= C.regenerated_bound("eps", c, None, delta)).all(), f"params[{i}]"


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
