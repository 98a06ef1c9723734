"""Bad input gets a clear error naming the offending argument, and leaves every tensor untouched;
backend selection says why a backend is unavailable."""
import warnings

import pytest
import torch

import rwp_kernels as R
from rwp_kernels import backends


def good_params():
    torch.manual_seed(0)
    return [torch.randn(4, 3), torch.randn(3)]


def _comparable(tensors):
    return [t for t in tensors if isinstance(t, torch.Tensor) and t.layout == torch.strided and t.device.type != "meta"]


def snapshot(tensors):
    return [t.clone() for t in _comparable(tensors)]


def assert_untouched(before, after):
    after = _comparable(after)
    assert len(before) == len(after)
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def dense_like(params):
    """Companion tensors for the parameters (of the parameters' shape, dense even for a sparse one)."""
    return [torch.zeros(p.shape, dtype=p.dtype) for p in params if isinstance(p, torch.Tensor)]


def call_perturb(params, **kw):
    return R.perturb_(params, **{"gamma": 0.1, "seed": 0, "step": 0, "backend": "reference", **kw})


def call_restore(params, **kw):
    return R.restore_(params, **{"backups": dense_like(params), "backend": "reference", **kw})


def call_sgd(params, **kw):
    grads = kw.pop("grads", dense_like(params))
    return R.sgd_step_(params, grads, None, **{"lr": 0.1, "backend": "reference", **kw})


OPS = {"perturb_": call_perturb, "restore_": call_restore, "sgd_step_": call_sgd}


def bad_param_cases():
    p = good_params()
    return {
        "empty list": ([], "params is empty"),
        "empty tensor": ([p[0], torch.empty(0, 3)], r"params\[1\] \(shape \(0, 3\).*is empty"),
        "integer tensor": ([p[0], torch.ones(3, dtype=torch.int64)], r"params\[1\] .*torch.int64.*supported"),
        "sparse tensor": ([p[0], torch.eye(3).to_sparse()], r"params\[1\] .*sparse"),
        "transposed": ([p[0], torch.randn(3, 5).t()], r"params\[1\] .*not dense"),
        "strided slice": ([torch.randn(8)[::2], p[1]], r"params\[0\] .*not dense"),
        "meta tensor": ([p[0], torch.empty(3, device="meta")], r"params\[1\] .*is a meta tensor, which has no data"),
        "same tensor twice": ([p[0], p[0]], r"params\[1\] overlaps params\[0\] in memory"),
        "not a tensor": ([p[0], [1.0, 2.0]], r"params\[1\] must be a torch.Tensor"),
        "single tensor": (p[0], "must be a list of tensors"),
    }


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("case", list(bad_param_cases()))
def test_bad_params_are_named_and_nothing_changes(op, case):
    params, message = bad_param_cases()[case]
    before = snapshot(params if isinstance(params, list) else [params])
    with pytest.raises((ValueError, TypeError), match=message) as err:
        OPS[op](params)
    assert err.value.args[0].startswith(op)
    assert_untouched(before, params if isinstance(params, list) else [params])


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(gamma=-0.1), "gamma is -0.1; it must be >= 0"),
        (dict(gamma=[0.1, -1.0]), r"gamma for params\[1\] is -1.0; it must be >= 0"),
        (dict(gamma=[0.1]), "gamma has 1 entries but params has 2"),
        (dict(gamma=float("nan")), "gamma is nan; it must be finite"),
        (dict(eta=-1.0), "eta is -1.0"),
        (dict(seed=-1), r"seed is -1; it must be in \[0, 18446744073709551616\)"),
        (dict(seed=None), "seed is required"),
        (dict(step=-3), "step is -3"),
        (dict(step=1.5), "step must be an integer"),
        (dict(param_indices=[0]), "param_indices has 1 entries"),
        (dict(param_indices=[3, 3]), r"param_indices\[1\] repeats param_indices\[0\]"),
        (dict(backups=[torch.zeros(4, 3)]), "backups has 1 entries but params has 2"),
        (dict(backups=[torch.zeros(4, 3), torch.zeros(4)]), r"backups\[1\] \(shape \(4,\).*does not match the shape"),
        (dict(backups=[torch.zeros(4, 3), torch.zeros(3, dtype=torch.float16)]), r"backups\[1\] .*float16"),
        (dict(backups=[torch.zeros(3, 4).t(), torch.zeros(3)]), r"backups\[0\] .*not dense"),
        (dict(grads=[torch.zeros(4, 3), torch.zeros(2)]), r"grads\[1\] \(shape \(2,\)"),
        (dict(fisher=[torch.zeros(4, 3), torch.zeros(3, dtype=torch.float64)]), r"fisher\[1\] .*float64.*float32"),
        (dict(grad_scale=torch.ones(2)), "grad_scale .*one-element"),
        (dict(backend="gpu"), "backend must be one of"),
    ],
)
def test_bad_perturb_arguments(kwargs, message):
    params = good_params()
    extras = [t for v in kwargs.values() if isinstance(v, list) for t in v if isinstance(t, torch.Tensor)]
    before = snapshot(params + extras)
    with pytest.raises((ValueError, TypeError), match=message):
        call_perturb(params, **kwargs)
    assert_untouched(before, params + extras)


def test_channels_last_companion_must_match_layout():
    p = torch.randn(4, 3, 2, 2).to(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match=r"backups\[0\] .*has strides .* but params\[0\] has"):
        R.perturb_([p], gamma=0.1, seed=0, step=0, backups=[torch.zeros(4, 3, 2, 2)], backend="reference")
    R.perturb_([p], gamma=0.1, seed=0, step=0, backups=[torch.empty_like(p)], backend="reference")


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(backups=None), "pass either backups"),
        (dict(sigmas=[torch.zeros(4), torch.zeros(1)], seed=0, step=0), "pass either backups"),
        (dict(backups=None, sigmas=[torch.zeros(4), torch.zeros(1)], seed=0), "step is required"),
        (dict(backups=None, sigmas=[torch.zeros(3), torch.zeros(1)], seed=0, step=0),
         r"sigmas\[0\] .*expected a 1-D tensor of 4 entries"),
        (dict(backups=None, sigmas=[torch.zeros(4), torch.zeros(2)], seed=0, step=0),
         r"sigmas\[1\] .*1 or 3 entries"),
        (dict(fisher=[torch.zeros(4, 3), torch.zeros(3)]), "fisher and clean_grads need grads"),
        (dict(grads=[torch.zeros(4, 3), None], fisher=[torch.zeros(4, 3), torch.zeros(3)]),
         r"grads\[1\] is None but fisher is given"),
        (dict(beta=-0.5, grads=[torch.zeros(4, 3), torch.zeros(3)]), "beta is -0.5"),
    ],
)
def test_bad_restore_arguments(kwargs, message):
    params = good_params()
    before = snapshot(params)
    with pytest.raises((ValueError, TypeError), match=message):
        call_restore(params, **kwargs)
    assert_untouched(before, params)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(lr=-0.1), "lr is -0.1"),
        (dict(momentum=-0.9), "momentum is -0.9"),
        (dict(weight_decay=-1e-4), "weight_decay is -0.0001"),
        (dict(nesterov=True), "nesterov needs momentum > 0"),
        (dict(momentum=0.9), "momentum_buffers is required"),
        (dict(grads=[torch.zeros(4, 3), None]), r"grads\[1\] is None; every parameter in the call needs one"),
        (dict(grads=[torch.zeros(4, 3)]), "grads has 1 entries but params has 2"),
        (dict(found_inf=1.0), "found_inf must be a one-element tensor"),
        (dict(clean_grads=[torch.zeros(4, 3), torch.zeros(3, 1)]), r"clean_grads\[1\] .*does not match"),
    ],
)
def test_bad_sgd_step_arguments(kwargs, message):
    params = good_params()
    before = snapshot(params)
    with pytest.raises((ValueError, TypeError), match=message):
        call_sgd(params, **kwargs)
    assert_untouched(before, params)


def test_noise_rejects_bad_arguments():
    with pytest.raises(ValueError, match="numel is -1"):
        R.noise(-1, seed=0, backend="reference")
    with pytest.raises(ValueError, match=r"param_index is 4294967296"):
        R.noise(4, seed=0, param_index=2**32, backend="reference")
    with pytest.raises(ValueError, match="offset is -4"):
        R.noise(4, seed=0, offset=-4, backend="reference")


def test_unavailable_backends_say_why():
    everywhere = {"cpu", "cuda"} if torch.cuda.is_available() else {"cpu"}
    for name in backends.REGISTRY:
        for device_type in everywhere:
            reason = backends.unavailable_reason(name, device_type)
            if reason is None:
                continue
            assert reason, f"{name} on {device_type}: empty reason"
            with pytest.raises(R.BackendUnavailableError, match=f"backend '{name}' is not available for {device_type}"):
                R.noise(4, seed=0, device=device_type, backend=name)
    assert "reference" in R.available_backends()
    assert set(R.available_backends()) <= set(backends.REGISTRY)


def test_auto_falls_back_to_reference_with_one_warning(monkeypatch):
    monkeypatch.setattr(backends, "AUTO_ORDER", {"cpu": ("cuda",)})
    monkeypatch.setattr(backends, "_warned_fallback", set())
    with pytest.warns(RuntimeWarning, match="using the pure-PyTorch reference backend") as record:
        z = R.noise(8, seed=3)
    assert len(record) == 1 and "cuda: it runs on CUDA tensors" in str(record[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(R.noise(8, seed=3), z)
    assert torch.equal(z, R.noise(8, seed=3, backend="reference"))


def test_float64_goes_to_the_reference_within_one_call(monkeypatch):
    """A fused backend never sees float64 tensors; the reference takes them in the same call."""
    from rwp_kernels import reference

    seen = []

    class Recorder:
        def __getattr__(self, name):
            def call(params, **kw):
                seen.append([p.dtype for p in params])
                return getattr(reference, name)(params, **kw)
            return call

    fused = backends.Backend("cpu", "records calls", ("cpu",), backends.FUSED_DTYPES, lambda t: Recorder())
    monkeypatch.setitem(backends.REGISTRY, "cpu", fused)
    monkeypatch.setattr(backends, "_loaded", {})
    params = [torch.randn(3, 2), torch.randn(4, dtype=torch.float64), torch.randn(2).half()]
    sigmas = R.perturb_(params, gamma=0.1, seed=0, step=0, backend="cpu")
    assert seen == [[torch.float32, torch.float16]]
    assert [s.shape for s in sigmas] == [(3,), (1,), (1,)]
