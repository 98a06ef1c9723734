"""sgd_step_: optional exact restore, gradient mix and torch.optim.SGD's update, one launch for all tensors.

With a nonzero ``found_inf`` (read on the device, no host synchronization) only the restore is written.
"""
import triton
import triton.language as tl

from ..contract import GradMix, SgdHyper
from . import tables as T
from .rounding import to_dtype, to_float32
from .tables import BACKUP, CLEAN, COLUMNS, FISHER, GRAD, MOMENTUM_BUFFER, W
from .restore import mix_gradient


@triton.jit
def _step(row, tile, start, end, lr, momentum, one_minus_dampening, weight_decay, nesterov, maximize, first_step,
          found_inf_ptr, beta, grad_scale, grad_scale_ptr, fisher_scale, fisher_scale_ptr, clean_scale, clean_scale_ptr,
          VEC: tl.constexpr, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    """The elements ``[start, end)`` of the parameter at table row ``row`` in the BLOCK elements from ``tile``."""
    tile, mask = T.span(tile, start, end, VEC, DTYPE, BLOCK)
    lanes = tl.arange(0, BLOCK)
    w_ptr = T.pointer(tl.load(row + W), DTYPE, VEC) + tile
    backup_addr = tl.load(row + BACKUP)
    # Per lane (a scalar flag does not combine with a mask in the interpreter).
    update = tl.zeros([BLOCK], tl.float32) + tl.load(found_inf_ptr) == 0
    source = w_ptr
    write_w = mask & update  # a restore is written even when the update is skipped
    if backup_addr != 0:
        source = T.pointer(backup_addr, DTYPE, VEC) + tile
        write_w = mask
    x = to_float32(tl.load(source + lanes, mask=mask, other=0.0))
    g = mix_gradient(T.pointer(tl.load(row + GRAD), DTYPE, VEC) + tile, tl.load(row + FISHER), tl.load(row + CLEAN),
                     tile, lanes, mask, mask & update, beta, fisher_scale * tl.load(fisher_scale_ptr),
                     grad_scale * tl.load(grad_scale_ptr), clean_scale * tl.load(clean_scale_ptr), VEC, DTYPE)
    if maximize != 0:
        g = -g
    # csrc/rwp_common.h sgd_update: fma exactly where the header has fmadd (ATen's add(alpha=)).
    if weight_decay != 0:
        g = tl.fma(x, weight_decay, g)
    if momentum != 0:
        buf_ptr = T.pointer(tl.load(row + MOMENTUM_BUFFER), DTYPE, VEC) + tile + lanes
        buf = g
        if first_step == 0:
            buf = tl.fma(g, one_minus_dampening, to_float32(tl.load(buf_ptr, mask=mask, other=0.0)) * momentum)
        tl.store(buf_ptr, to_dtype(buf, DTYPE), mask=mask & update)
        if nesterov != 0:
            g = tl.fma(buf, momentum, g)
        else:
            g = buf
    new = tl.where(update, tl.fma(g, -lr, x), x)
    tl.store(w_ptr + lanes, to_dtype(new, DTYPE), mask=write_w)


@triton.jit(do_not_specialize=["nesterov", "maximize", "first_step"],
            do_not_specialize_on_alignment=["found_inf_ptr", "grad_scale_ptr", "fisher_scale_ptr", "clean_scale_ptr"])
def sgd_step_kernel(params_ptr, items_ptr, lr, momentum, one_minus_dampening, weight_decay, nesterov, maximize,
                    first_step, found_inf_ptr, beta, grad_scale, grad_scale_ptr, fisher_scale, fisher_scale_ptr,
                    clean_scale, clean_scale_ptr, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    _, start, count, row = T.load_item(params_ptr, items_ptr, COLUMNS)
    if T.vector_item(row, start, count, DTYPE):
        _step(row, start, start, start + count, lr, momentum, one_minus_dampening, weight_decay, nesterov, maximize,
              first_step, found_inf_ptr, beta, grad_scale, grad_scale_ptr, fisher_scale, fisher_scale_ptr, clean_scale,
              clean_scale_ptr, True, DTYPE, BLOCK)
    else:
        # Scalar accesses, each with its own mask: in two halves of the tile, so that the 16-bit types fit in 48
        # registers (40 warps per SM) as the vectorized path does.
        for half in tl.static_range(2):
            _step(row, start + half * (BLOCK // 2), start, start + count, lr, momentum, one_minus_dampening,
                  weight_decay, nesterov, maximize, first_step, found_inf_ptr, beta, grad_scale, grad_scale_ptr,
                  fisher_scale, fisher_scale_ptr, clean_scale, clean_scale_ptr, False, DTYPE, BLOCK // 2)


def sgd_step_(params, *, hyper: SgdHyper, plan, momentum_buffers, backups, found_inf, mix: GradMix):
    device, dtype = params[0].device, params[0].dtype
    rows = [T.param_row(p, plan[i], backup=T.entry(backups, i), grad=mix.grads[i],
                        fisher=T.entry(mix.fisher, i), clean=T.entry(mix.clean_grads, i),
                        momentum_buffer=T.entry(momentum_buffers, i))
            for i, p in enumerate(params)]
    tile = T.choose_tile([(p.numel(), 1) for p in params], dtype.itemsize)
    tables = T.tables(device, rows, tile, by_rows=False)
    found = found_inf if found_inf is not None else T.constant(device, 0.0)
    T.launch_items(sgd_step_kernel, tables, device, hyper.lr, hyper.momentum, 1.0 - hyper.dampening,
                   hyper.weight_decay, int(hyper.nesterov), int(hyper.maximize), int(hyper.is_first_step), found,
                   mix.beta, *T.scale_args(mix.grad_scale, device), *T.scale_args(mix.fisher_scale, device),
                   *T.scale_args(mix.clean_scale, device), DTYPE=T.TL_DTYPES[dtype])
