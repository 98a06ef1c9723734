"""Checks of the RWP hyperparameters: those that live in param groups and the optimizer-wide options."""
import torch

from rwp_kernels._validate import UINT64_LIMIT, check_int, check_nesterov, check_number
from rwp_kernels.backends import check_name

_WHO = "rwp_kernels.optim"

RESTORE_MODES = ("exact", "regenerate")


def rwp_group_defaults(*, gamma, alpha, adaptive, eta, beta) -> dict:
    """The RWP entries of a param group's defaults, checked."""
    group = dict(gamma=gamma, alpha=alpha, adaptive=adaptive, eta=eta, beta=beta)
    check_rwp_group(group, where="")
    return group


def check_rwp_group(group: dict, where: str) -> None:
    """Raise a clear error if the RWP hyperparameters of ``group`` are out of range (e.g. set by a scheduler)."""
    check_number(where, "gamma", group["gamma"], low=0.0)
    check_number(where, "alpha", group["alpha"], low=0.0, high=1.0)
    check_number(where, "eta", group["eta"], low=0.0)
    check_number(where, "beta", group["beta"], low=0.0)
    if not isinstance(group["adaptive"], bool):
        raise TypeError(f"{where}adaptive must be True or False, got {group['adaptive']!r}")


def check_sgd_group(group: dict, where: str) -> None:
    """torch.optim.SGD's own checks, for RWPSGD's groups."""
    check_number(where, "lr", group["lr"], low=0.0)
    check_number(where, "momentum", group["momentum"], low=0.0)
    check_number(where, "dampening", group["dampening"])
    check_number(where, "weight_decay", group["weight_decay"], low=0.0)
    check_nesterov(where, group["nesterov"], group["momentum"], group["dampening"])


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
