"""The noise stream of the reference backend against independent facts.

A scalar Philox checked against the published Random123 known-answer vectors (rwp_kernels.conformance;
every backend's answers are asserted by tests/test_conformance.py) and the reference against it; the normals against a scalar
pure-Python rendering of the stream in float64 math written from docs/spec.md section 3 (no code shared with the
package), and the reference's float32 logarithm, radius, cosine and sine against float64 math on every one
of the 2^24 uniforms (the bound: REFERENCE_NOISE_EPS32); the distribution against N(0, 1); independence
between streams. That the reference's normals are the C++ kernels' bit for bit: tests/test_ext_cpu.py.
"""
import math

import numpy as np
import pytest
import torch
from scipy import stats

import rwp_kernels as R
from rwp_kernels.conformance import PHILOX_KAT, REFERENCE_NOISE_EPS32
from _scalar_philox import scalar_philox

EPS32 = 2.0**-23


def scalar_normals(e_begin, e_end, *, seed, param_index, step, stream):
    """(normals, radii) of elements e_begin .. e_end-1 in float64 math on the float32 uniforms."""
    key64 = (seed + stream * 0x9E3779B97F4A7C15) % 2**64
    key = [key64 & 0xFFFFFFFF, key64 >> 32]
    out, radii = [], []
    for e in range(e_begin, e_end):
        q, lane = divmod(e, 4)
        x = scalar_philox([q & 0xFFFFFFFF, q >> 32, param_index, step % 2**32], key)
        u = [float(np.float32(((w >> 8) + 0.5) / 2**24)) for w in x]
        pair = lane // 2
        r = math.sqrt(-2.0 * math.log(u[2 * pair]))
        t = 2.0 * math.pi * u[2 * pair + 1]
        out.append(r * math.cos(t) if lane % 2 == 0 else r * math.sin(t))
        radii.append(r)
    return np.array(out), np.array(radii)


@pytest.mark.parametrize("counter,key,expected", PHILOX_KAT)
def test_scalar_philox_known_answer_vectors(counter, key, expected):
    """The scalar rendering below is Philox4x32-10 (every backend's answers: tests/test_conformance.py)."""
    assert scalar_philox(counter, key) == list(expected)


def test_philox_broadcasts_and_matches_scalar():
    gen = torch.Generator().manual_seed(0)
    counters = torch.randint(0, 2**32, (7, 4), generator=gen, dtype=torch.int64)
    key = torch.tensor([0x12345678, 0xFEDCBA98])
    out = R.philox4x32_10(counters, key, backend="reference")
    assert out.shape == (7, 4)
    for c, o in zip(counters.tolist(), out.tolist()):
        assert o == scalar_philox(c, key.tolist())


@pytest.mark.parametrize(
    "counter,key,message",
    [
        ([1, 2, 3], [0, 0], r"counter must have shape \[\.\.\., 4\]"),
        ([1, 2, 3, 4], [0, 0, 0], r"key must have shape \[\.\.\., 2\]"),
        ([1, 2, 3, 2**32], [0, 0], r"counter words must lie in \[0, 2\*\*32\)"),
        ([1, 2, 3, 4], [-1, 0], r"key words must lie"),
        ([1.0, 2, 3, 4], [0, 0], "counter must hold integers"),
    ],
)
def test_philox_rejects_bad_input(counter, key, message):
    with pytest.raises((ValueError, TypeError), match=message):
        R.philox4x32_10(torch.tensor(counter), torch.tensor(key), backend="reference")


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(seed=0),
        dict(seed=2**64 - 1, param_index=2**32 - 1, step=2**32 + 5, stream=3),
        dict(seed=123456789, param_index=17, step=1000, stream=0, offset=2**34 + 1),
    ],
)
def test_noise_matches_scalar_rendering_of_the_stream(kwargs):
    """Within the float32 polynomials' error: |z - z64| <= 3 eps32 * r64 (docs/spec.md section 6)."""
    offset = kwargs.pop("offset", 0)
    n = 400
    z = R.noise(n, offset=offset, backend="reference", **kwargs).numpy().astype(np.float64)
    expected, radii = scalar_normals(offset, offset + n, param_index=kwargs.get("param_index", 0),
                                     step=kwargs.get("step", 0), stream=kwargs.get("stream", 0), seed=kwargs["seed"])
    excess = np.abs(z - expected) - REFERENCE_NOISE_EPS32 * EPS32 * radii
    assert excess.max() <= 0, (excess.argmax(), z[excess.argmax()], expected[excess.argmax()])


def _uniform_functions_error(stride: int):
    """Largest errors of the reference's float32 ln u, radius sqrt(-2 ln u), cos 2 pi u and sin 2 pi u over
    the uniforms of every stride-th value of x >> 8 (and the last), against float64 math; and the normals of
    each uniform paired with a shuffled one. In units of eps32 (relative for ln and the radius, absolute for
    cos and sin, relative to the float64 radius for the normals)."""
    from rwp_kernels import reference

    top = torch.arange(0, 1 << 24, stride, dtype=torch.int64)
    top = torch.cat([top, torch.tensor([(1 << 24) - 2, (1 << 24) - 1])])
    gen = torch.Generator().manual_seed(0)
    worst = dict(log=0.0, radius=0.0, cos=0.0, sin=0.0, normal=0.0)
    for chunk in top.split(1 << 16):
        x = chunk << 8 | torch.randint(0, 256, chunk.shape, generator=gen)  # the low byte does not count
        u = reference._uniform(x)
        assert torch.equal(u.double(), ((chunk.double() + 0.5) * 2.0**-24).float().double())
        log = reference._log_unit(u)
        r = reference._sqrt32(-2.0 * log)
        c, s = reference._sincos_2pi(u)
        ud = u.double()
        log64 = torch.log(ud)
        r64 = torch.sqrt(-2.0 * log64)
        c64, s64 = torch.cos(2 * math.pi * ud), torch.sin(2 * math.pi * ud)
        tiny = torch.finfo(torch.float64).tiny
        worst["log"] = max(worst["log"], ((log.double() - log64).abs() / log64.abs().clamp_min(tiny)).max().item())
        worst["radius"] = max(worst["radius"], ((r.double() - r64).abs() / r64.clamp_min(tiny)).max().item())
        worst["cos"] = max(worst["cos"], (c.double() - c64).abs().max().item())
        worst["sin"] = max(worst["sin"], (s.double() - s64).abs().max().item())
        other = x[torch.randperm(x.numel(), generator=gen)]
        za, zb = reference._box_muller(x, other)
        t = 2 * math.pi * reference._uniform(other).double()
        for z, f in ((za, torch.cos), (zb, torch.sin)):
            err = (z.double() - r64 * f(t)).abs() / r64.clamp_min(tiny)
            worst["normal"] = max(worst["normal"], err.max().item())
    return {k: v / EPS32 for k, v in worst.items()}


def _assert_uniform_functions_accurate(worst):
    assert worst["log"] <= 1 and worst["radius"] <= 1, worst  # measured 0.54 and 0.83 over every uniform
    assert worst["cos"] <= 1 and worst["sin"] <= 1, worst  # measured 0.89
    assert worst["normal"] <= REFERENCE_NOISE_EPS32, worst  # measured 1.58


def test_reference_box_muller_functions_are_accurate_on_a_grid_of_uniforms():
    _assert_uniform_functions_accurate(_uniform_functions_error(stride=127))


@pytest.mark.slow
def test_reference_box_muller_functions_are_accurate_on_every_uniform():
    """All 2^24 uniforms (about 2 s)."""
    _assert_uniform_functions_accurate(_uniform_functions_error(stride=1))


def test_noise_is_standard_normal():
    z = R.noise(1 << 20, seed=2024, param_index=3, step=11, backend="reference").double().numpy()
    n = z.size
    assert abs(z.mean()) < 5 / math.sqrt(n)
    assert abs(z.var() - 1) < 5 * math.sqrt(2 / n)
    assert abs(stats.skew(z)) < 5 * math.sqrt(6 / n)
    assert abs(stats.kurtosis(z)) < 5 * math.sqrt(24 / n)
    assert stats.kstest(z, "norm").pvalue > 1e-3
    # each lane of the Box-Muller quads is itself N(0, 1)
    for lane in range(4):
        assert stats.kstest(z[lane::4], "norm").pvalue > 1e-4


@pytest.mark.parametrize(
    "other",
    [dict(param_index=1), dict(step=1), dict(stream=1), dict(seed=8), dict(step=2**32)],
    ids=["param_index", "step", "stream", "seed", "step+2^32(wraps)"],
)
def test_streams_differ_and_are_uncorrelated(other):
    base = dict(seed=7, param_index=0, step=0, stream=0)
    n = 1 << 17
    a = R.noise(n, backend="reference", **base).double()
    b = R.noise(n, backend="reference", **{**base, **other}).double()
    if other == dict(step=2**32):
        assert torch.equal(a, b), "the counter holds the step modulo 2**32"
        return
    assert not torch.equal(a, b)
    corr = torch.corrcoef(torch.stack([a, b]))[0, 1].item()
    assert abs(corr) < 5 / math.sqrt(n)


def test_noise_offset_is_a_slice_of_the_longer_stream():
    full = R.noise(1000, seed=5, param_index=2, step=3, backend="reference")
    for offset, n in [(0, 1), (1, 7), (3, 1), (4, 4), (5, 600), (997, 3)]:
        part = R.noise(n, seed=5, param_index=2, step=3, offset=offset, backend="reference")
        assert torch.equal(part, full[offset : offset + n])
    assert R.noise(0, seed=5, backend="reference").shape == (0,)


def test_noise_crosses_chunk_boundaries_consistently(monkeypatch):
    from rwp_kernels import reference

    whole = R.noise(4099, seed=1, offset=6, backend="reference")
    monkeypatch.setattr(reference, "_CHUNK_BLOCKS", 16)
    chunked = R.noise(4099, seed=1, offset=6, backend="reference")
    assert torch.equal(whole, chunked)


def test_no_two_parameters_share_noise():
    from rwp_kernels.models import resnet18

    params = list(resnet18().parameters())
    by_shape = {}
    for i, p in enumerate(params):
        by_shape.setdefault(tuple(p.shape), []).append(i)
    repeated = [idx for idx in by_shape.values() if len(idx) > 1]
    assert repeated, "ResNet-18 has several parameters of the same shape"
    for indices in repeated:
        heads = [R.noise(64, seed=0, param_index=i, step=4, backend="reference") for i in indices]
        for j in range(len(heads)):
            for k in range(j + 1, len(heads)):
                assert not torch.equal(heads[j], heads[k])


def test_uniform_edges_stay_finite():
    from rwp_kernels import reference

    x = torch.tensor([0, 0xFF, 0xFFFFFF00, 0xFFFFFFFF], dtype=torch.int64)
    u = reference._uniform(x)
    assert u.dtype == torch.float32
    assert u[0].item() == 2.0**-25 and u[1].item() == 2.0**-25
    assert (u > 0).all() and (u <= 1).all()
    z0, z1 = reference._box_muller(x, x.flip(0))
    assert torch.isfinite(z0).all() and torch.isfinite(z1).all()
