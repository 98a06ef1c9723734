"""The self-test (python -m rwp_kernels.report --selftest) runs every available fused backend, passes a
correct one and catches broken ones."""
import dataclasses
import subprocess
import sys
import types

import pytest
import torch

from rwp_kernels import backends, reference
from rwp_kernels.selftest import run_selftest

pytestmark = pytest.mark.slow  # builds, compiles, subprocesses or torchrun: see README, Tests


def install_fake_backend(monkeypatch, module):
    fake = backends.Backend("cpu", "fake fused backend", ("cpu",), backends.FUSED_DTYPES, lambda t: module)
    monkeypatch.setitem(backends.REGISTRY, "cpu", fake)
    monkeypatch.setattr(backends, "_loaded", {})


def broken(**overrides):
    module = types.SimpleNamespace(**{n: getattr(reference, n) for n in
                                      ("philox4x32_10", "noise", "perturb_", "restore_", "sgd_step_")})
    for name, fn in overrides.items():
        setattr(module, name, fn)
    return module


def run(**kw):
    return run_selftest(["cpu"], [torch.device("cpu")], repeats=1, model="small_cnn", **kw)


def test_a_correct_backend_passes_every_check(monkeypatch):
    install_fake_backend(monkeypatch, broken())
    lines = []
    results = run(progress=lines.append)
    assert lines == ["checking backend 'cpu' on cpu against the reference ..."]
    assert len(results) >= 15
    assert all(r.passed for r in results), [r for r in results if not r.passed]
    checks = " ".join(r.check for r in results)
    for op in ("philox4x32_10", "noise", "perturb_", "restore_ exact", "restore_ regenerated", "sgd_step_",
               "found_inf", "ARWP", "float16", "bfloat16"):
        assert op in checks


def _philox_flip(counter, key):
    out = reference.philox4x32_10(counter, key)
    out[0, 0] ^= 1
    return out


def _noise_off(numel, **kw):
    return reference.noise(numel, **kw) * (1 + 3e-5)


def _noise_one_ulp_off(numel, **kw):
    """One normal in a million one float32 step away: the C++ backends' normals must be the reference's bits."""
    z = reference.noise(numel, **kw)
    z[numel // 2] = torch.nextafter(z[numel // 2], torch.tensor(10.0))
    return z


def _perturb_too_much(params, **kw):
    sigmas = reference.perturb_(params, **kw)
    for p in params:
        p.mul_(1 + 1e-4)
    return sigmas


def _restore_slightly_off(params, **kw):
    reference.restore_(params, **kw)
    params[-1].add_(torch.finfo(params[-1].dtype).eps * 8 * params[-1].abs().max())


def _step_without_weight_decay(params, *, hyper, **kw):
    reference.sgd_step_(params, hyper=dataclasses.replace(hyper, weight_decay=0.0), **kw)


def _step_ignoring_found_inf(params, **kw):
    reference.sgd_step_(params, **{**kw, "found_inf": None})


@pytest.mark.parametrize(
    "overrides,failing",
    [
        (dict(philox4x32_10=_philox_flip), "philox4x32_10"),
        (dict(noise=_noise_off), "noise"),
        (dict(noise=_noise_one_ulp_off), "noise"),
        (dict(perturb_=_perturb_too_much), "perturb_"),
        (dict(restore_=_restore_slightly_off), "restore_"),
        (dict(sgd_step_=_step_without_weight_decay), "sgd_step_"),
        (dict(sgd_step_=_step_ignoring_found_inf), "found_inf"),
    ],
    ids=["philox", "noise", "noise_1ulp", "perturb", "restore", "sgd", "found_inf"],
)
def test_a_broken_backend_is_caught(monkeypatch, overrides, failing):
    install_fake_backend(monkeypatch, broken(**overrides))
    results = run()
    failed = [r.check for r in results if not r.passed]
    assert any(failing in check for check in failed), failed


def test_every_available_fused_backend_passes_on_cpu():
    """The real backends of this installation, as the report runs them by default. Triton on CPU (its
    interpreter) is left out unless named; tests/test_triton_interpret.py runs the self-test's checks on it."""
    results = run_selftest(None, [torch.device("cpu")], repeats=1, model="small_cnn")
    assert all(r.passed for r in results), [r for r in results if not r.passed]
    ran = {r.backend for r in results}
    assert ran == {n for n in backends.available_backends("cpu") if n not in ("reference", "triton")}


def test_report_command_runs(tmp_path):
    out = subprocess.run([sys.executable, "-m", "rwp_kernels.report"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    for name in backends.REGISTRY:
        assert f"backend '{name}'" in out.stdout
    assert "torch" in out.stdout and "backend='auto' on cpu" in out.stdout
