"""The Triton kernels, run for real by Triton's interpreter on CPU tensors, against the reference backend.

tests/conftest.py switches the interpreter on (TRITON_INTERPRET=1) where there is no GPU, before any kernel
is created. Tolerances (the reference computes normals and norms in float64, the kernels in float32):
Philox integers and plain copies bit for bit; normals within 1e-5 * (1 + |z|) (docs/spec.md section 3); sigmas
within a relative 1e-5; float32 results within 1e-6 relative + 1e-5 absolute (noise differences of
1e-5 * sigma * (1 + |z|) with sigma < 1 here); float16/bfloat16 results within one rounding step of the
dtype (the float32 values before the final rounding differ by a few ulps).
"""
import os
import subprocess
import sys

import pytest
import torch

import rwp_kernels as rk
from rwp_kernels import backends, models
from conftest import requires

DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Rows of 1, 27 (also channels_last), 40, 50 (several tiles of short rows), 4608 and 2053 (longer than the
# largest tile; the second 2053 starts inside a Philox block), 0-D and 1-D tensors (3000: longer than a tile).
SHAPES = ((7, 1), (5, 3, 3, 3), (4, 3, 3, 3), (33, 40), (100, 50), (3, 4608), (2, 2053), (3000,), (), (10,))
CHANNELS_LAST = 2  # index in SHAPES of the tensor stored channels_last


@pytest.fixture(autouse=True)
def triton_interpreter():
    reason = backends.unavailable_reason("triton", "cpu")
    requires(reason is None, f"Triton backend on CPU tensors: {reason}", "triton-interpret")


def _params(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i, shape in enumerate(SHAPES):
        t = torch.randn(shape, generator=gen).to(dtype)
        out.append(t.contiguous(memory_format=torch.channels_last) if i == CHANNELS_LAST else t)
    return out


def _like(params, seed, fn=torch.randn):
    gen = torch.Generator().manual_seed(seed)
    return [fn(p.shape, generator=gen).to(p.dtype).contiguous(memory_format=_format(p)) for p in params]


def _format(t):
    return torch.channels_last if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) \
        and not t.is_contiguous() else torch.contiguous_format


def _fisher(params, seed):
    return [f.float() for f in _like(params, seed, torch.rand)]


def _clone(tensors):
    return None if tensors is None else [t.clone() for t in tensors]


def assert_close(actual, expected, what=""):
    if actual.dtype == torch.float32:
        torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-5, msg=lambda m: f"{what}: {m}")
    else:
        eps = torch.finfo(actual.dtype).eps
        torch.testing.assert_close(actual.float(), expected.float(), rtol=eps, atol=1e-5, msg=lambda m: f"{what}: {m}")


def assert_all_close(actual, expected, what):
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.dtype == e.dtype and a.shape == e.shape and a.stride() == e.stride(), f"{what}[{i}]"
        assert_close(a, e, f"{what}[{i}]")


def assert_all_equal(actual, expected, what):
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert torch.equal(a, e), f"{what}[{i}] differs"


# --- the noise stream -----------------------------------------------------------------------------------

# Random123's published known-answer vectors for philox4x32_10: (counter, key, output).
KAT = (
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
)


def _philox_inputs():
    gen = torch.Generator().manual_seed(1)
    counter = torch.randint(0, 2**32, (3, 50, 4), generator=gen, dtype=torch.int64)
    counter[0, :4] = torch.tensor([[0, 0, 0, 0], [2**32 - 1] * 4, [2**31] * 4, [2**31 - 1, 2**31, 1, 2**32 - 2]])
    key = torch.randint(0, 2**32, (50, 2), generator=gen, dtype=torch.int64)  # broadcasts over the first dim
    key[:3] = torch.tensor([[0, 0], [2**32 - 1, 2**32 - 1], [2**31, 2**31 - 1]])
    return counter, key


def test_philox_known_answers():
    counter = torch.tensor([c for c, _, _ in KAT])
    key = torch.tensor([k for _, k, _ in KAT])
    out = rk.philox4x32_10(counter, key, backend="triton")
    assert out.tolist() == [list(x) for _, _, x in KAT]


@pytest.mark.parametrize("other", [n for n in backends.REGISTRY if n != "triton"])
def test_philox_integers_match_other_backends(other):
    """The cross-backend reproducibility promise: the same 32-bit words on every backend."""
    local = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    devices = [d for d in local if backends.unavailable_reason(other, d) is None]
    if not devices:
        pytest.skip(f"backend {other!r} is not available here: {backends.unavailable_reason(other, 'cpu')}")
    counter, key = _philox_inputs()
    ours = rk.philox4x32_10(counter, key, backend="triton")
    assert ours.shape == (3, 50, 4) and ours.dtype == torch.int64
    for device in devices:
        theirs = rk.philox4x32_10(counter.to(device), key.to(device), backend=other).cpu()
        assert torch.equal(ours, theirs), f"Philox words differ from backend {other!r} on {device}"
        z = rk.noise(999, seed=2**64 - 1, param_index=2**32 - 1, step=2**32 + 3, stream=5, offset=2**33 + 1,
                     backend="triton")
        z_other = rk.noise(999, seed=2**64 - 1, param_index=2**32 - 1, step=2**32 + 3, stream=5, offset=2**33 + 1,
                           device=device, backend=other).cpu()
        assert ((z - z_other).abs() <= 1e-5 * (1 + z_other.abs())).all()


@pytest.mark.parametrize("numel, offset", [(1, 0), (10, 3), (4097, 5), (700, 2**32 * 4 - 7)])
def test_noise_matches_reference(numel, offset):
    args = dict(seed=0xDEADBEEF12345678, param_index=7, step=2**32 + 5, stream=3, offset=offset)
    z = rk.noise(numel, **args, backend="triton")
    ref = rk.noise(numel, **args, backend="reference")
    assert z.shape == (numel,) and z.dtype == torch.float32
    assert ((z - ref).abs() <= 1e-5 * (1 + ref.abs())).all()
    assert numel < 100 or 0.9 < z.std() < 1.1


# --- perturb_ ---------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("adaptive", [False, True], ids=["rwp", "arwp"])
def test_perturb_matches_reference(dtype, adaptive):
    params = _params(dtype)
    n = len(params)
    grads = _like(params, 1)
    grads[3] = None  # a parameter without a gradient
    kwargs = dict(gamma=[0.01 * (i + 1) for i in range(n)], seed=12345, step=9, stream=2,
                  param_indices=[3 * i + 1 for i in range(n)], grad_scale=0.75)
    if adaptive:
        kwargs.update(fisher=_fisher(params, 2), eta=0.3)
    results = {}
    for backend in ("triton", "reference"):
        p, b = _clone(params), [torch.empty_like(x) for x in params]
        g = [None if x is None else x.clone() for x in grads]
        sigmas = rk.perturb_(p, backups=b, grads=g, backend=backend, **kwargs)
        results[backend] = p, g, b, sigmas
    p, g, b, sigmas = results["triton"]
    p_ref, g_ref, b_ref, sigmas_ref = results["reference"]
    for i, (s, s_ref) in enumerate(zip(sigmas, sigmas_ref)):
        assert s.shape == s_ref.shape and s.dtype == torch.float32, f"sigmas[{i}]"
        torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=0, msg=lambda m: f"sigmas[{i}]: {m}")
    if adaptive:
        assert sigmas[7].shape == (3000,) and sigmas[8].shape == (1,)  # ARWP vectors: one sigma per element
    assert_all_close(p, p_ref, "params")
    assert_all_equal(b, params, "backups")
    assert_all_equal([x for x in g if x is not None], [x for x in g_ref if x is not None], "grads")
    assert g[3] is None
    for i, (x, x0) in enumerate(zip(p, params)):
        assert not torch.equal(x, x0) or x.numel() == 1, f"params[{i}] was not perturbed"


def test_perturb_gamma_zero_leaves_weights_untouched():
    params = _params(torch.float32)
    params[0][0] = -0.0
    p = _clone(params)
    sigmas = rk.perturb_(p, gamma=0.0, seed=1, step=1, backend="triton")
    assert_all_equal(p, params, "params")
    assert all(torch.equal(s, torch.zeros_like(s)) for s in sigmas)
    assert torch.signbit(p[0][0]).all()


def test_bfloat16_results_round_to_nearest_even():
    """float32 -> bfloat16 as torch and a GPU round: ties to even, overflow to inf, NaN stays NaN (the
    interpreter's own conversion truncates; the kernels round with integer operations)."""
    clean = torch.tensor([1.0, 3.0, -1.0, 3.3895e38, float("inf"), float("nan"), 1e-40, 0.1, -5.0]).bfloat16()
    out = {}
    for backend in ("triton", "reference"):
        grads = [torch.zeros_like(clean)]
        rk.restore_([torch.zeros_like(clean)], backups=[torch.zeros_like(clean)], grads=grads, clean_grads=[clean],
                    clean_scale=1 + 2**-8, backend=backend)
        out[backend] = grads[0]
    got, want = out["triton"], out["reference"]
    assert want[0] == 1.0 and want[1] > 3.0 and want[3].isinf()  # a tie to even, a round up, an overflow
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan)
    assert torch.equal(got[~nan].view(torch.int16), want[~nan].view(torch.int16))


@pytest.mark.slow
def test_perturb_without_backups_or_grads_and_tensor_scale():
    params = _params(torch.bfloat16)
    grads = _like(params, 4)
    out = {}
    for backend in ("triton", "reference"):
        p, g = _clone(params), _clone(grads)
        rk.perturb_(p, grads=g, grad_scale=torch.tensor(3.0), gamma=0.02, seed=5, step=0, backend=backend)
        out[backend] = p, g
    assert_all_close(out["triton"][0], out["reference"][0], "params")
    assert_all_equal(out["triton"][1], out["reference"][1], "grads")


# --- restore_ ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_restore_exact_and_gradient_mix(dtype):
    params = _params(dtype)
    perturbed = _like(params, 5)
    grads, clean = _like(params, 6), _like(params, 7)
    fisher = _fisher(params, 8)
    out = {}
    for backend in ("triton", "reference"):
        p, g, f = _clone(perturbed), _clone(grads), _clone(fisher)
        rk.restore_(p, backups=params, grads=g, grad_scale=torch.tensor(0.5), fisher=f, beta=0.9, fisher_scale=2.0,
                    clean_grads=clean, clean_scale=0.25, backend=backend)
        out[backend] = p, g, f
    assert_all_equal(out["triton"][0], params, "params")
    assert_all_close(out["triton"][1], out["reference"][1], "grads")
    assert_all_close(out["triton"][2], out["reference"][2], "fisher")


@pytest.mark.slow
@pytest.mark.parametrize("dtype, sigma_buffer", [(torch.float32, "as_returned"), (torch.float32, "separate"),
                                                 (torch.float16, "as_returned"), (torch.bfloat16, "as_returned")])
def test_restore_regenerates_the_noise(dtype, sigma_buffer):
    params = _params(dtype)
    fisher = _fisher(params, 9) if dtype == torch.float32 else None  # ARWP sigmas: one per element for vectors
    kwargs = dict(seed=77, step=2**32 + 1, stream=1, param_indices=list(range(10, 10 + len(params))))
    p = _clone(params)
    sigmas = rk.perturb_(p, gamma=0.05, fisher=fisher, eta=0.5, backend="triton", **kwargs)
    if sigma_buffer == "separate":
        sigmas = [s.clone() for s in sigmas]
    perturbed, p_ref = _clone(p), _clone(p)
    rk.restore_(p, sigmas=sigmas, backend="triton", **kwargs)
    rk.restore_(p_ref, sigmas=sigmas, backend="reference", **kwargs)
    assert_all_close(p, p_ref, "params")
    eps = torch.finfo(dtype).eps
    for i, (x, x0, xp) in enumerate(zip(p, params, perturbed)):
        # Up to two roundings to the dtype, at the magnitude of the perturbed weights, from the start.
        torch.testing.assert_close(x.float(), x0.float(), rtol=0, atol=eps * xp.float().abs().max().item(),
                                   msg=lambda m: f"params[{i}] vs. before perturb_: {m}")


# --- sgd_step_ --------------------------------------------------------------------------------------------

STEP_CASES = {
    "plain": dict(lr=0.1),
    "momentum": dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-3),
    "nesterov_first": dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4, is_first_step=True),
    "maximize_mixed": dict(lr=0.2, momentum=0.5, maximize=True, grad_scale=torch.tensor(0.5), clean_scale=0.5,
                           beta=0.99, fisher_scale=0.5),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(STEP_CASES))
def test_sgd_step_matches_reference(dtype, case):
    kwargs = dict(STEP_CASES[case])
    params = _params(dtype)
    grads, bufs = _like(params, 10), _like(params, 11)
    backups = _like(params, 12) if case != "plain" else None
    mixed = case == "maximize_mixed"
    fisher = _fisher(params, 13) if mixed else None
    clean = _like(params, 14) if mixed else None
    out = {}
    for backend in ("triton", "reference"):
        p, b, f = _clone(params), _clone(bufs), _clone(fisher)
        rk.sgd_step_(p, grads, b if "momentum" in kwargs else None, backups=backups, fisher=f, clean_grads=clean,
                     backend=backend, **kwargs)
        out[backend] = p, b, f
    assert_all_close(out["triton"][0], out["reference"][0], "params")
    assert_all_equal(grads, _like(params, 10), "grads (sgd_step_ does not write them)")
    if "momentum" in kwargs:
        assert_all_close(out["triton"][1], out["reference"][1], "momentum_buffers")
    if mixed:
        assert_all_close(out["triton"][2], out["reference"][2], "fisher")


def test_sgd_step_found_inf_restores_only():
    params = _params(torch.float16)
    grads, bufs, backups = _like(params, 15), _like(params, 16), _like(params, 17)
    fisher = _fisher(params, 18)
    for found, with_backups in ((1.0, True), (1.0, False), (0.0, True)):
        p, b, f = _clone(params), _clone(bufs), _clone(fisher)
        rk.sgd_step_(p, grads, b, lr=0.1, momentum=0.9, found_inf=torch.tensor(found),
                     backups=backups if with_backups else None, fisher=f, beta=0.9, backend="triton")
        if found:
            assert_all_equal(p, backups if with_backups else params, "params")
            assert_all_equal(b, bufs, "momentum_buffers")
            assert_all_equal(f, fisher, "fisher")
        else:
            p_ref, b_ref = _clone(params), _clone(bufs)
            rk.sgd_step_(p_ref, grads, b_ref, lr=0.1, momentum=0.9, backups=backups, fisher=_clone(fisher), beta=0.9,
                         backend="reference")
            assert_all_close(p, p_ref, "params")
            assert_all_close(b, b_ref, "momentum_buffers")


# --- whole-model calls, launches, caching, mixed dtypes ---------------------------------------------------

@pytest.fixture
def launches(monkeypatch):
    from rwp_kernels.triton import tables

    calls = []
    real = tables.launch

    def counting(kernel, *args, **kwargs):
        calls.append(kernel)
        return real(kernel, *args, **kwargs)

    monkeypatch.setattr(tables, "launch", counting)
    return calls


@pytest.mark.slow
def test_small_cnn_step_in_one_launch_per_op(launches):
    torch.manual_seed(0)
    params = [p.detach() for p in models.small_cnn().parameters()]
    grads, clean, bufs = _like(params, 20), _like(params, 21), _like(params, 22)
    fisher = _fisher(params, 23)
    results = {}
    for backend in ("triton", "reference"):
        p, g, b, f = _clone(params), _clone(grads), _clone(bufs), _clone(fisher)
        backups = [torch.empty_like(x) for x in p]
        before = len(launches)
        sigmas = rk.perturb_(p, gamma=0.01, seed=3, step=4, backups=backups, grads=g, grad_scale=1 / 3, fisher=f,
                             eta=0.1, backend=backend)
        rk.sgd_step_(p, g, b, lr=0.1, momentum=0.9, weight_decay=1e-3, backups=backups, fisher=f, beta=0.99,
                     grad_scale=0.75, backend=backend)
        if backend == "triton":
            assert len(launches) - before == 2, "one launch per op for the whole parameter list"
        results[backend] = p, b, f, sigmas
    for what, a, e in zip(("params", "momentum_buffers", "fisher", "sigmas"), results["triton"], results["reference"]):
        assert_all_close(a, e, what)


def test_one_launch_per_dtype_and_float64_to_reference(launches):
    params = [torch.randn(4, 9), torch.randn(6).half(), torch.randn(3, 5).double(), torch.randn(8, 2)]
    p, p_ref = _clone(params), _clone(params)
    sigmas = rk.perturb_(p, gamma=0.1, seed=1, step=2, backend="triton")
    sigmas_ref = rk.perturb_(p_ref, gamma=0.1, seed=1, step=2, backend="reference")
    assert len(launches) == 2  # float32 and float16; float64 goes to the reference backend
    assert_all_close(p, p_ref, "params")
    assert_all_close(sigmas, sigmas_ref, "sigmas")


def test_tables_are_cached_and_follow_new_tensors(monkeypatch):
    from rwp_kernels.triton import tables

    uploads = []
    real = tables.upload
    monkeypatch.setattr(tables, "upload", lambda *a: uploads.append(a[1]) or real(*a))
    tables.clear_caches()
    params, grads = _params(torch.float32), _like(_params(torch.float32), 0)
    for _ in range(3):
        rk.sgd_step_(params, grads, None, lr=0.1, backend="triton")
    assert uploads == [torch.int64]  # one table upload, then cache hits
    other = _params(torch.float32, seed=1)  # new tensors, same shapes: new addresses, new tables
    grads = _like(other, 2)
    expected = _clone(other)
    rk.sgd_step_(expected, grads, None, lr=0.1, backend="reference")
    rk.sgd_step_(other, grads, None, lr=0.1, backend="triton")
    assert_all_close(other, expected, "params")
    assert len(uploads) == 2


# --- the self-test of python -m rwp_kernels.report, shared validation, availability -----------------------

@pytest.mark.slow
def test_selftest_checks_pass():
    """Acceptance checks of ``python -m rwp_kernels.report --selftest``, with their own tolerances, for bfloat16
    (the dtype where the interpreter's own conversions are wrong). The interpreter is too slow for all of them:
    the million-normal noise check alone takes a minute; the tests above cover the rest."""
    from rwp_kernels import selftest

    checks = selftest._Checks("triton", torch.device("cpu"), repeats=1, model="small_cnn")
    checks.philox()
    checks.perturb_restore(torch.bfloat16, "small_cnn")
    checks.sgd_step(torch.bfloat16, "small_cnn")
    assert len(checks.results) == 7
    assert all(r.passed for r in checks.results), [r for r in checks.results if not r.passed]


@pytest.mark.slow
def test_report_lists_triton_with_its_reason(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "rwp_kernels.report"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    line = next(line for line in out.stdout.splitlines() if "backend 'triton'" in line)
    if not torch.cuda.is_available():
        assert "cpu: unavailable (it runs on CPU tensors only under TRITON_INTERPRET=1" in line
        assert "cuda: unavailable (no CUDA GPU" in line

def test_bad_inputs_are_rejected_before_any_launch(launches):
    p = [torch.randn(4, 3), torch.randn(3, 4).t()]
    with pytest.raises(ValueError, match=r"params\[1\]"):
        rk.perturb_(p, gamma=0.1, seed=1, step=0, backend="triton")
    with pytest.raises(TypeError, match=r"params\[0\]"):
        rk.sgd_step_([torch.ones(3, dtype=torch.int32)], [torch.ones(3)], None, lr=0.1, backend="triton")
    assert launches == []


def test_unavailable_on_cuda_tensors_says_why():
    reason = backends.unavailable_reason("triton", "cuda")
    assert reason is not None and ("TRITON_INTERPRET" in reason or "GPU" in reason)

