"""Reading SASS (the text ``cuobjdump -sass`` prints): functions, basic blocks, loops, memory accesses,
execution pipes, and the cheapest path through a loop body or a function that does a stated amount of work.

Pure functions on text, no GPU and no tools needed (``rwp_kernels.gpu_model`` runs the compilers and
``cuobjdump``); ``tests/test_gpu_model.py`` checks them on a canned listing.

A loop is a backward branch: a ``BRA`` at address ``tail`` to ``head <= tail``; its body is the address
range ``[head, tail]``. A path through a loop body runs from ``head`` to the back-edge branch at ``tail``
along forward edges inside the body (an inner loop's body is counted once); a path through a function
runs from its first instruction to an ``EXIT``. Which path a kernel takes depends on run-time values
(alignment, optional tensors); :func:`cheapest_path` picks the shortest one (fewest instructions) that
contains at least the required number of tagged instructions (see :func:`tags`), e.g. two 128-bit
stores and the Philox multiplies for the perturbation loop.
"""
import re
from collections import Counter
from dataclasses import dataclass, field

# Philox4x32's two multipliers, as SASS prints them in an instruction's immediates (signed or unsigned).
PHILOX_MULTIPLIERS = (0xD2511F53, 0xCD9E8D57)
_PHILOX_IMMEDIATES = {f"0x{m:x}" for m in PHILOX_MULTIPLIERS} | {f"-0x{(1 << 32) - m:x}" for m in PHILOX_MULTIPLIERS}

_FUNCTION = re.compile(r"^\s*Function\s*:\s*(\S+)\s*$", re.M)
_INSTRUCTION = re.compile(r"/\*([0-9a-fA-F]{4,})\*/\s+(.*?)\s*;")
_HEX = re.compile(r"^-?0x[0-9a-fA-F]+$")


@dataclass(frozen=True)
class Instr:
    addr: int
    guard: str  # the predicate guard without "@" ("P0", "!P3", "UP1"), or "" when unconditional
    opcode: str  # with modifiers, e.g. "LD.E.128", "IMAD.WIDE.U32"
    operands: str

    @property
    def base(self) -> str:
        """The opcode without modifiers ("LD" for "LD.E.128")."""
        return self.opcode.split(".", 1)[0]

    @property
    def modifiers(self) -> tuple[str, ...]:
        return tuple(self.opcode.split(".")[1:])

    @property
    def guarded(self) -> bool:
        return self.guard not in ("", "PT")

    def __str__(self) -> str:
        guard = f"@{self.guard} " if self.guard else ""
        return f"/*{self.addr:04x}*/ {guard}{self.opcode} {self.operands}".rstrip()


def parse_instructions(text: str) -> list[Instr]:
    """The instructions of one function's listing, in address order."""
    out = []
    for addr, body in _INSTRUCTION.findall(text):
        guard = ""
        if body.startswith("@"):
            guard, _, body = body[1:].partition(" ")
            body = body.strip()
        opcode, _, operands = body.partition(" ")
        out.append(Instr(int(addr, 16), guard, opcode, operands.strip()))
    return out


def parse_sass(text: str) -> dict[str, list[Instr]]:
    """``cuobjdump -sass`` output -> {function name: instructions}. Several cubins' listings may be joined."""
    parts = _FUNCTION.split(text)
    return {name: parse_instructions(body) for name, body in zip(parts[1::2], parts[2::2])}


# ---- control flow ----------------------------------------------------------------------------------------

_TERMINAL = {"EXIT", "RET", "BPT", "KILL"}
_BRANCHES = {"BRA", "JMP", "BRX", "JMX"}


def branch_target(ins: Instr) -> int | None:
    """The address a direct branch goes to, or None (not a branch, or an indirect one)."""
    if ins.base not in ("BRA", "JMP"):
        return None
    last = ins.operands.split(",")[-1].strip().strip("`()")
    return int(last, 16) if _HEX.match(last) else None


def is_conditional(ins: Instr) -> bool:
    """A branch that may fall through: a guard, a predicate operand (``BRA P4, 0x..``) or ``.DIV``/``.CONV``."""
    if ins.guarded:
        return True
    ops = [o.strip() for o in ins.operands.split(",")]
    return len(ops) > 1 or any(m in ("DIV", "CONV") for m in ins.modifiers)


@dataclass(frozen=True)
class Loop:
    head: int  # the branch target: first instruction of the body
    tail: int  # the backward branch: last instruction of the body

    def contains(self, addr: int) -> bool:
        return self.head <= addr <= self.tail

    def within(self, other: "Loop") -> bool:
        return other.head <= self.head and self.tail <= other.tail and self != other


def find_loops(instrs: list[Instr]) -> list[Loop]:
    """Every backward branch, as a loop [target, branch]; an unconditional branch to itself (the trap
    ``BRA`` after the last ``EXIT``) is not a loop."""
    loops = []
    for ins in instrs:
        target = branch_target(ins)
        if target is None or target > ins.addr:
            continue
        if target == ins.addr and not is_conditional(ins):
            continue
        loops.append(Loop(target, ins.addr))
    return sorted(set(loops), key=lambda lp: (lp.head, lp.tail))


def innermost(loops: list[Loop]) -> list[Loop]:
    return [lp for lp in loops if not any(other.within(lp) for other in loops)]


@dataclass
class Block:
    start: int
    instrs: list[Instr]
    succs: list[int] = field(default_factory=list)  # start addresses of the successor blocks
    exits: bool = False  # ends in an EXIT (a path through a function may end here)

    @property
    def end(self) -> int:
        return self.instrs[-1].addr


def basic_blocks(instrs: list[Instr]) -> dict[int, Block]:
    """Basic blocks by start address: leaders are the first instruction, branch targets and whatever follows
    a branch or an EXIT/RET."""
    if not instrs:
        return {}
    addrs = {i.addr for i in instrs}
    leaders = {instrs[0].addr}
    for k, ins in enumerate(instrs):
        target = branch_target(ins)
        if target is not None and target in addrs:
            leaders.add(target)
        if (ins.base in _BRANCHES or ins.base in _TERMINAL) and k + 1 < len(instrs):
            leaders.add(instrs[k + 1].addr)
    blocks, current = {}, None
    for ins in instrs:
        if ins.addr in leaders:
            current = blocks[ins.addr] = Block(ins.addr, [])
        current.instrs.append(ins)
    starts = sorted(blocks)
    for n, start in enumerate(starts):
        block = blocks[start]
        last = block.instrs[-1]
        fall = starts[n + 1] if n + 1 < len(starts) else None
        target = branch_target(last)
        if last.base in _TERMINAL:
            block.exits = last.base == "EXIT"
            block.succs = [fall] if last.guarded and fall is not None else []
        elif last.base in _BRANCHES:
            succs = [target] if target in blocks else []
            if is_conditional(last) and fall is not None:
                succs.append(fall)
            block.succs = succs
        elif fall is not None:
            block.succs = [fall]
    return blocks


# ---- what an instruction does ----------------------------------------------------------------------------

_SPACE = {"LDG": ("ld", "global"), "STG": ("st", "global"), "LD": ("ld", "generic"), "ST": ("st", "generic"),
          "LDS": ("ld", "shared"), "STS": ("st", "shared"), "LDL": ("ld", "local"), "STL": ("st", "local"),
          "ATOM": ("atom", "generic"), "ATOMG": ("atom", "global"), "RED": ("atom", "global"),
          "REDG": ("atom", "global"), "ATOMS": ("atom", "shared"), "LDGSTS": ("ld", "global")}
_WIDTHS = {"U8": 8, "S8": 8, "U16": 16, "S16": 16, "32": 32, "64": 64, "128": 128}


@dataclass(frozen=True)
class Access:
    kind: str  # "ld", "st" or "atom"
    space: str  # "global", "generic" (LD/ST through a generic pointer: global memory here), "shared", "local"
    bits: int
    predicated: bool

    @property
    def label(self) -> str:
        """e.g. "LD.128", "STG.32", "LDS.128" """
        name = {("ld", "global"): "LDG", ("st", "global"): "STG", ("ld", "generic"): "LD", ("st", "generic"): "ST",
                ("ld", "shared"): "LDS", ("st", "shared"): "STS", ("ld", "local"): "LDL",
                ("st", "local"): "STL"}.get((self.kind, self.space), self.kind.upper())
        return f"{name}.{self.bits}"

    @property
    def dram(self) -> bool:
        """An access to global memory (global or generic address space)."""
        return self.space in ("global", "generic")


def memory_access(ins: Instr) -> Access | None:
    """The memory access an instruction makes (None for constant-bank loads and non-memory instructions)."""
    kind_space = _SPACE.get(ins.base)
    if kind_space is None:
        return None
    bits = 32
    for m in ins.modifiers:
        bits = _WIDTHS.get(m, bits)
    return Access(*kind_space, bits, ins.guarded)


def is_philox_multiply(ins: Instr) -> bool:
    """An integer multiply by one of Philox4x32's multipliers (the noise generator's inner step)."""
    if not ins.base.startswith("IMAD") and ins.base != "IMUL":
        return False
    return any(op.strip() in _PHILOX_IMMEDIATES for op in ins.operands.split(","))


def tags(ins: Instr) -> Counter:
    """What a path requirement can count: ``ld<bits>`` / ``st<bits>`` for global (and generic) accesses and
    the same with a ``p`` suffix when predicated (Triton's masked element accesses), ``ld<bits>@<offset>``
    for an unpredicated load at an immediate offset (a column of a table row), ``lds<bits>`` /
    ``sts<bits>`` for shared memory, ``philox`` for a Philox multiply, ``call`` for an unconditional subroutine
    call (the slow paths of sqrt and division; a guarded ``CALL.REL.NOINC`` is how sm_80 code leaves a loop),
    ``shfl_up`` for a ``SHFL.UP`` (Triton's scans)."""
    out = Counter()
    acc = memory_access(ins)
    if acc is not None:
        if acc.dram:
            out[f"{acc.kind}{acc.bits}"] += 1
            if acc.predicated:
                out[f"{acc.kind}{acc.bits}p"] += 1
            offset = re.search(r"\[U?R\d+(?:\.64)?\+(0x[0-9a-f]+)\]", ins.operands)
            if acc.kind == "ld" and not acc.predicated and offset:
                out[f"ld{acc.bits}@{offset[1]}"] += 1  # a field of a table row (Triton's tables)
        elif acc.space == "shared":
            out[f"{acc.kind}s{acc.bits}"] += 1
    if is_philox_multiply(ins):
        out["philox"] += 1
    if ins.base == "CALL" and not ins.guarded:  # a guarded CALL.REL.NOINC past the back edge is sm_80's loop exit
        out["call"] += 1
    if ins.base == "SHFL" and "UP" in ins.modifiers:  # a scan's step (reductions shuffle with BFLY)
        out["shfl_up"] += 1
    return out


# Execution pipes. Throughputs per SM and clock are in rwp_kernels.gpu_model (from the CUDA C++ Programming
# Guide's table of arithmetic instruction throughput); "issue" instructions take an issue slot only.
_PIPES = {
    "fp32": ("FADD", "FMUL", "FFMA", "FSETP", "FSEL", "FMNMX", "FSET", "FCHK", "FSWZADD", "HADD2", "HMUL2", "HFMA2",
             "HSETP2", "HMNMX2", "I2FP", "F2FP", "FMUL2", "FADD2", "FFMA2"),
    "alu": ("IADD3", "IADD", "LOP3", "LOP", "SHF", "SHL", "SHR", "ISETP", "LEA", "SEL", "PRMT", "IABS", "IMNMX",
            "MOV", "CS2R", "P2R", "R2P", "PLOP3", "VIADD", "VIADDMNMX", "VIMNMX", "BMSK", "SGXT", "R2UR", "IDP",
            "ICMP", "VOTE"),
    "imad": ("IMAD", "IMUL", "IMADSP"),
    "fp64": ("DADD", "DMUL", "DFMA", "DSETP", "DMNMX", "DSET"),
    "xu": ("MUFU", "F2I", "I2F", "F2F", "FRND", "POPC", "FLO", "BREV", "I2I", "F2IP"),
    "lsu": ("LD", "ST", "LDG", "STG", "LDS", "STS", "LDL", "STL", "ATOM", "ATOMG", "ATOMS", "RED", "REDG", "LDSM",
            "LDGSTS", "SHFL", "MATCH", "MEMBAR", "CCTL", "LDC", "S2R", "ERRBAR", "FENCE", "STSM"),
}
_PIPE_OF = {op: pipe for pipe, ops in _PIPES.items() for op in ops}


def pipe(ins: Instr) -> str:
    """The execution pipe of an instruction: fp32, alu (integer and logic), imad (integer multiply), fp64,
    xu (transcendentals and conversions), lsu (memory), uniform (U* and S2UR: one per warp), or issue
    (branches, barriers, convergence, NOP: an issue slot and nothing else)."""
    if ins.base.startswith("U") or ins.base == "S2UR":
        return "uniform"
    return _PIPE_OF.get(ins.base, "issue")


# ---- paths -----------------------------------------------------------------------------------------------

@dataclass
class Path:
    instrs: list[Instr]
    region: str  # "loop 0x2630-0x43b0" or "function"
    body_instrs: int  # static size of the region (a loop's body, or the function outside loops)

    def __len__(self) -> int:
        return len(self.instrs)

    def accesses(self) -> list[Access]:
        return [a for a in map(memory_access, self.instrs) if a is not None]

    def widths(self, dram_only: bool = True) -> Counter:
        """Memory instructions on the path by label ("LD.128": 2)."""
        return Counter(a.label for a in self.accesses() if a.dram or not dram_only)

    def pipes(self) -> Counter:
        return Counter(map(pipe, self.instrs))

    def tags(self) -> Counter:
        total = Counter()
        for ins in self.instrs:
            total.update(tags(ins))
        return total


def cheapest_path(instrs: list[Instr], require: dict[str, int], *, loop: Loop | None = None,
                  avoid: tuple[str, ...] = ("call",), outside: list[Loop] = ()) -> Path | None:
    """The shortest path (fewest instructions) through ``loop``'s body (head to its back-edge branch), or
    through the function (first instruction to an EXIT, through no block inside a loop of ``outside``),
    whose instructions carry at least ``require[tag]`` of each tag and none of ``avoid``'s; None if no
    path does."""
    blocks = basic_blocks(instrs)
    if not blocks:
        return None
    if loop is not None:
        region = {s: b for s, b in blocks.items() if loop.contains(s)}
        start = loop.head
        is_end = lambda b: b.end == loop.tail  # noqa: E731
        label, body = f"loop 0x{loop.head:x}-0x{loop.tail:x}", sum(1 for i in instrs if loop.contains(i.addr))
    else:
        region = {s: b for s, b in blocks.items() if not any(lp.contains(s) for lp in outside)}
        start = instrs[0].addr
        is_end = lambda b: b.exits  # noqa: E731
        label, body = "function", sum(len(b.instrs) for b in region.values())
    if start not in region:
        return None
    keys = sorted(require)
    block_tags = {}
    for s, b in region.items():
        t = Counter()
        for ins in b.instrs:
            t.update(tags(ins))
        block_tags[s] = t
    usable = {s for s in region if not any(block_tags[s][a] for a in avoid)}
    if start not in usable:
        return None

    def add(state, s):
        """The counts so far plus block s's, capped at the requirement (states stay few)."""
        return tuple(min(require[k], have + block_tags[s][k]) for k, have in zip(keys, state))

    # best[block][state] = (instructions so far, previous (block, state)); blocks in address order = a
    # topological order of the forward edges.
    best = {s: {} for s in usable}
    best[start][add(tuple(0 for _ in keys), start)] = (len(region[start].instrs), None)
    goal = tuple(require[k] for k in keys)
    done = None
    for s in sorted(usable):
        block = region[s]
        for state, (cost, _) in list(best[s].items()):
            if is_end(block) and state == goal and (done is None or cost < done[0]):
                done = (cost, s, state)
            for nxt in block.succs:
                if nxt is None or nxt <= s or nxt not in usable:
                    continue
                new = add(state, nxt)
                total = cost + len(region[nxt].instrs)
                if new not in best[nxt] or total < best[nxt][new][0]:
                    best[nxt][new] = (total, (s, state))
    if done is None:
        return None
    chain, node = [], (done[1], done[2])
    while node is not None:
        chain.append(node[0])
        node = best[node[0]][node[1]][1]
    path = [ins for s in reversed(chain) for ins in region[s].instrs]
    return Path(path, label, body)


def path_difference(path: Path, less: Path) -> Path:
    """The instructions of ``path`` that are not on ``less`` (by address): what ``path`` does beyond it."""
    seen = {ins.addr for ins in less.instrs}
    return Path([ins for ins in path.instrs if ins.addr not in seen], f"{path.region} beyond {len(less)}", len(path))


def loops_meeting(instrs: list[Instr], require: dict[str, int],
                  avoid: tuple[str, ...] = ("call",)) -> list[tuple[Loop, Path]]:
    """The loops with a path that meets ``require``, with that path, largest body first."""
    found = []
    for lp in find_loops(instrs):
        path = cheapest_path(instrs, require, loop=lp, avoid=avoid)
        if path is not None:
            found.append((lp, path))
    return sorted(found, key=lambda lp_path: -lp_path[1].body_instrs)


# ---- resource usage --------------------------------------------------------------------------------------

def parse_res_usage(text: str) -> dict[str, dict[str, int]]:
    """``cuobjdump -res-usage`` -> {function: {"REG": .., "STACK": .., "SHARED": .., "LOCAL": ..}}."""
    out = {}
    for name, fields in re.findall(r"Function\s+(\S+?):\s*\n\s*(REG:.*)", text):
        out[name] = {k: int(v) for k, v in re.findall(r"([A-Z]+(?:\[\d+\])?):(\d+)", fields)}
    return out


def parse_ptxas_verbose(text: str) -> dict[str, dict[str, int]]:
    """``ptxas -v`` (or ``nvcc -Xptxas -v``) log -> {function: {"registers", "spill_stores", "spill_loads",
    "stack", "smem"}} (the last arch compiled wins for a function compiled for several)."""
    out, current = {}, None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '([^']+)'", line) or re.search(r"Function properties for (\S+)", line)
        if m:
            current = out.setdefault(m[1], {})
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            current.update(stack=int(m[1]), spill_stores=int(m[2]), spill_loads=int(m[3]))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            current["registers"] = int(m[1])
            s = re.search(r"(\d+) bytes smem", line)
            current["smem"] = int(s[1]) if s else 0
    return out


_TEMPLATE_ARGS = (("NS1_9bf16_bitsE", "bf16"), ("NS1_9half_bitsE", "fp16"), ("f", "fp32"), ("Lb0E", "false"),
                  ("Lb1E", "true"))


_LENGTH_PREFIXED = re.compile(r"(\d+)([A-Za-z_])")  # a part of a mangled name: its length, then its first character


def short_name(mangled: str) -> str:
    """A readable name for this project's kernels (``perturb_kernel<bf16,false,true>``, ``sgd_kernel<fp32>``,
    ``noise_kernel``); other names come back unchanged. The mangled name's length-prefixed parts are read left to
    right, each skipped whole: the anonymous namespace's part holds a hash of the source's path whose digits
    may read as another length (``_GLOBAL__N__50b6a524_...``)."""
    pos = 0
    while (m := _LENGTH_PREFIXED.search(mangled, pos)) is not None:
        n = int(m[1])
        name = mangled[m.start(2):m.start(2) + n]
        pos = m.start(2) + n
        if len(name) != n or not name.endswith("_kernel"):
            continue
        rest = mangled[m.start(2) + n:]
        if not rest.startswith("I"):
            return name
        rest, args = rest[1:], []
        while rest and not rest.startswith("E"):
            for code, text in _TEMPLATE_ARGS:
                if rest.startswith(code):
                    args.append(text)
                    rest = rest[len(code):]
                    break
            else:
                return mangled
        return f"{name}<{','.join(args)}>"
    return mangled
