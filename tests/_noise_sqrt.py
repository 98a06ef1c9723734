"""The noise's square root in PTX and SASS. csrc/rwp_common.h's CUDA ``vsqrt`` and Triton's
``rounding.noise_sqrt`` paste the same inline PTX: the fast path of nvcc's ``sqrt.rn.f32`` without its range
check and branch. Its approximate reciprocal root and flush-to-zero multiplies are the only ones the rounding
checks allow, and only in that block; ``stored_value`` reads what a small SASS function computes, so a test can
compare the block with ``sqrtf``'s own fast path."""
import re

NOISE_SQRT_OPS = ["max.f32", "rsqrt.approx.ftz.f32", "mul.ftz.f32", "mul.ftz.f32", "neg.f32", "fma.rn.f32",
                  "fma.rn.f32"]
_INLINE = re.compile(r"//\s*begin inline asm\n(.*?)//\s*end inline asm\n?", re.S)
_INSTRUCTION = re.compile(r"^\s*(?:@!?%p\d+\s+)?([a-z][a-z0-9]*(?:\.[a-z0-9]+)*)", re.M)
_APPROXIMATE = re.compile(r"\.approx\b|^div\.full\b|\.ftz\b")


def instructions(ptx: str) -> list[str]:
    """The opcodes of ``ptx``'s instructions, in order (``fma.rn.f32``; a predicate guard left out)."""
    return _INSTRUCTION.findall(ptx)


def approximate(ops: list[str]) -> list[str]:
    """The distinct opcodes among ``ops`` that approximate or flush subnormals to zero."""
    return sorted({op for op in ops if _APPROXIMATE.search(op)})


def without_noise_sqrt(ptx: str) -> tuple[str, int]:
    """``ptx`` without its inline blocks of the noise's square root, and how many it had."""
    found = 0

    def drop(block: re.Match) -> str:
        nonlocal found
        if instructions(block[1]) != NOISE_SQRT_OPS:
            return block[0]
        found += 1
        return ""

    return _INLINE.sub(drop, ptx), found


def _operand(regs: dict, text: str) -> str:
    text = text.strip()
    negated = text.startswith("-")
    name = text.lstrip("-")
    value = regs.get(name, name)  # a register's expression, or the immediate itself
    return f"-{value}" if negated else value


def stored_value(instrs) -> str:
    """The expression of the float value a straight-line SASS function (``rwp_kernels.sass.Instr`` list) loads
    with ``LDG`` (``x``) and stores with ``STG``, following every branch, conditional ones taken. Multiplicands
    are sorted, so ``a * b`` and ``b * a`` read the same."""
    regs, by_addr = {}, {ins.addr: i for i, ins in enumerate(instrs)}
    i = 0
    while i < len(instrs):
        ins = instrs[i]
        ops = [o.strip() for o in ins.operands.split(",")]
        if ins.base == "BRA":
            i = by_addr[int(ops[-1], 16)]
            continue
        if ins.base == "STG":
            return regs[ops[-1]]
        args = [_operand(regs, o) for o in ops[1:]]
        if ins.base == "LDG":
            regs[ops[0]] = "x"
        elif ins.opcode == "FMNMX" and ops[-1] == "!PT":
            regs[ops[0]] = f"max({args[0]}, {args[1]})"
        elif ins.opcode == "MUFU.RSQ":
            regs[ops[0]] = f"rsq({args[0]})"
        elif ins.base == "FMUL":
            regs[ops[0]] = f"{ins.opcode}({', '.join(sorted(args))})"
        elif ins.base == "FFMA":
            regs[ops[0]] = f"{ins.opcode}({', '.join(sorted(args[:2]))}; {args[2]})"
        elif ops and re.fullmatch(r"R\d+", ops[0]):
            regs[ops[0]] = f"<{ins.opcode}>"
        i += 1
    raise AssertionError("no STG")
