"""Every op at offsets and element counts around 2^31 and 2^32 (issue 14, item 1).

- The noise stream (fast): windows whose offset or end straddles 2^31 - 1, 2^31, 2^31 + 1, 2^32 - 1, 2^32,
  2^32 + 1, 2^33 + odd, the element 4 * 2^32 where the block counter's low word wraps (and 2^63, the
  largest end), on every backend that runs on CPU tensors here (the registry's: reference, the C++ CPU
  backend, Triton in its interpreter, and whatever is registered later), against the reference and the
  C++ CPU backend under docs/spec.md section 6's rule for the normals (bit for bit where it says EXACT),
  and against the Philox words of the counters on both sides of the wrap (the counter layout itself).
- The table ops (slow): perturb_, restore_ (from backups and regenerated from the sigmas, with the gradient
  mix), sgd_step_ (fused restore, weight decay, momentum, gradient scaling), on one float16/bfloat16 tensor
  of more than 2^31 elements (4 GiB) and of more than 2^32 (8 GiB), and on a call whose tensors together
  cross 2^31; and one noise() call of more than 2^31 normals. Only the C++ CPU backend is fast enough
  (TABLE_BACKENDS); only windows around the boundaries are checked, against the reference computed from the public ops on those windows:
  the reference's noise window and the returned sigma (checked against the row's float64 norm), or the
  reference backend's op run on copies of the windows (elementwise ops). Tensors are filled with a pattern
  of odd period, so that an element read from a wrapped address holds another value. A test needs the
  memory it allocates plus MEMORY_HEADROOM available (MemAvailable in /proc/meminfo), and at most MEMORY_CAP
  (14 GiB, or RWP_KERNELS_TEST_MEMORY_GIB), or is skipped with the reason: the two-tensor ops at 2^32 (16 GiB)
  run only where that variable allows them.
"""
import fcntl
import gc
import os
import tempfile
from pathlib import Path

import pytest
import torch

import rwp_kernels as rk
from conftest import require_backend
from rwp_kernels import backends
from rwp_kernels import conformance as C
from _scalar_philox import scalar_philox

# The backends that run on CPU tensors (Triton: its interpreter); a backend registered later for CPU tensors
# (for example an emulation of the CUDA kernels) is picked up here without a change.
NOISE_BACKENDS = [name for name, b in backends.REGISTRY.items() if "cpu" in b.device_types]
# Fast enough for tensors of 2^31 elements (a few seconds per pass); append a backend to run it there too.
TABLE_BACKENDS = ["cpu"]

MEMORY_HEADROOM = 4 << 30  # left free for the rest of the machine
# The most a test may allocate unless RWP_KERNELS_TEST_MEMORY_GIB allows more: the test machines are shared.
MEMORY_CAP = int(float(os.environ.get("RWP_KERNELS_TEST_MEMORY_GIB", "14")) * 2**30)
# The tests that allocate gigabytes take turns, across pytest-xdist workers and pytest runs on the machine: two
# of them checking MemAvailable at once could both find room for themselves alone.
BIG_MEMORY = pytest.mark.usefixtures("one_big_test_at_a_time")

SEED, STEP, STREAM = 0xC0FFEE_1234_5678, 2**32 + 9, 2
KEY = dict(seed=SEED, step=STEP, stream=STREAM)

# Element offsets whose neighbourhoods are checked; 4 * 2^32: the block q = e // 4 reaches 2^32, where the
# counter's low word wraps to 0 and its high word becomes 1.
BOUNDARIES = (2**31 - 1, 2**31, 2**31 + 1, 2**32 - 1, 2**32, 2**32 + 1, 2**33 + 5, 4 * 2**32 - 1, 4 * 2**32,
              4 * 2**32 + 1, 4 * 2**33 + 3, 2**62 + 1)


def _windows():
    """(offset, numel) pairs: straddling each boundary, starting or ending exactly on it, one element."""
    out = []
    for b in BOUNDARIES:
        out += [(b - 8, 16), (b - 3, 7), (b, 5), (b - 5, 5), (b - 1, 1), (b - 33, 70)]
    out += [(2**63 - 16, 16), (2**63 - 1, 1), (2**63 - 70, 70)]  # offset + numel = 2^63, the largest allowed
    return out


WINDOWS = _windows()
# Triton on CPU tensors runs in its interpreter (about 30 ms a call): a window per boundary in the fast tier.
FEW_WINDOWS = [(b - 8, 16) for b in BOUNDARIES] + [(2**63 - 16, 16)]


def windows_for(name: str) -> list:
    return FEW_WINDOWS if name == "triton" else WINDOWS


def noise(backend, offset, numel, param_index=7):
    return rk.noise(numel, param_index=param_index, offset=offset, backend=backend, **KEY)


@pytest.mark.parametrize("name", NOISE_BACKENDS)
def test_noise_windows_around_2_31_and_2_32(name):
    require_backend(name, "cpu")
    rule = C.noise_rule(name)
    errors = []
    for offset, numel in windows_for(name):
        z = noise(name, offset, numel)
        assert z.shape == (numel,) and z.dtype == torch.float32, (offset, numel)
        for other in ("reference", "cpu"):
            if other == "cpu" and backends.unavailable_reason("cpu", "cpu") is not None:
                continue
            errors += C.check(rule, [z], [noise(other, offset, numel)], f"offset {offset} numel {numel} vs {other}")
    assert not errors, "\n".join(errors[:10])


@pytest.mark.parametrize("name", NOISE_BACKENDS)
def test_noise_windows_are_slices_of_one_stream_across_the_boundaries(name):
    """On each backend alone, bit for bit: a window starting on or just after a boundary is the slice of a
    window that straddles it (no element depends on where a call starts)."""
    require_backend(name, "cpu")
    for b in BOUNDARIES:
        whole = noise(name, b - 37, 90)
        parts = ((b, 5), (b - 1, 2), (b + 1, 43), (b - 37, 1), (b + 2, 1))
        for start, numel in parts[:2] if name == "triton" else parts:
            part = noise(name, start, numel)
            assert torch.equal(part.view(torch.int32), whole[start - (b - 37):][:numel].view(torch.int32)), (b, start)


def _normals_of_block(q: int, param_index: int) -> torch.Tensor:
    """The four normals of block q from the Philox words of its counter (q mod 2^32, q >> 32, param_index,
    step mod 2^32), by the public philox4x32_10 and the reference's Box-Muller."""
    from rwp_kernels import reference
    from rwp_kernels.stream import philox_key, step_word

    k0, k1 = philox_key(SEED, STREAM)
    counter = torch.tensor([[q & 0xFFFFFFFF, q >> 32, param_index, step_word(STEP)]], dtype=torch.int64)
    x = rk.philox4x32_10(counter, torch.tensor([[k0, k1]]), backend="reference")[0]
    z0, z1 = reference._box_muller(x[0:1], x[1:2])
    z2, z3 = reference._box_muller(x[2:3], x[3:4])
    return torch.cat([z0, z1, z2, z3])


@pytest.mark.parametrize("name", NOISE_BACKENDS)
def test_block_counter_low_word_wraps_into_the_high_word(name):
    """The blocks q = 2^32 - 1, 2^32 (low word 0, high word 1), 2^33 - 1, 2^33 and 2^32 + 2^31: each window
    of four normals is its own counter's block, and differs from the block of the wrapped counter (q mod
    2^32, high word 0), which a 32-bit block index would compute."""
    require_backend(name, "cpu")
    rule = C.noise_rule(name)
    errors = []
    for q in (2**32 - 1, 2**32, 2**32 + 1, 2**33 - 1, 2**33, 2**32 + 2**31, 2**31 - 1, 2**31):
        z = noise(name, 4 * q, 4, param_index=3)
        errors += C.check(rule, [z], [_normals_of_block(q, 3)], f"block {q}")
        if q >= 2**32:
            assert not torch.equal(z, _normals_of_block(q % 2**32, 3)), f"block {q} is block {q % 2**32}"
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("name", NOISE_BACKENDS)
def test_philox_counter_words_at_the_wrap(name):
    """The Philox words of the counters on both sides of the wrap, on every backend, against a scalar
    Philox (Python integers, from the Random123 paper)."""
    require_backend(name, "cpu")
    counters = [[2**32 - 1, 0, 3, 9], [0, 1, 3, 9], [2**32 - 1, 1, 3, 9], [0, 2, 3, 9], [2**31 - 1, 0, 3, 9],
                [2**31, 0, 3, 9], [2**32 - 1, 2**32 - 1, 2**32 - 1, 2**32 - 1], [0, 2**29, 0, 0]]
    key = [0x89ABCDEF, 0x01234567]
    out = rk.philox4x32_10(torch.tensor(counters), torch.tensor(key), backend=name)
    assert out.tolist() == [scalar_philox(c, key) for c in counters]


# ---- the table ops on tensors of more than 2^31 and 2^32 elements -------------------------------------------

ROW = 1_000_003  # row length: odd, so 2^31 and 2^32 fall inside rows (and no row starts on a power of two)
ROWS_2_31 = 2148  # 2148 * ROW = 2^31 + 522_796
ROWS_2_32 = 4295  # 4295 * ROW = 2^32 + 45_589
W_PERIOD, G_PERIOD, B_PERIOD = 2047, 2039, 2029  # fill patterns' periods: 2^31 and 2^32 are not multiples
GAMMA = 0.01
SGD = dict(lr=0.1, weight_decay=0.01, grad_scale=0.5)


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def need_memory(nbytes: int) -> None:
    if nbytes > MEMORY_CAP:
        pytest.skip(f"needs {nbytes / 2**30:.1f} GiB for its tensors, more than RWP_KERNELS_TEST_MEMORY_GIB="
                    f"{MEMORY_CAP / 2**30:g} allows (set it higher to run this test)")
    available = _mem_available()
    if available is None:
        pytest.skip("cannot read MemAvailable from /proc/meminfo to check that the tensors fit")
    if available < nbytes + MEMORY_HEADROOM:
        pytest.skip(f"needs {nbytes / 2**30:.1f} GiB for its tensors plus {MEMORY_HEADROOM / 2**30:.0f} GiB "
                    f"headroom; {available / 2**30:.1f} GiB available")


@pytest.fixture
def one_big_test_at_a_time():
    with open(Path(tempfile.gettempdir()) / "rwp_kernels_tests_big_memory.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed, or the process dies
        yield


@pytest.fixture
def arena():
    """Allocates the big tensors and frees their memory at teardown, also when a failure's traceback still
    refers to them."""
    made = []

    def alloc(numel: int, dtype, period: int) -> torch.Tensor:
        t = torch.empty(numel, dtype=dtype)
        made.append(t)
        fill(t, period)
        return t

    yield alloc
    for t in made:
        t.untyped_storage().resize_(0)
    made.clear()
    gc.collect()


def _pattern(period: int, dtype) -> torch.Tensor:
    """One period of a fill: k / 1024 for k in [-(period // 2), period // 2], rounded to dtype."""
    return ((torch.arange(period, dtype=torch.float64) - period // 2) / 1024).to(dtype)


def fill(flat: torch.Tensor, period: int) -> None:
    """Element e of the flat tensor becomes _pattern(period)[e % period]."""
    base = _pattern(period, flat.dtype)
    full = flat.numel() // period * period
    flat[:full].view(-1, period).copy_(base)
    flat[full:] = base[: flat.numel() - full]


def pattern_window(start: int, n: int, period: int, dtype) -> torch.Tensor:
    return _pattern(period, dtype)[torch.arange(start, start + n) % period]


def boundary_windows(numel: int, first_global: int = 0) -> list[tuple[int, int]]:
    """(start, n) windows of a tensor whose element 0 is element ``first_global`` of the call: around the
    global 2^31 and 2^32 and their own, the row start nearest to each, the first and the last elements."""
    out = {(0, 64), (numel - 64, 64)}
    for b in (2**31, 2**32):
        for local in (b, b - first_global):
            if 64 <= local <= numel - 64:
                out |= {(local - 64, 128), (local // ROW * ROW - 32, 64)}
    return sorted(out)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32)


def assert_bitwise(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    same = _bits(actual) == _bits(expected)
    if not bool(same.all()):
        i = int((~same).nonzero()[0])
        raise AssertionError(f"{what}: {int((~same).sum())} of {same.numel()} elements differ, the first at +{i}: "
                             f"{actual[i].item()} instead of {expected[i].item()}")


class Param:
    """A parameter of ``rows`` rows of ROW elements, filled with a pattern; its windows and their clean values;
    the float64 norms of the rows the windows touch."""

    def __init__(self, alloc, rows: int, dtype, *, first_global: int = 0, param_index: int = 0):
        self.numel, self.dtype, self.param_index = rows * ROW, dtype, param_index
        self.flat = alloc(self.numel, dtype, W_PERIOD)
        self.param = self.flat.view(rows, ROW)
        self.windows = boundary_windows(self.numel, first_global)
        self.clean = {w: self.at(w).clone() for w in self.windows}
        self.rows_of = {w: torch.arange(w[0], w[0] + w[1]) // ROW for w in self.windows}
        touched = sorted({int(r) for w in self.windows for r in self.rows_of[w].unique()})
        self.norms = {r: self.param[r].double().norm().item() for r in touched}

    def at(self, w, flat=None) -> torch.Tensor:
        return (self.flat if flat is None else flat)[w[0]:w[0] + w[1]]

    def z(self, w) -> torch.Tensor:
        return rk.noise(w[1], param_index=self.param_index, offset=w[0], backend="reference", **KEY)


def check_perturbed(p: Param, sigmas: torch.Tensor, what="perturb_") -> dict:
    """The returned sigmas against the rows' float64 norms, and each window against the reference's
    w + sigma z (float32, rounded once: reference.py) with the returned sigma; returns the windows."""
    for row, norm in p.norms.items():
        torch.testing.assert_close(sigmas[row].double(), torch.tensor(GAMMA * norm, dtype=torch.float64),
                                   rtol=C.REFERENCE_SIGMA_RTOL, atol=0, msg=lambda m: f"{what}: sigma of row {row}: {m}")
    out = {}
    for w in p.windows:
        want = (p.clean[w].float() + sigmas[p.rows_of[w]] * p.z(w)).to(p.dtype)
        assert_bitwise(p.at(w), want, f"{what}: window at {w[0]}")
        out[w] = p.at(w).clone()
    return out


def check_regenerated(p: Param, sigmas: torch.Tensor, perturbed: dict, what="restore_ regenerated") -> None:
    for w in p.windows:
        want = (perturbed[w].float() - sigmas[p.rows_of[w]] * p.z(w)).to(p.dtype)
        assert_bitwise(p.at(w), want, f"{what}: window at {w[0]}")


@pytest.mark.slow
@BIG_MEMORY
@pytest.mark.parametrize("name", TABLE_BACKENDS)
def test_perturb_and_restore_on_a_tensor_of_more_than_2_31_elements(name, arena):
    """float16 (2148, 1_000_003), 2^31 + 522_796 elements (4 GiB), and a second one: perturb_ with backups,
    restore_ from the backups, perturb_ again and restore_ regenerated from the sigmas with the gradient mix
    (grads * grad_scale) in the same pass. About 10 s on 2 cores."""
    require_backend(name, "cpu")
    dtype = torch.float16
    need_memory(2 * ROWS_2_31 * ROW * dtype.itemsize)
    p = Param(arena, ROWS_2_31, dtype)
    second = arena(p.numel, dtype, B_PERIOD)

    sigmas = rk.perturb_([p.param], gamma=GAMMA, backups=[second.view_as(p.param)], backend=name, **KEY)[0]
    perturbed = check_perturbed(p, sigmas)
    for w in p.windows:
        assert_bitwise(p.at(w, second), p.clean[w], f"backup window at {w[0]}")

    rk.restore_([p.param], backups=[second.view_as(p.param)], backend=name)
    for w in p.windows:
        assert_bitwise(p.at(w), p.clean[w], f"restore_ from backups: window at {w[0]}")

    fill(second, G_PERIOD)  # now the gradients
    again = rk.perturb_([p.param], gamma=GAMMA, backend=name, **KEY)[0]
    assert torch.equal(again, sigmas)
    rk.restore_([p.param], sigmas=[sigmas], grads=[second.view_as(p.param)], grad_scale=0.75, backend=name, **KEY)
    check_regenerated(p, sigmas, perturbed)
    for w in p.windows:
        want = (pattern_window(w[0], w[1], G_PERIOD, dtype).float() * 0.75).to(dtype)
        assert_bitwise(p.at(w, second), want, f"restore_ gradient mix: window at {w[0]}")


@pytest.mark.slow
@BIG_MEMORY
@pytest.mark.parametrize("name", TABLE_BACKENDS)
def test_sgd_step_on_tensors_of_more_than_2_31_elements(name, arena):
    """bfloat16 (2148, 1_000_003): params, gradients and a third tensor (12 GiB): sgd_step_ with the fused
    restore from backups, then with momentum (nesterov, a second step), weight decay and gradient scaling;
    each window against the reference backend's sgd_step_ on copies of the window (an elementwise op).
    About 5 s."""
    require_backend(name, "cpu")
    dtype = torch.bfloat16
    need_memory(3 * ROWS_2_31 * ROW * dtype.itemsize)
    p = Param(arena, ROWS_2_31, dtype)
    grads = arena(p.numel, dtype, G_PERIOD).view_as(p.param)
    third = arena(p.numel, dtype, B_PERIOD).view_as(p.param)  # backups, then momentum buffers
    view = p.param.view(-1)

    def windows(*tensors):
        return {w: [p.at(w, t.view(-1)).clone() for t in tensors] for w in p.windows}

    p.param.add_(1.0)  # "perturbed": the step must restore from the backups first
    before = windows(p.param, grads, third)
    rk.sgd_step_([p.param], [grads], None, backups=[third], backend=name, **SGD)
    for w, (wp, g, b) in before.items():
        rk.sgd_step_([wp], [g], None, backups=[b], backend="reference", **SGD)
        assert_bitwise(p.at(w, view), wp, f"sgd_step_ with backups: window at {w[0]}")

    hyper = dict(SGD, momentum=0.9, nesterov=True, is_first_step=False)
    before = windows(p.param, grads, third)
    rk.sgd_step_([p.param], [grads], [third], backend=name, **hyper)
    for w, (wp, g, b) in before.items():
        rk.sgd_step_([wp], [g], [b], backend="reference", **hyper)
        assert_bitwise(p.at(w, view), wp, f"sgd_step_ with momentum: weights window at {w[0]}")
        assert_bitwise(p.at(w, third.view(-1)), b, f"sgd_step_ with momentum: buffer window at {w[0]}")


@pytest.mark.slow
@BIG_MEMORY
@pytest.mark.parametrize("name", TABLE_BACKENDS)
def test_perturb_and_restore_when_a_call_crosses_2_31_elements(name, arena):
    """Two float16 tensors of fewer than 2^31 elements each that together hold 2^31 + 1_522_799 (4 GiB), in
    one call with param_indices 5 and 9: perturb_, then restore_ regenerated. Windows around each tensor's
    ends and around the call's element 2^31 (inside the second tensor). About 3 s."""
    require_backend(name, "cpu")
    dtype = torch.float16
    need_memory((1100 + 1049) * ROW * dtype.itemsize)
    a = Param(arena, 1100, dtype, param_index=5)
    b = Param(arena, 1049, dtype, first_global=a.numel, param_index=9)
    assert a.numel < 2**31 and b.numel < 2**31 < a.numel + b.numel
    assert any(w[0] < 2**31 - a.numel < w[0] + w[1] for w in b.windows)
    sigmas = rk.perturb_([a.param, b.param], gamma=GAMMA, param_indices=[5, 9], backend=name, **KEY)
    perturbed = [check_perturbed(x, s) for x, s in zip((a, b), sigmas)]
    rk.restore_([a.param, b.param], sigmas=sigmas, param_indices=[5, 9], backend=name, **KEY)
    for x, s, q in zip((a, b), sigmas, perturbed):
        check_regenerated(x, s, q)


@pytest.mark.slow
@BIG_MEMORY
@pytest.mark.parametrize("name", TABLE_BACKENDS)
def test_perturb_and_restore_on_a_tensor_of_more_than_2_32_elements(name, arena):
    """float16 (4295, 1_000_003), 2^32 + 45_589 elements (8 GiB), alone: perturb_ and restore_ regenerated;
    windows around 2^31, 2^32, the nearest row starts and the ends. About 6 s."""
    require_backend(name, "cpu")
    dtype = torch.float16
    need_memory(ROWS_2_32 * ROW * dtype.itemsize)
    p = Param(arena, ROWS_2_32, dtype)
    assert any(w[0] < 2**32 < w[0] + w[1] for w in p.windows)
    sigmas = rk.perturb_([p.param], gamma=GAMMA, backend=name, **KEY)[0]
    perturbed = check_perturbed(p, sigmas)
    rk.restore_([p.param], sigmas=[sigmas], backend=name, **KEY)
    check_regenerated(p, sigmas, perturbed)


@pytest.mark.slow
@BIG_MEMORY
@pytest.mark.parametrize("name", TABLE_BACKENDS)
def test_backups_and_sgd_step_on_tensors_of_more_than_2_32_elements(name, arena):
    """float16 (4295, 1_000_003) and a second tensor (16 GiB: only with RWP_KERNELS_TEST_MEMORY_GIB >= 16):
    perturb_ with backups, restore_ from them, sgd_step_ with weight decay and gradient scaling. About 40 s
    (measured with 23 GiB of memory)."""
    require_backend(name, "cpu")
    dtype = torch.float16
    need_memory(2 * ROWS_2_32 * ROW * dtype.itemsize)
    p = Param(arena, ROWS_2_32, dtype)
    second = arena(p.numel, dtype, B_PERIOD)
    sigmas = rk.perturb_([p.param], gamma=GAMMA, backups=[second.view_as(p.param)], backend=name, **KEY)[0]
    check_perturbed(p, sigmas)
    rk.restore_([p.param], backups=[second.view_as(p.param)], backend=name)
    for w in p.windows:
        assert_bitwise(p.at(w), p.clean[w], f"restore_ from backups: window at {w[0]}")
    fill(second, G_PERIOD)
    before = {w: (p.at(w).clone(), p.at(w, second).clone()) for w in p.windows}
    rk.sgd_step_([p.param], [second.view_as(p.param)], None, backend=name, **SGD)
    for w, (wp, g) in before.items():
        rk.sgd_step_([wp], [g], None, backend="reference", **SGD)
        assert_bitwise(p.at(w), wp, f"sgd_step_: window at {w[0]}")


@pytest.mark.slow
@BIG_MEMORY
@pytest.mark.parametrize("name", TABLE_BACKENDS)
def test_noise_call_of_more_than_2_31_normals(name):
    """One noise() call of 2^31 + 70 normals (8 GiB of float32) from an odd offset: windows around its
    element 2^31 and the stream's element 2^31, and its ends, against the reference's windows. About 3 s."""
    require_backend(name, "cpu")
    numel, offset = 2**31 + 70, 5
    need_memory(numel * 4)
    z = rk.noise(numel, offset=offset, backend=name, **KEY)
    try:
        assert z.shape == (numel,)
        for start in (0, 2**31 - offset - 40, 2**31 - 40, numel - 70):
            want = rk.noise(70, offset=offset + start, backend="reference", **KEY)
            assert_bitwise(z[start:start + 70], want, f"window at {start}")
    finally:
        z.untyped_storage().resize_(0)
