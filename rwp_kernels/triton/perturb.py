"""perturb_: per-row norms, noise and the optional backup / gradient scaling, one launch for all tensors with a
sigma per row, one for ARWP's 1-D tensors (a sigma per element) and one for those of them that need a scalar loop
(``vectorized_row``), each preceded by a launch of the partial sums where a row is longer than
``tables.SPLIT_ROW``. All of them are made ready before the first one runs.

A program takes one item: several whole rows packed into one tile (short rows; their norms are segmented sums,
their sigmas computed once per row), one row that fits a tile (read again for the update, from L1), one longer
row whose first PARTS tiles are kept in registers between the norm and the update (the constexpr,
``tables.perturb_tile``; the tiles past them are read twice), one long row where PARTS is 1 (two passes over it:
the norm, then the update, which finds the row in L2), or one segment of a split row (its norm from the partial
sums that ``row_partials_kernel`` wrote in the first launch). Items
whose tensors are 16-byte aligned and whose bounds are whole vectors run a copy of each path with 16-byte
accesses (``VEC``: ``tables.span``, ``tables.pointer``).
"""
import torch
import triton
import triton.language as tl

from .. import stream as S
from ..contract import NoiseKey
from ..layout import sigma_offsets
from . import philox as P
from . import tables as T
from .rounding import INTERPRETED, to_dtype, to_float32
from .tables import BACKUP, COLUMNS, FISHER, GRAD, PARAM_INDEX, ROW_LEN, SEGMENT, SIGMA_OFF, SPLIT_ROW, VECTOR, W

# The weights of a row longer than a tile, read twice (the norm's loop, then the update's; a split row's partial
# sums, then the update launch): the first read asks L1 and L2 to keep them, so that the second comes from a
# cache rather than DRAM. The second read's default policy puts the lines back in the usual eviction order (an
# evict_first hint there costs 6 instructions per tile and warp in the update loop; a tile that fits, read again
# right after its norm, gains nothing from a hint that costs it 6 per warp).
REREAD = tl.constexpr("evict_last")

NORM_EPS: tl.constexpr = tl.constexpr(S.NORM_EPS)


@triton.jit
def _segment_add(a, row_a, b, row_b):
    """The combine of a segmented sum: running sums restart where the row changes."""
    return tl.where(row_a == row_b, a + b, b), row_b


@triton.jit
def _row_sums_scan(values, segment, last):
    """Float64 sums of ``values`` over rows: a segmented scan over the tile (``segment``: each lane's row,
    nondecreasing along the tile), read at each row's last lane (``last``, one entry per row). Only a row's own
    elements enter its sum (a row of zeros sums to exactly 0)."""
    running, _ = tl.associative_scan((values, segment), 0, _segment_add)
    return tl.gather(running, last, 0)


@triton.jit
def _row_sums_masked(values, segment, rows):
    """The same sums of the rows ``rows`` as a masked [rows, BLOCK] reduction, for the interpreter."""
    return tl.sum(tl.where(segment[None, :] == rows[:, None], values[None, :], 0.0), 1)


@triton.jit
def _row_sums(values, segment, rows, last):
    """``_row_sums_scan``. In Triton's interpreter a scan with a custom combine runs element by element in
    Python (a quarter of a second per tile), so there ``_row_sums_masked`` gives each row the sum of the same
    elements in a few numpy operations: only the order of the float64 additions differs, which the spec
    leaves open (it differs between the C++ CPU and CUDA backends too). tests/test_triton_interpret.py runs
    the scan in the interpreter against it."""
    if INTERPRETED:
        return _row_sums_masked(values, segment, rows)
    else:
        return _row_sums_scan(values, segment, last)


@triton.jit
def _row_scale(sumsq, gamma, vector):
    """gamma * ||row|| (+ NORM_EPS for vectors) in float64: the sigma before ARWP's division."""
    norm = tl.sqrt(sumsq)  # float64: sqrt.rn.f64
    return tl.where(vector != 0, gamma * (norm + NORM_EPS), gamma * norm)


@triton.jit
def _scaled_sigma(scale, fisher_sum, eta, has_fisher):
    """``scale`` (``_row_scale``) / sqrt(1 + eta * fisher_sum) with ARWP, in float64 (IEEE sqrt and division),
    rounded once to float32."""
    sigma = scale
    if has_fisher:
        sigma = sigma / tl.sqrt(1.0 + eta * fisher_sum)  # float64: div.rn.f64
    return sigma.to(tl.float32)


@triton.jit
def _element_sigmas(scale, eta, fisher_addr, sigma_ptr, tile, mask, start, count, VEC: tl.constexpr,
                    DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    """The sigmas of a 1-D ARWP tensor in one tile (``_scaled_sigma`` of each element's Fisher value, which is
    read here, after the norm), stored, then read back per lane (``mask``: the item's). Computed on each half of
    the tile in turn: a 16-bit tile's eight float64 square roots and divisions per thread at once, each with a
    subroutine call on its slow path, kept too many values live for 48 registers."""
    HALF: tl.constexpr = BLOCK // 2
    for h in tl.static_range(2):
        part, in_item = T.span(tile + h * HALF, start, start + count, VEC, DTYPE, HALF)
        at = part + tl.arange(0, HALF)
        f = tl.zeros([HALF], tl.float64)
        if fisher_addr != 0:
            f = tl.load(T.pointer(fisher_addr, tl.float32, VEC) + at, mask=in_item, other=0.0).to(tl.float64)
        sigma = _scaled_sigma(tl.zeros([HALF], tl.float64) + scale, f, eta, fisher_addr != 0)
        tl.store(sigma_ptr + at, sigma, mask=in_item)
    tl.debug_barrier()  # (each lane reads sigmas that other threads stored)
    return tl.load(sigma_ptr + tile + tl.arange(0, BLOCK), mask=mask, other=0.0)


@triton.jit
def _hyper(gamma_ptr, row):
    """(gamma, eta, whether the parameter is a vector): gamma and eta float64, as the C++ kernels take them."""
    return tl.load(gamma_ptr), tl.load(gamma_ptr + 1), tl.load(row + VECTOR)


@triton.jit
def _read_sigma(sumsq, fisher_sum, gamma_ptr, row, has_fisher):
    """csrc/rwp_common.h ``row_sigma``: gamma * ||row|| (+ NORM_EPS for vectors), / sqrt(1 + eta * fisher_sum)
    with ARWP, all in float64, rounded once to float32; each hyperparameter read where the arithmetic first needs
    it (eta after the square root): a row's sigma after its norm, with nothing kept in registers through the norm
    for it."""
    scale = _row_scale(sumsq, tl.load(gamma_ptr), tl.load(row + VECTOR))
    return _scaled_sigma(scale, fisher_sum, tl.load(gamma_ptr + 1), has_fisher)


@triton.jit
def _reciprocal(row_len):
    """ceil(2**32 / row_len) as uint32 (0 for row_len 1), for ``_row_of``: (2**32 - 1) // row_len + 1, one 32-bit
    division per program (a 64-bit one is a subroutine call)."""
    all_ones = (row_len * 0 - 1).to(tl.uint32)  # 2**32 - 1 is no int32 literal (the interpreter rejects those)
    return all_ones // row_len.to(tl.uint32) + 1


@triton.jit
def _row_of(d, length, magic):
    """d // length for int32 tensors 0 <= d, length < 2**16 (negative d: 0, or d itself where length is 1), as a
    multiply-high by ``magic = _reciprocal(length)``: exact there, as d * (magic * length - 2**32) < 2**32."""
    q = tl.umulhi(tl.maximum(d, 0).to(tl.uint32), magic).to(tl.int32)
    return tl.where(length == 1, d, q)


@triton.jit
def _item_rows(items_ptr, tile, row):
    """The first lane of this program's item in its tile and the item's row length (int32), read from the item and
    the parameter's table row."""
    return (T.load_start(items_ptr) - tile).to(tl.int32), tl.load(row + ROW_LEN).to(tl.int32)


@triton.jit
def _lane_rows(lo, length, BLOCK: tl.constexpr):
    """Each lane's row in the item that starts at lane ``lo`` (nondecreasing: lanes before the item get row 0, or
    rows below 0; lanes past it rows past the item's, so that only a row's own lanes share its number)."""
    return _row_of(tl.arange(0, BLOCK) - lo, length, _reciprocal(length))


@triton.jit
def _item_row_sums(values, items_ptr, tile, row, BLOCK: tl.constexpr):
    """``_row_sums`` of ``values`` over the rows packed in the tile, the lanes' rows computed here from the item's
    first lane and row length read again (``_item_rows``)."""
    rows = tl.arange(0, BLOCK // 8)
    lo, length = _item_rows(items_ptr, tile, row)
    return _row_sums(values, _lane_rows(lo, length, BLOCK), rows, tl.minimum(lo + (rows + 1) * length - 1, BLOCK - 1))


@triton.jit
def _packed_sigmas(items_ptr, row, tile, squares, f_ptr, mask, count, has_fisher, gamma_ptr, sigma_ptr,
                   BLOCK: tl.constexpr):
    """The sigmas of the rows packed in a tile (the item: at most BLOCK // 8 whole rows): row sums, one sigma per
    row (stored at ``sigma_ptr + row``), and each lane's, read back from there. The Fisher state (``f_ptr``: the
    tile's lanes) is loaded after the squares' sums, so that both are not live at once. The lanes' rows are
    computed for each use from the item read again: kept, they (8 registers per thread in a 16-bit tile) would be
    live through the scans and the float64 sigma's subroutine calls, and 16-bit tiles spilled at 48 registers."""
    rows = tl.arange(0, BLOCK // 8)
    sumsq = _item_row_sums(squares, items_ptr, tile, row, BLOCK)
    fsum = tl.zeros([BLOCK // 8], tl.float64)
    if has_fisher:
        fsum = _item_row_sums(tl.load(f_ptr, mask=mask, other=0.0).to(tl.float64), items_ptr, tile, row, BLOCK)
    sigma = _read_sigma(sumsq, fsum, gamma_ptr, row, has_fisher)
    tl.store(sigma_ptr + rows, sigma, mask=rows < count.to(tl.int32) // tl.load(row + ROW_LEN).to(tl.int32))
    tl.debug_barrier()  # (each sigma is read back by the lanes of its row, in other threads)
    lo, length = _item_rows(items_ptr, tile, row)
    lane_rows = tl.minimum(tl.maximum(_lane_rows(lo, length, BLOCK), 0), BLOCK // 8 - 1)
    return tl.load(sigma_ptr + lane_rows, mask=mask, other=0.0)


@triton.jit
def _targets(row, gamma_ptr):
    """What a tile's update reads from the parameter's table row: whether it draws noise (gamma != 0), the
    parameter's index in the noise stream, the addresses of the weights, the backup and the gradient (0: none).
    Read after the norm, rather than kept in registers through it; once per program."""
    return (tl.load(gamma_ptr) != 0, tl.load(row + PARAM_INDEX).to(tl.uint32), tl.load(row + W), tl.load(row + BACKUP),
            tl.load(row + GRAD))


@triton.jit
def _apply(noisy, param_index, w_addr, backup_addr, grad_addr, tile, mask, sigma, grad_scale, grad_scale_ptr, step,
           k0, k1, VEC: tl.constexpr, DTYPE: tl.constexpr, BLOCK: tl.constexpr, PER: tl.constexpr, x_kept=None):
    """The per-element part of the tile at element ``tile`` (``_targets``: the first five arguments): backup <- w,
    w <- w + sigma * z (``add_noise``: a product and a sum, two roundings), grad <- grad * grad_scale. The weights
    are loaded here unless the caller kept them (``x_kept``: a resident row's). ``PER``: a thread's consecutive
    elements (``_perturb``'s)."""
    lanes = tl.arange(0, BLOCK)
    z = tl.zeros([BLOCK], tl.float32)
    if noisy:  # the normals first: the weights are loaded after them, not kept in registers through them
        key0, key1 = P.key_words(k0, k1)
        z = P.normal_tile(tile // 4, param_index, step.to(tl.uint32, bitcast=True), key0, key1, BLOCK, PER)
    w_ptr = T.pointer(w_addr, DTYPE, VEC) + tile + lanes
    if x_kept is None:
        x_raw = tl.load(w_ptr, mask=mask, other=0.0)  # (evict_normal: back in the caches' usual order)
    else:
        x_raw = x_kept
    if backup_addr != 0:
        tl.store(T.pointer(backup_addr, DTYPE, VEC) + tile + lanes, x_raw, mask=mask)
    if noisy:
        tl.store(w_ptr, to_dtype(to_float32(x_raw) + sigma * z, DTYPE), mask=mask)
    if grad_addr != 0:
        g_ptr = T.pointer(grad_addr, DTYPE, VEC) + tile + lanes
        g = to_float32(tl.load(g_ptr, mask=mask, other=0.0))
        tl.store(g_ptr, to_dtype(g * (grad_scale * tl.load(grad_scale_ptr)), DTYPE), mask=mask)


@triton.jit
def _tile_sigmas(items_ptr, w_addr, fisher_addr, sigma_ptr, start, count, row_len, first_row, ELEMENTWISE: tl.constexpr,
                 gamma_ptr, row, hyper, VEC: tl.constexpr, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    """The sigmas of an item in one tile (one row, several rows, or a 0-D/1-D ARWP tensor with a sigma per
    element), stored, and per lane; the tile and its mask. ``hyper``: the per-element sigmas' (``_hyper``)."""
    lanes = tl.arange(0, BLOCK)
    tile, mask = T.span(start - start % 4, start, start + count, VEC, DTYPE, BLOCK)  # Philox block boundary
    has_fisher = fisher_addr != 0
    x = to_float32(tl.load(T.pointer(w_addr, DTYPE, VEC) + tile + lanes, mask=mask, other=0.0)).to(tl.float64)
    squares = x * x  # exact in float64
    f_ptr = T.pointer(fisher_addr, tl.float32, VEC) + tile + lanes
    if ELEMENTWISE:
        gamma, eta, vector = hyper
        sigma = _element_sigmas(_row_scale(tl.sum(squares), gamma, vector), eta, fisher_addr, sigma_ptr, tile, mask,
                                start, count, VEC, DTYPE, BLOCK)
    elif count > row_len:
        sigma = _packed_sigmas(items_ptr, row, tile, squares, f_ptr, mask, count, has_fisher, gamma_ptr,
                               sigma_ptr + first_row, BLOCK)
    else:
        sumsq = tl.sum(squares)
        fsum = tl.zeros([], tl.float64)
        if has_fisher:
            fsum = tl.sum(tl.load(f_ptr, mask=mask, other=0.0).to(tl.float64))
        row_sigma = _read_sigma(sumsq, fsum, gamma_ptr, row, has_fisher)
        tl.store(sigma_ptr + first_row, row_sigma)
        sigma = tl.zeros([BLOCK], tl.float32) + row_sigma
    return tile, mask, sigma


@triton.jit
def _add_squares(acc, x, PER: tl.constexpr):
    """``acc`` (one float64 per thread) plus the squares of the thread's ``PER`` consecutive elements of ``x``
    (float64), one fma each: x * x is exact in float64, so each step rounds once, as ``acc + x * x`` would."""
    n: tl.constexpr = x.shape[0] // PER
    if PER == 4:
        even, odd = tl.split(tl.reshape(x, [n, 2, 2]))
        parts = tl.split(even) + tl.split(odd)
    else:
        quads = tl.split(tl.reshape(x, [n, 2, 2, 2]))
        halves = tl.split(quads[0]) + tl.split(quads[1])
        parts = tl.split(halves[0]) + tl.split(halves[1]) + tl.split(halves[2]) + tl.split(halves[3])
    for i in tl.static_range(PER):
        acc = tl.fma(parts[i], parts[i], acc)
    return acc


@triton.jit
def _loop_acc(w_addr, fisher_addr, base, start, end, acc, facc, VEC: tl.constexpr, DTYPE: tl.constexpr,
              BLOCK: tl.constexpr, PER: tl.constexpr):
    """``acc`` and ``facc`` (one float64 per thread: a thread's elements added up first, fewer registers than one
    per element) plus the squares and the Fisher state of the elements ``[start, end)`` in the tiles from
    ``base`` (a multiple of 4) on, tile by tile."""
    lanes = tl.arange(0, BLOCK)
    w_ptr = T.pointer(w_addr, DTYPE, VEC)
    f_ptr = T.pointer(fisher_addr, tl.float32, VEC)
    for i in range(0, tl.cdiv(end - base, BLOCK)):
        tile, mask = T.span(base + i * BLOCK, start, end, VEC, DTYPE, BLOCK)
        x = to_float32(tl.load(w_ptr + tile + lanes, mask=mask, other=0.0, eviction_policy=REREAD)).to(tl.float64)
        acc = _add_squares(acc, x, PER)
        if fisher_addr != 0:
            f = tl.load(f_ptr + tile + lanes, mask=mask, other=0.0).to(tl.float64)
            facc += tl.sum(tl.reshape(f, [BLOCK // PER, PER]), 1)
    return acc, facc


@triton.jit
def _loop_sums(w_addr, fisher_addr, start, end, VEC: tl.constexpr, DTYPE: tl.constexpr, BLOCK: tl.constexpr,
               PER: tl.constexpr):
    """The float64 sums of squares and of the Fisher state over the elements ``[start, end)``, tile by tile."""
    zeros = tl.zeros([BLOCK // PER], tl.float64)
    acc, facc = _loop_acc(w_addr, fisher_addr, start - start % 4, start, end, zeros, zeros, VEC, DTYPE, BLOCK, PER)
    fsum = tl.zeros([], tl.float64)
    if fisher_addr != 0:  # (no second block reduction without a Fisher state)
        fsum = tl.sum(facc)
    return tl.sum(acc), fsum


@triton.jit
def _resident(row, gamma_ptr, w_addr, fisher_addr, sigma_ptr, start, count, first_row, grad_scale, grad_scale_ptr,
              step, k0, k1, VEC: tl.constexpr, DTYPE: tl.constexpr, BLOCK: tl.constexpr, PARTS: tl.constexpr):
    """A row whose first PARTS tiles are kept in registers: their loads all issued at once, the norm (a longer
    row's further tiles streamed through it), then each kept tile's update from the kept weights, and the further
    tiles' update, which reads them again. A row of at most PARTS tiles is read from DRAM once. Offsets in the kept
    tiles are 32-bit from the row's first tile, so that the compiler recomputes each tile's addresses and mask
    rather than keeping them through the normals."""
    PER: tl.constexpr = T.per_vector(DTYPE)  # a thread's consecutive elements
    lanes = tl.arange(0, BLOCK)
    base = start - start % 4
    first = (start - base).to(tl.int32)
    end = (start + count - base).to(tl.int32)
    if VEC:  # (the same values, in a form that shows the compiler whole, aligned vectors: tables.span)
        base = base // PER * PER
        first = 0
        end = end // PER * PER
    w_ptr = T.pointer(w_addr, DTYPE, VEC) + base
    f_ptr = T.pointer(fisher_addr, tl.float32, VEC) + base
    kept = ()
    for p in tl.static_range(PARTS):  # all loads first, none waiting for another's data
        offsets = p * BLOCK + lanes
        kept = kept + (tl.load(w_ptr + offsets, mask=(offsets >= first) & (offsets < end), other=0.0),)
    acc = tl.zeros([BLOCK // PER], tl.float64)
    facc = tl.zeros([BLOCK // PER], tl.float64)
    for p in tl.static_range(PARTS):
        x = to_float32(kept[p]).to(tl.float64)
        acc = _add_squares(acc, x, PER)
        if fisher_addr != 0:
            offsets = p * BLOCK + lanes
            mask = (offsets >= first) & (offsets < end)
            f = tl.load(f_ptr + offsets, mask=mask, other=0.0).to(tl.float64)
            facc += tl.sum(tl.reshape(f, [BLOCK // PER, PER]), 1)
    # The first tile past the kept ones (none: no iteration below). base + PARTS * BLOCK is the same value, but from
    # base's vectorized form the kernel spills 4 bytes on sm_80.
    rest = start - start % 4 + PARTS * BLOCK
    acc, facc = _loop_acc(w_addr, fisher_addr, rest, start, start + count, acc, facc, VEC, DTYPE, BLOCK, PER)
    row_sigma = _read_sigma(tl.sum(acc), tl.sum(facc), gamma_ptr, row, fisher_addr != 0)
    tl.store(sigma_ptr + first_row, row_sigma)
    noisy, param_index, w_addr, backup_addr, grad_addr = _targets(row, gamma_ptr)
    for p in tl.static_range(PARTS):
        if p * BLOCK < end:
            offsets = p * BLOCK + lanes
            _apply(noisy, param_index, w_addr, backup_addr, grad_addr, base + p * BLOCK,
                   (offsets >= first) & (offsets < end),
                   tl.zeros([BLOCK], tl.float32) + row_sigma, grad_scale, grad_scale_ptr, step, k0, k1, VEC, DTYPE,
                   BLOCK, PER, kept[p])
    _update_loop(row, gamma_ptr, fisher_addr, sigma_ptr, rest, start + count, 0.0, row_sigma, False, 0.0,
                 grad_scale, grad_scale_ptr, step, k0, k1, VEC, DTYPE, BLOCK, PER)


@triton.jit
def _partial_sums(partials_ptr, first, n, BLOCK: tl.constexpr):
    """A split row's sums: its ``n`` segments' partials (``partials_ptr[2 * first:]``, sum of squares and Fisher
    sum per segment) added in one fixed order, so that every program of the row gets the same sums."""
    lanes = tl.arange(0, BLOCK // 8)
    acc = tl.zeros([BLOCK // 8], tl.float64)
    facc = tl.zeros([BLOCK // 8], tl.float64)
    for i in range(0, tl.cdiv(n, BLOCK // 8)):
        segment = i * (BLOCK // 8) + lanes
        at = partials_ptr + 2 * (first + segment)
        acc += tl.load(at, mask=segment < n, other=0.0)
        facc += tl.load(at + 1, mask=segment < n, other=0.0)
    return tl.sum(acc), tl.sum(facc)


@triton.jit
def _update_loop(row, gamma_ptr, fisher_addr, sigma_ptr, start, end, scale, row_sigma, ELEMENTWISE: tl.constexpr,
                 eta, grad_scale, grad_scale_ptr, step, k0, k1, VEC: tl.constexpr, DTYPE: tl.constexpr,
                 BLOCK: tl.constexpr, PER: tl.constexpr):
    """The update of a long row's elements ``[start, end)``, tile by tile (the row read again, mostly from L2)."""
    lanes = tl.arange(0, BLOCK)
    f_ptr = T.pointer(fisher_addr, tl.float32, VEC)
    base = start - start % 4
    noisy, param_index, w_addr, backup_addr, grad_addr = _targets(row, gamma_ptr)
    for i in range(0, tl.cdiv(end - base, BLOCK)):
        tile, mask = T.span(base + i * BLOCK, start, end, VEC, DTYPE, BLOCK)
        sigma = tl.zeros([BLOCK], tl.float32) + row_sigma
        if ELEMENTWISE:
            f = tl.load(f_ptr + tile + lanes, mask=mask, other=0.0).to(tl.float64)
            sigma = _scaled_sigma(tl.zeros([BLOCK], tl.float64) + scale, f, eta, True)
            tl.store(sigma_ptr + tile + lanes, sigma, mask=mask)
            # (the float64 sigmas leave no registers to keep these through the loop: read again per tile)
            noisy, param_index, w_addr, backup_addr, grad_addr = _targets(row, gamma_ptr)
        _apply(noisy, param_index, w_addr, backup_addr, grad_addr, tile, mask, sigma, grad_scale, grad_scale_ptr, step,
               k0, k1, VEC, DTYPE, BLOCK, PER)


@triton.jit
def _perturb(params_ptr, items_ptr, hyper_ptr, sigma_ptr, partials_ptr, grad_scale, grad_scale_ptr, step, k0, k1,
             ELEMENTWISE: tl.constexpr, DTYPE: tl.constexpr, BLOCK: tl.constexpr, PARTS: tl.constexpr,
             SHORT_ROWS: tl.constexpr, UNALIGNED_LOOPS: tl.constexpr, PER: tl.constexpr):
    """The body of the perturb kernels; ``ELEMENTWISE``: the items are 0-D/1-D ARWP tensors, one sigma per
    element (float64 per element: their own kernel, so that the others' needs fewer registers). Without
    ``SHORT_ROWS`` no row fits a tile; without ``UNALIGNED_LOOPS`` every row longer than a tile is vectorized
    (``vectorized_row``): the loops over a long row have no scalar variant. ``PER``: a thread's consecutive
    elements, as the launch's tile gives them (``tables.scalar_tile``, or a 16-byte vector's)."""
    slot, start, count, row = T.load_item(params_ptr, items_ptr, COLUMNS)
    first_row = T.load_first_row(items_ptr)
    w_addr = tl.load(row + W)
    fisher_addr = tl.load(row + FISHER)
    row_len = tl.load(row + ROW_LEN)
    sigma_ptr += tl.load(row + SIGMA_OFF)
    gamma_ptr = hyper_ptr + 2 * slot
    vec = T.vector_item(row, start, count, DTYPE)
    end = start + count
    # The per-element sigmas' and the long rows' hyperparameters. A row in one tile or kept in registers reads its
    # own after its norm (_read_sigma): kept through the packed rows' scans, they made 16-bit tiles spill at 48
    # registers; read late for the per-element sigmas, Triton 3.6 spills the per-element kernel's update loop.
    hyper = _hyper(gamma_ptr, row)
    fits = (start % 4 + count <= BLOCK) & (row_len <= SPLIT_ROW)  # (a split row's last segment may be short)
    if not SHORT_ROWS:
        fits = False
    if fits:
        if vec:
            tile, mask, sigma = _tile_sigmas(items_ptr, w_addr, fisher_addr, sigma_ptr, start, count, row_len,
                                             first_row, ELEMENTWISE, gamma_ptr, row, hyper, True, DTYPE, BLOCK)
            noisy, param_index, w_addr, backup_addr, grad_addr = _targets(row, gamma_ptr)
            _apply(noisy, param_index, w_addr, backup_addr, grad_addr, tile, mask, sigma, grad_scale, grad_scale_ptr,
                   step, k0, k1, True, DTYPE, BLOCK, PER)
        else:
            tile, mask, sigma = _tile_sigmas(items_ptr, w_addr, fisher_addr, sigma_ptr, start, count, row_len,
                                             first_row, ELEMENTWISE, gamma_ptr, row, hyper, False, DTYPE, BLOCK)
            noisy, param_index, w_addr, backup_addr, grad_addr = _targets(row, gamma_ptr)
            _apply(noisy, param_index, w_addr, backup_addr, grad_addr, tile, mask, sigma, grad_scale, grad_scale_ptr,
                   step, k0, k1, False, DTYPE, BLOCK, PER)
    elif (PARTS > 1) & (row_len <= SPLIT_ROW):
        if vec:
            _resident(row, gamma_ptr, w_addr, fisher_addr, sigma_ptr, start, count, first_row, grad_scale,
                      grad_scale_ptr, step, k0, k1, True, DTYPE, BLOCK, PARTS)
        else:
            _resident(row, gamma_ptr, w_addr, fisher_addr, sigma_ptr, start, count, first_row, grad_scale,
                      grad_scale_ptr, step, k0, k1, False, DTYPE, BLOCK, PARTS)
    else:
        # A long row, or a segment of a split row: its norm first, then the update.
        if not UNALIGNED_LOOPS:
            vec = True
        if row_len > SPLIT_ROW:
            segments = tl.cdiv(row_len, SEGMENT)
            sumsq, fsum = _partial_sums(partials_ptr, tl.program_id(0) - (start - first_row * row_len) // SEGMENT,
                                        segments, BLOCK)
        elif vec:
            sumsq, fsum = _loop_sums(w_addr, fisher_addr, start, end, True, DTYPE, BLOCK, PER)
        else:
            sumsq, fsum = _loop_sums(w_addr, fisher_addr, start, end, False, DTYPE, BLOCK, PER)
        gamma, eta, vector = hyper
        scale = _row_scale(sumsq, gamma, vector)  # (the elementwise update loop's)
        row_sigma = _scaled_sigma(scale, fsum, eta, fisher_addr != 0)
        if not ELEMENTWISE:
            if start == first_row * row_len:  # the row's first program
                tl.store(sigma_ptr + first_row, row_sigma)
        if vec:
            _update_loop(row, gamma_ptr, fisher_addr, sigma_ptr, start, end, scale, row_sigma, ELEMENTWISE, eta,
                         grad_scale, grad_scale_ptr, step, k0, k1, True, DTYPE, BLOCK, PER)
        else:
            _update_loop(row, gamma_ptr, fisher_addr, sigma_ptr, start, end, scale, row_sigma, ELEMENTWISE, eta,
                         grad_scale, grad_scale_ptr, step, k0, k1, False, DTYPE, BLOCK, PER)


@triton.jit(do_not_specialize=["grad_scale", "step", "k0", "k1"], do_not_specialize_on_alignment=["grad_scale_ptr"])
def perturb_kernel(params_ptr, items_ptr, hyper_ptr, sigma_ptr, partials_ptr, grad_scale, grad_scale_ptr, step, k0,
                   k1, DTYPE: tl.constexpr, BLOCK: tl.constexpr, PARTS: tl.constexpr):
    _perturb(params_ptr, items_ptr, hyper_ptr, sigma_ptr, partials_ptr, grad_scale, grad_scale_ptr, step, k0, k1,
             False, DTYPE, BLOCK, PARTS, True, True, T.per_vector(DTYPE))


@triton.jit(do_not_specialize=["grad_scale", "step", "k0", "k1"], do_not_specialize_on_alignment=["grad_scale_ptr"])
def perturb_elementwise_kernel(params_ptr, items_ptr, hyper_ptr, sigma_ptr, partials_ptr, grad_scale, grad_scale_ptr,
                               step, k0, k1, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    """ARWP's 1-D tensors that fit a tile or are vectorized (``vectorized_row``)."""
    _perturb(params_ptr, items_ptr, hyper_ptr, sigma_ptr, partials_ptr, grad_scale, grad_scale_ptr, step, k0, k1,
             True, DTYPE, BLOCK, 1, True, False, T.per_vector(DTYPE))


@triton.jit(do_not_specialize=["grad_scale", "step", "k0", "k1"], do_not_specialize_on_alignment=["grad_scale_ptr"])
def perturb_elementwise_unaligned_kernel(params_ptr, items_ptr, hyper_ptr, sigma_ptr, partials_ptr, grad_scale,
                                         grad_scale_ptr, step, k0, k1, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    """ARWP's other 1-D tensors: longer than a tile, and misaligned or of a length that is no whole number of
    vectors. Kept apart because the scalar loop over such a row needs more registers than the rest (tables.py,
    MAX_REGISTERS): with it, the per-element kernel would run fewer warps for every model. Its programs hold
    ``tables.SCALAR_PER_THREAD`` elements per thread in every dtype (``tables.scalar_tile``)."""
    _perturb(params_ptr, items_ptr, hyper_ptr, sigma_ptr, partials_ptr, grad_scale, grad_scale_ptr, step, k0, k1,
             True, DTYPE, BLOCK, 1, False, True, T.SCALAR_PER_THREAD)


@triton.jit
def row_partials_kernel(params_ptr, items_ptr, partials_ptr, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    """The first stage of the two-stage norm: item i (a segment of a split row) writes its sum of squares and
    Fisher sum, in float64, to ``partials_ptr[2 * i]`` and ``[2 * i + 1]``."""
    PER: tl.constexpr = T.per_vector(DTYPE)
    _, start, count, row = T.load_item(params_ptr, items_ptr, COLUMNS)
    w_addr = tl.load(row + W)
    fisher_addr = tl.load(row + FISHER)
    if T.vector_item(row, start, count, DTYPE):
        sumsq, fsum = _loop_sums(w_addr, fisher_addr, start, start + count, True, DTYPE, BLOCK, PER)
    else:
        sumsq, fsum = _loop_sums(w_addr, fisher_addr, start, start + count, False, DTYPE, BLOCK, PER)
    out = partials_ptr + 2 * tl.program_id(0)
    tl.store(out, sumsq)
    tl.store(out + 1, fsum)


def _launches(kernel, device, dtype, rows: list, tile, hyper, sigma_buffer, scale: tuple, words: tuple,
              kernel_tile=None, **constexprs) -> list[tuple]:
    """The launches of ``kernel`` for the parameter table ``rows``, its tables uploaded and its buffers allocated:
    the partial sums of its split rows (if any), then the kernel (on ``kernel_tile``, the same block on other
    warps, if given); each as ``(kernel, programs, tile, device, args, constexprs)``, what ``tables.launch``
    takes."""
    tables = T.tables(device, rows, tile, by_rows=True, vector=T.vector_elems(dtype))
    DTYPE = T.TL_DTYPES[dtype]
    launches = []
    if tables.n_split:
        partials = torch.empty(2 * tables.n_split, dtype=torch.float64, device=device)
        launches.append((row_partials_kernel, tables.n_split, tile, device, (tables.params, tables.items, partials),
                         {"DTYPE": DTYPE}))
    else:
        partials = T.float_table(device, (0.0, 0.0), torch.float64)  # not read
    args = (tables.params, tables.items, hyper, sigma_buffer, partials, *scale, *words)
    return launches + [(kernel, tables.n_items, kernel_tile or tile, device, args, {"DTYPE": DTYPE, **constexprs})]


def vectorized_row(row: tuple, block: int, vector: int) -> bool:
    """Whether every item of the one-row parameter at table row ``row`` (``tables.param_row``) takes the kernels'
    vectorized path or fits a tile (``vector`` elements per 16-byte vector)."""
    return row[T.ROW_LEN.value] <= block or (row[T.ALIGNED.value] != 0 and row[T.ROW_LEN.value] % vector == 0)


def perturb_(params, *, key: NoiseKey, plan, gammas, etas, backups, grads, grad_scale, fisher):
    """The launches of the module's docstring: one for the parameters with a sigma per row, one for those with a
    sigma per element (1-D tensors with ARWP) that ``vectorized_row`` accepts, one for the others, each preceded by
    a launch of ``row_partials_kernel`` if it has split rows."""
    device, dtype = params[0].device, params[0].dtype
    if grads is not None and not isinstance(grad_scale, torch.Tensor) and grad_scale == 1.0:
        grads = None  # scaling by exactly 1 changes nothing: skip the gradient traffic
    offsets = sigma_offsets(plan)
    sigma_buffer = torch.empty(sum(e.sigma_count for e in plan), dtype=torch.float32, device=device)
    tile = T.perturb_tile([(e.row_len, e.rows) for e in plan], dtype.itemsize)
    scale = T.scale_args(grad_scale, device)
    k0, k1, step = key.words()
    words = (P.as_int32(step), P.as_int32(k0), P.as_int32(k1))
    groups = {perturb_kernel: [], perturb_elementwise_kernel: [], perturb_elementwise_unaligned_kernel: []}
    for i, e in enumerate(plan):
        row = T.param_row(params[i], e, offsets[i], backup=T.entry(backups, i), grad=T.entry(grads, i),
                          fisher=T.entry(fisher, i))
        if e.sigma_len != 1 or e.row_len == 1:
            kernel = perturb_kernel
        elif vectorized_row(row, tile.block, T.vector_elems(dtype)):
            kernel = perturb_elementwise_kernel
        else:
            kernel = perturb_elementwise_unaligned_kernel
        groups[kernel].append((i, row))
    launches = []
    for kernel, group in groups.items():
        if group:
            hyper = T.float_table(device, tuple(v for i, _ in group for v in (gammas[i], etas[i])), torch.float64)
            parts = {"PARTS": tile.parts} if kernel is perturb_kernel else {}
            own_tile = T.scalar_tile(tile) if kernel is perturb_elementwise_unaligned_kernel else None
            launches += _launches(kernel, device, dtype, [row for _, row in group], tile, hyper, sigma_buffer, scale,
                                  words, own_tile, **parts)
    # What may fail before a kernel runs (the tables' uploads, the partial sums' buffers, compiling a kernel at
    # its first use) is done for every launch before the first one changes a weight: a perturb_ that raises has
    # changed nothing.
    for kernel, programs, launch_tile, on, args, constexprs in launches[1:]:
        T.warmup(kernel, programs, launch_tile, on, *args, **constexprs)
    for kernel, programs, launch_tile, on, args, constexprs in launches:
        T.launch(kernel, programs, launch_tile, on, *args, **constexprs)
    return list(sigma_buffer.split([e.sigma_count for e in plan]))
