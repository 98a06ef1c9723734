"""restore_: weights back from the backups (exact) or minus the regenerated noise, plus the optional
gradient mix (Fisher update, scaling, clean gradient); one launch for all tensors, one program per tile."""
import torch
import triton
import triton.language as tl

from ..contract import GradMix, NoiseKey
from ..layout import sigma_offsets
from . import philox as P
from . import tables as T
from .rounding import to_dtype, to_float32
from .tables import BACKUP, CLEAN, COLUMNS, FISHER, GRAD, PARAM_INDEX, SIGMA_LEN, SIGMA_OFF, W

@triton.jit
def mix_gradient(grad_ptr, fisher_addr, clean_addr, start, lanes, mask, fisher_mask, beta, fisher_scale, grad_scale,
                 clean_scale, VEC: tl.constexpr, DTYPE: tl.constexpr):
    """The float32 gradient ``grad * grad_scale (+ clean * clean_scale)`` of the elements ``start + lanes``
    (``grad_ptr`` points at element ``start``; absent tensors have address 0); with a Fisher state, first
    ``F <- beta * F + (grad * fisher_scale)**2``, stored where ``fisher_mask``. As csrc/rwp_common.h
    ``fisher_update`` and ``mix_grad``: every product and sum rounded on its own (no fma). ``VEC``: the
    vectorized path (``tables.span``)."""
    g = to_float32(tl.load(grad_ptr + lanes, mask=mask, other=0.0))
    if fisher_addr != 0:
        f_ptr = T.pointer(fisher_addr, tl.float32, VEC) + start + lanes
        gf = g * fisher_scale
        tl.store(f_ptr, beta * tl.load(f_ptr, mask=mask, other=0.0) + gf * gf, mask=fisher_mask)
    g = g * grad_scale
    if clean_addr != 0:
        clean = tl.load(T.pointer(clean_addr, DTYPE, VEC) + start + lanes, mask=mask, other=0.0)
        g += to_float32(clean) * clean_scale
    return g


@triton.jit
def sigma_entries(lanes, start, sigma_len, BLOCK: tl.constexpr):
    """Index of the sigma entry of each element ``start + lanes`` of a tile."""
    first_entry = start // sigma_len
    if sigma_len >= BLOCK:  # at most one entry boundary inside the tile
        boundary = tl.minimum((first_entry + 1) * sigma_len - start, BLOCK).to(tl.int32)
        entry = first_entry + (lanes >= boundary).to(tl.int64)
    else:
        rel = (start - first_entry * sigma_len).to(tl.int32) + lanes
        entry = first_entry + (rel // sigma_len.to(tl.int32)).to(tl.int64)
    return entry


@triton.jit
def _restore(row, start, count, sigma_ptr, step, k0, k1, beta, grad_scale, grad_scale_ptr, fisher_scale,
             fisher_scale_ptr, clean_scale, clean_scale_ptr, VEC: tl.constexpr, DTYPE: tl.constexpr,
             BLOCK: tl.constexpr):
    """The item ``[start, start + count)`` of the parameter at table row ``row``."""
    tile, mask = T.span(start, start, start + count, VEC, DTYPE, BLOCK)
    lanes = tl.arange(0, BLOCK)
    w_ptr = T.pointer(tl.load(row + W), DTYPE, VEC) + tile
    backup_addr = tl.load(row + BACKUP)
    if backup_addr != 0:
        tl.store(w_ptr + lanes, tl.load(T.pointer(backup_addr, DTYPE, VEC) + tile + lanes, mask=mask), mask=mask)
    else:
        key0, key1 = P.key_words(k0, k1)
        z = P.normal_tile(tile // 4, tl.load(row + PARAM_INDEX).to(tl.uint32), step.to(tl.uint32, bitcast=True),
                          key0, key1, BLOCK, T.per_vector(DTYPE))
        # the sigmas read after the normals: not live through them (16-bit, sm_80: 8 bytes of spills at 48 registers)
        entry = sigma_entries(lanes, tile, tl.load(row + SIGMA_LEN), BLOCK)
        sigma = tl.load(sigma_ptr + tl.load(row + SIGMA_OFF) + entry, mask=mask, other=0.0)
        x = to_float32(tl.load(w_ptr + lanes, mask=mask, other=0.0))
        tl.store(w_ptr + lanes, to_dtype(x - sigma * z, DTYPE), mask=mask)
    grad_addr = tl.load(row + GRAD)
    if grad_addr != 0:
        g_ptr = T.pointer(grad_addr, DTYPE, VEC) + tile
        g = mix_gradient(g_ptr, tl.load(row + FISHER), tl.load(row + CLEAN), tile, lanes, mask, mask, beta,
                         fisher_scale * tl.load(fisher_scale_ptr),
                         grad_scale * tl.load(grad_scale_ptr), clean_scale * tl.load(clean_scale_ptr), VEC, DTYPE)
        tl.store(g_ptr + lanes, to_dtype(g, DTYPE), mask=mask)


@triton.jit(do_not_specialize=["step", "k0", "k1"],
            do_not_specialize_on_alignment=["sigma_ptr", "grad_scale_ptr", "fisher_scale_ptr", "clean_scale_ptr"])
def restore_kernel(params_ptr, items_ptr, sigma_ptr, step, k0, k1, beta, grad_scale, grad_scale_ptr, fisher_scale,
                   fisher_scale_ptr, clean_scale, clean_scale_ptr, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    _, start, count, row = T.load_item(params_ptr, items_ptr, COLUMNS)
    if T.vector_item(row, start, count, DTYPE):
        _restore(row, start, count, sigma_ptr, step, k0, k1, beta, grad_scale, grad_scale_ptr, fisher_scale,
                 fisher_scale_ptr, clean_scale, clean_scale_ptr, True, DTYPE, BLOCK)
    else:
        _restore(row, start, count, sigma_ptr, step, k0, k1, beta, grad_scale, grad_scale_ptr, fisher_scale,
                 fisher_scale_ptr, clean_scale, clean_scale_ptr, False, DTYPE, BLOCK)


def _sigma_buffer(sigmas, counts):
    """One float32 buffer holding every sigma in order: the buffer ``perturb_`` returned views of when the
    sigmas still sit there, else a concatenated copy."""
    base, offset = sigmas[0].data_ptr(), 0
    for s, n in zip(sigmas, counts):
        if s.data_ptr() != base + s.element_size() * offset:
            return torch.cat(sigmas)
        offset += n
    return sigmas[0]


def restore_(params, *, key: NoiseKey | None, plan, backups, sigmas, mix: GradMix):
    device, dtype = params[0].device, params[0].dtype
    offsets = sigma_offsets(plan)
    rows = [T.param_row(p, plan[i], offsets[i], backup=T.entry(backups, i), grad=T.entry(mix.grads, i),
                        fisher=T.entry(mix.fisher, i), clean=T.entry(mix.clean_grads, i))
            for i, p in enumerate(params)]
    tile = T.choose_tile([(e.numel, 1) for e in plan], dtype.itemsize)
    tables = T.tables(device, rows, tile, by_rows=False)
    regen = (0, 0, 0)
    sigma_buffer = T.constant(device, 0.0)  # unused when restoring from backups
    if sigmas is not None:
        sigma_buffer = _sigma_buffer(sigmas, [e.sigma_count for e in plan])
        k0, k1, step = key.words()
        regen = (P.as_int32(step), P.as_int32(k0), P.as_int32(k1))
    T.launch_items(restore_kernel, tables, device, sigma_buffer, *regen, mix.beta,
                   *T.scale_args(mix.grad_scale, device), *T.scale_args(mix.fisher_scale, device),
                   *T.scale_args(mix.clean_scale, device), DTYPE=T.TL_DTYPES[dtype])
