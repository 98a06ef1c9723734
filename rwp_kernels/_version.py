"""The package's version, and the dependency versions it supports and was tested with: setup.py reads the
floors from here, ``python -m rwp_kernels.report`` prints them, README.md states them (tests/test_package.py
keeps the three in agreement). This module imports nothing but ``re``."""
import re

__version__ = "0.1.0"

# The lowest torch on which the test suite passes (TESTED). Below it, measured on a CPU: torch 2.8 to 2.10
# fail only tests/test_integration_compile.py's torch.compiler.disable(opt.perturb) of a bound method (a
# TypeError inside torch, fixed in 2.11); 2.5 to 2.7 also the four-process ParallelRWP check with one
# perturbed rank (weights 1.4e-5 off the single-process computation, allowed 2e-6); 2.4 every op (its
# torch.autograd.graph.increment_version takes one tensor, the ops bump a list).
MIN_TORCH = "2.11"

# The Triton backend's floor (everything else runs without Triton): the Triton that torch 2.11 ships (and the
# GPU machines lent to this project have). Its kernels use tl.gather (3.3); Triton 3.6's compiler needs higher
# register caps for three kernels (triton/tables.py), its interpreter numpy < 2.4 (backends.py says so).
MIN_TRITON = "3.6"

# (torch, triton or None, what passed): on a CPU, the Triton kernels in Triton's interpreter; no GPU.
TESTED = (
    ("2.11.0", "3.6.0", "the whole suite, with numpy 2.3.5 (the versions of the GPU machines lent to the project)"),
    ("2.12.0", "3.7.0", 'fast tier (pytest -m "not slow"), the slow Triton-interpreter, torch.compile and '
                        "distributed tests"),
    ("2.14.1", "3.8.0", "the whole suite"),
)


def tested_versions() -> str:
    """TESTED in one line: 'torch 2.11.0, torch 2.12.0 + triton 3.7.0, ...'."""
    return ", ".join(f"torch {t}" + (f" + triton {tr}" if tr else "") for t, tr, _ in TESTED)


def release(version: str) -> tuple:
    """(major, minor, patch) of a version string such as "3.8.0", "3.7.0+git1234" or "3.9.0rc1"."""
    return tuple(int(re.match(r"\d*", piece)[0] or 0) for piece in version.split("+")[0].split(".")[:3])


def triton_3_6(version: str) -> bool:
    """A Triton below 3.7 (3.6, the floor): its compiler takes other register caps (triton/tables.py), its
    interpreter needs numpy < 2.4 (backends.py)."""
    return release(version) < (3, 7)
