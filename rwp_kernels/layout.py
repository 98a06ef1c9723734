"""How a parameter is split into rows, and its memory-order view; shared by every backend.

A parameter of two or more dimensions has one row per output filter (``shape[0]`` rows of
``numel / shape[0]`` elements); a 0-D or 1-D parameter is a single row. Every backend walks the
elements of a parameter in memory order (the noise of element ``e`` is keyed by its storage offset),
so a parameter must occupy one dense block of memory in which each row is a contiguous run:
contiguous and channels_last tensors qualify, a transposed weight does not.
"""
import itertools
from dataclasses import dataclass

import torch


def num_rows(t: torch.Tensor) -> int:
    """Rows of the filter-wise norm: ``shape[0]`` for >=2-D tensors, 1 for 0-D/1-D."""
    return t.shape[0] if t.dim() >= 2 else 1


def num_sigma_rows(t: torch.Tensor, adaptive: bool) -> int:
    """Entries of the per-row sigma that ``perturb_`` returns for ``t``.

    With an ARWP Fisher state, a 0-D/1-D parameter gets one sigma per element (its Fisher "rows" are
    single elements) while its norm stays the norm of the whole tensor.
    """
    if t.dim() >= 2:
        return t.shape[0]
    return t.numel() if adaptive else 1


@dataclass(frozen=True)
class ParamPlan:
    """How every backend walks one parameter of a call: computed once, by ``plan``."""

    numel: int
    row_len: int  # elements per norm row (filter); the whole tensor for 0-D/1-D
    vector: bool  # 0-D/1-D: one norm for the whole tensor, plus NORM_EPS
    sigma_len: int  # elements per sigma: row_len, or 1 for a 0-D/1-D tensor with ARWP's Fisher state
    param_index: int  # the parameter's index in the noise counter

    @property
    def rows(self) -> int:
        return self.numel // self.row_len

    @property
    def sigma_count(self) -> int:
        """Entries of the parameter's sigma (one per row, or per element)."""
        return self.numel // self.sigma_len


def plan(params: list[torch.Tensor], param_indices: list[int], sigma_counts: list[int] | None = None) -> list:
    """The ParamPlan of each parameter. ``sigma_counts``: the sigma entries per parameter (perturb_:
    ``num_sigma_rows``; restore_: the sigmas it was given); default one per row."""
    out = []
    for i, p in enumerate(params):
        numel, rows = p.numel(), num_rows(p)
        count = rows if sigma_counts is None else sigma_counts[i]
        out.append(ParamPlan(numel=numel, row_len=numel // rows, vector=p.dim() < 2, sigma_len=numel // count,
                             param_index=param_indices[i]))
    return out


def sigma_offsets(plans: list[ParamPlan]) -> list[int]:
    """Where each parameter's sigmas start in one buffer holding all of them in order."""
    return [0, *itertools.accumulate(e.sigma_count for e in plans)][:-1]


def is_row_dense(t: torch.Tensor) -> bool:
    """True if ``t`` fills one dense block of memory and each of its rows is a contiguous run."""
    if t.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((st, s) for s, st in zip(t.shape, t.stride()) if s != 1):
        if stride != expected:
            return False
        expected *= size
    if t.dim() >= 2 and t.shape[0] > 1:
        return t.stride(0) == t.numel() // t.shape[0]
    return True


def same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same shape and the same strides (ignoring those of size-1 dimensions, which do not matter): a
    companion tensor (gradient, backup, buffer) walked in the same memory order as its parameter."""
    if a.shape != b.shape:
        return False
    sa, sb = a.stride(), b.stride()
    return sa == sb or all(x == y for x, y, n in zip(sa, sb, a.shape) if n != 1)


def flat_view(t: torch.Tensor) -> torch.Tensor:
    """The 1-D view of ``t``'s memory block, in memory order (requires ``is_row_dense(t)``)."""
    return t.as_strided((t.numel(),), (1,))
