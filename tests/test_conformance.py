"""The conformance suite: every registered backend on every local device (CPU always, CUDA with a GPU) runs
the same cases against the reference backend and against independent facts, under one tolerance model.

The known answers, the tolerance model (docs/spec.md section 6) and the shape/dtype/layout sweep live in
``rwp_kernels/conformance.py`` (the self-test uses them too). A backend that cannot run on a device is
skipped with its reason, or fails where CI requires it (RWP_KERNELS_REQUIRE: "cpp-ext",
"triton-interpret", "cuda-build", "triton-gpu"). Triton's interpreter is slow: in the fast tier it runs
the sweep's fast subset (rows beyond a tile included) and the smaller grids; the whole sweep is ``slow``.

Besides the op-by-op comparisons the suite runs what a mistake in the mixing or the bookkeeping would
break: alpha != 0.5 in both mixing forms (gradients scaled by (1 - alpha) / alpha in perturb_, or the
clean gradient kept aside), missing gradients, rows longer than a tile, GradScaler overflows (found_inf)
and the first momentum step with dampening; and the optimizer layer on every backend: steps skipped by
GradScaler still count, missing gradients, and ARWP's kept-aside mode with alpha 0.3.
"""
import copy
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import rwp_kernels as rk
from conftest import require_backend
from rwp_kernels import backends
from rwp_kernels import conformance as C
from rwp_kernels.conformance import CLOSE, DTYPES, EXACT
from rwp_kernels.layout import flat_view, num_rows
from rwp_kernels.models import resnet18, small_cnn
from rwp_kernels.optim import RWP, RWPSGD, freeze_bn_stats

SEED, STEP, STREAM = 20240611, 7, 3
ALPHA = 0.3  # != 0.5: a swapped clean/perturbed gradient changes the result

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
TARGETS = [(name, dev) for dev in DEVICES for name, b in backends.REGISTRY.items() if dev in b.device_types]


def _interpreted(name, dev):
    return name == "triton" and dev == "cpu"


@dataclass(frozen=True)
class Target:
    name: str
    device: torch.device
    fast: bool  # the sweep's fast subset (Triton's interpreter in the fast tier)

    @property
    def tol(self) -> C.Tolerances:
        return C.TOLERANCES[self.name]

    def params(self, dtype, seed=0):
        return C.sweep_params(dtype, seed=seed, device=self.device, fast=self.fast)

    def index(self, case_name):
        return C.case_index(case_name, self.fast)


def targets(extras=(None,), *, fast=lambda x: True, sweep=False, core=lambda x: False, slow=lambda x: False,
            versus_reference=False):
    """pytest params (name, device, extra, subset) for every target.

    The fast tier runs, per target: with ``sweep``, the sweep's fast subset, except that the C++ CPU backend
    runs the whole sweep for the ``core(extra)`` cases (so the longest rows stay in the fast tier);
    Triton's interpreter only the ``fast(extra)`` extras; nothing of the ``slow(extra)`` extras; the
    reference backend nothing of the tests that only compare with the reference (``sweep`` or
    ``versus_reference``). Everything else, and the whole sweep for every target (Triton's interpreter: for
    the first extra only; the fast subset for the others), is ``slow`` (the reference takes seconds on the
    longest rows).
    """
    out = []
    for name, dev in TARGETS:
        for x in extras:
            tag = "" if x is None else "-" + ("-".join(_id(v) for v in x) if isinstance(x, tuple) else _id(x))
            in_fast_tier = not slow(x) and (fast(x) or not _interpreted(name, dev))
            if name == "reference" and (sweep or versus_reference):
                in_fast_tier = False  # the reference against itself: its checks of independent facts are elsewhere
            if sweep and _interpreted(name, dev) and x is not extras[0]:
                # the interpreter takes seconds per long row: the whole sweep for the first extra only
                out.append(pytest.param(name, dev, x, True, id=f"{name}-{dev}{tag}-fast",
                                        marks=[] if in_fast_tier else [pytest.mark.slow]))
                continue
            if sweep and not (name == "cpu" and core(x)) and dev == "cpu":
                if in_fast_tier:
                    out.append(pytest.param(name, dev, x, True, id=f"{name}-{dev}{tag}-fast"))
                out.append(pytest.param(name, dev, x, False, id=f"{name}-{dev}{tag}", marks=pytest.mark.slow))
            else:
                out.append(pytest.param(name, dev, x, False, id=f"{name}-{dev}{tag}",
                                        marks=[] if in_fast_tier else [pytest.mark.slow]))
    return out


def interpreted_slow(extra) -> bool:
    """``targets``' ``fast`` for the tests whose interpreted cases take 2-5 s each: all of them in the slow tier (the
    fast tier runs the same kernels through Triton's interpreter in the cheaper tests)."""
    return False


def use(name, dev, subset=False) -> Target:
    require_backend(name, dev)
    return Target(name, torch.device(dev), subset)


def assert_ok(errors):
    assert not errors, "\n".join(errors)


def _id(x):
    if isinstance(x, dict):
        return ",".join(f"{k}={v}" for k, v in x.items())
    if isinstance(x, torch.dtype):
        return str(x).removeprefix("torch.")
    return str(x)


def cross(*lists):
    """Product of parameter lists as tuples with readable ids."""
    out = [()]
    for values in lists:
        out = [o + (v,) for o in out for v in values]
    return out


def ids(cases):
    return ["-".join(_id(v) for v in c) for c in cases]


def noise_like(p, index, seed, step, stream=0):
    """The reference stream of parameter ``index`` laid out over ``p`` in memory order (float32)."""
    z = rk.noise(p.numel(), seed=seed, param_index=index, step=step, stream=stream, device=p.device,
                 backend="reference")
    out = torch.empty_like(p, dtype=torch.float32)
    flat_view(out).copy_(z)
    return out


def zero_norm(p) -> bool:
    return p.numel() > 0 and not bool(p.ne(0).any())


# ==== the noise stream ===================================================================================

@pytest.mark.parametrize("name,dev,_x,_s", targets())
def test_philox_known_answers(name, dev, _x, _s):
    t = use(name, dev)
    counter, key, expected = C.philox_kat_tensors(t.device)
    out = rk.philox4x32_10(counter, key, backend=t.name)
    assert out.dtype == torch.int64 and out.device.type == t.device.type
    assert torch.equal(out.cpu(), expected.cpu())


def _philox_inputs():
    gen = torch.Generator().manual_seed(1)
    counter = torch.randint(0, 2**32, (3, 50, 4), generator=gen, dtype=torch.int64)
    counter[0, :4] = torch.tensor([[0, 0, 0, 0], [2**32 - 1] * 4, [2**31] * 4, [2**31 - 1, 2**31, 1, 2**32 - 2]])
    key = torch.randint(0, 2**32, (50, 2), generator=gen, dtype=torch.int64)  # broadcasts over the first dim
    key[:3] = torch.tensor([[0, 0], [2**32 - 1, 2**32 - 1], [2**31, 2**31 - 1]])
    return counter, key


@pytest.mark.parametrize("name,dev,_x,_s", targets())
def test_philox_matches_reference_bitwise_with_broadcasting(name, dev, _x, _s):
    """The cross-backend reproducibility promise: the same 32-bit words on every backend (edge words too)."""
    t = use(name, dev)
    counter, key = _philox_inputs()
    out = rk.philox4x32_10(counter.to(t.device), key.to(t.device), backend=t.name)
    assert out.shape == (3, 50, 4) and out.dtype == torch.int64
    assert torch.equal(out.cpu(), rk.philox4x32_10(counter, key, backend="reference"))
    gen = torch.Generator().manual_seed(0)
    counter = torch.randint(0, 2**32, (1000, 4), generator=gen, dtype=torch.int64)
    key = torch.randint(0, 2**32, (1000, 2), generator=gen, dtype=torch.int64)
    out = rk.philox4x32_10(counter.to(t.device), key.to(t.device), backend=t.name)
    assert torch.equal(out.cpu(), rk.philox4x32_10(counter, key, backend="reference"))


@pytest.mark.parametrize("name,dev,_x,_s", targets())
def test_noise_known_answer(name, dev, _x, _s):
    t = use(name, dev)
    args, values = C.NOISE_KAT
    z = rk.noise(len(values), **args, device=t.device, backend=t.name).cpu()
    want = torch.tensor(values, dtype=torch.float32)  # the published values are float32 values
    assert z.dtype == torch.float32
    assert_ok(C.check(t.tol.noise, [z], [want], "noise"))


NOISE_ARGS_A = dict(seed=SEED, param_index=11, step=2**32 + STEP, stream=STREAM)
NOISE_ARGS_B = dict(seed=0xDEADBEEF12345678, param_index=7, step=2**32 + 5, stream=3)
NOISE_CASES = (
    [("B", numel, offset) for numel, offset in ((1, 0), (10, 3), (4097, 5), (700, 2**32 * 4 - 7))]
    + [("A", numel, offset) for offset in (0, 1, 2, 3, 5, 4 * 2**32 - 6) for numel in (1, 3, 31, 64, 100, 70001)]
    + [("A", 1 << 20, 0), ("A", 1001, 3), ("A", 77, 4 * 2**32 - 6)]
)


# 10^6 normals take 15 s in Triton's interpreter: it runs the other windows
@pytest.mark.parametrize("name,dev,case,_s", [
    p for p in targets(NOISE_CASES, fast=lambda c: c[0] == "B", slow=lambda c: c[1] == 1 << 20, versus_reference=True)
    if not (_interpreted(*p.values[:2]) and p.values[2][1] == 1 << 20)])
def test_noise_matches_reference(name, dev, case, _s):
    t = use(name, dev)
    which, numel, offset = case
    args = dict(NOISE_ARGS_A if which == "A" else NOISE_ARGS_B, offset=offset)
    z = rk.noise(numel, **args, device=t.device, backend=t.name)
    ref = rk.noise(numel, **args, backend="reference")
    assert z.dtype == torch.float32 and z.shape == (numel,) and z.device.type == t.device.type
    z = z.cpu()
    assert_ok(C.check(t.tol.noise, [z], [ref], f"noise ({t.tol.noise})"))
    assert which == "A" or numel < 100 or 0.9 < z.std() < 1.1


@pytest.mark.parametrize("name,dev,_x,_s", targets())
def test_noise_agrees_with_every_other_backend(name, dev, _x, _s):
    """Pairwise, at the extremes of every argument: bit for bit where both backends' normals are the
    reference's bit for bit, else within the normals' tolerance of each other."""
    t = use(name, dev)
    args = dict(seed=2**64 - 1, param_index=2**32 - 1, step=2**32 + 3, stream=5, offset=2**33 + 1)
    z = rk.noise(999, **args, device=t.device, backend=t.name).cpu()
    compared = 0
    for other, odev in TARGETS:
        if backends.unavailable_reason(other, odev) is not None or (other, odev) == (name, dev):
            continue
        z_other = rk.noise(999, **args, device=odev, backend=other).cpu()
        rule = EXACT if C.noise_rule(name) == C.noise_rule(other) == EXACT else C.NOISE_CLOSE
        assert_ok(C.check(rule, [z], [z_other], f"noise against {other!r} on {odev} ({rule})"))
        compared += 1
    assert compared or t.name == "reference"


def test_given_sigma_rule():
    """The C++ backends' rule on perturbed weights: a row with the reference's sigma must match bit for bit
    (one ulp off fails); a row whose sigma is one float32 step away may differ by what that step makes."""
    w = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    z = rk.noise(150, seed=1, backend="reference").view(3, 50)
    sigma_ref = torch.tensor([0.01, 0.02, 0.0])
    sigma = sigma_ref.clone()
    sigma[1] = torch.nextafter(sigma[1], torch.tensor(1.0))
    ref, ours = w + sigma_ref[:, None] * z, w + sigma[:, None] * z
    assert not torch.equal(ref[1], ours[1])
    assert C.check(C.GIVEN_SIGMA, [ours], [ref], "p", sigma=[sigma_ref], actual_sigma=[sigma]) == []
    for row in (0, 2):
        off = ours.clone()
        off[row, 7] = torch.nextafter(off[row, 7], torch.tensor(9.0))
        assert C.check(C.GIVEN_SIGMA, [off], [ref], "p", sigma=[sigma_ref], actual_sigma=[sigma]), row
    off = ours.clone()
    off[1, 7] += 1e-3 * 0.02
    assert C.check(C.GIVEN_SIGMA, [off], [ref], "p", sigma=[sigma_ref], actual_sigma=[sigma])


# ==== perturb_ =============================================================================================

MISSING_GRAD = ("rows27_channels_last", "vector10", "offset_vector")  # parameters without a gradient


def run_perturb(t: Target, backend, params, *, fisher=None, eta=0.0, with_backups=True, with_grads=True,
                gamma=None, grad_scale=0.3):
    params = C.clone_all(params)
    n = len(params)
    backups = [torch.empty_like(p) for p in params] if with_backups else None
    grads = None
    if with_grads:
        grads = C.like(params, seed=5)
        for name in MISSING_GRAD:
            grads[t.index(name)] = None
    gamma = [0.01 * (1 + i % 4) for i in range(n)] if gamma is None else gamma
    sigmas = rk.perturb_(params, gamma=gamma, seed=SEED, step=STEP, stream=STREAM,
                         param_indices=[3 * i + 1 for i in range(n)], backups=backups, grads=grads,
                         grad_scale=grad_scale, fisher=C.clone_all(fisher), eta=eta, backend=backend)
    return params, sigmas, backups, grads


def check_perturbed(t: Target, orig, ours, ref):
    params, sigmas, backups, grads = ours
    rparams, rsigmas, rbackups, rgrads = ref
    errors = []
    for i, (s, rs) in enumerate(zip(sigmas, rsigmas)):
        assert s.dtype == torch.float32 and s.shape == rs.shape and s.device == rs.device, f"sigmas[{i}]"
        torch.testing.assert_close(s, rs, rtol=t.tol.sigma_rtol, atol=0, msg=lambda m: f"sigmas[{i}]: {m}")
    errors += C.check(t.tol.perturbed, params, rparams, "params", sigma=rsigmas, actual_sigma=sigmas)
    if backups is not None:
        errors += C.check(EXACT, backups, orig, "backups")
    if grads is not None:
        errors += C.check(EXACT, grads, rgrads, "grads")
    assert_ok(errors)


@pytest.mark.parametrize("name,dev,case,subset", targets(
    cross(DTYPES, ("rwp", "arwp")), sweep=True, core=lambda c: c[0] == torch.float32,
    fast=lambda c: c == (torch.float32, "rwp")))
def test_perturb_matches_reference(name, dev, case, subset):
    dtype, mode = case
    t = use(name, dev, subset)
    params = t.params(dtype)
    kw = dict(fisher=C.fisher_like(params, seed=9), eta=0.3) if mode == "arwp" else {}
    ours, ref = run_perturb(t, t.name, params, **kw), run_perturb(t, "reference", params, **kw)
    check_perturbed(t, params, ours, ref)
    for i, (p, p0) in enumerate(zip(ours[0], params)):  # one element may round back (bfloat16)
        assert not torch.equal(p, p0) or zero_norm(p0) or p0.numel() == 1, f"params[{i}] was not perturbed"
    for name_ in MISSING_GRAD:
        assert ours[3][t.index(name_)] is None
    if mode == "arwp":  # a 0-D/1-D parameter's Fisher rows are single elements
        assert ours[1][t.index("vector3000")].shape == (3000,) and ours[1][t.index("scalar")].shape == (1,)
    else:
        assert all(s.numel() == num_rows(p) for s, p in zip(ours[1], params))
    if t.name == "reference":  # the oracle against the float64 norms
        for i, (s, p) in enumerate(zip(ours[1], params)):
            w = p.double()
            norm = w.reshape(w.shape[0], -1).norm(dim=1) if w.dim() >= 2 else (w.norm() + 1e-16).reshape(1)
            want = 0.01 * (1 + i % 4) * norm
            if mode == "arwp":
                f = C.fisher_like(params, seed=9)[i].double()
                rows = f.reshape(w.shape[0], -1).sum(1) if w.dim() >= 2 else f.reshape(-1)
                want = want / torch.sqrt(1 + 0.3 * rows)
            torch.testing.assert_close(s.double(), want, rtol=C.REFERENCE_SIGMA_RTOL, atol=0)


@pytest.mark.parametrize("name,dev,_x,subset", targets(sweep=True))
def test_perturb_gamma_zero_leaves_weights_untouched(name, dev, _x, subset):
    t = use(name, dev, subset)
    params = t.params(torch.float32)
    params[0].view(-1)[0] = -0.0
    p = C.clone_all(params)
    sigmas = rk.perturb_(p, gamma=0.0, seed=1, step=1, backend=t.name)
    assert_ok(C.check(EXACT, p, params, "params"))
    assert all(torch.equal(s, torch.zeros_like(s)) for s in sigmas)
    assert torch.signbit(p[0].view(-1)[0])


@pytest.mark.parametrize("name,dev,case,subset", targets(
    [(torch.float16, None), (torch.bfloat16, 3.0), (torch.float32, 0.25)], sweep=True,
    fast=interpreted_slow))
def test_perturb_without_backups_or_grads_and_tensor_scale(name, dev, case, subset):
    dtype, scale = case
    t = use(name, dev, subset)
    params = t.params(dtype)
    kw = dict(with_backups=False, with_grads=scale is not None,
              grad_scale=1.0 if scale is None else torch.tensor(scale, device=t.device))
    ours, ref = run_perturb(t, t.name, params, **kw), run_perturb(t, "reference", params, **kw)
    check_perturbed(t, params, ours, ref)
    if scale == 0.25:  # a power of two: the scaled gradient is exact
        want = [None if o is None else g * 0.25 for o, g in zip(ours[3], C.like(params, seed=5))]
        assert_ok(C.check(EXACT, ours[3], want, "grads"))


@pytest.mark.parametrize("name,dev,_x,_s", targets())
def test_perturb_backups_missing_grads_and_per_tensor_gamma(name, dev, _x, _s):
    t = use(name, dev)
    gen = torch.Generator().manual_seed(2)
    params = [torch.randn(s, generator=gen).to(t.device) for s in ((8, 4), (8,), (3, 2, 2))]
    clean = C.clone_all(params)
    grads = [torch.randn(p.shape, generator=gen).to(t.device) for p in params]
    grads_before = C.clone_all(grads)
    backups = [torch.empty_like(p) for p in params]
    rk.perturb_(params, gamma=[0.1, 0.0, 0.2], seed=3, step=1, backups=backups,
                grads=[grads[0], None, grads[2]], grad_scale=0.25, backend=t.name)
    assert all(torch.equal(b, c) for b, c in zip(backups, clean))
    assert torch.equal(params[1], clean[1]), "gamma 0 leaves the tensor untouched"
    assert not torch.equal(params[0], clean[0]) and not torch.equal(params[2], clean[2])
    assert torch.equal(grads[0], grads_before[0] * 0.25)
    assert torch.equal(grads[1], grads_before[1]), "a None grad entry is skipped"
    assert torch.equal(grads[2], grads_before[2] * 0.25)


@pytest.mark.parametrize("name,dev,_x,_s", targets())
def test_float64_goes_to_the_reference_in_the_same_call(name, dev, _x, _s):
    t = use(name, dev)
    gen = torch.Generator().manual_seed(3)
    params = [torch.randn(4, 5, generator=gen, dtype=torch.float64).to(t.device),
              torch.randn(4, 5, generator=gen).to(t.device)]
    ref = C.clone_all(params)
    s = rk.perturb_(params, gamma=0.01, seed=1, step=1, backend=t.name)
    r = rk.perturb_(ref, gamma=0.01, seed=1, step=1, backend="reference")
    assert torch.equal(params[0], ref[0]) and torch.equal(s[0], r[0])
    torch.testing.assert_close(s[1], r[1], rtol=max(t.tol.sigma_rtol, 1e-6) if t.name != "reference" else 0, atol=0)


# ==== restore_ =============================================================================================

@pytest.mark.parametrize("name,dev,dtype,subset", targets(DTYPES, sweep=True, core=lambda d: d == torch.float32,
                                                         fast=interpreted_slow))
def test_restore_exact_is_bitwise(name, dev, dtype, subset):
    t = use(name, dev, subset)
    orig = t.params(dtype)
    params, _, backups, _ = run_perturb(t, t.name, orig)
    assert any(not torch.equal(p, o) for p, o in zip(params, orig))
    rk.restore_(params, backups=backups, backend=t.name)
    assert_ok(C.check(EXACT, params, orig, "params"))


REGEN_CASES = [(d, a, "as_returned") for d in DTYPES for a in (False, True)] + [(torch.float32, True, "separate")]


@pytest.mark.parametrize("name,dev,case,subset", targets(
    REGEN_CASES, sweep=True, core=lambda c: c == (torch.float32, False, "as_returned"),
    fast=interpreted_slow))
def test_restore_regenerated_within_bound(name, dev, case, subset):
    """perturb_ then restore_ from the sigmas: within the backend's bound of the weights before perturb_,
    and within its tolerance of the reference's restore_ of the same perturbed weights."""
    dtype, adaptive, sigma_buffer = case
    t = use(name, dev, subset)
    orig = t.params(dtype)
    n = len(orig)
    fisher = C.fisher_like(orig, seed=9) if adaptive else None
    kw = dict(seed=SEED, step=2**32 + 1, stream=1, param_indices=list(range(10, 10 + n)))
    params = C.clone_all(orig)
    sigmas = rk.perturb_(params, gamma=0.05, fisher=fisher, eta=0.5, backend=t.name, **kw)
    by_reference = C.clone_all(orig)  # a tiny tensor's perturbation can round away (a bf16 scalar)
    rk.perturb_(by_reference, gamma=0.05, fisher=fisher, eta=0.5, backend="reference", **kw)
    if sigma_buffer == "separate":
        sigmas = [s.clone() for s in sigmas]
    perturbed, p_ref = C.clone_all(params), C.clone_all(params)
    rk.restore_(params, sigmas=sigmas, backend=t.name, **kw)
    rk.restore_(p_ref, sigmas=sigmas, backend="reference", **kw)
    errors = C.check(t.tol.restored, params, p_ref, "restored vs. the reference's restore_")
    for i, (p, o, q, s, r) in enumerate(zip(params, orig, perturbed, sigmas, by_reference)):
        assert not torch.equal(q, o) or torch.equal(r, o), f"params[{i}] was not perturbed"
        sigma_z = (C.per_element(s, o).double() * noise_like(o, 10 + i, SEED, 2**32 + 1, stream=1).double()
                   if t.tol.regenerated == "eps" else None)
        bound = C.regenerated_bound(t.tol.regenerated, o, q, sigma_z)
        over = C.excess(p, o, bound)
        if over > 0:
            errors.append(f"params[{i}] vs. before perturb_ ({t.tol.regenerated}): exceeds by {over:.3g}")
    assert_ok(errors)


MIX_SETTINGS = {
    "scalars": dict(grad_scale=1 / 3, beta=0.9, fisher_scale=0.7, clean_scale=0.45),
    "tensor_scale": dict(grad_scale=0.5, beta=0.9, fisher_scale=2.0, clean_scale=0.25, tensor=True),
}


@pytest.mark.parametrize("name,dev,case,subset", targets(cross(DTYPES, list(MIX_SETTINGS)), sweep=True,
                                                         core=lambda c: c[0] == torch.float32))
def test_restore_gradient_mix_and_fisher(name, dev, case, subset):
    dtype, setting = case
    t = use(name, dev, subset)
    kw = dict(MIX_SETTINGS[setting])
    if kw.pop("tensor", False):
        kw["grad_scale"] = torch.tensor(kw["grad_scale"], device=t.device)
    params = t.params(dtype)
    perturbed = C.like(params, seed=2)
    out = {}
    for backend in (t.name, "reference"):
        ps, grads, fisher = C.clone_all(perturbed), C.like(params, seed=3), C.fisher_like(params, seed=5)
        rk.restore_(ps, backups=params, grads=grads, fisher=fisher, clean_grads=C.like(params, seed=4),
                    backend=backend, **kw)
        out[backend] = ps, grads, fisher
    ours, ref = out[t.name], out["reference"]
    assert_ok(C.check(EXACT, ours[0], params, "params")
              + C.check(t.tol.mix, ours[1], ref[1], "grads")
              + C.check(t.tol.mix, ours[2], ref[2], "fisher"))


@pytest.mark.parametrize("name,dev,case,subset", targets(cross(DTYPES, ("missing", "clean_mix")), sweep=True,
                                                         fast=interpreted_slow))
def test_restore_regenerated_with_gradient_mix_alpha(name, dev, case, subset):
    """restore_ from the sigmas with the mix in the same pass, alpha != 0.5: "missing" scales the gradients
    by alpha, parameters without a gradient (None) only restored; "clean_mix" writes
    alpha * g_p + (1 - alpha) * g_c (the RWP wrapper's kept-aside mix)."""
    dtype, mode = case
    t = use(name, dev, subset)
    orig = t.params(dtype)
    n = len(orig)
    kw = dict(seed=SEED, step=STEP, stream=0, param_indices=list(range(n)))
    grads_in, clean_in = C.like(orig, seed=6), C.like(orig, seed=7)
    missing = [t.index(c) for c in MISSING_GRAD] if mode == "missing" else []
    out = {}
    for backend in (t.name, "reference"):
        params = C.clone_all(orig)
        sigmas = rk.perturb_(params, gamma=0.02, backend=backend, **kw)
        grads = C.clone_all(grads_in)
        for i in missing:
            grads[i] = None
        mix = dict(clean_grads=C.clone_all(clean_in), clean_scale=1 - ALPHA) if mode == "clean_mix" else {}
        rk.restore_(params, sigmas=sigmas, grads=grads, grad_scale=ALPHA, backend=backend, **mix, **kw)
        out[backend] = grads
    if mode == "missing":
        want = [None if i in missing else (ALPHA * g.float()).to(dtype) for i, g in enumerate(grads_in)]
    else:
        want = [(ALPHA * g.float() + (1 - ALPHA) * c.float()).to(dtype) for g, c in zip(grads_in, clean_in)]
    errors = C.check(t.tol.mix, out[t.name], out["reference"], "grads")
    errors += C.check(CLOSE, out[t.name], want, "grads vs. the formula")
    assert_ok(errors)


@pytest.mark.parametrize("name,dev,_x,_s", targets())
def test_restore_mixes_gradients_and_updates_fisher_formula(name, dev, _x, _s):
    t = use(name, dev)
    gen = torch.Generator().manual_seed(7)
    params = [torch.randn(s, generator=gen).to(t.device) for s in ((3, 4), (4,))]
    backups = C.clone_all(params)
    grads = [torch.randn(p.shape, generator=gen).to(t.device) for p in params]
    clean_grads = [torch.randn(p.shape, generator=gen).to(t.device) for p in params]
    fisher = [torch.rand(p.shape, generator=gen).to(t.device) for p in params]
    g0, f0 = C.clone_all(grads), C.clone_all(fisher)
    rk.restore_(params, backups=backups, grads=grads, grad_scale=0.7, fisher=fisher, beta=0.9, fisher_scale=0.5,
                clean_grads=clean_grads, clean_scale=0.3, backend=t.name)
    for g, g_in, c, f, f_in in zip(grads, g0, clean_grads, fisher, f0):
        torch.testing.assert_close(f, 0.9 * f_in + (0.5 * g_in) ** 2)
        torch.testing.assert_close(g, 0.7 * g_in + 0.3 * c)


@pytest.mark.parametrize("name,dev,_x,_s", targets())
def test_float16_and_bfloat16_rounding_matches_the_reference(name, dev, _x, _s):
    """Values near the dtype limits (subnormals, overflow to inf, NaN) round as torch does."""
    t = use(name, dev)
    special = torch.tensor([0.0, -0.0, 1e-8, -3e-6, 6e-5, 65504.0, 65519.0, 65520.0, 1e5, float("inf"), float("nan"),
                            3.0e38, 1.17e-38, 9.2e-41] + torch.randn(100, generator=torch.Generator().manual_seed(0))
                           .tolist())
    for dtype in (torch.float16, torch.bfloat16):
        params = [torch.ones(special.numel(), dtype=dtype, device=t.device)]
        for scale in (1 / 3, 1.0009765625, 3.0):
            g_ours, g_ref = [special.to(t.device, dtype)], [special.to(t.device, dtype)]
            rk.restore_(C.clone_all(params), backups=C.clone_all(params), grads=g_ours, grad_scale=scale,
                        backend=t.name)
            rk.restore_(C.clone_all(params), backups=C.clone_all(params), grads=g_ref, grad_scale=scale,
                        backend="reference")
            assert_ok(C.check(t.tol.mix, g_ours, g_ref, f"grads {dtype} * {scale}"))


# ==== sgd_step_ ============================================================================================

SGD_CASES = [
    dict(momentum=0.0),
    dict(momentum=0.9, weight_decay=5e-4),
    dict(momentum=0.9, dampening=0.1, weight_decay=1e-3, maximize=True),  # dampening on the first step
    dict(momentum=0.9, nesterov=True, weight_decay=1e-3),
]


@pytest.mark.parametrize("name,dev,case,subset", targets(SGD_CASES, sweep=True, core=lambda c: True,
                                                         fast=lambda c: "dampening" in c))
def test_sgd_step_matches_torch_optim_sgd(name, dev, case, subset):
    """float32, three steps from garbage momentum buffers (is_first_step ignores them, as torch's first step
    does): bit for bit torch.optim.SGD where the backend is exact, else close."""
    t = use(name, dev, subset)
    params = t.params(torch.float32)
    ref_params = [torch.nn.Parameter(C.clone_all([p])[0]) for p in params]
    ours = C.clone_all(params)
    bufs = [torch.full_like(p, float("nan")) for p in ours]
    opt = torch.optim.SGD(ref_params, lr=0.05, **case)
    for step in range(3):
        grads = C.like(params, seed=10 + step)
        for p, g in zip(ref_params, grads):
            p.grad = C.clone_all([g])[0]
        opt.step()
        rk.sgd_step_(ours, grads, bufs, lr=0.05, is_first_step=step == 0, backend=t.name, **case)
        errors = C.check(t.tol.step, ours, [p.detach() for p in ref_params], f"params after step {step}")
        if case["momentum"]:
            errors += C.check(t.tol.step, bufs, [opt.state[p]["momentum_buffer"] for p in ref_params],
                              f"momentum_buffers after step {step}")
        assert_ok(errors)


STEP_CASES = {
    "plain": dict(lr=0.1),
    "momentum": dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-3),
    "dampening_first": dict(lr=0.05, momentum=0.9, dampening=0.3, weight_decay=1e-3, is_first_step=True),
    "nesterov_first": dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4, is_first_step=True),
    "maximize_mixed": dict(lr=0.2, momentum=0.5, maximize=True, grad_scale=0.5, clean_scale=0.5, beta=0.99,
                           fisher_scale=0.5),
    "fused_all": dict(lr=0.1, momentum=0.9, weight_decay=1e-3, nesterov=True, grad_scale=0.5, beta=0.99,
                      fisher_scale=2.0, clean_scale=0.5),
}


@pytest.mark.parametrize("name,dev,case,subset", targets(
    cross(DTYPES, list(STEP_CASES)), sweep=True, core=lambda c: c[1] == "fused_all",
    fast=lambda c: c[1] != "fused_all" and (c[0] == torch.float32 or c[1] == "maximize_mixed")))
def test_sgd_step_matches_reference(name, dev, case, subset):
    dtype, setting = case
    t = use(name, dev, subset)
    kwargs = dict(STEP_CASES[setting])
    if "grad_scale" in kwargs:
        kwargs["grad_scale"] = torch.tensor(kwargs["grad_scale"], device=t.device)
    params = t.params(dtype)
    grads, bufs = C.like(params, seed=10), C.like(params, seed=11)
    backups = C.like(params, seed=12) if setting != "plain" else None
    mixed = "clean_scale" in kwargs
    fisher = C.fisher_like(params, seed=13) if mixed else None
    clean = C.like(params, seed=14) if mixed else None
    momentum = "momentum" in kwargs
    founds = (None, torch.tensor(0.0, device=t.device), torch.tensor(1.0, device=t.device)) \
        if setting == "fused_all" else (None,)
    for found_inf in founds:
        out = {}
        for backend in (t.name, "reference"):
            p, b, f = C.clone_all(params), C.clone_all(bufs), C.clone_all(fisher)
            rk.sgd_step_(p, grads, b if momentum else None, backups=backups, fisher=f, clean_grads=clean,
                         found_inf=found_inf, backend=backend, **kwargs)
            out[backend] = p, b, f
        (p, b, f), (p_ref, b_ref, f_ref) = out[t.name], out["reference"]
        errors = C.check(t.tol.step, p, p_ref, "params")
        errors += C.check(EXACT, grads, C.like(params, seed=10), "grads (sgd_step_ does not write them)")
        if momentum:
            errors += C.check(t.tol.step, b, b_ref, "momentum_buffers")
        if mixed:
            errors += C.check(t.tol.step, f, f_ref, "fisher")
        if found_inf is not None and found_inf.item():  # restored, nothing else
            errors += C.check(EXACT, p, backups, "params (found_inf: the backups)")
            errors += C.check(EXACT, b, bufs, "momentum_buffers (found_inf: unchanged)")
            errors += C.check(EXACT, f, fisher, "fisher (found_inf: unchanged)")
        assert_ok(errors)


@pytest.mark.parametrize("name,dev,dtype,subset", targets(DTYPES, sweep=True, fast=lambda d: d == torch.float16))
def test_sgd_step_found_inf_restores_only(name, dev, dtype, subset):
    t = use(name, dev, subset)
    params = t.params(dtype)
    grads, bufs, backups = C.like(params, seed=15), C.like(params, seed=16), C.like(params, seed=17)
    fisher = C.fisher_like(params, seed=18)
    one, zero = torch.tensor(1.0, device=t.device), torch.tensor(0.0, device=t.device)
    for found, with_backups in ((one, True), (one, False), (zero, True)):
        p, b, f = C.clone_all(params), C.clone_all(bufs), C.clone_all(fisher)
        rk.sgd_step_(p, grads, b, lr=0.1, momentum=0.9, found_inf=found, backups=backups if with_backups else None,
                     fisher=f, beta=0.9, backend=t.name)
        if found.item():
            assert_ok(C.check(EXACT, p, backups if with_backups else params, "params")
                      + C.check(EXACT, b, bufs, "momentum_buffers") + C.check(EXACT, f, fisher, "fisher"))
        else:
            p_ref, b_ref = C.clone_all(params), C.clone_all(bufs)
            rk.sgd_step_(p_ref, grads, b_ref, lr=0.1, momentum=0.9, backups=backups, fisher=C.clone_all(fisher),
                         beta=0.9, backend="reference")
            assert_ok(C.check(t.tol.step, p, p_ref, "params") + C.check(t.tol.step, b, b_ref, "momentum_buffers"))


@pytest.mark.parametrize("name,dev,_x,_s", targets())
def test_sgd_step_found_inf_with_inf_gradients_then_a_normal_step(name, dev, _x, _s):
    t = use(name, dev)
    gen = torch.Generator().manual_seed(10)
    params = [torch.randn(s, generator=gen).to(t.device) for s in ((4, 3), (3,))]
    clean = C.clone_all(params)
    backups = [torch.empty_like(p) for p in params]
    bufs = [torch.randn(p.shape, generator=gen).to(t.device) for p in params]
    bufs_before = C.clone_all(bufs)
    fisher = [torch.rand(p.shape, generator=gen).to(t.device) for p in params]
    fisher_before = C.clone_all(fisher)
    grads = [torch.full_like(p, float("inf")) for p in params]
    rk.perturb_(params, gamma=0.1, seed=2, step=0, backups=backups, backend=t.name)
    rk.sgd_step_(params, grads, bufs, lr=0.1, momentum=0.9, backups=backups, fisher=fisher, beta=0.9,
                 found_inf=torch.tensor(1.0, device=t.device), grad_scale=torch.tensor(0.5, device=t.device),
                 backend=t.name)
    assert all(torch.equal(p, c) for p, c in zip(params, clean))
    assert all(torch.equal(b, c) for b, c in zip(bufs, bufs_before))
    assert all(torch.equal(f, c) for f, c in zip(fisher, fisher_before))
    # found_inf == 0 updates as usual, with the tensor grad_scale applied
    grads = [torch.ones_like(p) for p in params]
    rk.sgd_step_(params, grads, None, lr=0.1, found_inf=torch.tensor(0.0, device=t.device),
                 grad_scale=torch.tensor(0.5, device=t.device), backend=t.name)
    for p, c in zip(params, clean):
        torch.testing.assert_close(p, c - 0.05)


@pytest.mark.parametrize("name,dev,dtype,subset", targets(DTYPES, sweep=True, fast=lambda d: d == torch.float32))
def test_sgd_step_first_step_ignores_dampening_and_the_old_buffer(name, dev, dtype, subset):
    """torch's first momentum step sets buf = g (no dampening, old contents ignored)."""
    t = use(name, dev, subset)
    params = t.params(dtype)
    grads, bufs = C.like(params, seed=20), C.like(params, seed=21)
    p, b = C.clone_all(params), C.clone_all(bufs)
    rk.sgd_step_(p, grads, b, lr=0.1, momentum=0.9, dampening=0.3, weight_decay=1e-2, is_first_step=True,
                 backend=t.name)
    g = [(gr.float() + 1e-2 * w.float()) for gr, w in zip(grads, params)]  # weight decay, then buf = g
    want_b = [x.to(dtype) for x in g]
    want_p = [(w.float() - 0.1 * x).to(dtype) for w, x in zip(params, g)]
    assert_ok(C.check(CLOSE, b, want_b, "momentum_buffers (= g)") + C.check(CLOSE, p, want_p, "params"))
    p_ref, b_ref = C.clone_all(params), C.clone_all(bufs)
    rk.sgd_step_(p_ref, grads, b_ref, lr=0.1, momentum=0.9, dampening=0.3, weight_decay=1e-2, is_first_step=True,
                 backend="reference")
    assert_ok(C.check(t.tol.step, p, p_ref, "params") + C.check(t.tol.step, b, b_ref, "momentum_buffers"))


@pytest.mark.parametrize("name,dev,_x,_s", targets())
def test_sgd_step_restores_before_updating(name, dev, _x, _s):
    t = use(name, dev)
    gen = torch.Generator().manual_seed(9)
    params = [torch.randn(s, generator=gen).to(t.device) for s in ((6, 5), (5,))]
    clean = C.clone_all(params)
    backups = [torch.empty_like(p) for p in params]
    grads = [torch.randn(p.shape, generator=gen).to(t.device) for p in params]
    rk.perturb_(params, gamma=0.1, seed=2, step=0, backups=backups, backend=t.name)
    rk.sgd_step_(params, grads, None, lr=0.1, weight_decay=0.01, backups=backups, backend=t.name)
    want = [c.add(g.add(c, alpha=0.01), alpha=-0.1) for c, g in zip(clean, grads)]
    assert_ok(C.check(t.tol.step, params, want, "params"))


@pytest.mark.parametrize("name,dev,_x,_s", targets())
def test_sgd_step_fisher_and_clean_gradient_mix_formula(name, dev, _x, _s):
    t = use(name, dev)
    gen = torch.Generator().manual_seed(12)
    p = torch.randn(5, 2, generator=gen).to(t.device)
    g, c, f = (torch.randn(5, 2, generator=gen).to(t.device), torch.randn(5, 2, generator=gen).to(t.device),
               torch.rand(5, 2, generator=gen).to(t.device))
    p0, f0 = p.clone(), f.clone()
    rk.sgd_step_([p], [g], None, lr=0.1, fisher=[f], beta=0.99, fisher_scale=2.0, grad_scale=0.5, clean_grads=[c],
                 clean_scale=0.25, backend=t.name)
    torch.testing.assert_close(f, 0.99 * f0 + (2.0 * g) ** 2)
    torch.testing.assert_close(p, p0 - 0.1 * (0.5 * g + 0.25 * c))


# ==== one RWP step through the ops: both mixing forms, alpha != 0.5, missing gradients =====================

def _sgd_formula(params, mix, bufs, *, lr, momentum, weight_decay, dtype):
    """torch.optim.SGD's first step on the mixed gradient, in float32, rounded once."""
    out_p, out_b = [], []
    for w, g in zip(params, mix):
        g = g + weight_decay * w.float()
        out_b.append(g.to(dtype))
        out_p.append((w.float() - lr * g).to(dtype))
    return out_p, out_b


@pytest.mark.parametrize("name,dev,dtype,subset", targets(DTYPES, sweep=True, fast=interpreted_slow))
def test_rwp_step_scaled_mix_alpha(name, dev, dtype, subset):
    """SCALED form: perturb_ scales the clean gradient by (1 - alpha) / alpha, the perturbed pass adds g_p
    (a parameter without a clean gradient gets g_p alone), sgd_step_ restores and multiplies by alpha."""
    t = use(name, dev, subset)
    params = t.params(dtype)
    n = len(params)
    g_c, g_p = C.like(params, seed=30), C.like(params, seed=31)
    missing = [t.index(c) for c in MISSING_GRAD]
    hyper = dict(lr=0.1, momentum=0.9, weight_decay=1e-3, is_first_step=True)
    out = {}
    for backend in (t.name, "reference"):
        p, backups = C.clone_all(params), [torch.empty_like(x) for x in params]
        grads = C.clone_all(g_c)
        for i in missing:
            grads[i] = None
        rk.perturb_(p, gamma=0.02, seed=SEED, step=STEP, backups=backups, grads=grads,
                    grad_scale=(1 - ALPHA) / ALPHA, backend=backend)
        grads = [C.clone_all([gp])[0] if g is None else g.add_(gp) for g, gp in zip(grads, g_p)]  # backward
        bufs = [torch.empty_like(x) for x in params]
        rk.sgd_step_(p, grads, bufs, grad_scale=ALPHA, backups=backups, backend=backend, **hyper)
        out[backend] = p, bufs
    (p, b), (p_ref, b_ref) = out[t.name], out["reference"]
    errors = C.check(t.tol.step, p, p_ref, "params") + C.check(t.tol.step, b, b_ref, "momentum_buffers")
    if dtype == torch.float32:  # against the direct mix (1 - alpha) g_c + alpha g_p: equal up to rounding
        mix = [ALPHA * gp.float() + (0.0 if i in missing else (1 - ALPHA) * gc.float())
               for i, (gc, gp) in enumerate(zip(g_c, g_p))]
        want_p, want_b = _sgd_formula(params, mix, None, lr=0.1, momentum=0.9, weight_decay=1e-3, dtype=dtype)
        errors += C.check(CLOSE, p, want_p, "params vs. the direct mix")
        errors += C.check(CLOSE, b, want_b, "momentum_buffers vs. the direct mix")
    assert n == len(p)
    assert_ok(errors)


@pytest.mark.parametrize("name,dev,dtype,subset", targets(DTYPES, sweep=True, fast=lambda d: d == torch.float32))
def test_rwp_step_kept_aside_mix_alpha(name, dev, dtype, subset):
    """SPLIT form (ARWP, 0 < alpha < 1): sgd_step_ gets g_p with grad_scale alpha and the kept clean gradient
    with clean_scale 1 - alpha; the Fisher update sees g_p alone."""
    t = use(name, dev, subset)
    params = t.params(dtype)
    g_c, g_p = C.like(params, seed=32), C.like(params, seed=33)
    fisher0 = C.fisher_like(params, seed=34)
    backups = C.like(params, seed=35)  # the clean weights; params hold "perturbed" ones
    hyper = dict(lr=0.1, momentum=0.9, weight_decay=1e-3, is_first_step=True, beta=0.9)
    out = {}
    for backend in (t.name, "reference"):
        p, f, bufs = C.clone_all(params), C.clone_all(fisher0), [torch.empty_like(x) for x in params]
        rk.sgd_step_(p, g_p, bufs, grad_scale=ALPHA, clean_grads=g_c, clean_scale=1 - ALPHA, backups=backups,
                     fisher=f, backend=backend, **hyper)
        out[backend] = p, bufs, f
    (p, b, f), (p_ref, b_ref, f_ref) = out[t.name], out["reference"]
    errors = (C.check(t.tol.step, p, p_ref, "params") + C.check(t.tol.step, b, b_ref, "momentum_buffers")
              + C.check(t.tol.step, f, f_ref, "fisher"))
    want_f = [0.9 * f0 + gp.float() ** 2 for f0, gp in zip(fisher0, g_p)]
    errors += C.check(CLOSE, f, want_f, "fisher vs. beta F + g_p^2")
    if dtype == torch.float32:
        mix = [(1 - ALPHA) * gc.float() + ALPHA * gp.float() for gc, gp in zip(g_c, g_p)]
        want_p, want_b = _sgd_formula(backups, mix, None, lr=0.1, momentum=0.9, weight_decay=1e-3, dtype=dtype)
        errors += C.check(CLOSE, p, want_p, "params vs. the direct mix")
        errors += C.check(CLOSE, b, want_b, "momentum_buffers vs. the direct mix")
    assert_ok(errors)


@pytest.mark.parametrize("name,dev,dtype,_s", targets(DTYPES, fast=lambda d: False, versus_reference=True))
def test_model_step_matches_reference(name, dev, dtype, _s):
    """A whole model in one call per op (ResNet-18 on a GPU, the small CNN on the CPU): perturb_ with backups
    and gradient scaling, then sgd_step_ with the fused restore, momentum and weight decay."""
    t = use(name, dev)
    torch.manual_seed(0)
    net = resnet18() if t.device.type == "cuda" else small_cnn()
    params = [p.detach().to(device=t.device, dtype=dtype) for p in net.parameters()]
    grads, bufs = C.like(params, seed=40), C.like(params, seed=41)
    out = {}
    for backend in (t.name, "reference"):
        p, g, b = C.clone_all(params), C.clone_all(grads), C.clone_all(bufs)
        backups = [torch.empty_like(x) for x in p]
        sigmas = rk.perturb_(p, gamma=0.01, seed=1, step=2, backups=backups, grads=g, grad_scale=0.5, backend=backend)
        perturbed = C.clone_all(p)
        rk.sgd_step_(p, g, b, lr=0.1, momentum=0.9, weight_decay=5e-4, backups=backups, grad_scale=2.0,
                     backend=backend)
        out[backend] = perturbed, p, b, sigmas, g
    (q, p, b, s, g), (q_ref, p_ref, b_ref, s_ref, g_ref) = out[t.name], out["reference"]
    for i, (x, y) in enumerate(zip(s, s_ref)):
        torch.testing.assert_close(x, y, rtol=t.tol.sigma_rtol, atol=0, msg=lambda m: f"sigmas[{i}]: {m}")
    assert_ok(C.check(t.tol.perturbed, q, q_ref, "perturbed", sigma=s_ref, actual_sigma=s)
              + C.check(EXACT, g, g_ref, "grads")
              + C.check(t.tol.step, p, p_ref, "params") + C.check(t.tol.step, b, b_ref, "momentum_buffers"))


# ==== the optimizer layer on every backend ================================================================

def _batches(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(n)]


def _backward(model, batch, scale=None):
    x, y = batch
    loss = F.cross_entropy(model(x.to(next(model.parameters()).device)), y.to(next(model.parameters()).device))
    (loss if scale is None else scale(loss)).backward()


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name,dev,kind,_s", targets(("rwpsgd", "wrapper"), fast=lambda k: False))
def test_optimizer_counts_steps_that_grad_scaler_skipped(name, dev, kind, _s, one_thread):
    """An overflowed step (GradScaler: found_inf) restores and updates nothing, but it is a completed step():
    opt.steps and the state dict's steps count it, and the next perturbation draws the noise of the next
    step (docs/optim.md: step = opt.steps, completed step() calls)."""
    t = use(name, dev)
    torch.manual_seed(0)
    model = small_cnn().to(t.device)
    kw = dict(gamma=0.05, alpha=ALPHA, seed=21, backend=t.name)
    opt = (RWPSGD(model.parameters(), lr=0.05, momentum=0.9, **kw) if kind == "rwpsgd"
           else RWP(model.parameters(), torch.optim.SGD, lr=0.05, momentum=0.9, **kw))
    scaler = torch.amp.GradScaler(t.device.type, init_scale=2.0**10)
    data = _batches(6, seed=4)
    for step, inject in enumerate((False, True, False)):
        opt.zero_grad()
        _backward(model, data[2 * step], scaler.scale)
        before = [p.detach().clone() for p in model.parameters()]
        hook = None
        if inject:  # the perturbed backward makes an inf in the last parameter's gradient
            hook = list(model.parameters())[-1].register_hook(
                lambda g: g.flatten().index_fill(0, torch.tensor([0], device=g.device), float("inf")).view_as(g))
        with opt.perturbed(), freeze_bn_stats(model):
            _backward(model, data[2 * step + 1], scaler.scale)
        if hook is not None:
            hook.remove()
        scaler.step(opt)
        scaler.update()
        if inject:
            assert all(torch.equal(p.detach(), w) for p, w in zip(model.parameters(), before)), \
                "an overflowed step must leave the clean weights"
            assert scaler.get_scale() == 2.0**9
        assert opt.steps == step + 1, f"after step() {step + 1} (overflowed: {inject})"
        assert opt.state_dict()["rwp"]["steps"] == step + 1
    # the next perturbation uses step 3's noise
    clean = [p.detach().clone() for p in model.parameters()]
    opt.perturb()
    expected = C.clone_all(clean)
    rk.perturb_(expected, gamma=0.05, seed=21, step=3, backend=t.name)
    for i, (p, e) in enumerate(zip(model.parameters(), expected)):
        assert torch.equal(p.detach(), e), f"params[{i}]: not the noise of step 3"
    opt.restore()


class _TwoHeads(torch.nn.Module):
    """Head "a" gets a gradient only from the clean pass, head "b" only from the perturbed one."""

    def __init__(self):
        super().__init__()
        self.trunk = torch.nn.Linear(6, 5)
        self.a = torch.nn.Linear(5, 3)
        self.b = torch.nn.Linear(5, 3)

    def forward(self, x, head):
        return getattr(self, head)(torch.tanh(self.trunk(x)))


def _two_head_step(model, opt, x1, x2):
    model(x1, "a").square().mean().backward()
    g_c = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    opt.perturb()
    probe = copy.deepcopy(model)
    probe(x2, "b").square().mean().backward()
    g_p = {n: p.grad.clone() for n, p in probe.named_parameters() if p.grad is not None}
    model(x2, "b").square().mean().backward()
    opt.step()
    opt.zero_grad()
    return g_c, g_p


@pytest.mark.parametrize("name,dev,adaptive,_s", targets((False, True)))
def test_optimizer_parameters_without_gradient_in_one_pass(name, dev, adaptive, _s, one_thread):
    """A pass that gives a parameter no gradient contributes zero to its mix (alpha 0.3; ARWP keeps the clean
    gradient aside): checked against the mix computed by hand and torch.optim.SGD, and against the
    reference backend over three steps."""
    t = use(name, dev)
    torch.manual_seed(0)
    model = _TwoHeads().to(t.device)
    ref_model, sgd_model = copy.deepcopy(model), copy.deepcopy(model)
    kw = dict(lr=0.1, momentum=0.9, gamma=0.05, alpha=ALPHA, adaptive=adaptive, seed=1)
    opt, ref_opt = RWPSGD(model.parameters(), **kw, backend=t.name), RWPSGD(ref_model.parameters(), **kw,
                                                                             backend="reference")
    sgd = torch.optim.SGD(sgd_model.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(5)
    for step in range(3):
        x1, x2 = (torch.randn(4, 6, generator=gen).to(t.device) for _ in range(2))
        g_c, g_p = _two_head_step(model, opt, x1, x2)
        _two_head_step(ref_model, ref_opt, x1, x2)
        if step == 0:
            assert set(g_c) == {"trunk.weight", "trunk.bias", "a.weight", "a.bias"}
            assert set(g_p) == {"trunk.weight", "trunk.bias", "b.weight", "b.bias"}
            for n, p in sgd_model.named_parameters():
                p.grad = (1 - ALPHA) * g_c.get(n, torch.zeros_like(p)) + ALPHA * g_p.get(n, torch.zeros_like(p))
            sgd.step()
            for (n, a), (_, b) in zip(model.named_parameters(), sgd_model.named_parameters()):
                torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-6, msg=lambda m: f"{n} vs. the hand mix: {m}")
        for (n, a), (_, b) in zip(model.named_parameters(), ref_model.named_parameters()):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=lambda m: f"{n} vs. the reference: {m}")


@pytest.mark.parametrize("name,dev,_x,_s", targets(fast=lambda x: False))
def test_optimizer_arwp_kept_aside_alpha(name, dev, _x, _s, one_thread):
    """ARWP with 0 < alpha < 1 (the clean gradient kept aside): one step against the official update by hand
    (F <- beta F + g_p^2, w <- SGD on (1 - alpha) g_c + alpha g_p), three against the reference backend."""
    t = use(name, dev)
    torch.manual_seed(3)
    model = small_cnn().to(t.device)
    ref_model, hand = copy.deepcopy(model), copy.deepcopy(model)
    kw = dict(lr=0.05, momentum=0.9, weight_decay=1e-3, gamma=0.05, alpha=ALPHA, adaptive=True, eta=0.5, beta=0.9,
              seed=8)
    opt = RWPSGD(model.parameters(), **kw, backend=t.name)
    ref_opt = RWPSGD(ref_model.parameters(), **kw, backend="reference")
    data = _batches(6, seed=6)
    for step in range(3):
        clean, perturbed = data[2 * step], data[2 * step + 1]
        for m, o in ((model, opt), (ref_model, ref_opt)):
            o.zero_grad()
            _backward(m, clean)
            if m is model and step == 0:
                g_c = [p.grad.clone() for p in m.parameters()]
            with o.perturbed(), freeze_bn_stats(m):
                if m is model and step == 0:
                    probe = copy.deepcopy(m)
                    _backward(probe, perturbed)
                    g_p = [p.grad.clone() for p in probe.parameters()]
                _backward(m, perturbed)
            o.step()
        if step == 0:
            for p, h, gc, gp in zip(model.parameters(), hand.parameters(), g_c, g_p):
                torch.testing.assert_close(opt.state[p]["fisher"], gp**2, rtol=1e-5, atol=1e-9)
                want = h.detach() - 0.05 * ((1 - ALPHA) * gc + ALPHA * gp + 1e-3 * h.detach())
                torch.testing.assert_close(p.detach(), want, atol=1e-6, rtol=1e-5)
        for (n, a), (_, b) in zip(model.named_parameters(), ref_model.named_parameters()):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=lambda m: f"step {step}, {n}: {m}")
            torch.testing.assert_close(opt.state[a]["fisher"], ref_opt.state[b]["fisher"], atol=1e-6, rtol=1e-4)
