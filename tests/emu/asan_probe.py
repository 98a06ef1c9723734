"""Runs every op of backend "cuda-emu" over the whole conformance sweep; tests/test_cuda_emu.py runs it in a
process with AddressSanitizer preloaded and the emulated library built with it (RWP_KERNELS_SANITIZE=address),
so any out-of-bounds access of the emulated kernels aborts the process with ASan's report.

Each op runs twice, under two schedule seeds (orders of the threads), and must give the same bits both
times. ``--overflow`` instead hands noise_ a tensor that claims more memory than was allocated: the negative
control, which ASan must catch inside the emulated kernel. Deliberately imports neither pytest nor Triton
(Triton's library does not load under a preloaded ASan runtime).
"""
import ctypes
import sys

import torch

import rwp_kernels as rk
from rwp_kernels import conformance as C

EMU = "cuda-emu"


def one_element(value, offset):
    """A one-element float32 tensor at an odd element offset: an unaligned device scalar."""
    t = torch.zeros(offset + 1)[offset:]
    t.fill_(value)
    return t


def run_ops(dtype):
    """(name, tensors) of every op's results on the sweep's tensors of ``dtype``."""
    params = C.sweep_params(dtype, seed=1)
    grads = C.like(params, seed=2)
    clean = C.like(params, seed=3)
    bufs = C.like(params, seed=4)
    fisher = C.fisher_like(params, seed=5)
    out = []

    w, b, g = C.clone_all(params), C.clone_all(params), C.clone_all(grads)
    sig = rk.perturb_(w, gamma=0.02, seed=9, step=3, backups=b, grads=g, grad_scale=one_element(0.5, 1),
                      backend=EMU)
    out.append(("perturb", w + b + g + sig))
    f = C.clone_all(fisher)
    rk.restore_(w, backups=b, grads=g, fisher=f, beta=0.9, clean_grads=clean, clean_scale=0.25, backend=EMU)
    out.append(("restore exact", w + g + f))

    wa = C.clone_all(params)
    sig_a = rk.perturb_(wa, gamma=0.02, eta=0.5, fisher=fisher, seed=9, step=3, backend=EMU)
    rk.restore_(wa, sigmas=sig_a, seed=9, step=3, backend=EMU)
    out.append(("arwp perturb + regenerated restore", wa + sig_a))

    for found, nesterov, dampening in ((0.0, True, 0.0), (0.0, False, 0.1), (1.0, False, 0.0)):
        ws, ms = C.clone_all(params), C.clone_all(bufs)
        rk.sgd_step_(ws, C.clone_all(grads), ms, lr=0.1, momentum=0.9, dampening=dampening, weight_decay=1e-3,
                     nesterov=nesterov, backups=C.clone_all(bufs), found_inf=one_element(found, 3),
                     clean_grads=clean, clean_scale=0.5, fisher=C.clone_all(fisher), beta=0.5, backend=EMU)
        out.append((f"sgd_step found_inf={found} nesterov={nesterov}", ws + ms))
    return out


def noise_and_philox():
    out = []
    for offset in (0, 3, 2**31 - 6, 2**32 - 2, 2**33 + 1):
        out.append((f"noise offset {offset}", [rk.noise(1001, seed=4, param_index=7, step=2, offset=offset,
                                                        backend=EMU)]))
    gen = torch.Generator().manual_seed(0)
    counter = torch.randint(0, 2**32, (77, 4), generator=gen)
    key = torch.randint(0, 2**32, (77, 2), generator=gen)
    out.append(("philox", [rk.philox4x32_10(counter, key, backend=EMU)]))
    return out


def overflow():
    """noise_ into 64 floats of which only 16 are allocated."""
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    address = libc.malloc(16 * 4)
    claimed = (ctypes.c_float * 64).from_address(address)
    out = torch.frombuffer(claimed, dtype=torch.float32)
    torch.ops.rwp_kernels_emu.noise_(out, 1, 2, 0, 0, 0)


def main() -> int:
    rk.noise(4, seed=0, backend=EMU)  # loads (builds) the library
    if "--overflow" in sys.argv:
        overflow()
        print("the overflow went unnoticed")
        return 0
    runs = []
    for seed in (11, 12):
        torch.ops.rwp_kernels_emu.set_schedule_seed(seed)
        results = noise_and_philox()
        for dtype in C.DTYPES:
            results += run_ops(dtype)
        runs.append(results)
    checked = 0
    for (name, first), (_, second) in zip(*runs):
        for a, b in zip(first, second):
            if not C.bitwise_equal(a, b):
                print(f"{name}: another thread order gave other bits")
                return 1
            checked += 1
    print(f"ok: {checked} result tensors, the same bits under two thread orders")
    return 0


if __name__ == "__main__":
    sys.exit(main())
