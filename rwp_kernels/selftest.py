"""Every available fused backend against the reference backend, on a real model's parameters.

This is the acceptance test of the kernels on the user's own hardware (``python -m rwp_kernels.report
--selftest``). Each check runs one op on identical copies of the same tensors (a model's parameters plus
the fast subset of the conformance sweep: rows longer than a tile, rows of one element, 0-D, channels_last,
views at an odd offset) with the backend under test and with the reference. The known answers and the
tolerances come from ``rwp_kernels.conformance`` (docs/spec.md section 6, "Self-test"). Copies (backups,
exact restore, the found_inf skip) and Philox integers must match bit for bit, and so must the normals of
a backend that evaluates the reference's float32 Box-Muller (conformance.noise_rule: every backend today;
one without that rule: within 1e-5 * (1 + |z|)). Computed values must lie within a tolerance: weights, buffers and sigmas within a few
ulps of their dtype relative to the magnitudes involved, plus, where noise enters and the normals may
differ, the normals' tolerance scaled by sigma.
A check reports its largest error as a multiple of its tolerance (passes when <= 1) or as a count of
mismatching elements (passes when 0).
"""
import statistics
import time
from dataclasses import dataclass

import torch

from . import backends, ops
from .conformance import EXACT, PHILOX_KAT, clone_all, noise_bound, noise_rule, perturbation_tolerance, sweep_params
from .conformance import ulp_tolerance as _ulp_tol
from .models import resnet18, small_cnn

TOLERANCE_UNIT = "x tolerance"
MISMATCH_UNIT = "mismatches"


@dataclass
class CheckResult:
    backend: str
    device: str
    check: str
    passed: bool
    error: float
    unit: str  # TOLERANCE_UNIT or MISMATCH_UNIT
    ms: float  # median time of the op under test in milliseconds; nan where not timed


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_ms(device: torch.device, repeats: int, setup, run) -> float:
    """Median wall time of ``run(setup())`` in ms; ``setup`` (fresh inputs) is not timed."""
    times = []
    for _ in range(repeats):
        inputs = setup()
        _sync(device)
        start = time.perf_counter()
        run(inputs)
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _ratio(actual, expected, allowed) -> float:
    """Largest |actual - expected| / allowed over lists of tensors (allowed: elementwise tensors)."""
    worst = 0.0
    for a, e, tol in zip(actual, expected, allowed):
        diff = (a.double() - e.double()).abs()
        worst = max(worst, (diff / tol.double().clamp_min(torch.finfo(torch.float64).tiny)).max().item())
    return worst


def _mismatches(actual, expected) -> float:
    return float(sum(int((a != e).sum()) for a, e in zip(actual, expected)))


def _model_params(model: str, dtype: torch.dtype, device: torch.device, seed: int) -> list[torch.Tensor]:
    torch.manual_seed(seed)
    net = resnet18() if model == "resnet18" else small_cnn()
    params = [p.detach().to(device=device, dtype=dtype) for p in net.parameters()]
    # one convolution weight in channels_last, as a channels_last model would have it
    conv = next(i for i, p in enumerate(params) if p.dim() == 4)
    params[conv] = params[conv].contiguous(memory_format=torch.channels_last)
    return params + sweep_params(dtype, seed=seed, device=device, fast=True)


def _clone(tensors):
    """Copies with the same layout (channels_last, a view's offset)."""
    return clone_all(tensors)


class _Checks:
    def __init__(self, backend: str, device: torch.device, repeats: int, model: str):
        self.backend, self.device, self.repeats, self.model = backend, device, repeats, model
        self.results: list[CheckResult] = []
        self.noise_rule = noise_rule(backend)  # EXACT: the reference's normals bit for bit

    def record(self, check, error, unit, ms=float("nan")):
        passed = error <= 1 if unit == TOLERANCE_UNIT else error == 0
        self.results.append(CheckResult(self.backend, str(self.device), check, passed, error, unit, ms))

    def both(self, op: str, make_args, **kwargs):
        """Run ``op`` on fresh inputs with the backend under test and with the reference; time the former."""
        mine = make_args()
        out = getattr(ops, op)(**mine, **kwargs, backend=self.backend)
        ref = make_args()
        ref_out = getattr(ops, op)(**ref, **kwargs, backend="reference")
        ms = _median_ms(self.device, self.repeats, make_args,
                        lambda args: getattr(ops, op)(**args, **kwargs, backend=self.backend))
        return mine, out, ref, ref_out, ms

    def philox(self):
        gen = torch.Generator().manual_seed(1)
        counters = torch.randint(0, 2**32, (4096, 4), generator=gen, dtype=torch.int64)
        keys = torch.randint(0, 2**32, (4096, 2), generator=gen, dtype=torch.int64)
        counters = torch.cat([counters, torch.tensor([c for c, _, _ in PHILOX_KAT])])
        keys = torch.cat([keys, torch.tensor([k for _, k, _ in PHILOX_KAT])])
        out = ops.philox4x32_10(counters.to(self.device), keys.to(self.device), backend=self.backend).cpu()
        expected = ops.philox4x32_10(counters, keys, backend="reference")
        expected[-len(PHILOX_KAT):] = torch.tensor([e for _, _, e in PHILOX_KAT])
        self.record("philox4x32_10 (bit for bit, incl. Random123 vectors)", _mismatches([out], [expected]),
                    MISMATCH_UNIT)

    def noise(self):
        args = dict(seed=0x1234_5678_9ABC_DEF0, param_index=77, step=2**32 + 9, stream=3, offset=5)
        n = 1 << 20
        z = ops.noise(n, device=self.device, backend=self.backend, **args).cpu()
        ref = ops.noise(n, device="cpu", backend="reference", **args)
        ms = _median_ms(self.device, self.repeats, lambda: None,
                        lambda _: ops.noise(n, device=self.device, backend=self.backend, **args))
        if self.noise_rule == EXACT:
            mismatches = float((z.view(torch.int32) != ref.view(torch.int32)).sum())
            self.record("noise (1M normals, bit for bit)", mismatches, MISMATCH_UNIT, ms)
        else:
            self.record("noise (1M normals)", _ratio([z], [ref], [noise_bound(ref)]), TOLERANCE_UNIT, ms)

    def perturb_restore(self, dtype: torch.dtype, model: str):
        tag = f"{model} {str(dtype).removeprefix('torch.')}"
        clean = _model_params(model, dtype, self.device, seed=2)
        grads = [torch.randn_like(p) for p in clean]

        def make_args():
            params = _clone(clean)
            return dict(params=params, backups=[torch.empty_like(p) for p in params], grads=_clone(grads))

        kw = dict(gamma=0.01, seed=99, step=5, stream=1, grad_scale=0.37)
        mine, sigmas, ref, ref_sigmas, ms = self.both("perturb_", make_args, **kw)
        error = max(
            _ratio(sigmas, ref_sigmas, [_ulp_tol(torch.float32, s) for s in ref_sigmas]),
            _ratio(mine["params"], ref["params"], perturbation_tolerance(clean, ref["params"], ref_sigmas, self.noise_rule)),
        )
        self.record(f"perturb_ {tag} (sigmas, weights)", error, TOLERANCE_UNIT, ms)
        copies = _mismatches(mine["backups"], clean) + _mismatches(mine["grads"], ref["grads"])
        self.record(f"perturb_ {tag} (backups, scaled grads: bit for bit)", copies, MISMATCH_UNIT)

        perturbed, backup = mine["params"], mine["backups"]
        regen = _clone(perturbed)
        ops.restore_(regen, sigmas=sigmas, seed=99, step=5, stream=1, backend=self.backend)
        deltas = [p.double() - c.double() for p, c in zip(perturbed, clean)]
        self.record(f"restore_ regenerated {tag} (within rounding)",
                    _ratio(regen, clean, [_ulp_tol(dtype, c, d) for c, d in zip(clean, deltas)]), TOLERANCE_UNIT)

        ms = _median_ms(self.device, self.repeats, lambda: _clone(perturbed),
                        lambda params: ops.restore_(params, backups=backup, backend=self.backend))
        ops.restore_(perturbed, backups=backup, backend=self.backend)
        self.record(f"restore_ exact {tag} (bit for bit)", _mismatches(perturbed, clean), MISMATCH_UNIT, ms)

    def sgd_step(self, dtype: torch.dtype, model: str):
        tag = f"{model} {str(dtype).removeprefix('torch.')}"
        clean = _model_params(model, dtype, self.device, seed=3)
        grads = [torch.randn_like(p) * 0.1 for p in clean]
        bufs = [torch.randn_like(p) * 0.1 for p in clean]
        hyper = dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=5e-4, nesterov=True, grad_scale=0.5)

        def make_args():
            params = [c + 0.01 for c in clean]  # "perturbed": the step must restore from the backups first
            return dict(params=params, grads=_clone(grads), momentum_buffers=_clone(bufs), backups=_clone(clean))

        mine, _, ref, _, ms = self.both("sgd_step_", make_args, **hyper)
        error = max(
            _ratio(mine["params"], ref["params"], [_ulp_tol(dtype, c, 0.1 * g, 0.2 * b) for c, g, b in zip(clean, grads, bufs)]),
            _ratio(mine["momentum_buffers"], ref["momentum_buffers"], [_ulp_tol(dtype, g, b, 1e-3 * c) for c, g, b in zip(clean, grads, bufs)]),
        )
        self.record(f"sgd_step_ {tag} (restore, nesterov momentum, weight decay)", error, TOLERANCE_UNIT, ms)

        skipped = make_args()
        ops.sgd_step_(**skipped, **hyper, found_inf=torch.ones((), device=self.device), backend=self.backend)
        bad = _mismatches(skipped["params"], clean) + _mismatches(skipped["momentum_buffers"], bufs)
        self.record(f"sgd_step_ found_inf {tag} (restore only, bit for bit)", bad, MISMATCH_UNIT)

    def arwp(self, model: str):
        clean = _model_params(model, torch.float32, self.device, seed=4)
        fisher = [torch.rand_like(p) for p in clean]
        grads = [torch.randn_like(p) for p in clean]
        clean_grads = [torch.randn_like(p) for p in clean]

        mine, sigmas, ref, ref_sigmas, _ = self.both(
            "perturb_", lambda: dict(params=_clone(clean), fisher=_clone(fisher)), gamma=0.01, eta=0.5, seed=7, step=1
        )
        error = max(
            _ratio(sigmas, ref_sigmas, [_ulp_tol(torch.float32, s) for s in ref_sigmas]),
            _ratio(mine["params"], ref["params"], perturbation_tolerance(clean, ref["params"], ref_sigmas, self.noise_rule)),
        )
        self.record(f"perturb_ ARWP {model} (Fisher-scaled rows)", error, TOLERANCE_UNIT)

        def make_args():
            return dict(params=_clone(clean), grads=_clone(grads), momentum_buffers=None, fisher=_clone(fisher),
                        clean_grads=_clone(clean_grads))

        kw = dict(lr=0.05, beta=0.99, fisher_scale=0.5, grad_scale=0.5, clean_scale=0.25)
        mine, _, ref, _, _ = self.both("sgd_step_", make_args, **kw)
        error = max(
            _ratio(mine["params"], ref["params"], [_ulp_tol(torch.float32, c, 0.05 * g, 0.05 * cg)
                                                   for c, g, cg in zip(clean, grads, clean_grads)]),
            _ratio(mine["fisher"], ref["fisher"], [_ulp_tol(torch.float32, f) for f in ref["fisher"]]),
        )
        self.record(f"sgd_step_ ARWP {model} (Fisher update, gradient mix)", error, TOLERANCE_UNIT)

    def run_all(self) -> list[CheckResult]:
        self.philox()
        self.noise()
        self.perturb_restore(torch.float32, self.model)
        self.sgd_step(torch.float32, self.model)
        self.arwp(self.model)
        for dtype in (torch.float16, torch.bfloat16):
            self.perturb_restore(dtype, "small_cnn")
            self.sgd_step(dtype, "small_cnn")
        return self.results


def local_devices() -> list[torch.device]:
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices += [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    return devices


def fused_backends() -> list[str]:
    return [name for name in backends.REGISTRY if name != "reference"]


# Triton runs on CPU tensors only in its interpreter (for testing): hours on a real model, so the
# self-test takes it only when it is named.
SKIPPED_UNLESS_NAMED = {("triton", "cpu")}


def run_selftest(backend_names=None, devices=None, *, repeats: int = 5, model: str = "resnet18", progress=None):
    """Check every available fused backend on every device; returns the list of CheckResults.

    ``progress`` (optional) is called with a line of text before each backend/device pair.
    """
    results = []
    for device in devices or local_devices():
        for name in backend_names or fused_backends():
            if backends.unavailable_reason(name, device.type) is not None:
                continue
            if backend_names is None and (name, device.type) in SKIPPED_UNLESS_NAMED:
                continue
            if progress:
                progress(f"checking backend {name!r} on {device} against the reference ...")
            results += _Checks(name, device, repeats, model).run_all()
    return results
