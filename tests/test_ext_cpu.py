"""The C++ extension's CPU kernels (backend="cpu") against the pure-PyTorch reference.

Tolerances (float32 math in both, the reference's normals in float64):
- Philox integers: bit for bit; normals: |z - z_ref| <= 1e-5 * (1 + |z_ref|).
- sigmas: relative 1e-6 (both accumulate the norms in float64 and round once; the sums differ in order).
- perturbed weights: |w - w_ref| <= ulp(w_ref) + 1e-5 * 7 * sigma_row (from the normals' tolerance).
- exact restore, gradient mix, Fisher update, sgd_step_: bit for bit (the same float32 operations).
- regenerated restore: |w - w_original| <= 2 ulp of max(|w_original|, |w_perturbed|) of the dtype.
"""
import pytest
import torch

from conftest import requires
from rwp_kernels import backends, noise, perturb_, philox4x32_10, restore_, sgd_step_
from rwp_kernels.layout import flat_view

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SEED, STEP, STREAM = 20240611, 7, 3


@pytest.fixture(scope="module", autouse=True)
def cpu_backend():
    reason = backends.unavailable_reason("cpu", "cpu")
    requires(reason is None, f"the C++ extension is unavailable: {reason}", "cpp-ext")


def ulp(t: torch.Tensor) -> torch.Tensor:
    """Spacing of t's dtype at |t| (as float32)."""
    a = t.float().abs()
    eps = torch.finfo(t.dtype).eps
    tiny = torch.finfo(t.dtype).tiny
    return torch.clamp(a, min=tiny) * eps


def make_params(dtype, *, seed=0, device="cpu"):
    """Odd shapes: rows of 1, 27 (also channels_last), 4608 (channels_last), > 64k; 0-D, 1-D; zero-norm rows."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    conv = rand(16, 3, 3, 3)
    conv[3].zero_()  # a zero-norm row
    params = [
        conv,
        rand(16, 3, 3, 3).contiguous(memory_format=torch.channels_last),
        rand(4, 512, 3, 3).contiguous(memory_format=torch.channels_last),
        rand(2, 70001),
        rand(5, 1),
        rand(()),
        rand(37),
        torch.zeros(9, dtype=dtype),  # zero-norm 1-D parameter
        rand(10, 64),
    ]
    return [p.to(device) for p in params]


def clone_all(tensors):
    return [t.clone(memory_format=torch.preserve_format) for t in tensors]


def like(params, *, dtype=None, seed=1):
    """Random tensors with the shapes, layouts and devices of params (and their dtype unless given)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=g).to(p.device, dtype or p.dtype).contiguous(memory_format=_fmt(p))
            for p in params]


def _fmt(p):
    return torch.channels_last if p.dim() == 4 and not p.is_contiguous() else torch.contiguous_format


def assert_bitwise(a_list, b_list):
    """Same values bit for bit (NaN matches NaN), dtype and layout."""
    assert len(a_list) == len(b_list)
    for i, (a, b) in enumerate(zip(a_list, b_list)):
        assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride(), i
        same = torch.equal(a, b) or torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
        assert same, f"tensor {i} differs: max |diff| {(a.float() - b.float()).abs().nan_to_num().max()}"


# ---- the stream ----------------------------------------------------------------------------------------

def test_philox_random123_known_answers():
    counter = torch.tensor([[0, 0, 0, 0], [0xFFFFFFFF] * 4, [0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344]])
    key = torch.tensor([[0, 0], [0xFFFFFFFF] * 2, [0xA4093822, 0x299F31D0]])
    expected = torch.tensor([
        [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8],
        [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD],
        [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1],
    ])
    assert torch.equal(philox4x32_10(counter, key, backend="cpu"), expected)


def test_philox_matches_reference_bitwise_with_broadcasting():
    g = torch.Generator().manual_seed(0)
    counter = torch.randint(0, 2**32, (3, 50, 4), generator=g, dtype=torch.int64)
    key = torch.randint(0, 2**32, (50, 2), generator=g, dtype=torch.int64)
    ours = philox4x32_10(counter, key, backend="cpu")
    assert ours.shape == (3, 50, 4)
    assert torch.equal(ours, philox4x32_10(counter, key, backend="reference"))


@pytest.mark.parametrize("offset", [0, 1, 2, 3, 5, 4 * 2**32 - 6])
@pytest.mark.parametrize("numel", [1, 3, 31, 64, 100, 70001])
def test_noise_matches_reference(offset, numel):
    args = dict(seed=SEED, param_index=11, step=2**32 + STEP, stream=STREAM, offset=offset)
    z = noise(numel, **args, backend="cpu")
    ref = noise(numel, **args, backend="reference")
    assert z.dtype == torch.float32 and z.shape == (numel,)
    assert ((z - ref).abs() <= 1e-5 * (1 + ref.abs())).all(), (z - ref).abs().max()


def test_noise_slices_are_bitwise_the_same_stream():
    """Any window of the stream gives the same bits: the vector and per-block (GPU) code paths agree."""
    full = noise(5000, seed=SEED, param_index=2, step=STEP, backend="cpu")
    for offset in range(0, 70):
        part = noise(1000 + offset % 7, seed=SEED, param_index=2, step=STEP, offset=offset, backend="cpu")
        assert torch.equal(part, full[offset : offset + part.numel()]), offset


def test_noise_statistics():
    z = noise(1 << 20, seed=1, backend="cpu")
    assert abs(z.mean().item()) < 5e-3 and abs(z.std().item() - 1) < 5e-3
    assert torch.isfinite(z).all()


# ---- perturb_ ------------------------------------------------------------------------------------------

def run_perturb(backend, params, *, fisher=None, eta=0.0, gamma=0.01, with_backups=True, with_grads=True):
    params = clone_all(params)
    backups = [torch.empty_like(p) for p in params] if with_backups else None
    grads = like(params, seed=5) if with_grads else None
    if grads is not None:
        grads[1] = None  # a parameter without a gradient
    fisher = clone_all(fisher) if fisher is not None else None
    sigmas = perturb_(params, gamma=gamma, seed=SEED, step=STEP, stream=STREAM, param_indices=[3 * i + 1 for i in range(len(params))],
                      backups=backups, grads=grads, grad_scale=0.3, fisher=fisher, eta=eta, backend=backend)
    return params, sigmas, backups, grads


def check_perturbed(orig, ours, ref):
    params, sigmas, backups, grads = ours
    rparams, rsigmas, rbackups, rgrads = ref
    for i, (s, rs) in enumerate(zip(sigmas, rsigmas)):
        assert s.dtype == torch.float32 and s.shape == rs.shape, i
        torch.testing.assert_close(s, rs, rtol=1e-6, atol=0, msg=f"sigma of param {i}")
    for i, (p, rp, rs) in enumerate(zip(params, rparams, rsigmas)):
        assert p.stride() == rp.stride()
        diff = (flat_view(p).float() - flat_view(rp).float()).abs()  # memory order: rows are runs
        bound = ulp(flat_view(rp)) + 7e-5 * rs.repeat_interleave(p.numel() // rs.numel())
        assert (diff <= bound).all(), f"param {i}: max excess {(diff - bound).max()}"
    if backups is not None:
        assert_bitwise(backups, orig)
    if grads is not None:
        assert_bitwise([g for g in grads if g is not None], [g for g in rgrads if g is not None])


@pytest.mark.parametrize("dtype", DTYPES)
def test_perturb_matches_reference(dtype):
    params = make_params(dtype)
    check_perturbed(params, run_perturb("cpu", params), run_perturb("reference", params))


@pytest.mark.parametrize("dtype", DTYPES)
def test_perturb_arwp_rows(dtype):
    params = make_params(dtype)
    fisher = [f.float().abs() for f in like(params, seed=9)]
    ours = run_perturb("cpu", params, fisher=fisher, eta=0.1)
    ref = run_perturb("reference", params, fisher=fisher, eta=0.1)
    check_perturbed(params, ours, ref)
    assert ours[1][6].numel() == params[6].numel()  # 1-D parameter: one sigma per element


def test_perturb_gamma_zero_leaves_weights_untouched():
    params = make_params(torch.float32)
    out, sigmas, backups, _ = run_perturb("cpu", params, gamma=0.0)
    assert_bitwise(out, params)
    assert all((s == 0).all() for s in sigmas)


def test_perturb_without_backups_or_grads():
    params = make_params(torch.float16)
    ours = run_perturb("cpu", params, with_backups=False, with_grads=False)
    ref = run_perturb("reference", params, with_backups=False, with_grads=False)
    check_perturbed(params, ours, ref)


def test_perturb_gradient_scale_as_device_tensor():
    params = make_params(torch.float32)[:3]
    grads = like(params)
    expected = [g * 0.25 for g in grads]
    perturb_(params, gamma=0.01, seed=1, step=1, grads=grads, grad_scale=torch.tensor(0.25), backend="cpu")
    assert_bitwise(grads, expected)


# ---- restore_ ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_restore_exact_is_bitwise(dtype):
    orig = make_params(dtype)
    params, _, backups, _ = run_perturb("cpu", orig)
    restore_(params, backups=backups, backend="cpu")
    assert_bitwise(params, orig)


def check_regenerated_restore(backend, orig, adaptive):
    """perturb_ then restore_ from the sigmas: back within 2 ulp of max(|original|, |perturbed|)."""
    fisher = [f.float().abs() for f in like(orig, seed=9)] if adaptive else None
    params, sigmas, _, _ = run_perturb(backend, orig, fisher=fisher, eta=0.1, with_backups=False, with_grads=False)
    perturbed = clone_all(params)
    restore_(params, sigmas=sigmas, seed=SEED, step=STEP, stream=STREAM,
             param_indices=[3 * i + 1 for i in range(len(params))], backend=backend)
    for i, (p, o, q) in enumerate(zip(params, orig, perturbed)):
        assert not torch.equal(q, o) or i == 7, f"param {i} was not perturbed"  # params[7] has norm 0
        bound = 2 * torch.maximum(ulp(o), ulp(q))
        assert ((p.float() - o.float()).abs() <= bound).all(), f"param {i}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("adaptive", [False, True])
def test_restore_regenerated_within_bound(dtype, adaptive):
    check_regenerated_restore("cpu", make_params(dtype), adaptive)


@pytest.mark.parametrize("dtype", DTYPES)
def test_restore_gradient_mix_and_fisher_bitwise(dtype):
    params = make_params(dtype)

    def run(backend):
        ps = clone_all(params)
        backups = clone_all(params)
        grads = like(params, seed=3)
        clean = like(params, seed=4)
        fisher = [f.float().abs() for f in like(params, seed=5)]
        restore_(ps, backups=backups, grads=grads, grad_scale=1 / 3, fisher=fisher, beta=0.9, fisher_scale=0.7,
                 clean_grads=clean, clean_scale=0.45, backend=backend)
        return ps, grads, fisher

    for ours, ref in zip(run("cpu"), run("reference")):
        assert_bitwise(ours, ref)


def test_float16_and_bfloat16_rounding_matches_torch():
    """Values near the dtype limits (subnormals, overflow to inf, NaN) round as torch does."""
    special = torch.tensor([0.0, -0.0, 1e-8, -3e-6, 6e-5, 65504.0, 65519.0, 65520.0, 1e5, float("inf"), float("nan"),
                            3.0e38, 1.17e-38, 9.2e-41] + torch.randn(100).tolist())
    for dtype in (torch.float16, torch.bfloat16):
        grads_c = [special.clone()]
        params = [torch.ones(special.numel(), dtype=dtype)]
        for scale in (1 / 3, 1.0009765625, 3.0):
            g_ours = [special.to(dtype)]
            g_ref = [special.to(dtype)]
            restore_(clone_all(params), backups=clone_all(params), grads=g_ours, grad_scale=scale, backend="cpu")
            restore_(clone_all(params), backups=clone_all(params), grads=g_ref, grad_scale=scale, backend="reference")
            assert_bitwise(g_ours, g_ref)
        del grads_c


# ---- sgd_step_ ---------------------------------------------------------------------------------------------

SGD_CASES = [
    dict(momentum=0.0),
    dict(momentum=0.9, weight_decay=5e-4),
    dict(momentum=0.9, dampening=0.1, weight_decay=1e-3, maximize=True),
    dict(momentum=0.9, nesterov=True, weight_decay=1e-3),
]


@pytest.mark.parametrize("case", SGD_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_sgd_step_matches_torch_optim_sgd_bitwise(case):
    params = make_params(torch.float32)
    ref_params = [torch.nn.Parameter(p.clone(memory_format=torch.preserve_format)) for p in params]
    ours = clone_all(params)
    bufs = [torch.empty_like(p) for p in ours]
    opt = torch.optim.SGD(ref_params, lr=0.05, **case)
    for step in range(3):
        grads = like(params, seed=10 + step)
        for p, g in zip(ref_params, grads):
            p.grad = g.clone(memory_format=torch.preserve_format)
        opt.step()
        sgd_step_(ours, grads, bufs, lr=0.05, is_first_step=step == 0, backend="cpu", **case)
        assert_bitwise(ours, [p.detach() for p in ref_params])
        if case["momentum"]:
            assert_bitwise(bufs, [opt.state[p]["momentum_buffer"] for p in ref_params])


@pytest.mark.parametrize("dtype", DTYPES)
def test_sgd_step_fused_restore_mix_fisher_matches_reference(dtype):
    params = make_params(dtype)

    def run(backend, found_inf):
        ps = clone_all(params)
        backups = like(params, seed=2)
        grads = like(params, seed=3)
        clean = like(params, seed=4)
        bufs = like(params, seed=6)
        fisher = [f.float().abs() for f in like(params, seed=5)]
        sgd_step_(ps, grads, bufs, lr=0.1, momentum=0.9, dampening=0.0, weight_decay=1e-3, nesterov=True,
                  grad_scale=torch.tensor(0.5), found_inf=found_inf, backups=backups, fisher=fisher, beta=0.99,
                  fisher_scale=2.0, clean_grads=clean, clean_scale=0.5, backend=backend)
        return ps, bufs, fisher, grads, backups

    for found_inf in (None, torch.tensor(0.0), torch.tensor(1.0)):
        ours, ref = run("cpu", found_inf), run("reference", found_inf)
        for a, b in zip(ours, ref):
            assert_bitwise(a, b)
    skipped = run("cpu", torch.tensor(1.0))
    assert_bitwise(skipped[0], skipped[4])  # found_inf: restored, nothing else
    assert_bitwise(skipped[1], like(params, seed=6))


# ---- threads, dispatch, errors ---------------------------------------------------------------------------

def test_results_do_not_depend_on_the_thread_count():
    params = make_params(torch.float32) + [torch.randn(300, 300)]
    fisher = [f.float().abs() for f in like(params, seed=9)]
    threads = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            ps, sigmas, backups, grads = run_perturb("cpu", params, fisher=fisher, eta=0.1)
            bufs = like(params, seed=6)
            sgd_step_(ps, [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, ps)], bufs, lr=0.1,
                      momentum=0.9, backups=None, backend="cpu")
            outs.append((ps, sigmas, bufs, noise(100_000, seed=3, backend="cpu")))
    finally:
        torch.set_num_threads(threads)
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            assert_bitwise(a if isinstance(a, list) else [a], b if isinstance(b, list) else [b])


def test_auto_picks_the_cpu_extension():
    assert backends.resolve("auto", torch.device("cpu")).name == "cpu"
    assert "cpu" in backends.available_backends("cpu")


def test_float64_goes_to_the_reference_in_the_same_call():
    params = [torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 5)]
    ref = clone_all(params)
    s = perturb_(params, gamma=0.01, seed=1, step=1, backend="cpu")
    r = perturb_(ref, gamma=0.01, seed=1, step=1, backend="reference")
    assert torch.equal(params[0], ref[0])
    torch.testing.assert_close(s[1], r[1], rtol=1e-6, atol=0)


def test_empty_tensor_is_rejected_with_its_name():
    with pytest.raises(ValueError, match=r"params\[1\]"):
        perturb_([torch.randn(3), torch.empty(0, 4)], gamma=0.01, seed=1, step=1, backend="cpu")
