"""What an optimizer remembers between ``perturb()`` and ``step()``: one entry per trainable parameter.

How p.grad relates to the gradient that ``step()`` applies (the mix ``(1 - alpha) g_c + alpha g_p``):

- ``SCALED``: ``perturb()`` multiplied the clean gradient in p.grad by ``(1 - alpha) / alpha`` (0 for
  alpha = 1); the perturbed backward adds ``g_p``; ``step()`` multiplies by ``alpha``. No extra memory.
- ``SPLIT`` (ARWP with 0 < alpha < 1, whose Fisher state needs ``g_p`` alone): ``perturb()`` moves the clean
  gradient out of p.grad into ``stash`` and p.grad receives ``g_p`` alone; ``step()`` mixes the two.

A ``zero_grad()`` inside the window (trainers zero before every backward) moves a ``SCALED`` clean gradient
into ``stash`` too, still multiplied by ``(1 - alpha) / alpha``: ``stash_scale`` is the weight ``step()``
gives the stash, so that it contributes ``(1 - alpha) g_c`` either way.
"""
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from rwp_kernels.layout import same_layout

SCALED = "scaled"
SPLIT = "split"


@dataclass(eq=False)
class Entry:
    param: torch.Tensor
    index: int  # the parameter's param_index in the noise stream
    group: dict
    alpha: float
    adaptive: bool
    mode: str
    backup: torch.Tensor | None = None  # exact restore
    sigma: torch.Tensor | None = None  # regenerated restore
    stash: torch.Tensor | None = None  # the clean gradient kept out of p.grad
    stash_scale: float = 0.0  # the weight of ``stash`` in the mix
    scaled_mark: tuple = (None, 0)  # SCALED: p.grad as perturb() left it (see _run_state.grad_mark)
    settled_mark: tuple = (None, 0)  # p.grad as perturb(), a backward pass or this optimizer last left it
    perturbed: bool = False  # the weights currently hold the perturbation

    @property
    def clean_scale(self) -> float:
        """The multiplier of the clean gradient held in p.grad, applied by ``perturb()`` (SCALED only)."""
        return (1.0 - self.alpha) / self.alpha


@dataclass(eq=False)
class Window:
    step: int  # the noise stream's step: the optimizer's step counter when perturb() ran
    entries: list[Entry] = field(default_factory=list)
    settle_queued: bool = False  # a backward's end will record the settled marks (_run_state.watch_gradients)

    def by_param(self) -> dict:
        return {e.param: e for e in self.entries}

    @property
    def perturbed(self) -> bool:
        return any(e.perturbed for e in self.entries)

    def settle(self) -> None:
        """Record every entry's gradient as it is now: what step() compares with."""
        for e in self.entries:
            e.settled_mark = grad_mark(e.param)
        self.settle_queued = False


def grad_mark(p: torch.Tensor) -> tuple:
    """Identifies p.grad as it is now: the tensor and its version (in-place changes bump it)."""
    return (None, 0) if p.grad is None else (p.grad, p.grad._version)


def group_by(items, key) -> dict:
    """``items`` grouped by ``key(item)``, in order of first appearance."""
    groups = defaultdict(list)
    for item in items:
        groups[key(item)].append(item)
    return groups


def like_param(p: torch.Tensor, t: torch.Tensor | None, *, dtype=None) -> torch.Tensor | None:
    """``t`` itself if it has ``p``'s memory layout, else a copy in that layout (dense row layout for the ops)."""
    if t is None or same_layout(t, p):
        return t
    return torch.empty_like(p, dtype=dtype or t.dtype).copy_(t)
