"""Shared test helpers.

``requires(ok, reason, capability)`` skips a test whose prerequisite is missing (no GPU, no Triton,
no nvcc, ...), except where ``RWP_KERNELS_REQUIRE`` names the capability (comma-separated, or "all"):
then the missing prerequisite is a failure. CI sets it, so that checks meant to run there cannot
silently skip.
"""
import os

import pytest
import torch

# The Triton backend runs on CPU tensors only in Triton's interpreter, which must be on before any kernel
# is created (at import); without a GPU it is the only way to run those kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

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
