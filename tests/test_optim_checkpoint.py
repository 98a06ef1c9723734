"""Checkpoint and resume: N steps == k steps, save, load into a fresh model and optimizer, N - k steps;
bit for bit on CPU (momentum, Adam moments, ARWP Fisher state, noise seed and step counter)."""
import io

import pytest
import torch

from rwp_kernels.models import small_cnn
from rwp_kernels.optim import RWP, RWPSGD, freeze_bn_stats

from _optim_common import assert_models_equal, backward, batches, model_pair, one_torch_thread  # noqa: F401

N, K = 5, 2


def _make(kind, model, seed):
    rwp = dict(gamma=0.05, seed=seed, backend="reference")
    if kind == "rwpsgd":
        return RWPSGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3, **rwp)
    if kind == "arwp":
        return RWPSGD(model.parameters(), lr=0.05, momentum=0.9, adaptive=True, eta=0.5, **rwp)
    return RWP(model.parameters(), torch.optim.AdamW, lr=1e-3, adaptive=True, **rwp)


def _train(model, opt, data):
    for clean, perturbed in zip(data[::2], data[1::2]):
        opt.zero_grad()
        backward(model, clean)
        with opt.perturbed(), freeze_bn_stats(model):
            backward(model, perturbed)
        opt.step()


@pytest.mark.parametrize("kind", ["rwpsgd", "arwp", "wrapper-adamw"])
def test_resume_is_bit_exact(kind):
    data = batches(2 * N, seed=31)
    straight, resumed = model_pair(seed=30)
    _train(straight, _make(kind, straight, seed=99), data)

    opt = _make(kind, resumed, seed=99)
    _train(resumed, opt, data[: 2 * K])
    buffer = io.BytesIO()
    torch.save({"model": resumed.state_dict(), "optim": opt.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer)

    torch.manual_seed(12345)  # a fresh model and optimizer that start out different
    fresh = small_cnn()
    fresh.load_state_dict(checkpoint["model"])
    fresh_opt = _make(kind, fresh, seed=None)
    assert fresh_opt.seed != 99
    fresh_opt.load_state_dict(checkpoint["optim"])
    assert (fresh_opt.seed, fresh_opt.steps) == (99, K)
    if kind != "rwpsgd":
        assert all(fresh_opt.state[p]["fisher"].dtype == torch.float32 for p in fresh.parameters())
    _train(fresh, fresh_opt, data[2 * K:])
    assert_models_equal(straight, fresh, exact=True)
    torch.testing.assert_close(  # BN running statistics too
        dict(straight.named_buffers()), dict(fresh.named_buffers()), rtol=0, atol=0)


def test_fisher_state_stays_float32_for_half_parameters():
    model = small_cnn().to(torch.bfloat16)
    opt = RWPSGD(model.parameters(), lr=0.1, adaptive=True, gamma=0.05, seed=1, backend="reference")
    x, y = batches(1)[0]
    opt.zero_grad()
    backward(model, (x.to(torch.bfloat16), y))
    with opt.perturbed():
        backward(model, (x.to(torch.bfloat16), y))
    opt.step()
    state = opt.state_dict()
    other = RWPSGD(model.parameters(), lr=0.1, adaptive=True, seed=2, backend="reference")
    other.load_state_dict(state)
    for p in model.parameters():
        assert other.state[p]["fisher"].dtype == torch.float32
        assert torch.equal(other.state[p]["fisher"], opt.state[p]["fisher"])
        assert other.state[p]["fisher"] is not opt.state[p]["fisher"]
