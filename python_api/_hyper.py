"""Checks of the RWP hyperparameters: those that live in param groups and the optimizer-wide options."""
import math

import torch

from rwp_kernels._validate import UINT64_LIMIT, check_int
from rwp_kernels.backends import check_name

_WHO = "rwp_kernels.optim"

RESTORE_MODES = ("exact", "regenerate")


def _number(name: str, value, where: str, *, low: float, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{where}{name} must be a number, got {type(value).__name__}")
    if not (low <= value <= high) or math.isnan(value):
        bound = f"in [{low}, {high}]" if high != math.inf else f">= {low} and finite"
        raise ValueError(f"{where}{name} is {value}; it must be {bound}")
    if math.isinf(value):
        raise ValueError(f"{where}{name} is {value}; it must be finite")
    return float(value)


def rwp_group_defaults(*, gamma, alpha, adaptive, eta, beta) -> dict:
    """The RWP entries of a param group's defaults, checked."""
    group = dict(gamma=gamma, alpha=alpha, adaptive=adaptive, eta=eta, beta=beta)
    check_rwp_group(group, where="")
    return group


def check_rwp_group(group: dict, where: str) -> None:
    """Raise a clear error if the RWP hyperparameters of ``group`` are out of range (e.g. set by a scheduler)."""
    _number("gamma", group["gamma"], where, low=0.0)
    _number("alpha", group["alpha"], where, low=0.0, high=1.0)
    _number("eta", group["eta"], where, low=0.0)
    _number("beta", group["beta"], where, low=0.0)
    if not isinstance(group["adaptive"], bool):
        raise TypeError(f"{where}adaptive must be True or False, got {group['adaptive']!r}")


def check_sgd_group(group: dict, where: str) -> None:
    """torch.optim.SGD's own checks, for RWPSGD's groups."""
    _number("lr", group["lr"], where, low=0.0)
    _number("momentum", group["momentum"], where, low=0.0)
    _number("dampening", group["dampening"], where, low=-math.inf)
    _number("weight_decay", group["weight_decay"], where, low=0.0)
    if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
        raise ValueError(f"{where}nesterov momentum requires a momentum and zero dampening")


def check_restore(restore) -> str:
    if restore not in RESTORE_MODES:
        raise ValueError(f"restore must be one of {', '.join(map(repr, RESTORE_MODES))}; got {restore!r}")
    return restore


def check_backend(backend) -> str:
    check_name(backend)
    return backend


def initial_seed(seed) -> int:
    """The noise seed: the given one, or one drawn from torch's default generator (so torch.manual_seed
    makes a run reproducible)."""
    if seed is None:
        return int(torch.empty((), dtype=torch.int64).random_())
    return check_int(_WHO, "seed", seed, high=UINT64_LIMIT)


def check_stream(stream) -> int:
    return check_int(_WHO, "stream", stream, high=UINT64_LIMIT)
