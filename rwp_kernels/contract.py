"""What a backend implements: five functions over validated, bundled arguments.

``rwp_kernels.ops`` checks the public arguments, builds these bundles once, splits a call where a backend
does not take every dtype (float64 goes to the reference backend: ``take``), and calls one backend
function per part. A backend never sees an invalid argument and never validates; it computes what
docs/spec.md section 4 says. Register a backend in ``backends.REGISTRY``; ``tests/test_contract.py``
checks that every registered backend implements the whole of ``Backend``; docs/internals.md has the
recipes for a new argument and a new backend.

Per-parameter arguments are lists in the order of ``params``; None stands for "absent for every
parameter", a None entry for "absent for this parameter" (only where the op allows it). ``plan`` holds
one ``rwp_kernels.layout.ParamPlan`` per parameter (rows, sigma layout, param_index), computed once by
ops.py. Multipliers (``grad_scale`` and the like) are Python floats or 0-d float32 tensors on the
parameters' device.
"""
from dataclasses import dataclass, replace
from typing import Protocol, runtime_checkable

import torch

from . import stream as S


def take(values: list | None, idx: list[int]) -> list | None:
    """The entries ``idx`` of a per-parameter list (None stays None)."""
    return None if values is None else [values[i] for i in idx]


@dataclass(frozen=True)
class NoiseKey:
    """Which noise: the seed, the noise stream id and the optimizer step. Per parameter, the counter adds
    its param_index and each element's offset (docs/spec.md section 3)."""

    seed: int
    stream: int
    step: int

    def words(self) -> tuple[int, int, int]:
        """(key word 0, key word 1, step word): the 32-bit words the kernels take."""
        k0, k1 = S.philox_key(self.seed, self.stream)
        return k0, k1, S.step_word(self.step)


@dataclass(frozen=True)
class GradMix:
    """The gradient mix that restore_ and sgd_step_ apply per element, from the gradient as it arrives:
    with ``fisher``, ``F <- beta F + (grad * fisher_scale)**2``; then ``grad * grad_scale + clean_grad *
    clean_scale`` (restore_ writes it back to grad; sgd_step_ steps with it)."""

    grads: list | None = None
    grad_scale: float | torch.Tensor = 1.0
    fisher: list | None = None
    beta: float = 0.0
    fisher_scale: float | torch.Tensor = 1.0
    clean_grads: list | None = None
    clean_scale: float | torch.Tensor = 0.0

    PER_PARAM = ("grads", "fisher", "clean_grads")

    def take(self, idx: list[int]) -> "GradMix":
        return replace(self, **{name: take(getattr(self, name), idx) for name in self.PER_PARAM})


@dataclass(frozen=True)
class SgdHyper:
    """torch.optim.SGD's hyperparameters for one sgd_step_ call; ``is_first_step``: the momentum buffer is
    set to the gradient (torch's first step) instead of updated."""

    lr: float
    momentum: float = 0.0
    dampening: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False
    maximize: bool = False
    is_first_step: bool = False


@runtime_checkable
class Backend(Protocol):
    """The functions of a backend module (its ``NAME`` names it in messages)."""

    NAME: str

    def philox4x32_10(self, counter: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """int64 [..., 4] words of the Philox4x32-10 blocks of int64 ``counter`` [..., 4] and ``key`` [..., 2]."""

    def noise(self, numel: int, *, key: NoiseKey, param_index: int, offset: int,
              device: torch.device) -> torch.Tensor:
        """float32 normals of elements offset .. offset + numel - 1 of one parameter's noise."""

    def perturb_(self, params: list, *, key: NoiseKey, plan: list, gammas: list, etas: list,
                 backups: list | None, grads: list | None, grad_scale, fisher: list | None) -> list:
        """Perturb in place; the float32 sigmas per parameter (docs/spec.md section 4)."""

    def restore_(self, params: list, *, key: NoiseKey | None, plan: list, backups: list | None,
                 sigmas: list | None, mix: GradMix) -> None:
        """Restore from ``backups``, or subtract the regenerated noise (``sigmas`` and ``key``); then ``mix``."""

    def sgd_step_(self, params: list, *, hyper: SgdHyper, plan: list, momentum_buffers: list | None,
                  backups: list | None, found_inf: torch.Tensor | None, mix: GradMix) -> None:
        """Optional restore from ``backups``; unless ``found_inf`` is nonzero, ``mix`` and SGD's update."""


# The backend functions, one per public op.
OPS = tuple(name for name in Backend.__dict__ if not name.startswith("_") and callable(Backend.__dict__[name]))
