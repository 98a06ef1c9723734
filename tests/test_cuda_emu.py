"""Backend "cuda-emu": the CUDA kernels of csrc/cuda compiled as host C++ and run on CPU tensors (csrc/emu).

The conformance suite (tests/test_conformance.py) runs it like every backend. Here: its SIMT layer's own
self-test (races show up under other thread orders, barrier misuse fails the launch), the same bits as the
C++ CPU backend, results independent of the thread order, AddressSanitizer over every op with a negative
control, and its place among the backends (listed, never chosen by "auto").
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rwp_kernels as rk
from conftest import require_backend, requires
from rwp_kernels import _ext_config, backends
from rwp_kernels import conformance as C

ROOT = Path(__file__).resolve().parent.parent
EMU = "cuda-emu"


@pytest.fixture
def emu():
    require_backend(EMU, "cpu")
    require_backend("cpu", "cpu")


def _compiler() -> str:
    cxx = _ext_config.cxx_compiler()
    requires(shutil.which(cxx) is not None, f"no C++ compiler ({cxx})", EMU)
    return cxx


def _libasan(cxx: str) -> str:
    path = subprocess.run([cxx, "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    requires(os.path.isabs(path) and os.path.exists(path), f"{cxx} has no AddressSanitizer runtime", EMU)
    return path


# ---- the SIMT layer ------------------------------------------------------------------------------------------

@pytest.mark.slow  # compiles and runs a C++ program
@pytest.mark.parametrize("sanitize", [None, "address,undefined"])
def test_simt_selftest(tmp_path, sanitize):
    cxx = _compiler()
    flags = ["-std=c++20", "-O1", "-ffp-contract=off", "-DRWP_EMULATE_CUDA", "-pthread"]
    if sanitize:
        _libasan(cxx)
        flags += [f"-fsanitize={sanitize}", "-fno-omit-frame-pointer", "-g1"]
    exe = tmp_path / "simt_selftest"
    subprocess.run([cxx, *flags, str(ROOT / "tests/emu/simt_selftest.cpp"), str(ROOT / "csrc/emu/simt_emu.cpp"),
                    "-o", str(exe)], check=True)
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    lines = run.stdout.splitlines()
    assert run.returncode == 0, run.stdout + run.stderr
    assert len(lines) == 9 and all(line.startswith("ok ") for line in lines), run.stdout


# ---- the same bits as the C++ CPU backend ---------------------------------------------------------------------

def _dyadic(params, seed):
    """Values k/16 (|k| < 64): every sum of their squares is exact in double, in any order, so the per-row
    sigmas (and so every result) must agree bit for bit between any two correct backends."""
    gen = torch.Generator().manual_seed(seed)
    return [C.place(torch.randint(-63, 64, p.shape, generator=gen).float() / 16, C.layout_of(p), p.dtype)
            for p in params]


def _all_ops(backend, dtype):
    params = _dyadic(C.sweep_params(dtype), 1)
    grads, clean, bufs = _dyadic(params, 2), _dyadic(params, 3), _dyadic(params, 4)
    fisher = [f.abs().float() for f in _dyadic(params, 5)]
    out = {}
    w, b, g = C.clone_all(params), C.clone_all(params), C.clone_all(grads)
    out["sigmas"] = rk.perturb_(w, gamma=0.02, seed=9, step=3, backups=b, grads=g, grad_scale=0.75, backend=backend)
    out["perturbed"], out["backups"], out["scaled grads"] = C.clone_all(w), b, C.clone_all(g)
    f = C.clone_all(fisher)
    rk.restore_(w, backups=b, grads=g, fisher=f, beta=0.9, clean_grads=clean, clean_scale=0.25, backend=backend)
    out["restored"], out["mixed grads"], out["fisher"] = w, g, f
    wa = C.clone_all(params)
    out["arwp sigmas"] = rk.perturb_(wa, gamma=0.02, eta=0.5, fisher=fisher, seed=9, step=3, backend=backend)
    out["arwp perturbed"] = C.clone_all(wa)
    rk.restore_(wa, sigmas=out["arwp sigmas"], seed=9, step=3, backend=backend)
    out["regenerated restore"] = wa
    ws, ms = C.clone_all(params), C.clone_all(bufs)
    rk.sgd_step_(ws, grads, ms, lr=0.1, momentum=0.9, weight_decay=1e-3, nesterov=True, backups=C.clone_all(bufs),
                 clean_grads=clean, clean_scale=0.5, backend=backend)
    out["sgd weights"], out["sgd momentum"] = ws, ms
    return out


@pytest.mark.parametrize("dtype", C.DTYPES, ids=str)
def test_every_op_bit_for_bit_as_cpu_backend(emu, dtype):
    emu_out, cpu_out = _all_ops(EMU, dtype), _all_ops("cpu", dtype)
    for name, tensors in cpu_out.items():
        for i, (a, b) in enumerate(zip(emu_out[name], tensors, strict=True)):
            assert C.bitwise_equal(a, b), f"{name}[{i}] ({C.SWEEP[i].name}) differs from the C++ CPU backend"


@pytest.mark.parametrize("dtype", C.DTYPES, ids=str)
def test_rows_around_the_stage_limit_and_split_rows_bit_for_bit_as_cpu_backend(emu, dtype):
    """Rows that just fit a block's shared-memory stage, rows one element longer (split into segments: partial
    sums in one launch, the update in a second), 1-D tensors at the limit, one element past it and of a million
    elements (with ARWP's per-element sigmas too: a whole block per tensor, or split) and an unaligned view, with
    the gradients rescaled, on exactly summable values (any sum order gives the same)."""
    fits = 6140 if dtype == torch.float32 else 12280  # (n - 1) // vector + 2 <= 1536 vectors of 16 bytes
    shapes = [(2, fits), (2, fits + 1), (3, 20001), (fits,), (fits + 1,), (1_000_003,), (5, 27)]
    params = _dyadic([torch.empty(s, dtype=dtype) for s in shapes], 1) + [_dyadic([torch.empty(40003, dtype=dtype)],
                                                                                  1)[0][1:]]
    grads = _dyadic(params, 2)
    fisher = [f.abs().float() for f in _dyadic(params, 3)]
    for adaptive in (False, True):
        out = {}
        for backend in (EMU, "cpu"):
            w, b, g = C.clone_all(params), C.clone_all(params), C.clone_all(grads)
            sigmas = rk.perturb_(w, gamma=0.02, seed=3, step=5, backups=b, grads=g, grad_scale=0.5, eta=0.1,
                                 fisher=fisher if adaptive else None, backend=backend)
            out[backend] = (w, b, g, sigmas)
        for name, emu_t, cpu_t in zip(("perturbed", "backups", "scaled grads", "sigmas"), out[EMU], out["cpu"]):
            for i, (a, b) in enumerate(zip(emu_t, cpu_t, strict=True)):
                assert C.bitwise_equal(a, b), f"{name}[{i}] {tuple(params[i].shape)} (ARWP {adaptive}) differs"


@pytest.mark.parametrize("offset", [0, 2**31 - 5, 2**31, 2**32 - 3, 2**32 + 2, 2**33 + 1])
def test_noise_and_philox_bit_for_bit_as_cpu_backend(emu, offset):
    for numel in (1, 7, 4099):
        a = rk.noise(numel, seed=5, param_index=3, step=2**32 - 1, offset=offset, backend=EMU)
        b = rk.noise(numel, seed=5, param_index=3, step=2**32 - 1, offset=offset, backend="cpu")
        assert torch.equal(a, b)
    counter = torch.tensor([[offset % 2**32, offset >> 32, 1, 2]])
    key = torch.tensor([[2**32 - 1, 7]])
    assert torch.equal(rk.philox4x32_10(counter, key, backend=EMU), rk.philox4x32_10(counter, key, backend="cpu"))


def test_thread_order_does_not_change_results(emu):
    def run(seed):
        torch.ops.rwp_kernels_emu.set_schedule_seed(seed)
        params = C.sweep_params(torch.bfloat16, fast=True)
        sigmas = rk.perturb_(params, gamma=0.1, eta=1.0, fisher=C.fisher_like(params, seed=1), seed=2, step=3,
                             backend=EMU)
        return params + sigmas

    first = run(1)
    for seed in (2, 3):
        assert all(C.bitwise_equal(a, b) for a, b in zip(first, run(seed)))


# ---- AddressSanitizer ----------------------------------------------------------------------------------------

def _asan_probe(tmp_path, *args):
    cxx = _compiler()
    env = dict(os.environ, RWP_KERNELS_SANITIZE="address", LD_PRELOAD=_libasan(cxx), ASAN_OPTIONS="detect_leaks=0",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, str(ROOT / "tests/emu/asan_probe.py"), *args], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_every_op_under_address_sanitizer(emu, tmp_path):
    run = _asan_probe(tmp_path)
    assert run.returncode == 0 and run.stdout.startswith("ok:"), run.stdout + run.stderr[-3000:]


@pytest.mark.slow
def test_address_sanitizer_catches_an_overflow_in_a_kernel(emu, tmp_path):
    run = _asan_probe(tmp_path, "--overflow")
    assert run.returncode != 0, run.stdout
    assert "heap-buffer-overflow" in run.stderr and "cuda_kernels.cu" in run.stderr, run.stderr[-3000:]


# ---- among the backends ---------------------------------------------------------------------------------------

def test_available_on_cpu_but_never_chosen_by_auto(emu):
    assert EMU in backends.available_backends("cpu")
    assert backends.auto_choice("cpu")[0] != EMU
    assert "CPU tensors" in backends.unavailable_reason(EMU, "meta")


@pytest.mark.slow
def test_listed_by_the_report(emu):
    report = subprocess.run([sys.executable, "-m", "rwp_kernels.report"], capture_output=True, text=True, cwd=ROOT)
    assert report.returncode == 0, report.stderr
    assert "backend 'cuda-emu'" in report.stdout, report.stdout
