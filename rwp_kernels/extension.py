"""The C++/CUDA extension: loaded from an ahead-of-time build, or compiled on first use and cached.

``load()`` returns the loaded library's facts or raises ``ExtensionUnavailable`` with a reason that
names the build log. It never crashes an import: nothing happens until a backend needs the kernels.

The first use compiles with torch.utils.cpp_extension.load and ninja, in a child process whose output
goes to ``build.log`` in the build folder, and prints one line saying so and how long it took. The
folder lives in the torch extensions cache (``TORCH_EXTENSIONS_DIR``) and its name carries a hash of
the sources, flags and toolchain, so later processes load the cached library without compiling, and a
changed source never loads a stale build. Concurrent first uses wait for one build (a kernel file lock that
the compile inherits, so it is held until the compile ends, even when the builder is killed;
``RWP_KERNELS_BUILD_TIMEOUT`` seconds at most, default 1800). A cache folder that cannot be created or
written makes the extension unavailable, with the folder and the error as the reason.

torch.utils.cpp_extension.load (run in the child) writes the ninja file, compiles, links and loads. What it
does not do is done here: loading a finished build (``built.json``, written after the compile) without its
lock, ninja or a child, so a read-only cache works and a half-written library is never loaded; a lock that
a killed builder holds exactly as long as its compile runs (torch's lock file then stays forever; newer
torch's flock is freed at once, while ninja compiles on); one outcome per process, the fallback warning with
the first compiler error, and setup.py's build first.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from . import _ext_config as C
from .backends import BackendUnavailableError

LIB_SUFFIX = ".pyd" if sys.platform == "win32" else ".so"


class ExtensionUnavailable(BackendUnavailableError):
    """The extension cannot be used here; the message says why (and where the build log is)."""


@dataclass(frozen=True)
class Extension:
    library: str  # path of the loaded shared library
    origin: str  # "ahead-of-time build", "cached build" or "compiled now"
    with_cuda: bool
    why_no_cuda: str | None
    build_seconds: float | None = None


_outcomes: dict[bool, Extension | ExtensionUnavailable] = {}  # by `emulated`
_outcome_lock = threading.Lock()


def build_dir(cfg: C.Config) -> Path:
    return C.extensions_root() / cfg.name


def log_path(cfg: C.Config) -> Path:
    return build_dir(cfg) / "build.log"


def library_path(cfg: C.Config) -> Path:
    return build_dir(cfg) / f"{cfg.name}{LIB_SUFFIX}"


def _stamp_path(cfg: C.Config) -> Path:
    return build_dir(cfg) / "built.json"


def load(*, rebuild: bool = False, emulated: bool = False) -> Extension:
    """The loaded extension (building it first if needed); the outcome is remembered for the process.
    ``emulated``: the library of backend "cuda-emu" (the CUDA kernels run on the CPU) instead."""
    with _outcome_lock:
        outcome = _outcomes.get(emulated)
        if rebuild and isinstance(outcome, Extension):
            raise RuntimeError("the extension is already loaded in this process; rebuild it in a new process")
        if outcome is None or rebuild:
            try:
                outcome = _load(rebuild, emulated)
            except ExtensionUnavailable as err:
                outcome = err
            _outcomes[emulated] = outcome
    if isinstance(outcome, ExtensionUnavailable):
        raise ExtensionUnavailable(str(outcome))
    return outcome


def backend(emulated: bool = False):
    """(the backend over the extension, the loaded extension); compiles it on first use."""
    ext = load(emulated=emulated)
    from . import ext_backend

    return ext_backend.ops_backend(emulated), ext


def loaded(emulated: bool = False) -> Extension | None:
    """The extension if this process has loaded it, else None (never builds)."""
    outcome = _outcomes.get(emulated)
    return outcome if isinstance(outcome, Extension) else None


def _has_cuda_kernels() -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key("rwp_kernels::perturb_", "CUDA")


def _loaded(path: Path, origin: str, cfg: C.Config, seconds: float | None = None) -> Extension:
    try:
        torch.ops.load_library(str(path))
    except OSError as err:
        raise ExtensionUnavailable(f"the extension {path} does not load: {err}") from None
    with_cuda = not cfg.emulated and _has_cuda_kernels()
    why = None
    if not with_cuda and not cfg.emulated:
        why = cfg.why_no_cuda if origin != "ahead-of-time build" else "the ahead-of-time build has no CUDA kernels"
        why = f"the extension was compiled without CUDA kernels ({why})"
    return Extension(str(path), origin, with_cuda, why, seconds)


def _ahead_of_time_library() -> Path | None:
    """rwp_kernels/_C*.so from setup.py's ahead-of-time build, if it was built for this torch."""
    found = sorted(C.PACKAGE_DIR.glob(f"_C*{LIB_SUFFIX}"))
    stamp = C.PACKAGE_DIR / C.AOT_STAMP
    if not found or not stamp.is_file():
        return None
    built_for = json.loads(stamp.read_text()).get("torch")
    if built_for != torch.__version__:
        print(
            f"rwp_kernels: ignoring the ahead-of-time built extension {found[0]} (built for torch {built_for}, "
            f"this is torch {torch.__version__}); compiling it for this installation",
            file=sys.stderr,
        )
        return None
    return found[0]


def _load(rebuild: bool, emulated: bool) -> Extension:
    cfg = C.make_config(emulated)
    aot = None if rebuild or emulated else _ahead_of_time_library()
    if aot is not None:
        try:
            return _loaded(aot, "ahead-of-time build", cfg)
        except ExtensionUnavailable as err:
            print(f"rwp_kernels: {err}; compiling the extension for this installation instead", file=sys.stderr)
    try:
        return _load_cached_or_build(cfg, rebuild)
    except OSError as err:  # the cache folder cannot be created, locked or written (or the compiler not started)
        raise ExtensionUnavailable(f"cannot build the extension in {build_dir(cfg)}: {err}") from None


def _load_cached_or_build(cfg: C.Config, rebuild: bool) -> Extension:
    if not rebuild and _is_built(cfg):
        return _loaded(library_path(cfg), "cached build", cfg)
    _check_toolchain()
    seconds = _build_locked(cfg, rebuild)
    return _loaded(library_path(cfg), "compiled now" if seconds is not None else "cached build", cfg, seconds)


def _is_built(cfg: C.Config) -> bool:
    return _stamp_path(cfg).is_file() and library_path(cfg).is_file()


def _check_toolchain() -> None:
    cxx = C.cxx_compiler()
    if shutil.which(cxx) is None:
        raise ExtensionUnavailable(f"no C++ compiler: {cxx!r} was not found (install g++, or set CXX)")
    if shutil.which("ninja", path=C.tool_path()) is None:
        raise ExtensionUnavailable("ninja was not found (pip install ninja)")


def _lock_timeout() -> float:
    value = os.environ.get("RWP_KERNELS_BUILD_TIMEOUT", "1800")
    try:
        return float(value)
    except ValueError:
        raise ExtensionUnavailable(f"RWP_KERNELS_BUILD_TIMEOUT must be a number of seconds, got {value!r}") from None


def _build_locked(cfg: C.Config, rebuild: bool) -> float | None:
    """Builds under the folder's lock; None if another process finished the build meanwhile."""
    folder = build_dir(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    with _build_lock(folder) as lock_fd:
        if not rebuild and _is_built(cfg):
            return None
        # torch's own lock, left by a killed compile under a torch whose lock is the file's existence. Nothing
        # compiles here while we hold ours, so it is stale.
        (folder / "lock").unlink(missing_ok=True)
        _stamp_path(cfg).unlink(missing_ok=True)
        if rebuild:  # ninja would find everything up to date and compile nothing
            for path in folder.iterdir():
                if path.suffix in (".o", LIB_SUFFIX) or path.name in ("build.ninja", ".ninja_log", ".ninja_deps"):
                    path.unlink()
        seconds = _compile_in_child(cfg, lock_fd)
        _stamp_path(cfg).write_text(json.dumps({"seconds": round(seconds, 1), "config": cfg.__dict__}, indent=1))
        return seconds


@contextmanager
def _build_lock(folder: Path):
    """Holds the flock of the folder's rwp_build.lock; yields the locked file descriptor.

    A flock belongs to the open file, not to a process: it is released when the last process holding the
    descriptor exits. The compile inherits it (see _compile_in_child), so a builder that is killed leaves
    the lock held until its compiler has finished, and the next builder waits instead of compiling beside it.
    This process only closes its descriptor, never unlocks (LOCK_UN would release the lock for the inherited
    copies too, as a lock library's release does).
    """
    fd = os.open(folder / "rwp_build.lock", os.O_RDONLY | os.O_CREAT, 0o666)
    try:
        _wait_for_lock(fd, folder)
        yield fd
    finally:
        os.close(fd)


def _wait_for_lock(fd: int, folder: Path) -> None:
    timeout = _lock_timeout()
    start = time.monotonic()
    announced = False
    while not _try_lock(fd):
        waited = time.monotonic() - start
        if waited >= min(timeout, 5.0) and not announced:  # a short wait needs no message
            print(f"rwp_kernels: waiting for another process that is building the extension in {folder} ...",
                  file=sys.stderr, flush=True)
            announced = True
        if waited >= timeout:
            raise ExtensionUnavailable(
                f"another process has been building the extension in {folder} for more than {timeout:.0f} s "
                "(RWP_KERNELS_BUILD_TIMEOUT); gave up waiting"
            )
        time.sleep(0.1)


def _try_lock(fd: int) -> bool:
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _compile_in_child(cfg: C.Config, lock_fd: int) -> float:
    """Compiles in a child process (clean output, complete log); returns the seconds it took.

    The child's stdin is the locked build lock: ninja inherits stdin from it, so the lock stays held while
    the child or its ninja runs, whatever happens to this process. (ninja gives the compilers /dev/null.)
    """
    log = log_path(cfg)
    env = dict(os.environ, PATH=C.tool_path())
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(C.PACKAGE_DIR.parent), env.get("PYTHONPATH")]))
    if cfg.cuda_home:
        env["CUDA_HOME"] = cfg.cuda_home
    what = "CPU and CUDA kernels" if cfg.with_cuda else "CPU kernels"
    if cfg.emulated:
        what = "CUDA kernels emulated on the CPU, for testing"
    print(f"rwp_kernels: compiling the C++ extension ({what}) in {build_dir(cfg)}; once per installation, "
          "this takes a few minutes ...", end="", file=sys.stderr, flush=True)
    start = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.run(
            [sys.executable, "-m", "rwp_kernels.build", "--compile-only", "--name", cfg.name,
             *(["--emulated"] if cfg.emulated else [])],
            stdout=out, stderr=subprocess.STDOUT, stdin=lock_fd, env=env,
        )
    seconds = time.monotonic() - start
    if proc.returncode != 0:
        print(f" failed after {seconds:.0f} s", file=sys.stderr, flush=True)
        raise ExtensionUnavailable(f"compiling the C++ extension failed{_first_error(log)}; see the build log {log}")
    print(f" done in {seconds:.0f} s", file=sys.stderr, flush=True)
    return seconds


def _first_error(log: Path) -> str:
    """The log's first compiler error, else its last line (the build's exception), as " (...)"."""
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    errors = [line for line in lines if re.search(r"\berror\b:|\bFAILED:", line)]
    summary = errors[0] if errors else (lines[-1] if lines else "")
    return f" ({summary[:300]})" if summary else ""


def compile_here(cfg: C.Config) -> None:
    """The build itself (run in the child process): torch.utils.cpp_extension.load with ninja."""
    cpp = C.cpp_extension(cfg.cuda_home)
    cpp.load(
        name=cfg.name,
        sources=cfg.sources,
        extra_cflags=cfg.cflags,
        extra_cuda_cflags=cfg.cuda_cflags,
        extra_ldflags=cfg.ldflags,
        build_directory=str(build_dir(cfg)),
        with_cuda=cfg.with_cuda,
        is_python_module=False,
        verbose=True,
    )


def facts() -> dict[str, str]:
    """What the report shows about the extension (without building it)."""
    cfg = C.make_config()
    cxx = C.cxx_compiler()
    out = {"C++ compiler": f"{cxx} ({shutil.which(cxx) or 'not found'})"}
    out["nvcc"] = f"{cfg.nvcc} (CUDA {C.nvcc_version(cfg.nvcc)})" if cfg.nvcc else "not found"
    out["CUDA_HOME"] = cfg.cuda_home or "-"
    if cfg.with_cuda:
        out["CUDA kernels"] = f"compiled for {', '.join('sm_' + a.replace('.', '') for a in cfg.archs)} ({cfg.archs_from})"
    else:
        out["CUDA kernels"] = f"not compiled: {cfg.why_no_cuda}"
    out["build folder"] = str(build_dir(cfg))
    # os.path.isfile: False, not an error, where the cache folder cannot be read
    out["build log"] = str(log_path(cfg)) if os.path.isfile(log_path(cfg)) else "none (nothing compiled here yet)"
    ext = loaded()
    if ext is not None:
        kind = "with CUDA kernels" if ext.with_cuda else "CPU kernels only"
        out["extension"] = f"loaded: {ext.library} ({ext.origin}, {kind})"
    elif isinstance(_outcomes.get(False), ExtensionUnavailable):
        out["extension"] = f"unavailable: {_outcomes[False]}"
    elif os.path.isfile(library_path(cfg)):
        out["extension"] = "built, not loaded in this process"
    else:
        out["extension"] = "not built yet (the first use of backend 'cpu'/'cuda' compiles it)"
    return out
