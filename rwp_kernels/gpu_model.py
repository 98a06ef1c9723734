"""A GPU-blind performance model of the CUDA and Triton kernels. Everything it says is an ESTIMATE.

It compiles the kernels as the run time does (nvcc with the extension's flags for sm_80 / sm_90; Triton's
ahead-of-time path with the launchers' constexprs), reads registers, spills and shared memory
(``ptxas -v``, ``cuobjdump -res-usage``) and the SASS (``cuobjdump -sass``, parsed by
``rwp_kernels.sass``), finds each kernel's hot path (the loop iteration or program that one group of
elements goes through) and turns instructions per element, resident warps and DRAM bytes per element
into a time for ``perturb_`` and ``sgd_step_`` on a model's parameters on an A100 / H100 / H200:

    time = max(DRAM bytes / peak bandwidth,                                             memory
               DRAM-loading warp iterations * DRAM latency / (SMs * resident warps),   latency
               scheduler cycles / (SMs * 4 schedulers * clock * issue efficiency))     compute
           + launches * launch overhead

where the scheduler cycles are the hot paths' warp instructions (one issue slot each) or, if more, the
cycles of the busiest pipe (``PIPE_THROUGHPUT``), summed over the warp iterations of the op, and those of
each block's or program's overhead paths (its prologue and epilogue around the loops: table reads, the row's
reduction and sigma; ``PathSpec.overhead``) once per warp of each block or program. The
constants below say where each figure comes from; ``ASSUMPTIONS``
are this model's own choices, to be calibrated on a GPU (``benchmarks/bench_ops.py --device cuda``
prints measured times next to these estimates). ``benchmarks/bench_gpu_model.py`` prints the report.
"""
import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import tempfile
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from . import sass
from .stream import PHILOX_ROUNDS

ESTIMATE_LABEL = "ESTIMATE (no GPU measured)"
# The Philox multiplies of one block of four normals: two 32x32 -> 64-bit multiplies (IMAD.WIDE.U32) per round.
PHILOX_MULTIPLIES = 2 * PHILOX_ROUNDS


# ---- GPUs and architectures: public spec sheets ------------------------------------------------------------

@dataclass(frozen=True)
class GPU:
    name: str
    arch: int  # compute capability * 10
    hbm_bytes_per_s: float
    sms: int
    clock_hz: float  # boost clock
    l2_bytes: int
    source: str = "public spec sheet"


GPUS = (
    GPU("A100-SXM4-80GB", 80, 2.039e12, 108, 1.410e9, 40 << 20, "NVIDIA A100 datasheet / Ampere whitepaper"),
    GPU("H100-SXM5-80GB", 90, 3.35e12, 132, 1.980e9, 50 << 20, "NVIDIA H100 datasheet / Hopper whitepaper"),
    GPU("H200-SXM-141GB", 90, 4.8e12, 132, 1.980e9, 50 << 20, "NVIDIA H200 datasheet (GH100 SM and clocks as H100)"),
)


@dataclass(frozen=True)
class ArchLimits:
    regs_per_sm: int
    max_warps: int
    max_blocks: int
    smem_per_sm: int  # the largest shared-memory carve-out
    reg_unit: int = 256  # registers are allocated per warp in units of 256
    smem_unit: int = 128
    smem_reserved_per_block: int = 1024  # the driver's per-block reservation (cc 8.0 and later)


# CUDA C++ Programming Guide: "Compute capabilities" table (sm_80: 164 KB shared memory per SM, sm_90: 228 KB).
ARCH_LIMITS = {80: ArchLimits(65536, 64, 32, 164 * 1024), 90: ArchLimits(65536, 64, 32, 228 * 1024)}

# Results per clock per SM by pipe (CUDA C++ Programming Guide, "Arithmetic instructions" throughput table:
# fp32 add/mul/fma 64 on 8.0, 128 on 9.0; 32-bit integer add/logic/shift/compare 64; integer multiply-add 64;
# fp64 32 / 64; special functions (MUFU) and type conversions 16; 32 load/store units per SM). A warp
# instruction keeps its pipe in one SM sub-partition busy for 32 / (throughput / 4) cycles.
PIPE_THROUGHPUT = {
    80: {"fp32": 64, "alu": 64, "imad": 64, "fp64": 32, "xu": 16, "lsu": 32},
    90: {"fp32": 128, "alu": 64, "imad": 64, "fp64": 64, "xu": 16, "lsu": 32},
}
SCHEDULERS_PER_SM = 4  # one warp instruction issued per clock by each

# This model's own choices (printed with every estimate; calibrate them on a GPU).
ASSUMPTIONS = {
    "issue_efficiency": 0.8,  # of a scheduler's peak issue rate sustained on the hot loops ...
    "warps_per_scheduler_for_full_issue": 4,  # ... with at least this many resident warps (proportionally less below)
    "dram_latency_s": 600e-9,  # one loaded DRAM round trip: each warp iteration that loads from DRAM waits one
    "launch_s": 5e-6,  # per kernel launch (host and GPU side), added to the time of each op
}


def _round_up(x: int, unit: int) -> int:
    return -(-x // unit) * unit


def resident_warps(registers: int, smem_bytes: int, threads: int, arch: int) -> tuple[int, str]:
    """Warps per SM of a kernel (whole blocks) and what limits them: "regs", "smem", "warps" or "blocks".
    ``smem_bytes``: static plus dynamic shared memory per block."""
    lim = ARCH_LIMITS[_limits_arch(arch)]
    warps_per_block = -(-threads // 32)
    per_warp = _round_up(max(registers, 1) * 32, lim.reg_unit)
    by = {
        "regs": (lim.regs_per_sm // per_warp) // warps_per_block,
        "smem": lim.smem_per_sm // (_round_up(smem_bytes, lim.smem_unit) + lim.smem_reserved_per_block),
        "warps": lim.max_warps // warps_per_block,
        "blocks": lim.max_blocks,
    }
    limiter = min(by, key=lambda k: (by[k], list(by).index(k)))
    return by[limiter] * warps_per_block, limiter


def _limits_arch(arch: int) -> int:
    """The tabulated architecture to use for ``arch`` (the newest one not above it)."""
    known = sorted(ARCH_LIMITS)
    return max([a for a in known if a <= arch] or known[:1])


# ---- per-kernel facts: hot paths, elements per iteration, DRAM passes -----------------------------------------

@dataclass(frozen=True)
class PathSpec:
    """One hot path of a kernel: the cheapest path through a loop body (``loop``) or through the function
    outside its loops that carries at least ``require`` tagged instructions (``rwp_kernels.sass.tags``);
    ``body_without``: only loops whose body has none of these tags; ``body_at_most``: only loops whose body has
    at most this many of each tag (the norm loop of a row without a Fisher state, not its twin that also sums
    one). ``minus`` (function paths): only the
    instructions of that path that are not on the cheapest path carrying ``minus``, what one more unrolled
    iteration adds (a loop body's counterpart), and a warp running it waits for DRAM as one running a loop body
    with a load does (``waits``). ``overhead``: the path runs once per block or program (its prologue and
    epilogue: the table reads, a row's reduction and sigma), not once per element. ``elems``: elements per thread
    and iteration of this path where they are not the kernel's (a loop over single elements)."""
    name: str
    require: dict
    loop: bool = True
    avoid: tuple = ("call",)
    body_without: tuple = ()
    body_at_most: dict = field(default_factory=dict)
    minus: dict | None = None
    overhead: bool = False
    elems: int | None = None

    @property
    def waits(self) -> bool | None:
        """True: each run waits for DRAM; None: where the path loads from DRAM."""
        return True if self.minus is not None else None


@dataclass(frozen=True)
class KernelFacts:
    config: str  # the run-time case the paths are chosen for
    paths: tuple  # PathSpec, in the order an element goes through them
    elems: int  # elements per thread and path iteration
    dram_bytes_per_elem: float  # in the configured case
    dram_note: str  # one line: why

    def dram_passes(self, dtype: str | None) -> str:
        """e.g. "3 (12 B)": passes over the parameter's tensors per element, and bytes."""
        if dtype is None:
            return f"{self.dram_bytes_per_elem:g} B"
        return f"{self.dram_bytes_per_elem / ITEMSIZE[dtype]:g} ({self.dram_bytes_per_elem:g} B)"


def _header_constant(name: str) -> int:
    """An integer constant of csrc/rwp_api.h (``constexpr ... name = <arithmetic>;``), so that the model follows
    the kernels' sizes."""
    import re

    from ._ext_config import source_dir

    text = (source_dir() / "rwp_api.h").read_text()
    m = re.search(rf"constexpr\s+\w+\s+{name}\s*=\s*([0-9 *+]+);", text)
    if m is None:
        raise RuntimeError(f"csrc/rwp_api.h defines no constant {name}")
    return math.prod(int(f) for f in m[1].split("*"))


CUDA_STAGE_BYTES = _header_constant("kCudaStageBytes")  # shared memory holding a block's rows in perturb_
CUDA_THREADS = _header_constant("kCudaThreads")
CUDA_WARPS = CUDA_THREADS // 32  # per block
CUDA_CHUNK = _header_constant("kCudaChunkElems")  # elements per block of restore_ / sgd_step_
CUDA_SEGMENT = _header_constant("kCudaSegmentElems")  # elements per block of a row split across blocks
ITEMSIZE = {"fp32": 4, "fp16": 2, "bf16": 2}


# The search for a CUDA block's parameter (owner_of: thread 0 bisects the table on ParamEntry::first_unit, at byte
# 0x48 of an entry, one load per iteration: not the split rows' unrolled sum of partials), one iteration per
# halving of the table, run by the block's first warp.
CUDA_SEARCH = PathSpec("search", {"ld64@0x48": 1}, body_without=("philox",), body_at_most={"ld64": 1}, overhead=True)


def cuda_row_overhead(result: dict) -> tuple:
    """A CUDA block's rows: its prologue and epilogue outside the loops (the entry copied to shared memory, the
    spans, the row's sigma; the cheapest path that writes and reads BlockSum's shared array and makes the stores
    of ``result``, the row's result that its first thread writes: the sigma, a segment's partial sums) and
    BlockSum's tree, one iteration per halving of the group."""
    return (PathSpec("row", {"sts64": 1, "lds64": 1, **result}, loop=False, overhead=True),
            PathSpec("tree", {"lds64": 2}, body_without=("philox",), overhead=True), CUDA_SEARCH)


CUDA_ROW_OVERHEAD = cuda_row_overhead({"st32": 1})  # perturb_'s rows: lane 0 stores the row's sigma
# A block's prologue where there is no row to reduce (split rows' update, restore_, sgd_step_).
CUDA_BLOCK_OVERHEAD = (PathSpec("block", {}, loop=False, overhead=True), CUDA_SEARCH)


def search_iterations(num_params: int) -> int:
    """Iterations of owner_of's bisection over a table of ``num_params`` entries (at most; 0 for one entry)."""
    return (num_params - 1).bit_length()


def cuda_facts(kernel: str, dtype: str | None) -> KernelFacts:
    """Facts of the CUDA kernel ``kernel`` (its short name without template arguments) for ``dtype``.
    A thread works on one 16-byte vector per iteration: 4 float32 or 8 16-bit elements (kVecElems)."""
    if kernel == "philox_kernel":
        return KernelFacts("one counter block per thread and iteration", (PathSpec("main", {"philox": 1}),), 4, 20,
                           "reads 4 counter and 2 key int64 words, writes 4 int64 words per block of 4 words")
    if kernel == "noise_kernel":
        return KernelFacts("aligned output", (PathSpec("main", {"st128": 1, "philox": 1}),), 4, 4,
                           "writes each normal once (float32)")
    s = ITEMSIZE[dtype]
    n = 16 // s
    grad_scale = kernel.endswith("_gs")  # the same kernel rescaling the gradients (grad_scale != 1)
    kernel = kernel.removesuffix("_gs")
    grad = {"ld128": 1, "st128": 1} if grad_scale else {}
    grad_note = ", reads and writes the gradient" if grad_scale else ""
    if kernel == "perturb_kernel":  # <T, false, false>: per-row sigma, the row staged
        return KernelFacts(
            "row staged in shared memory, backups, "
            + ("gradients rescaled" if grad_scale else "no gradient scaling") + ", no Fisher state",
            (PathSpec("norm", {"ld128": 1, "sts128": 1}, body_without=("philox",), body_at_most={"ld128": 1}),
             PathSpec("update", dict(Counter({"lds128": 1, "st128": 2, "philox": 1}) + Counter(grad))),
             *CUDA_ROW_OVERHEAD), n,
            (5 if grad_scale else 3) * s,
            f"reads w once (rows up to {CUDA_STAGE_BYTES // s} elements are staged in shared memory), writes w and "
            f"the backup{grad_note}")
    if kernel == "perturb_kernel_split":  # <T, false, true>: a segment of a row longer than the stage
        return KernelFacts(
            "segment of a split row (after partials_kernel): w read again",
            (PathSpec("update", dict(Counter({"ld128": 1, "st128": 2, "philox": 1}) + Counter(grad)),
                      avoid=("call", "lds128")), *CUDA_BLOCK_OVERHEAD), n, (5 if grad_scale else 3) * s,
            f"reads w, writes w and the backup{grad_note} (partials_kernel read w before)")
    if kernel == "partials_kernel":
        return KernelFacts("a segment's float64 sums of squares, no Fisher state",
                           # its block sums 256 threads: BlockSum's tree unrolled, on the row's path
                           (PathSpec("norm", {"ld128": 1}, body_at_most={"ld128": 1}),
                            cuda_row_overhead({"st64": 2})[0], CUDA_SEARCH), n, s,
                           "reads w once")
    if kernel == "perturb_kernel_ae":  # <T, true, false>: ARWP, one sigma per element of a 0-D/1-D parameter
        vf = 4 * n // 16  # 16-byte vectors of float32 per vector of T
        return KernelFacts(
            "ARWP 1-D parameter: per-element sigma from the Fisher state, backups",
            (PathSpec("norm", {"ld128": 1, "sts128": 1}, body_without=("philox",), body_at_most={"ld128": 1}),
             PathSpec("sigmas", {"ld32": 1, "st32": 1}, body_without=("philox",), elems=1),
             PathSpec("update", {"lds128": 1, "ld128": vf, "st128": 2, "philox": 1}),
             # the whole block takes the parameter's one row: BlockSum's tree unrolled, on the row's path
             cuda_row_overhead({})[0], CUDA_SEARCH), n,
            3 * s + 8,
            "reads w once (staged) and the float32 Fisher state, writes w, the backup and a float32 sigma per element "
            "(which the update reads back, from L2)")
    if kernel == "restore_kernel":
        return KernelFacts("regenerated noise, no gradient mix",
                           (PathSpec("main", {"ld128": 1, "st128": 1, "philox": 1}), *CUDA_BLOCK_OVERHEAD), n, 2 * s,
                           "reads and writes w (one sigma per row, cached); exact mode: reads the backup, writes w")
    if kernel == "sgd_kernel":
        return KernelFacts("backups, momentum after the first step, no gradient mix",
                           (PathSpec("main", {"ld128": 3, "st128": 2}), *CUDA_BLOCK_OVERHEAD), n, 5 * s,
                           "reads the backup, the gradient and the momentum, writes w and the momentum")
    raise KeyError(kernel)


def triton_row_overhead(result: dict) -> PathSpec:
    """A Triton program's prologue and epilogue around its loops (the item and table reads, the row's reduction
    and sigma): the cheapest path through it that draws no normals (those of a row that fits a tile) and makes
    the stores of ``result``, the row's result that one lane writes (the sigma, a segment's partial sums)."""
    return PathSpec("row", result, loop=False, avoid=("call", "philox"), overhead=True)


def triton_facts(kernel: str, dtype: str | None, block: int, num_warps: int, parts: int = 1) -> KernelFacts:
    """Facts of a Triton kernel: a program holds BLOCK elements, each of its num_warps * 32 threads
    ``e = BLOCK / (num_warps * 32)`` consecutive ones (no loop, except perturb_'s over the tiles of a long
    row or segment): 4 for float32 and 8 for 16-bit types (``tables.TILE_MENUS``). On the vectorized path
    (aligned tensors, items on vector boundaries) a thread's elements are ``e * itemsize / 16`` accesses of 16
    bytes per tensor, masked: the loads predicated
    (``ld<bits>p``; unpredicated loads are the table's and the scalars'), the stores predicated except the
    last one, which the compiler turns into an early EXIT and a plain store (so stores count without ``p``)."""
    e = block // (num_warps * 32)
    if kernel == "philox_kernel":
        return KernelFacts("one counter block per lane", (PathSpec("main", {"philox": 1}, loop=False),), 4 * e, 20,
                           "reads 4 counter and 2 key int64 words, writes 4 int64 words per block of 4 words")
    if kernel == "noise_kernel":
        return KernelFacts("output on Philox block boundaries (offset % 4 == 0)",
                           (PathSpec("main", {"st128": e // 4, "philox": 1}, loop=False),), e, 4,
                           "writes each normal once (float32)")
    s = ITEMSIZE[dtype]
    b = min(128, 8 * s * e)  # bits of a thread's access on the vectorized path (16 bytes at most)
    v = 8 * s * e // b  # accesses per thread, tensor and tile
    grad_scale = kernel.endswith("_gs")  # perturb_ rescaling the gradients (grad_scale != 1): the same kernel
    kernel = kernel.removesuffix("_gs")
    g = v if grad_scale else 0  # the gradient's load and store on the same path
    grad_case = "gradients rescaled" if grad_scale else "no gradient scaling"
    grad_note = ", reads and writes the gradient" if grad_scale else ""
    if kernel == "perturb_kernel":
        return KernelFacts(
            f"a row that fits a tile, aligned, backups, {grad_case}, no Fisher state",
            (PathSpec("tile", {f"ld{b}p": 2 * v + g, f"st{b}": 2 * v + g, "philox": 1}, loop=False),), e,
            (5 if grad_scale else 3) * s,
            f"rows of at most BLOCK = {block} elements (BLOCK - 3 off a Philox block boundary): read w once from "
            f"DRAM (the update reads the tile again from L1), write w and the backup{grad_note}; longer rows read w "
            f"twice (4 passes)")
    if kernel == "perturb_kernel_packed":
        return KernelFacts(
            f"several short rows packed in one tile, aligned, backups, {grad_case}, no Fisher state",
            # their sums: a segmented scan over the tile (SHFL.UP), the path a packed tile takes
            (PathSpec("tile", {f"ld{b}p": 2 * v + g, f"st{b}": 2 * v + g, "philox": 1, "shfl_up": 1},
                      loop=False),), e,
            (5 if grad_scale else 3) * s,
            f"rows packed in a tile of BLOCK = {block} elements: read w once from DRAM (the update reads the tile "
            f"again from L1), write w and the backup{grad_note}")
    if kernel == "perturb_kernel_long":
        return KernelFacts(
            "a row longer than the tile (or a segment of a split row): a norm loop and an update loop over its tiles"
            + (", gradients rescaled" if grad_scale else ""),
            (PathSpec("norm", {f"ld{b}p": v}, body_without=("philox",)),
             PathSpec("update", {f"ld{b}p": v + g, f"st{b}": 2 * v + g, "philox": 1}),
             triton_row_overhead({"st32": 1})), e,
            (6 if grad_scale else 4) * s,
            f"reads w twice (norm pass, update pass; the second may hit L2), writes w and the backup{grad_note}")
    if kernel == "perturb_kernel_resident":
        def tiles(n):  # a row of n tiles, with every tile's Philox multiplies (not a tile skipping its noise)
            return {f"ld{b}": n * (v + g), f"st{b}": n * (2 * v + g), "philox": n * PHILOX_MULTIPLIES * e // 4}

        return KernelFacts(
            f"a row's first PARTS = {parts} tiles kept in registers, aligned, backups, {grad_case}, no Fisher state; "
            f"per tile: what its last tile adds to a row of {parts}; per row: the program of a row of one tile (all "
            f"{parts} tiles' masked loads and sums, one tile's update); a longer row's further tiles: as a long "
            f"row's",
            (PathSpec("tile", tiles(parts), loop=False, minus=tiles(parts - 1)),
             # (all its tiles' loads: not the program of a row that fits a tile, which this kernel also has)
             PathSpec("row", {**tiles(1), f"ld{b}": parts * (v + g)}, loop=False, overhead=True)), e,
            (5 if grad_scale else 3) * s,
            f"reads w once from DRAM (the kept tiles' loads all issued before the norm; a longer row's further "
            f"tiles twice), writes w and the backup{grad_note}")
    if kernel == "row_partials_kernel":
        return KernelFacts("a segment of a row longer than SPLIT_ROW: its partial sums",
                           (PathSpec("norm", {f"ld{b}p": v}), triton_row_overhead({"st64": 2})), e, s,
                           "reads w once")
    if kernel == "perturb_elementwise_kernel":
        return KernelFacts(
            "ARWP 0-D/1-D tensor that fits a tile: per-element sigma from the Fisher state, backups",
            (PathSpec("tile", {f"ld{b}p": 2 * v, f"st{b}": 2 * v, "philox": 1}, loop=False),), e, 3 * s + 8,
            "reads w once and the float32 Fisher state, writes w, the backup and a float32 sigma per element")
    if kernel == "perturb_elementwise_unaligned_kernel":
        return KernelFacts(
            "ARWP 1-D tensor longer than a tile, misaligned or no whole number of vectors: scalar loops",
            (PathSpec("update", {"philox": 1}),), e, 4 * s + 8,
            "reads w twice (norm pass, update pass) and the float32 Fisher state, writes w, the backup and a float32 "
            "sigma per element, in scalar accesses")
    if kernel == "restore_kernel":
        return KernelFacts("regenerated noise, no gradient mix",
                           (PathSpec("main", {f"ld{b}p": v, f"st{b}": v, "philox": 1}, loop=False),), e, 2 * s,
                           "reads and writes w (sigmas gathered per element, cached); exact mode: backup in, w out")
    if kernel == "sgd_step_kernel":
        from .triton.tables import MOMENTUM_BUFFER

        column = f"ld64@0x{8 * MOMENTUM_BUFFER.value:x}"  # the momentum buffer's address: read only with momentum
        return KernelFacts("backups, momentum after the first step, no gradient mix, aligned",
                           # the three tensors' loads, masked or not (ptxas may turn a masked load into a branch
                           # around a plain one): the path that reads the momentum buffer, not the first step's
                           (PathSpec("main", {f"ld{b}": 3 * v, f"st{b}": 2 * v, column: 1}, loop=False),), e, 5 * s,
                           "reads the backup, the gradient and the momentum, writes w and the momentum")
    raise KeyError(kernel)


# ---- compiling and reading the kernels ---------------------------------------------------------------------

# Entries kept per compiled variant: each change to the kernels' sources makes new ones, and the cache would
# otherwise grow by the whole set (about 100 MB) with every edit.
CACHE_KEEP = 3


def cache_dir() -> Path:
    """Where compiled kernels and their listings are kept between runs (a folder of the temp dir)."""
    path = Path(os.environ.get("RWP_GPU_MODEL_CACHE") or Path(tempfile.gettempdir()) / "rwp_kernels_gpu_model")
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def _entry_lock(entry: Path):
    """Holds ``entry``'s lock file: a second process (a parallel test worker, another benchmark) building the same
    entry waits, then reads what the first one wrote. Released by the system if the holder dies."""
    try:
        import fcntl
    except ImportError:  # no fcntl (Windows): no lock; done.json is still written atomically
        yield
        return
    with open(entry.with_name(entry.name + ".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _read_done(done: Path) -> dict | None:
    try:
        out = json.loads(done.read_text())
    except (OSError, ValueError):  # absent, or dropped by another process's CACHE_KEEP
        return None
    try:
        os.utime(done)  # (recently used; a read-only cache is only read)
    except OSError:
        pass
    return {**out, "cached": True}


def _cached(variant: str, key: str, build) -> dict:
    """``build(folder)``'s result for ``variant`` compiled from sources and flags hashed to ``key``, kept in
    cache_dir() with a "cached" entry added. A new entry drops all but the CACHE_KEEP most recently used of its
    variant."""
    root = cache_dir()
    done = root / f"{variant}_{key}" / "done.json"
    found = _read_done(done)
    if found is not None:
        return found
    with _entry_lock(done.parent):
        found = _read_done(done)  # built by another process while this one waited
        if found is not None:
            return found
        done.parent.mkdir(parents=True, exist_ok=True)
        out = build(done.parent)
        partial = done.with_name(f"done.{os.getpid()}.json")
        partial.write_text(json.dumps(out))
        os.replace(partial, done)
    pattern = re.compile(re.escape(variant) + "_[0-9a-f]{16}")
    entries = [p / "done.json" for p in root.iterdir() if pattern.fullmatch(p.name) and (p / "done.json").is_file()]
    for old in sorted(entries, key=lambda p: p.stat().st_mtime, reverse=True)[CACHE_KEEP:]:
        shutil.rmtree(old.parent, ignore_errors=True)
        old.parent.with_name(old.parent.name + ".lock").unlink(missing_ok=True)
    return {**out, "cached": False}


def cuobjdump() -> str | None:
    """Triton's cuobjdump, else the CUDA toolkit's."""
    try:
        import triton

        tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        if os.access(tool, os.X_OK):
            return str(tool)
    except ImportError:
        pass
    found = shutil.which("cuobjdump")
    if found:
        return found
    from . import _ext_config as C

    home = C.find_cuda_home(C.find_nvcc())
    tool = Path(home or "/nonexistent") / "bin" / "cuobjdump"
    return str(tool) if os.access(tool, os.X_OK) else None


def _dump(cubin: Path) -> tuple[str, str]:
    tool = cuobjdump()
    if tool is None:
        raise RuntimeError("cuobjdump was not found (it ships with Triton and with the CUDA toolkit)")
    listing = subprocess.run([tool, "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    usage = subprocess.run([tool, "-res-usage", str(cubin)], capture_output=True, text=True, check=True).stdout
    return listing, usage


def cuda_compile_flags(arch: int) -> list[str]:
    """nvcc flags of the run-time build for one architecture (rwp_kernels._ext_config: NVCC_FLAGS and the
    SASS gencode of ``gencode_flags``; torch.utils.cpp_extension's COMMON_NVCC_FLAGS, which it adds)."""
    from . import _ext_config as C

    try:
        common = list(C.cpp_extension().COMMON_NVCC_FLAGS)
    except Exception:  # noqa: BLE001 - a torch without it: the flags only switch off host-side half operators
        common = []
    gencode = C.gencode_flags([f"{arch // 10}.{arch % 10}"])[0]  # -gencode=arch=compute_XX,code=sm_XX
    return [*common, *C.NVCC_FLAGS, gencode]


def compile_cuda(arch: int) -> dict:
    """csrc/cuda/cuda_kernels.cu compiled to a cubin for ``arch``: {"sass", "res_usage", "ptxas", "flags",
    "cached"}. Cached under cache_dir() by the sources, flags and nvcc version."""
    from . import _ext_config as C

    nvcc = C.find_nvcc()
    if nvcc is None:
        raise RuntimeError("nvcc was not found (install the CUDA toolkit or set CUDA_HOME)")
    src = C.source_dir()
    flags = cuda_compile_flags(arch)
    h = hashlib.sha256()
    for path in sorted(p for p in src.rglob("*") if p.suffix in C.SOURCE_SUFFIXES):
        h.update(str(path.relative_to(src)).encode() + b"\0" + path.read_bytes())
    h.update(repr((flags, C.nvcc_version(nvcc))).encode())

    def build(folder: Path) -> dict:
        cubin = folder / "cuda_kernels.cubin"
        cmd = [nvcc, "-cubin", *flags, "-Xptxas", "-v", f"-I{src}", str(src / "cuda" / "cuda_kernels.cu"), "-o",
               str(cubin)]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0:
            raise RuntimeError(f"nvcc failed for sm_{arch}:\n{run.stderr[-3000:]}")
        listing, usage = _dump(cubin)
        return {"sass": listing, "res_usage": usage, "ptxas": run.stderr, "flags": flags}

    return _cached(f"cuda_sm{arch}", h.hexdigest()[:16], build)


def _triton_key(spec) -> str:
    import triton

    h = hashlib.sha256(repr((spec, triton.__version__)).encode())
    root = Path(__file__).resolve().parent
    for path in sorted([*(root / "triton").glob("*.py"), root / "stream.py"]):
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def compile_triton(spec) -> dict:
    """One Triton specialization (``rwp_kernels.triton.aot.Spec``) compiled by ``aot.compile_kernel``:
    {"sass", "res_usage", "registers", "spill_stores", "spill_loads", "dynamic_smem", "num_warps", "cached"}.
    Runs in a worker process; cached under cache_dir()."""
    from .triton import aot

    def build(folder: Path) -> dict:
        compiled = aot.compile_kernel(spec)
        result = aot.compile_spec(spec)  # registers and spills: the same ptxas run Triton makes
        if result.error:
            raise RuntimeError(result.error)
        cubin = folder / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        listing, usage = _dump(cubin)
        return {"sass": listing, "res_usage": usage, "registers": result.registers,
                "spill_stores": result.spill_store_bytes, "spill_loads": result.spill_load_bytes,
                "dynamic_smem": int(compiled.metadata.shared), "num_warps": int(compiled.metadata.num_warps)}

    return _cached("triton_" + re.sub(r"[^A-Za-z0-9]+", "_", spec.label), _triton_key(spec), build)


@dataclass
class KernelReport:
    backend: str  # "cuda" or "triton"
    kernel: str  # short name: "perturb_kernel<fp32,false>", "sgd_step_kernel"
    key: str  # the facts' kernel key: "perturb_kernel", "perturb_kernel_long", ...
    dtype: str | None
    arch: int
    registers: int
    spill_stores: int
    spill_loads: int
    smem: int  # static + dynamic shared memory per block
    threads: int
    warps: int  # resident per SM
    limiter: str
    facts: KernelFacts
    paths: dict = field(default_factory=dict)  # PathSpec name -> sass.Path (None: no path meets the spec)
    block: int | None = None
    num_warps: int | None = None
    parts: int | None = None  # Triton perturb_kernel's PARTS

    @property
    def label(self) -> str:
        """e.g. "perturb_kernel<fp32,false> [long rows]", "sgd_step_kernel bf16 BLOCK=1024/8"."""
        text = self.kernel if self.backend == "cuda" or not self.dtype else f"{self.kernel} {self.dtype}"
        if self.block:
            text += f" BLOCK={self.block}/{self.num_warps}w"
        if (self.parts or 1) > 1:
            text += f" PARTS={self.parts}"
        key = self.key.removesuffix("_gs")
        variant = {"perturb_kernel_long": " [long rows]", "perturb_kernel_split": " [split rows]",
                   "perturb_kernel_packed": " [packed rows]",
                   "perturb_kernel_ae": " [ARWP 1-D]"}.get(key, "")
        if key == "perturb_kernel_resident":
            variant = " [rows kept in registers]"
        return text + variant + (" [grad_scale != 1]" if self.key.endswith("_gs") else "")

    @property
    def complete(self) -> bool:
        return all(p is not None for p in self.paths.values())

    @property
    def hot(self) -> dict:
        """The paths that run per element (not the per-block or per-program overhead)."""
        return {s.name: self.paths[s.name] for s in self.facts.paths if not s.overhead}

    def runs(self, path: str) -> float:
        """Iterations of ``path`` per iteration of the kernel (its ``facts.elems`` elements): 1, or more for a path
        that takes fewer elements per iteration."""
        spec = next(s for s in self.facts.paths if s.name == path)
        return self.facts.elems / (spec.elems or self.facts.elems)

    def path_instrs(self) -> float:
        """Instructions per thread on the per-element paths for ``facts.elems`` elements."""
        return sum(len(p) * self.runs(name) for name, p in self.hot.items() if p is not None)

    def instr_per_elem(self) -> float:
        return self.path_instrs() / self.facts.elems if self.complete else float("nan")

    def pipes(self) -> Counter:
        total = Counter()
        for name, p in self.hot.items():
            if p is not None:
                total.update({k: n * self.runs(name) for k, n in p.pipes().items()})
        return total

    def warp_cycles(self, path: str | None = None) -> float:
        """Scheduler cycles per warp iteration of one path (all paths, per iteration of the kernel: None): the
        issue slots, or the busiest pipe's cycles if more (uniform and branch instructions take an issue slot
        only)."""
        paths = [self.paths[path]] if path else list(self.hot.values())
        if any(p is None for p in paths):
            return float("nan")
        counts = self.paths[path].pipes() if path else self.pipes()
        issue = sum(counts.values())
        tp = PIPE_THROUGHPUT[_limits_arch(self.arch)]
        busiest = max((n * 128 / tp[k] for k, n in counts.items() if k in tp), default=0)
        return max(issue, busiest)

    def bound_pipe(self) -> str:
        counts = self.pipes()
        tp = PIPE_THROUGHPUT[_limits_arch(self.arch)]
        issue = sum(counts.values())
        pipe, cycles = max(((k, n * 128 / tp[k]) for k, n in counts.items() if k in tp), key=lambda kv: kv[1],
                           default=("issue", 0))
        return f"{pipe} {cycles / issue:.0%}" if cycles > issue else f"issue ({pipe} {cycles / max(issue, 1):.0%})"

    def accesses(self) -> str:
        """The global (and shared) memory instructions of each path, e.g. "norm: LD.128 STS.128"."""
        parts = []
        for name, p in self.hot.items():
            if p is None:
                parts.append(f"{name}: no path")
                continue
            counts = Counter()
            pred = Counter()
            for a in p.accesses():
                if a.space in ("global", "generic", "shared"):
                    counts[a.label] += 1
                    pred[a.label] += a.predicated
            items = []
            for label, n in sorted(counts.items(), key=lambda kv: (kv[0][0] == "S", kv[0])):
                text = label if n == 1 else f"{label}x{n}"
                if pred[label]:
                    text += f"({pred[label]}p)"
                items.append(text)
            parts.append(f"{name}: {' '.join(items)}" if len(self.hot) > 1 else " ".join(items))
        return "; ".join(parts)

    def path_summary(self, overhead: bool = False) -> str:
        """e.g. "norm 40/115 + update 272/473" (path instructions / static loop body) for the per-element paths,
        or (``overhead``) the per-block or per-program ones, e.g. "row 358 + tree 10"."""
        parts = []
        for spec in self.facts.paths:
            if spec.overhead != overhead:
                continue
            p = self.paths[spec.name]
            parts.append(f"{spec.name} -" if p is None else
                         f"{spec.name} {len(p)}" if overhead else f"{spec.name} {len(p)}/{p.body_instrs}")
        return " + ".join(parts)


def analyze(instrs: list, facts: KernelFacts) -> dict:
    """The hot paths of one function: for a loop spec, the loop with the largest body among the innermost of
    those whose body has a path that meets the spec (and none of ``body_without``'s tags), and its cheapest
    such path (a loop nested in another runs more often: an inner loop over the whole vectors of a span);
    for a function spec, the cheapest path from entry to EXIT through no loop."""
    loops = sass.find_loops(instrs)
    out = {}
    for spec in facts.paths:
        if not spec.loop:
            out[spec.name] = sass.cheapest_path(instrs, spec.require, avoid=spec.avoid, outside=loops)
            if spec.minus is not None and out[spec.name] is not None:
                less = sass.cheapest_path(instrs, spec.minus, avoid=spec.avoid, outside=loops)
                out[spec.name] = None if less is None else sass.path_difference(out[spec.name], less)
            continue
        meeting = {}
        for lp in loops:
            body = [i for i in instrs if lp.contains(i.addr)]
            if spec.body_without and any(sass.tags(i)[t] for i in body for t in spec.body_without):
                continue
            if spec.body_at_most:
                carried = sum((sass.tags(i) for i in body), Counter())
                if any(carried[t] > n for t, n in spec.body_at_most.items()):
                    continue
            path = sass.cheapest_path(instrs, spec.require, loop=lp, avoid=spec.avoid)
            if path is not None:
                meeting[lp] = path
        hot = [meeting[lp] for lp in sass.innermost(list(meeting))]
        out[spec.name] = max(hot, key=lambda path: path.body_instrs, default=None)
    return out


CUDA_KERNELS = (  # (function short name, facts key, dtype) per dtype; philox and noise have no dtype
    ("perturb_kernel<{d},false,false>", "perturb_kernel"), ("perturb_kernel<{d},false,false>", "perturb_kernel_gs"),
    ("partials_kernel<{d}>", "partials_kernel"), ("perturb_kernel<{d},false,true>", "perturb_kernel_split"),
    ("perturb_kernel<{d},false,true>", "perturb_kernel_split_gs"),
    ("perturb_kernel<{d},true,false>", "perturb_kernel_ae"), ("restore_kernel<{d}>", "restore_kernel"),
    ("sgd_kernel<{d}>", "sgd_kernel"),
)


def analyze_cuda(arch: int, dtypes=("fp32", "bf16"), compiled: dict | None = None) -> list[KernelReport]:
    """Reports for the CUDA kernels compiled for ``arch`` (compiling them unless ``compiled`` is given)."""
    compiled = compiled or compile_cuda(arch)
    functions = {sass.short_name(name): ins for name, ins in sass.parse_sass(compiled["sass"]).items()}
    usage = {sass.short_name(name): u for name, u in sass.parse_res_usage(compiled["res_usage"]).items()}
    ptxas = {sass.short_name(name): u for name, u in sass.parse_ptxas_verbose(compiled["ptxas"]).items()}
    wanted = [("philox_kernel", "philox_kernel", None), ("noise_kernel", "noise_kernel", None)]
    wanted += [(name.format(d=d), key, d) for d in dtypes for name, key in CUDA_KERNELS]
    reports = []
    for name, key, dtype in wanted:
        if name not in functions:
            raise RuntimeError(f"sm_{arch}: {name} is not in the cubin (found {sorted(functions)})")
        res, log = usage.get(name, {}), ptxas.get(name, {})
        regs = log.get("registers", res.get("REG", 0))
        smem = res.get("SHARED", log.get("smem", 0))
        warps, limiter = resident_warps(regs, smem, CUDA_THREADS, arch)
        facts = cuda_facts(key, dtype)
        reports.append(KernelReport("cuda", name, key, dtype, arch, regs, log.get("spill_stores", -1),
                                    log.get("spill_loads", -1), smem, CUDA_THREADS, warps, limiter, facts,
                                    analyze(functions[name], facts)))
    return reports


def triton_specs(archs, dtypes=("fp32", "bf16"), tiles=None) -> list:
    """The Triton specializations to analyze: every kernel for ``dtypes`` (Philox and noise with 32-bit
    sizes) and the launchers' tiles (``tiles``: (BLOCK, warps) pairs of the dtypes' TILE_MENUS; None: all)."""
    from .triton import aot

    def wanted(spec) -> bool:
        if (tiles and (spec.block, spec.num_warps) not in set(tiles)) or spec.dtype not in (None, *dtypes):
            return False
        return spec.index is None or set(spec.index.split(",")) == {"i32"}  # sizes below 2**31

    return [spec for spec in aot.specializations(archs) if wanted(spec)]


def _triton_reports(spec, compiled: dict) -> list[KernelReport]:
    (name, instrs), = sass.parse_sass(compiled["sass"]).items()
    usage = next(iter(sass.parse_res_usage(compiled["res_usage"]).values()), {})
    threads = compiled["num_warps"] * 32
    smem = usage.get("SHARED", 0) + compiled["dynamic_smem"]
    warps, limiter = resident_warps(compiled["registers"], smem, threads, spec.arch)
    keys = [spec.kernel]
    if spec.kernel == "perturb_kernel":  # the same kernel's other paths and its grad_scale != 1 case
        keys += ["perturb_kernel_packed", "perturb_kernel_long",
                 *(["perturb_kernel_resident"] if spec.parts > 1 else [])]
        keys += [k + "_gs" for k in keys]
    reports = []
    for key in keys:
        facts = triton_facts(key, spec.dtype, spec.block, compiled["num_warps"], spec.parts or 1)
        reports.append(KernelReport("triton", spec.kernel, key, spec.dtype, spec.arch, compiled["registers"],
                                    compiled["spill_stores"], compiled["spill_loads"], smem, threads, warps, limiter,
                                    facts, analyze(instrs, facts), spec.block, compiled["num_warps"], spec.parts))
    return reports


def _compile_triton_quietly(spec):
    try:
        return compile_triton(spec), None
    except Exception as err:  # noqa: BLE001 - reported per specialization
        return None, f"{type(err).__name__}: {err}"[:500]


def analyze_triton(specs, jobs: int = 1) -> tuple[list[KernelReport], list[str]]:
    """Reports for Triton specializations (compiled in ``jobs`` processes), and one error line per failure."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return [], ["TRITON_INTERPRET=1 is set: the Triton kernels are interpreted and cannot be compiled"]
    if jobs > 1 and len(specs) > 1:
        with ProcessPoolExecutor(jobs) as pool:
            results = list(pool.map(_compile_triton_quietly, specs))
    else:
        results = [_compile_triton_quietly(s) for s in specs]
    reports, errors = [], []
    for spec, (compiled, err) in zip(specs, results):
        if err:
            errors.append(f"{spec.label}: {err}")
        else:
            reports += _triton_reports(spec, compiled)
    return reports, errors


def analyze_all(archs=(80, 90), dtypes=("fp32", "bf16"), triton_tiles=None, jobs: int = 1, triton: bool = True):
    """CUDA and Triton reports for ``archs`` (nvcc runs in threads, Triton in processes), and errors."""
    errors, reports = [], []
    with ThreadPoolExecutor(max(1, len(archs))) as pool:
        futures = {arch: pool.submit(compile_cuda, arch) for arch in archs}
        triton_reports, triton_errors = ([], [])
        if triton:
            try:
                triton_reports, triton_errors = analyze_triton(triton_specs(archs, dtypes, triton_tiles), jobs)
            except ImportError as err:
                triton_errors = [f"Triton is not importable: {err}"]
        for arch, fut in futures.items():
            try:
                reports += analyze_cuda(arch, dtypes, fut.result())
            except Exception as err:  # noqa: BLE001
                errors.append(f"CUDA sm_{arch}: {type(err).__name__}: {err}"[:1000])
    return reports + triton_reports, errors + triton_errors


# ---- the models' parameters --------------------------------------------------------------------------------

def _resnet50_shapes(num_classes: int = 1000) -> list[tuple]:
    """torchvision's ResNet-50 (bottlenecks 3-4-6-3, stride on the 3x3 conv), in parameter order."""
    def bn(c):
        return [(c,), (c,)]

    shapes = [(64, 3, 7, 7)] + bn(64)
    in_c = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for block in range(blocks):
            out_c = 4 * width
            shapes += [(width, in_c, 1, 1)] + bn(width) + [(width, width, 3, 3)] + bn(width) + [(out_c, width, 1, 1)]
            shapes += bn(out_c)
            if block == 0:
                shapes += [(out_c, in_c, 1, 1)] + bn(out_c)
            in_c = out_c
    return shapes + [(num_classes, 2048), (num_classes,)]


MODELS = {"resnet18": "CIFAR ResNet-18", "wrn28_10": "WRN-28-10", "resnet50": "ResNet-50 (ImageNet)"}


def model_shapes(name: str) -> tuple[list[tuple], str]:
    """The parameter shapes of a benchmarked model, and where they come from (built on the meta device)."""
    import torch

    if name == "resnet50":
        try:
            import torchvision
        except ImportError:
            return _resnet50_shapes(), "table (torchvision is not installed)"
        with torch.device("meta"):
            model = torchvision.models.resnet50(weights=None)
        return [tuple(p.shape) for p in model.parameters()], "torchvision.models.resnet50(weights=None)"
    from .models import build_model

    with torch.device("meta"):
        model = build_model(name)
    return [tuple(p.shape) for p in model.parameters()], f"rwp_kernels.models.{name}()"


def param_rows(shapes) -> list[tuple[int, int]]:
    """(numel, row length) per parameter: rows of shape[0] filters for >=2-D tensors, one row for 0-D/1-D."""
    out = []
    for shape in shapes:
        numel = math.prod(shape)
        out.append((numel, numel // shape[0] if len(shape) >= 2 and shape[0] else numel))
    return out


# ---- the work of one op on one model -------------------------------------------------------------------------

@dataclass
class Work:
    """What one op does on one model with one backend: bytes, and warp iterations per (facts key, path)."""
    elements: int
    min_bytes: float  # the issue's floor: each tensor read or written once (perturb_ 3, sgd_step_ 5 per element)
    dram_bytes: float  # what the kernels' structure moves
    launches: int
    iterations: Counter = field(default_factory=Counter)  # (facts key, path name) -> warp iterations
    tile: tuple | None = None  # Triton's (BLOCK, num_warps, perturb_kernel's PARTS or None)
    notes: list = field(default_factory=list)


def cuda_row_threads(row_len: int, itemsize: int) -> int:
    """csrc/rwp_api.h cuda_row_threads: threads per row, the smallest power of two from 8 to 256 whose share of
    the stage (6 vectors per thread) holds the row."""
    vectors = (row_len - 1) // (16 // itemsize) + 2
    group = 8
    while CUDA_STAGE_BYTES // 16 // CUDA_THREADS * group < vectors and group < CUDA_THREADS:
        group *= 2
    return group


def _warp_iterations(vectors: int, threads: int) -> float:
    """Warp iterations of a loop over ``vectors`` items by ``threads`` lanes (item i to lane i % threads):
    a warp iterates as often as its busiest lane; lanes of a group narrower than a warp share it."""
    if threads < 32:
        return -(-vectors // threads) * threads / 32
    return float(sum(max(0, -(-(vectors - 32 * w) // threads)) for w in range(threads // 32)))


def cuda_row_segments(row_len: int, itemsize: int) -> int:
    """csrc/rwp_api.h cuda_row_segments: segments of a row split across blocks, 0 for a row that is staged."""
    share = CUDA_STAGE_BYTES // 16 // CUDA_THREADS * cuda_row_threads(row_len, itemsize)  # the row's stage vectors
    if (row_len - 1) // (16 // itemsize) + 2 <= share:
        return 0
    return -(-row_len // CUDA_SEGMENT)


def _add_search(work: Work, key: str, blocks: int, num_params: int) -> None:
    """The owner_of iterations of ``blocks`` blocks of the CUDA kernel ``key`` (its first warp's)."""
    steps = search_iterations(num_params)
    if steps:
        work.iterations[(key, "search")] += blocks * steps


def _cuda_perturb(params, s: int, work: Work, grad_scale: bool) -> None:
    n = 16 // s
    gs = "_gs" if grad_scale else ""
    staged = split = False
    for numel, row_len in params:
        rows = numel // row_len
        segments = cuda_row_segments(row_len, s)
        if segments:
            # partials_kernel, then the update: one block of CUDA_THREADS per segment
            for k in range(segments):
                lo = k * CUDA_SEGMENT
                vectors = -(-min(CUDA_SEGMENT, row_len - lo) // n) + 1  # rows need not start on a vector
                its = _warp_iterations(vectors, CUDA_THREADS) * rows
                work.iterations[("partials_kernel", "norm")] += its
                work.iterations[("perturb_kernel_split" + gs, "update")] += its
            blocks = rows * segments  # each block: its warps run the overhead paths once
            work.iterations[("partials_kernel", "row")] += CUDA_WARPS * blocks
            work.iterations[("perturb_kernel_split" + gs, "block")] += CUDA_WARPS * blocks
            for key in ("partials_kernel", "perturb_kernel_split" + gs):
                _add_search(work, key, blocks, len(params))
            work.dram_bytes += numel * s * (6 if grad_scale else 4) + 16 * rows * segments + 4 * rows
            split = True
            continue
        staged = True
        group = cuda_row_threads(row_len, s)
        blocks = -(-rows // (CUDA_THREADS // group))
        work.iterations[("perturb_kernel" + gs, "row")] += CUDA_WARPS * blocks
        work.iterations[("perturb_kernel" + gs, "tree")] += CUDA_WARPS * blocks * (group.bit_length() - 1)
        _add_search(work, "perturb_kernel" + gs, blocks, len(params))
        # the vectors a row touches depend on where it starts; rows repeat with period n / gcd(row_len, n)
        period = n // math.gcd(row_len, n)
        for r in range(min(rows, period)):
            lo = r * row_len
            vectors = -(-(lo + row_len) // n) - lo // n
            count = len(range(r, rows, period))
            its = _warp_iterations(vectors, group) * count
            work.iterations[("perturb_kernel" + gs, "norm")] += its
            work.iterations[("perturb_kernel" + gs, "update")] += its
            work.dram_bytes += count * (row_len * s * (5 if grad_scale else 3) + 4)
    work.launches = int(staged) + 2 * int(split)  # split rows: partials_kernel, then the update


def _triton_perturb(params, s: int, block: int, warps: int, parts: int, work: Work, grad_scale: bool) -> None:
    from .triton.tables import SPLIT_ROW, row_items

    extra = 2 * s if grad_scale else 0  # the gradient read and written
    gs = "_gs" if grad_scale else ""  # the paths that also rescale the gradient
    split = False
    for numel, row_len in params:
        for _, start, count, _ in row_items(0, numel, row_len, block, 16 // s):
            base = start - start % 4
            tiles = -(-(start + count - base) // block)
            if row_len > SPLIT_ROW.value:
                work.iterations[("row_partials_kernel", "norm")] += warps * tiles
                work.iterations[("row_partials_kernel", "row")] += warps
                split = True
            elif tiles == 1:  # one row, or several packed (their sums a segmented scan)
                work.iterations[("perturb_kernel" + ("_packed" if count > row_len else "") + gs, "tile")] += warps
                work.dram_bytes += count * (3 * s + extra) + 4 * max(1, count // row_len)
                continue
            elif parts > 1:  # the program of a one-tile row, what each further kept tile adds, the rest streamed
                work.iterations[("perturb_kernel_resident" + gs, "row")] += warps
                work.iterations[("perturb_kernel_resident" + gs, "tile")] += warps * (min(tiles, parts) - 1)
                if tiles > parts:  # a norm loop and an update loop over the tiles past the kept ones (as a long row's)
                    work.iterations[("perturb_kernel_long" + gs, "norm")] += warps * (tiles - parts)
                    work.iterations[("perturb_kernel_long" + gs, "update")] += warps * (tiles - parts)
                streamed = max(0, start + count - base - parts * block)  # elements read twice
                work.dram_bytes += count * (3 * s + extra) + streamed * s + 4
                continue
            else:
                work.iterations[("perturb_kernel_long" + gs, "norm")] += warps * tiles
            work.iterations[("perturb_kernel_long" + gs, "update")] += warps * tiles
            work.iterations[("perturb_kernel_long" + gs, "row")] += warps
            work.dram_bytes += count * (4 * s + extra) + 4
    work.launches = 1 + int(split)  # split rows: row_partials_kernel first


def op_work(op: str, backend: str, params, dtype: str, grad_scale: bool = False) -> Work:
    """The work of ``op`` ("perturb_" or "sgd_step_") on ``params`` ((numel, row_len) pairs) in the configured
    case (exact mode with backups, momentum, no ARWP; ``grad_scale``: perturb_ also rescales the gradients,
    whose reading and writing then belongs to its floor)."""
    s = ITEMSIZE[dtype]
    elements = sum(n for n, _ in params)
    passes = {"perturb_": 5 if grad_scale else 3, "sgd_step_": 5}[op]
    work = Work(elements, passes * s * elements, 0.0, 1)
    if backend == "cuda":
        if op == "perturb_":
            _cuda_perturb(params, s, work, grad_scale)
        else:
            n = 16 // s
            for numel, _ in params:
                for lo in range(0, numel, CUDA_CHUNK):
                    work.iterations[("sgd_kernel", "main")] += _warp_iterations(-(-min(CUDA_CHUNK, numel - lo) // n),
                                                                                CUDA_THREADS)
                    work.iterations[("sgd_kernel", "block")] += CUDA_WARPS
                    _add_search(work, "sgd_kernel", 1, len(params))
            work.dram_bytes = 5 * s * elements
    elif backend == "triton":
        from .triton.tables import choose_tile, perturb_tile

        if op == "perturb_":
            tile = perturb_tile([(r, n // r) for n, r in params], s)
            _triton_perturb(params, s, tile.block, tile.num_warps, tile.parts, work, grad_scale)
            work.tile = (tile.block, tile.num_warps, tile.parts)
        else:
            tile = choose_tile([(n, 1) for n, _ in params], s)
            work.iterations[("sgd_step_kernel", "main")] += tile.num_warps * sum(-(-n // tile.block) for n, _ in params)
            work.dram_bytes = 5 * s * elements
            work.tile = (tile.block, tile.num_warps, None)
    else:
        raise ValueError(f"unknown backend {backend!r}")
    return work


# ---- the estimate --------------------------------------------------------------------------------------------

@dataclass
class Estimate:
    gpu: str
    model: str
    dtype: str
    backend: str
    op: str
    elements: int
    launches: int
    min_bytes: float
    dram_bytes: float
    t_memory: float  # seconds: dram_bytes at peak bandwidth
    t_latency: float  # DRAM round trips of the loading warp iterations, overlapped by the resident warps
    t_compute: float  # instruction issue (or the busiest pipe)
    t_launch: float
    time: float
    bound: str  # "memory", "latency" or "compute" (for a sum of ops: each op's, joined by "+")
    pct_hbm_peak: float  # min_bytes at peak bandwidth / time
    instr_per_elem: float  # thread instructions on the hot paths per element (idle lanes included)
    warps: int  # resident warps per SM (the smallest of the op's kernels)
    tile: str = ""


def report_index(reports) -> dict:
    """{(backend, facts key, dtype, arch, block or None, PARTS or None): report}."""
    return {(r.backend, r.key, r.dtype, r.arch, r.block, r.parts): r for r in reports}


def estimate(op: str, backend: str, params, dtype: str, gpu: GPU, index: dict, model: str = "",
             assumptions: dict | None = None, grad_scale: bool = False) -> Estimate:
    """The estimated time of one op; ``index`` from :func:`report_index` (the kernels compiled for gpu.arch);
    ``grad_scale``: perturb_ rescaling the gradients."""
    a = {**ASSUMPTIONS, **(assumptions or {})}
    work = op_work(op, backend, params, dtype, grad_scale)
    issue_cycles = 0.0
    pipe_cycles = Counter()
    latency_its = 0.0
    warps_seen = []
    thread_instr = 0.0
    tp = PIPE_THROUGHPUT[_limits_arch(gpu.arch)]
    for r, path_name, its in _path_runs(work, backend, dtype, gpu.arch, index):
        path = r.paths[path_name]
        counts = path.pipes()
        issue_cycles += its * len(path)
        thread_instr += its * 32 * len(path)
        for pipe_name, n in counts.items():
            if pipe_name in tp:
                pipe_cycles[pipe_name] += its * n * 128 / tp[pipe_name]
        spec = next(p for p in r.facts.paths if p.name == path_name)
        if spec.waits or (spec.waits is None and any(acc.dram and acc.kind == "ld" for acc in path.accesses())):
            latency_its += its / r.warps
        warps_seen.append(r.warps)
    warps = min(warps_seen)
    per_scheduler = warps / SCHEDULERS_PER_SM
    efficiency = a["issue_efficiency"] * min(1.0, per_scheduler / a["warps_per_scheduler_for_full_issue"])
    cycles = max([issue_cycles, *pipe_cycles.values()])
    t_compute = cycles / (gpu.sms * SCHEDULERS_PER_SM * gpu.clock_hz * efficiency)
    t_memory = work.dram_bytes / gpu.hbm_bytes_per_s
    t_latency = latency_its * a["dram_latency_s"] / gpu.sms
    t_launch = work.launches * a["launch_s"]
    terms = {"memory": t_memory, "latency": t_latency, "compute": t_compute}
    bound = max(terms, key=terms.get)
    time = terms[bound] + t_launch
    return Estimate(gpu.name, model, dtype, backend, op, work.elements, work.launches, work.min_bytes, work.dram_bytes,
                    t_memory, t_latency, t_compute, t_launch, time, bound,
                    work.min_bytes / gpu.hbm_bytes_per_s / time, thread_instr / work.elements, warps,
                    _tile_label(work.tile))


def _path_runs(work: Work, backend: str, dtype: str, arch: int, index: dict):
    """(report, path name, warp iterations) for each path of ``work`` (its kernels from ``index``, compiled for
    ``arch``); a KeyError names a path with no analysis."""
    block, parts = (work.tile[0], work.tile[2]) if work.tile else (None, None)
    for (key, path_name), its in work.iterations.items():
        r = index.get((backend, key, dtype, arch, block, parts))
        if r is None or r.paths.get(path_name) is None:
            raise KeyError(f"no analysis of {backend} {key} {dtype} sm_{arch}"
                           f"{f' BLOCK={block}' if block else ''}{f' PARTS={parts}' if parts else ''} path {path_name}")
        yield r, path_name, its


@dataclass
class HotLoop:
    label: str  # the kernel and path, e.g. "perturb_kernel<bf16,false,false> update"
    instr_per_elem: float  # thread instructions per element on it
    share: float  # of the op's issue slots on the model


def hot_loop(op: str, backend: str, params, dtype: str, arch: int, index: dict) -> HotLoop:
    """The path that issues most of ``op``'s instructions on ``params`` (its hot loop), ``index`` from
    :func:`report_index` with the kernels for ``arch``."""
    slots = [(its * len(r.paths[path_name]), r, path_name)  # (issue slots, report, path name)
             for r, path_name, its in _path_runs(op_work(op, backend, params, dtype), backend, dtype, arch, index)]
    most, r, path_name = max(slots, key=lambda t: t[0])
    return HotLoop(f"{r.label} {path_name}", len(r.paths[path_name]) * r.runs(path_name) / r.facts.elems,
                   most / sum(t[0] for t in slots))


def normals_floor(index: dict, arch: int) -> float:
    """Instructions per element of the normals alone on ``arch``: the fewest that a noise_kernel of either backend
    spends (Philox and the header's polynomial Box-Muller, which the bits must follow, and one store)."""
    return min(r.instr_per_elem() for r in index.values() if r.key == "noise_kernel" and r.arch == arch)


def _tile_label(tile: tuple | None) -> str:
    """e.g. "1024/8", or "1024/8x5" for perturb_kernel keeping rows of up to 5 tiles in registers."""
    if not tile:
        return ""
    block, warps, parts = tile
    return f"{block}/{warps}" + (f"x{parts}" if (parts or 1) > 1 else "")


def combine(parts: list[Estimate], op: str, gpu: GPU) -> Estimate:
    """Ops run one after the other: times, bytes and launches add up."""
    first = parts[0]
    time = sum(p.time for p in parts)
    min_bytes = sum(p.min_bytes for p in parts)
    return Estimate(first.gpu, first.model, first.dtype, first.backend, op, first.elements,
                    sum(p.launches for p in parts), min_bytes, sum(p.dram_bytes for p in parts),
                    sum(p.t_memory for p in parts), sum(p.t_latency for p in parts), sum(p.t_compute for p in parts),
                    sum(p.t_launch for p in parts), time, "+".join(p.bound for p in parts),
                    min_bytes / gpu.hbm_bytes_per_s / time, sum(p.instr_per_elem for p in parts),
                    min(p.warps for p in parts), "+".join(p.tile for p in parts if p.tile))


OPS = ("perturb_", "sgd_step_")
STEP = "perturb_+sgd_step_"


def estimate_model(shapes, dtype: str, gpu: GPU, index: dict, backend: str, model: str = "",
                   assumptions: dict | None = None) -> list[Estimate]:
    """perturb_, sgd_step_ and the two together (one RWP step's optimizer side) for one model."""
    params = param_rows(shapes)
    parts = [estimate(op, backend, params, dtype, gpu, index, model, assumptions) for op in OPS]
    return parts + [combine(parts, STEP, gpu)]


def grad_scale_cost(shapes, dtype: str, gpu: GPU, index: dict, backend: str,
                    model: str = "") -> tuple[Estimate, Estimate, float]:
    """perturb_ without and with gradient rescaling (grad_scale != 1, which adds reading and writing the
    gradients to its floor), and what the rescaling costs beyond those bytes: how much further from its floor
    the op runs, ``(time / floor with it) / (time / floor without it) - 1``."""
    params = param_rows(shapes)
    plain = estimate("perturb_", backend, params, dtype, gpu, index, model)
    scaled = estimate("perturb_", backend, params, dtype, gpu, index, model, grad_scale=True)
    return plain, scaled, plain.pct_hbm_peak / scaled.pct_hbm_peak - 1


def assumption_lines(gpus=GPUS) -> list[str]:
    """The model's inputs and choices, one per line, for printing with every estimate."""
    lines = [f"{ESTIMATE_LABEL}: a roofline from the compiled SASS, not a measurement."]
    for g in gpus:
        lines.append(f"  {g.name}: sm_{g.arch}, HBM {g.hbm_bytes_per_s / 1e12:.3g} TB/s, {g.sms} SMs, "
                     f"{g.clock_hz / 1e9:.2f} GHz boost, L2 {g.l2_bytes >> 20} MB ({g.source})")
    for arch, lim in sorted(ARCH_LIMITS.items()):
        tp = PIPE_THROUGHPUT[arch]
        lines.append(f"  sm_{arch}: {lim.regs_per_sm} registers (per warp in units of {lim.reg_unit}), "
                     f"{lim.smem_per_sm // 1024} KB shared memory (+{lim.smem_reserved_per_block} B reserved per "
                     "block), "
                     f"{lim.max_warps} warps, {lim.max_blocks} blocks per SM; results per clock per SM: "
                     + ", ".join(f"{k} {v}" for k, v in tp.items()) + " (CUDA C++ Programming Guide)")
    a = ASSUMPTIONS
    lines += [
        "  time = max(memory, latency, compute) + launches x launch overhead; % of HBM peak = the floor (each tensor "
        "read or written once: perturb_ 3, sgd_step_ 5 passes per element) at peak bandwidth / time",
        "  memory: the bytes the kernels' structure moves (DRAM passes per element table) at 100 % of peak bandwidth",
        f"  latency: every warp iteration that loads from DRAM waits {a['dram_latency_s'] * 1e9:.0f} ns (loaded DRAM "
        "latency, assumed); the resident warps of an SM overlap their waits",
        f"  compute: hot-path warp instructions, each taking an issue slot or its pipe's cycles if more, at "
        f"{a['issue_efficiency']:.0%} of 4 issues per SM per clock with >= {a['warps_per_scheduler_for_full_issue']} "
        "resident warps per scheduler (proportionally less below); idle lanes of partial warps and tiles count; so "
        "does each block's or program's overhead, once per warp: its cheapest path outside the loops (the table "
        "reads, the row's reduction and sigma) and, in CUDA, BlockSum's tree once per level and the first warp's "
        "bisection of the table for the block's parameter once per halving (a row's path includes the store of its "
        "result, the sigma or a segment's partial sums, by one CUDA thread or Triton lane); "
        "a row kept in registers counts the program of a one-tile row, then what each "
        "further tile adds; packed short rows, their segmented scan",
        f"  launch overhead {a['launch_s'] * 1e6:.0f} us per kernel launch (one per op and dtype here)",
        "  configuration: exact mode (backups), grad_scale 1 (gradients untouched), SGD with momentum after the first "
        "step and weight decay, no ARWP, contiguous 16-byte aligned tensors; one dtype per call",
    ]
    return lines


# ---- a real GPU (bench_ops.py --device cuda) ---------------------------------------------------------------------

def gpu_from_device(device=None) -> tuple[GPU, str]:
    """The figures of a local GPU from its device properties (HBM: memory clock x 2 x bus width; SMs; boost
    clock), any missing one from the tabulated GPU whose name it contains."""
    import torch

    props = torch.cuda.get_device_properties(device)
    known = next((g for g in GPUS if g.name.split("-")[0] in props.name), None)
    arch = props.major * 10 + props.minor
    bw = getattr(props, "memory_clock_rate", 0) * 1e3 * 2 * getattr(props, "memory_bus_width", 0) / 8
    clock = getattr(props, "clock_rate", 0) * 1e3
    fallback = known or GPU(props.name, arch, 1e12, props.multi_processor_count, 1.5e9, 0, "a guess")
    gpu = GPU(props.name, arch, bw or fallback.hbm_bytes_per_s, props.multi_processor_count or fallback.sms,
              clock or fallback.clock_hz, getattr(props, "L2_cache_size", 0) or fallback.l2_bytes,
              "torch.cuda.get_device_properties" + (f", else the {known.name} spec sheet" if known else ""))
    return gpu, f"{props.name} (sm_{arch}): figures from its device properties"


def device_model(backends=("cuda",), dtypes=("fp32",), device=None) -> tuple[GPU, str, dict, list[str]]:
    """For the local GPU: its spec, where that comes from, the report index of the kernels compiled for its
    architecture (``backends``: "cuda", "triton"), and an error line per backend that could not be analyzed."""
    gpu, source = gpu_from_device(device)
    reports, errors = [], []
    if "cuda" in backends:
        try:
            reports += analyze_cuda(gpu.arch, tuple(dtypes))
        except Exception as err:  # noqa: BLE001 - no nvcc, an unknown architecture: reported
            errors.append(f"cuda: {type(err).__name__}: {err}"[:500])
    if "triton" in backends:
        try:
            found, failed = analyze_triton(triton_specs((gpu.arch,), tuple(dtypes)))
            reports += found
            errors += [f"triton: {e}" for e in failed]
        except ImportError as err:
            errors.append(f"triton: {err}")
    return gpu, source, report_index(reports), errors
