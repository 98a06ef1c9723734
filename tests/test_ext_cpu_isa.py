"""The CPU kernels built for other instruction sets give the same results as this machine's build.

The extension is compiled for the building machine (-march=native): on an AVX-512 machine the tests
in test_ext_cpu.py run the sixteen-lane code, on an AVX2 machine the eight-lane code. Here child
processes build the kernels again for an AVX2-only target (haswell) and for plain x86-64 (the scalar
code), CPU kernels only, run one workload over every op and dtype, and the results are compared
with this process's build: bit for bit, except the sigmas of the scalar build, whose float64 sums of
squares run in another order (relative 1e-6, as against the reference), and the weights perturbed and
restored with them.
"""
import platform
from pathlib import Path

import pytest
import torch

from conftest import requires
from rwp_kernels import _ext_config, backends, noise, restore_, sgd_step_
from test_ext_build import run_child
from test_ext_cpu import DTYPES, SEED, STEP, STREAM, assert_bitwise, like, make_params, run_perturb, ulp

pytestmark = pytest.mark.slow  # builds, compiles, subprocesses or torchrun: see README, Tests

TESTS = Path(__file__).resolve().parent


def workload() -> dict:
    """Every CPU op on every dtype: noise at three offsets (one across the 2^32 wrap of the block
    counter), perturb_ (ARWP rows, backups, gradient scaling; rows short, long and beyond the row
    buffer), the regenerated restore_, and sgd_step_ with the fused exact restore."""
    out = {"noise": [noise(100_003, seed=SEED, param_index=11, step=STEP, stream=STREAM, offset=o, backend="cpu")
                     for o in (0, 3, 4 * 2**32 - 6)]}
    for dtype in DTYPES:
        params = make_params(dtype) + [torch.randn(300, 300, generator=torch.Generator().manual_seed(5)).to(dtype)]
        indices = [3 * i + 1 for i in range(len(params))]
        fisher = [f.float().abs() for f in like(params, seed=9)]
        perturbed, sigmas, backups, grads = run_perturb("cpu", params, fisher=fisher, eta=0.1)
        regenerated = [p.clone(memory_format=torch.preserve_format) for p in perturbed]
        restore_(regenerated, sigmas=sigmas, seed=SEED, step=STEP, stream=STREAM, param_indices=indices, backend="cpu")
        stepped = [p.clone(memory_format=torch.preserve_format) for p in perturbed]
        bufs = like(params, seed=6)
        sgd_step_(stepped, like(params, seed=3), bufs, lr=0.1, momentum=0.9, weight_decay=1e-3, nesterov=True,
                  backups=backups, backend="cpu")
        out[str(dtype)] = dict(perturbed=perturbed, sigmas=sigmas, backups=backups,
                               grads=[g for g in grads if g is not None], regenerated=regenerated,
                               stepped=stepped, bufs=bufs)
    return out


def build_and_run(march: str, tmp_path: Path) -> dict:
    result = tmp_path / f"{march}.pt"
    out = run_child(f"""
        import sys, torch
        sys.path.insert(0, {str(TESTS)!r})
        from rwp_kernels import _ext_config
        from test_ext_cpu_isa import workload
        assert '-march={march}' in _ext_config.make_config().cflags
        torch.save(workload(), {str(result)!r})
    """, {"RWP_KERNELS_MARCH": march, "RWP_KERNELS_BUILD_CUDA": "0", "TORCH_EXTENSIONS_DIR": str(tmp_path / f"ext-{march}")})
    assert out.returncode == 0, out.stderr[-3000:]
    return torch.load(result)


@pytest.fixture(scope="module")
def native():
    reason = backends.unavailable_reason("cpu", "cpu")
    requires(reason is None, f"the C++ extension is unavailable: {reason}", "cpp-ext")
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip(f"the variants are x86-64 targets; this machine is {platform.machine()}")
    return workload()


def test_avx2_build_is_bitwise_the_native_build(native, tmp_path):
    missing = {"avx2", "fma", "f16c"} - set(_ext_config.cpu_flags() or ())
    if missing:
        pytest.skip(f"this CPU cannot run an AVX2 (haswell) build: no {', '.join(sorted(missing))}")
    other = build_and_run("haswell", tmp_path)
    assert_bitwise(other["noise"], native["noise"])
    for dtype in DTYPES:
        for name, tensors in native[str(dtype)].items():
            assert_bitwise(other[str(dtype)][name], tensors)


def test_scalar_build_matches_the_native_build(native, tmp_path):
    other = build_and_run("x86-64", tmp_path)
    assert_bitwise(other["noise"], native["noise"])
    for dtype in DTYPES:
        mine, theirs = native[str(dtype)], other[str(dtype)]
        for name in ("backups", "grads", "stepped", "bufs"):
            assert_bitwise(theirs[name], mine[name])
        for s, t in zip(mine["sigmas"], theirs["sigmas"]):
            torch.testing.assert_close(t, s, rtol=1e-6, atol=0)
        # Weights perturbed with sigmas that differ by ~1e-7 relative: apart by the rounding of the
        # dtype (twice for the restore) plus that difference times the noise (|z| < 7).
        for key, ulps in (("perturbed", 1), ("regenerated", 4)):
            for i, (p, q, s) in enumerate(zip(mine[key], theirs[key], mine["sigmas"])):
                bound = ulps * ulp(p) + 7 * 2e-6 * s.abs().max()
                assert ((p.float() - q.float()).abs() <= bound).all(), (key, dtype, i)
