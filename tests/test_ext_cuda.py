"""CUDA kernels. Without a GPU: the .cu sources compile for sm_80 and sm_90 with no register spills,
and the extension with its CUDA kernels builds, links and imports (capability "cuda-build"). With a GPU:
the CUDA backend against the reference, with the tolerances of test_ext_cpu (capability "gpu")."""
import re
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import requires
from rwp_kernels import _ext_config as C
from rwp_kernels import backends, extension, noise, philox4x32_10, restore_, sgd_step_
from test_ext_cpu import (DTYPES, SEED, STEP, STREAM, assert_bitwise, check_perturbed, check_regenerated_restore, clone_all,
                          like, make_params, run_perturb)

OPS = ("philox4x32_10", "noise_", "perturb_", "restore_", "sgd_step_")
KERNELS = ("philox_kernel", "noise_kernel", "perturb_kernel", "restore_kernel", "sgd_kernel")
CUDA_DIR = C.source_dir() / "cuda"


def test_cuda_sources_include_no_torch_headers():
    """The .cu files and every header they include compile without torch (fast nvcc builds)."""
    seen, todo = set(), sorted(CUDA_DIR.glob("*.cu"))
    assert todo
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for inc in re.findall(r'^\s*#\s*include\s*[<"]([^>"]+)[>"]', path.read_text(), re.MULTILINE):
            assert not inc.startswith(("torch/", "ATen/", "c10/")), f"{path.name} includes {inc}"
            local = (path.parent / inc).resolve()
            if local.is_file():
                todo.append(local)
    assert {p.name for p in seen} >= {"cuda_kernels.cu", "cuda_kernels.h", "rwp_api.h", "rwp_common.h"}


def ptxas_report(output: str) -> dict:
    """{(kernel, arch): (registers, spill store bytes, spill load bytes)} from `nvcc -Xptxas -v` output."""
    found = {}
    pattern = re.compile(
        r"Compiling entry function '(\S+)' for '(sm_\d+)'.*?(\d+) bytes spill stores, (\d+) bytes spill loads"
        r".*?Used (\d+) registers", re.DOTALL)
    for m in pattern.finditer(output):
        kernel = next((k for k in KERNELS if k in m.group(1)), m.group(1))
        found[(kernel, m.group(2))] = (int(m.group(5)), int(m.group(3)), int(m.group(4)))
    return found


@pytest.mark.slow
def test_cuda_sources_compile_for_sm80_and_sm90_without_spills(tmp_path):
    nvcc = C.find_nvcc()
    requires(nvcc is not None, "nvcc was not found (no CUDA toolkit)", "cuda-build")
    flags = [*C.NVCC_FLAGS, *C.gencode_flags(["8.0", "9.0"]), "-Xptxas", "-v"]
    report = {}
    for cu in sorted(CUDA_DIR.glob("*.cu")):
        out = subprocess.run([nvcc, "-c", str(cu), "-o", str(tmp_path / f"{cu.stem}.o"), *flags],
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stdout + out.stderr
        report.update(ptxas_report(out.stdout + out.stderr))
    assert set(report) == {(k, a) for k in KERNELS for a in ("sm_80", "sm_90")}, sorted(report)
    spills = {key: v for key, v in report.items() if v[1] or v[2]}
    assert not spills, f"register spills (registers, store bytes, load bytes): {spills}"


@pytest.fixture(scope="module")
def cuda_extension():
    requires(torch.version.cuda is not None, f"torch {torch.__version__} is not a CUDA build", "cuda-build")
    requires(C.find_nvcc() is not None, "nvcc was not found (no CUDA toolkit)", "cuda-build")
    reason = backends.unavailable_reason("cpu", "cpu")
    requires(reason is None, f"the C++ extension is unavailable: {reason}", "cpp-ext")
    ext = extension.load()
    requires(ext.with_cuda, str(ext.why_no_cuda), "cuda-build")
    return ext


def test_extension_with_cuda_kernels_links_and_imports(cuda_extension):
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"rwp_kernels::{op}", "CUDA"), op
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"rwp_kernels::{op}", "CPU"), op


# ---- on a GPU ------------------------------------------------------------------------------------------

@pytest.fixture
def gpu(cuda_extension, cuda_device):
    return cuda_device


def test_cuda_philox_and_noise(gpu):
    g = torch.Generator().manual_seed(0)
    counter = torch.randint(0, 2**32, (1000, 4), generator=g).to(gpu)
    key = torch.randint(0, 2**32, (1000, 2), generator=g).to(gpu)
    assert torch.equal(philox4x32_10(counter, key, backend="cuda").cpu(),
                       philox4x32_10(counter.cpu(), key.cpu(), backend="reference"))
    for offset, numel in ((0, 1 << 20), (3, 1001), (4 * 2**32 - 6, 77)):
        args = dict(seed=SEED, param_index=5, step=STEP, stream=STREAM, offset=offset)
        z = noise(numel, **args, device=gpu, backend="cuda").cpu()
        ref = noise(numel, **args, backend="reference")
        assert ((z - ref).abs() <= 1e-5 * (1 + ref.abs())).all()
        # The GPU runs the CPU's code (rwp_common.h, no contraction): the same bits as the CPU backend.
        assert torch.equal(z, noise(numel, **args, backend="cpu"))


@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_perturb_matches_reference(gpu, dtype):
    params = make_params(dtype, device=gpu)
    check_perturbed(params, run_perturb("cuda", params), run_perturb("reference", params))
    fisher = [f.float().abs() for f in like(params, seed=9)]
    check_perturbed(params, run_perturb("cuda", params, fisher=fisher, eta=0.1),
                    run_perturb("reference", params, fisher=fisher, eta=0.1))


@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_restore_matches_reference(gpu, dtype):
    orig = make_params(dtype, device=gpu)
    params, _, backups, _ = run_perturb("cuda", orig)
    restore_(params, backups=backups, backend="cuda")
    assert_bitwise(params, orig)
    check_regenerated_restore("cuda", orig, adaptive=False)
    check_regenerated_restore("cuda", orig, adaptive=True)

    def mix(backend):
        ps, grads, fisher = clone_all(orig), like(orig, seed=3), [f.float().abs() for f in like(orig, seed=5)]
        restore_(ps, backups=clone_all(orig), grads=grads, grad_scale=1 / 3, fisher=fisher, beta=0.9,
                 fisher_scale=0.7, clean_grads=like(orig, seed=4), clean_scale=0.45, backend=backend)
        return grads, fisher

    for a, b in zip(mix("cuda"), mix("reference")):
        assert_bitwise(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_sgd_step_matches_reference(gpu, dtype):
    params = make_params(dtype, device=gpu)

    def run(backend, found_inf):
        ps, bufs, fisher = clone_all(params), like(params, seed=6), [f.float().abs() for f in like(params, seed=5)]
        sgd_step_(ps, like(params, seed=3), bufs, lr=0.1, momentum=0.9, weight_decay=1e-3, nesterov=True,
                  grad_scale=torch.tensor(0.5, device=gpu), found_inf=found_inf, backups=like(params, seed=2),
                  fisher=fisher, beta=0.99, fisher_scale=2.0, clean_grads=like(params, seed=4), clean_scale=0.5,
                  backend=backend)
        return ps, bufs, fisher

    for found_inf in (None, torch.tensor(0.0, device=gpu), torch.tensor(1.0, device=gpu)):
        for a, b in zip(run("cuda", found_inf), run("reference", found_inf)):
            assert_bitwise(a, b)
