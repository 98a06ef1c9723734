"""What is specific to the C++ extension's CPU kernels (backend="cpu"). Its comparisons with the reference
(Philox, noise, perturb_, restore_, sgd_step_, torch.optim.SGD, the tolerances of docs/spec.md section 6)
are in the conformance suite, tests/test_conformance.py; other instruction-set builds in
tests/test_ext_cpu_isa.py.
"""
import pytest
import torch

from _ext_common import SEED, STEP, assert_bitwise, make_params, run_perturb
from rwp_kernels import backends, noise, perturb_, sgd_step_
from rwp_kernels import conformance as C

pytestmark = pytest.mark.usefixtures("cpp_ext")


def test_noise_slices_are_bitwise_the_same_stream():
    """Any window of the stream gives the same bits: the vector and per-block (GPU) code paths agree."""
    full = noise(5000, seed=SEED, param_index=2, step=STEP, backend="cpu")
    for offset in range(0, 70):
        part = noise(1000 + offset % 7, seed=SEED, param_index=2, step=STEP, offset=offset, backend="cpu")
        assert torch.equal(part, full[offset : offset + part.numel()]), offset


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
