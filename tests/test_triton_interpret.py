"""What is specific to the Triton kernels run by Triton's interpreter on CPU tensors: float32-to-bfloat16
rounding (the interpreter's own conversion truncates), one launch per op and dtype, the cached address
tables, the self-test on the interpreter, the report, and argument checks before any launch.

tests/conftest.py switches the interpreter on (TRITON_INTERPRET=1) where there is no GPU, before any kernel
is created. The Triton backend against the reference (Philox, noise, perturb_, restore_, sgd_step_ over the
shape/dtype/layout sweep, with the tolerances of docs/spec.md section 6) is in the conformance suite,
tests/test_conformance.py.
"""
import os
import subprocess
import sys

import pytest
import torch

import rwp_kernels as rk
from rwp_kernels import backends, models
from rwp_kernels import conformance as C

pytestmark = pytest.mark.usefixtures("triton_interpreter")


def _params(dtype, seed=0):
    return C.sweep_params(dtype, seed=seed, fast=True)


def assert_all_close(actual, expected, what):
    errors = C.check(C.CLOSE, actual, expected, what)
    assert not errors, "\n".join(errors)


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
    grads, bufs = C.like(params, seed=20), C.like(params, seed=22)
    fisher = C.fisher_like(params, seed=23)
    results = {}
    for backend in ("triton", "reference"):
        p, g, b, f = C.clone_all(params), C.clone_all(grads), C.clone_all(bufs), C.clone_all(fisher)
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
    p, p_ref = C.clone_all(params), C.clone_all(params)
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
    params = _params(torch.float32)
    grads = C.like(params, seed=0)
    for _ in range(3):
        rk.sgd_step_(params, grads, None, lr=0.1, backend="triton")
    assert uploads == [torch.int64]  # one table upload, then cache hits
    other = _params(torch.float32, seed=1)  # new tensors, same shapes: new addresses, new tables
    grads = C.like(other, seed=2)
    expected = C.clone_all(other)
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

