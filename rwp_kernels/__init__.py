"""rwp-kernels: fused kernels for Random Weight Perturbation (RWP) training.

The functional ops below act on whole lists of tensors at once; ``rwp_kernels.optim`` builds drop-in
optimizers on them.
"""
import sys

try:
    import torch  # noqa: F401
except ModuleNotFoundError as err:  # a Python the package was not installed into: say which one, and what to do
    if err.name != "torch":
        raise
    from pathlib import Path

    _venv = Path(__file__).resolve().parents[1] / ".venv"  # the README's environment, in this checkout
    raise ModuleNotFoundError(
        f"rwp_kernels needs PyTorch, and this Python ({sys.executable}) has none. Install the package into it "
        "(from the clone's root: pip install \".[train]\", which brings PyTorch), or run the Python of the "
        "environment it went into (README, Install: python3 -m venv .venv && . .venv/bin/activate)."
        + (f" This checkout has one, {_venv}: in a new shell, activate it again (. {_venv}/bin/activate)."
           if (_venv / "bin" / "python").exists() else ""),
        name="torch") from err

from . import _source_tree  # noqa: E402
from ._version import __version__  # noqa: E402
from .backends import BackendUnavailableError, available_backends  # noqa: E402
from .ops import noise, perturb_, philox4x32_10, restore_, sgd_step_  # noqa: E402

__all__ = [
    "__version__",
    "BackendUnavailableError",
    "available_backends",
    "noise",
    "perturb_",
    "philox4x32_10",
    "restore_",
    "sgd_step_",
]

_source_tree.install()
