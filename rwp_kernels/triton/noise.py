"""The raw Philox op and the noise op: one launch each, one program per tile of outputs."""
import torch
import triton
import triton.language as tl

from ..contract import NoiseKey
from . import philox as P
from . import tables as T


@triton.jit(do_not_specialize=["n_blocks"], do_not_specialize_on_alignment=["counter_ptr", "key_ptr"])
def philox_kernel(counter_ptr, key_ptr, out_ptr, n_blocks, BLOCK: tl.constexpr):
    """out[i, :] = Philox4x32-10(counter[i, :], key[i, :]) for int64 [n, 4] / [n, 2] inputs holding uint32 words."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n_blocks
    c0 = tl.load(counter_ptr + 4 * i, mask=mask, other=0).to(tl.uint32)
    c1 = tl.load(counter_ptr + 4 * i + 1, mask=mask, other=0).to(tl.uint32)
    c2 = tl.load(counter_ptr + 4 * i + 2, mask=mask, other=0).to(tl.uint32)
    c3 = tl.load(counter_ptr + 4 * i + 3, mask=mask, other=0).to(tl.uint32)
    k0 = tl.load(key_ptr + 2 * i, mask=mask, other=0).to(tl.uint32)
    k1 = tl.load(key_ptr + 2 * i + 1, mask=mask, other=0).to(tl.uint32)
    x0, x1, x2, x3 = P.philox4x32_10(c0, c1, c2, c3, k0, k1)
    tl.store(out_ptr + 4 * i, x0.to(tl.int64), mask=mask)
    tl.store(out_ptr + 4 * i + 1, x1.to(tl.int64), mask=mask)
    tl.store(out_ptr + 4 * i + 2, x2.to(tl.int64), mask=mask)
    tl.store(out_ptr + 4 * i + 3, x3.to(tl.int64), mask=mask)


@triton.jit
def _store_vectors(out_ptr, z, tile, numel, BLOCK: tl.constexpr):
    """out[tile + lane] = z[lane] for the lanes with tile + lane < numel, with 16-byte stores: ``tile`` and the
    tile's last output + 1 are multiples of 4 (``tables.span``)."""
    tile, mask = T.span(tile, 0, numel, True, tl.float32, BLOCK)
    tl.store(out_ptr + tile + tl.arange(0, BLOCK), z, mask=mask)


@triton.jit
def _store_lane(out_ptr, z, first, numel, Q: tl.constexpr):
    """out[first + 4 q] = z[q] for the outputs inside [0, numel): one lane of Q consecutive Philox blocks."""
    j = first + 4 * tl.arange(0, Q)
    tl.store(out_ptr + j, z, mask=(j >= 0) & (j < numel))


@triton.jit(do_not_specialize=["first_elem", "numel", "param_index", "step", "k0", "k1"])
def noise_kernel(out_ptr, first_elem, numel, param_index, step, k0, k1, BLOCK: tl.constexpr):
    """out[j] = normal of stream element first_elem + j, for j < numel. A program computes the normals of BLOCK // 4
    consecutive Philox blocks. Where its outputs start and end on a block boundary (first_elem % 4 == 0, and the
    tile is full or numel % 4 == 0), it stores them with 16-byte vector stores (``out`` is a fresh tensor, 16-byte
    aligned); else lane by lane, element-wise masked (no shared-memory shuffle either way)."""
    lead = first_elem % 4  # lane of output 0 in its Philox block
    tile = tl.program_id(0).to(tl.int64) * BLOCK - lead  # the output at lane 0 (negative in program 0 if lead > 0)
    key0, key1 = P.key_words(k0, k1)
    z0, z1, z2, z3 = P.block_normals((first_elem + tile) // 4, param_index.to(tl.uint32, bitcast=True),
                                     step.to(tl.uint32, bitcast=True), key0, key1, BLOCK // 4)
    # numel - tile, not first_elem + numel: that wraps for i32 arguments and at 2**63
    if (lead == 0) & (tl.minimum(numel - tile, BLOCK) % 4 == 0):
        _store_vectors(out_ptr, P.interleave(z0, z1, z2, z3), tile, numel, BLOCK)
    else:
        _store_lane(out_ptr, z0, tile, numel, BLOCK // 4)
        _store_lane(out_ptr, z1, tile + 1, numel, BLOCK // 4)
        _store_lane(out_ptr, z2, tile + 2, numel, BLOCK // 4)
        _store_lane(out_ptr, z3, tile + 3, numel, BLOCK // 4)


def philox4x32_10(counter: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    shape = torch.broadcast_shapes(counter.shape[:-1], key.shape[:-1])
    counter = counter.expand(*shape, 4).contiguous()
    key = key.expand(*shape, 2).contiguous()
    out = torch.empty(*shape, 4, dtype=torch.int64, device=counter.device)
    n_blocks = out.numel() // 4
    if n_blocks:
        tile = T.choose_tile([(n_blocks, 1)])
        T.launch(philox_kernel, triton.cdiv(n_blocks, tile.block), tile, counter.device, counter, key, out, n_blocks)
    return out


def noise(numel, *, key: NoiseKey, param_index, offset, device) -> torch.Tensor:
    out = torch.empty(numel, dtype=torch.float32, device=device)
    if numel:
        tile = T.choose_tile([(numel, 1)])
        k0, k1, step = key.words()
        T.launch(noise_kernel, triton.cdiv(offset % 4 + numel, tile.block), tile, out.device, out, offset, numel,
                 P.as_int32(param_index), P.as_int32(step), P.as_int32(k0), P.as_int32(k1))
    return out
