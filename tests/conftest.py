"""Shared test helpers.

``requires(ok, reason, capability)`` skips a test whose prerequisite is missing (no GPU, no Triton,
no nvcc, ...), except where ``RWP_KERNELS_REQUIRE`` names the capability (comma-separated, or "all"):
then the missing prerequisite is a failure. CI sets it, so that checks meant to run there cannot
silently skip. ``require_backend(name, device_type)`` does that for a backend, with the capability CI
names for it (``BACKEND_CAPABILITY``); the fixtures ``cpp_ext`` and ``triton_interpreter`` require the C++
extension and the Triton backend on CPU tensors (Triton's interpreter).
"""
import os

import pytest
import torch

# Under pytest-xdist each worker takes its share of the CPUs for torch's intra-op threads, and through
# OMP_NUM_THREADS for the processes its tests start: with every worker running as many threads as there are
# CPUs, OpenMP's spinning threads made single tests up to 20 times slower.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, _cpus // _WORKERS)))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# The Triton backend runs on CPU tensors only in Triton's interpreter, which must be on before any kernel
# is created (at import); without a GPU it is the only way to run those kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from rwp_kernels import backends  # noqa: E402  (after TRITON_INTERPRET is set)

if os.environ.get("TRITON_INTERPRET") == "1":
    from _interpreter_speed import install  # noqa: E402

    install()

REQUIRED = {c.strip() for c in os.environ.get("RWP_KERNELS_REQUIRE", "").split(",") if c.strip()}


def requires(ok: bool, reason: str, capability: str) -> None:
    if ok:
        return
    if capability in REQUIRED or "all" in REQUIRED:
        pytest.fail(f"{capability} is required here (RWP_KERNELS_REQUIRE) but unavailable: {reason}")
    pytest.skip(reason)


@pytest.fixture
def cuda_device():
    requires(torch.cuda.is_available(), "no CUDA GPU on this machine", "gpu")
    return torch.device("cuda")


# The RWP_KERNELS_REQUIRE capability that makes a backend's absence on a device type a failure.
BACKEND_CAPABILITY = {
    ("cpu", "cpu"): "cpp-ext",
    ("triton", "cpu"): "triton-interpret",
    ("cuda-emu", "cpu"): "cuda-emu",
    ("cuda", "cuda"): "cuda-build",
    ("triton", "cuda"): "triton-gpu",
}


def require_backend(name: str, device_type: str) -> None:
    """Skip (or fail, where CI requires the capability) unless backend ``name`` runs on ``device_type``."""
    reason = backends.unavailable_reason(name, device_type)
    if name == "cpu" and device_type == "cpu":
        what = "the C++ extension is unavailable"
    else:
        what = f"backend {name!r} on {device_type} tensors is unavailable"
    requires(reason is None, f"{what}: {reason}", BACKEND_CAPABILITY.get((name, device_type), "gpu"))


@pytest.fixture
def cpp_ext():
    """The C++ extension (backend "cpu"), built on first use."""
    require_backend("cpu", "cpu")


@pytest.fixture
def triton_interpreter():
    """The Triton backend on CPU tensors (Triton's interpreter, TRITON_INTERPRET=1)."""
    require_backend("triton", "cpu")
