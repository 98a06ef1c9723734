"""Argument checks shared by every op and backend.

Everything is checked before anything is written, so a call that raises leaves every tensor as it
was. Messages name the op and the offending argument (``params[3] (shape (64, 3, 3, 3), ...)``).
"""
import math
import numbers
import operator
from collections.abc import Sequence

import torch

from .layout import is_row_dense, num_rows, same_layout

PARAM_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
UINT32_LIMIT = 1 << 32
INT64_LIMIT = 1 << 63  # element offsets and counts: int64 on every backend
UINT64_LIMIT = 1 << 64


def describe(name: str, t: torch.Tensor) -> str:
    return f"{name} (shape {tuple(t.shape)}, {t.dtype}, {t.device})"


def _as_list(op: str, name: str, value) -> list:
    if isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a list of tensors, got a single tensor; wrap it in a list")
    try:
        return list(value)
    except TypeError:
        raise TypeError(f"{op}: {name} must be a list of tensors, got {type(value).__name__}") from None


def _check_dense_float(op: str, name: str, t, *, dtypes=PARAM_DTYPES) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.is_meta:
        raise TypeError(f"{op}: {describe(name, t)} is a meta tensor, which has no data; the ops need real tensors")
    if t.layout != torch.strided:
        raise TypeError(f"{op}: {describe(name, t)} is {t.layout}; only dense (strided) tensors are supported")
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d) for d in dtypes)
        raise TypeError(f"{op}: {describe(name, t)} has dtype {t.dtype}; supported: {allowed}")
    if not is_row_dense(t):
        raise ValueError(
            f"{op}: {describe(name, t)} with strides {t.stride()} is not dense with contiguous rows "
            "(contiguous or channels_last); call .contiguous() on it"
        )


def check_params(op: str, params) -> tuple[list[torch.Tensor], torch.device]:
    """The parameter list as a list, and the one device all of them live on."""
    params = _as_list(op, "params", params)
    if not params:
        raise ValueError(f"{op}: params is empty; pass at least one tensor")
    device = None
    for i, p in enumerate(params):
        name = f"params[{i}]"
        _check_dense_float(op, name, p)
        if p.numel() == 0:
            raise ValueError(f"{op}: {describe(name, p)} is empty; leave empty tensors out of the call")
        if device is None:
            device = p.device
        elif p.device != device:
            raise ValueError(
                f"{op}: {describe(name, p)} is on {p.device} but params[0] is on {device}; "
                "one call takes tensors of one device"
            )
    return params, device


def capturing(device: torch.device) -> bool:
    """Whether a CUDA graph is being captured on the current CUDA stream (only CUDA tensors can be)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def check_not_capturing(op: str, device: torch.device) -> None:
    """The ops cannot be captured in a CUDA graph yet: their fused backends upload and cache parameter
    tables per CUDA stream, which a captured graph would replay from memory freed or reused since."""
    if capturing(device):
        raise RuntimeError(
            f"{op}: a CUDA graph is being captured on the current CUDA stream; rwp_kernels' ops cannot be "
            "captured yet (their parameter tables are uploaded and cached per stream). Run the optimizer step "
            "outside torch.cuda.graph / make_graphed_callables"
        )


def check_companions(op: str, name: str, tensors, params, *, dtype=None, allow_none=False):
    """A list of tensors paired one to one with ``params`` (grads, backups, buffers, Fisher state).

    Each must match its parameter's shape, device and memory layout, and have ``dtype`` (default:
    the parameter's dtype). ``None`` for the whole list passes through; ``None`` entries are allowed
    only with ``allow_none``.
    """
    if tensors is None:
        return None
    tensors = _as_list(op, name, tensors)
    if len(tensors) != len(params):
        raise ValueError(f"{op}: {name} has {len(tensors)} entries but params has {len(params)}")
    for i, (t, p) in enumerate(zip(tensors, params)):
        entry = f"{name}[{i}]"
        if t is None:
            if allow_none:
                continue
            raise TypeError(f"{op}: {entry} is None; every parameter in the call needs one")
        want = p.dtype if dtype is None else dtype
        _check_dense_float(op, entry, t, dtypes=(want,))
        if t.shape != p.shape:
            raise ValueError(f"{op}: {describe(entry, t)} does not match the shape of {describe(f'params[{i}]', p)}")
        if t.device != p.device:
            raise ValueError(f"{op}: {describe(entry, t)} is not on the device of params[{i}] ({p.device})")
        if t.stride() != p.stride() and not same_layout(t, p):
            raise ValueError(
                f"{op}: {describe(entry, t)} has strides {t.stride()} but params[{i}] has {p.stride()}; "
                "create it with torch.empty_like(param) or give it the parameter's memory format"
            )
    return tensors


def check_words(op: str, name: str, value, *, width: int, device=None) -> torch.Tensor:
    """A tensor of 32-bit words, shape [..., width], of any integer dtype: as int64 (philox4x32_10's input)."""
    t = torch.as_tensor(value, device=device)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{op}: {name} must hold integers, got {t.dtype}")
    if t.is_meta:
        raise TypeError(f"{op}: {name} is a meta tensor, which has no data")
    if t.dim() == 0 or t.shape[-1] != width:
        raise ValueError(f"{op}: {name} must have shape [..., {width}], got {tuple(t.shape)}")
    t = t.to(torch.int64)  # uint64 words of 2**63 and above wrap negative: refused below
    if t.numel() and (int(t.min()) < 0 or int(t.max()) > UINT32_LIMIT - 1):
        raise ValueError(f"{op}: {name} words must lie in [0, 2**32)")
    return t


def check_sigmas(op: str, sigmas, params) -> list[torch.Tensor]:
    """Per-row sigmas as returned by ``perturb_`` for these parameters."""
    sigmas = _as_list(op, "sigmas", sigmas)
    if len(sigmas) != len(params):
        raise ValueError(f"{op}: sigmas has {len(sigmas)} entries but params has {len(params)}")
    for i, (s, p) in enumerate(zip(sigmas, params)):
        entry = f"sigmas[{i}]"
        _check_dense_float(op, entry, s, dtypes=(torch.float32,))
        allowed = {num_rows(p)} if p.dim() >= 2 else {1, p.numel()}
        if s.dim() != 1 or s.numel() not in allowed:
            raise ValueError(
                f"{op}: {describe(entry, s)} does not fit {describe(f'params[{i}]', p)}: "
                f"expected a 1-D tensor of {' or '.join(str(n) for n in sorted(allowed))} entries, as perturb_ returns"
            )
        if s.device != p.device:
            raise ValueError(f"{op}: {describe(entry, s)} is not on the device of params[{i}] ({p.device})")
    return sigmas


def check_int(op: str, name: str, value, *, low: int = 0, high: int | None = None) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{op}: {name} must be an integer, got a bool")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{op}: {name} must be an integer, got {type(value).__name__}") from None
    if value < low or (high is not None and value >= high):
        bound = f"in [{low}, {high})" if high is not None else f">= {low}"
        raise ValueError(f"{op}: {name} is {value}; it must be {bound}")
    return value


def check_seed(op: str, seed) -> int:
    if seed is None:
        raise TypeError(f"{op}: seed is required (an integer in [0, 2**64))")
    return check_int(op, "seed", seed, high=UINT64_LIMIT)


def check_number(prefix: str, name: str, value, *, low: float | None = None, high: float | None = None) -> float:
    """A real, finite number (Python or NumPy; not a bool, not a tensor) in [low, high], as a float. Messages
    start with ``prefix`` (e.g. ``"perturb_: "``, ``"param group 1: "``)."""
    if type(value) is not float and type(value) is not int:  # the common cases first: isinstance(Real) is slow
        if isinstance(value, torch.Tensor):
            raise TypeError(f"{prefix}{name} must be a Python number, got a tensor")
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{prefix}{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{prefix}{name} is {value}; it must be finite")
    if (low is not None and value < low) or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if low is not None and high is not None else (
            f">= {low}" if low is not None else f"<= {high}")
        raise ValueError(f"{prefix}{name} is {value}; it must be {bound}")
    return value


def check_float(op: str, name: str, value, *, low: float | None = None, high: float | None = None) -> float:
    return check_number(f"{op}: ", name, value, low=low, high=high)


def check_nesterov(prefix: str, nesterov, momentum: float, dampening: float) -> None:
    """torch.optim.SGD's rule: nesterov needs momentum > 0 and dampening 0."""
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError(f"{prefix}nesterov needs momentum > 0 and dampening 0 (as torch.optim.SGD)")


def per_param_floats(op: str, name: str, value, n: int, *, low: float = 0.0) -> list[float]:
    """A float for every parameter, from one number or a sequence of ``n`` numbers."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != n:
            raise ValueError(f"{op}: {name} has {len(value)} entries but params has {n}")
        return [check_float(op, f"{name} for params[{i}]", v, low=low) for i, v in enumerate(value)]
    v = check_float(op, name, value, low=low)
    return [v] * n


def check_param_indices(op: str, param_indices, n: int) -> list[int]:
    if param_indices is None:
        return list(range(n))
    indices = list(param_indices)
    if len(indices) != n:
        raise ValueError(f"{op}: param_indices has {len(indices)} entries but params has {n}")
    indices = [check_int(op, f"param_indices[{i}]", v, high=UINT32_LIMIT) for i, v in enumerate(indices)]
    first = {}
    for i, v in enumerate(indices):
        if v in first:
            raise ValueError(
                f"{op}: param_indices[{i}] repeats param_indices[{first[v]}] ({v}); "
                "two parameters would draw the same noise"
            )
        first[v] = i
    return indices


def check_scale(op: str, name: str, value, device: torch.device):
    """A gradient multiplier: a Python number, or a one-element floating tensor (moved to ``device``).

    Finite where that can be seen without a host sync: numbers and CPU tensors. The value of a GPU tensor
    (GradScaler's inverse scale) is not read."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or not value.is_floating_point() or value.is_meta:
            raise ValueError(f"{op}: {describe(name, value)} must be a one-element floating tensor")
        if value.device.type == "cpu" and not math.isfinite(value.item()):
            raise ValueError(f"{op}: {name} is {value.item()}; it must be finite")
        return value.reshape(()).to(device=device, dtype=torch.float32, non_blocking=True)
    return check_float(op, name, value)


def check_found_inf(op: str, found_inf, device: torch.device):
    if found_inf is None:
        return None
    if not isinstance(found_inf, torch.Tensor) or found_inf.numel() != 1:
        raise TypeError(f"{op}: found_inf must be a one-element tensor (as GradScaler provides) or None")
    return found_inf.reshape(()).to(device=device, dtype=torch.float32, non_blocking=True)


def check_no_aliasing(op: str, arguments) -> None:
    """No tensor that the op writes shares memory with any other tensor of the call.

    ``arguments``: ``(name, value, written)`` triples, ``value`` a list of tensors (None entries are
    skipped), one tensor, or None. The memory spans are sorted by start address, so a call costs
    O(n log n) and no host synchronization; every tensor is dense (validated before), so a tensor's span
    is its ``nbytes`` from its data pointer.
    """
    spans = []  # (start, end, written, name, index in the list or None)
    for name, value, written in arguments:
        if isinstance(value, torch.Tensor):
            spans.append((value.data_ptr(), value.data_ptr() + value.nbytes, written, name, None))
        elif value is not None:
            spans += [(t.data_ptr(), t.data_ptr() + t.nbytes, written, name, i) for i, t in enumerate(value)
                      if t is not None]
    spans.sort(key=lambda span: span[0])
    furthest = furthest_written = None  # of the spans that start before the current one, the one ending last
    for span in spans:
        other = furthest if span[2] else furthest_written
        if other is not None and other[1] > span[0]:
            raise ValueError(
                f"{op}: {_span_label(span)} overlaps {_span_label(other)} in memory; a tensor that {op} writes "
                "must not share memory with any other tensor of the call"
            )
        if furthest is None or span[1] > furthest[1]:
            furthest = span
        if span[2] and (furthest_written is None or span[1] > furthest_written[1]):
            furthest_written = span


def _span_label(span) -> str:
    name, index = span[3], span[4]
    return name if index is None else f"{name}[{index}]"
