"""load_state_dict of a state dict that does not fit (another model's, a corrupted one): refused with an error
that names the offending entry, and the optimizer is left exactly as it was (hyperparameters, state tensors,
seed, step counter, the base optimizer of RWP(base))."""
import copy

import pytest
import torch
from torch import nn

from rwp_kernels.optim import RWP, RWPSGD

from _optim_common import one_torch_thread  # noqa: F401

KINDS = ["rwpsgd", "arwp", "wrapper-adamw"]


def _make(kind, params, seed):
    rwp = dict(gamma=0.05, seed=seed, backend="reference")
    if kind == "rwpsgd":
        return RWPSGD(params, lr=0.05, momentum=0.9, **rwp)
    if kind == "arwp":
        return RWPSGD(params, lr=0.05, momentum=0.9, adaptive=True, **rwp)
    return RWP(params, torch.optim.AdamW, lr=1e-3, adaptive=True, **rwp)


def _trained(kind, shapes, seed):
    """An optimizer over fresh parameters of ``shapes`` after two steps (so it has state)."""
    g = torch.Generator().manual_seed(seed)
    params = [nn.Parameter(torch.randn(shape, generator=g)) for shape in shapes]
    opt = _make(kind, params, seed)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.perturb()
        opt.step()
    return opt


def _snapshot(opt) -> dict:
    """Everything load_state_dict may change, copied."""
    def of(optimizer):
        groups = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
        params = [p for group in optimizer.param_groups for p in group["params"]]
        return copy.deepcopy({"groups": groups, "state": [dict(optimizer.state.get(p, {})) for p in params]})

    snapshot = {"rwp": of(opt), "seed": opt.seed, "steps": opt.steps}
    if isinstance(opt, RWP):
        snapshot["base"] = of(opt.base_optimizer)
    return snapshot


def _assert_same(a, b, where="optimizer"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), f"{where} changed"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys changed"
        for key in a:
            _assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), f"{where}: length changed"
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} became {b!r}"


def _assert_refused(opt, state_dict, error, match):
    before = _snapshot(opt)
    with pytest.raises(error, match=match):
        opt.load_state_dict(state_dict)
    _assert_same(before, _snapshot(opt))
    if isinstance(opt, RWP):
        assert opt.base_optimizer.param_groups is opt.param_groups


@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_of_another_model_is_refused_and_changes_nothing(kind):
    """The first parameter fits (and would be loaded first), the second does not."""
    opt = _trained(kind, [(10,), (4, 10)], seed=1)
    other = _trained(kind, [(10,), (10,)], seed=2).state_dict()
    state = "momentum_buffer" if kind != "wrapper-adamw" else "fisher"
    _assert_refused(opt, other, ValueError, rf"load_state_dict: state of param group 0, parameter 1 "
                                            rf"\(shape \(4, 10\)\): {state} has shape \(10,\)")


def test_base_state_of_another_model_is_refused():
    opt = _trained("wrapper-adamw", [(10,), (4, 10)], seed=1)
    state_dict = opt.state_dict()
    state_dict["state"] = {}  # the RWP state fits; the AdamW moments do not
    state_dict["base_state"][1]["exp_avg"] = torch.zeros(10)
    _assert_refused(opt, state_dict, ValueError,
                    r"base_state of param group 0, parameter 1 \(shape \(4, 10\)\): exp_avg has shape \(10,\)")


def test_base_optimizer_refusal_on_a_copy_changes_nothing():
    """What the base optimizer's own load_state_dict refuses (AdamW: a step that is not a number) is found
    before anything is loaded."""
    opt = _trained("wrapper-adamw", [(10,), (4, 10)], seed=1)
    state_dict = opt.state_dict()
    state_dict["base_state"][1]["step"] = "seven"
    _assert_refused(opt, state_dict, ValueError, "seven")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("steps,error", [(-3, ValueError), ("7", TypeError), (2.5, TypeError), (True, TypeError),
                                         (2**64, ValueError)])
def test_bad_step_counter_is_refused(kind, steps, error):
    opt = _trained(kind, [(10,), (4, 10)], seed=1)
    state_dict = _trained(kind, [(10,), (4, 10)], seed=2).state_dict()
    state_dict["rwp"]["steps"] = steps
    _assert_refused(opt, state_dict, error, r'state_dict\["rwp"\]\[\'steps\'\]')


@pytest.mark.parametrize("seed,error", [(-1, ValueError), (2**64, ValueError), ("1", TypeError), (None, TypeError),
                                        (1.0, TypeError)])
def test_bad_seed_is_refused(seed, error):
    opt = _trained("rwpsgd", [(10,), (4, 10)], seed=1)
    state_dict = _trained("rwpsgd", [(10,), (4, 10)], seed=2).state_dict()
    state_dict["rwp"]["seed"] = seed
    _assert_refused(opt, state_dict, error, r'state_dict\["rwp"\]\[\'seed\'\]')


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("entry,value,match", [
    ("gamma", -0.5, "param group 0: gamma is -0.5"), ("alpha", 2.0, "param group 0: alpha is 2.0"),
    ("eta", float("inf"), "param group 0: eta"), ("adaptive", "yes", "param group 0: adaptive"),
])
def test_bad_group_hyperparameters_are_refused(kind, entry, value, match):
    opt = _trained(kind, [(10,), (4, 10)], seed=1)
    state_dict = _trained(kind, [(10,), (4, 10)], seed=2).state_dict()
    state_dict["param_groups"][0][entry] = value
    _assert_refused(opt, state_dict, (ValueError, TypeError), f"load_state_dict: {match}")


def test_bad_sgd_hyperparameters_are_refused():
    opt = _trained("rwpsgd", [(10,), (4, 10)], seed=1)
    state_dict = _trained("rwpsgd", [(10,), (4, 10)], seed=2).state_dict()
    state_dict["param_groups"][0]["lr"] = -1.0
    _assert_refused(opt, state_dict, ValueError, "load_state_dict: param group 0: lr is -1.0")


@pytest.mark.parametrize("kind", KINDS)
def test_groups_that_do_not_match_are_refused(kind):
    opt = _trained(kind, [(10,), (4, 10)], seed=1)
    state_dict = _trained(kind, [(10,), (4, 10)], seed=2).state_dict()
    two_groups = copy.deepcopy(state_dict)
    two_groups["param_groups"] = [{**state_dict["param_groups"][0], "params": [0]},
                                  {**state_dict["param_groups"][0], "params": [1]}]
    _assert_refused(opt, two_groups, ValueError, "the state dict has 2 param groups, the optimizer 1")
    three_params = copy.deepcopy(state_dict)
    three_params["param_groups"][0]["params"] = [0, 1, 2]
    _assert_refused(opt, three_params, ValueError,
                    "param group 0 has 3 parameters in the state dict, 2 in the optimizer")
    unknown_id = copy.deepcopy(state_dict)
    unknown_id["state"][7] = unknown_id["state"].pop(1)
    _assert_refused(opt, unknown_id, ValueError, "state has an entry for parameter id 7")


@pytest.mark.parametrize("kind,entry,dtype", [
    ("rwpsgd", "momentum_buffer", torch.complex64), ("rwpsgd", "momentum_buffer", torch.int64),
    ("arwp", "fisher", torch.int32), ("arwp", "fisher", torch.bool),
])
def test_state_of_a_dtype_that_cannot_be_cast_is_refused(kind, entry, dtype):
    opt = _trained(kind, [(10,), (4, 10)], seed=1)
    state_dict = _trained(kind, [(10,), (4, 10)], seed=2).state_dict()
    state_dict["state"][1][entry] = torch.zeros((4, 10), dtype=dtype)
    _assert_refused(opt, state_dict, TypeError,
                    rf"state of param group 0, parameter 1 \(shape \(4, 10\)\): {entry} has dtype {dtype}")


@pytest.mark.parametrize("kind", KINDS)
def test_a_fitting_state_dict_still_loads(kind):
    """The checks let a state dict of the same model through: everything is taken over."""
    opt = _trained(kind, [(10,), (4, 10)], seed=1)
    source = _trained(kind, [(10,), (4, 10)], seed=2)
    source.param_groups[0]["lr"] = 0.125
    opt.load_state_dict(source.state_dict())
    assert (opt.seed, opt.steps, opt.param_groups[0]["lr"]) == (2, 2, 0.125)
    _assert_same(_snapshot(source)["rwp"]["state"], _snapshot(opt)["rwp"]["state"])
    if kind == "wrapper-adamw":
        _assert_same(_snapshot(source)["base"], _snapshot(opt)["base"])
        assert opt.base_optimizer.param_groups is opt.param_groups


def test_torch_sgd_state_dict_without_momentum_loads():
    """torch.optim.SGD without momentum may save momentum_buffer None: accepted, as before."""
    params = [nn.Parameter(torch.randn(4, 10))]
    sgd = torch.optim.SGD(params, lr=0.1)
    state_dict = sgd.state_dict()
    state_dict["state"] = {0: {"momentum_buffer": None}}
    opt = RWPSGD(params, lr=0.5, seed=3, backend="reference")
    opt.load_state_dict(state_dict)
    assert opt.param_groups[0]["lr"] == 0.1 and opt.param_groups[0]["gamma"] == 0.01 and opt.steps == 0
