"""Ahead-of-time compilation of every Triton kernel specialization the launchers can produce; no GPU needed.

Triton's JIT compiles one specialization per kernel, constexprs (DTYPE, BLOCK), launch options (num_warps,
``tables.COMPILE_OPTIONS``) and argument specialization: an integer argument is i32 or i64 by its value
(and, unless ``do_not_specialize``, a separate variant when it equals 1 or is divisible by 16), a pointer
gets ``tt.divisibility 16`` when its address is 16-byte aligned (unless ``do_not_specialize_on_alignment``).
The kernels keep that set small and known: every integer argument is ``do_not_specialize``, and the
pointers whose tensors can come from the caller at any address (one-element scale and found_inf tensors,
the sigmas given to restore_, the counters and keys of the raw Philox op) are
``do_not_specialize_on_alignment``; every other pointer is a table or buffer the launcher allocates
(16-byte aligned). Alignment of the parameters' own tensors is not a specialization: the kernels branch at run
time into their vectorized path (``tables.vector_item``). What remains varies: the dtype, the tile
(``tables.kernel_tiles``: by the dtype's size; float32 two tiles, 16-bit types one, the perturb_ kernels the
smallest) and, for the kernels that take sizes and offsets as Python ints (``INDEX``, ``SIZE`` below), i32 or i64
for each of them independently (an i64 size only with the menu's largest tile). ``specializations()`` lists all
of them (sm_80 and sm_90: 54); ``compile_inputs`` gives the exact signature, constexprs, attributes and options
the JIT would use, and ``jit_compile_inputs`` computes the same from a real launch's arguments, with the JIT's
own binder: tests/test_triton_aot.py runs the launchers on many argument sets and checks that each launch is one
of ``specializations()``.

Each specialization is compiled for each target with ``triton.compile(ASTSource(...), target=GPUTarget("cuda",
cc, 32))``. Registers, stack and shared memory are read from the cubin with the ``cuobjdump -res-usage``
that ships with Triton, the SASS instruction count with ``cuobjdump -sass``; spill bytes come from the
same ``ptxas -v`` run that Triton makes (same flags). ``python -m rwp_kernels.triton.aot`` prints the
table and exits with status 1 on any spill or compile failure (about 90 s on 2 cores without Triton's
cache). The options are the launchers' (``tables.kernel_options``: no fp fusion, and ``maxnreg`` where
``tables.MAX_REGISTERS`` caps a kernel's registers). Run it without TRITON_INTERPRET=1: interpreted kernels
cannot be compiled.
"""
import argparse
import importlib
import inspect
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass

ARCHS = (80, 90)
DTYPES = ("fp32", "fp16", "bf16")
INDEX_TYPES = ("i32", "i64")

# A size or an offset passed as a Python int: i32 below 2**31, else i64. A SIZE of 2**31 or more takes more
# than any tile, so the launcher picks the largest tile (tables.choose_tile): i64 sizes only come with it.
INDEX, SIZE = "index", "size"
_KERNEL_ARGS = {
    # kernel name -> (module, argument types in order); DTYPE and BLOCK are the constexprs.
    "philox_kernel": ("noise", ["*i64", "*i64", "*i64", SIZE]),
    "noise_kernel": ("noise", ["*fp32", INDEX, SIZE, "i32", "i32", "i32", "i32"]),
    "perturb_kernel": ("perturb", ["*i64", "*i64", "*fp64", "*fp32", "*fp64", "fp32", "*fp32", "i32", "i32", "i32"]),
    "perturb_elementwise_kernel": ("perturb", ["*i64", "*i64", "*fp64", "*fp32", "*fp64", "fp32", "*fp32", "i32", "i32",
                                               "i32"]),
    "perturb_elementwise_unaligned_kernel": ("perturb", ["*i64", "*i64", "*fp64", "*fp32", "*fp64", "fp32", "*fp32",
                                                         "i32", "i32", "i32"]),
    "row_partials_kernel": ("perturb", ["*i64", "*i64", "*fp64"]),
    "restore_kernel": ("restore", ["*i64", "*i64", "*fp32", "i32", "i32", "i32", "fp32", "fp32", "*fp32", "fp32",
                                   "*fp32", "fp32", "*fp32"]),
    "sgd_step_kernel": ("sgd_step", ["*i64", "*i64", "fp32", "fp32", "fp32", "fp32", "i32", "i32", "i32", "*fp32",
                                     "fp32", "fp32", "*fp32", "fp32", "*fp32", "fp32", "*fp32"]),
}
KERNELS = tuple(_KERNEL_ARGS)
_TL_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
ITEMSIZE = {None: 4, "fp32": 4, "fp16": 2, "bf16": 2}  # the tile menu's key (no dtype: float32's tiles)


@dataclass(frozen=True)
class Spec:
    kernel: str
    dtype: str | None  # the parameters' dtype; None for kernels without one
    block: int
    num_warps: int
    arch: int
    index: str | None = None  # the INDEX arguments' types, comma-separated (e.g. "i64,i32"); None if none
    parts: int | None = None  # perturb_kernel's PARTS (tables.RESIDENT_PARTS); None for the other kernels

    @property
    def label(self) -> str:
        names = [n for n, t in zip(_arg_names(self.kernel), _KERNEL_ARGS[self.kernel][1]) if t in (INDEX, SIZE)]
        index = " ".join(f"{n}={t}" for n, t in zip(names, self.index.split(","))) if self.index else ""
        variant = " ".join(v for v in (self.dtype, index, f"PARTS={self.parts}" if (self.parts or 1) > 1 else "") if v)
        return f"{self.kernel} {variant} BLOCK={self.block} warps={self.num_warps} sm_{self.arch}".replace("  ", " ")


@dataclass(frozen=True)
class Result:
    spec: Spec
    registers: int = -1
    stack_bytes: int = -1
    shared_bytes: int = -1
    spill_store_bytes: int = -1
    spill_load_bytes: int = -1
    sass_instructions: int = -1
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error and self.spill_store_bytes == 0 and self.spill_load_bytes == 0


def _kernel(name: str):
    module_name, _ = _KERNEL_ARGS[name]
    return getattr(importlib.import_module(f"{__package__}.{module_name}"), name)


def _arg_names(name: str) -> list[str]:
    """The kernel's non-constexpr argument names (also when the kernels are interpreted)."""
    return [n for n in inspect.signature(_kernel(name).fn).parameters if n not in ("DTYPE", "BLOCK", "PARTS")]


def specializations(archs=ARCHS) -> list[Spec]:
    """Every specialization the launchers can produce, per target (the tiles of each dtype: ``tables.TILE_MENUS``;
    the noise and Philox kernels, which have none, float32's; perturb_kernel also keeps rows of up to
    ``tables.RESIDENT_PARTS`` tiles in registers; the perturb_ kernels have only the smallest tile)."""
    from .tables import kernel_tiles

    specs = []
    for arch in archs:
        for kernel in KERNELS:
            kinds = [t for t in _KERNEL_ARGS[kernel][1] if t in (INDEX, SIZE)]
            dtypes = DTYPES if kernel not in ("philox_kernel", "noise_kernel") else (None,)
            for dtype in dtypes:
                menu = kernel_tiles(kernel, ITEMSIZE[dtype])
                for i, (block, warps) in enumerate(menu):
                    indices = [",".join(c) for c in itertools.product(INDEX_TYPES, repeat=len(kinds))
                               if i == len(menu) - 1 or all(k != SIZE or t == "i32" for k, t in zip(kinds, c))]
                    specs += [Spec(kernel, dtype, block, warps, arch, index or None, parts)
                              for index in indices for parts in _parts(kernel, dtype)]
    return specs


def _parts(kernel: str, dtype: str | None) -> tuple:
    """perturb_kernel's PARTS (1, and ``tables.RESIDENT_PARTS`` where the dtype has it); None elsewhere."""
    from .tables import RESIDENT_PARTS

    if kernel != "perturb_kernel":
        return (None,)
    resident = RESIDENT_PARTS.get(ITEMSIZE[dtype])
    return (1, resident) if resident else (1,)


def compile_inputs(spec: Spec):
    """(kernel, signature, constexprs, attrs, options) of ``spec``, as the JIT builds them for a launch."""
    import triton

    from .tables import kernel_options

    kernel = _kernel(spec.kernel)
    if not isinstance(kernel, triton.runtime.JITFunction):
        raise RuntimeError("the kernels are interpreted (TRITON_INTERPRET=1): unset it to compile")
    types = _KERNEL_ARGS[spec.kernel][1]
    index = iter(spec.index.split(",") if spec.index else ())
    params = [p for p in kernel.params if not p.is_constexpr]
    signature = {}
    for p, t in zip(params, types, strict=True):
        t = next(index) if t in (INDEX, SIZE) else t
        if t[0] in "iu" and not p.do_not_specialize:
            raise RuntimeError(f"{spec.kernel}: the JIT specializes integer argument {p.name} on its value (== 1, "
                               f"divisible by 16): mark it do_not_specialize or list those variants here")
        signature[p.name] = t
    constexprs = {"BLOCK": spec.block, **({"PARTS": spec.parts} if spec.parts else {})}
    if spec.dtype is not None:
        constexprs["DTYPE"] = getattr(triton.language, _TL_DTYPES[spec.dtype])
    # In the kernel's argument order, as the JIT builds it.
    signature = {p.name: "constexpr" if p.is_constexpr else signature[p.name] for p in kernel.params}
    # The JIT marks a pointer 16-byte aligned when its address is; the launcher's own tables and buffers always
    # are (torch's allocator), the caller's tensors are not specialized on it (do_not_specialize_on_alignment).
    attrs = {(kernel.arg_names.index(p.name),): [["tt.divisibility", 16]] for p in params
             if signature[p.name].startswith("*") and not p.do_not_specialize_on_alignment}
    options = {"num_warps": spec.num_warps, **kernel_options(spec.kernel, ITEMSIZE[spec.dtype], spec.parts or 1)}
    return kernel, signature, constexprs, attrs, options


def _key(kernel, signature, constexprs, attrs, options) -> tuple:
    """A comparable form of what the compiler gets (paths are turned into argument names)."""
    def name(k):
        return kernel.arg_names[k[0]] if isinstance(k, tuple) else k

    return (kernel.__name__, tuple(signature.items()), tuple(sorted((name(k), str(v)) for k, v in constexprs.items())),
            tuple(sorted((name(k), str(v)) for k, v in attrs.items() if v)),
            tuple(sorted((k, options[k]) for k in ("num_warps", "enable_fp_fusion", "maxnreg")
                         if options.get(k) is not None)))


def spec_key(spec: Spec) -> tuple:
    return _key(*compile_inputs(spec))


def jit_compile_inputs(kernel, *args, **kwargs) -> tuple:
    """The ``spec_key`` form of what Triton's JIT compiles for ``kernel[grid](*args, **kwargs)``: its own
    binder (argument types, divisibility, value specialization) and option parsing, for a CUDA target;
    the tensors may live anywhere (only their addresses are read)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", 90, 32))
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return _key(kernel, signature, constexprs, attrs, options.__dict__)


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _cuobjdump(cubin: bytes, flag: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([_tool("cuobjdump"), flag, f.name], capture_output=True, text=True, check=True).stdout


def _resource_usage(cubin: bytes) -> dict:
    out = _cuobjdump(cubin, "-res-usage")
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+)", out)
    if not m:
        raise RuntimeError(f"cuobjdump -res-usage printed no resource line:\n{out}")
    return dict(registers=int(m[1]), stack_bytes=int(m[2]), shared_bytes=int(m[3]))


def sass_opcodes(cubin: bytes) -> list[str]:
    """The SASS instructions' opcodes (with their modifiers, without predicates), NOPs left out."""
    ops = []
    for line in _cuobjdump(cubin, "-sass").splitlines():
        m = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)
        if m and m[1] != "NOP":
            ops.append(m[1])
    return ops


def _spills(ptx: str, arch: int, options: dict) -> dict:
    from triton.backends.nvidia.compiler import sm_arch_from_capability

    fmad = [] if options.get("enable_fp_fusion", True) else ["--fmad=false"]
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        # Triton's own ptxas flags (make_cubin), --fmad=false with fp fusion off (tables.COMPILE_OPTIONS).
        log = subprocess.run([_tool("ptxas"), "-lineinfo", *fmad, "-v", "--regAllocOptLevel=2",
                              f"--gpu-name={sm_arch_from_capability(arch)}", src, "-o", os.path.join(tmp, "k.o")],
                             capture_output=True, text=True, check=True).stderr
    m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if not m:
        raise RuntimeError(f"ptxas -v printed no spill line:\n{log}")
    return dict(spill_store_bytes=int(m[1]), spill_load_bytes=int(m[2]))


def compile_kernel(spec: Spec, **option_overrides):
    """The compiled kernel of ``spec`` (``.asm["ttir"]``, ``["ptx"]``, ``["cubin"]``, ...); ``option_overrides``
    replace launch options (e.g. ``enable_fp_fusion=True``, to see what the checks would catch)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel, signature, constexprs, attrs, options = compile_inputs(spec)
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=GPUTarget("cuda", spec.arch, 32),
                          options={**options, **option_overrides})


def compile_spec(spec: Spec) -> Result:
    """Compile one specialization; failures come back as ``Result.error``, not as exceptions."""
    try:
        compiled = compile_kernel(spec)
        cubin = compiled.asm["cubin"]
        spills = _spills(compiled.asm["ptx"], spec.arch, compile_inputs(spec)[4])
        return Result(spec, **_resource_usage(cubin), **spills,
                      sass_instructions=len(sass_opcodes(cubin)))
    except Exception as err:  # reported per specialization
        return Result(spec, error=f"{type(err).__name__}: {err}".strip()[:2000])


def compile_all(specs=None, jobs: int = 1) -> list[Result]:
    specs = specializations() if specs is None else specs
    if jobs <= 1:
        return [compile_spec(s) for s in specs]
    with ProcessPoolExecutor(jobs) as pool:
        return list(pool.map(compile_spec, specs))


def format_table(results: list[Result]) -> str:
    lines = [f"{'kernel specialization':<62} {'regs':>5} {'stack':>6} {'shared':>7} {'spill st/ld':>12} {'SASS':>6}"]
    for r in results:
        if r.error:
            lines.append(f"{r.spec.label:<62} FAILED: {r.error.splitlines()[0]}")
        else:
            spills = f"{r.spill_store_bytes}/{r.spill_load_bytes}"
            lines.append(f"{r.spec.label:<62} {r.registers:>5} {r.stack_bytes:>6} {r.shared_bytes:>7} {spills:>12} "
                         f"{r.sass_instructions:>6}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), help="compute capabilities (80 90)")
    parser.add_argument("--kernel", nargs="+", choices=KERNELS, default=list(KERNELS), help="only these kernels")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiler processes")
    parser.add_argument("--json", action="store_true", help="print one JSON object per specialization")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("TRITON_INTERPRET=1 is set: the kernels are interpreted and cannot be compiled; unset it",
              file=sys.stderr)
        return 2
    results = compile_all([s for s in specializations(args.arch) if s.kernel in args.kernel], jobs=args.jobs)
    if args.json:
        for r in results:
            print(json.dumps({**asdict(r), "ok": r.ok}))
    else:
        print(format_table(results))
    bad = [r for r in results if not r.ok]
    if bad:
        print(f"{len(bad)} of {len(results)} specializations failed or spill", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
