"""How the C++/CUDA extension is compiled here: sources, flags, CUDA toolkit, architectures, cache key.

Shared by the on-the-fly build (``rwp_kernels.extension``) and setup.py's ahead-of-time build, which
loads this file by path: it imports only the standard library and torch, never the rest of the package.

Environment variables (all optional):
  RWP_KERNELS_BUILD_CUDA   "0" builds the CPU kernels only, even where CUDA could be compiled
  RWP_KERNELS_MARCH        the -march value of the CPU kernels (default "native": the building machine)
  RWP_KERNELS_SANITIZE     a -fsanitize= value for the host code, e.g. "address" (the tests run backend
                           "cuda-emu" under AddressSanitizer this way; the library then needs libasan preloaded)
  TORCH_CUDA_ARCH_LIST     CUDA architectures, e.g. "8.0;9.0" (default: the local GPUs, else 8.0 and 9.0)
  CUDA_HOME / CUDA_PATH    the CUDA toolkit (default: found from the nvcc on the PATH)
  CXX, MAX_JOBS            compiler and parallel jobs, as torch.utils.cpp_extension uses them
"""
import hashlib
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

PACKAGE_DIR = Path(__file__).resolve().parent
CPU_SOURCES = ("binding.cpp", "cpu/cpu_kernels.cpp")
CUDA_SOURCES = ("cuda/cuda_kernels.cu",)
EMULATED_SOURCES = ("emu/cuda_kernels_emu.cpp", "emu/simt_emu.cpp")  # added to CPU_SOURCES
SOURCE_SUFFIXES = (".h", ".cuh", ".cpp", ".cu")
DEFAULT_CUDA_ARCHS = ("8.0", "9.0")
CXX_FLAGS = ("-O3", "-ffp-contract=off", "-fno-math-errno")  # plus -march; no fusion: see csrc/rwp_common.h
NVCC_FLAGS = ("-O3", "--fmad=false", "-std=c++17")
NAME_PREFIX = "rwp_kernels_ext"
EMULATED_NAME_PREFIX = "rwp_kernels_emu"
AOT_STAMP = "_C_build.json"  # setup.py's ahead-of-time build: written next to rwp_kernels/_C*.so


def source_dir() -> Path:
    """csrc/ as shipped in a wheel (rwp_kernels/_csrc), else the source checkout's csrc/."""
    shipped = PACKAGE_DIR / "_csrc"
    return shipped if shipped.is_dir() else PACKAGE_DIR.parent / "csrc"


def cxx_compiler() -> str:
    return os.environ.get("CXX", "c++")


def find_nvcc() -> str | None:
    """The nvcc that will compile: CUDA_HOME's if set, else the one on the PATH."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home:
        candidate = Path(home) / "bin" / "nvcc"
        return str(candidate) if candidate.is_file() else None
    return shutil.which("nvcc")


def find_cuda_home(nvcc: str | None) -> str | None:
    """The real CUDA toolkit behind ``nvcc`` (which may be a wrapper script elsewhere).

    ``nvcc --dryrun`` prints ``#$ _HERE_=<toolkit>/bin``; torch's own guess (the parent of the nvcc on
    the PATH) is wrong for wrappers and makes the link step fail.
    """
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home:
        return home
    if nvcc is None:
        return None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            out = subprocess.run(
                [nvcc, "--dryrun", "-c", "probe.cu"], cwd=tmp, capture_output=True, text=True, timeout=60
            )
        match = re.search(r"^#\$ _HERE_=(.+)$", out.stdout + out.stderr, re.MULTILINE)
    except (OSError, subprocess.SubprocessError):
        match = None
    if match:
        return str(Path(match.group(1).strip()).parent)
    return str(Path(nvcc).resolve().parent.parent)


def nvcc_version(nvcc: str) -> str:
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as err:
        return f"unknown ({err})"
    match = re.search(r"release ([\d.]+)", out)
    return match.group(1) if match else "unknown"


def cuda_archs() -> tuple[list[str], str]:
    """The CUDA architectures to build, and where that choice comes from."""
    env = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if env:
        return env.replace(";", " ").split(), "TORCH_CUDA_ARCH_LIST"
    if torch.cuda.is_available():
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        return [f"{major}.{minor}" for major, minor in caps], "the local GPUs"
    return list(DEFAULT_CUDA_ARCHS), "the default without a local GPU"


def gencode_flags(archs: list[str]) -> list[str]:
    """nvcc flags: SASS for every arch, plus PTX of the newest one for later GPUs."""
    nums = [a.replace(".", "") for a in archs]
    flags = [f"-gencode=arch=compute_{n},code=sm_{n}" for n in nums]
    newest = max(nums, key=lambda n: int(re.sub(r"\D", "", n) or 0))
    return flags + [f"-gencode=arch=compute_{newest},code=compute_{newest}"]


def cuda_unavailable_reason(nvcc: str | None) -> str | None:
    """Why the CUDA kernels will not be compiled here, or None if they will."""
    if os.environ.get("RWP_KERNELS_BUILD_CUDA", "").strip() == "0":
        return "RWP_KERNELS_BUILD_CUDA=0"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is not a CUDA build"
    if nvcc is None:
        return "nvcc was not found (install the CUDA toolkit or set CUDA_HOME)"
    return None


def openmp_link_flags() -> list[str]:
    """Link the OpenMP runtime torch ships (whatever its file name), so the process has one runtime."""
    torch_lib = Path(torch.__file__).resolve().parent / "lib"
    shipped = sorted(torch_lib.glob("libgomp*.so*"))
    if shipped:
        return [str(shipped[0]), f"-Wl,-rpath,{torch_lib}"]
    return ["-fopenmp"]


def cpu_flags() -> list[str] | None:
    """The CPU's feature flags from /proc/cpuinfo (sorted), or None where it does not list them."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    match = re.search(r"^(flags|Features)\s*:(.*)$", text, re.MULTILINE)
    return sorted(match.group(2).split()) if match else None


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU's feature flags (a shared cache may serve other machines)."""
    flags = cpu_flags()
    if flags is not None:
        return platform.machine() + ":" + " ".join(flags)
    return platform.machine() + ":" + platform.processor()


@dataclass
class Config:
    with_cuda: bool
    why_no_cuda: str | None
    nvcc: str | None
    cuda_home: str | None
    archs: list[str]
    archs_from: str
    sources: list[str]
    cflags: list[str]
    cuda_cflags: list[str]
    ldflags: list[str]
    emulated: bool = False
    key: str = field(default="")

    @property
    def name(self) -> str:
        if self.emulated:
            return f"{EMULATED_NAME_PREFIX}_{self.key}"
        return f"{NAME_PREFIX}_{'cuda' if self.with_cuda else 'cpu'}_{self.key}"


def make_config(emulated: bool = False) -> Config:
    """The build of the extension; ``emulated``: the library of backend "cuda-emu" instead (the CUDA kernels
    compiled as host C++, ops ``torch.ops.rwp_kernels_emu``; no nvcc needed)."""
    src = source_dir()
    nvcc = None if emulated else find_nvcc()
    why_no_cuda = "it emulates the CUDA kernels on the CPU" if emulated else cuda_unavailable_reason(nvcc)
    with_cuda = why_no_cuda is None
    cuda_home = find_cuda_home(nvcc) if with_cuda else None
    archs, archs_from = cuda_archs() if with_cuda else ([], "")
    march = os.environ.get("RWP_KERNELS_MARCH", "native").strip() or "native"
    cflags = [*CXX_FLAGS, f"-march={march}"]
    ldflags = []
    if torch.backends.openmp.is_available():  # at::parallel_for is inline: without -fopenmp it runs on one thread
        cflags.append("-fopenmp")
        ldflags = openmp_link_flags()
    sanitize = os.environ.get("RWP_KERNELS_SANITIZE", "").strip()
    if sanitize:
        cflags += [f"-fsanitize={sanitize}", "-fno-omit-frame-pointer", "-g1"]
        ldflags = [*ldflags, f"-fsanitize={sanitize}"]
    cuda_cflags = []
    sources = [str(src / s) for s in CPU_SOURCES]
    if emulated:
        cflags.append("-DRWP_EMULATE_CUDA")
        sources += [str(src / s) for s in EMULATED_SOURCES]
    if with_cuda:
        cflags.append("-DRWP_WITH_CUDA")
        cuda_cflags = list(NVCC_FLAGS)
        if archs_from != "TORCH_CUDA_ARCH_LIST":  # otherwise torch turns the variable into flags itself
            cuda_cflags += gencode_flags(archs)
        sources += [str(src / s) for s in CUDA_SOURCES]
    cfg = Config(with_cuda, why_no_cuda, nvcc, cuda_home, archs, archs_from, sources, cflags, cuda_cflags, ldflags,
                 emulated)
    cfg.key = _key(cfg, src)
    return cfg


def _key(cfg: Config, src: Path) -> str:
    """Hash of everything the compiled library depends on; part of its name, so a cache never goes stale."""
    h = hashlib.sha256()
    for path in sorted(p for p in src.rglob("*") if p.suffix in SOURCE_SUFFIXES):
        h.update(str(path.relative_to(src)).encode() + b"\0" + path.read_bytes() + b"\0")
    facts = [
        torch.__version__, str(torch.version.cuda), sys.version, cxx_compiler(), _cpu_signature(),
        repr(cfg.cflags), repr(cfg.cuda_cflags), repr(cfg.ldflags), str(cfg.cuda_home), os.environ.get("TORCH_CUDA_ARCH_LIST", ""),
    ]
    h.update("\0".join(facts).encode())
    return h.hexdigest()[:12]


def cpp_extension(cuda_home: str | None = None):
    """torch.utils.cpp_extension, pointed at the real CUDA toolkit.

    torch guesses CUDA_HOME once, at import, and logs a warning on machines without a GPU; the guess is
    replaced here and that warning (about the guess, not about anything we use) is kept quiet.
    """
    quiet = logging.Filter()
    quiet.filter = lambda record: "No CUDA runtime is found" not in record.getMessage()
    log = logging.getLogger("torch.utils.cpp_extension")
    log.addFilter(quiet)
    try:
        import torch.utils.cpp_extension as module
    finally:
        log.removeFilter(quiet)
    if cuda_home is not None:
        module.CUDA_HOME = cuda_home
    return module


def extensions_root() -> Path:
    """Where torch.utils.cpp_extension keeps JIT builds: TORCH_EXTENSIONS_DIR, else its per-user cache."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return Path(root)
    accel = f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu"
    return Path(cpp_extension().get_default_build_root()) / f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}_{accel}"


def tool_path() -> str:
    """PATH with this interpreter's bin folder first: ninja from a virtual environment that is not activated."""
    bin_dir = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "")
    if bin_dir in path.split(os.pathsep):
        return path
    return os.pathsep.join([bin_dir, path]) if path else bin_dir
