"""What the ops write is visible to autograd, and nothing they write can alias another argument.

Every backend that runs on CPU tensors here (the reference, the C++ CPU kernels, Triton's interpreter)
bumps the version counter of each tensor it writes, as torch's in-place ops do: a backward through a
graph that saved a weight the op then changed raises instead of returning gradients computed at a mix
of clean and perturbed weights. Any overlap between a written tensor and another tensor of the call is
refused before anything is modified, whatever the positions of the two in their lists.
"""
import pytest
import torch

import rwp_kernels as rk
from rwp_kernels.optim import RWPSGD

BACKENDS = rk.available_backends("cpu")
WRITTEN = {
    "perturb_": ("params", "backups", "grads"),
    "restore_": ("params", "grads", "fisher"),
    "sgd_step_": ("params", "momentum_buffers", "fisher"),
}


def make(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 3, generator=g), torch.randn(5, generator=g)][:n]


def like(params, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=g) for p in params]


def arguments(op):
    """Every tensor argument of ``op``, by name."""
    params = make()
    args = dict(params=params, grads=like(params, 1), fisher=[t.abs() for t in like(params, 2)])
    if op == "perturb_":
        args.update(backups=[torch.empty_like(p) for p in params])
    elif op == "restore_":
        args.update(backups=like(params, 3), clean_grads=like(params, 4))
    else:
        args.update(momentum_buffers=like(params, 3), backups=like(params, 4), clean_grads=like(params, 5))
    return args


def run_all(op, args, backend):
    """``op`` with every optional tensor argument."""
    if op == "perturb_":
        rk.perturb_(args["params"], gamma=0.1, seed=3, step=0, backups=args["backups"], grads=args["grads"],
                    grad_scale=0.5, fisher=args["fisher"], eta=0.1, backend=backend)
    elif op == "restore_":
        rk.restore_(args["params"], backups=args["backups"], grads=args["grads"], grad_scale=0.5,
                    fisher=args["fisher"], beta=0.9, clean_grads=args["clean_grads"], clean_scale=0.5, backend=backend)
    else:
        rk.sgd_step_(args["params"], args["grads"], args["momentum_buffers"], lr=0.1, momentum=0.9,
                     backups=args["backups"], fisher=args["fisher"], beta=0.9, clean_grads=args["clean_grads"],
                     clean_scale=0.5, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", WRITTEN)
def test_every_written_tensor_and_only_those_get_a_new_version(op, backend):
    args = arguments(op)
    before = {name: [t._version for t in tensors] for name, tensors in args.items()}
    run_all(op, args, backend)
    for name, tensors in args.items():
        after = [t._version for t in tensors]
        if name in WRITTEN[op]:
            assert all(a > b for a, b in zip(after, before[name])), f"{op} on {backend}: {name} written, same version"
        else:
            assert after == before[name], f"{op} on {backend}: {name} is only read but its version changed"


def tiny_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_after_perturb_raises_instead_of_mixing_weights(backend):
    model = tiny_model()
    opt = RWPSGD(model.parameters(), lr=0.1, gamma=0.1, alpha=0.5, seed=1, backend=backend)
    loss = model(torch.randn(4, 6)).pow(2).sum()
    opt.perturb()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_after_an_update_raises(backend):
    model = tiny_model()
    params = list(model.parameters())
    loss = model(torch.randn(4, 6)).pow(2).sum()
    rk.sgd_step_(params, [torch.ones_like(p) for p in params], None, lr=0.1, backend=backend)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def aliasing_cases():
    a, b, buf, g = torch.randn(6), torch.randn(6), torch.randn(6), torch.randn(6)
    base = torch.randn(8)
    return {
        "one backup for two params": (
            "perturb_", dict(params=[a, b], backups=[buf, buf]), ("backups[1]", "backups[0]")),
        "a param as another's backup": (
            "perturb_", dict(params=[a, b], backups=[b, buf]), ("backups[0]", "params[1]")),
        "a param as another's gradient": (
            "sgd_step_", dict(params=[a, b], grads=[b, g]), ("grads[0]", "params[1]")),
        "overlapping views as params": (
            "perturb_", dict(params=[base[0:6], base[2:8]]), ("params[1]", "params[0]")),
        "a gradient as a Fisher state": (
            "restore_", dict(params=[a], backups=[buf], grads=[g], fisher=[g]), ("fisher[0]", "grads[0]")),
        "a momentum buffer as a backup": (
            "sgd_step_", dict(params=[a], grads=[g], momentum_buffers=[buf], backups=[buf]),
            ("backups[0]", "momentum_buffers[0]")),
    }


def run_op(op, kw, backend):
    kw = dict(kw)
    if op == "perturb_":
        return rk.perturb_(kw.pop("params"), gamma=0.1, seed=0, step=0, backend=backend, **kw)
    if op == "restore_":
        return rk.restore_(kw.pop("params"), backend=backend, **kw)
    momentum = 0.9 if "momentum_buffers" in kw else 0.0
    return rk.sgd_step_(kw.pop("params"), kw.pop("grads"), kw.pop("momentum_buffers", None), lr=0.1,
                        momentum=momentum, backend=backend, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(aliasing_cases()))
def test_any_overlap_with_a_written_tensor_is_refused_before_writing(case, backend):
    op, kw, names = aliasing_cases()[case]
    tensors = {id(t): t for v in kw.values() for t in v}
    before = {k: t.clone() for k, t in tensors.items()}
    with pytest.raises(ValueError, match="overlaps") as err:
        run_op(op, kw, backend)
    message = str(err.value)
    assert message.startswith(op)
    for name in names:
        assert name in message, message
    for k, t in tensors.items():
        assert torch.equal(t, before[k]), f"{case}: a tensor changed although the call was refused"


@pytest.mark.parametrize("backend", BACKENDS)
def test_disjoint_views_and_tensors_read_twice_are_accepted(backend):
    base = torch.randn(12)
    params = [base[0:6], base[6:12]]
    shared_read = torch.randn(6)
    before = base.clone()
    rk.sgd_step_(params, [shared_read, shared_read], None, lr=0.1, clean_grads=[shared_read, shared_read],
                 clean_scale=0.5, backend=backend)
    assert torch.allclose(base, before - 0.1 * 1.5 * shared_read.repeat(2))


def test_meta_tensors_are_refused_by_name():
    with pytest.raises(TypeError, match=r"backups\[0\] .*meta tensor"):
        rk.perturb_([torch.randn(3)], gamma=0.1, seed=0, step=0, backups=[torch.empty(3, device="meta")],
                    backend="reference")
    with pytest.raises(TypeError, match="counter is a meta tensor"):
        rk.philox4x32_10(torch.empty(1, 4, dtype=torch.int64, device="meta"), torch.zeros(1, 2, dtype=torch.int64))


@pytest.mark.parametrize("dtype", [torch.uint32, torch.uint16, torch.int32, torch.uint8])
def test_philox_takes_unsigned_and_narrow_integer_words(dtype):
    counter = torch.tensor([[1, 2, 3, 4], [0, 0, 0, 0]])
    key = torch.tensor([[5, 6], [7, 8]])
    expected = rk.philox4x32_10(counter, key, backend="reference")
    assert torch.equal(rk.philox4x32_10(counter.to(dtype), key.to(dtype), backend="reference"), expected)


def test_philox_refuses_uint64_words_beyond_32_bits():
    counter = torch.tensor([[2**63, 0, 0, 0]], dtype=torch.uint64)
    with pytest.raises(ValueError, match=r"counter words must lie in \[0, 2\*\*32\)"):
        rk.philox4x32_10(counter, torch.zeros(1, 2, dtype=torch.int64))


@pytest.mark.parametrize("backend", BACKENDS)
def test_noise_offsets_up_to_the_int64_limit(backend):
    last = rk.noise(3, seed=5, offset=2**63 - 3, backend=backend)
    assert torch.allclose(last, rk.noise(3, seed=5, offset=2**63 - 3, backend="reference"), atol=1e-5)
    for offset, numel in ((2**63, 1), (2**63 - 2, 3)):
        with pytest.raises(ValueError, match="offset"):
            rk.noise(numel, seed=5, offset=offset, backend=backend)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_scales_are_refused_as_numbers_and_as_cpu_tensors(value):
    p = [torch.randn(3)]
    for scale in (value, torch.tensor(value)):
        with pytest.raises(ValueError, match="grad_scale is .*; it must be finite"):
            rk.sgd_step_(p, [torch.randn(3)], None, lr=0.1, grad_scale=scale, backend="reference")


def test_every_op_and_the_optimizer_refuse_to_run_under_cuda_graph_capture(monkeypatch):
    """The capture status is faked (no GPU here): every op raises before touching anything, and so does the
    optimizer (through the ops), leaving the weights as they were."""
    from rwp_kernels import _validate

    monkeypatch.setattr(_validate, "capturing", lambda device: True)
    p = make()
    before = [t.clone() for t in p]
    calls = {
        "perturb_": lambda: rk.perturb_(p, gamma=0.1, seed=0, step=0, backend="reference"),
        "restore_": lambda: rk.restore_(p, backups=like(p, 1), backend="reference"),
        "sgd_step_": lambda: rk.sgd_step_(p, like(p, 2), None, lr=0.1, backend="reference"),
        "noise": lambda: rk.noise(4, seed=0, backend="reference"),
        "philox4x32_10": lambda: rk.philox4x32_10(torch.zeros(1, 4, dtype=torch.int64),
                                                  torch.zeros(1, 2, dtype=torch.int64), backend="reference"),
    }
    for op, call in calls.items():
        with pytest.raises(RuntimeError, match=rf"{op}: a CUDA graph is being captured"):
            call()
    assert all(torch.equal(a, b) for a, b in zip(p, before))
    model = tiny_model()
    opt = RWPSGD(model.parameters(), lr=0.1, gamma=0.1, seed=1, backend="reference")
    model(torch.randn(4, 6)).pow(2).sum().backward()
    weights = [q.detach().clone() for q in model.parameters()]
    with pytest.raises(RuntimeError, match="a CUDA graph is being captured"):
        opt.perturb()
    assert not opt.is_perturbed and all(torch.equal(q.detach(), w) for q, w in zip(model.parameters(), weights))


def test_capture_status_is_read_only_for_cuda_tensors():
    from rwp_kernels import _validate

    assert not _validate.capturing(torch.device("cpu"))
