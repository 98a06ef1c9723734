"""What every backend must satisfy, in one place: the known-answer vectors, the tolerance model and the
shape/dtype/layout sweep.

Used by the conformance suite (``tests/test_conformance.py``, every registered backend on every local device
against the reference), by the per-backend tests, and by the self-test (``python -m rwp_kernels.report
--selftest``, ``rwp_kernels/selftest.py``). docs/spec.md sections 3 and 6 state the same rules in words.

- ``PHILOX_KAT``: Random123's published known-answer vectors of Philox4x32-10; ``NOISE_KAT``: the first
  normals of the stream, as float32 values (docs/spec.md section 3).
- The tolerance model (docs/spec.md section 6): ``TOLERANCES[backend]`` says, per op and result, how close
  a backend must be to the reference (``check`` applies it); ``REFERENCE_*`` bound the reference against
  independent computations; ``SELFTEST_*`` and ``ulp_tolerance``/``perturbation_tolerance`` are the
  self-test's rules (any backend, any device, a real model).
- The sweep: ``SWEEP`` (shapes from 0-D to rows longer than the largest Triton tile, rows of one element,
  zero-norm rows, channels_last, views at an odd element offset, which force the kernels' scalar/unaligned
  paths), ``DTYPES``, and builders (``sweep_params``, ``like``, ``clone_all``) that keep each layout.

This module is part of the package (the self-test needs it) and does not import pytest.
"""
from dataclasses import dataclass

import torch

from .layout import flat_view

# ---------------------------------------------------------------------------------------------------------
# Known answers
# ---------------------------------------------------------------------------------------------------------

# Random123 kat_vectors, "philox4x32 10": (counter[4], key[2]) -> output[4] (docs/spec.md section 3).
PHILOX_KAT = (
    ((0x00000000,) * 4, (0x00000000,) * 2, (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
)

# noise(4, seed=0, param_index=0, step=0, stream=0): the first block, from the first vector above
# (docs/spec.md section 3): the float32 normals, each written with the fewest digits that round back to it.
NOISE_KAT = (dict(seed=0, param_index=0, step=0, stream=0, offset=0),
             (0.9911378, -0.92466253, -0.61760896, -0.48206863))


def philox_kat_tensors(device="cpu"):
    """(counters [3, 4], keys [3, 2], outputs [3, 4]) as int64 tensors."""
    counter = torch.tensor([c for c, _, _ in PHILOX_KAT], dtype=torch.int64, device=device)
    key = torch.tensor([k for _, k, _ in PHILOX_KAT], dtype=torch.int64, device=device)
    out = torch.tensor([o for _, _, o in PHILOX_KAT], dtype=torch.int64, device=device)
    return counter, key, out


# ---------------------------------------------------------------------------------------------------------
# The tolerance model (docs/spec.md section 6)
# ---------------------------------------------------------------------------------------------------------

NOISE_TOL = 1e-5  # normals of a backend with its own log/sin/cos (NOISE_CLOSE): |z - z_ref| <= NOISE_TOL * (1 + |z_ref|)
CLOSE_RTOL_FP32, CLOSE_ATOL = 1e-6, 1e-5  # "close": float32; float16/bfloat16 use rtol eps(dtype)
# The largest |z| of the stream: r = sqrt(-2 ln u) <= sqrt(-2 ln 2^-25) = 5.8871 (and |cos|, |sin| <= 1).
Z_MAX = 5.8872

# The reference against independent computations (tests/test_stream.py, tests/test_reference_ops.py).
REFERENCE_SIGMA_RTOL = 1e-6  # sigmas against the float64 norms rounded once
REFERENCE_PERTURB_EPS32 = 2  # w_p - w within 2 eps32 * (|w| + |sigma z|) of sigma z (float32)
# Normals against float64 math on the same float32 uniforms: |z - r64 cos(2 pi u_b)| <= 3 eps32 * r64 (and sin),
# r64 = sqrt(-2 ln u_a). The float32 polynomials' error: measured over all 2^24 uniforms, radius 0.83 eps32 * r,
# cos/sin 0.89 eps32, the normal 1.58 eps32 * r (2^24 random pairs).
REFERENCE_NOISE_EPS32 = 3

# The self-test's rules (rwp_kernels/selftest.py): any backend on any device, a real model.
SELFTEST_ULPS = 4  # rounding differences allowed, in ulps of the dtype relative to the magnitudes involved


def noise_bound(z_ref: torch.Tensor) -> torch.Tensor:
    """Allowed |z - z_ref| of a backend's normals under NOISE_CLOSE."""
    return NOISE_TOL * (1 + z_ref.double().abs())


def ulp(t: torch.Tensor) -> torch.Tensor:
    """Spacing of t's dtype at |t| (float32): eps(dtype) * max(|t|, tiny)."""
    finfo = torch.finfo(t.dtype)
    return torch.clamp(t.float().abs(), min=finfo.tiny) * finfo.eps


def close_tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """(rtol, atol) of "close": float32 within relative 1e-6 plus absolute 1e-5 of the reference;
    float16/bfloat16 within relative eps(dtype) plus absolute 1e-5 (one rounding step)."""
    if dtype in (torch.float32, torch.float64):
        return CLOSE_RTOL_FP32, CLOSE_ATOL
    return torch.finfo(dtype).eps, CLOSE_ATOL


def close_bound(expected: torch.Tensor) -> torch.Tensor:
    rtol, atol = close_tolerance(expected.dtype)
    return atol + rtol * expected.double().abs()


def per_element(sigma: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """A per-row sigma (as perturb_ returns it) broadcast to the shape of its tensor."""
    if p.dim() >= 2:
        return sigma.view(-1, *([1] * (p.dim() - 1))).expand(p.shape)
    return sigma.view(p.shape) if sigma.numel() == p.numel() else sigma.expand(p.shape)


EXACT, CLOSE = "bit for bit", "close"
NOISE_CLOSE = "within NOISE_TOL"  # normals: |z - z_ref| <= NOISE_TOL * (1 + |z_ref|)
GIVEN_SIGMA = "bit for bit given sigma"  # perturbed weights (see Tolerances)


@dataclass(frozen=True)
class Tolerances:
    """How close one backend must be to the reference backend (docs/spec.md section 6).

    ``sigma_rtol``: perturb_'s sigmas (relative). ``perturbed``: perturbed weights, EXACT, CLOSE or
    GIVEN_SIGMA: bit for bit in every row whose sigma equals the reference's bit for bit; in a row whose
    sigma differs (the float64 sum of squares added in another order, rounded to another float32), within
    Z_MAX * (|sigma - sigma_ref| + eps32 * max(sigma, sigma_ref)) + 2 ulp(w_ref), which is what the two
    sigmas' products with the same normal and two roundings of w + sigma z can differ by. ``mix``:
    restore_'s gradient mix and Fisher update. ``step``: sgd_step_'s weights, momentum buffers and Fisher
    state (EXACT here also means bit-identical to torch.optim.SGD in float32). ``restored``: a regenerated
    restore_ against the reference's restore_ of the same perturbed weights with the same sigmas.
    ``regenerated``: a regenerated restore against the weights before perturb_: "eps" (eps(dtype) * (|w| +
    |sigma z|)) or "eps_max" (eps(dtype) * max|w_p| per tensor). ``noise``: the normals, EXACT or
    NOISE_CLOSE. Bit for bit on every backend: Philox words, backups, perturb_'s gradient scaling, the exact
    restore and the found_inf skip.
    """

    sigma_rtol: float
    perturbed: str
    mix: str
    step: str
    restored: str
    regenerated: str
    noise: str = NOISE_CLOSE


# The C++ backends evaluate csrc/rwp_common.h's float32 Box-Muller, which the reference computes op for op:
# the same normals, so everything but the sigmas' float64 summation order is bit for bit.
_CPP = Tolerances(sigma_rtol=1e-6, perturbed=GIVEN_SIGMA, mix=EXACT, step=EXACT, restored=EXACT, regenerated="eps",
                  noise=EXACT)
TOLERANCES = {
    "reference": Tolerances(sigma_rtol=0.0, perturbed=EXACT, mix=EXACT, step=EXACT, restored=EXACT,
                            regenerated="eps", noise=EXACT),
    "cpu": _CPP,
    "cuda": _CPP,  # the same code as the C++ CPU backend: its normals equal the C++ CPU ones bit for bit
    "cuda-emu": _CPP,  # the CUDA kernels run on the CPU (csrc/emu): the same code, so the same rules
    # the C++ CPU tolerances: Triton computes what csrc/rwp_common.h computes, op for op (docs/triton.md);
    # its results equal the C++ CPU backend's bit for bit except for the float64 row sums' order (sigmas)
    "triton": _CPP,
}


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape, strides and values bit for bit (NaN matches NaN)."""
    if a.dtype != b.dtype or a.shape != b.shape or a.stride() != b.stride():
        return False
    if torch.equal(a, b):
        return True
    if a.is_floating_point():
        return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
    return False


def excess(actual: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor) -> float:
    """Largest |actual - expected| - bound (<= 0 where within), NaN/inf matching exactly."""
    a, e = actual.double().cpu(), expected.double().cpu()
    same = (a == e) | (a.isnan() & e.isnan())
    diff = torch.where(same, torch.zeros_like(a), (a - e).abs().nan_to_num(float("inf")))
    if diff.numel() == 0:
        return 0.0
    return (diff - bound.double().cpu().expand_as(diff)).max().item()


def noise_rule(backend: str) -> str:
    """How a backend's normals must match the reference's: EXACT or NOISE_CLOSE (a backend without an entry)."""
    tol = TOLERANCES.get(backend)
    return tol.noise if tol is not None else NOISE_CLOSE


def given_sigma_bound(expected: torch.Tensor, sigma: torch.Tensor, sigma_ref: torch.Tensor) -> torch.Tensor:
    """GIVEN_SIGMA's bound on |w_p - w_p_ref| per element of the flat (memory-order) view: 0 in rows whose
    sigma is the reference's bit for bit, elsewhere Z_MAX * (|sigma - sigma_ref| + eps32 * max(sigma,
    sigma_ref)) + 2 ulp(w_p_ref)."""
    s, r = sigma.double().cpu(), sigma_ref.double().cpu()
    per_row = Z_MAX * ((s - r).abs() + torch.finfo(torch.float32).eps * torch.maximum(s.abs(), r.abs()))
    per_row = torch.where(sigma.cpu() == sigma_ref.cpu(), torch.zeros_like(per_row), per_row)
    per_elem = per_row.repeat_interleave(expected.numel() // max(s.numel(), 1))
    rounding = 2 * ulp(expected).double().cpu()
    return torch.where(per_elem > 0, per_elem + rounding, torch.zeros_like(per_elem))


def check(rule: str, actual, expected, what: str, *, sigma=None, actual_sigma=None) -> list[str]:
    """Compare lists of tensors under ``rule`` (EXACT, CLOSE, NOISE_CLOSE, or GIVEN_SIGMA with the reference's
    ``sigma`` and the backend's ``actual_sigma`` per parameter); returns one message per tensor that is out
    of bounds."""
    errors = []
    if len(actual) != len(expected):
        return [f"{what}: {len(actual)} tensors, expected {len(expected)}"]
    for i, (a, e) in enumerate(zip(actual, expected)):
        if a is None or e is None:
            if a is not e:
                errors.append(f"{what}[{i}]: {a is None and 'None' or 'a tensor'}, expected "
                              f"{e is None and 'None' or 'a tensor'}")
            continue
        if a.dtype != e.dtype or a.shape != e.shape or a.stride() != e.stride():
            errors.append(f"{what}[{i}]: dtype/shape/strides {a.dtype} {tuple(a.shape)} {a.stride()}, expected "
                          f"{e.dtype} {tuple(e.shape)} {e.stride()}")
            continue
        if rule == EXACT:
            if not bitwise_equal(a, e):
                diff = (a.double() - e.double()).abs().nan_to_num().max().item() if a.numel() else 0.0
                errors.append(f"{what}[{i}] is not bit for bit the expected one (max |diff| {diff:.3g})")
            continue
        if rule == CLOSE:
            bound = close_bound(e)
        elif rule == NOISE_CLOSE:
            bound = noise_bound(e)
        elif rule == GIVEN_SIGMA:
            if sigma is None or actual_sigma is None:
                raise ValueError(f"{rule!r} needs the reference's sigma and the backend's actual_sigma")
            a, e = flat_view(a), flat_view(e)  # memory order: each row is one run of the flat view
            bound = given_sigma_bound(e, actual_sigma[i], sigma[i])
        else:
            raise ValueError(f"unknown rule {rule!r}")
        over = excess(a, e, bound)
        if over > 0:
            errors.append(f"{what}[{i}] ({rule}): exceeds its tolerance by {over:.3g}")
    return errors


def regenerated_bound(rule: str, original: torch.Tensor, perturbed: torch.Tensor, sigma_z=None) -> torch.Tensor:
    """Allowed |w_restored - w| of a regenerated restore_ (``rule`` as in Tolerances.regenerated)."""
    eps = torch.finfo(original.dtype).eps
    if rule == "eps":
        return eps * (original.double().abs() + sigma_z.double().abs())
    if rule == "eps_max":
        return torch.tensor(eps * perturbed.double().abs().max().item() if perturbed.numel() else 0.0)
    raise ValueError(f"unknown rule {rule!r}")


def ulp_tolerance(dtype: torch.dtype, *magnitudes: torch.Tensor) -> torch.Tensor:
    """The self-test's rounding tolerance: SELFTEST_ULPS ulps of ``dtype`` relative to the sum of the
    magnitudes (plus the smallest normal)."""
    total = sum(m.double().abs() for m in magnitudes)
    return SELFTEST_ULPS * torch.finfo(dtype).eps * total + torch.finfo(dtype).tiny


def perturbation_tolerance(clean, perturbed_ref, sigmas_ref, noise: str = NOISE_CLOSE):
    """The self-test's tolerance on perturbed weights: rounding of w + sigma z, plus, for a backend whose
    normals are not the reference's bit for bit (``noise`` NOISE_CLOSE), the normals' tolerance times sigma
    (NOISE_TOL * (sigma + |sigma z|))."""
    tols = []
    for c, r, s in zip(clean, perturbed_ref, sigmas_ref):
        delta = r.double() - c.double()
        tol = ulp_tolerance(c.dtype, c, delta)
        if noise != EXACT:
            tol = tol + NOISE_TOL * (per_element(s, c).double() + delta.abs())
        tols.append(tol)
    return tols


# ---------------------------------------------------------------------------------------------------------
# The sweep
# ---------------------------------------------------------------------------------------------------------

DTYPES = (torch.float32, torch.float16, torch.bfloat16)

CONTIGUOUS, CHANNELS_LAST, OFFSET = "contiguous", "channels_last", "offset"

@dataclass(frozen=True)
class Case:
    """One tensor of the sweep. ``zero``: "row" zeroes row 3 (a zero-norm row), "all" the whole tensor.
    ``fast``: in the subset for slow backends (Triton's interpreter) in the fast test tier."""

    name: str
    shape: tuple
    layout: str = CONTIGUOUS
    zero: str = ""
    fast: bool = True


SWEEP = (
    Case("rows27_zero_row", (16, 3, 3, 3), zero="row"),
    Case("rows27_channels_last", (16, 3, 3, 3), CHANNELS_LAST),
    Case("rows27", (5, 3, 3, 3)),
    Case("rows27_channels_last_small", (4, 3, 3, 3), CHANNELS_LAST),
    Case("rows4608_channels_last", (4, 512, 3, 3), CHANNELS_LAST, fast=False),  # rows longer than a tile
    Case("rows4608", (3, 4608), fast=False),
    Case("rows2053", (2, 2053)),  # longer than a Triton tile; the second row starts inside a Philox block
    Case("rows70001", (2, 70001), fast=False),  # longer than 64k; split across blocks / programs
    Case("row100000", (1, 100000), fast=False),  # the longest row the suite promises (10^5 elements)
    Case("rows_of_1", (5, 1)),
    Case("rows_of_1_b", (7, 1)),
    Case("short_rows_40", (33, 40)),  # several rows share a tile
    Case("rows201", (5, 201)),  # two rows per Triton item, the second item from element 2 of a Philox block
    Case("short_rows_50", (100, 50), fast=False),  # many tiles of packed rows (short_rows_40: three)
    Case("fc", (10, 64)),
    Case("scalar", ()),
    Case("vector37", (37,)),
    Case("vector10", (10,)),
    Case("vector3000", (3000,)),  # a 1-D tensor longer than a tile
    Case("vector3001", (3001,)),  # longer than a tile, no whole number of vectors: Triton's unaligned ARWP kernel
    Case("zero_vector", (9,), zero="all"),  # zero-norm 1-D tensor
    Case("offset_rows27", (1, 27), OFFSET),  # views at an odd element offset: unaligned, scalar paths
    Case("offset_rows1001", (3, 1001), OFFSET),
    Case("offset_vector", (5,), OFFSET),
    Case("offset_vector1001", (1001,), OFFSET),  # misaligned and longer than a tile
)
FAST_SWEEP = tuple(c for c in SWEEP if c.fast)


def cases(fast: bool = False) -> tuple:
    return FAST_SWEEP if fast else SWEEP


def case_index(name: str, fast: bool = False) -> int:
    return [c.name for c in cases(fast)].index(name)


def layout_of(t: torch.Tensor) -> str:
    if t.storage_offset() != 0:
        return OFFSET
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return CHANNELS_LAST
    return CONTIGUOUS


def place(values: torch.Tensor, layout: str, dtype=None, device=None) -> torch.Tensor:
    """A new tensor holding ``values`` as ``dtype`` on ``device``, stored with ``layout``."""
    dtype, device = dtype or values.dtype, device or values.device
    if layout == CHANNELS_LAST:
        out = torch.empty(values.shape, dtype=dtype, device=device, memory_format=torch.channels_last)
    elif layout == OFFSET:
        out = torch.empty(values.numel() + 1, dtype=dtype, device=device)[1:].view(values.shape)
    else:
        out = torch.empty(values.shape, dtype=dtype, device=device)
    return out.copy_(values)


def sweep_params(dtype, *, seed: int = 0, device="cpu", fast: bool = False) -> list[torch.Tensor]:
    """One tensor per case of the sweep (or of its fast subset), random normal values of ``dtype``."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for case in cases(fast):
        values = torch.randn(case.shape, generator=gen)
        if case.zero == "row":
            values[3].zero_()
        elif case.zero == "all":
            values.zero_()
        out.append(place(values, case.layout, dtype, device))
    return out


def like(params, *, seed: int, dtype=None, fn=torch.randn) -> list[torch.Tensor]:
    """Random tensors (``fn``: torch.randn or torch.rand) with the shapes, layouts and devices of
    ``params`` (and their dtype unless given)."""
    gen = torch.Generator().manual_seed(seed)
    return [place(fn(p.shape, generator=gen), layout_of(p), dtype or p.dtype, p.device) for p in params]


def fisher_like(params, *, seed: int) -> list[torch.Tensor]:
    """An ARWP Fisher state (float32, >= 0) for ``params``."""
    return like(params, seed=seed, dtype=torch.float32, fn=torch.rand)


def clone_all(tensors):
    """Copies that keep each tensor's layout (also a view's offset); None entries stay None."""
    if tensors is None:
        return None
    return [None if t is None else place(t, layout_of(t)) for t in tensors]
