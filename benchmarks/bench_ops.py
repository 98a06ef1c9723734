"""Microbenchmark: the fused ops against the reference backend and the official per-parameter loop.

    python benchmarks/bench_ops.py [--models resnet18 wrn28_10 resnet50] [--repeats 5] [--rounds 3]
                                   [--threads N] [--device cpu|cuda] [--backends cpu reference]
                                   [--out benchmarks/results]

On the parameter shapes of real models (float32), in one run, medians of ``--repeats`` timed calls
after a warm-up; the whole measurement runs ``--rounds`` times and each figure is the median of its
rounds, so that a slow phase of a shared machine does not fall on one op alone (the ratios of every
round are printed too):
- official: the per-parameter loop of the RWP reference code (row norms, repeat, torch.normal, add_;
  sub_ to restore: rwp_kernels.official) plus torch.optim.SGD's step (foreach, momentum 0.9, weight decay);
- torch.optim.SGD's step alone (foreach and fused);
- per backend: perturb_ (exact mode: backups; grad_scale (1 - alpha) / alpha = 1 for the recipes'
  alpha = 0.5, and once with a scale that makes it rewrite the gradients), sgd_step_ (restore from
  the backups, momentum, weight decay), both together, restore_ with regenerated noise, and the noise
  of every parameter element, next to torch.normal_ on as many floats (both fill a preallocated
  tensor; the reference backend has no in-place form and allocates);
- the memory-traffic floor: copying 20 bytes per parameter element (40 bytes moved: what the two
  fused launches of the exact mode read and write), as one tensor copy; and, per fused backend, the
  ratio perturb+step / floor as the median over back-to-back pairs of calls (robust to a shared
  machine's slow phases, which the ratio of two separately measured medians is not).
Prints a table and writes bench_ops.csv and bench_ops.png under --out. With --device cuda it also prints
the GPU-blind estimate of rwp_kernels.gpu_model (what benchmarks/bench_gpu_model.py reports) next to the
measured perturb_, sgd_step_ and perturb+step medians of the cuda and triton backends, and writes them to
bench_ops_estimate.csv: the figures that calibrate the model.
"""
import argparse
import csv
import statistics
import sys
from pathlib import Path

import torch

import rwp_kernels
from rwp_kernels import backends, official, stream
from rwp_kernels._bench import paired_ratio, times_ms
from rwp_kernels.models import resnet18

GAMMA, LR, MOMENTUM, WD = 0.01, 0.1, 0.9, 5e-4


# ---- parameter shapes of the benchmarked models ----------------------------------------------------------

def _bn(c):
    return [(c,), (c,)]


def resnet18_shapes():
    return [tuple(p.shape) for p in resnet18().parameters()]


def wrn28_10_shapes(num_classes=10):
    """Wide ResNet-28-10 for CIFAR (pre-activation blocks, widths 160/320/640, 36.5M parameters)."""
    shapes = [(16, 3, 3, 3)]
    in_c = 16
    for width in (160, 320, 640):
        for block in range(4):
            shapes += _bn(in_c) + [(width, in_c, 3, 3)] + _bn(width) + [(width, width, 3, 3)]
            if block == 0:
                shapes.append((width, in_c, 1, 1))
            in_c = width
    return shapes + _bn(640) + [(num_classes, 640), (num_classes,)]


def resnet50_shapes(num_classes=1000):
    """ResNet-50 for ImageNet (bottleneck blocks 3-4-6-3, 25.6M parameters)."""
    shapes = [(64, 3, 7, 7)] + _bn(64)
    in_c = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for block in range(blocks):
            out_c = 4 * width
            shapes += [(width, in_c, 1, 1)] + _bn(width) + [(width, width, 3, 3)] + _bn(width)
            shapes += [(out_c, width, 1, 1)] + _bn(out_c)
            if block == 0:
                shapes += [(out_c, in_c, 1, 1)] + _bn(out_c)
            in_c = out_c
    return shapes + [(num_classes, 2048), (num_classes,)]


MODELS = {"resnet18": resnet18_shapes, "wrn28_10": wrn28_10_shapes, "resnet50": resnet50_shapes}


class State:
    """Parameters, gradients, momentum buffers and backups of one model, float32 on one device."""

    def __init__(self, shapes, device):
        gen = torch.Generator().manual_seed(0)
        self.params = [torch.randn(s, generator=gen).mul_(0.05).to(device) for s in shapes]
        self.grads = [torch.randn(s, generator=gen).mul_(1e-3).to(device) for s in shapes]
        self.bufs = [torch.zeros_like(p) for p in self.params]
        self.backups = [torch.empty_like(p) for p in self.params]
        self.numel = sum(p.numel() for p in self.params)


def official_loop(params, gamma):
    """The official per-parameter perturbation and its sub_ restore (rwp_kernels.official)."""
    official.restore(params, official.perturb(params, gamma))


def bench_model(name, shapes, device, repeats, backend_names):
    st = State(shapes, device)
    rows = []

    def record(op, backend, median, best, reps):
        rows.append(dict(model=name, op=op, backend=backend, median_ms=median, min_ms=best, repeats=reps,
                         threads=torch.get_num_threads(), numel=st.numel, device=device.type))

    def add(op, backend, fn, setup=None, reps=repeats):
        times = times_ms(fn, device, reps, warmup=2 if reps > 2 else 1, setup=setup)
        median, best = statistics.median(times), min(times)
        record(op, backend, median, best, reps)
        print(f"  {op:<28} {backend:<10} {median:9.2f} ms", flush=True)

    ref_params = [torch.nn.Parameter(p.clone()) for p in st.params]
    for p, g in zip(ref_params, st.grads):
        p.grad = g.clone()
    sgd_foreach = torch.optim.SGD(ref_params, lr=LR, momentum=MOMENTUM, weight_decay=WD, foreach=True)
    sgd_fused = torch.optim.SGD(ref_params, lr=LR, momentum=MOMENTUM, weight_decay=WD, fused=True)

    with torch.no_grad():
        def official():
            official_loop(ref_params, GAMMA)
            sgd_foreach.step()

        add("perturb+step", "official", official)
        add("perturb+restore", "official", lambda: official_loop(ref_params, GAMMA))
        add("sgd step (foreach)", "torch", sgd_foreach.step)
        add("sgd step (fused)", "torch", sgd_fused.step)
        src = torch.empty(5 * st.numel, device=device)
        dst = torch.empty_like(src)
        add("copy 20 B/elem (floor)", "torch", lambda: dst.copy_(src))
        normal_out = torch.empty(st.numel, device=device)
        add("noise", "torch.normal_", normal_out.normal_)
        del normal_out

        floor = lambda: dst.copy_(src)  # noqa: E731
        for backend in backend_names:
            reps = repeats if backend != "reference" else max(1, min(repeats, 2))
            counter = iter(range(1, 1 << 30))
            sigmas = []

            def perturb(grad_scale=1.0):
                sigmas[:] = rwp_kernels.perturb_(st.params, gamma=GAMMA, seed=1, step=next(counter), backups=st.backups,
                                                 grads=st.grads, grad_scale=grad_scale, backend=backend)

            def step():
                rwp_kernels.sgd_step_(st.params, st.grads, st.bufs, lr=LR, momentum=MOMENTUM, weight_decay=WD,
                                      backups=st.backups, backend=backend)

            def both():
                perturb()
                step()

            def regen():
                rwp_kernels.restore_(st.params, sigmas=sigmas, seed=1, step=1, backend=backend)

            add("perturb+step", backend, both, reps=reps)
            add("perturb_", backend, perturb, reps=reps)
            add("perturb_ (grad_scale 0.5)", backend, lambda: perturb(0.5), reps=reps)
            add("sgd_step_", backend, step, reps=reps)
            add("restore_ (regenerated)", backend, regen, setup=perturb, reps=reps)
            add("noise", backend, noise_fn(backend, st.numel, device), reps=reps)
            if backend != "reference":
                ratio = paired_ratio(both, floor, 3 * repeats, device)
                record("perturb+step / floor (paired)", backend, ratio, ratio, 3 * repeats)
                print(f"  {'perturb+step / floor, paired':<28} {backend:<10} {ratio:9.2f} x", flush=True)
    return rows


def noise_fn(backend, numel, device):
    """The noise of numel elements: in place for the extension (as torch.normal_), else allocated."""
    if backend not in ("cpu", "cuda"):
        return lambda: rwp_kernels.noise(numel, seed=1, device=device, backend=backend)
    out = torch.empty(numel, device=device)
    k0, k1 = stream.philox_key(1, 0)
    return lambda: torch.ops.rwp_kernels.noise_(out, k0, k1, 0, 0, 0)


def median_over_rounds(rounds):
    """One row per (model, op, backend): the median of its rounds' medians, the best time of all rounds."""
    rows = []
    for i, first in enumerate(rounds[0]):
        mine = [rows_of_round[i] for rows_of_round in rounds]
        rows.append(dict(first, median_ms=statistics.median(r["median_ms"] for r in mine),
                         min_ms=min(r["min_ms"] for r in mine), rounds=len(rounds)))
    return rows


def summarize(rows):
    """Ratios the targets are stated in, per model and fused backend."""
    lines = []
    by = {(r["model"], r["op"], r["backend"]): r["median_ms"] for r in rows}
    for model in dict.fromkeys(r["model"] for r in rows):
        official = by[(model, "perturb+step", "official")]
        floor = by[(model, "copy 20 B/elem (floor)", "torch")]
        normal = by[(model, "noise", "torch.normal_")]
        for backend in dict.fromkeys(r["backend"] for r in rows if r["model"] == model):
            if (model, "perturb+step", backend) not in by or backend == "official":
                continue
            fused = by[(model, "perturb+step", backend)]
            noise = by[(model, "noise", backend)]
            paired = by.get((model, "perturb+step / floor (paired)", backend))
            paired = f" (paired: {paired:4.2f}x)" if paired is not None else ""
            lines.append(
                f"{model:<9} {backend:<10} perturb+step {fused:8.2f} ms: {official / fused:5.1f}x faster than the "
                f"official loop + SGD ({official:.1f} ms), {fused / floor:4.2f}x the copy floor ({floor:.1f} ms)"
                f"{paired}; noise {normal / noise:4.1f}x torch.normal_'s throughput"
            )
    return lines


def gpu_estimates(rows, models, out):
    """The model's estimate (rwp_kernels.gpu_model, float32, the configuration timed here) next to the
    measured medians of the fused GPU backends; written to bench_ops_estimate.csv."""
    from rwp_kernels import gpu_model

    backends_here = [b for b in ("cuda", "triton") if any(r["backend"] == b for r in rows)]
    if not backends_here:
        return
    gpu, source, index, errors = gpu_model.device_model(backends_here, ("fp32",))
    print(f"\nthe model's estimate (rwp_kernels.gpu_model: from the SASS, nothing measured) next to the measured "
          f"medians: {source}, HBM "
          f"{gpu.hbm_bytes_per_s / 1e12:.2f} TB/s, {gpu.sms} SMs, {gpu.clock_hz / 1e9:.2f} GHz")
    for err in errors:
        print(f"  no estimate for {err}")
    measured = {(r["model"], r["op"], r["backend"]): r["median_ms"] for r in rows}
    ops = {"perturb_": "perturb_", "sgd_step_": "sgd_step_", gpu_model.STEP: "perturb+step"}
    out_rows = []
    print(f"  {'model':<9} {'backend':<7} {'op':<13} {'measured':>10} {'estimate':>10} {'bound':<16} "
          f"{'meas/est':>8} {'% HBM peak meas / est':>22}")
    for model in models:
        for backend in backends_here:
            try:
                estimates = gpu_model.estimate_model(MODELS[model](), "fp32", gpu, index, backend, model)
            except KeyError as err:
                print(f"  {model:<9} {backend:<7} no estimate: {err.args[0]}")
                continue
            for e in estimates:
                ms = measured.get((model, ops[e.op], backend))
                if ms is None:
                    continue
                pct = e.min_bytes / gpu.hbm_bytes_per_s / (ms * 1e-3)
                print(f"  {model:<9} {backend:<7} {ops[e.op]:<13} {ms:8.3f} ms {e.time * 1e3:7.3f} ms {e.bound:<16} "
                      f"{ms / (e.time * 1e3):7.2f}x {pct:10.0%} / {e.pct_hbm_peak:.0%}")
                out_rows.append(dict(model=model, backend=backend, op=ops[e.op], gpu=gpu.name, measured_ms=ms,
                                     estimate_ms=e.time * 1e3, bound=e.bound,
                                     measured_over_estimate=ms / (e.time * 1e3),
                                     measured_pct_hbm_peak=100 * pct, estimate_pct_hbm_peak=100 * e.pct_hbm_peak,
                                     memory_ms=e.t_memory * 1e3, latency_ms=e.t_latency * 1e3,
                                     compute_ms=e.t_compute * 1e3, launch_ms=e.t_launch * 1e3))
    if out_rows:
        with open(out / "bench_ops_estimate.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(out_rows[0]))
            writer.writeheader()
            writer.writerows(out_rows)
        print(f"wrote {out / 'bench_ops_estimate.csv'}")


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    per_model = max(sum(r["model"] == m for r in rows) for m in models)
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 0.3 * per_model + 1.2), squeeze=False)
    for ax, model in zip(axes[0], models):
        mine = [r for r in rows if r["model"] == model]
        labels = [f"{r['op']} [{r['backend']}]" for r in mine]
        ax.barh(range(len(mine)), [r["median_ms"] for r in mine], color=[_color(r["backend"]) for r in mine])
        ax.set_yticks(range(len(mine)), labels, fontsize=7)
        ax.set_xscale("log")
        ax.invert_yaxis()
        ax.set_xlabel("median time per call (ms, log scale)")
        ax.set_title(f"{model}: {mine[0]['numel'] / 1e6:.1f}M params, {mine[0]['device']}, {mine[0]['threads']} threads")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _color(backend):
    return {"official": "tab:red", "torch": "tab:gray", "torch.normal_": "tab:gray", "reference": "tab:orange"}.get(
        backend, "tab:blue")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3, help="repeat the whole measurement; medians over rounds")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backends", nargs="+", default=None,
                        help="default: the fused backend for the device ('cpu' or 'cuda') and 'reference'")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA GPU is visible here (torch.cuda.is_available() is False), so there is "
                 "nothing to measure; python benchmarks/bench_gpu_model.py prints the GPU-blind estimate instead")
    names = args.backends or [device.type, "reference"]
    for name in names:
        reason = backends.unavailable_reason(name, device.type)
        if reason is not None:
            sys.exit(f"backend {name!r} is unavailable for {device.type} tensors: {reason}")
    print(f"torch {torch.__version__}, {device}, {torch.get_num_threads()} threads, backends {names}")

    rounds = []
    for r in range(args.rounds):
        print(f"round {r + 1}/{args.rounds}")
        rows = []
        for model in args.models:
            shapes = MODELS[model]()
            print(f"{model}: {len(shapes)} tensors, {sum(torch.Size(s).numel() for s in shapes) / 1e6:.1f}M parameters")
            rows += bench_model(model, shapes, device, args.repeats, names)
        rounds.append(rows)

    if args.rounds > 1:
        for r, rows in enumerate(rounds):
            print(f"\nround {r + 1}:")
            for line in summarize(rows):
                print(line)
        print(f"\nmedians over {args.rounds} rounds:")
    rows = median_over_rounds(rounds)
    for line in summarize(rows):
        print(line)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "bench_ops.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, args.out / "bench_ops.png")
    print(f"wrote {args.out / 'bench_ops.csv'} and {args.out / 'bench_ops.png'}")
    if device.type == "cuda":
        gpu_estimates(rows, args.models, args.out)


if __name__ == "__main__":
    main()
