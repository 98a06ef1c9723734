"""The official RWP code's optimizer side, transcribed: the yardstick of the benchmarks and the fidelity test.

A transcription of what the reference implementation does per step, with plain PyTorch ops (nblt/RWP
train_rwp_parallel.py for the noise and the mix, nblt/mARWP train_marwp.py for m-RWP/m-ARWP), kept in one
place so that the benchmarks time the same loop the fidelity test checks the optimizers against:

- ``perturb``: per parameter, in a Python loop, ``w += eps`` with ``eps`` of standard deviation
  ``gamma * ||row||`` per output filter (row norms, ``repeat`` to the weight's shape, ``torch.normal``) for a
  weight with two or more dimensions, and ``gamma * (||w|| + 1e-16)`` for a 1-D parameter (one ``.item()``,
  a host synchronization, per such parameter); m-ARWP divides the noise by
  ``sqrt(1 + eta * rowsum(F))``. The noise is kept for the restore.
- ``restore``: ``w.sub_(eps)`` (not exact: ``(w + eps) - eps`` may differ from ``w`` by a rounding).
- ``grad_vector`` / ``set_grad_vector``: the gradient mix ``alpha * g_perturbed + (1 - alpha) * g_clean``
  through flat vectors, as the official ``get_model_grad_vec`` / ``update_grad``.
- ``OfficialRWP``: the whole update around a torch optimizer: clean pass, perturb, perturbed pass with the
  BatchNorm momentum set to 0 (the official ``disable_running_stats``), the Fisher state
  ``F <- beta F + g_perturbed ** 2`` (m-ARWP), restore, mix, the base optimizer's step.

Two departures, neither of which changes a value: ``reshape`` where the official code has ``view`` (the same
values; ``view`` fails on channels_last weights), and an optional ``noise`` function that supplies the
standard normals ``z`` (``eps = std * z``) instead of torch's generator, so that a test can feed the noise
stream of the fused ops and compare the updates. This module is not used by the optimizers.
"""
import math
from typing import Callable, Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

# noise(param, index, step) -> standard normals shaped like param (float32 or param's dtype)
NoiseFn = Callable[[torch.Tensor, int, int], torch.Tensor]


def perturb(params: Sequence[torch.Tensor], gamma: float, *, noise: NoiseFn | None = None, step: int = 0,
            fisher: Sequence[torch.Tensor] | None = None, eta: float = 0.0) -> list[torch.Tensor]:
    """Adds the official noise to every parameter in place (in a loop) and returns the noise for ``restore``.

    ``noise``: where the standard normals come from (default: torch's generator, as the official code);
    called as ``noise(param, index, step)``. ``fisher``: m-ARWP's Fisher state, one tensor per parameter
    (None or empty: plain RWP noise).
    """
    added = []
    with torch.no_grad():
        for i, p in enumerate(params):
            shape = p.shape
            per_row = math.prod(shape[1:])  # 1 for a 1-D parameter
            if p.dim() > 1:
                std = gamma * p.reshape(shape[0], -1).norm(dim=1, keepdim=True).repeat(1, per_row).view(shape)
                eps = torch.normal(0, std) if noise is None else std * noise(p, i, step)
            else:
                std = gamma * (p.view(-1).norm().item() + 1e-16)
                eps = torch.empty_like(p).normal_(0, std) if noise is None else std * noise(p, i, step)
            if fisher:
                rowsum = fisher[i].reshape(shape[0], -1).sum(dim=1, keepdim=True).repeat(1, per_row).view(shape)
                eps /= torch.sqrt(1 + eta * rowsum)
            added.append(eps)
            p.add_(eps)
    return added


def restore(params: Sequence[torch.Tensor], added: Sequence[torch.Tensor]) -> None:
    """The official restore: ``w.sub_(eps)`` for every parameter."""
    with torch.no_grad():
        for p, eps in zip(params, added):
            p.sub_(eps)


def grad_vector(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """All gradients as one flat vector (the official ``get_model_grad_vec``)."""
    return torch.cat([p.grad.detach().reshape(-1) for p in params])


def set_grad_vector(params: Sequence[torch.Tensor], vector: torch.Tensor) -> None:
    """Writes a flat vector back into the gradients (the official ``update_grad``)."""
    offset = 0
    for p in params:
        p.grad.data = vector[offset:offset + p.numel()].reshape(p.grad.shape).clone()
        offset += p.numel()


def disable_running_stats(model: nn.Module) -> list[tuple[_BatchNorm, float | None]]:
    """The official ``disable_running_stats``: BatchNorm momentum 0; returns what ``enable_running_stats``
    needs to undo it."""
    saved = [(m, m.momentum) for m in model.modules() if isinstance(m, _BatchNorm)]
    for m, _ in saved:
        m.momentum = 0
    return saved


def enable_running_stats(saved: list[tuple[_BatchNorm, float | None]]) -> None:
    for m, momentum in saved:
        m.momentum = momentum


class OfficialRWP:
    """The official RWP / m-RWP / m-ARWP update of ``model`` around the torch optimizer ``base``.

    ``step(clean_pass, perturbed_pass)`` is one update; each pass is a callable that runs a forward and
    backward of the model (the official code runs them on two different batches). A pass given as None is not
    run and the gradients already in ``p.grad`` stand for it (to time the optimizer side alone).
    ``alpha == 1`` skips the clean pass and the mix.
    """

    def __init__(self, model: nn.Module, base: torch.optim.Optimizer, *, gamma: float, alpha: float = 0.5,
                 adaptive: bool = False, eta: float = 0.0, beta: float = 0.0, noise: NoiseFn | None = None):
        self.model, self.base = model, base
        self.params = list(model.parameters())
        self.gamma, self.alpha, self.adaptive, self.eta, self.beta = gamma, alpha, adaptive, eta, beta
        self.noise = noise
        self.fisher: list[torch.Tensor] = []
        self.step_count = 0

    def step(self, clean_pass: Callable[[], object] | None = None,
             perturbed_pass: Callable[[], object] | None = None) -> None:
        params = self.params
        g0 = None
        if self.alpha < 1:
            if clean_pass is not None:
                self.base.zero_grad()
                clean_pass()
            g0 = grad_vector(params)
        added = perturb(params, self.gamma, noise=self.noise, step=self.step_count, fisher=self.fisher, eta=self.eta)
        if perturbed_pass is not None:
            saved = disable_running_stats(self.model)
            self.base.zero_grad()
            perturbed_pass()
            enable_running_stats(saved)
        if self.adaptive:
            if not self.fisher:
                self.fisher = [0 for _ in params]
            self.fisher = [f * self.beta + p.grad.clone() ** 2 for f, p in zip(self.fisher, params)]
        restore(params, added)
        if g0 is not None:
            set_grad_vector(params, self.alpha * grad_vector(params) + (1 - self.alpha) * g0)
        self.base.step()
        self.step_count += 1
