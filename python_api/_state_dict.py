"""What ``load_state_dict`` checks before it loads anything, so that a state dict that does not fit leaves
the optimizer unchanged: the param groups (their number, their sizes, the hyperparameters), each
parameter's state (per-element tensors: the parameter's shape, a real floating dtype) and the RWP counters.
"""
import torch

from rwp_kernels._validate import UINT64_LIMIT, check_int

_WHO = "load_state_dict"

# The per-element state of torch's optimizers (SGD, Adam, AdamW, Adamax, NAdam, RAdam, RMSprop, Adadelta,
# Adagrad, ASGD, Rprop, Adafactor): where present, a tensor of the parameter's shape.
TORCH_PER_ELEMENT_STATE = ("momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "exp_inf", "square_avg",
                           "grad_avg", "acc_delta", "sum", "ax", "prev", "step_size", "variance")


def required(mapping: dict, key: str, where: str = "the state dict"):
    if key not in mapping:
        raise ValueError(f"{_WHO}: {where} has no {key!r} entry")
    return mapping[key]


def param_groups(state_dict: dict, groups: list[dict], defaults: dict, check_group) -> tuple[list[dict], dict]:
    """The saved param groups completed with ``defaults`` (as they will be loaded), each checked by
    ``check_group``, and saved parameter id -> (the optimizer's parameter, its name in messages)."""
    saved_groups = required(state_dict, "param_groups")
    if len(saved_groups) != len(groups):
        raise ValueError(f"{_WHO}: the state dict has {len(saved_groups)} param groups, the optimizer {len(groups)}")
    merged, params = [], {}
    for i, (group, saved) in enumerate(zip(groups, saved_groups)):
        if not isinstance(saved, dict) or "params" not in saved:
            raise TypeError(f"{_WHO}: param group {i} of the state dict is not a dict with a 'params' entry")
        saved = {**defaults, **saved}
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(f"{_WHO}: param group {i} has {len(saved['params'])} parameters in the state dict, "
                             f"{len(group['params'])} in the optimizer")
        check_group(saved, f"{_WHO}: param group {i}: ")
        for j, (saved_id, p) in enumerate(zip(saved["params"], group["params"])):
            params[saved_id] = (p, f"param group {i}, parameter {j} (shape {tuple(p.shape)})")
        merged.append(saved)
    return merged, params


def param_state(name: str, state, params: dict, per_element: tuple[str, ...]) -> dict:
    """``state`` (saved parameter id -> that parameter's state dict), checked: each id is a parameter of the
    state dict's groups, and the entries named in ``per_element`` are tensors of the parameter's shape and a
    real floating dtype (or None, as torch.optim.SGD without momentum writes a momentum_buffer)."""
    if not isinstance(state, dict):
        raise TypeError(f"{_WHO}: {name} must be a dict, got {type(state).__name__}")
    checked = {}
    for saved_id, entry in state.items():
        if saved_id not in params:
            raise ValueError(f"{_WHO}: {name} has an entry for parameter id {saved_id!r}, which no param group "
                             "of the state dict lists")
        p, where = params[saved_id]
        if not isinstance(entry, dict):
            raise TypeError(f"{_WHO}: {name} of {where} must be a dict, got {type(entry).__name__}")
        for key in per_element:
            _check_per_element(entry.get(key), p, f"{_WHO}: {name} of {where}: {key}")
        checked[saved_id] = dict(entry)
    return checked


def _check_per_element(value, p: torch.Tensor, what: str) -> None:
    if value is None:
        return
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{what} must be a tensor, got {type(value).__name__}")
    if value.shape != p.shape:
        raise ValueError(f"{what} has shape {tuple(value.shape)}")
    if not value.is_floating_point():
        raise TypeError(f"{what} has dtype {value.dtype}; it must be a real floating dtype")


def rwp_counters(rwp, seed: int, steps: int) -> tuple[int, int]:
    """The seed and step counter of ``state_dict["rwp"]``; ``seed`` and ``steps`` if it has none (e.g. a
    torch.optim.SGD state dict)."""
    if rwp is None:
        return seed, steps
    if not isinstance(rwp, dict):
        raise TypeError(f'{_WHO}: state_dict["rwp"] must be a dict, got {type(rwp).__name__}')
    return tuple(
        check_int(_WHO, f'state_dict["rwp"][{key!r}]', required(rwp, key, 'state_dict["rwp"]'), high=UINT64_LIMIT)
        for key in ("seed", "steps")
    )
