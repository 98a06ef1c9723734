"""What is specific to the C++ extension's CPU kernels (backend="cpu"). Its comparisons with the reference
(Philox, noise, perturb_, restore_, sgd_step_, torch.optim.SGD, the tolerances of docs/spec.md section 6)
are in the conformance suite, tests/test_conformance.py; other instruction-set builds in
tests/test_ext_cpu_isa.py.
"""
import subprocess

import numpy as np
import pytest
import torch

from _ext_common import SEED, STEP, assert_bitwise, make_params, run_perturb
from rwp_kernels import _ext_config, backends, noise, perturb_, reference, sgd_step_
from rwp_kernels import conformance as C

pytestmark = pytest.mark.usefixtures("cpp_ext")


def test_noise_slices_are_bitwise_the_same_stream():
    """Any window of the stream gives the same bits: the vector and per-block (GPU) code paths agree."""
    full = noise(5000, seed=SEED, param_index=2, step=STEP, backend="cpu")
    for offset in range(0, 70):
        part = noise(1000 + offset % 7, seed=SEED, param_index=2, step=STEP, offset=offset, backend="cpu")
        assert torch.equal(part, full[offset : offset + part.numel()]), offset


def _bits(z: torch.Tensor) -> torch.Tensor:
    return z.view(torch.int32)


def test_reference_normals_are_the_cpu_normals_bit_for_bit():
    """The reference evaluates csrc/rwp_common.h's float32 Box-Muller op for op (docs/spec.md section 3): four
    million normals from offset 0, and the same stream from a misaligned offset across a chunk boundary."""
    kw = dict(seed=SEED, param_index=5, step=STEP, stream=2)
    n = 1 << 22
    ref = noise(n, **kw, backend="reference")
    assert torch.equal(_bits(noise(n, **kw, backend="cpu")), _bits(ref))
    off = (1 << 18) - 3  # the reference's chunks are 2^16 blocks of 4 normals
    part = noise(300_001, **kw, offset=off, backend="cpu")
    assert torch.equal(_bits(part), _bits(noise(300_001, **kw, offset=off, backend="reference")))
    assert torch.equal(_bits(part), _bits(ref[off : off + 300_001]))


def test_reference_normals_are_the_cpu_normals_at_many_offsets():
    """Windows at 200 offsets over the whole counter range (both 32-bit counter words, every lane
    alignment), under keys, steps and param_indices at their extremes."""
    gen = torch.Generator().manual_seed(11)
    offsets = torch.randint(0, 2**62, (150,), generator=gen).tolist()
    offsets += [0, 1, 2, 3, 2**31 - 5, 2**32 - 3, 4 * 2**32 - 6, 2**34 + 1, 2**62 + 7, 2**63 - 5000]
    offsets += [4 * o + lane for o in (2**31 - 1, 2**32 - 1, 2**32, 2**40 + 3) for lane in range(4)]
    offsets += [int(o) for o in torch.randint(0, 2**20, (24,), generator=gen)]
    keys = [dict(seed=0, param_index=0, step=0, stream=0), dict(seed=2**64 - 1, param_index=2**32 - 1, step=2**32 - 1,
                                                             stream=7), dict(seed=SEED, param_index=3, step=STEP)]
    for i, offset in enumerate(offsets):
        kw = dict(keys[i % len(keys)], offset=offset)
        n = 4099 - i % 5
        z, ref = noise(n, **kw, backend="cpu"), noise(n, **kw, backend="reference")
        assert torch.equal(_bits(z), _bits(ref)), kw


@pytest.mark.slow
def test_reference_normals_are_the_cpu_normals_over_32_million():
    """2^25 normals across the wrap of the low counter word: 2^24 radii and as many angles, of the 2^24
    uniforms that exist, about two thirds of each."""
    kw = dict(seed=12345, param_index=9, step=1)
    first = 2**32 * 4 - (1 << 24)
    for start in range(first, first + (1 << 25), 1 << 23):
        ref = noise(1 << 23, **kw, offset=start, backend="reference")
        assert torch.equal(_bits(noise(1 << 23, **kw, offset=start, backend="cpu")), _bits(ref)), start


def test_noise_statistics():
    z = noise(1 << 20, seed=1, backend="cpu")
    assert abs(z.mean().item()) < 5e-3 and abs(z.std().item() - 1) < 5e-3
    assert torch.isfinite(z).all()


def test_results_do_not_depend_on_the_thread_count():
    params = make_params(torch.float32) + [torch.randn(300, 300)]
    fisher = C.fisher_like(params, seed=9)
    threads = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            ps, sigmas, backups, grads = run_perturb("cpu", params, fisher=fisher, eta=0.1)
            bufs = C.like(params, seed=6)
            sgd_step_(ps, [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, ps)], bufs, lr=0.1,
                      momentum=0.9, backups=None, backend="cpu")
            outs.append((ps, sigmas, bufs, noise(100_000, seed=3, backend="cpu")))
    finally:
        torch.set_num_threads(threads)
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            assert_bitwise(a if isinstance(a, list) else [a], b if isinstance(b, list) else [b])


def test_auto_picks_the_cpu_extension():
    assert backends.resolve("auto", torch.device("cpu")).name == "cpu"
    assert "cpu" in backends.available_backends("cpu")


def test_empty_tensor_is_rejected_with_its_name():
    with pytest.raises(ValueError, match=r"params\[1\]"):
        perturb_([torch.randn(3), torch.empty(0, 4)], gamma=0.01, seed=1, step=1, backend="cpu")


SINCOS_PROGRAM = r"""
#include <cstdio>
#include <vector>
#include "rwp_common.h"
// The header's (cos 2 pi u, sin 2 pi u) for the uniform of every word x = m << 8, m < 2^24.
int main(int, char** argv) {
  std::vector<float> out(size_t{2} << 24);
  for (uint32_t m = 0; m < (1u << 24); ++m) rwp::sincos_2pi(rwp::uniform(m << 8), out[2 * m], out[2 * m + 1]);
  std::FILE* f = std::fopen(argv[1], "wb");
  const bool ok = f && std::fwrite(out.data(), sizeof(float), out.size(), f) == out.size();
  return f && std::fclose(f) == 0 && ok ? 0 : 1;
}
"""


@pytest.mark.slow
def test_header_sincos_on_every_uniform_is_the_references(tmp_path):
    """csrc/rwp_common.h's sincos_2pi (the quarter turn from adding 1.5 * 2^23 to 4u, the remainder u - k/4 by
    one fma) against the reference's (torch.round, then a multiply and a subtraction) on all 2^24 uniforms of the
    noise stream, bit for bit: the two argument reductions agree on every value, not only on those a stream
    happens to draw."""
    exe, out = tmp_path / "sincos", tmp_path / "sincos.bin"
    build = subprocess.run([_ext_config.cxx_compiler(), *_ext_config.CXX_FLAGS, "-std=c++17", "-I",
                            str(_ext_config.source_dir()), "-x", "c++", "-", "-o", str(exe)],
                           input=SINCOS_PROGRAM, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    assert subprocess.run([str(exe), str(out)], timeout=300).returncode == 0
    header = _bits(torch.from_numpy(np.fromfile(out, dtype=np.float32)).view(-1, 2))
    chunk = 1 << 22
    for first in range(0, 1 << 24, chunk):
        words = torch.arange(first, first + chunk, dtype=torch.int64) << 8
        cos, sin = reference._sincos_2pi(reference._uniform(words))
        assert torch.equal(_bits(cos), header[first:first + chunk, 0]), first
        assert torch.equal(_bits(sin), header[first:first + chunk, 1]), first
