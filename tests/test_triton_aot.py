"""The Triton kernels compile ahead of time for sm_80 and sm_90 without a GPU, in every specialization the
launchers can produce, and spill nothing.

``rwp_kernels/triton/aot.py`` lists the specializations (dtype, tile, i32/i64 for each size or offset passed as
a Python int; every integer argument is ``do_not_specialize`` and the caller's tensors that may sit at any
address are ``do_not_specialize_on_alignment``, so the JIT makes no divisibility or value-1 variants).
``test_launchers_produce_only_listed_specializations`` checks that list against the launchers themselves:
it runs the public ops on many argument sets (sizes around 2**31, offsets past 2**32, one-element scale and
found_inf tensors and sigma buffers at unaligned addresses, every dtype and tile) with the launch replaced
by Triton's own binder, and requires every launch to be one of ``aot.specializations()``. The full
compilation (60 specializations, about 110 s on 2 cores without Triton's cache) is ``slow``.

Both run in a subprocess without TRITON_INTERPRET (interpreted kernels cannot be compiled, and
tests/conftest.py switches the interpreter on in this process where there is no GPU).
"""
import json
import os
import subprocess
import sys

import pytest

from conftest import requires


def _tools_missing() -> str | None:
    try:
        import triton
    except ImportError as err:
        return f"triton is not importable ({err})"
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    for tool in ("ptxas", "cuobjdump"):
        if not os.access(os.path.join(bin_dir, tool), os.X_OK):
            return f"Triton's {tool} is missing from {bin_dir}"
    return None


def _env():
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


# Runs the ops on CPU tensors with the compiled (not interpreted) kernels and records, for each launch (and each
# compilation ahead of a launch: tables.warmup), what the JIT would compile (aot.jit_compile_inputs) instead. The
# sizes of 2**31 and more use meta tensors.
_LAUNCHES = r"""
import json, os
import torch
import rwp_kernels.triton as RT
from rwp_kernels.contract import NoiseKey
from rwp_kernels.triton import aot, tables

assert not RT.INTERPRETED
os.environ["TRITON_INTERPRET"] = "1"  # let the public ops route CPU tensors to the launchers
RT.INTERPRETED = True
import rwp_kernels as rk

seen = set()
tables.launch = tables.warmup = lambda kernel, programs, tile, device, *args, **constexprs: seen.add(
    aot.jit_compile_inputs(kernel, *args, **tables.launch_kwargs(kernel, tile, constexprs)))


def unaligned(value):
    return torch.tensor([0.0, value])[1:].reshape(())


key = NoiseKey(seed=1, stream=2, step=3)
for numel, offset in [(1, 0), (16, 16), (17, 3), (5, 2**31 + 3), (3, 2**40), (1000, 1), (1000, 2**40),
                      (2**31 + 1, 0), (2**31 + 1, 2**33)]:
    RT.noise(numel, key=key, param_index=0, offset=offset, device=torch.device("meta"))
for n in (1, 16, 17, 1000):
    counter = torch.randint(0, 2**32, (4 * n + 1,))[1:].view(n, 4)  # at an address that is 8 mod 16
    keys = torch.randint(0, 2**32, (2 * n + 1,))[1:].view(n, 2)
    rk.philox4x32_10(counter, keys, backend="triton")
    rk.philox4x32_10(counter.clone(), keys.clone(), backend="triton")
RT.philox4x32_10(torch.zeros(2**31 + 1, 4, dtype=torch.int64, device="meta"),
                 torch.zeros(2, dtype=torch.int64, device="meta"))

for dtype in (torch.float32, torch.float16, torch.bfloat16):
    # float32's 512- and 1024-element tiles of the elementwise ops (16-bit: its one tile), perturb_'s one tile
    # without and with a row split for the two-stage norm (float32 perturb_kernel with PARTS = 5 where rows of 1000
    # or the split row's 40000 elements are the median), ARWP's 1-D tensors with a scalar loop (1001 elements).
    for shapes in ([(16, 3, 3, 3), (10,)], [(4, 1000), (7,)], [(200, 500), (40000,)],
                   [(4, 1000), (7,), (40000,), (1001,)]):
        params = [torch.randn(s, dtype=dtype) for s in shapes]
        grads = [torch.randn_like(p) for p in params]
        fisher = [torch.rand(p.shape) for p in params]
        backups = [torch.empty_like(p) for p in params]
        bufs = [torch.zeros_like(p) for p in params]
        for scale in (0.5, torch.tensor(0.5), unaligned(0.5)):
            sigmas = rk.perturb_(params, gamma=0.1, seed=1, step=2, backups=backups, grads=grads, grad_scale=scale,
                                 fisher=fisher, eta=0.1, backend="triton")
            rk.perturb_(params, gamma=0.1, seed=1, step=2, backend="triton")
            rk.restore_(params, sigmas=sigmas, seed=1, step=2, grads=grads, grad_scale=scale, fisher=fisher,
                        beta=0.9, fisher_scale=scale, clean_grads=[g.clone() for g in grads], clean_scale=scale,
                        backend="triton")
            buffer = torch.empty(sum(s.numel() for s in sigmas) + 1)[1:]  # sigmas at an unaligned address
            rk.restore_(params, sigmas=list(buffer.split([s.numel() for s in sigmas])), seed=1, step=2,
                        backend="triton")
            rk.restore_(params, backups=backups, backend="triton")
            for found_inf in (None, torch.zeros(()), unaligned(0.0), torch.zeros(1, dtype=torch.int32)):
                rk.sgd_step_(params, grads, bufs, lr=1, momentum=0.9, weight_decay=1, nesterov=True,
                             grad_scale=scale, found_inf=found_inf, backups=backups, fisher=fisher, beta=1,
                             fisher_scale=scale, backend="triton")
                rk.sgd_step_(params, grads, None, lr=0.1, found_inf=found_inf, backend="triton")

listed = {aot.spec_key(s): s.label for s in aot.specializations((90,))}
print(json.dumps({"launches": len(seen), "listed": sorted(listed[k] for k in seen if k in listed),
                  "unlisted": [repr(k) for k in seen if k not in listed], "all": len(listed)}))
"""


@pytest.mark.slow  # runs every launcher over the sweep in Triton's interpreter (about 2.5 s)
def test_launchers_produce_only_listed_specializations():
    try:
        import triton  # noqa: F401
    except ImportError as err:
        requires(False, f"triton is not importable ({err})", "triton-aot")
    proc = subprocess.run([sys.executable, "-c", _LAUNCHES], env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.splitlines()[-1])
    assert not out["unlisted"], "launches that rwp_kernels.triton.aot does not compile:\n" + "\n".join(out["unlisted"])
    # Every listed specialization is reached by some argument set above (sm_90: 30).
    assert len(out["listed"]) == out["all"] == 30, out["listed"]


# Stack frames allowed, by specialization label, with why. The kept-row variant on sm_80: the float64 division's
# slow path (a subroutine, run only for operands its inline path cannot divide) saves one register pair there
# since the row's hyperparameters are read after its norm (perturb._read_sigma); no spill.
STACK_FRAMES = {"perturb_kernel fp32 PARTS=5 BLOCK=512 warps=4 sm_80": 8}


@pytest.mark.slow  # compiles 60 specializations: about 110 s on 2 cores without Triton's cache
def test_every_specialization_compiles_for_sm80_and_sm90_without_spills():
    missing = _tools_missing()
    requires(missing is None, f"ahead-of-time compilation: {missing}", "triton-aot")
    from rwp_kernels.triton import aot

    proc = subprocess.run(
        [sys.executable, "-m", "rwp_kernels.triton.aot", "--json", "--arch", "80", "90",
         "--jobs", str(min(4, os.cpu_count() or 1))],
        env=_env(), capture_output=True, text=True, timeout=1200,
    )
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    key = ("kernel", "dtype", "block", "num_warps", "arch", "index", "parts")
    compiled = {tuple(r["spec"][k] for k in key) for r in results}
    expected = {tuple(getattr(s, k) for k in key) for s in aot.specializations((80, 90))}
    assert compiled == expected, f"specializations compiled vs. expected differ; stderr:\n{proc.stderr[-3000:]}"
    assert len(expected) == 60
    assert {r["spec"]["kernel"] for r in results} == {
        "philox_kernel", "noise_kernel", "perturb_kernel", "perturb_elementwise_kernel",
        "perturb_elementwise_unaligned_kernel", "row_partials_kernel", "restore_kernel", "sgd_step_kernel"}
    # i32 and i64 for each Python-int size or offset, independently (the noise op's offset and numel).
    assert {r["spec"]["index"] for r in results if r["spec"]["kernel"] == "noise_kernel"} == {
        "i32,i32", "i32,i64", "i64,i32", "i64,i64"}
    assert {r["spec"]["index"] for r in results if r["spec"]["kernel"] == "philox_kernel"} == {"i32", "i64"}
    for r in results:
        label = aot.Spec(**r["spec"]).label
        assert not r["error"], f"{label}: {r['error']}"
        assert r["registers"] > 0 and r["sass_instructions"] > 0, f"{label}: nothing read from the cubin"
        assert r["spill_store_bytes"] == 0 and r["spill_load_bytes"] == 0, f"{label} spills: {r}"
        assert r["stack_bytes"] <= STACK_FRAMES.get(label, 0), f"{label} uses a stack frame: {r}"
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("version, elementwise, unaligned", [("3.6.0", {4: 80, 2: 64}, {4: 96, 2: 80}),
                                                             ("3.7.0", {4: 48, 2: 48}, {4: 48, 2: 48}),
                                                             ("3.8.0", {4: 48, 2: 48}, {4: 48, 2: 48})])
def test_the_register_caps_follow_the_installed_triton(monkeypatch, version, elementwise, unaligned):
    """Triton 3.6 compiles the per-element kernels to more registers; the caps that compile without spills under
    each Triton are the slow test's above (it compiles with the installed one, for sm_80 and sm_90)."""
    triton = pytest.importorskip("triton")
    from rwp_kernels.triton import tables

    monkeypatch.setattr(triton, "__version__", version)
    for itemsize in (4, 2):
        assert tables.kernel_options("perturb_elementwise_kernel", itemsize)["maxnreg"] == elementwise[itemsize]
        assert tables.kernel_options("perturb_elementwise_unaligned_kernel", itemsize)["maxnreg"] == unaligned[itemsize]
    assert tables.kernel_options("perturb_kernel", 2)["maxnreg"] == 48  # the same under each
    assert tables.kernel_options("perturb_kernel", 4)["maxnreg"] == 48
    assert tables.kernel_options("perturb_kernel", 4, 5) == {**tables.COMPILE_OPTIONS, "maxnreg": 64}


def test_a_variant_changes_the_launch_choices_and_puts_them_back():
    """tables.variant (the switch benchmarks/bench_variants.py times on a GPU): the kept tiles and the register caps
    the launchers use change inside it and are as shipped afterwards, also after an error."""
    pytest.importorskip("triton")
    from rwp_kernels.triton import tables

    long_rows = [(4608, 64)]  # (row length, rows): float32 keeps the first RESIDENT_PARTS tiles
    shipped = (tables.perturb_tile(long_rows, 4), tables.kernel_options("perturb_kernel", 2))
    assert shipped[0].parts == 5 and shipped[1]["maxnreg"] == 48
    with tables.variant({}, {("perturb_kernel", 2): 64}):
        assert tables.perturb_tile(long_rows, 4).parts == 1
        assert tables.kernel_options("perturb_kernel", 2)["maxnreg"] == 64
        assert tables.kernel_options("perturb_kernel", 4)["maxnreg"] == 48  # the others as shipped
    assert (tables.perturb_tile(long_rows, 4), tables.kernel_options("perturb_kernel", 2)) == shipped
    with pytest.raises(RuntimeError, match="inside"), tables.variant(caps={("perturb_kernel", 4): 56}):
        assert tables.perturb_tile(long_rows, 4).parts == 5  # resident_parts None: as it is
        assert tables.kernel_options("perturb_kernel", 4)["maxnreg"] == 56
        raise RuntimeError("inside")
    assert tables.kernel_options("perturb_kernel", 4)["maxnreg"] == 48
