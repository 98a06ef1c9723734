"""The part of an RWP optimizer's state that changes after ``__init__``, besides torch's ``state`` and
``param_groups``: one object, made in ``__init__`` and never reassigned.

Trainers wrap optimizers in objects that copy the optimizer's ``__dict__`` (Lightning's LightningOptimizer
becomes a subclass of the optimizer's class with a copy of its attributes). An attribute assigned through
such a wrapper would land on the wrapper alone: ``perturb()`` through it would leave the real optimizer's
``step()`` without the pending perturbation. Attributes of this shared object are seen by every copy.
"""
from dataclasses import dataclass, field

import torch

from ._window import Window


@dataclass(eq=False)
class RunState:
    seed: int  # of the noise stream
    stream: int  # noise stream id (parallel mode: the rank)
    steps: int = 0  # completed step() calls: the noise stream's step of the next perturbation
    window: Window | None = None  # the pending perturbation, from perturb() to step()
    backups: dict = field(default_factory=dict)  # param -> its backup buffer (restore="exact"), kept across steps
    # Parallel mode (rwp_kernels.optim.distributed): the alpha this process applies itself instead of the
    # groups' alpha, whose mixing then happens between processes.
    local_alpha: float | None = None
    # What the last zero_grad() left (param -> grad_mark) and how many calls there were: step(closure) tells
    # from them whether p.grad holds gradients of backward passes outside its closure.
    after_zero_grad: dict = field(default_factory=dict)
    zero_grad_calls: int = 0


def grad_mark(p: torch.Tensor) -> tuple:
    """Identifies p.grad as it is now: the tensor and its version (in-place changes bump it)."""
    return (None, 0) if p.grad is None else (p.grad, p.grad._version)
