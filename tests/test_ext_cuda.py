"""CUDA kernels. Without a GPU: the .cu sources compile for sm_80 and sm_90 with no register spills,
and the extension with its CUDA kernels builds, links and imports (capability "cuda-build"). With a GPU:
its normals equal the C++ CPU backend's bit for bit (capability "gpu"). The CUDA backend against the
reference, with the tolerances of docs/spec.md section 6, is in the conformance suite
(tests/test_conformance.py, backend "cuda" on device "cuda")."""
import re
import subprocess

import pytest
import torch

from _noise_sqrt import approximate, instructions, stored_value, without_noise_sqrt
from conftest import require_backend, requires
from rwp_kernels import _ext_config as C
from rwp_kernels import extension, gpu_model, noise, sass

OPS = ("philox4x32_10", "noise_", "perturb_", "restore_", "sgd_step_")
KERNELS = ("philox_kernel", "noise_kernel", "partials_kernel", "perturb_kernel", "restore_kernel", "sgd_kernel")
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
    """{(kernel instantiation, arch): (registers, spill store bytes, spill load bytes)} from `nvcc -Xptxas -v`
    output, e.g. ("perturb_kernel<bf16,false,true>", "sm_90")."""
    found = {}
    pattern = re.compile(
        r"Compiling entry function '(\S+)' for '(sm_\d+)'.*?(\d+) bytes spill stores, (\d+) bytes spill loads"
        r".*?Used (\d+) registers", re.DOTALL)
    for m in pattern.finditer(output):
        found[(sass.short_name(m.group(1)), m.group(2))] = (int(m.group(5)), int(m.group(3)), int(m.group(4)))
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
    assert {(k.split("<")[0], a) for k, a in report} == {(k, a) for k in KERNELS for a in ("sm_80", "sm_90")}, \
        sorted(report)
    assert len(report) == 2 * (2 + 3 * 7), sorted(report)  # philox, noise; per dtype 4 perturb_, partials, restore, sgd
    spills = {key: v for key, v in report.items() if v[1] or v[2]}
    assert not spills, f"register spills (registers, store bytes, load bytes): {spills}"


def _ptx(nvcc, tmp_path, *flags) -> str:
    out = tmp_path / "kernels.ptx"
    run = subprocess.run([nvcc, "-ptx", str(CUDA_DIR / "cuda_kernels.cu"), "-o", str(out), "-arch=sm_90", *flags],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    return out.read_text()


@pytest.mark.slow
def test_cuda_ptx_rounds_as_the_cpu_does(tmp_path):
    """IEEE division and square root, no flush to zero, and no multiply-add contracted beyond the header's
    explicit fmaf: the arithmetic the emulated and C++ CPU builds execute. The one exception, the noise's square
    root (sqrtf's own fast path, next test), is in every kernel that draws normals."""
    nvcc = C.find_nvcc()
    requires(nvcc is not None, "nvcc was not found (no CUDA toolkit)", "cuda-build")
    ours, sqrt_blocks = without_noise_sqrt(_ptx(nvcc, tmp_path, *C.NVCC_FLAGS))
    assert sqrt_blocks >= 2 * len(KERNELS), sqrt_blocks
    assert not approximate(instructions(ours)), approximate(instructions(ours))
    contracted = _ptx(nvcc, tmp_path, *[f for f in C.NVCC_FLAGS if f != "--fmad=false"], "--fmad=true")
    explicit = ours.count("fma.rn.f32")
    assert 0 < explicit < contracted.count("fma.rn.f32")  # the check sees contraction where it happens


SQRT_PROBE = r"""
#include "rwp_common.h"
__global__ void ieee(const float* x, float* y) { y[threadIdx.x] = sqrtf(x[threadIdx.x]); }
__global__ void noise(const float* x, float* y) { y[threadIdx.x] = rwp::vsqrt(x[threadIdx.x]); }
"""
LARGEST_RADIUS_SQUARED = 34.66  # -2 ln u for the smallest uniform, 2^-25


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["80", "90"])
def test_cuda_noise_sqrt_is_sqrtf_fast_path(tmp_path, arch):
    """The kernels' square root of -2 ln u (csrc/rwp_common.h ``vsqrt`` on the GPU) computes what nvcc's
    correctly rounded sqrtf computes on its fast path, instruction for instruction (read from the SASS), and
    sqrtf takes that path for every such value: its range check admits 2^-100 ... 34.66, and a zero is kept by
    the max(x, 2^-100) in front of the approximation (x * rsq(2^-100) is then x)."""
    nvcc, tool = C.find_nvcc(), gpu_model.cuobjdump()
    requires(nvcc is not None and tool is not None, "nvcc or cuobjdump was not found (no CUDA toolkit)",
             "cuda-build")
    (tmp_path / "probe.cu").write_text(SQRT_PROBE)
    cubin = tmp_path / "probe.cubin"
    build = subprocess.run([nvcc, "-cubin", f"-arch=sm_{arch}", *C.NVCC_FLAGS, "-I", str(C.source_dir()),
                            str(tmp_path / "probe.cu"), "-o", str(cubin)], capture_output=True, text=True,
                           timeout=300)
    assert build.returncode == 0, build.stdout + build.stderr
    listing = subprocess.run([tool, "-sass", str(cubin)], capture_output=True, text=True, timeout=60).stdout
    funcs = sass.parse_sass(listing)
    ieee, ours = (next(instrs for name, instrs in funcs.items() if f"{n}P" in name) for n in ("ieee", "noise"))
    end = next(i.addr for i in ours if i.base == "EXIT")
    assert not [i for i in ours if i.base in ("BRA", "CALL") and i.addr < end], "a branch in vsqrt"
    # sqrtf's range check: bits(x) - low, unsigned, above `span` goes to the slow path
    low = -int(next(m[0] for i in ieee if i.base == "IADD3" and (m := re.search(r"-0x[0-9a-f]+", i.operands))), 16)
    span = int(re.search(r"0x[0-9a-f]+", next(i for i in ieee if i.opcode == "ISETP.GT.U32.AND").operands)[0], 16)
    smallest, largest = torch.tensor([2.0**-100, LARGEST_RADIUS_SQUARED]).view(torch.int32).tolist()
    assert low <= smallest and largest <= low + span, (hex(low), hex(span))
    expected = stored_value(ieee).replace("rsq(x)", "rsq(max(x, 7.8886090522101180541e-31))")  # 2^-100
    assert "FFMA" in expected and stored_value(ours) == expected


@pytest.fixture(scope="module")
def cuda_extension():
    requires(torch.version.cuda is not None, f"torch {torch.__version__} is not a CUDA build", "cuda-build")
    requires(C.find_nvcc() is not None, "nvcc was not found (no CUDA toolkit)", "cuda-build")
    require_backend("cpu", "cpu")
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


def test_cuda_normals_equal_the_cpu_backend_bitwise(gpu):
    """The GPU runs the CPU's code (rwp_common.h, no contraction): the same bits as the CPU backend."""
    for offset, numel in ((0, 1 << 20), (3, 1001), (4 * 2**32 - 6, 77)):
        args = dict(seed=20240611, param_index=5, step=7, stream=3, offset=offset)
        z = noise(numel, **args, device=gpu, backend="cuda").cpu()
        assert torch.equal(z, noise(numel, **args, backend="cpu"))
