"""Helpers shared by the C++ extension's tests (test_ext_cpu.py, test_ext_cpu_isa.py, test_ext_build.py,
test_ext_cache.py): a child-process runner, the build folder a child will use and a child that reports
the fallback, the perturb_ call they repeat, the ISA workload (imported by the child processes of
test_ext_cpu_isa.py), and bitwise comparison. Shapes, dtypes and tolerances come from
rwp_kernels.conformance."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from rwp_kernels import _ext_config, extension
from rwp_kernels import conformance as C
from rwp_kernels import noise, perturb_, restore_, sgd_step_

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
CHILD_TIMEOUT = 300
SEED, STEP, STREAM = 20240611, 7, 3
DTYPES = C.DTYPES


def run_child(code: str, env_overrides: dict, *, cwd=None, timeout=CHILD_TIMEOUT) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh Python with ``env_overrides`` (None removes a variable)."""
    env = dict(os.environ)
    env.pop("RWP_KERNELS_BUILD_TIMEOUT", None)
    env.update({k: v for k, v in env_overrides.items() if v is not None})
    for k, v in env_overrides.items():
        if v is None:
            env.pop(k, None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(cwd or REPO), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=cwd or REPO,
                          capture_output=True, text=True, timeout=timeout)


def make_params(dtype, *, seed=0, device="cpu"):
    """The conformance sweep (rows of 1 to beyond 64k, 0-D, 1-D, zero-norm rows, channels_last, offset views)."""
    return C.sweep_params(dtype, seed=seed, device=device)


def run_perturb(backend, params, *, fisher=None, eta=0.0, gamma=0.01):
    """perturb_ with backups, gradient scaling (params[1] without a gradient) and param_indices 3i+1."""
    params = C.clone_all(params)
    backups = [torch.empty_like(p) for p in params]
    grads = C.like(params, seed=5)
    grads[1] = None
    sigmas = perturb_(params, gamma=gamma, seed=SEED, step=STEP, stream=STREAM,
                      param_indices=[3 * i + 1 for i in range(len(params))], backups=backups, grads=grads,
                      grad_scale=0.3, fisher=C.clone_all(fisher), eta=eta, backend=backend)
    return params, sigmas, backups, grads


def assert_bitwise(a_list, b_list):
    """Same values bit for bit (NaN matches NaN), dtype and layout."""
    errors = C.check(C.EXACT, a_list, b_list, "tensor")
    assert not errors, "\n".join(errors)


def workload() -> dict:
    """Every CPU op on every dtype: noise at three offsets (one across the 2^32 wrap of the block
    counter), perturb_ (ARWP rows, backups, gradient scaling; rows short, long and beyond the row
    buffer), the regenerated restore_, and sgd_step_ with the fused exact restore."""
    out = {"noise": [noise(100_003, seed=SEED, param_index=11, step=STEP, stream=STREAM, offset=o, backend="cpu")
                     for o in (0, 3, 4 * 2**32 - 6)]}
    for dtype in DTYPES:
        params = make_params(dtype) + [torch.randn(300, 300, generator=torch.Generator().manual_seed(5)).to(dtype)]
        indices = [3 * i + 1 for i in range(len(params))]
        fisher = C.fisher_like(params, seed=9)
        perturbed, sigmas, backups, grads = run_perturb("cpu", params, fisher=fisher, eta=0.1)
        regenerated = C.clone_all(perturbed)
        restore_(regenerated, sigmas=sigmas, seed=SEED, step=STEP, stream=STREAM, param_indices=indices, backend="cpu")
        stepped = C.clone_all(perturbed)
        bufs = C.like(params, seed=6)
        sgd_step_(stepped, C.like(params, seed=3), bufs, lr=0.1, momentum=0.9, weight_decay=1e-3, nesterov=True,
                  backups=backups, backend="cpu")
        out[str(dtype)] = dict(perturbed=perturbed, sigmas=sigmas, backups=backups,
                               grads=[g for g in grads if g is not None], regenerated=regenerated,
                               stepped=stepped, bufs=bufs)
    return out


FALLBACK_CHILD = """
    import json, warnings, torch, rwp_kernels
    from rwp_kernels import backends
    params = [torch.randn(4, 3, generator=torch.Generator().manual_seed(0))]
    ref = [params[0].clone()]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sig = rwp_kernels.perturb_(params, gamma=0.1, seed=1, step=1)
        rwp_kernels.perturb_(params, gamma=0.1, seed=1, step=2)
    rwp_kernels.perturb_(ref, gamma=0.1, seed=1, step=1, backend="reference")
    rwp_kernels.perturb_(ref, gamma=0.1, seed=1, step=2, backend="reference")
    try:
        rwp_kernels.perturb_(params, gamma=0.1, seed=1, step=3, backend="cpu")
        explicit = "no error"
    except rwp_kernels.BackendUnavailableError as err:
        explicit = str(err)
    print(json.dumps(dict(
        warnings=[f"{w.category.__name__}: {w.message}" for w in caught],
        same_as_reference=torch.equal(params[0], ref[0]) or "unequal",
        explicit=explicit,
        reason=backends.unavailable_reason("cpu", "cpu"),
    )))
"""


def folder_for(monkeypatch, env) -> Path:
    """The build folder a child with `env` will use."""
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return extension.build_dir(_ext_config.make_config())
