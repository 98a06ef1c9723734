"""The part of an RWP optimizer's state that changes after ``__init__``, besides torch's ``state`` and
``param_groups``: one object, made in ``__init__`` and never reassigned.

Trainers wrap optimizers in objects that copy the optimizer's ``__dict__`` (Lightning's LightningOptimizer
becomes a subclass of the optimizer's class with a copy of its attributes). An attribute assigned through
such a wrapper would land on the wrapper alone: ``perturb()`` through it would leave the real optimizer's
``step()`` without the pending perturbation. Attributes of this shared object are seen by every copy.
"""
import weakref
from dataclasses import dataclass, field
from functools import partial

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
    watched: set = field(default_factory=set)  # params with the gradient hook of watch_gradients


def watch_gradients(state: RunState, params) -> None:
    """Keep the marks of the pending window's gradients up to date with every backward pass.

    A hook after each accumulation into p.grad queues, once per backward, a callback for the backward's
    end that re-queues itself once, so that it runs after what others queued during the backward (DDP
    writes the averaged gradients into p.grad there); it then records every entry's grad_mark as settled.
    So step() can tell a change by a backward pass from one by anything else (a clip of p.grad) wherever
    it happens. A parameter is hooked once, for the optimizer's lifetime; the hook returns at once while
    no perturbation is pending.
    """
    for p in params:
        if p not in state.watched:
            # Weakly: a parameter outlives an optimizer that is dropped, and the state holds its backups.
            p.register_post_accumulate_grad_hook(partial(_accumulated, weakref.ref(state)))
            state.watched.add(p)


def _accumulated(state_ref: weakref.ref, param: torch.Tensor) -> None:
    state = state_ref()
    window = state.window if state is not None else None
    if window is None or window.settle_queued:
        return
    window.settle_queued = True
    engine = torch.autograd.Variable._execution_engine
    engine.queue_callback(lambda: engine.queue_callback(window.settle))
