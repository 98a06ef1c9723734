"""Launch count: one RWPSGD step on one (device, dtype) group makes exactly two calls into the backend
(perturb_ and sgd_step_). Counted at the dispatch point: every call of a backend function that
rwp_kernels.ops makes (whatever backend "auto" picked), one call being one launch on a fused backend."""
import pytest
import torch

from rwp_kernels import backends
from rwp_kernels.models import resnet18, small_cnn
from rwp_kernels.optim import RWP, RWPSGD

from _optim_common import backward, batches, one_torch_thread  # noqa: F401


class _Counting:
    def __init__(self, module, calls):
        self._module, self._calls = module, calls

    def __getattr__(self, name):
        target = getattr(self._module, name)

        def counted(*args, **kwargs):
            self._calls.append(name)
            return target(*args, **kwargs)

        return counted


@pytest.fixture
def backend_calls(monkeypatch):
    calls = []
    assign = backends.assign
    monkeypatch.setattr(backends, "assign", lambda *a: [(_Counting(m, calls), idx) for m, idx in assign(*a)])
    return calls


def _one_step(model, opt, batch, calls):
    opt.zero_grad()
    backward(model, batch)
    calls.clear()
    opt.perturb()
    backward(model, batch)
    opt.step()
    return list(calls)


def test_resnet18_step_is_two_launches(backend_calls):
    model = resnet18(in_channels=1)
    opt = RWPSGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, seed=0)
    assert _one_step(model, opt, batches(1, batch=2)[0], backend_calls) == ["perturb_", "sgd_step_"]


@pytest.mark.parametrize("adaptive,alpha", [(False, 0.5), (True, 0.5), (True, 1.0), (False, 1.0)])
def test_rwpsgd_step_is_two_launches(backend_calls, adaptive, alpha):
    model = small_cnn()
    opt = RWPSGD(model.parameters(), lr=0.1, momentum=0.9, adaptive=adaptive, alpha=alpha, seed=0)
    for batch in batches(2):  # the first step (momentum buffers created) and a later one
        assert _one_step(model, opt, batch, backend_calls) == ["perturb_", "sgd_step_"]


def test_documented_launch_counts_of_other_configurations(backend_calls):
    model = small_cnn()
    batch = batches(1)[0]
    decay = [p for p in model.parameters() if p.dim() > 1]
    rest = [p for p in model.parameters() if p.dim() <= 1]
    # One perturb_ spans both groups; one sgd_step_ per distinct set of step hyperparameters.
    opt = RWPSGD([{"params": decay}, {"params": rest, "weight_decay": 0.0}], lr=0.1, weight_decay=1e-3, seed=0)
    assert _one_step(model, opt, batch, backend_calls) == ["perturb_", "sgd_step_", "sgd_step_"]
    # restore="regenerate": no backup; the restore is its own launch.
    opt = RWPSGD(model.parameters(), lr=0.1, restore="regenerate", seed=0)
    assert _one_step(model, opt, batch, backend_calls) == ["perturb_", "restore_", "sgd_step_"]
    # The wrapper: perturb_, then restore_ with the mix; the base optimizer's step is torch's.
    opt = RWP(model.parameters(), torch.optim.AdamW, lr=1e-3, seed=0)
    assert _one_step(model, opt, batch, backend_calls) == ["perturb_", "restore_"]
    # alpha=0: plain SGD, one launch.
    opt = RWPSGD(model.parameters(), lr=0.1, alpha=0.0, seed=0)
    assert _one_step(model, opt, batch, backend_calls) == ["sgd_step_"]
