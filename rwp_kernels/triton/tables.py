"""Shared by the Triton ops: tile choice, work-item and address tables (cached), launch helpers, and the
device function that reads a program's work item.

One launch covers every parameter of a call: its programs find their tensors through a device int64
table with one row per parameter (addresses, sizes, indices; the columns are defined by each op) and
their work through a table of items ``(param slot, first element, element count)``. Both tables are
uploaded in one copy (pinned memory, non-blocking: no host synchronization) and cached for as long as
the same key (the table contents themselves: addresses, shapes, indices) comes back. Cached device
tensors are keyed by the CUDA stream too: a kernel on another CUDA stream never reads a table whose
upload on the first one may still be in flight.

Items whose tensors are 16-byte aligned (the ``ALIGNED`` column, from the addresses) and whose bounds are whole
16-byte vectors run the kernels' vectorized path (``vector_item``, ``pointer``, ``span``); the others the same
code with element-wise masks.
"""
import functools
import math
from collections import OrderedDict
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .._version import triton_3_6
from ..layout import ParamPlan

TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}

# (param slot, first element, element count, first element's row: perturb_'s sigma index without a division)
ITEM_COLUMNS: tl.constexpr = tl.constexpr(4)

# The parameter table: one row per parameter, the same columns for every op (an absent tensor: address 0).
W: tl.constexpr = tl.constexpr(0)
BACKUP: tl.constexpr = tl.constexpr(1)
GRAD: tl.constexpr = tl.constexpr(2)
FISHER: tl.constexpr = tl.constexpr(3)
CLEAN: tl.constexpr = tl.constexpr(4)  # the clean gradient of the mix
MOMENTUM_BUFFER: tl.constexpr = tl.constexpr(5)
NUMEL: tl.constexpr = tl.constexpr(6)
ROW_LEN: tl.constexpr = tl.constexpr(7)  # elements per norm row (the whole tensor for 0-D/1-D)
SIGMA_LEN: tl.constexpr = tl.constexpr(8)  # elements per sigma entry (ROW_LEN, or 1 for an ARWP vector)
SIGMA_OFF: tl.constexpr = tl.constexpr(9)  # first entry of the tensor in the sigma buffer
PARAM_INDEX: tl.constexpr = tl.constexpr(10)
VECTOR: tl.constexpr = tl.constexpr(11)  # 1 for 0-D/1-D tensors: their norm gets NORM_EPS
ALIGNED: tl.constexpr = tl.constexpr(12)  # 1 when every tensor of the row starts 16-byte aligned
COLUMNS: tl.constexpr = tl.constexpr(13)

# One vector access (ld/st.global.v4.b32): items whose tensors are aligned and whose first element and element
# count are multiples of a vector's elements take the kernels' vectorized path.
VECTOR_BYTES = 16


@triton.constexpr_function
def per_vector(dtype) -> int:
    """The elements of ``dtype`` in one vector access."""
    return 8 * VECTOR_BYTES // dtype.primitive_bitwidth


# perturb_'s two-stage norm: a row longer than SPLIT_ROW elements is cut into items of SEGMENT elements (the last
# one shorter); a first launch writes each segment's partial sums, every program of the row adds them up.
SPLIT_ROW: tl.constexpr = tl.constexpr(32768)
SEGMENT: tl.constexpr = tl.constexpr(8192)

# Options of every launch (and of the ahead-of-time compilation, aot.py): no floating-point contraction, so
# a multiply and an add stay two roundings as csrc/rwp_common.h has them (LLVM emits mul.rn / add.rn, which
# ptxas does not fuse either); the fma the header has are explicit tl.fma. See docs/triton.md, Rounding.
COMPILE_OPTIONS = {"enable_fp_fusion": False}

# Register caps (ptxas .maxnreg), by kernel and the parameters' element size, where ptxas's own choice would cost
# resident warps (48 registers leave 40 warps per SM on sm_80 / sm_90) or spill. 16-bit tiles hold 8 elements per
# thread, two Philox blocks: perturb_kernel fits in 48 because its packed rows' lane rows and hyperparameters are
# not kept through the scans and the float64 sigmas (perturb._packed_sigmas; kept, they needed 64, 32 warps), the
# elementwise kernel because it computes its per-element float64 sigmas half a tile at a time
# (perturb._element_sigmas) and has no scalar loop over a long row: the 1-D tensors that need one (misaligned, or
# of a length that is no whole number of vectors: rare) run perturb_elementwise_unaligned_kernel, whose scalar
# loop fits 48 with 4 elements per thread (``scalar_tile``; with 8 it needed 56). sgd_step_kernel and
# restore_kernel fit in 48 (sgd_step_kernel's unaligned items in two halves of the tile). aot.py compiles with
# them and fails on any spill. A key with a third entry is perturb_kernel's variant that keeps rows of up to that
# many tiles in registers (``RESIDENT_PARTS``).
MAX_REGISTERS = {
    ("perturb_kernel", 4): 48, ("perturb_kernel", 2): 48, ("perturb_kernel", 4, 5): 64,
    ("perturb_elementwise_kernel", 4): 48, ("perturb_elementwise_kernel", 2): 48,
    ("perturb_elementwise_unaligned_kernel", 4): 48, ("perturb_elementwise_unaligned_kernel", 2): 48,
    ("sgd_step_kernel", 4): 48, ("sgd_step_kernel", 2): 48,
    ("restore_kernel", 2): 48,
}
# Triton 3.6 (torch 2.11's) compiles the per-element kernels to more registers. Its caps, the fewest (in steps of
# 8) that compile without spills for sm_80 and sm_90: the elementwise kernel 80 in float32 (72 spills 8 bytes on
# sm_90) and 64 in 16-bit, the unaligned one 96 and 80.
MAX_REGISTERS_TRITON_3_6 = {
    **MAX_REGISTERS,
    ("perturb_elementwise_kernel", 4): 80, ("perturb_elementwise_kernel", 2): 64,
    ("perturb_elementwise_unaligned_kernel", 4): 96, ("perturb_elementwise_unaligned_kernel", 2): 80,
}

# (elements per program, warps) by the parameters' element size in bytes: a program holds its tile in registers,
# 16 bytes per thread (4 float32 or 8 16-bit elements: one ld/st.global.v4.b32 per tensor). TILE_MENU is
# float32's (the noise and Philox ops, which have no parameter dtype). 16-bit parameters have one tile, 512
# elements on 2 warps: the same elements per program as float32's small tile, so a long row wastes as few lanes in
# its last tile (CNN rows of 2304 / 4608 elements: 4.5 / 9 tiles; with 1024- or 2048-element tiles the last one is
# half or three quarters empty); perturb_kernel's 2-warp programs fit in 48 registers, 42 warps per SM (2048 / 8
# warps needed 72: 24).
TILE_MENUS = {4: ((512, 4), (1024, 8)), 2: ((512, 2),)}
TILE_MENU = TILE_MENUS[4]
PERTURB_KERNELS = ("perturb_kernel", "perturb_elementwise_kernel", "perturb_elementwise_unaligned_kernel",
                   "row_partials_kernel")
# perturb_elementwise_unaligned_kernel makes scalar accesses only (there are no 16-byte vectors to keep whole): in
# every dtype its programs hold 4 consecutive elements per thread (``scalar_tile``), with which the 16-bit ones fit
# in 48 registers (with 8 per thread they need 56).
SCALAR_PER_THREAD: tl.constexpr = tl.constexpr(4)

# perturb_'s rows longer than a tile, by element size: where most elements are in such rows, the launch takes a
# variant of perturb_kernel that keeps this many of a row's first tiles in registers between its norm and its update
# (float32, 512-element tiles: rows of up to 2560 elements read once, a longer row's further tiles twice; 64
# registers, 32 warps per SM; 6 tiles spill). Rows of 16-bit types (whose 8 elements per thread spill at 5 tiles)
# are read twice: the norm, then the update.
RESIDENT_PARTS = {4: 5}

_CACHE_CAPACITY = 16


def vector_elems(dtype: torch.dtype) -> int:
    """Elements of ``dtype`` per 16-byte vector."""
    return VECTOR_BYTES // dtype.itemsize


@triton.jit
def _item(items_ptr):
    """This program's row of the item table."""
    return items_ptr + ITEM_COLUMNS * tl.program_id(0)


@triton.jit
def load_item(params_ptr, items_ptr, COLUMNS: tl.constexpr):
    """This program's work item: its parameter's slot, the first element and element count, and the start
    of the parameter's row in the address table (``COLUMNS`` words per parameter)."""
    item = _item(items_ptr)
    slot = tl.load(item)
    start = tl.load(item + 1)
    count = tl.load(item + 2)
    return slot, start, count, params_ptr + slot * COLUMNS


@triton.jit
def load_start(items_ptr):
    """The first element of this program's item (``load_item``'s ``start``), read again."""
    return tl.load(_item(items_ptr) + 1)


@triton.jit
def load_first_row(items_ptr):
    """The row of this program's first element (``start // row_len``, found on the host: perturb_ items)."""
    return tl.load(_item(items_ptr) + 3)


@triton.jit
def vector_item(row, start, count, DTYPE: tl.constexpr):
    """Whether the item ``[start, start + count)`` of the parameter at table row ``row`` takes the vectorized
    path: its tensors are 16-byte aligned, ``start`` and ``count`` are multiples of a vector's elements."""
    n: tl.constexpr = per_vector(DTYPE)
    return (tl.load(row + ALIGNED) != 0) & (start % n == 0) & (count % n == 0)


@triton.jit
def pointer(addr, DTYPE: tl.constexpr, VEC: tl.constexpr):
    """The int64 address ``addr`` as a pointer to ``DTYPE``, 16-byte aligned on the vectorized path."""
    ptr = addr.to(tl.pointer_type(DTYPE))
    if VEC:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def span(tile, start, end, VEC: tl.constexpr, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    """The offset ``tile`` of a tile (its first element) and the mask of its lanes that hold elements of
    ``[start, end)``. On the vectorized path, where ``tile`` and ``end`` are multiples of a vector's elements
    and ``start <= tile``, both are rewritten as ``x // n * n`` (the same values), which shows the compiler
    that each vector is aligned and wholly in or out of the mask."""
    n: tl.constexpr = per_vector(DTYPE)
    lanes = tl.arange(0, BLOCK)
    if VEC:
        tile = tile // n * n
        mask = lanes < tl.minimum(end - tile, BLOCK).to(tl.int32) // n * n
    else:
        first = tl.maximum(start - tile, -1).to(tl.int32)  # the span's first lane here, or -1
        mask = (lanes >= first) & (lanes < tl.minimum(end - tile, BLOCK).to(tl.int32))
    return tile, mask


@dataclass(frozen=True)
class Tile:
    block: int
    num_warps: int
    parts: int = 1  # perturb_kernel's PARTS: the tiles of a row it keeps in registers (RESIDENT_PARTS)


def tile_menu(itemsize: int = 4) -> tuple:
    """The tiles of parameters of ``itemsize`` bytes (``TILE_MENUS``)."""
    return TILE_MENUS[itemsize]


def choose_tile(units, itemsize: int = 4) -> Tile:
    """The tile for units of work given as ``(length, how many)`` pairs (rows for perturb_, tensors for
    the elementwise ops) of parameters of ``itemsize`` bytes (the noise and Philox ops: 4).

    The smallest tile that holds the median unit by element count, or the largest one. Longer units
    loop over several tiles; short rows share a tile (perturb_ packs them), so a tile is never mostly
    idle except where a whole tensor is shorter than half of it.
    """
    return _tile_holding(_median_unit(units), itemsize)


def perturb_tile(units, itemsize: int = 4) -> Tile:
    """The tile of the perturb_ kernels for rows given as ``(length, how many)`` pairs: the menu's smallest, whatever
    the rows. Each warp of a program runs the program's overhead (its item and table row, the row's reduction and
    sigma): fewer warps per row run it fewer times, and a long row's last tile is emptier the larger the tile.
    Where the median row is longer than the tile, the variant that keeps a row's first ``RESIDENT_PARTS`` tiles in
    registers."""
    block, warps = tile_menu(itemsize)[0]
    if _median_unit(units) <= block:
        return Tile(block, warps)
    return Tile(block, warps, RESIDENT_PARTS.get(itemsize, 1))


def kernel_tiles(kernel: str, itemsize: int) -> tuple:
    """The (BLOCK, warps) pairs a launcher can give ``kernel`` (its name): the perturb_ kernels only the smallest
    (``perturb_tile``; the unaligned per-element kernel its ``scalar_tile``), the others the whole menu
    (``choose_tile``)."""
    menu = tile_menu(itemsize)
    if kernel == "perturb_elementwise_unaligned_kernel":
        tile = scalar_tile(Tile(*menu[0]))
        return ((tile.block, tile.num_warps),)
    return menu[:1] if kernel in PERTURB_KERNELS else menu


def scalar_tile(tile: Tile) -> Tile:
    """``tile``'s block on as many warps as hold it ``SCALAR_PER_THREAD`` elements per thread."""
    return Tile(tile.block, tile.block // (32 * SCALAR_PER_THREAD.value))


def _tile_holding(length: int, itemsize: int) -> Tile:
    """The smallest tile of the menu that holds ``length`` elements, or the largest one."""
    menu = tile_menu(itemsize)
    for block, warps in menu:
        if length <= block:
            return Tile(block, warps)
    return Tile(*menu[-1])


def _median_unit(units) -> int:
    """The length of the unit that holds the median element."""
    units = sorted(units)
    half, seen = sum(length * n for length, n in units) / 2, 0
    for length, n in units:
        seen += length * n
        if seen >= half:
            break
    return length


def row_items(slot: int, numel: int, row_len: int, block: int, vector: int) -> list[tuple[int, int, int, int]]:
    """Items for the rows of one tensor (``vector``: elements per 16-byte vector).

    Rows that fit a tile share it, at most ``block // 8`` of them (the kernel computes their sigmas on a tensor
    of that many rows), in groups that end on a vector boundary where one such group fits, so that the items
    start on one (vectorized path); otherwise with up to 3 elements of slack in front (tiles start at a
    multiple of 4 elements). A longer row is one item, looped over; a row longer than ``SPLIT_ROW`` is cut
    into items of ``SEGMENT`` elements (its norm: ``split_items``)."""
    if row_len > SPLIT_ROW.value:
        return [(slot, lo + s, min(SEGMENT.value, row_len - s), lo // row_len) for lo in range(0, numel, row_len)
                for s in range(0, row_len, SEGMENT.value)]
    fit = min(block // row_len, block // 8)
    period = vector // math.gcd(row_len, vector)  # rows per item that end on a vector boundary
    per_item = fit - fit % period if fit >= period else min((block - 3) // row_len, block // 8)
    step = max(1, per_item) * row_len
    return [(slot, start, min(step, numel - start), start // row_len) for start in range(0, numel, step)]


def chunk_items(slot: int, numel: int, block: int) -> list[tuple[int, int, int, int]]:
    """Items covering one tensor in consecutive tiles (elementwise ops; no rows: the fourth column is 0)."""
    return [(slot, start, min(block, numel - start), 0) for start in range(0, numel, block)]


def upload(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list as a device tensor, copied without synchronizing the host."""
    host = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


class _LRU:
    def __init__(self, capacity: int = _CACHE_CAPACITY):
        self._entries = OrderedDict()
        self._capacity = capacity

    def get(self, key, build):
        value = self._entries.get(key)
        if value is None:
            value = build()
            self._entries[key] = value
            if len(self._entries) > self._capacity:
                self._entries.popitem(last=False)
        else:
            self._entries.move_to_end(key)
        return value

    def clear(self):
        self._entries.clear()


@dataclass(frozen=True)
class Tables:
    params: torch.Tensor  # int64 [n_params, columns], flattened
    items: torch.Tensor  # int64 [n_items, ITEM_COLUMNS], flattened
    n_items: int
    tile: Tile
    n_split: int = 0  # the first n_split items are segments of split rows (perturb_'s two-stage norm)


_tables = _LRU()
_floats = _LRU()
_constants = _LRU(64)


def _where(device: torch.device) -> tuple:
    """Device and current CUDA stream: where a cached tensor was made and may be read without a race."""
    cuda_stream = torch.cuda.current_stream(device).stream_id if device.type == "cuda" else 0
    return device, cuda_stream


def tables(device: torch.device, rows: list[tuple], tile: Tile, *, by_rows: bool, vector: int = 4) -> Tables:
    """The cached device tables for the parameter table's ``rows`` (``param_row``) and their work items, in
    one upload: whole norm rows per item (``row_items``: perturb_; the segments of split rows first, in
    order, so that item ``i < n_split`` owns partial sum ``i``) or tiles of elements (``chunk_items``)."""
    def build():
        split, other = [], []
        for slot, row in enumerate(rows):
            numel, row_len = row[NUMEL.value], row[ROW_LEN.value]
            if not by_rows:
                other += chunk_items(slot, numel, tile.block)
            else:
                (split if row_len > SPLIT_ROW.value else other).extend(
                    row_items(slot, numel, row_len, tile.block, vector))
        items = split + other
        words = [v for row in rows for v in row]
        n_words = len(words) + len(words) % 2  # the item table starts 16-byte aligned
        table = upload(words + [0] * (n_words - len(words)) + [v for item in items for v in item], torch.int64, device)
        return Tables(table[:n_words], table[n_words:], len(items), tile, len(split))

    return _tables.get((_where(device), tile, by_rows, vector, tuple(rows)), build)


def float_table(device: torch.device, values: tuple, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A cached device tensor of ``dtype`` holding ``values`` (per-parameter hyperparameters)."""
    return _floats.get((_where(device), dtype, values), lambda: upload(list(values), dtype, device))


def constant(device: torch.device, value: float) -> torch.Tensor:
    """A cached 0-d float32 tensor on ``device`` (what a Python-number scale multiplies)."""
    return _constants.get((_where(device), value), lambda: torch.full((), value, dtype=torch.float32, device=device))


def scale_args(value, device: torch.device) -> tuple[float, torch.Tensor]:
    """A scale that is a Python number or a 0-d device tensor, as (number, tensor) whose product is it:
    the kernels read ``number * tensor[0]`` and never branch on which one it was."""
    if isinstance(value, torch.Tensor):
        return 1.0, value
    return float(value), constant(device, 1.0)


def address(t) -> int:
    """The address of a tensor's first element, or 0 for an absent one."""
    return 0 if t is None else t.data_ptr()


def param_row(p: torch.Tensor, plan: ParamPlan, sigma_offset: int = 0, *, backup=None, grad=None, fisher=None,
              clean=None, momentum_buffer=None) -> tuple:
    """The parameter table's row of ``p`` (the columns above), from its plan and its companion tensors."""
    addresses = tuple(address(t) for t in (p, backup, grad, fisher, clean, momentum_buffer))
    aligned = all(a % VECTOR_BYTES == 0 for a in addresses)
    return (*addresses, plan.numel, plan.row_len, plan.sigma_len, sigma_offset, plan.param_index, int(plan.vector),
            int(aligned))


def entry(values: list | None, i: int):
    """Entry ``i`` of a per-parameter list that may be absent as a whole."""
    return None if values is None else values[i]


def clear_caches() -> None:
    _tables.clear()
    _floats.clear()
    _constants.clear()


@contextmanager
def variant(resident_parts: dict | None = None, caps: dict | None = None):
    """The launchers, while in this context, with other kernel variants (benchmarks/bench_variants.py times them
    on a GPU): ``resident_parts`` in place of ``RESIDENT_PARTS`` (None: as it is) and ``caps`` (register caps by
    ``MAX_REGISTERS`` key) over the installed Triton's; both as they were afterwards."""
    active = _caps(triton.__version__)
    saved_parts, saved_caps = dict(RESIDENT_PARTS), dict(active)
    if resident_parts is not None:
        RESIDENT_PARTS.clear()
        RESIDENT_PARTS.update(resident_parts)
    active.update(caps or {})
    try:
        yield
    finally:
        RESIDENT_PARTS.clear()
        RESIDENT_PARTS.update(saved_parts)
        active.clear()
        active.update(saved_caps)


@functools.lru_cache(maxsize=None)
def _caps(triton_version: str) -> dict:
    """The register caps of a Triton version (read once per version, not at every launch)."""
    return MAX_REGISTERS_TRITON_3_6 if triton_3_6(triton_version) else MAX_REGISTERS


def kernel_options(name: str, itemsize: int = 4, parts: int = 1) -> dict:
    """The compile options of the kernel ``name`` for parameters of ``itemsize`` bytes (and perturb_kernel's
    ``parts``): ``COMPILE_OPTIONS`` and its register cap (``MAX_REGISTERS``, or the installed Triton's), if any."""
    caps = _caps(triton.__version__)
    cap = caps.get((name, itemsize, parts) if parts > 1 else (name, itemsize))
    return {**COMPILE_OPTIONS, **({"maxnreg": cap} if cap else {})}


def launch_kwargs(kernel, tile: Tile, constexprs: dict) -> dict:
    """The keyword arguments of a launch of ``kernel``: constexprs, the tile's BLOCK and warps, its options."""
    dtype = constexprs.get("DTYPE")
    itemsize = dtype.primitive_bitwidth // 8 if dtype is not None else 4
    options = kernel_options(kernel.fn.__name__, itemsize, constexprs.get("PARTS", 1))
    return dict(BLOCK=tile.block, num_warps=tile.num_warps, **options, **constexprs)


def _on(device: torch.device):
    """The context in which a kernel for ``device`` is compiled and launched (the interpreter's: none)."""
    return torch.cuda.device(device) if device.type == "cuda" else nullcontext()


def launch(kernel, programs: int, tile: Tile, device: torch.device, *args, **constexprs) -> None:
    """One launch of ``kernel`` on ``device``'s current stream."""
    with _on(device):
        kernel[(programs,)](*args, **launch_kwargs(kernel, tile, constexprs))


def warmup(kernel, programs: int, tile: Tile, device: torch.device, *args, **constexprs) -> None:
    """What ``launch`` compiles for these arguments, compiled without running it (interpreted: nothing)."""
    with _on(device):
        kernel.warmup(*args, grid=(programs,), **launch_kwargs(kernel, tile, constexprs))


def launch_items(kernel, tables: Tables, device: torch.device, *args, **constexprs) -> None:
    """One launch of a table-driven ``kernel(params, items, *args)``, one program per item."""
    launch(kernel, tables.n_items, tables.tile, device, tables.params, tables.items, *args, **constexprs)
