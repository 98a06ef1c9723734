"""The GPU-blind performance model: the SASS reader on a canned listing, the roofline arithmetic against a hand
computation, and (slow) the report script end to end. No GPU needed; the slow tests need nvcc and Triton's
cuobjdump."""
import csv
import importlib.util
import math
import os
import time
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import requires
from rwp_kernels import gpu_model as G
from rwp_kernels import sass

ROOT = Path(__file__).resolve().parents[1]

# cuobjdump -sass layout: two functions, encodings after each instruction, a trap BRA at the end.
LISTING = """
	code for sm_90
		Function : _ZN3rwp4cuda48_GLOBAL__N__a2751081_15_cuda_kernels_cu_2b7faf8c10sgd_kernelIfEEvPKNS_10ParamEntryEllNS_7SgdArgsE
	.headerflags	@"EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   S2R R0, SR_TID.X ;                                  /* 0x0000000000007919 */
                                                                                       /* 0x000e2e0000002100 */
        /*0010*/                   ISETP.GE.AND P0, PT, R0, 0x10, PT ;                 /* 0x000000100000780c */
        /*0020*/               @P0 EXIT ;                                              /* 0x000000000000094d */
        /*0030*/                   ISETP.NE.AND P1, PT, R5, RZ, PT ;                   /* 0x000000ff0500720c */
        /*0040*/              @!P1 BRA 0x90 ;                                          /* 0x0000000000109947 */
        /*0050*/                   LD.E.128 R8, desc[UR4][R2.64] ;                     /* 0x0000000402087980 */
        /*0060*/                   IMAD.WIDE.U32 R10, R8, -0x2daee0ad, RZ ;            /* 0xd2511f53080a7825 */
        /*0070*/                   ST.E.128 desc[UR4][R2.64], R8 ;                     /* 0x0000000802007985 */
        /*0080*/                   BRA 0xe0 ;                                          /* 0x0000000000147947 */
        /*0090*/               @P2 LD.E R8, desc[UR4][R2.64] ;                         /* 0x0000000402082980 */
        /*00a0*/                   IMAD.WIDE.U32 R10, R8, 0xcd9e8d57, RZ ;             /* 0xcd9e8d57080a7825 */
        /*00b0*/                   ST.E.U16 desc[UR4][R2.64], R8 ;                     /* 0x0000000802007986 */
        /*00c0*/                   FADD R8, R8, 1 ;                                    /* 0x3f80000008087421 */
        /*00d0*/                   FMUL R8, R8, 2 ;                                    /* 0x4000000008087820 */
        /*00e0*/                   IADD3 R0, R0, 0x100, RZ ;                           /* 0x0000010000007810 */
        /*00f0*/                   ISETP.LT.AND P0, PT, R0, R4, PT ;                   /* 0x000000040000720c */
        /*0100*/               @P0 BRA 0x30 ;                                          /* 0xffffff2000000947 */
        /*0110*/                   EXIT ;                                              /* 0x000000000000794d */
        /*0120*/                   BRA 0x120;                                          /* 0xfffffffc00fc7947 */
		..........

		Function : _Z6tritonPv
	.headerflags	@"EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   LDG.E.64 R4, desc[UR4][R2.64+0x28] ;                /* 0x0000280402047981 */
        /*0010*/               @P1 LDG.E R7, desc[UR4][R4.64] ;                        /* 0x0000000404071981 */
        /*0020*/               @P1 STG.E desc[UR4][R6.64], R7 ;                        /* 0x0000000706001986 */
        /*0030*/              @!P1 EXIT ;                                              /* 0x000000000000994d */
        /*0040*/                   STG.E desc[UR4][R6.64+0x4], R7 ;                    /* 0x0000040706007986 */
        /*0050*/                   LDS.128 R8, [R0+UR4] ;                              /* 0x0000000400087984 */
        /*0060*/                   UIADD3 UR4, UR4, 0x1, URZ ;                         /* 0x0000000104047890 */
        /*0070*/                   MUFU.RSQ R9, R8 ;                                   /* 0x0000000800097308 */
        /*0080*/                   DADD R10, R10, R12 ;                                /* 0x0000000c0a0a7229 */
        /*0090*/              @P3 CALL.REL.NOINC 0xb0 ;                                /* 0x0000001000003944 */
        /*00a0*/                   CALL.REL.NOINC 0xc0 ;                               /* 0x0000001000007944 */
        /*00b0*/                   EXIT ;                                              /* 0x000000000000794d */
"""

RES_USAGE = """
Resource usage:
 Common:
  GLOBAL:0
 Function _Z6tritonPv:
  REG:48 STACK:0 SHARED:26752 LOCAL:0 CONSTANT[0]:416 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function _Z3fooi:
  REG:31 STACK:8 SHARED:0 LOCAL:4 CONSTANT[0]:392 TEXTURE:0 SURFACE:0 SAMPLER:0
"""

PTXAS = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z6tritonPv' for 'sm_90'
ptxas info    : Function properties for _Z6tritonPv
    0 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 48 registers, used 1 barriers, 26752 bytes smem, 416 bytes cmem[0]
ptxas info    : Compile time = 104.017 ms
ptxas info    : Compiling entry function '_Z3fooi' for 'sm_90'
ptxas info    : Function properties for _Z3fooi
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 31 registers, used 0 barriers, 392 bytes cmem[0]
"""


def _functions():
    return {sass.short_name(name): ins for name, ins in sass.parse_sass(LISTING).items()}


# ---- the SASS reader ---------------------------------------------------------------------------------------

def test_listing_splits_into_functions_with_every_instruction():
    fns = _functions()
    assert list(fns) == ["sgd_kernel<fp32>", "_Z6tritonPv"]
    toy = fns["sgd_kernel<fp32>"]
    assert [i.addr for i in toy] == list(range(0, 0x130, 0x10))
    assert toy[2].guard == "P0" and toy[2].opcode == "EXIT"
    assert toy[4].guard == "!P1" and sass.branch_target(toy[4]) == 0x90 and sass.is_conditional(toy[4])
    assert toy[5].base == "LD" and toy[5].modifiers == ("E", "128")
    assert sass.branch_target(toy[8]) == 0xE0 and not sass.is_conditional(toy[8])


def test_short_names_of_the_projects_kernels():
    assert sass.short_name("_ZN3rwp4cuda48_GLOBAL__N__a2751081_15_cuda_kernels_cu_2b7faf8c14perturb_kernelINS1_9bf16_"
                           "bitsELb1EEEvPKNS_10ParamEntryEllNS_11PerturbArgsE") == "perturb_kernel<bf16,true>"
    assert sass.short_name("_ZN3rwp4cuda48_GLOBAL__N__a2751081_15_cuda_kernels_cu_2b7faf8c14perturb_kernelIfLb0EEEvPK"
                           "NS_10ParamEntryEllNS_11PerturbArgsE") == "perturb_kernel<fp32,false>"
    assert sass.short_name("_ZN3rwp4cuda48_GLOBAL__N__a2751081_15_cuda_kernels_cu_2b7faf8c12noise_kernelEPflljNS_8"
                           "NoiseKeyE") == "noise_kernel"
    # the namespace's path hash starts with digits that read as the length of the rest ("50" + 50 characters)
    assert sass.short_name("_ZN3rwp4cuda48_GLOBAL__N__50b6a524_15_cuda_kernels_cu_2b7faf8c14perturb_kernelIfLb0ELb1EE"
                           "EvPKNS_10ParamEntryEllNS_11PerturbArgsE") == "perturb_kernel<fp32,false,true>"
    assert sass.short_name("restore_kernel") == "restore_kernel"  # Triton's names are plain
    assert sass.short_name("_Z3fooi") == "_Z3fooi"


def test_loops_are_backward_branches_and_the_trap_is_not_one():
    toy = _functions()["sgd_kernel<fp32>"]
    assert sass.find_loops(toy) == [sass.Loop(0x30, 0x100)]
    blocks = sass.basic_blocks(toy)
    assert sorted(blocks) == [0x0, 0x30, 0x50, 0x90, 0xE0, 0x110, 0x120]
    assert blocks[0x0].exits and blocks[0x0].succs == [0x30]  # a guarded EXIT falls through
    assert blocks[0x30].succs == [0x90, 0x50]
    assert blocks[0x50].succs == [0xE0]
    assert blocks[0xE0].succs == [0x30, 0x110]
    assert blocks[0x110].exits and blocks[0x110].succs == []


def test_memory_access_widths_spaces_and_predication():
    acc = {i.addr: sass.memory_access(i) for i in _functions()["sgd_kernel<fp32>"]}
    assert acc[0x50] == sass.Access("ld", "generic", 128, False) and acc[0x50].label == "LD.128"
    assert acc[0x70].label == "ST.128" and acc[0x70].dram
    assert acc[0x90] == sass.Access("ld", "generic", 32, True)
    assert acc[0xB0].label == "ST.16"
    assert acc[0x0] is None and acc[0xC0] is None
    tri = {i.addr: sass.memory_access(i) for i in _functions()["_Z6tritonPv"]}
    assert tri[0x0].label == "LDG.64" and tri[0x20].label == "STG.32" and tri[0x20].predicated
    assert tri[0x50] == sass.Access("ld", "shared", 128, False) and not tri[0x50].dram


def test_tags_count_accesses_philox_table_columns_and_slow_path_calls():
    toy = {i.addr: i for i in _functions()["sgd_kernel<fp32>"]}
    assert sass.is_philox_multiply(toy[0x60]) and sass.is_philox_multiply(toy[0xA0])  # signed and unsigned forms
    assert sass.tags(toy[0x50]) == {"ld128": 1}
    assert sass.tags(toy[0x90]) == {"ld32": 1, "ld32p": 1}
    tri = {i.addr: i for i in _functions()["_Z6tritonPv"]}
    assert sass.tags(tri[0x0]) == {"ld64": 1, "ld64@0x28": 1}
    assert sass.tags(tri[0x20]) == {"st32": 1, "st32p": 1}
    assert sass.tags(tri[0x50]) == {"lds128": 1}
    assert sass.tags(tri[0x90]) == {} and sass.tags(tri[0xA0]) == {"call": 1}  # guarded: sm_80's loop exit
    # a scan's shuffle, not a reduction's
    assert sass.tags(sass.Instr(0x0, "", "SHFL.UP", "PT, R5, R4, 0x1, RZ")) == {"shfl_up": 1}
    assert sass.tags(sass.Instr(0x0, "", "SHFL.BFLY", "PT, R5, R4, 0x10, 0x1f")) == {}


def test_pipes():
    tri = {i.addr: sass.pipe(i) for i in _functions()["_Z6tritonPv"]}
    assert (tri[0x0], tri[0x60], tri[0x70], tri[0x80], tri[0xB0]) == ("lsu", "uniform", "xu", "fp64", "issue")
    toy = {i.addr: sass.pipe(i) for i in _functions()["sgd_kernel<fp32>"]}
    assert (toy[0x60], toy[0xC0], toy[0xE0]) == ("imad", "fp32", "alu")


def test_cheapest_path_meets_the_requirement():
    toy = _functions()["sgd_kernel<fp32>"]
    loop = sass.Loop(0x30, 0x100)
    fast = sass.cheapest_path(toy, {}, loop=loop)  # the vector branch: 4 instructions against 5
    assert [i.addr for i in fast.instrs] == [0x30, 0x40, 0x50, 0x60, 0x70, 0x80, 0xE0, 0xF0, 0x100]
    assert fast.body_instrs == 14 and fast.region == "loop 0x30-0x100"
    assert fast.widths() == {"LD.128": 1, "ST.128": 1} and fast.tags()["philox"] == 1
    scalar = sass.cheapest_path(toy, {"st16": 1, "philox": 1}, loop=loop)
    assert len(scalar) == 10 and scalar.widths() == {"LD.32": 1, "ST.16": 1}
    assert sass.cheapest_path(toy, {"ld128": 1}, loop=loop, avoid=("st128",)) is None
    assert sass.cheapest_path(toy, {"st128": 2}, loop=loop) is None
    assert sass.cheapest_path(toy, {}, loop=loop, avoid=("ld128",)).widths() == {"LD.32": 1, "ST.16": 1}
    # through the function outside its loops: entry to the guarded EXIT
    entry = sass.cheapest_path(toy, {}, outside=sass.find_loops(toy))
    assert [i.addr for i in entry.instrs] == [0x0, 0x10, 0x20] and entry.region == "function"
    found = sass.loops_meeting(toy, {"ld128": 1})
    assert [lp for lp, _ in found] == [loop]


# An outer loop (0x10-0x90) around an inner one (0x20-0x50), and a second loop (0xa0-0xe0) that also reads a
# second tensor: the shape of for_span_runs' runs of whole vectors, and of a norm loop's Fisher-state twin.
NESTED = """
        /*0000*/                   S2R R0, SR_TID.X ;
        /*0010*/                   ISETP.NE.AND P1, PT, R5, RZ, PT ;
        /*0020*/                   LD.E.128 R8, desc[UR4][R2.64] ;
        /*0030*/                   DFMA R20, R8, R8, R20 ;
        /*0040*/                   IADD3 R0, R0, 0x100, RZ ;
        /*0050*/               @P0 BRA 0x20 ;
        /*0060*/               @P2 LD.E R12, desc[UR4][R6.64] ;
        /*0070*/                   DFMA R20, R12, R12, R20 ;
        /*0080*/                   IADD3 R0, R0, 0x100, RZ ;
        /*0090*/               @P1 BRA 0x10 ;
        /*00a0*/                   LD.E.128 R8, desc[UR4][R2.64] ;
        /*00b0*/                   LD.E.128 R12, desc[UR4][R6.64] ;
        /*00c0*/                   DFMA R20, R8, R8, R20 ;
        /*00d0*/                   FADD R22, R12, R22 ;
        /*00e0*/               @P3 BRA 0xa0 ;
        /*00f0*/                   EXIT ;
"""


def test_a_loop_spec_takes_the_innermost_loop_and_honours_body_limits():
    instrs = sass.parse_instructions(NESTED)
    facts = G.KernelFacts("toy", (G.PathSpec("norm", {"ld128": 1}, body_at_most={"ld128": 1}),
                                  G.PathSpec("fisher", {"ld128": 2}), G.PathSpec("any", {"ld128": 1})),
                          4, 4, "toy")
    paths = G.analyze(instrs, facts)
    # the outer loop meets the spec through its inner loop's body, but the inner loop is what runs most
    assert paths["norm"].region == "loop 0x20-0x50" and len(paths["norm"]) == 4
    assert paths["fisher"].region == "loop 0xa0-0xe0"
    # without the limit, the larger of the innermost loops that meet the spec: the Fisher twin
    assert paths["any"].region == "loop 0xa0-0xe0"


def test_the_last_store_after_an_early_exit_is_on_the_longer_path():
    tri = _functions()["_Z6tritonPv"]
    one = sass.cheapest_path(tri, {"st32": 1}, avoid=("call",))
    assert [i.addr for i in one.instrs] == [0x0, 0x10, 0x20, 0x30]
    both = sass.cheapest_path(tri, {"st32": 2}, avoid=())  # through the unguarded CALL: allowed when not avoided
    assert both is not None and both.instrs[-1].addr == 0xB0
    assert sass.cheapest_path(tri, {"st32": 2}, avoid=("call",)) is None
    extra = sass.path_difference(both, one)  # what the second store's path adds to the first one's
    assert [i.addr for i in extra.instrs] == [i.addr for i in both.instrs if i.addr > 0x30]
    assert extra.body_instrs == len(both) and len(extra) == len(both) - len(one)


def test_resource_usage_and_ptxas_log():
    usage = sass.parse_res_usage(RES_USAGE)
    assert usage["_Z6tritonPv"]["REG"] == 48 and usage["_Z6tritonPv"]["SHARED"] == 26752
    assert usage["_Z3fooi"] == {"REG": 31, "STACK": 8, "SHARED": 0, "LOCAL": 4, "CONSTANT[0]": 392, "TEXTURE": 0,
                                "SURFACE": 0, "SAMPLER": 0}
    log = sass.parse_ptxas_verbose(PTXAS)
    assert log["_Z6tritonPv"] == dict(stack=0, spill_stores=8, spill_loads=4, registers=48, smem=26752)
    assert log["_Z3fooi"]["registers"] == 31 and log["_Z3fooi"]["smem"] == 0


# ---- occupancy and the roofline ----------------------------------------------------------------------------

def test_resident_warps():
    assert G.resident_warps(48, 26752, 256, 90) == (40, "regs")  # 1536 registers per warp: 42 warps, 5 blocks
    assert G.resident_warps(64, 1144, 256, 80) == (32, "regs")
    assert G.resident_warps(32, 100 * 1024, 256, 80) == (8, "smem")  # 164 KB / (100 KB + 1 KB reserved)
    assert G.resident_warps(16, 0, 256, 90) == (64, "warps")
    assert G.resident_warps(98, 9216, 256, 90) == (16, "regs")  # 3328 per warp: 19 warps, 2 blocks of 8
    assert G.resident_warps(26, 0, 32, 90) == (32, "blocks")


def test_warp_iterations_and_row_threads():
    assert G._warp_iterations(2048, 256) == 64  # a full sgd_step_ chunk of 8192 float32
    assert G._warp_iterations(146, 256) == 5  # 146 vectors: five warps iterate once, three not at all
    assert G._warp_iterations(8, 8) == 0.25  # four rows of 8 vectors share a warp
    assert G.cuda_row_threads(4608, 4) == 256 and G.cuda_row_threads(27, 4) == 8 and G.cuda_row_threads(512, 4) == 32
    assert G.param_rows([(64, 3, 3, 3), (10,), (10, 512)]) == [(1728, 27), (10, 10), (5120, 512)]


def test_cuda_perturb_splits_rows_longer_than_the_stage():
    assert G.CUDA_STAGE_BYTES == 6144 * 4 and G.CUDA_SEGMENT == 8192  # read from csrc/rwp_api.h
    # a row of n elements touches at most (n - 1) // 4 + 2 float32 vectors, wherever it starts; 1536 fit
    assert G.cuda_row_segments(4608, 4) == 0 and G.cuda_row_segments(6140, 4) == 0
    assert G.cuda_row_segments(6141, 4) == 1 and G.cuda_row_segments(20000, 4) == 3
    assert G.cuda_row_segments(12280, 2) == 0 and G.cuda_row_segments(12281, 2) == 2
    fp32 = G.op_work("perturb_", "cuda", [(20000 * 3, 20000), (4608 * 2, 4608)], "fp32")
    per_row = sum(G._warp_iterations(v, 256) for v in (2049, 2049, 905))
    assert fp32.iterations[("partials_kernel", "norm")] == 3 * per_row
    assert fp32.iterations[("perturb_kernel_split", "update")] == 3 * per_row
    assert fp32.iterations[("perturb_kernel", "update")] == 2 * G._warp_iterations(1152, 256)
    # per block, each of its 8 warps: the prologue once (the tree once per halving of the group)
    assert fp32.iterations[("partials_kernel", "row")] == fp32.iterations[("perturb_kernel_split", "block")] == 8 * 9
    assert fp32.iterations[("perturb_kernel", "row")] == 8 * 2 and fp32.iterations[("perturb_kernel", "tree")] == 8 * 2 * 8
    assert fp32.dram_bytes == 3 * 20000 * 16 + 16 * 9 + 4 * 3 + 2 * (4608 * 12 + 4)
    assert fp32.min_bytes == 12 * (60000 + 9216) and fp32.launches == 3  # staged rows; partials, split rows
    bf16 = G.op_work("perturb_", "cuda", [(5760 * 10, 5760)], "bf16", grad_scale=True)  # fits the stage
    assert set(bf16.iterations) == {("perturb_kernel_gs", p) for p in ("norm", "update", "row", "tree")}
    assert bf16.dram_bytes == 10 * (5760 * 10 + 4) and bf16.min_bytes == 10 * 57600 and bf16.launches == 1
    short = G.op_work("perturb_", "cuda", [(64 * 20, 20)], "fp32")  # 5 vectors: groups of 8 threads, 32 per block
    assert short.iterations[("perturb_kernel", "row")] == 8 * 2 and short.iterations[("perturb_kernel", "tree")] == 8 * 2 * 3


def test_triton_perturb_keeps_rows_of_up_to_parts_tiles_in_registers():
    from rwp_kernels.triton.tables import RESIDENT_PARTS

    assert RESIDENT_PARTS == {4: 5}
    rows = [(2304 * 2, 2304), (1030 * 3, 1030), (6000, 6000), (27 * 16, 27)]  # median 2304: PARTS = 5 tiles of 512
    work = G.op_work("perturb_", "triton", rows, "fp32")
    assert work.tile == (512, 4, 5)
    # 2304: 5 tiles; 1030 (starting at 0, 2, 0 mod 4): 3 tiles each; 6000: 5 kept, 7 streamed; 4 warps per program
    # and tile. A kept row: the program of a one-tile row, then what each further kept tile adds; the streamed
    # tiles as a long row's norm and update loops
    assert work.iterations[("perturb_kernel_resident", "row")] == 4 * 6
    assert work.iterations[("perturb_kernel_resident", "tile")] == 4 * (2 * 4 + 3 * 2 + 4)
    assert work.iterations[("perturb_kernel_long", "norm")] == work.iterations[("perturb_kernel_long", "update")] == 28
    assert ("perturb_kernel_long", "row") not in work.iterations  # (its program is the kept row's)
    assert work.iterations[("perturb_kernel_packed", "tile")] == 4  # the 16 rows of 27 packed in one tile
    assert ("perturb_kernel", "tile") not in work.iterations
    resident = 12 * (2304 * 2 + 1030 * 3 + 6000) + 4 * (6000 - 5 * 512) + 4 * 6  # w in once (but 6000's streamed
    # part twice), w and the backup out; a sigma per row
    assert work.dram_bytes == resident + (12 * 27 * 16 + 4 * 16)
    small = G.op_work("perturb_", "triton", [(27 * 16, 27), (500 * 3, 500)], "fp32")  # median 500: fits a tile
    assert small.tile == (512, 4, 1) and not any("resident" in key for key, _ in small.iterations)
    bf16 = G.op_work("perturb_", "triton", rows, "bf16")  # 16-bit rows are not kept (RESIDENT_PARTS)
    assert bf16.tile == (512, 2, 1) and not any("resident" in key for key, _ in bf16.iterations)


def test_a_rows_overhead_path_makes_the_store_of_its_result():
    """A row's sigma (a split row's partial sums) is stored by one thread or lane, often behind a branch that the
    cheapest path would take around it: every row overhead requires the store."""
    def row(facts):
        (path,) = [p for p in facts.paths if p.name == "row"]
        assert path.overhead and not path.loop
        return path.require

    assert row(G.cuda_facts("perturb_kernel", "bf16")) == {"sts64": 1, "lds64": 1, "st32": 1}
    assert row(G.cuda_facts("partials_kernel", "fp32")) == {"sts64": 1, "lds64": 1, "st64": 2}
    assert row(G.cuda_facts("perturb_kernel_ae", "fp32")) == {"sts64": 1, "lds64": 1}  # (its sigmas: a loop)
    assert row(G.triton_facts("perturb_kernel_long", "fp32", 512, 4)) == {"st32": 1}
    assert row(G.triton_facts("row_partials_kernel", "bf16", 512, 2)) == {"st64": 2}
    resident = row(G.triton_facts("perturb_kernel_resident", "fp32", 512, 4, 5))
    assert resident["st128"] == 2 and resident["ld128"] == 5  # a tile's stores: the sigma's is unconditional


LOOP = """
		Function : sgd_like
        /*0000*/                   S2R R0, SR_TID.X ;
        /*0010*/               @P3 BRA 0x50 ;
        /*0020*/                   LDG.E.64 R6, desc[UR4][R2.64+0x48] ;
        /*0030*/                   ISETP.GT.AND P2, PT, R6, R8, PT ;
        /*0040*/               @P2 BRA 0x20 ;
        /*0050*/               @P1 BRA 0x110 ;
        /*0060*/                   LD.E.128 R4, desc[UR4][R2.64] ;
        /*0070*/                   LD.E.128 R8, desc[UR4][R2.64+0x10] ;
        /*0080*/                   LD.E.128 R12, desc[UR4][R2.64+0x20] ;
        /*0090*/                   IADD3 R0, R0, 0x1, RZ ;
        /*00a0*/                   IADD3 R1, R1, 0x1, RZ ;
        /*00b0*/                   IADD3 R2, R2, 0x1, RZ ;
        /*00c0*/                   IADD3 R3, R3, 0x1, RZ ;
        /*00d0*/                   ST.E.128 desc[UR4][R2.64], R4 ;
        /*00e0*/                   ST.E.128 desc[UR4][R2.64+0x10], R8 ;
        /*00f0*/                   ISETP.LT.AND P0, PT, R0, R20, PT ;
        /*0100*/               @P0 BRA 0x60 ;
        /*0110*/                   EXIT ;
"""


def _index(warps: int) -> dict:
    facts = G.cuda_facts("sgd_kernel", "fp32")
    (name, instrs), = sass.parse_sass(LOOP).items()
    report = G.KernelReport("cuda", "sgd_kernel<fp32>", "sgd_kernel", "fp32", 90, 43, 0, 0, 1144, 256, warps, "regs",
                            facts, G.analyze(instrs, facts))
    assert len(report.paths["main"]) == 11 and report.instr_per_elem() == 11 / 4
    assert report.warp_cycles() == 20  # five LSU instructions at 32 per SM: 4 cycles each per scheduler
    assert [i.addr for i in report.paths["block"].instrs] == [0x0, 0x10, 0x50, 0x110]  # around the loops
    assert len(report.paths["search"]) == 3  # one bisection step: the table entry's first_unit, at byte 0x48
    return G.report_index([report])


def test_a_path_over_single_elements_runs_once_per_element():
    # the canned loop (11 instructions, five LSU) as the 1-element loop of a 4-element kernel: 4 runs per iteration
    facts = G.KernelFacts("test", (G.PathSpec("vectors", {"ld128": 1}), G.PathSpec("elements", {"ld128": 1}, elems=1)),
                          4, 8, "test")
    (name, instrs), = sass.parse_sass(LOOP).items()
    report = G.KernelReport("cuda", "sgd_kernel<fp32>", "sgd_kernel", "fp32", 90, 43, 0, 0, 1144, 256, 40, "regs",
                            facts, G.analyze(instrs, facts))
    assert (report.runs("vectors"), report.runs("elements")) == (1, 4)
    assert report.path_instrs() == 11 + 4 * 11 and report.instr_per_elem() == 55 / 4
    assert report.pipes()["lsu"] == 5 * 5 and report.warp_cycles() == 5 * 20
    assert report.warp_cycles("elements") == 20  # one run of the path
    assert G.cuda_facts("perturb_kernel_ae", "fp32").paths[1].elems == 1  # its sigmas: a loop over elements


def test_roofline_arithmetic_by_hand():
    gpu = G.GPU("test", 90, 1e12, 1, 1e9, 0)
    e = G.estimate("sgd_step_", "cuda", [(8192, 8192)], "fp32", gpu, _index(40))
    # 64 warp iterations of 11 instructions; the LSU pipe is the busiest: 5 * 128 / 32 = 20 cycles each; and the
    # block's 8 warps each run its prologue of 4, with one LSU instruction (S2R): 4 cycles more each (one table
    # entry: no search for it)
    lsu_cycles = 64 * 20 + 8 * 4
    t_compute = lsu_cycles / (1 * 4 * 1e9 * 0.8)  # 40 warps: 10 per scheduler, full 80 % issue efficiency
    t_memory = 5 * 4 * 8192 / 1e12
    t_latency = 64 / 40 * 600e-9 / 1  # each loading iteration waits one DRAM latency; 40 warps overlap
    assert math.isclose(e.t_compute, t_compute) and math.isclose(e.t_memory, t_memory)
    assert math.isclose(e.t_latency, t_latency) and e.bound == "latency"
    assert math.isclose(e.time, t_latency + 5e-6) and e.launches == 1
    assert math.isclose(e.pct_hbm_peak, t_memory / (t_latency + 5e-6))
    assert math.isclose(e.instr_per_elem, (64 * 11 + 8 * 4) * 32 / 8192)
    # with three table entries, each block's first warp also bisects the table twice (3 instructions, one LSU)
    assert [G.search_iterations(n) for n in (1, 2, 3, 4, 5, 62, 161)] == [0, 1, 2, 2, 3, 6, 8]
    three = G.estimate("sgd_step_", "cuda", [(8192, 8192)] * 3, "fp32", gpu, _index(40))
    assert math.isclose(three.t_compute, 3 * (lsu_cycles + 2 * 4) / (1 * 4 * 1e9 * 0.8))
    few = G.estimate("sgd_step_", "cuda", [(8192, 8192)], "fp32", gpu, _index(8),
                     assumptions={"dram_latency_s": 0.0, "launch_s": 0.0})
    assert few.bound == "compute" and math.isclose(few.time, lsu_cycles / (4 * 1e9 * 0.8 * 0.5))  # 2 warps/scheduler
    both = G.combine([e, e], G.STEP, gpu)
    assert math.isclose(both.time, 2 * e.time) and math.isclose(both.pct_hbm_peak, e.pct_hbm_peak)
    assert both.bound == "latency+latency" and both.launches == 2


def test_hot_loop_and_the_normals_floor():
    index = _index(40)
    hot = G.hot_loop("sgd_step_", "cuda", [(8192, 8192)], "fp32", 90, index)
    # 64 iterations of the 11-instruction loop against 8 warps running the block's prologue of 4
    assert hot.label == "sgd_kernel<fp32> main" and hot.instr_per_elem == 11 / 4
    assert math.isclose(hot.share, 64 * 11 / (64 * 11 + 8 * 4))
    (main,) = [r.paths["main"] for r in index.values()]  # an 11-instruction path stands in for the normals' loop
    noise = [G.KernelReport(backend, "noise_kernel", "noise_kernel", None, arch, 32, 0, 0, 0, 256, 64, "regs",
                            G.cuda_facts("noise_kernel", None), {"main": main}) for backend, arch in
             (("cuda", 90), ("triton", 90), ("cuda", 80))]
    noise[1].facts = G.triton_facts("noise_kernel", None, 1024, 4)  # 8 elements per thread: 11 / 8 per element
    floors = G.report_index(noise)
    assert G.normals_floor(floors, 90) == 11 / 8 and G.normals_floor(floors, 80) == 11 / 4


def test_models_have_their_published_sizes():
    sizes = {m: sum(n for n, _ in G.param_rows(G.model_shapes(m)[0])) for m in G.MODELS}
    assert sizes["resnet18"] == 11_173_962 and sizes["wrn28_10"] == 36_479_194
    assert sizes["resnet50"] == 25_557_032
    assert sum(math.prod(s) for s in G._resnet50_shapes()) == 25_557_032


def test_the_cache_keeps_the_most_recently_used_entries_of_each_variant(tmp_path, monkeypatch):
    monkeypatch.setenv("RWP_GPU_MODEL_CACHE", str(tmp_path))
    builds = []

    def build(folder):
        builds.append(folder.name)
        (folder / "kernel.cubin").write_bytes(b"x")
        return {"n": len(builds)}

    keys = [f"{i:016x}" for i in range(G.CACHE_KEEP + 2)]
    for age, key in enumerate(keys):
        assert G._cached("triton_k_sm_90", key, build) == {"n": age + 1, "cached": False}
        os.utime(tmp_path / f"triton_k_sm_90_{key}" / "done.json", (age, age))
    G._cached("triton_k_sm_80", keys[0], build)  # another variant's entry is never dropped for this one's
    # Used again, the oldest kept entry becomes the newest: the next new entry drops the one after it.
    oldest_kept = keys[-G.CACHE_KEEP]
    assert G._cached("triton_k_sm_90", oldest_kept, build) == {"n": G.CACHE_KEEP, "cached": True}
    G._cached("triton_k_sm_90", "f" * 16, build)
    left = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert left == sorted([f"triton_k_sm_80_{keys[0]}", f"triton_k_sm_90_{oldest_kept}",
                           f"triton_k_sm_90_{keys[-1]}", f"triton_k_sm_90_{'f' * 16}"])
    assert sorted(p.name for p in tmp_path.iterdir() if not p.is_dir()) == [name + ".lock" for name in left]
    assert len(builds) == len(keys) + 2  # nothing cached was built again


def test_an_entry_built_by_two_workers_at_once_is_built_once(tmp_path, monkeypatch):
    """Parallel test workers (and two benchmark runs) share the cache: the second to ask waits for the first's
    build and reads its result, never a half-written one."""
    import threading

    monkeypatch.setenv("RWP_GPU_MODEL_CACHE", str(tmp_path))
    builds, started = [], threading.Event()

    def build(folder):
        builds.append(folder.name)
        started.set()
        time.sleep(0.3)  # the other worker asks meanwhile
        return {"registers": 48}

    results = []
    first = threading.Thread(target=lambda: results.append(G._cached("cuda_k_sm_90", "a" * 16, build)))
    first.start()
    started.wait()
    second = G._cached("cuda_k_sm_90", "a" * 16, build)
    first.join()
    assert builds == [f"cuda_k_sm_90_{'a' * 16}"]
    assert results == [{"registers": 48, "cached": False}] and second == {"registers": 48, "cached": True}


# ---- end to end -------------------------------------------------------------------------------------------------

def _tools() -> str | None:
    from rwp_kernels import _ext_config as C

    if C.find_nvcc() is None:
        return "nvcc was not found"
    if G.cuobjdump() is None:
        return "cuobjdump was not found"
    try:
        importlib.import_module("triton")
    except ImportError as err:
        return f"triton is not importable ({err})"
    return None


@pytest.mark.slow  # compiles every kernel for sm_90 in a subprocess
def test_report_script_quick(tmp_path):
    missing = _tools()
    requires(missing is None, f"GPU model report: {missing}", "cuda-build")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gpu_model.py"), "--quick", "--jobs", "2",
                          "--out", str(tmp_path)], env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert G.ESTIMATE_LABEL in run.stdout and "HBM 4.8 TB/s" in run.stdout and "FAILED" not in run.stdout
    for backend in ("cuda", "triton"):  # a bf16 step under 60 % is checked against the floor (FLOOR_MARGIN)
        met = re.search(rf"target {backend} bf16 perturb_ \+ sgd_step_ >= 60% .*; (\d+) of (\d+) cases meet it",
                        run.stdout)
        assert met, run.stdout[-3000:]
        under = re.search(rf"target {backend} bf16 under 60%: .*: \d+ of (\d+) cases meet it", run.stdout)
        assert (under is None) == (met[1] == met[2]) and (under is None or int(under[1]) == int(met[2]) - int(met[1]))
    with open(tmp_path / "bench_gpu_model.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    keys = {(r["gpu"], r["model"], r["dtype"], r["backend"], r["op"]) for r in rows}
    expected = {(g.name, m, d, b, op) for g in G.GPUS if g.arch == 90 for m in G.MODELS for d in ("fp32", "bf16")
                for b in ("cuda", "triton") for op in (*G.OPS, G.STEP)}
    assert keys == expected and len(rows) == len(expected)
    for r in rows:
        assert r["label"] == G.ESTIMATE_LABEL
        assert 0 < float(r["pct_hbm_peak"]) <= 100 and float(r["estimate_us"]) > float(r["launch_us"]) > 0
        assert float(r["instructions_per_element"]) > 0 and r["bound"]
    with open(tmp_path / "bench_gpu_model_kernels.csv", newline="") as f:
        kernels = {(r["backend"], r["kernel"], r["arch"]): r for r in csv.DictReader(f)}
    cuda = kernels[("cuda", "perturb_kernel<fp32,false,false>", "sm_90")]
    assert int(cuda["registers"]) > 0 and cuda["spill_store_bytes"] == "0"
    assert float(cuda["instructions_per_element"]) > 0
    assert "ST.128x2" in cuda["accesses"]  # backup and w: one 16-byte store each per vector
    noise = [r for (backend, name, _), r in kernels.items() if backend == "triton" and name.startswith("noise_kernel")]
    assert noise and all((r["accesses"], r["smem_bytes"]) == ("STG.128", "0") for r in noise)  # no shuffle either
    assert {k[0] for k in kernels} == {"cuda", "triton"} and {k[2] for k in kernels} == {"sm_90"}
    assert all(r["instructions_per_element"] for r in kernels.values()), "a kernel without a hot path"
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "bench_gpu_model.png").stat().st_size > 0


@pytest.mark.slow  # a subprocess that imports torch
def test_bench_ops_says_when_there_is_no_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: bench_ops.py --device cuda measures instead")
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_ops.py"), "--device", "cuda", "--out",
                          str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and "no CUDA GPU is visible" in run.stderr and "bench_gpu_model.py" in run.stderr


@pytest.mark.slow  # compiles the CUDA kernels for sm_90
def test_bench_ops_prints_the_estimate_next_to_measured_times(tmp_path, monkeypatch, capsys):
    missing = _tools()
    requires(missing is None, f"GPU model: {missing}", "cuda-build")
    spec = importlib.util.spec_from_file_location("bench_ops_under_test", ROOT / "benchmarks" / "bench_ops.py")
    bench_ops = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_ops)
    index = G.report_index(G.analyze_cuda(90, ("fp32",)))
    h200 = next(g for g in G.GPUS if g.name.startswith("H200"))
    monkeypatch.setattr(G, "device_model", lambda backends, dtypes: (h200, "a stand-in H200", index, []))
    rows = [dict(model="resnet18", op=op, backend="cuda", median_ms=ms)
            for op, ms in (("perturb_", 0.05), ("sgd_step_", 0.06), ("perturb+step", 0.12))]
    bench_ops.gpu_estimates(rows, ["resnet18"], tmp_path)
    out = capsys.readouterr().out
    assert "a stand-in H200" in out and "perturb+step" in out
    with open(tmp_path / "bench_ops_estimate.csv", newline="") as f:
        est = list(csv.DictReader(f))
    assert [r["op"] for r in est] == ["perturb_", "sgd_step_", "perturb+step"]
    step = est[-1]
    assert math.isclose(float(step["measured_over_estimate"]), 0.12 / float(step["estimate_ms"]))
    assert math.isclose(float(step["measured_pct_hbm_peak"]), 100 * 32 * 11_173_962 / 4.8e12 / 0.12e-3)
