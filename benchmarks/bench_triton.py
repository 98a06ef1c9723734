"""Benchmark of the Triton backend's ops on a model's parameter list.

On a GPU: per-op time (triton.testing.do_bench, median), achieved bandwidth and percent of the device's
peak, for the Triton kernels, the CUDA extension (when built), the reference backend and the official
per-parameter loop of the RWP code (norm, repeat, normal, add_ per tensor, .item() per 1-D tensor; sub_
to restore; torch.optim.SGD to step). Bandwidth counts the bytes an op must move (its minimal traffic,
the same for every implementation of it), so GB/s compares implementations of one op fairly.

Without a GPU: says so and prints the static facts instead: launches (and host synchronizations) per
RWP step, bytes moved per element, and registers / spills of every kernel from the ahead-of-time compile.

    python benchmarks/bench_triton.py [--model resnet18] [--dtype float32] [--out benchmarks/results]

Writes the table to OUT/bench_triton_<device>.md and, on a GPU, a bar chart to OUT/bench_triton_<device>.png.
"""
import argparse
import os
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import rwp_kernels as rk
from rwp_kernels import backends, official
from rwp_kernels.models import build_model

GAMMA, SEED, LR, MOMENTUM, WEIGHT_DECAY = 0.01, 1, 0.1, 0.9, 5e-4
OPS = ("perturb_", "restore_ exact", "restore_ regenerated", "sgd_step_", "RWP step")


def bytes_per_element(op: str, itemsize: int) -> int:
    """Minimal memory traffic per parameter element (exact mode: backups, gradient scaling for the mix)."""
    return {
        "perturb_": 5 * itemsize,  # read w; write w and its backup; read and write the gradient
        "restore_ exact": 2 * itemsize,  # read the backup, write w
        "restore_ regenerated": 2 * itemsize,  # read and write w (sigmas: one float per row)
        "sgd_step_": 5 * itemsize,  # read backup, gradient, momentum; write momentum and w
        "RWP step": 10 * itemsize,  # perturb_ + sgd_step_
    }[op]


# --- the official per-parameter loop (rwp_kernels.official) with torch.optim.SGD (foreach) as its step --------

class OfficialLoop:
    def __init__(self, params, grads):
        self.params = params
        for p, g in zip(params, grads):
            p.grad = g
        self.sgd = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, foreach=True)
        self.noise = []

    def perturb(self):
        self.noise = official.perturb(self.params, GAMMA)

    def restore(self):
        official.restore(self.params, self.noise)

    def step(self):
        self.sgd.step()

    def rwp_step(self):
        self.perturb()
        self.restore()
        self.step()


class _CountOps(TorchDispatchMode):
    """Counts the aten ops that compute (views and allocations launch nothing; each of the others launches
    at least one kernel on a GPU) and the host synchronizations (.item())."""

    def __init__(self):
        super().__init__()
        self.ops = self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.syncs += 1
        elif func.namespace == "aten" and not func.is_view and not func.__name__.startswith(("empty", "detach")):
            self.ops += 1
        return func(*args, **(kwargs or {}))


# --- measurements on a GPU ---------------------------------------------------------------------------------

def _fused(backend, params, grads):
    backups = [torch.empty_like(p) for p in params]
    bufs = [torch.zeros_like(p) for p in params]
    state = {}

    def perturb():
        state["sigmas"] = rk.perturb_(params, gamma=GAMMA, seed=SEED, step=1, backups=backups, grads=grads,
                                      grad_scale=0.5, backend=backend)

    def step():
        rk.sgd_step_(params, grads, bufs, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, backups=backups,
                     grad_scale=2.0, backend=backend)

    perturb()
    return {
        "perturb_": perturb,
        "restore_ exact": lambda: rk.restore_(params, backups=backups, backend=backend),
        "restore_ regenerated": lambda: rk.restore_(params, sigmas=state["sigmas"], seed=SEED, step=1,
                                                    backend=backend),
        "sgd_step_": step,
        "RWP step": lambda: (perturb(), step()),
    }


def _official(params, grads):
    loop = OfficialLoop(params, grads)
    loop.perturb()
    return {"perturb_": loop.perturb, "restore_ exact": loop.restore, "sgd_step_": loop.step,
            "RWP step": loop.rwp_step}


def peak_bandwidth(device) -> float:
    props = torch.cuda.get_device_properties(device)
    return props.memory_clock_rate * 1e3 * 2 * props.memory_bus_width / 8  # bytes/s, double data rate


def measure(model: str, dtype: torch.dtype, device: torch.device):
    import triton.testing

    torch.manual_seed(0)
    template = [p.detach().to(device=device, dtype=dtype) for p in build_model(model).parameters()]
    numel = sum(p.numel() for p in template)
    compiled = [b for b in ("triton", "cuda") if backends.unavailable_reason(b, "cuda") is None]
    impls = compiled + ["reference", "official loop"]
    peak = peak_bandwidth(device)
    rows = []
    for impl in impls:
        params = [p.clone() for p in template]
        grads = [torch.randn_like(p) for p in params]
        with torch.no_grad():
            fns = _official(params, grads) if impl == "official loop" else _fused(impl, params, grads)
            for op in OPS:
                if op not in fns:
                    continue
                ms = triton.testing.do_bench(fns[op], return_mode="median")
                gbs = bytes_per_element(op, template[0].element_size()) * numel / (ms * 1e-3) / 1e9
                rows.append((impl, op, ms, gbs, 100 * gbs * 1e9 / peak))
    return rows, numel, peak


# --- static facts --------------------------------------------------------------------------------------------

def launches_per_step(model: str) -> list[tuple[str, int, int]]:
    torch.manual_seed(0)
    params = [p.detach() for p in build_model(model).parameters()]
    loop = OfficialLoop(params, [torch.zeros_like(p) for p in params])
    loop.step()  # the first step creates the momentum buffers
    counts = []
    for name, fn in (("official loop: perturb", loop.perturb), ("official loop: restore (sub_)", loop.restore),
                     ("official loop: SGD step (foreach)", loop.step)):
        with torch.no_grad(), _CountOps() as mode:
            fn()
        counts.append((name, mode.ops, mode.syncs))
    counts.append(("fused: perturb_ + sgd_step_ (per device and dtype)", 2, 0))
    return counts


def static_facts(model: str, dtype: torch.dtype) -> list[str]:
    from rwp_kernels.triton import aot

    itemsize = torch.empty((), dtype=dtype).element_size()
    lines = [f"## launches per RWP step, {model} ({sum(p.numel() for p in build_model(model).parameters()):,} "
             f"parameters in {len(list(build_model(model).parameters()))} tensors)", "",
             "| what | computing aten ops (>= 1 kernel launch each on a GPU) | host syncs |", "|---|---:|---:|"]
    lines += [f"| {name} | {ops} | {syncs} |" for name, ops, syncs in launches_per_step(model)]
    lines += ["", f"## bytes moved per parameter element ({str(dtype).removeprefix('torch.')})", "",
              "| op | bytes |", "|---|---:|"]
    lines += [f"| {op} | {bytes_per_element(op, itemsize)} |" for op in OPS]
    lines += ["", "Optional extras per element: ARWP Fisher state +8 (float32 read and write), clean gradient "
              f"+{itemsize}. The official loop moves about {15 * itemsize} bytes per element for perturb + restore + "
              "step (norm read, std write, normal read/write, add read/read/write, sub read/read/write, SGD 5).", ""]
    if os.environ.get("TRITON_INTERPRET") == "1":
        lines.append("(ahead-of-time compile skipped: TRITON_INTERPRET=1 is set)")
        return lines
    results = aot.compile_all(jobs=os.cpu_count() or 1)
    lines += ["## registers and spills per kernel specialization (ahead-of-time compile)", "", "```",
              aot.format_table(results), "```"]
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    os.makedirs(args.out, exist_ok=True)
    gpu = torch.cuda.is_available() and backends.unavailable_reason("triton", "cuda") is None
    if gpu:
        device = torch.device("cuda")
        name = torch.cuda.get_device_name(device)
        rows, numel, peak = measure(args.model, dtype, device)
        lines = [f"# Triton backend, {args.model} ({numel:,} parameters), {args.dtype}, {name} "
                 f"(peak {peak / 1e9:.0f} GB/s)", "",
                 "| implementation | op | time (ms) | GB/s | % of peak |", "|---|---|---:|---:|---:|"]
        lines += [f"| {impl} | {op} | {ms:.3f} | {gbs:.0f} | {pct:.0f} |" for impl, op, ms, gbs, pct in rows]
        lines += [""] + static_facts(args.model, dtype)
        tag = name.replace(" ", "_")
        _plot(rows, os.path.join(args.out, f"bench_triton_{tag}.png"), f"{args.model} {args.dtype} on {name}")
    else:
        why = backends.unavailable_reason("triton", "cuda")
        lines = [f"# Triton backend, {args.model}, {args.dtype}: no GPU here ({why})", "",
                 "No timings: the kernels need a GPU to run at speed. Static facts instead:", ""]
        lines += static_facts(args.model, dtype)
        tag = "nogpu"
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(args.out, f"bench_triton_{tag}.md"), "w") as f:
        f.write(text + "\n")
    return 0


def _plot(rows, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    impls = list(dict.fromkeys(r[0] for r in rows))
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(impls)
    for i, impl in enumerate(impls):
        times = [next((r[2] for r in rows if r[0] == impl and r[1] == op), 0.0) for op in OPS]
        ax.bar([j + i * width for j in range(len(OPS))], times, width, label=impl)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(OPS))], OPS, fontsize=8)
    ax.set_ylabel("ms (median)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
