"""rwp-kernels: fused kernels for Random Weight Perturbation (RWP) training.

The functional ops below act on whole lists of tensors at once; ``rwp_kernels.optim`` builds drop-in
optimizers on them.
"""
from . import _source_tree
from ._version import __version__
from .backends import BackendUnavailableError, available_backends
from .ops import noise, perturb_, philox4x32_10, restore_, sgd_step_

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
