"""How a parameter is split into rows, and its memory-order view; shared by every backend.

A parameter of two or more dimensions has one row per output filter (``shape[0]`` rows of
``numel / shape[0]`` elements); a 0-D or 1-D parameter is a single row. Every backend walks the
elements of a parameter in memory order (the noise of element ``e`` is keyed by its storage offset),
so a parameter must occupy one dense block of memory in which each row is a contiguous run:
contiguous and channels_last tensors qualify, a transposed weight does not.
"""
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
