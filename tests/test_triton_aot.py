"""Every Triton kernel specialization compiles ahead of time for sm_80 and sm_90 without a GPU, and spills nothing.

The compilation runs in a subprocess without TRITON_INTERPRET (interpreted kernels cannot be compiled, and
tests/conftest.py switches the interpreter on in this process where there is no GPU).
"""
import json
import os
import subprocess
import sys

import pytest

from conftest import requires

pytestmark = pytest.mark.slow  # builds, compiles, subprocesses or torchrun: see README, Tests


def _tools_missing() -> str | None:
    try:
        import triton
    except ImportError as err:
        return f"triton is not importable ({err})"
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    for tool in ("ptxas", "cuobjdump"):
        if not os.access(os.path.join(bin_dir, tool), os.X_OK):
            return f"Triton's {tool} is missing from {bin_dir}"
    return None


def test_every_specialization_compiles_for_sm80_and_sm90_without_spills():
    missing = _tools_missing()
    requires(missing is None, f"ahead-of-time compilation: {missing}", "triton-aot")
    from rwp_kernels.triton import aot

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "rwp_kernels.triton.aot", "--json", "--arch", "80", "90",
         "--jobs", str(min(4, os.cpu_count() or 1))],
        env=env, capture_output=True, text=True, timeout=1200,
    )
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    key = ("kernel", "dtype", "block", "num_warps", "arch", "index")
    compiled = {tuple(r["spec"][k] for k in key) for r in results}
    expected = {tuple(getattr(s, k) for k in key) for s in aot.specializations((80, 90))}
    assert compiled == expected, f"specializations compiled vs. expected differ; stderr:\n{proc.stderr[-3000:]}"
    assert {r["spec"]["kernel"] for r in results} == {
        "philox_kernel", "noise_kernel", "perturb_kernel", "restore_kernel", "sgd_step_kernel"}
    for r in results:
        label = aot.Spec(**r["spec"]).label
        assert not r["error"], f"{label}: {r['error']}"
        assert r["registers"] > 0, f"{label}: no register count read from the cubin"
        assert r["spill_store_bytes"] == 0 and r["spill_load_bytes"] == 0, f"{label} spills: {r}"
    assert proc.returncode == 0, proc.stderr[-3000:]
