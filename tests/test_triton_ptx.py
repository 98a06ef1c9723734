"""The compiled Triton kernels round as csrc/rwp_common.h does: read from their PTX, no GPU needed.

Triton's interpreter rounds every operation on its own, so the interpreter tests cannot see what the compiler
does to the float math. This file compiles the kernels for sm_80 and sm_90 with the launchers' options
(``rwp_kernels/triton/aot.py``, in a subprocess without TRITON_INTERPRET) and reads the PTX:

* no approximate or flush-to-zero float instruction (``div.full``, ``div.approx``, ``sqrt.approx``,
  ``rcp.approx``, ``ex2.approx``, ``lg2.approx``, ``sin.approx``, ``cos.approx``, ``.ftz``) and no libdevice
  call (``tt.extern_elementwise`` in the Triton IR): every float operation is IEEE, as in the header, but in the
  inline PTX of the noise's square root (``rounding.noise_sqrt``, the header's CUDA ``vsqrt``: sqrtf's fast path,
  which tests/test_ext_cuda.py compares with sqrtf's SASS), two per Philox block;
* every float add, sub and mul carries an explicit rounding (``add.rn.f32``, ...): PTX lets ptxas contract a
  ``mul.f32`` / ``add.f32`` pair into an fma, but never one with ``.rn``;
* the ``fma.rn.f32`` count is exactly the header's: ``fmadd`` in ``normal_block`` (counted in rwp_common.h)
  per Philox block, times the blocks each thread computes, times the places a kernel generates noise (each
  path has a vectorized and a scalar copy), and ``sgd_update``'s ``fmadd`` per element of ``sgd_step_kernel``
  (twice: both copies); ``fma.rn.f64`` only in the norms' sums of squares (``perturb._add_squares``: x * x is
  exact in float64, so ``acc + x * x`` rounds once either way): one per element of a thread's tile at each place
  a kernel sums a long row or a kept one, so a whole number of tiles' worth in the kernels that do (the compiler
  may copy a loop body) and none elsewhere (``row_sigma`` has none);
* the perturb kernels' first read of a long row's weights, which they read again, carries ``L1::evict_last``
  (``perturb.REREAD``); no other load or store carries a hint;
* the noise kernel stores a thread's Philox block with one ``st.global.v4.b32`` (4 ``st.global.b32`` on its
  other path) and has no shared-memory shuffle.

With ``enable_fp_fusion=True`` (Triton's default) LLVM emits contractible ``mul.f32`` / ``add.f32``, which ptxas
may fuse into fma: ``test_the_checks_catch_fp_fusion`` compiles the noise kernel that way and asserts that the
checks fail, so this file fails if fusion is ever switched back on.
"""
import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from _noise_sqrt import approximate, instructions, without_noise_sqrt
from conftest import requires

pytestmark = pytest.mark.slow  # compiles ~30 kernels in a subprocess (about 60 s on 2 cores without Triton's cache)

ROOT = Path(__file__).resolve().parents[1]
HEADER = ROOT / "csrc" / "rwp_common.h"

# The small tile of each dtype (tables.TILE_MENUS: 16-bit tiles hold 8 elements per thread, one tile).
SMALL = {None: (512, 4), "fp32": (512, 4), "fp16": (512, 2), "bf16": (512, 2)}


def _parts(kernel: str) -> int | None:
    return 1 if kernel == "perturb_kernel" else None  # perturb_kernel's PARTS (aot.Spec.parts)


# (kernel, dtype, block, warps, arch, index, parts); float32's large tile for the noise kernel on sm_90,
# perturb_kernel's variant keeping rows of 5 tiles in registers, and the unaligned per-element kernel's tile
# (tables.SCALAR_TILE: 4 elements per thread in every dtype).
SPECS = ([("philox_kernel", None, 512, 4, a, "i32", None) for a in (80, 90)]
         + [("noise_kernel", None, 512, 4, a, "i64,i32", None) for a in (80, 90)]
         + [(k, d, *SMALL[d], a, None, _parts(k)) for k in ("perturb_kernel", "restore_kernel", "sgd_step_kernel")
            for d in ("fp32", "fp16", "bf16") for a in (80, 90)]
         + [("noise_kernel", None, 1024, 8, 90, "i32,i64", None), ("perturb_kernel", "fp32", 512, 4, 90, None, 5)]
         + [(k, d, *SMALL[d], 90, None, None) for k in ("perturb_elementwise_kernel", "row_partials_kernel")
            for d in ("fp32", "bf16")]
         + [("perturb_elementwise_unaligned_kernel", d, 512, 4, 90, None, None) for d in ("fp32", "bf16")])
FUSED = ("noise_kernel", None, 512, 4, 90, "i32,i32", None)  # compiled with enable_fp_fusion=True: the checks must fail

_COMPILE = r"""
import json, sys
from rwp_kernels.triton import aot
out, jobs = sys.argv[1], json.loads(sys.argv[2])
manifest = []
for i, (spec, overrides) in enumerate(jobs):
    compiled = aot.compile_kernel(aot.Spec(*spec), **overrides)
    for ext in ("ptx", "ttir"):
        with open(f"{out}/{i}.{ext}", "w") as f:
            f.write(compiled.asm[ext])
    manifest.append([spec, overrides, i])
print(json.dumps(manifest))
"""


def _tools_missing() -> str | None:
    try:
        import triton
    except ImportError as err:
        return f"triton is not importable ({err})"
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    return None if os.access(ptxas, os.X_OK) else f"Triton's ptxas is missing ({ptxas})"


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """{(spec, fused): (ptx, ttir)} for SPECS with the launchers' options, and FUSED with fp fusion on."""
    missing = _tools_missing()
    requires(missing is None, f"compiling the Triton kernels: {missing}", "triton-aot")
    out = tmp_path_factory.mktemp("ptx")
    jobs = [(list(s), {}) for s in SPECS] + [(list(FUSED), {"enable_fp_fusion": True})]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE, str(out), json.dumps(jobs)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = {}
    for spec, overrides, i in json.loads(proc.stdout.splitlines()[-1]):
        result[(tuple(spec), bool(overrides))] = ((out / f"{i}.ptx").read_text(), (out / f"{i}.ttir").read_text())
    return result


# ---- what the header has ----------------------------------------------------------------------------------

def header_function(name: str) -> str:
    """The body of the function ``name`` in csrc/rwp_common.h."""
    text = HEADER.read_text()
    m = re.search(rf"RWP_HD [^(;]*\b{name}\(.*?\n}}\n", text, re.S)
    assert m, f"{name} not found in {HEADER}"
    return m[0]


def fmadds(name: str) -> int:
    return header_function(name).count("fmadd(")


def fma_per_normal_block() -> int:
    """fmadd in normal_block: two box_muller, each two uniform, one log_unit and one sincos_2pi."""
    assert fmadds("normal_block") == 0 and fmadds("box_muller") == 0, "the count below assumes none there"
    return 2 * (2 * fmadds("uniform") + fmadds("log_unit") + fmadds("sincos_2pi"))


# Places where a kernel generates noise (P.normal_tile or P.block_normals calls, counting the vectorized and the
# scalar copy of each path: a tile that fits and a long row's update loop in perturb_; with PARTS > 1 also each
# kept tile of a row and the update loop of the tiles past them; the elementwise kernel's long rows only vectorized,
# the unaligned one's only long rows) and explicit fma per element outside it.
NOISE_SITES = {"philox_kernel": 0, "noise_kernel": 1, "perturb_kernel": 4, "perturb_elementwise_kernel": 3,
               "perturb_elementwise_unaligned_kernel": 2, "row_partials_kernel": 0, "restore_kernel": 2,
               "sgd_step_kernel": 0}


def noise_sites(spec) -> int:
    kernel, parts = spec[0], spec[6]
    return NOISE_SITES[kernel] + (2 * (parts + 1) if (parts or 1) > 1 else 0)


def philox_blocks(spec) -> int:
    """The Philox blocks a kernel's threads compute, at each place it generates noise."""
    block, warps = spec[2:4]
    # normal_tile: BLOCK // 4 Philox blocks per program (16-bit tiles: 8 elements, two blocks per thread)
    return noise_sites(spec) * max(1, block // 4 // (32 * warps))


def expected_fma(spec) -> int:
    kernel, _, block, warps = spec[:4]
    threads = 32 * warps
    count = philox_blocks(spec) * fma_per_normal_block()
    if kernel == "sgd_step_kernel":
        count += 2 * fmadds("sgd_update") * max(1, block // threads)  # per element, vectorized and scalar copy
    return count


# The kernels that add a tile's squares into float64 accumulators with _add_squares (a long row's norm loop, a kept
# row's tiles), at least at this many places (vectorized and scalar copies).
SQUARE_SITES = {"perturb_kernel": 2, "perturb_elementwise_kernel": 1, "perturb_elementwise_unaligned_kernel": 2,
                "row_partials_kernel": 2}


def fma64_problem(spec, count: int) -> str | None:
    """What is wrong with ``count`` fma.rn.f64 in the kernel ``spec``, if anything."""
    kernel, _, block, warps, _, _, parts = spec[:7]
    per = block // (32 * warps)  # a thread's elements per tile: one fma each
    sites = SQUARE_SITES.get(kernel, 0) + (2 * parts if kernel == "perturb_kernel" and (parts or 1) > 1 else 0)
    if not sites:
        return f"fma.rn.f64 x{count}, the header has none" if count else None
    if count < sites * per or count % per:
        return f"fma.rn.f64 x{count}: not whole tiles of squares ({per} per tile, at least {sites * per})"
    return None


def test_the_header_counts_are_what_the_port_has():
    """44 fma per Philox block (uniform 1, log_unit 11, sincos_2pi 9; twice Box-Muller), 4 in sgd_update, none
    in the per-element noise and mix formulas: the numbers the PTX counts below are compared with."""
    assert (fmadds("uniform"), fmadds("log_unit"), fmadds("sincos_2pi")) == (1, 11, 9)
    assert fma_per_normal_block() == 44
    assert fmadds("sgd_update") == 4
    for name in ("add_noise", "remove_noise", "fisher_update", "mix_grad", "row_sigma"):
        assert fmadds(name) == 0, name
    from rwp_kernels.triton import philox

    source = Path(philox.__file__).read_text()
    port = {name: source[source.index(f"def {name}("):].split("\n@triton.jit")[0].count("tl.fma(")
            for name in ("uniform", "log_unit", "sincos_2pi")}
    assert port == {"uniform": 1, "log_unit": 11, "sincos_2pi": 9}


def test_the_noise_sqrt_is_the_headers():
    """Triton's inline PTX for the noise's square root is the header's CUDA vsqrt, operand for operand."""
    from rwp_kernels.triton import rounding

    body = header_function("vsqrt")  # the first definition: the GPU's
    literal = "".join(re.findall(r'"((?:[^"\\]|\\.)*)"', body.split("asm(")[1].split(":")[0]))
    assert "rsqrt.approx" in literal
    assert literal.encode().decode("unicode_escape").replace("%", "$") == rounding.NOISE_SQRT_PTX.value


# ---- the PTX checks ---------------------------------------------------------------------------------------

CONTRACTIBLE = re.compile(r"^(add|sub|mul|mad)\.f(16|32|64)$")


def problems(spec, ptx: str, ttir: str) -> list[str]:
    ptx, sqrt_blocks = without_noise_sqrt(ptx)
    ops = instructions(ptx)
    out = [] if sqrt_blocks == 2 * philox_blocks(spec) else [
        f"{sqrt_blocks} inline square roots of the noise, {2 * philox_blocks(spec)} expected (two per Philox block)"]
    out += [f"approximate / flush-to-zero: {op}" for op in approximate(ops)]
    out += [f"contractible (no rounding modifier, ptxas may fuse it): {op} x{ops.count(op)}"
            for op in sorted(set(ops)) if CONTRACTIBLE.search(op)]
    if "tt.extern_elementwise" in ttir:
        out.append("a libdevice call (tt.extern_elementwise)")
    fma32, fma64 = ops.count("fma.rn.f32"), ops.count("fma.rn.f64")
    if fma32 != expected_fma(spec):
        out.append(f"fma.rn.f32 x{fma32}, the header has {expected_fma(spec)}")
    if fma64_problem(spec, fma64):
        out.append(fma64_problem(spec, fma64))
    return out


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: "-".join(str(v) for v in s if v is not None))
def test_ptx_rounds_as_the_header(compiled, spec):
    ptx, ttir = compiled[(spec, False)]
    assert ".target sm_" in ptx
    assert not problems(spec, ptx, ttir), "\n".join(problems(spec, ptx, ttir))
    ops = instructions(ptx)
    if spec[0].startswith("perturb_"):  # row_sigma in float64, rounded once
        assert {"sqrt.rn.f64", "div.rn.f64", "cvt.rn.f32.f64"} <= set(ops)
    if spec[1] == "bf16" and spec[0] != "row_partials_kernel":  # results rounded to nearest even by the hardware
        narrowing = {op for op in ops if re.fullmatch(r"cvt(\.[a-z]+)?\.bf16(x2)?\.f32", op)}
        assert narrowing and narrowing <= {"cvt.rn.bf16.f32", "cvt.rn.bf16x2.f32"}, narrowing


def test_the_checks_catch_fp_fusion(compiled):
    """The same noise kernel with Triton's default fp fusion: contractible mul/add appear (which ptxas may fuse),
    and the checks above report them (so they would fail if the launchers compiled with fusion on)."""
    ptx, ttir = compiled[(FUSED, True)]
    found = problems(FUSED, ptx, ttir)
    assert any(p.startswith("contractible") for p in found), found
    unfused, _ = compiled[(("noise_kernel", None, 512, 4, 90, "i64,i32", None), False)]
    fused_fma, unfused_fma = (instructions(without_noise_sqrt(p)[0]).count("fma.rn.f32") for p in (ptx, unfused))
    assert fused_fma >= unfused_fma == 44


@pytest.mark.parametrize("spec", [s for s in SPECS if s[0] == "noise_kernel"],
                         ids=lambda s: "-".join(str(v) for v in s if v is not None))
def test_noise_kernel_stores_16_byte_vectors(compiled, spec):
    """A thread's 4 normals (one Philox block) leave in one ``st.global.v4.b32`` where the output starts and ends on
    a block boundary, else in 4 ``st.global.b32``; no shared memory between the normals and either store."""
    ops = instructions(compiled[(spec, False)][0])
    assert (ops.count("st.global.v4.b32"), ops.count("st.global.b32")) == (1, 4)
    assert not [op for op in ops if ".shared" in op]


EVICTION = re.compile(r"^\s*(?:@!?%p\d+\s+)?(ld|st)\.global\.L1::(evict_\w+)", re.M)
REREADING = ("perturb_kernel", "perturb_elementwise_kernel", "perturb_elementwise_unaligned_kernel",
             "row_partials_kernel")


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: "-".join(str(v) for v in s if v is not None))
def test_weights_read_twice_ask_the_caches_to_keep_them(compiled, spec):
    """The perturb kernels read a long row's weights in the norm's loop and again in the update's (a split row's
    in row_partials_kernel, then in perturb_kernel): the norm's loads ask to be kept (evict_last). Nothing else
    carries a hint: the update's loads put the lines back in the usual order, and the other kernels read each
    element once."""
    hints = Counter(m.groups() for m in EVICTION.finditer(compiled[(spec, False)][0]))
    assert set(hints) == ({("ld", "evict_last")} if spec[0] in REREADING else set()), hints
