"""perturb_: per-row norms, noise and the optional backup / gradient scaling, one launch for all tensors.

A program takes one item: several whole rows packed into one tile (short rows; their norms are a
segmented sum), one row that fits a tile (kept in registers between the norm and the update), or one
long row (two passes over it: the norm, then the update, which finds the row in L2).
"""
import torch
import triton
import triton.language as tl

from .. import stream as S
from ..contract import NoiseKey
from ..layout import sigma_offsets
from . import philox as P
from . import tables as T
from .rounding import to_dtype, to_float32
from .tables import BACKUP, COLUMNS, FISHER, GRAD, PARAM_INDEX, ROW_LEN, SIGMA_LEN, SIGMA_OFF, VECTOR, W

# Columns of the parameter table.
NORM_EPS: tl.constexpr = tl.constexpr(S.NORM_EPS)
# True when the kernels are interpreted (the knob triton.jit reads when it creates them).
INTERPRETED: tl.constexpr = tl.constexpr(bool(triton.knobs.runtime.interpret))


@triton.jit
def _segment_add(a, row_a, b, row_b):
    """The combine of a segmented sum: running sums restart where the row changes."""
    return tl.where(row_a == row_b, a + b, b), row_b


@triton.jit
def _row_sums_scan(values, row, row_last):
    """Per element, the float64 sum of ``values`` over its row: a segmented scan over the tile (``row``: the
    element's row, nondecreasing along the tile), read at the row's last lane ``row_last``. Only a row's own
    elements enter its sum (a row of zeros sums to exactly 0)."""
    running, _ = tl.associative_scan((values, row), 0, _segment_add)
    return tl.gather(running, row_last, 0)


@triton.jit
def _row_sums_masked(values, row):
    """The same sums as a masked [BLOCK, BLOCK] reduction: BLOCK**2 work, for the interpreter only."""
    return tl.sum(tl.where(row[:, None] == row[None, :], values[None, :], 0.0), 1)


@triton.jit
def _row_sums(values, row, row_last):
    """``_row_sums_scan``. In Triton's interpreter a scan with a custom combine runs element by element in
    Python (a quarter of a second per tile), so there ``_row_sums_masked`` gives each row the sum of the same
    elements in a few numpy operations: only the order of the float64 additions differs, which the spec
    leaves open (it differs between the C++ CPU and CUDA backends too). tests/test_triton_interpret.py runs
    the scan in the interpreter against it."""
    if INTERPRETED:
        return _row_sums_masked(values, row)
    else:
        return _row_sums_scan(values, row, row_last)


@triton.jit
def _sigma(sumsq, fisher_sum, gamma, eta, vector, has_fisher):
    """csrc/rwp_common.h ``row_sigma``: gamma * ||row|| (+ NORM_EPS for vectors), / sqrt(1 + eta * fisher_sum)
    with ARWP, all in float64 (IEEE sqrt and division), rounded once to float32."""
    norm = tl.sqrt(sumsq)  # float64: sqrt.rn.f64
    sigma = tl.where(vector != 0, gamma * (norm + NORM_EPS), gamma * norm)
    if has_fisher:
        sigma = sigma / tl.sqrt(1.0 + eta * fisher_sum)  # float64: div.rn.f64
    return sigma.to(tl.float32)


@triton.jit
def _apply(w_ptr, backup_addr, grad_addr, tile, lanes, mask, x_raw, sigma, sigma_ptr, sigma_index, sigma_mask, gamma,
           grad_scale, param_index, step, k0, k1, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    """The per-element part of the tile of elements ``tile + lanes``: sigma out, backup <- w,
    w <- w + sigma * z (``add_noise``: a product and a sum, two roundings), grad <- grad * grad_scale."""
    tl.store(sigma_ptr + sigma_index, sigma, mask=sigma_mask)
    if backup_addr != 0:
        tl.store(backup_addr.to(tl.pointer_type(DTYPE)) + tile + lanes, x_raw, mask=mask)
    if gamma != 0:
        z = P.normal_tile(tile // 4, param_index, step, k0, k1, BLOCK)
        tl.store(w_ptr + tile + lanes, to_dtype(to_float32(x_raw) + sigma * z, DTYPE), mask=mask)
    if grad_addr != 0:
        g_ptr = grad_addr.to(tl.pointer_type(DTYPE)) + tile + lanes
        g = to_float32(tl.load(g_ptr, mask=mask, other=0.0))
        tl.store(g_ptr, to_dtype(g * grad_scale, DTYPE), mask=mask)


@triton.jit(do_not_specialize=["grad_scale", "step", "k0", "k1"], do_not_specialize_on_alignment=["grad_scale_ptr"])
def perturb_kernel(params_ptr, items_ptr, hyper_ptr, sigma_ptr, grad_scale, grad_scale_ptr, step, k0, k1,
                   DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    slot, start, count, row = T.load_item(params_ptr, items_ptr, COLUMNS)
    w_ptr = tl.load(row + W).to(tl.pointer_type(DTYPE))
    backup_addr = tl.load(row + BACKUP)
    grad_addr = tl.load(row + GRAD)
    fisher_addr = tl.load(row + FISHER)
    row_len = tl.load(row + ROW_LEN)
    sigma_ptr += tl.load(row + SIGMA_OFF)
    param_index = tl.load(row + PARAM_INDEX).to(tl.uint32)
    vector = tl.load(row + VECTOR)
    gamma = tl.load(hyper_ptr + 2 * slot)  # float64, as the C++ kernels take gamma and eta
    eta = tl.load(hyper_ptr + 2 * slot + 1)
    grad_scale = grad_scale * tl.load(grad_scale_ptr)
    step = step.to(tl.uint32, bitcast=True)
    k0, k1 = P.key_words(k0, k1)
    f_ptr = fisher_addr.to(tl.pointer_type(tl.float32))
    has_fisher = fisher_addr != 0
    # A 0-D/1-D tensor with ARWP: one row, one sigma per element (rows of one element are rows).
    elementwise_fisher = (tl.load(row + SIGMA_LEN) == 1) & (row_len > 1)

    lanes = tl.arange(0, BLOCK)
    base = start - start % 4  # tiles start at a Philox block boundary
    end = start + count
    first_row = start // row_len
    lo = (start - base).to(tl.int32)  # the item's first lane in its first tile
    if end - base <= BLOCK:
        # The item fits one tile: load it once, keep it in registers.
        mask = (lanes >= lo) & (lanes < (end - base).to(tl.int32))
        x_raw = tl.load(w_ptr + base + lanes, mask=mask, other=0.0)
        x = to_float32(x_raw).to(tl.float64)
        squares = x * x  # exact in float64
        f = tl.zeros([BLOCK], tl.float64)
        if has_fisher:
            f = tl.load(f_ptr + base + lanes, mask=mask, other=0.0).to(tl.float64)
        sigma_base = sigma_ptr + first_row
        if elementwise_fisher:
            sumsq = tl.zeros([BLOCK], tl.float64) + tl.sum(squares)
            sigma = _sigma(sumsq, f, gamma, eta, vector, has_fisher)
            sigma_base = sigma_ptr + base
            sigma_index = lanes
            sigma_mask = mask
        elif count > row_len:
            # Several rows: sums per row, segmented scans over the tile.
            length = row_len.to(tl.int32)
            rel = lanes - lo
            row_in_item = tl.where(mask, rel // length, 0)
            segment = tl.where(lanes < lo, -1, tl.where(mask, row_in_item, BLOCK))  # nondecreasing
            row_last = tl.minimum(row_in_item * length + lo + length - 1, BLOCK - 1)
            fsum = f
            if has_fisher:
                fsum = _row_sums(f, segment, row_last)
            sigma = _sigma(_row_sums(squares, segment, row_last), fsum, gamma, eta, vector, has_fisher)
            sigma_index = row_in_item
            sigma_mask = mask & (rel == row_in_item * length)
        else:
            # One row: one sigma.
            sigma = tl.zeros([BLOCK], tl.float32) + _sigma(tl.sum(squares), tl.sum(f), gamma, eta, vector, has_fisher)
            sigma_index = tl.zeros([BLOCK], tl.int32)
            sigma_mask = mask & (lanes == lo)
        _apply(w_ptr, backup_addr, grad_addr, base, lanes, mask, x_raw, sigma, sigma_base, sigma_index, sigma_mask,
               gamma, grad_scale, param_index, step, k0, k1, DTYPE, BLOCK)
    else:
        # One long row: its norm first, then the update (the second pass mostly reads from L2).
        acc = tl.zeros([BLOCK], tl.float64)
        facc = tl.zeros([BLOCK], tl.float64)
        for tile in range(base, end, BLOCK):
            first_lane = tl.maximum(start - tile, -1).to(tl.int32)  # the row's first lane here, or -1
            mask = (lanes >= first_lane) & (lanes < tl.minimum(end - tile, BLOCK).to(tl.int32))
            x = to_float32(tl.load(w_ptr + tile + lanes, mask=mask, other=0.0)).to(tl.float64)
            acc += x * x
            if has_fisher:
                facc += tl.load(f_ptr + tile + lanes, mask=mask, other=0.0).to(tl.float64)
        sumsq = tl.sum(acc)
        row_sigma = _sigma(sumsq, tl.sum(facc), gamma, eta, vector, has_fisher)
        for tile in range(base, end, BLOCK):
            first_lane = tl.maximum(start - tile, -1).to(tl.int32)
            mask = (lanes >= first_lane) & (lanes < tl.minimum(end - tile, BLOCK).to(tl.int32))
            x_raw = tl.load(w_ptr + tile + lanes, mask=mask, other=0.0)
            sigma = tl.zeros([BLOCK], tl.float32) + row_sigma
            sigma_base = sigma_ptr + first_row
            sigma_index = tl.zeros([BLOCK], tl.int32)
            sigma_mask = mask & (lanes == first_lane)
            if elementwise_fisher:
                f = tl.load(f_ptr + tile + lanes, mask=mask, other=0.0).to(tl.float64)
                sigma = _sigma(tl.zeros([BLOCK], tl.float64) + sumsq, f, gamma, eta, vector, has_fisher)
                sigma_base = sigma_ptr + tile
                sigma_index = lanes
                sigma_mask = mask
            _apply(w_ptr, backup_addr, grad_addr, tile, lanes, mask, x_raw, sigma, sigma_base, sigma_index,
                   sigma_mask, gamma, grad_scale, param_index, step, k0, k1, DTYPE, BLOCK)


def perturb_(params, *, key: NoiseKey, plan, gammas, etas, backups, grads, grad_scale, fisher):
    device, dtype = params[0].device, params[0].dtype
    if grads is not None and not isinstance(grad_scale, torch.Tensor) and grad_scale == 1.0:
        grads = None  # scaling by exactly 1 changes nothing: skip the gradient traffic
    offsets = sigma_offsets(plan)
    sigma_buffer = torch.empty(sum(e.sigma_count for e in plan), dtype=torch.float32, device=device)
    rows = [T.param_row(p, plan[i], offsets[i], backup=T.entry(backups, i), grad=T.entry(grads, i),
                        fisher=T.entry(fisher, i)) for i, p in enumerate(params)]
    tile = T.choose_tile([(e.row_len, e.rows) for e in plan])
    tables = T.tables(device, rows, tile, by_rows=True)
    hyper = T.float_table(device, tuple(v for pair in zip(gammas, etas) for v in pair), torch.float64)
    k0, k1, step = key.words()
    T.launch_items(perturb_kernel, tables, device, hyper, sigma_buffer, *T.scale_args(grad_scale, device),
                   P.as_int32(step), P.as_int32(k0), P.as_int32(k1), DTYPE=T.TL_DTYPES[dtype])
    return list(sigma_buffer.split([e.sigma_count for e in plan]))
