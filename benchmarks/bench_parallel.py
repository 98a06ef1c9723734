"""Time per training step of parallel RWP (ParallelRWP, 2 processes) against SGD, on the CPU with gloo.

Every process runs on one CPU thread and the same per-process batch, so that each configuration does
the same forward/backward work per process:

- ``sgd``: one process, torch.optim.SGD (the time RWP wants to match);
- ``ddp-sgd``: two processes, DistributedDataParallel and torch.optim.SGD (plain data parallelism: what
  the all-reduce costs);
- ``parallel-rwp``: two processes, rank 0 clean and rank 1 perturbed, RWPSGD through ParallelRWP.

Step time: zero_grad + forward + backward (+ the all-reduce) + step, measured on rank 0 after --warmup
steps; medians over --steps steps, each configuration run --repeats times interleaved; the table gives
the median of those medians and the ratios against ``sgd``. Writes benchmarks/results/bench_parallel.csv.

    python benchmarks/bench_parallel.py                       # CIFAR ResNet-18, batch 16 per process
    python benchmarks/bench_parallel.py --model small_cnn --size 8 --channels 1 --batch 64
    python benchmarks/bench_parallel.py --quick               # a fast smoke run
"""
import argparse
import contextlib
import csv
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from rwp_kernels import models
from rwp_kernels.optim import ParallelRWP, RWPSGD

OUT_DIR = Path(__file__).resolve().parent / "results"
SGD_KW = dict(lr=0.05, momentum=0.9, weight_decay=5e-4)
CONFIGS = {"sgd": 1, "ddp-sgd": 2, "parallel-rwp": 2}  # name -> processes


def _worker(rank: int, config: str, args: argparse.Namespace, init_file: str, out_file: str) -> None:
    torch.set_num_threads(1)
    world = CONFIGS[config]
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = models.build_model(args.model, num_classes=10, in_channels=args.channels)
        if world > 1:
            model = DistributedDataParallel(model)
        if config == "parallel-rwp":
            opt = RWPSGD(model.parameters(), **SGD_KW, gamma=0.01, alpha=0.5, seed=0, backend=args.backend)
            par = ParallelRWP(model, opt)
            step_pass = par.pass_
        else:
            opt = torch.optim.SGD(model.parameters(), **SGD_KW)
            step_pass = contextlib.nullcontext
        g = torch.Generator().manual_seed(rank)
        x = torch.randn(args.batch, args.channels, args.size, args.size, generator=g)
        y = torch.randint(0, 10, (args.batch,), generator=g)
        times = []
        for i in range(args.warmup + args.steps):
            start = time.perf_counter()
            opt.zero_grad()
            with step_pass():
                F.cross_entropy(model(x), y).backward()
            opt.step()
            if i >= args.warmup:
                times.append(time.perf_counter() - start)
        if rank == 0:
            torch.save(times, out_file)
    finally:
        if world > 1:
            dist.destroy_process_group()
    if world > 1:
        # Skip the interpreter's shutdown, where gloo's threads can abort the process (as the training
        # command's workers do: rwp_kernels.train.parallel.exit_process).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def measure(config: str, args: argparse.Namespace) -> float:
    """Median step time (ms) on rank 0 of one run of ``config``."""
    with tempfile.TemporaryDirectory() as tmp:
        out_file = os.path.join(tmp, "times.pt")
        mp.start_processes(_worker, args=(config, args, os.path.join(tmp, "init"), out_file),
                           nprocs=CONFIGS[config], join=True, start_method="spawn")
        return 1e3 * statistics.median(torch.load(out_file))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet18", choices=sorted(models.MODELS))
    p.add_argument("--batch", type=int, default=16, help="images per process and step")
    p.add_argument("--size", type=int, default=32, help="image side")
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--backend", default="auto", help="rwp_kernels backend of RWPSGD")
    p.add_argument("--quick", action="store_true", help="small_cnn on 8x8 images, few steps, one repeat")
    args = p.parse_args()
    if args.quick:
        args.model, args.size, args.channels, args.batch, args.steps, args.warmup, args.repeats = \
            "small_cnn", 8, 1, 32, 5, 2, 1
    if not dist.is_available() or not dist.is_gloo_available():
        raise SystemExit("bench_parallel.py needs torch.distributed with gloo")

    print(f"{args.model}, batch {args.batch} per process, {args.size}x{args.size}x{args.channels}, one thread per "
          f"process, {args.steps} steps after {args.warmup} warm-up, {args.repeats} repeats", flush=True)
    runs = {config: [] for config in CONFIGS}
    for r in range(args.repeats):
        for config in CONFIGS:
            runs[config].append(measure(config, args))
            print(f"  repeat {r + 1}/{args.repeats}: {config:<13} {runs[config][-1]:9.2f} ms/step", flush=True)

    base = statistics.median(runs["sgd"])
    rows = []
    print("\n| configuration | processes | ms/step (median) | vs sgd |\n|---|---:|---:|---:|")
    for config, times in runs.items():
        ms = statistics.median(times)
        rows.append(dict(model=args.model, batch=args.batch, config=config, processes=CONFIGS[config],
                         ms_per_step=round(ms, 3), ratio_vs_sgd=round(ms / base, 3)))
        print(f"| {config} | {CONFIGS[config]} | {ms:.2f} | {ms / base:.2f}x |")
    OUT_DIR.mkdir(exist_ok=True)
    path = OUT_DIR / "bench_parallel.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
