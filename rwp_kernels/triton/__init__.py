"""The Triton backend: every op in one launch per (device, dtype) group, see ``docs/triton.md``.

One file per op (its kernels and host launcher), ``philox.py`` for the noise stream's device functions,
``tables.py`` for the cached address tables and the tile choice, ``aot.py`` for the ahead-of-time
compilation check. The kernels run on CUDA tensors, or on CPU tensors in Triton's interpreter when
TRITON_INTERPRET=1 was set before this package was imported.
"""
from triton.runtime.interpreter import InterpretedFunction

from .noise import noise, philox4x32_10
from .perturb import perturb_, perturb_kernel
from .restore import restore_
from .sgd_step import sgd_step_

NAME = "triton"

# True when the kernels were created by Triton's interpreter (they then run on CPU tensors only).
INTERPRETED = isinstance(perturb_kernel, InterpretedFunction)

__all__ = ["NAME", "INTERPRETED", "noise", "perturb_", "philox4x32_10", "restore_", "sgd_step_"]
