"""Shared by the Triton ops: tile choice, work-item and address tables (cached), launch helpers, and the
device function that reads a program's work item.

One launch covers every parameter of a call: its programs find their tensors through a device int64
table with one row per parameter (addresses, sizes, indices; the columns are defined by each op) and
their work through a table of items ``(param slot, first element, element count)``. Both tables are
uploaded in one copy (pinned memory, non-blocking: no host synchronization) and cached for as long as
the same key (the table contents themselves: addresses, shapes, indices) comes back. Cached device
tensors are keyed by the CUDA stream too: a kernel on another CUDA stream never reads a table whose
upload on the first one may still be in flight.
"""
from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..layout import ParamPlan

TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}

ITEM_COLUMNS: tl.constexpr = tl.constexpr(3)  # (param slot, first element, element count)

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
COLUMNS: tl.constexpr = tl.constexpr(12)

# Options of every launch (and of the ahead-of-time compilation, aot.py): no floating-point contraction, so
# a multiply and an add stay two roundings as csrc/rwp_common.h has them (LLVM emits mul.rn / add.rn, which
# ptxas does not fuse either); the fma the header has are explicit tl.fma. See docs/triton.md, Rounding.
COMPILE_OPTIONS = {"enable_fp_fusion": False}

# (elements per program, warps): a program holds its tile in registers, a few elements per thread.
TILE_MENU = ((512, 4), (1024, 8))

_CACHE_CAPACITY = 16


@triton.jit
def load_item(params_ptr, items_ptr, COLUMNS: tl.constexpr):
    """This program's work item: its parameter's slot, the first element and element count, and the start
    of the parameter's row in the address table (``COLUMNS`` words per parameter)."""
    item = items_ptr + ITEM_COLUMNS * tl.program_id(0)
    slot = tl.load(item)
    start = tl.load(item + 1)
    count = tl.load(item + 2)
    return slot, start, count, params_ptr + slot * COLUMNS


@dataclass(frozen=True)
class Tile:
    block: int
    num_warps: int


def choose_tile(units) -> Tile:
    """The tile for units of work given as ``(length, how many)`` pairs (rows for perturb_, tensors for
    the elementwise ops).

    The smallest tile that holds the median unit by element count, or the largest one. Longer units
    loop over several tiles; short rows share a tile (perturb_ packs them), so a tile is never mostly
    idle except where a whole tensor is shorter than half of it.
    """
    units = sorted(units)
    half, seen = sum(length * n for length, n in units) / 2, 0
    for length, n in units:
        seen += length * n
        if seen >= half:
            break
    for block, warps in TILE_MENU:
        if length <= block:
            return Tile(block, warps)
    return Tile(*TILE_MENU[-1])


def row_items(slot: int, numel: int, row_len: int, block: int) -> list[tuple[int, int, int]]:
    """Items for the rows of one tensor: rows that fit a tile (with up to 3 elements of slack in front,
    since tiles start at a multiple of 4 elements) share it; a longer row is one item, looped over."""
    per_item = max(1, (block - 3) // row_len)
    step = per_item * row_len
    return [(slot, start, min(step, numel - start)) for start in range(0, numel, step)]


def chunk_items(slot: int, numel: int, block: int) -> list[tuple[int, int, int]]:
    """Items covering one tensor in consecutive tiles (elementwise ops)."""
    return [(slot, start, min(block, numel - start)) for start in range(0, numel, block)]


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


_tables = _LRU()
_floats = _LRU()
_constants = _LRU(64)


def _where(device: torch.device) -> tuple:
    """Device and current CUDA stream: where a cached tensor was made and may be read without a race."""
    cuda_stream = torch.cuda.current_stream(device).stream_id if device.type == "cuda" else 0
    return device, cuda_stream


def tables(device: torch.device, rows: list[tuple], tile: Tile, *, by_rows: bool) -> Tables:
    """The cached device tables for the parameter table's ``rows`` (``param_row``) and their work items, in
    one upload: whole norm rows per item (``row_items``: perturb_) or tiles of elements (``chunk_items``)."""
    def items_for(slot: int, row: tuple) -> list:
        if by_rows:
            return row_items(slot, row[NUMEL.value], row[ROW_LEN.value], tile.block)
        return chunk_items(slot, row[NUMEL.value], tile.block)

    def build():
        items = [item for slot, row in enumerate(rows) for item in items_for(slot, row)]
        words = [v for row in rows for v in row]
        n_words = len(words) + len(words) % 2  # the item table starts 16-byte aligned
        table = upload(words + [0] * (n_words - len(words)) + [v for item in items for v in item], torch.int64, device)
        return Tables(table[:n_words], table[n_words:], len(items), tile)

    return _tables.get((_where(device), tile, by_rows, tuple(rows)), build)


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
    return (address(p), address(backup), address(grad), address(fisher), address(clean), address(momentum_buffer),
            plan.numel, plan.row_len, plan.sigma_len, sigma_offset, plan.param_index, int(plan.vector))


def entry(values: list | None, i: int):
    """Entry ``i`` of a per-parameter list that may be absent as a whole."""
    return None if values is None else values[i]


def clear_caches() -> None:
    _tables.clear()
    _floats.clear()
    _constants.clear()


def launch_kwargs(tile: Tile, constexprs: dict) -> dict:
    """The keyword arguments of a launch: constexprs, the tile's BLOCK and warps, ``COMPILE_OPTIONS``."""
    return dict(BLOCK=tile.block, num_warps=tile.num_warps, **COMPILE_OPTIONS, **constexprs)


def launch(kernel, programs: int, tile: Tile, device: torch.device, *args, **constexprs) -> None:
    """One launch of ``kernel`` on ``device``'s current stream."""
    with torch.cuda.device(device) if device.type == "cuda" else nullcontext():
        kernel[(programs,)](*args, **launch_kwargs(tile, constexprs))


def launch_items(kernel, tables: Tables, device: torch.device, *args, **constexprs) -> None:
    """One launch of a table-driven ``kernel(params, items, *args)``, one program per item."""
    launch(kernel, tables.n_items, tables.tile, device, tables.params, tables.items, *args, **constexprs)
