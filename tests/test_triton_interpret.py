"""What is specific to the Triton kernels run by Triton's interpreter on CPU tensors: they compute what the C++
CPU backend computes, bit for bit (the normals; perturb_, restore_ and sgd_step_ except the sigmas' float64
summation order), the interpreter's fma made exact, float32-to-bfloat16 rounding (the interpreter's own
conversion truncates), one launch per op and dtype, the cached address tables, the self-test on the
interpreter, the report, and argument checks before any launch.

tests/conftest.py switches the interpreter on (TRITON_INTERPRET=1) where there is no GPU, before any kernel
is created. The Triton backend against the reference (Philox, noise, perturb_, restore_, sgd_step_ over the
shape/dtype/layout sweep, with the tolerances of docs/spec.md section 6) is in the conformance suite,
tests/test_conformance.py; what the compiler makes of the float math (no contraction, IEEE division and
square root) is in tests/test_triton_ptx.py.
"""
import os
import struct
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest
import torch

import rwp_kernels as rk
from conftest import require_backend
from rwp_kernels import backends, models
from rwp_kernels import conformance as C

pytestmark = pytest.mark.usefixtures("triton_interpreter")

try:
    from rwp_kernels.triton import perturb as triton_perturb  # its device functions, in test kernels
except ImportError:  # no triton: the fixture above skips every test
    triton_perturb = None


def _params(dtype, seed=0):
    return C.sweep_params(dtype, seed=seed, fast=True)


def assert_bitwise(actual, expected, what):
    errors = C.check(C.EXACT, actual, expected, what)
    assert not errors, "\n".join(errors)


# --- the interpreter's fma ----------------------------------------------------------------------------------

def _round_to_float32(x: Fraction) -> float:
    """The float32 nearest to the rational x, ties to even (from float64's guess and its neighbours)."""
    guess = np.float32(float(x))
    candidates = [np.nextafter(guess, np.float32(-np.inf)), guess, np.nextafter(guess, np.float32(np.inf))]
    return float(min(candidates, key=lambda c: (abs(Fraction(float(c)) - x),
                                                struct.unpack("<I", struct.pack("<f", c))[0] & 1)))


def _fma_cases():
    """(a, b, c) float32 triples: random over a wide exponent range, cancellation, and exact sums just beside a
    float32 midpoint that rounding to float64 first would move onto it (where a * b + c in float64 errs)."""
    rng = np.random.default_rng(0)
    a = (rng.standard_normal(3000) * 2.0 ** rng.integers(-30, 30, 3000)).astype(np.float32)
    b = (rng.standard_normal(3000) * 2.0 ** rng.integers(-30, 30, 3000)).astype(np.float32)
    c = (rng.standard_normal(3000) * 2.0 ** rng.integers(-60, 60, 3000)).astype(np.float32)
    c[:500] = -(a[:500].astype(np.float64) * b[:500]).astype(np.float32)  # cancellation
    x = np.float32(1 + 2**-12)  # x * x = 1 + 2^-11 + 2^-24: a float32 midpoint; +-2^-60 moves it off
    hard_a = [x, x, -x, x, np.float32(1 + 2**-11 + 2**-12)]
    hard_b = [x, x, x, -x, np.float32(1 + 2**-12)]
    hard_c = [np.float32(2**-60), np.float32(-2**-60), np.float32(2**-60), np.float32(-2**-60), np.float32(2**-58)]
    return (np.concatenate([a, hard_a]).astype(np.float32), np.concatenate([b, hard_b]).astype(np.float32),
            np.concatenate([c, hard_c]).astype(np.float32))


@pytest.fixture(scope="module")
def fma_kernel():
    require_backend("triton", "cpu")  # skips without Triton (fails where CI requires it)
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(a_ptr, b_ptr, c_ptr, out_ptr, n, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = i < n
        a, b, c = tl.load(a_ptr + i, mask=m), tl.load(b_ptr + i, mask=m), tl.load(c_ptr + i, mask=m)
        tl.store(out_ptr + i, tl.fma(a, b, c), mask=m)

    return kernel


def test_interpreter_fma_rounds_once(fma_kernel):
    """tl.fma in the interpreter is a true fma (one rounding), as on a GPU and as the header's fmadd: the
    interpreter's own is a * b + c in float32 (rwp_kernels/triton/rounding.py replaces it)."""
    a, b, c = _fma_cases()
    want = np.array([_round_to_float32(Fraction(float(x)) * Fraction(float(y)) + Fraction(float(z)))
                     for x, y, z in zip(a, b, c)], dtype=np.float32)
    out = torch.empty(len(a))
    fma_kernel[(triton_cdiv(len(a), 1024),)](torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(c), out,
                                              len(a), BLOCK=1024)
    assert np.array_equal(out.numpy().view(np.uint32), want.view(np.uint32))
    naive = (a * b + c).astype(np.float32)  # what the hard cases are for: two roundings differ there
    assert not np.array_equal(naive[-5:].view(np.uint32), want[-5:].view(np.uint32))


def triton_cdiv(n, d):
    return -(-n // d)


# --- the packed rows' sums ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def row_sums_kernel():
    require_backend("triton", "cpu")  # skips without Triton (fails where CI requires it)
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(values_ptr, segment_ptr, last_ptr, out_ptr, BLOCK: tl.constexpr, ROWS: tl.constexpr,
               SCAN: tl.constexpr):
        lanes = tl.arange(0, BLOCK)
        rows = tl.arange(0, ROWS)
        values, segment, last = tl.load(values_ptr + lanes), tl.load(segment_ptr + lanes), tl.load(last_ptr + rows)
        if SCAN:
            sums = triton_perturb._row_sums_scan(values, segment, last)
        else:
            sums = triton_perturb._row_sums_masked(values, segment, rows)
        tl.store(out_ptr + rows, sums)

    return kernel


@pytest.mark.parametrize("before", [[0, 0, 0], [-3, -2, -1]], ids=["row0", "negative"])
def test_packed_row_sums_scan_and_masked_sum_agree(row_sums_kernel, before):
    """The segmented scan the compiled kernel uses and the masked sum the interpreter uses give every row its
    sum (to float64 rounding; exactly 0 for a row of zeros) for rows of lengths 1 to 9 with padding lanes around
    them, as perturb_kernel lays out a packed tile (``_lane_rows``): zeros (its masked loads) in rows past the
    item's, and in front of it in row 0 or in rows below 0 (rows of one element)."""
    block, n_rows = 128, 32
    gen = torch.Generator().manual_seed(0)
    lengths = [1, 3, 9, 2, 5, 4, 7, 1, 6, 8, 3, 9, 2, 7, 5, 3, 6, 8, 4, 9, 1, 2]
    segment = torch.zeros(block, dtype=torch.int32)
    segment[:3] = torch.tensor(before)
    start = 3
    for r, n in enumerate(lengths):
        segment[start:start + n] = r
        start += n
    segment[start:] = len(lengths) + torch.arange(block - start) // 4  # nondecreasing, past the item's rows
    last = torch.full((n_rows,), block - 1, dtype=torch.int32)  # rows past the item: any lane
    for r in range(len(lengths)):
        last[r] = (segment == r).nonzero().max().int()
    values = torch.randn(block, generator=gen, dtype=torch.float64) ** 2
    values[segment == 4] = 0.0
    values[:3] = values[start:] = 0.0
    out = {}
    for scan in (True, False):
        out[scan] = torch.empty(n_rows, dtype=torch.float64)
        row_sums_kernel[(1,)](values, segment, last, out[scan], BLOCK=block, ROWS=n_rows, SCAN=scan)
    for r in range(len(lengths)):
        want = values[segment == r].sum()
        for scan in (True, False):
            torch.testing.assert_close(out[scan][r], want, rtol=1e-15, atol=0)
        assert out[True][4] == 0.0 and out[False][4] == 0.0


@pytest.mark.slow  # the fast sweep through the interpreter twice: 2.5-8 s
def test_the_suites_faster_interpreter_gives_the_same_bits(triton_interpreter):
    """tests/_interpreter_speed.py (installed by conftest.py) skips the interpreter's re-patching of
    triton.language at each helper call: perturb_ with ARWP, the backups and the gradient scaling over the fast
    sweep, with and without it, bit for bit."""
    import _interpreter_speed

    if not _interpreter_speed.install():
        pytest.skip("this Triton's interpreter lacks the hooks tests/_interpreter_speed.py patches")
    params = _params(torch.float32)
    fisher = C.fisher_like(params, seed=4)
    out = {}
    for fast in (True, False):
        _interpreter_speed.enabled = fast
        try:
            out[fast] = _perturb_all("triton", params, fisher)
        finally:
            _interpreter_speed.enabled = True
    for what in out[True]:
        for a, b in zip(out[True][what], out[False][what]):
            assert torch.equal(a, b), what


# --- bit for bit the C++ CPU backend ------------------------------------------------------------------------

NOISE_WINDOWS = [  # (numel, offset, seed, param_index, step, stream)
    (4, 0, 0, 0, 0, 0), (5000, 3, 20240611, 11, 2**32 + 7, 3), (777, 2**33 + 1, 2**64 - 1, 2**32 - 1, 2**32 + 3, 5),
    (1031, 4 * 2**32 - 6, 0xDEADBEEF12345678, 7, 5, 3),  # the counter's low word wraps inside the window
]


@pytest.mark.parametrize("window", NOISE_WINDOWS, ids=lambda w: f"n{w[0]}-at{w[1]}")
def test_normals_equal_the_cpp_backend(cpp_ext, window):
    """The port of csrc/rwp_common.h's uniform / log_unit / sincos_2pi / box_muller gives its normals, bit for bit."""
    numel, offset, seed, param_index, step, stream = window
    args = dict(seed=seed, param_index=param_index, step=step, stream=stream, offset=offset)
    z = rk.noise(numel, **args, backend="triton")
    assert torch.equal(z.view(torch.int32), rk.noise(numel, **args, backend="cpu").view(torch.int32))


# (numel, offset) for the noise kernel's two stores (tiles: 512 elements up to numel 512, else 1024): 16-byte
# vectors for a program whose outputs start and end on a Philox block boundary, lane by lane otherwise.
NOISE_STORES = [
    (4, 0), (512, 16), (3072, 8),  # every program vectorized (one vector, one tile, three tiles)
    (2053, 4), (2047, 0),  # vectorized, then a last tile lane by lane that ends 1 / 3 elements into a block
    (1, 0), (3, 8), (5, 0),  # lane by lane: shorter than a block, or ends 1 element into the second
    (2048, 3), (1029, 2), (2, 1), (3, 1), (1, 7),  # lane by lane: output 0 is inside a Philox block
]
GUARD = 4  # float32 elements either side of the output (16 bytes: the output stays 16-byte aligned)


@pytest.mark.parametrize("numel,offset", NOISE_STORES, ids=lambda v: str(v))
def test_noise_kernel_writes_exactly_its_outputs(cpp_ext, numel, offset):
    """The noise kernel's vector and lane-by-lane stores, into an output between guard elements: every output
    holds the C++ CPU backend's normal, bit for bit, and no guard element is written (the launch is the
    launcher's, ``rwp_kernels.triton.noise.noise``, on an output the test owns)."""
    import triton

    from rwp_kernels.contract import NoiseKey
    from rwp_kernels.triton import philox, tables
    from rwp_kernels.triton.noise import noise_kernel

    key, param_index = NoiseKey(seed=20240611, stream=3, step=7), 5
    sentinel = 0x7FC0DEAD  # the bits of a NaN: no normal has them
    buffer = torch.full((GUARD + numel + GUARD,), sentinel, dtype=torch.int32).view(torch.float32)
    tile = tables.choose_tile([(numel, 1)])
    k0, k1, step = key.words()
    tables.launch(noise_kernel, triton.cdiv(offset % 4 + numel, tile.block), tile, buffer.device,
                  buffer[GUARD:GUARD + numel], offset, numel, param_index, philox.as_int32(step),
                  philox.as_int32(k0), philox.as_int32(k1))
    bits = buffer.view(torch.int32)
    expected = rk.noise(numel, seed=key.seed, stream=key.stream, step=key.step, param_index=param_index,
                        offset=offset, backend="cpu")
    assert torch.equal(bits[GUARD:GUARD + numel], expected.view(torch.int32))
    assert (bits[:GUARD] == sentinel).all() and (bits[GUARD + numel:] == sentinel).all()


def _table_ops(backend, params, mode):
    """perturb_ (ARWP or RWP), a regenerated restore_ with the whole gradient mix, and two sgd_step_ calls
    (fused restore, mix, Fisher, momentum with dampening; nesterov, weight decay, maximize) on copies."""
    n = len(params)
    fisher = C.fisher_like(params, seed=9)
    indices = [3 * i + 1 for i in range(n)]
    p, grads, backups = C.clone_all(params), C.like(params, seed=5), [torch.empty_like(x) for x in params]
    kw = dict(fisher=C.clone_all(fisher), eta=0.3) if mode == "arwp" else {}
    sigmas = rk.perturb_(p, gamma=[0.01 * (1 + i % 4) for i in range(n)], seed=20240611, step=7, stream=3,
                         param_indices=indices, backups=backups, grads=grads, grad_scale=0.3, backend=backend, **kw)
    restored, mixed, clean = C.clone_all(p), C.like(params, seed=6), C.like(params, seed=7)
    f_restore = C.clone_all(fisher)
    rk.restore_(restored, sigmas=sigmas, seed=20240611, step=7, stream=3, param_indices=indices, grads=mixed,
                grad_scale=0.7, fisher=f_restore, beta=0.9, fisher_scale=0.5, clean_grads=clean, clean_scale=0.3,
                backend=backend)
    stepped, g, bufs, f_step = C.clone_all(p), C.like(params, seed=8), C.like(params, seed=10), C.clone_all(fisher)
    rk.sgd_step_(stepped, g, bufs, lr=0.1, momentum=0.9, dampening=0.1, weight_decay=1e-3, backups=backups,
                 fisher=f_step, beta=0.99, grad_scale=0.75, clean_grads=clean, clean_scale=0.25, backend=backend)
    nesterov, bufs2 = C.clone_all(p), C.like(params, seed=10)
    rk.sgd_step_(nesterov, g, bufs2, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2, maximize=True,
                 backend=backend)
    return dict(sigmas=sigmas, perturbed=p, backups=backups, grads=grads, restored=restored, mixed=mixed,
                 restore_fisher=f_restore, stepped=stepped, momentum_buffers=bufs, step_fisher=f_step,
                 nesterov=nesterov, nesterov_buffers=bufs2)


def assert_equal_to_cpp(ours, cpp):
    """Bit for bit, except: sigmas within one float32 rounding (their float64 row sums are added in another
    order); in a tensor whose sigmas differ, the weights computed with them (perturbed, then restored) within
    what two sigmas times the same normal (|z| < 5.8872) and the roundings of w +- sigma z can differ by."""
    errors = []
    for i, (a, b) in enumerate(zip(ours["sigmas"], cpp["sigmas"])):
        torch.testing.assert_close(a, b, rtol=2.0**-23, atol=0, msg=lambda m: f"sigmas[{i}]: {m}")
    for what in ours:
        for i, (a, b) in enumerate(zip(ours[what], cpp[what])):
            same_sigma = C.bitwise_equal(ours["sigmas"][i], cpp["sigmas"][i])
            if what == "sigmas" or (what in ("perturbed", "restored") and not same_sigma):
                if what != "sigmas":
                    slack = 5.8872 * (ours["sigmas"][i].double() - cpp["sigmas"][i].double()).abs().max()
                    bound = 2 * slack + 4 * C.ulp(b).double()
                    over = C.excess(a, b, bound)
                    if over > 0:
                        errors.append(f"{what}[{i}] (sigmas differ): exceeds its bound by {over:.3g}")
                continue
            errors += C.check(C.EXACT, [a], [b], f"{what}[{i}]")
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("dtype,mode", [pytest.param(torch.float32, "arwp", id="float32-arwp")] + [
    pytest.param(d, m, id=f"{str(d)[6:]}-{m}", marks=pytest.mark.slow)
    for d in C.DTYPES for m in ("rwp", "arwp") if (d, m) != (torch.float32, "arwp")])
def test_table_ops_equal_the_cpp_backend(cpp_ext, dtype, mode):
    """perturb_, restore_ and sgd_step_ on the sweep's fast subset (packed short rows, rows longer than a tile,
    rows starting inside a Philox block, 0-D/1-D tensors with per-element ARWP sigmas, channels_last, views at
    odd offsets): what the C++ CPU backend computes, bit for bit."""
    params = _params(dtype)
    assert_equal_to_cpp(_table_ops("triton", params, mode), _table_ops("cpu", params, mode))


def _dyadic(shape, seed):
    """Values k / 64 for integers |k| <= 64: their squares' sums are exact in float64 in any order."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(-64, 65, shape, generator=gen).float() / 64


def _perturb_all(backend, params, fisher, gamma=0.01):
    p, grads, backups = C.clone_all(params), C.clone_all([x.flip(-1) for x in params]), C.clone_all(params)
    sigmas = rk.perturb_(p, gamma=gamma, seed=5, step=3, backups=backups, grads=grads, grad_scale=0.5,
                         fisher=C.clone_all(fisher), eta=0.3, backend=backend)
    return dict(sigmas=sigmas, perturbed=p, backups=backups, grads=grads)


SPLIT_SHAPES = [(40001,), (3, 5), (2, 33001)]


def _split_fisher(mode, shapes):
    return [_dyadic(s, 10 + i).abs() for i, s in enumerate(shapes)] if mode == "arwp" else None


@pytest.mark.parametrize("mode, shapes", [("rwp", SPLIT_SHAPES[:2]),  # the fast tier: the 1-D tensor only
                                          pytest.param("rwp", SPLIT_SHAPES, marks=pytest.mark.slow),
                                          pytest.param("arwp", SPLIT_SHAPES, marks=pytest.mark.slow)])
def test_split_rows_equal_the_cpp_backend(launches, cpp_ext, mode, shapes):
    """Rows longer than tables.SPLIT_ROW take the two-stage norm (segments' partial sums in a first launch, added
    by every program of the row): a 1-D tensor (ARWP: a sigma per element) and a 2-D one whose second row starts
    off a vector boundary. On values whose sums of squares are exact in any order: the C++ CPU backend's
    results bit for bit."""
    from rwp_kernels.triton import perturb

    exact = [_dyadic(s, i) for i, s in enumerate(shapes)]
    ours = _perturb_all("triton", exact, _split_fisher(mode, shapes))
    assert perturb.row_partials_kernel in launches
    cpp = _perturb_all("cpu", exact, _split_fisher(mode, shapes))
    for what in ours:
        assert_bitwise(ours[what], cpp[what], what)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["rwp", "arwp"])
def test_split_rows_on_normal_values_within_the_sigma_tolerance(cpp_ext, mode):
    normal = [torch.randn(s, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(SPLIT_SHAPES)]
    fisher = _split_fisher(mode, SPLIT_SHAPES)
    assert_equal_to_cpp(_perturb_all("triton", normal, fisher), _perturb_all("cpu", normal, fisher))


# Rows of 2 to 5 float32 tiles of 512, kept in registers (tables.RESIDENT_PARTS): aligned, starting inside a vector
# (the second rows of (2, 1030) and (2, 2558), the unaligned view), exactly 5 tiles (2558 from element 2); longer
# rows, whose first 5 tiles are kept and the rest streamed: one element past them (2561), one tile past them,
# aligned (3000), and 6 past them, the second row from element 1 of a vector (5121); packed short rows and a
# vector beside them; gamma 0 for one kept tensor (backups and gradient scaling, no noise).
RESIDENT_SHAPES = [(3, 2304), (2, 1030), (2, 2558), (2561,), (4, 9), (3,), (2, 2000), (2, 3000), (2, 5121)]
RESIDENT_GAMMAS = [0.01, 0.0, 0.02, 0.01, 0.01, 0.01, 0.03, 0.02, 0.01]


@pytest.mark.parametrize("mode", ["rwp", pytest.param("arwp", marks=pytest.mark.slow)])
def test_resident_rows_equal_the_cpp_backend(monkeypatch, cpp_ext, mode):
    """Where most elements are in rows longer than a tile, perturb_kernel keeps the first RESIDENT_PARTS tiles of a
    row in registers between its norm and its update (a longer row's further tiles streamed through both): on
    values whose sums of squares are exact in any order, the C++ CPU backend's results bit for bit."""
    from rwp_kernels.triton import perturb, tables

    parts = []
    real = tables.launch

    def recording(kernel, *args, **kwargs):
        if kernel is perturb.perturb_kernel:
            parts.append(kwargs["PARTS"])
        return real(kernel, *args, **kwargs)

    monkeypatch.setattr(tables, "launch", recording)
    exact = [_dyadic(s, i) for i, s in enumerate(RESIDENT_SHAPES)]
    exact[-1] = C.place(exact[-1], C.OFFSET)
    fisher = _split_fisher(mode, RESIDENT_SHAPES)
    ours = _perturb_all("triton", exact, fisher, RESIDENT_GAMMAS)
    assert parts == [tables.RESIDENT_PARTS[4]]
    cpp = _perturb_all("cpu", exact, fisher, RESIDENT_GAMMAS)
    assert torch.equal(ours["perturbed"][1], exact[1]) and not torch.equal(ours["perturbed"][0], exact[0])
    for what in ours:
        assert_bitwise(ours[what], cpp[what], what)


@pytest.mark.parametrize("mode", ["rwp", pytest.param("arwp", marks=pytest.mark.slow)])
def test_aligned_and_unaligned_tensors_equal_the_cpp_backend(cpp_ext, mode):
    """The same tensors 16-byte aligned (vectorized path) and as views at an odd element offset (scalar path):
    the C++ CPU backend's results either way, for every op."""
    from rwp_kernels.layout import plan
    from rwp_kernels.triton import tables

    gen = torch.Generator().manual_seed(3)
    aligned = [torch.randn(s, generator=gen) for s in ((64, 36), (100,), (3, 700), (7,))]
    unaligned = [C.place(p, C.OFFSET) for p in aligned]
    for tensors, flag in ((aligned, [1, 1, 1, 1]), (unaligned, [0, 0, 0, 0])):
        plans = plan(tensors, list(range(len(tensors))))
        assert [tables.param_row(t, e)[tables.ALIGNED.value] for t, e in zip(tensors, plans)] == flag
        assert_equal_to_cpp(_table_ops("triton", tensors, mode), _table_ops("cpu", tensors, mode))


def test_bfloat16_results_round_to_nearest_even():
    """float32 -> bfloat16 as torch and a GPU round: ties to even, overflow to inf, NaN stays NaN (the
    interpreter's own conversion truncates; the kernels round with integer operations)."""
    clean = torch.tensor([1.0, 3.0, -1.0, 3.3895e38, float("inf"), float("nan"), 1e-40, 0.1, -5.0]).bfloat16()
    out = {}
    for backend in ("triton", "reference"):
        grads = [torch.zeros_like(clean)]
        rk.restore_([torch.zeros_like(clean)], backups=[torch.zeros_like(clean)], grads=grads, clean_grads=[clean],
                    clean_scale=1 + 2**-8, backend=backend)
        out[backend] = grads[0]
    got, want = out["triton"], out["reference"]
    assert want[0] == 1.0 and want[1] > 3.0 and want[3].isinf()  # a tie to even, a round up, an overflow
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan)
    assert torch.equal(got[~nan].view(torch.int16), want[~nan].view(torch.int16))


# --- whole-model calls, launches, caching, mixed dtypes ---------------------------------------------------

@pytest.fixture
def launches(monkeypatch):
    from rwp_kernels.triton import tables

    calls = []
    real = tables.launch

    def counting(kernel, *args, **kwargs):
        calls.append(kernel)
        return real(kernel, *args, **kwargs)

    monkeypatch.setattr(tables, "launch", counting)
    return calls


@pytest.mark.slow
def test_small_cnn_step_in_one_launch_per_op(launches, cpp_ext):
    torch.manual_seed(0)
    params = [p.detach() for p in models.small_cnn().parameters()]
    grads, bufs = C.like(params, seed=20), C.like(params, seed=22)
    fisher = C.fisher_like(params, seed=23)
    results = {}
    for backend in ("triton", "cpu"):
        p, g, b, f = C.clone_all(params), C.clone_all(grads), C.clone_all(bufs), C.clone_all(fisher)
        backups = [torch.empty_like(x) for x in p]
        before = len(launches)
        sigmas = rk.perturb_(p, gamma=0.01, seed=3, step=4, backups=backups, grads=g, grad_scale=1 / 3, fisher=f,
                             eta=0.1, backend=backend)
        rk.sgd_step_(p, g, b, lr=0.1, momentum=0.9, weight_decay=1e-3, backups=backups, fisher=f, beta=0.99,
                     grad_scale=0.75, backend=backend)
        if backend == "triton":
            # One launch per op for the whole parameter list; perturb_ one per sigma mode (ARWP's 1-D tensors).
            assert len(launches) - before == 3
        results[backend] = p, b, f, sigmas
    (p, b, f, sigmas), (p_cpp, b_cpp, f_cpp, sigmas_cpp) = results["triton"], results["cpu"]
    assert_equal_to_cpp(dict(sigmas=sigmas, stepped=p, momentum_buffers=b, step_fisher=f),
                        dict(sigmas=sigmas_cpp, stepped=p_cpp, momentum_buffers=b_cpp, step_fisher=f_cpp))


def test_one_launch_per_dtype_and_float64_to_reference(launches, cpp_ext):
    params = [torch.randn(4, 9), torch.randn(6).half(), torch.randn(3, 5).double(), torch.randn(8, 2)]
    p, p_cpp = C.clone_all(params), C.clone_all(params)
    sigmas = rk.perturb_(p, gamma=0.1, seed=1, step=2, backend="triton")
    sigmas_cpp = rk.perturb_(p_cpp, gamma=0.1, seed=1, step=2, backend="cpu")
    assert len(launches) == 2  # float32 and float16; float64 goes to the reference backend
    assert_equal_to_cpp(dict(sigmas=sigmas, perturbed=p), dict(sigmas=sigmas_cpp, perturbed=p_cpp))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_arwp_vectors_that_need_a_scalar_loop_get_a_launch_of_their_own(launches, cpp_ext, dtype):
    """ARWP's 1-D tensors that fit a tile or are whole aligned vectors run perturb_elementwise_kernel, which has no
    scalar loop over a long row (perturb.vectorized_row); the others perturb_elementwise_unaligned_kernel."""
    def run(cases, backend):
        params = [C.place(torch.randn(n, generator=torch.Generator().manual_seed(n)), layout, dtype)
                  for n, layout in cases]
        fisher = C.fisher_like(params, seed=5)
        before = len(launches)
        sigmas = rk.perturb_(params, gamma=0.1, seed=1, step=2, fisher=fisher, eta=0.5, backend=backend)
        return [k.fn.__name__ for k in launches[before:]], dict(sigmas=sigmas, perturbed=params)

    short_or_whole = [(10, C.CONTIGUOUS), (7, C.OFFSET), (1024, C.CONTIGUOUS)]
    both = short_or_whole + [(1025, C.CONTIGUOUS), (1024, C.OFFSET), (64, C.CONTIGUOUS)]
    assert run(short_or_whole, "triton")[0] == ["perturb_elementwise_kernel"]
    kernels, ours = run(both, "triton")
    assert kernels == ["perturb_elementwise_kernel", "perturb_elementwise_unaligned_kernel"]
    assert_equal_to_cpp(ours, run(both, "cpu")[1])


@pytest.mark.parametrize("failing", ["tables", "warmup"])
def test_perturb_that_cannot_start_a_later_launch_changes_nothing(launches, monkeypatch, failing):
    """A perturb_ of several launches (ARWP: rows, 1-D tensors, a 1-D tensor with a scalar loop) whose last launch
    cannot start (its table upload runs out of memory; its kernel does not compile): raised before any kernel ran,
    weights and gradients as they were."""
    from rwp_kernels.triton import tables

    params = [torch.randn(6, 3, 3, 3), torch.randn(3000), torch.randn(1001)]
    grads, fisher = C.like(params, seed=1), C.fisher_like(params, seed=2)
    weights, grad_values = C.clone_all(params), C.clone_all(grads)
    real = getattr(tables, failing)

    def fails_last(*args, **kwargs):
        if failing == "tables":
            last = args[1][0][tables.ROW_LEN.value] == 1001
        else:
            last = args[0].fn.__name__ == "perturb_elementwise_unaligned_kernel"
        if last:
            raise RuntimeError("CUDA out of memory" if failing == "tables" else "ptxas failed")
        return real(*args, **kwargs)

    monkeypatch.setattr(tables, failing, fails_last)
    tables.clear_caches()
    with pytest.raises(RuntimeError, match="out of memory|ptxas"):
        rk.perturb_(params, gamma=0.1, seed=1, step=2, backups=[torch.empty_like(p) for p in params], grads=grads,
                    grad_scale=0.5, fisher=fisher, eta=0.5, backend="triton")
    assert launches == []
    assert_bitwise(params, weights, "weights")
    assert_bitwise(grads, grad_values, "gradients")


def test_tables_are_cached_and_follow_new_tensors(monkeypatch, cpp_ext):
    from rwp_kernels.triton import tables

    uploads = []
    real = tables.upload
    monkeypatch.setattr(tables, "upload", lambda *a: uploads.append(a[1]) or real(*a))
    tables.clear_caches()
    params = _params(torch.float32)
    grads = C.like(params, seed=0)
    for _ in range(3):
        rk.sgd_step_(params, grads, None, lr=0.1, backend="triton")
    assert uploads == [torch.int64]  # one table upload, then cache hits
    other = _params(torch.float32, seed=1)  # new tensors, same shapes: new addresses, new tables
    grads = C.like(other, seed=2)
    expected = C.clone_all(other)
    rk.sgd_step_(expected, grads, None, lr=0.1, backend="cpu")
    rk.sgd_step_(other, grads, None, lr=0.1, backend="triton")
    assert_bitwise(other, expected, "params")
    assert len(uploads) == 2


# --- the self-test of python -m rwp_kernels.report, shared validation, availability -----------------------

@pytest.mark.slow
def test_selftest_checks_pass():
    """Acceptance checks of ``python -m rwp_kernels.report --selftest``, with their own tolerances, for bfloat16
    (the dtype where the interpreter's own conversions are wrong). The interpreter is too slow for all of them:
    the million-normal noise check alone takes a minute; the tests above cover the rest."""
    from rwp_kernels import selftest

    checks = selftest._Checks("triton", torch.device("cpu"), repeats=1, model="small_cnn")
    checks.philox()
    checks.perturb_restore(torch.bfloat16, "small_cnn")
    checks.sgd_step(torch.bfloat16, "small_cnn")
    assert len(checks.results) == 7
    assert all(r.passed for r in checks.results), [r for r in checks.results if not r.passed]


@pytest.mark.slow
def test_report_lists_triton_with_its_reason(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "rwp_kernels.report"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    line = next(line for line in out.stdout.splitlines() if "backend 'triton'" in line)
    if not torch.cuda.is_available():
        assert "cpu: unavailable (it runs on CPU tensors only under TRITON_INTERPRET=1" in line
        assert "cuda: unavailable (no CUDA GPU" in line

def test_bad_inputs_are_rejected_before_any_launch(launches):
    p = [torch.randn(4, 3), torch.randn(3, 4).t()]
    with pytest.raises(ValueError, match=r"params\[1\]"):
        rk.perturb_(p, gamma=0.1, seed=1, step=0, backend="triton")
    with pytest.raises(TypeError, match=r"params\[0\]"):
        rk.sgd_step_([torch.ones(3, dtype=torch.int32)], [torch.ones(3)], None, lr=0.1, backend="triton")
    assert launches == []


def test_unavailable_on_cuda_tensors_says_why():
    reason = backends.unavailable_reason("triton", "cuda")
    assert reason is not None and ("TRITON_INTERPRET" in reason or "GPU" in reason)

