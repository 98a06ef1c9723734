"""The CPU kernels built for other instruction sets give the same results as this machine's build.

The extension is compiled for the building machine (-march=native): on an AVX-512 machine the tests
in test_conformance.py run the sixteen-lane code, on an AVX2 machine the eight-lane code. Here child
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

from conftest import require_backend
from _ext_common import DTYPES, TESTS, assert_bitwise, run_child, workload
from rwp_kernels import _ext_config
from rwp_kernels.conformance import ulp

pytestmark = pytest.mark.slow  # builds, compiles, subprocesses or torchrun: see README, Tests


def build_and_run(march: str, tmp_path: Path) -> dict:
    result = tmp_path / f"{march}.pt"
    out = run_child(f"""
        import sys, torch
        sys.path.insert(0, {str(TESTS)!r})
        from rwp_kernels import _ext_config
        from _ext_common import workload
        assert '-march={march}' in _ext_config.make_config().cflags
        torch.save(workload(), {str(result)!r})
    """, {"RWP_KERNELS_MARCH": march, "RWP_KERNELS_BUILD_CUDA": "0", "TORCH_EXTENSIONS_DIR": str(tmp_path / f"ext-{march}")})
    assert out.returncode == 0, out.stderr[-3000:]
    return torch.load(result)


@pytest.fixture(scope="module")
def native():
    require_backend("cpu", "cpu")
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
