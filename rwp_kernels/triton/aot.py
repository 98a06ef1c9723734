"""Ahead-of-time compilation of every Triton kernel specialization the launchers use; no GPU needed.

Each (kernel, dtype, tile) is compiled for each target with ``triton.compile(ASTSource(...),
target=GPUTarget("cuda", cc, 32))``. Registers, stack and shared memory are read from the cubin with the
``cuobjdump -res-usage`` that ships with Triton; spill bytes from the same ``ptxas -v`` run that Triton
makes (same flags). ``python -m rwp_kernels.triton.aot`` prints the table and exits with status 1 on
any spill or compile failure. Run it without TRITON_INTERPRET=1: interpreted kernels cannot be compiled.
"""
import argparse
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

INDEX = "index"  # a size or offset passed as a Python int: i32 below 2**31, else i64 (two specializations)
_KERNEL_ARGS = {
    # kernel name -> (module, argument types in order); DTYPE and BLOCK are the constexprs.
    "philox_kernel": ("noise", ["*i64", "*i64", "*i64", INDEX]),
    "noise_kernel": ("noise", ["*fp32", INDEX, INDEX, "i32", "i32", "i32", "i32"]),
    "perturb_kernel": ("perturb", ["*i64", "*i64", "*fp32", "*fp32", "fp32", "*fp32", "i32", "i32", "i32"]),
    "restore_kernel": ("restore", ["*i64", "*i64", "*fp32", "i32", "i32", "i32", "fp32", "fp32", "*fp32", "fp32",
                                   "*fp32", "fp32", "*fp32"]),
    "sgd_step_kernel": ("sgd_step", ["*i64", "*i64", "fp32", "fp32", "fp32", "fp32", "i32", "i32", "i32", "*fp32",
                                     "fp32", "fp32", "*fp32", "fp32", "*fp32", "fp32", "*fp32"]),
}


@dataclass(frozen=True)
class Spec:
    kernel: str
    dtype: str | None  # the parameters' dtype; None for kernels without one
    block: int
    num_warps: int
    arch: int
    index: str | None = None  # i32 / i64 for kernels that take sizes as Python ints

    @property
    def label(self) -> str:
        variant = " ".join(v for v in (self.dtype, self.index) if v)
        return f"{self.kernel} {variant} BLOCK={self.block} warps={self.num_warps} sm_{self.arch}".replace("  ", " ")


@dataclass(frozen=True)
class Result:
    spec: Spec
    registers: int = -1
    stack_bytes: int = -1
    shared_bytes: int = -1
    spill_store_bytes: int = -1
    spill_load_bytes: int = -1
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error and self.spill_store_bytes == 0 and self.spill_load_bytes == 0


def specializations(archs=ARCHS) -> list[Spec]:
    from .tables import TILE_MENU

    specs = []
    for arch in archs:
        for block, warps in TILE_MENU:
            for kernel in ("philox_kernel", "noise_kernel"):
                specs += [Spec(kernel, None, block, warps, arch, index) for index in ("i32", "i64")]
            for kernel in ("perturb_kernel", "restore_kernel", "sgd_step_kernel"):
                specs += [Spec(kernel, dtype, block, warps, arch) for dtype in DTYPES]
    return specs


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _resource_usage(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+)", out)
    if not m:
        raise RuntimeError(f"cuobjdump -res-usage printed no resource line:\n{out}")
    return dict(registers=int(m[1]), stack_bytes=int(m[2]), shared_bytes=int(m[3]))


def _spills(ptx: str, arch: int) -> dict:
    gpu = re.search(r"^\.target\s+(\S+)", ptx, re.M)[1]
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        log = subprocess.run([_tool("ptxas"), "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={gpu}", src,
                              "-o", os.path.join(tmp, "k.o")], capture_output=True, text=True, check=True).stderr
    m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if not m:
        raise RuntimeError(f"ptxas -v printed no spill line:\n{log}")
    return dict(spill_store_bytes=int(m[1]), spill_load_bytes=int(m[2]))


def compile_kernel(spec: Spec):
    """The compiled kernel of one specialization (``.asm["cubin"]``, ``.asm["ptx"]``, ``.metadata``);
    compile errors raise."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module_name, types = _KERNEL_ARGS[spec.kernel]
    module = importlib.import_module(f"{__package__}.{module_name}")
    kernel = getattr(module, spec.kernel)
    if not isinstance(kernel, triton.runtime.JITFunction):
        raise RuntimeError("the kernels are interpreted (TRITON_INTERPRET=1): unset it to compile")
    names = [n for n in kernel.arg_names if n not in ("DTYPE", "BLOCK")]
    signature = dict(zip(names, [spec.index if t == INDEX else t for t in types], strict=True))
    constexprs = {"BLOCK": spec.block}
    if spec.dtype is not None:
        constexprs["DTYPE"] = getattr(triton.language, {"fp32": "float32", "fp16": "float16",
                                                         "bf16": "bfloat16"}[spec.dtype])
    signature.update({name: "constexpr" for name in constexprs})
    # Tensors from torch's allocator are 16-byte aligned; the JIT marks such pointers the same way.
    attrs = {(kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n, t in signature.items()
             if t.startswith("*")}
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs),
                          target=GPUTarget("cuda", spec.arch, 32), options={"num_warps": spec.num_warps})


def compile_spec(spec: Spec) -> Result:
    """Compile one specialization; failures come back as ``Result.error``, not as exceptions."""
    try:
        compiled = compile_kernel(spec)
        return Result(spec, **_resource_usage(compiled.asm["cubin"]), **_spills(compiled.asm["ptx"], spec.arch))
    except Exception as err:  # reported per specialization
        return Result(spec, error=f"{type(err).__name__}: {err}".strip()[:2000])


def compile_all(specs=None, jobs: int = 1) -> list[Result]:
    specs = specializations() if specs is None else specs
    if jobs <= 1:
        return [compile_spec(s) for s in specs]
    with ProcessPoolExecutor(jobs) as pool:
        return list(pool.map(compile_spec, specs))


def format_table(results: list[Result]) -> str:
    lines = [f"{'kernel specialization':<52} {'regs':>5} {'stack':>6} {'shared':>7} {'spill st/ld':>12}"]
    for r in results:
        if r.error:
            lines.append(f"{r.spec.label:<52} FAILED: {r.error.splitlines()[0]}")
        else:
            spills = f"{r.spill_store_bytes}/{r.spill_load_bytes}"
            lines.append(f"{r.spec.label:<52} {r.registers:>5} {r.stack_bytes:>6} {r.shared_bytes:>7} {spills:>12}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), help="compute capabilities (80 90)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiler processes")
    parser.add_argument("--json", action="store_true", help="print one JSON object per specialization")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("TRITON_INTERPRET=1 is set: the kernels are interpreted and cannot be compiled; unset it",
              file=sys.stderr)
        return 2
    results = compile_all(specializations(args.arch), jobs=args.jobs)
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
