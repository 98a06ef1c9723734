"""The extension's build path: cache reuse, failures that fall back to the reference with one warning,
locks, the CUDA toolkit behind a wrapper nvcc, architectures, and setup.py's ahead-of-time build.

Builds that must fail run in child processes with a temporary TORCH_EXTENSIONS_DIR and a broken
compiler, so they fail within seconds; the one real extra build is setup.py's (CPU kernels only).
"""
import fcntl
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _ext_common import CHILD_TIMEOUT, FALLBACK_CHILD, REPO, folder_for, run_child
from conftest import require_backend, requires
from rwp_kernels import _ext_config as C
from rwp_kernels import extension

pytestmark = pytest.mark.slow  # builds, compiles, subprocesses or torchrun: see README, Tests

@pytest.fixture(scope="module")
def built():
    """The extension this session uses (built once, here or by an earlier test)."""
    require_backend("cpu", "cpu")
    return extension.load()


def test_second_process_reuses_the_build(built):
    lib = Path(built.library)
    mtime = lib.stat().st_mtime_ns
    out = run_child("""
        import torch, rwp_kernels
        from rwp_kernels import extension
        ext = extension.load()
        rwp_kernels.perturb_([torch.ones(3, 4)], gamma=0.1, seed=1, step=1, backend="cpu")
        print(ext.origin, "|", ext.library)
    """, {})
    assert out.returncode == 0, out.stderr
    assert "compiling" not in out.stderr
    origin, path = (part.strip() for part in out.stdout.split("|"))
    assert origin in ("cached build", "ahead-of-time build")
    assert path == str(lib) and lib.stat().st_mtime_ns == mtime


def test_import_alone_builds_nothing(tmp_path):
    out = run_child("""
        import rwp_kernels, rwp_kernels.backends, rwp_kernels.extension as e
        print(e.loaded())
    """, {"TORCH_EXTENSIONS_DIR": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "None" and not any(tmp_path.iterdir())




def fallback_env(tmp_path, cxx):
    return {"TORCH_EXTENSIONS_DIR": str(tmp_path / "ext"), "CXX": cxx, "RWP_KERNELS_BUILD_CUDA": "0"}


def test_failing_compiler_gives_one_warning_with_the_log_and_the_reference(tmp_path, monkeypatch):
    env = fallback_env(tmp_path, shutil.which("false") or "/bin/false")
    folder = folder_for(monkeypatch, env)
    folder.mkdir(parents=True)
    (folder / "lock").write_text("")  # left behind by a killed build (older torch: the file is the lock)
    (folder / "rwp_build.lock").write_text("")  # ours, unlocked: its holder is gone
    out = run_child(FALLBACK_CHILD, env, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert len(result["warnings"]) == 1, result["warnings"]
    warning = result["warnings"][0]
    log = folder / "build.log"
    assert warning.startswith("RuntimeWarning") and "reference" in warning and str(log) in warning
    assert log.is_file() and log.stat().st_size > 0
    assert result["same_as_reference"] is True
    assert str(log) in result["explicit"] and str(log) in result["reason"]
    assert "compiling the C++ extension" in out.stderr and "failed" in out.stderr


def test_missing_compiler_is_reported_without_building(tmp_path):
    out = run_child(FALLBACK_CHILD, fallback_env(tmp_path, str(tmp_path / "no-such-c++")), timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert len(result["warnings"]) == 1 and "no C++ compiler" in result["warnings"][0]
    assert result["same_as_reference"] is True and "no-such-c++" in result["reason"]
    assert "compiling" not in out.stderr


def test_a_build_held_by_another_process_is_waited_for_with_a_limit(tmp_path, monkeypatch):
    env = fallback_env(tmp_path, shutil.which("false") or "/bin/false")
    folder = folder_for(monkeypatch, env)
    folder.mkdir(parents=True)
    with open(folder / "rwp_build.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        out = run_child(FALLBACK_CHILD, {**env, "RWP_KERNELS_BUILD_TIMEOUT": "1"}, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert "gave up waiting" in result["reason"] and result["same_as_reference"] is True
    assert "waiting for another process" in out.stderr


def test_force_clears_the_previous_build_so_that_ninja_compiles_again(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    cfg = C.make_config(emulated=True)
    folder = extension.build_dir(cfg)
    folder.mkdir(parents=True)
    old = ["binding.o", "build.ninja", ".ninja_log", ".ninja_deps", f"{cfg.name}{extension.LIB_SUFFIX}"]
    for name in [*old, "build.log"]:
        (folder / name).write_text("from an earlier build")
    seen = []
    monkeypatch.setattr(extension, "_compile_in_child", lambda cfg, fd: seen.append(sorted(os.listdir(folder))) or 1.0)
    assert extension._build_locked(cfg, rebuild=True) == 1.0
    assert not set(old) & set(seen[0]), seen
    assert "build.log" in seen[0]


# ---- toolchain detection ---------------------------------------------------------------------------------

def write_script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def test_cuda_home_is_the_toolkit_behind_a_wrapper_nvcc(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    (tmp_path / "bin").mkdir()
    wrapper = write_script(tmp_path / "bin" / "nvcc", 'echo "#\\$ _HERE_=/opt/toolkits/cuda-42.1/bin"\necho "#\\$ _THERE_=/opt/x"\n')
    monkeypatch.setenv("PATH", f"{wrapper.parent}{os.pathsep}{os.environ['PATH']}")
    assert C.find_nvcc() == str(wrapper)
    assert C.find_cuda_home(C.find_nvcc()) == "/opt/toolkits/cuda-42.1"
    monkeypatch.setenv("CUDA_HOME", "/somewhere/cuda")
    assert C.find_cuda_home(str(wrapper)) == "/somewhere/cuda"


def test_real_toolkit_found_from_the_nvcc_on_the_path(monkeypatch):
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    nvcc = C.find_nvcc()
    requires(nvcc is not None, "nvcc is not on the PATH", "cuda-build")
    home = Path(C.find_cuda_home(nvcc))
    assert (home / "include" / "cuda_runtime_api.h").is_file(), home
    assert any((home / lib).is_dir() for lib in ("lib64", "lib")), home


def test_cuda_architectures(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    archs, source = C.cuda_archs()
    assert archs == ["8.0", "9.0"] and "without a local GPU" in source
    flags = C.gencode_flags(archs)
    assert "-gencode=arch=compute_80,code=sm_80" in flags and "-gencode=arch=compute_90,code=sm_90" in flags
    assert "-gencode=arch=compute_90,code=compute_90" in flags  # PTX for newer GPUs
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.6;9.0+PTX")
    assert C.cuda_archs() == (["8.6", "9.0+PTX"], "TORCH_CUDA_ARCH_LIST")
    if C.cuda_unavailable_reason(C.find_nvcc()) is None:
        cfg = C.make_config()
        assert not any("arch" in f for f in cfg.cuda_cflags)  # torch turns the variable into flags itself
        monkeypatch.delenv("TORCH_CUDA_ARCH_LIST")
        assert C.make_config().name != cfg.name


def test_cpu_only_build_when_asked(monkeypatch):
    monkeypatch.setenv("RWP_KERNELS_BUILD_CUDA", "0")
    cfg = C.make_config()
    assert not cfg.with_cuda and cfg.why_no_cuda == "RWP_KERNELS_BUILD_CUDA=0"
    assert not any(s.endswith(".cu") for s in cfg.sources) and "-DRWP_WITH_CUDA" not in cfg.cflags


def test_ninja_found_next_to_the_interpreter(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    assert C.tool_path().split(os.pathsep)[0] == str(Path(sys.executable).parent)


# ---- setup.py ----------------------------------------------------------------------------------------------

def test_setup_py_imports_torch_only_for_the_ahead_of_time_build():
    out = run_child("""
        import sys, runpy
        sys.argv = ["setup.py", "--name"]
        runpy.run_path("setup.py", run_name="__main__")
        print("torch imported:", "torch" in sys.modules)
    """, {"RWP_KERNELS_BUILD_EXT": None})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("torch imported: False")


def test_setup_py_ahead_of_time_build_is_loaded_first(tmp_path):
    requires(shutil.which(C.cxx_compiler()) is not None, "no C++ compiler", "cpp-ext")
    src = tmp_path / "src"
    for name in ("rwp_kernels", "python_api", "csrc"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.so", C.AOT_STAMP))
    for name in ("setup.py", "README.md", "pyproject.toml"):
        shutil.copy(REPO / name, src / name)
    env = {"RWP_KERNELS_BUILD_EXT": "1", "RWP_KERNELS_BUILD_CUDA": "0", "TORCH_EXTENSIONS_DIR": str(tmp_path / "jit")}
    build = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=src, capture_output=True,
                           text=True, timeout=CHILD_TIMEOUT, env={**os.environ, **env})
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    assert list((src / "rwp_kernels").glob("_C*.so")) and (src / "rwp_kernels" / C.AOT_STAMP).is_file()
    out = run_child("""
        import torch, rwp_kernels
        from rwp_kernels import extension
        ext = extension.load()
        p = [torch.ones(3, 4)]
        s = rwp_kernels.perturb_(p, gamma=0.1, seed=1, step=1, backend="cpu")
        print(ext.origin, "|", ext.library)
    """, env, cwd=src)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ahead-of-time build | " + str(src / "rwp_kernels")), out.stdout
    assert not (tmp_path / "jit").exists()  # nothing compiled on the fly


def test_cpu_kernels_share_torchs_openmp_runtime(built):
    """at::parallel_for is compiled into the extension: it must be an OpenMP build on torch's runtime."""
    if not torch.backends.openmp.is_available():
        pytest.skip("torch does not use OpenMP here (its thread pool needs no compile flags)")
    binary = Path(built.library).read_bytes()
    assert b"GOMP_parallel" in binary and b"libgomp" in binary  # OpenMP regions, linked to libgomp
    loaded = {line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines() if "libgomp" in line}
    assert len(loaded) == 1, loaded  # the extension's OpenMP runtime is torch's, not a second one
