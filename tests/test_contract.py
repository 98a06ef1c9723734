"""Every registered backend implements the whole backend contract (rwp_kernels.contract.Backend): each of
its functions, with the contract's arguments by name, so that ops.py can call any backend the same way."""
import inspect

import pytest

from conftest import requires
from rwp_kernels import backends, contract


def _arguments(fn) -> tuple[list[str], list[str]]:
    """(positional, keyword-only) parameter names, without ``self``."""
    params = [p for p in inspect.signature(fn).parameters.values() if p.name != "self"]
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    keyword = [p.name for p in params if p.kind == p.KEYWORD_ONLY]
    return positional, keyword


def test_the_contract_lists_the_five_ops():
    assert set(contract.OPS) == {"philox4x32_10", "noise", "perturb_", "restore_", "sgd_step_"}


@pytest.mark.parametrize("name", sorted(backends.REGISTRY))
def test_backend_implements_the_whole_contract(name):
    entry = backends.REGISTRY[name]
    reasons = {}
    for device_type in entry.device_types:
        reasons[device_type] = backends.unavailable_reason(name, device_type)
    loadable = [t for t, reason in reasons.items() if reason is None]
    capability = {"cpu": "cpp-ext", "triton": "triton-interpret"}.get(name, "gpu")
    requires(bool(loadable), f"backend {name!r} cannot be loaded here: {reasons}", capability)
    module = entry.module(loadable[0])
    assert isinstance(module.NAME, str) and module.NAME
    for op in contract.OPS:
        fn = getattr(module, op, None)
        assert callable(fn), f"backend {name!r} has no {op}"
        want = _arguments(getattr(contract.Backend, op))
        assert _arguments(fn) == want, f"backend {name!r}: {op}{inspect.signature(fn)} is not the contract's {want}"


def test_bundles_split_with_the_parameters():
    mix = contract.GradMix(grads=["g0", "g1", "g2"], grad_scale=0.5, fisher=None, clean_grads=["c0", "c1", "c2"])
    part = mix.take([2, 0])
    assert part.grads == ["g2", "g0"] and part.clean_grads == ["c2", "c0"] and part.fisher is None
    assert part.grad_scale == 0.5
    assert contract.NoiseKey(seed=2**64 - 1, stream=1, step=2**32 + 3).words()[2] == 3
