"""The Triton kernel variants that only a GPU can choose between, timed side by side.

The GPU-blind analysis (docs/triton.md, Limits) leaves two choices to the first measurement on a GPU:

* float32 rows kept in registers: perturb_kernel with PARTS = 5 (64 registers, 32 resident warps per SM; a
  row's first 2560 elements read from DRAM once), as shipped, or no kept rows (``tables.RESIDENT_PARTS = {}``:
  48 registers, 40 warps, every row longer than a tile read twice, the second time mostly from a cache);
* the 16-bit perturb_kernel at 48 registers (42 warps, about 40 more instructions per tile), as shipped, or at
  64 (32 warps).

    python benchmarks/bench_variants.py [--models resnet18 wrn28_10 resnet50] [--rounds 3] [--out DIR]

On a GPU, for each choice, model and variant: the median time of the Triton ``perturb_`` and of ``perturb_`` +
``sgd_step_`` (triton.testing.do_bench), the variants taking turns round by round so that they see the same
machine, each variant's time over the shipped one's (median over the rounds), and a verdict per choice (the
median ratio of the step over the models). Writes OUT/bench_variants_<device>.md and .csv. Without a GPU it
lists the variants and exits with status 2: nothing was measured. ``--device cpu`` under TRITON_INTERPRET=1 runs
the same steps through Triton's interpreter (a check of the script, not of the kernels' speed: use a small model
of rwp_kernels.models, e.g. ``--models small_cnn``).
"""
import argparse
import csv
import os
import statistics
import sys
from dataclasses import dataclass, field

import torch

import rwp_kernels as rk
from rwp_kernels import backends, models
from rwp_kernels._bench import times_ms
from rwp_kernels.gpu_model import MODELS, model_shapes

GAMMA, SEED, LR, MOMENTUM, WEIGHT_DECAY = 0.01, 1, 0.1, 0.9, 5e-4
OPS = ("perturb_", "perturb_ + sgd_step_")


@dataclass(frozen=True)
class Variant:
    name: str
    resident_parts: dict | None = None  # tables.RESIDENT_PARTS while it runs (None: as shipped)
    caps: dict = field(default_factory=dict)  # register caps over the shipped ones (tables.MAX_REGISTERS keys)


@dataclass(frozen=True)
class Choice:
    question: str
    dtype: torch.dtype
    variants: tuple  # the shipped variant (tests/test_benchmarks.py checks that it is), then the other
    switch: str  # what to change in rwp_kernels/triton/tables.py where the other variant is faster


CHOICES = (
    Choice("float32 rows kept in registers", torch.float32,
           (Variant("PARTS = 5, 64 registers (shipped)", resident_parts={4: 5}),
            Variant("no kept rows, 48 registers", resident_parts={})),
           "RESIDENT_PARTS = {}"),
    Choice("16-bit perturb_kernel registers", torch.bfloat16,
           (Variant("48 registers (shipped)", caps={("perturb_kernel", 2): 48}),
            Variant("64 registers", caps={("perturb_kernel", 2): 64})),
           'MAX_REGISTERS[("perturb_kernel", 2)] = 64'),
)


def _fused(params, grads):
    """perturb_ and perturb_ + sgd_step_ on the Triton backend (exact mode, momentum, weight decay)."""
    backups = [torch.empty_like(p) for p in params]
    bufs = [torch.zeros_like(p) for p in params]

    def perturb():
        rk.perturb_(params, gamma=GAMMA, seed=SEED, step=1, backups=backups, backend="triton")

    def step():
        perturb()
        rk.sgd_step_(params, grads, bufs, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, backups=backups,
                     backend="triton")

    return dict(zip(OPS, (perturb, step)))


def median_ms(fn, device: torch.device) -> float:
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, return_mode="median")
    return statistics.median(times_ms(fn, device, 3, warmup=1))


def measure(choice: Choice, model: str, rounds: int, device: torch.device) -> dict:
    """{(variant name, op): [ms per round]}: the variants take turns within each round."""
    from rwp_kernels.triton import tables

    torch.manual_seed(0)
    params = [torch.randn(shape, device=device).to(choice.dtype) for shape in model_shapes(model)[0]]
    grads = [torch.randn_like(p) for p in params]
    fns = _fused(params, grads)
    times = {}
    with torch.no_grad():
        for _ in range(rounds):
            for v in choice.variants:
                with tables.variant(v.resident_parts, v.caps):
                    for op in OPS:
                        times.setdefault((v.name, op), []).append(median_ms(fns[op], device))
    return times


def verdict(choice: Choice, ratios: list[float]) -> str:
    """The median over the models of the other variant's step time over the shipped one's, and what it says."""
    median = statistics.median(ratios)
    other = choice.variants[1].name
    if median < 1:
        return (f"{choice.question}: '{other}' is {100 * (1 - median):.1f} % faster (median over the models): "
                f"set {choice.switch}")
    return f"{choice.question}: the shipped variant is {100 * (median - 1):.1f} % faster than '{other}': keep it"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=sorted({*MODELS, *models.MODELS}))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--threads", type=int, default=None, help="accepted for symmetry with the other scripts")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args(argv)
    why = backends.unavailable_reason("triton", args.device)
    if why is not None:
        print(f"bench_variants: no GPU to measure on ({why}). The variants a GPU run compares:")
        for choice in CHOICES:
            print(f"  {choice.question} ({str(choice.dtype).removeprefix('torch.')}): "
                  + " | ".join(v.name for v in choice.variants))
        return 2
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)"
    rows, verdicts = [], []
    for choice in CHOICES:
        ratios = []
        for model in args.models:
            print(f"{choice.question}: {model} ...", flush=True)
            times = measure(choice, model, args.rounds, device)
            shipped = choice.variants[0].name
            for v in choice.variants:
                for op in OPS:
                    ms = statistics.median(times[(v.name, op)])
                    ratio = statistics.median(t / s for t, s in zip(times[(v.name, op)], times[(shipped, op)]))
                    rows.append(dict(choice=choice.question, model=model, variant=v.name, op=op, ms=f"{ms:.4f}",
                                     x_shipped=f"{ratio:.3f}"))
                    if v.name != shipped and op == OPS[-1]:
                        ratios.append(ratio)
        verdicts.append(verdict(choice, ratios))
    lines = [f"# Triton kernel variants on {name} ({args.rounds} rounds, medians)", "",
             "| choice | model | variant | op | ms | x shipped |", "|---|---|---|---|---:|---:|"]
    lines += [f"| {r['choice']} | {r['model']} | {r['variant']} | {r['op']} | {r['ms']} | {r['x_shipped']} |"
              for r in rows]
    lines += [""] + verdicts
    text = "\n".join(lines)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    tag = name.replace(" ", "_")
    with open(os.path.join(args.out, f"bench_variants_{tag}.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(args.out, f"bench_variants_{tag}.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
