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


@triton.jit
def _row_sums(values, row_first, row_last):
    """Per element, the sum of ``values`` over its row, the rows being the runs [row_first, row_last] of
    tile positions: differences of a float64 running sum. The error is ~1e-16 of the tile's sum, so a row
    loses float32 accuracy only if its sum is below ~1e-9 of the other rows' in its tile."""
    running = tl.cumsum(values.to(tl.float64), 0)
    before = tl.gather(running, tl.maximum(row_first - 1, 0), 0)
    total = tl.gather(running, row_last, 0) - tl.where(row_first > 0, before, 0.0)
    return total.to(tl.float32)


@triton.jit
def _sigma(sumsq, fisher_sum, gamma, eta, vector, has_fisher):
    """sigma = gamma * ||row|| (+ NORM_EPS for vectors), / sqrt(1 + eta * fisher_sum) with ARWP."""
    norm = tl.sqrt_rn(sumsq)
    norm = tl.where(vector != 0, norm + NORM_EPS, norm)
    sigma = gamma * norm
    if has_fisher:
        sigma = sigma / tl.sqrt_rn(1.0 + eta * fisher_sum)
    return sigma


@triton.jit
def _apply(w_ptr, backup_addr, grad_addr, tile, lanes, mask, x_raw, sigma, sigma_ptr, sigma_index, sigma_mask, gamma,
           grad_scale, param_index, step, k0, k1, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    """The per-element part of the tile of elements ``tile + lanes``: sigma out, backup <- w,
    w <- w + sigma * z, grad <- grad * grad_scale."""
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


@triton.jit(do_not_specialize=["grad_scale", "step", "k0", "k1"])
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
    gamma = tl.load(hyper_ptr + 2 * slot)
    eta = tl.load(hyper_ptr + 2 * slot + 1)
    grad_scale = grad_scale * tl.load(grad_scale_ptr)
    step = step.to(tl.uint32, bitcast=True)
    k0, k1 = P.key_words(k0, k1)
    f_ptr = fisher_addr.to(tl.pointer_type(tl.float32))
    has_fisher = fisher_addr != 0
    elementwise_fisher = tl.load(row + SIGMA_LEN) == 1

    lanes = tl.arange(0, BLOCK)
    base = start - start % 4  # tiles start at a Philox block boundary
    end = start + count
    first_row = start // row_len
    lo = (start - base).to(tl.int32)  # the item's first lane in its first tile
    if end - base <= BLOCK:
        # The item fits one tile: load it once, keep it in registers.
        mask = (lanes >= lo) & (lanes < (end - base).to(tl.int32))
        x_raw = tl.load(w_ptr + base + lanes, mask=mask, other=0.0)
        x = to_float32(x_raw)
        f = tl.zeros([BLOCK], tl.float32)
        if has_fisher:
            f = tl.load(f_ptr + base + lanes, mask=mask, other=0.0)
        if count > row_len:
            # Several rows: sums per row from running sums over the tile.
            length = row_len.to(tl.int32)
            rel = tl.where(mask, lanes - lo, 0)
            row_in_item = rel // length
            row_first = row_in_item * length + lo
            row_last = tl.minimum(row_first + length - 1, BLOCK - 1)
            sumsq = _row_sums(x * x, row_first, row_last)
            fsum = tl.zeros([BLOCK], tl.float32)
            if has_fisher:
                fsum = _row_sums(f, row_first, row_last)
            sigma_index = row_in_item
            sigma_mask = mask & (rel == row_in_item * length)
        else:
            sumsq = tl.zeros([BLOCK], tl.float32) + tl.sum(x * x)
            fsum = tl.zeros([BLOCK], tl.float32) + tl.sum(f)
            sigma_index = tl.zeros([BLOCK], tl.int32)
            sigma_mask = mask & (lanes == lo)
        sigma_base = sigma_ptr + first_row
        if elementwise_fisher:
            fsum = f
            sigma_base = sigma_ptr + base
            sigma_index = lanes
            sigma_mask = mask
        sigma = _sigma(sumsq, fsum, gamma, eta, vector, has_fisher)
        _apply(w_ptr, backup_addr, grad_addr, base, lanes, mask, x_raw, sigma, sigma_base, sigma_index, sigma_mask,
               gamma, grad_scale, param_index, step, k0, k1, DTYPE, BLOCK)
    else:
        # One long row: its norm first, then the update (the second pass mostly reads from L2).
        acc = tl.zeros([BLOCK], tl.float32)
        facc = tl.zeros([BLOCK], tl.float32)
        for tile in range(base, end, BLOCK):
            first_lane = tl.maximum(start - tile, -1).to(tl.int32)  # the row's first lane here, or -1
            mask = (lanes >= first_lane) & (lanes < tl.minimum(end - tile, BLOCK).to(tl.int32))
            x = to_float32(tl.load(w_ptr + tile + lanes, mask=mask, other=0.0))
            acc += x * x
            if has_fisher:
                facc += tl.load(f_ptr + tile + lanes, mask=mask, other=0.0)
        sumsq = tl.zeros([BLOCK], tl.float32) + tl.sum(acc)
        row_fisher = tl.sum(facc)
        for tile in range(base, end, BLOCK):
            first_lane = tl.maximum(start - tile, -1).to(tl.int32)
            mask = (lanes >= first_lane) & (lanes < tl.minimum(end - tile, BLOCK).to(tl.int32))
            x_raw = tl.load(w_ptr + tile + lanes, mask=mask, other=0.0)
            fsum = tl.zeros([BLOCK], tl.float32) + row_fisher
            sigma_base = sigma_ptr + first_row
            sigma_index = tl.zeros([BLOCK], tl.int32)
            sigma_mask = mask & (lanes == first_lane)
            if elementwise_fisher:
                fsum = tl.load(f_ptr + tile + lanes, mask=mask, other=0.0)
                sigma_base = sigma_ptr + tile
                sigma_index = lanes
                sigma_mask = mask
            sigma = _sigma(sumsq, fsum, gamma, eta, vector, has_fisher)
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
    hyper = T.float_table(device, tuple(v for pair in zip(gammas, etas) for v in pair))
    k0, k1, step = key.words()
    T.launch_items(perturb_kernel, tables, device, hyper, sigma_buffer, *T.scale_args(grad_scale, device),
                   P.as_int32(step), P.as_int32(k0), P.as_int32(k1), DTYPE=T.TL_DTYPES[dtype])
    return list(sigma_buffer.split([e.sigma_count for e in plan]))
