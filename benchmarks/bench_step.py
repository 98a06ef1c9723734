"""Time per step of RWP's optimizer side and of a whole training step, against SGD, the official loop and SAM.

1. Optimizer side (perturb + step; no forward/backward) on the parameters of the CIFAR ResNet-18 and of
   WRN-28-10, gradients filled with random values: torch.optim.SGD (default, foreach, fused), RWPSGD, and
   the official per-parameter loop (rwp_kernels.official, after nblt/mARWP train_marwp.py: noise per
   parameter with one .item() per 1-D parameter, add_, sub_, the gradient mix through flat vectors, then SGD).
2. Whole training step (forward + backward + optimizer) of a CNN: SGD on a batch; RWPSGD with the batch
   split in two halves (the same forward/backward work as SGD); RWPSGD with the whole batch twice; the
   official loop on two halves; SAM (two passes on the whole batch).

Medians over --reps timed repetitions (after --warmup), all in one run; ratios against SGD. The ratios
the targets are stated in are also measured as the median over 3 x --reps back-to-back pairs of calls
(RWPSGD and the SGD step; the split-batch RWP step and the SGD step), which a shared machine's slow
phases affect least. Writes benchmarks/results/bench_step.csv and bench_step.png and prints a Markdown
table.

    python benchmarks/bench_step.py                 # CPU, the backend "auto" picks
    python benchmarks/bench_step.py --quick         # a fast smoke run (small shapes, 1 rep)
    python benchmarks/bench_step.py --device cuda --batch 256
"""
import argparse
import csv
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

from rwp_kernels import backends, models
from rwp_kernels._bench import paired_ratio, times_ms
from rwp_kernels.official import OfficialRWP
from rwp_kernels.optim import RWPSGD, freeze_bn_stats

OUT_DIR = Path(__file__).resolve().parent / "results"
SGD_KW = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)
GAMMA, ALPHA, RHO = 0.01, 0.5, 0.05


def median_ms(fn, device, reps: int, warmup: int) -> float:
    return statistics.median(times_ms(fn, device, reps, warmup=warmup))


# ------------------------------------------------------------------------------------- optimizer side
def optimizer_side(model_name: str, device, backend: str, reps: int, warmup: int) -> list[dict]:
    torch.manual_seed(0)
    model = models.build_model(model_name).to(device)
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    numel = sum(p.numel() for p in params)

    def sgd_case(**kw):
        opt = torch.optim.SGD(params, **SGD_KW, **kw)
        return opt.step

    rwp = RWPSGD(params, **SGD_KW, gamma=GAMMA, alpha=ALPHA, seed=0, backend=backend)

    def rwp_step():
        rwp.perturb()
        rwp.step()

    # The gradients in p.grad stand for both passes (none is run).
    official_step = OfficialRWP(model, torch.optim.SGD(params, **SGD_KW), gamma=GAMMA, alpha=ALPHA).step

    cases = [("SGD (default)", sgd_case()), ("SGD foreach", sgd_case(foreach=True))]
    try:
        cases.append(("SGD fused", sgd_case(fused=True)))
    except (RuntimeError, ValueError) as err:
        print(f"  SGD fused unavailable on {device.type}: {err}")
    cases += [("RWPSGD perturb+step", rwp_step), ("official loop", official_step)]
    rows = []
    for name, fn in cases:
        ms = median_ms(fn, device, reps, warmup)
        rows.append(dict(section="optimizer", model=model_name, method=name, ms=ms, numel=numel))
        print(f"  {model_name:10s} {name:22s} {ms:10.2f} ms")
    steps = dict(cases)
    rwp_row = next(r for r in rows if r["method"] == "RWPSGD perturb+step")
    for key, baseline in (("paired_x_foreach", "SGD foreach"), ("paired_x_fused", "SGD fused")):
        if baseline in steps:
            rwp_row[key] = paired_ratio(rwp_step, steps[baseline], 3 * reps, device, warmup)
            print(f"  {model_name:10s} RWPSGD / {baseline}, paired {rwp_row[key]:7.2f} x")
    return rows


# ------------------------------------------------------------------------------------- training step
def training_step(model_name: str, device, backend: str, batch: int, image: int, reps: int, warmup: int):
    torch.manual_seed(0)
    model = models.build_model(model_name).to(device).train()
    params = list(model.parameters())
    x = torch.randn(batch, 3, image, image, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    half = batch // 2

    def fwd_bwd(xb, yb):
        F.cross_entropy(model(xb), yb).backward()

    sgd = torch.optim.SGD(params, **SGD_KW)

    def sgd_step():
        sgd.zero_grad()
        fwd_bwd(x, y)
        sgd.step()

    rwp = RWPSGD(params, **SGD_KW, gamma=GAMMA, alpha=ALPHA, seed=0, backend=backend)

    def rwp_step(clean, perturbed):
        rwp.zero_grad()
        fwd_bwd(*clean)
        with rwp.perturbed(), freeze_bn_stats(model):
            fwd_bwd(*perturbed)
        rwp.step()

    official = OfficialRWP(model, sgd, gamma=GAMMA, alpha=ALPHA)

    def official_step():
        official.step(lambda: fwd_bwd(x[:half], y[:half]), lambda: fwd_bwd(x[half:], y[half:]))

    def sam_step():
        sgd.zero_grad()
        fwd_bwd(x, y)
        with torch.no_grad():
            norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
            eps = [p.grad * (RHO / (norm + 1e-12)) for p in params]
            torch._foreach_add_(params, eps)
        sgd.zero_grad()
        with freeze_bn_stats(model):
            fwd_bwd(x, y)
        with torch.no_grad():
            torch._foreach_sub_(params, eps)
        sgd.step()

    cases = [
        ("SGD", sgd_step),
        ("RWP two half batches", lambda: rwp_step((x[:half], y[:half]), (x[half:], y[half:]))),
        ("RWP whole batch twice", lambda: rwp_step((x, y), (x, y))),
        ("official loop, halves", official_step),
        ("SAM", sam_step),
    ]
    rows = []
    for name, fn in cases:
        ms = median_ms(fn, device, reps, warmup)
        rows.append(dict(section="training", model=f"{model_name} b{batch} {image}px", method=name, ms=ms,
                         numel=sum(p.numel() for p in params)))
        print(f"  {model_name:10s} {name:22s} {ms:10.2f} ms")
    split = next(r for r in rows if r["method"] == "RWP two half batches")
    split["paired_x_sgd"] = paired_ratio(dict(cases)["RWP two half batches"], sgd_step, 3 * reps, device, warmup)
    print(f"  {model_name:10s} RWP two half batches / SGD, paired {split['paired_x_sgd']:7.2f} x")
    return rows


# ------------------------------------------------------------------------------------- report
def add_ratios(rows):
    base = {}
    for r in rows:
        if r["method"] in ("SGD (default)", "SGD"):
            base[(r["section"], r["model"])] = r["ms"]
    foreach = {(r["section"], r["model"]): r["ms"] for r in rows if r["method"] == "SGD foreach"}
    fused = {(r["section"], r["model"]): r["ms"] for r in rows if r["method"] == "SGD fused"}
    for r in rows:
        key = (r["section"], r["model"])
        r["x_sgd"] = r["ms"] / base[key]
        r["x_foreach"] = r["ms"] / foreach[key] if key in foreach else float("nan")
        r["x_fused"] = r["ms"] / fused[key] if key in fused else float("nan")


def markdown(rows) -> str:
    lines = ["| section | model | method | median ms | x SGD | x SGD foreach | x SGD fused |",
             "|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        cells = [f"{r['x_foreach']:.2f}" if r["x_foreach"] == r["x_foreach"] else "",
                 f"{r['x_fused']:.2f}" if r["x_fused"] == r["x_fused"] else ""]
        lines.append(f"| {r['section']} | {r['model']} | {r['method']} | {r['ms']:.2f} | {r['x_sgd']:.2f} | "
                     f"{cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def plot(rows, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["section"], r["model"]) for r in rows}, key=lambda k: (k[0] != "optimizer", k[1]))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (section, model) in zip(axes[0], panels):
        sub = [r for r in rows if (r["section"], r["model"]) == (section, model)]
        ax.barh([r["method"] for r in sub], [r["ms"] for r in sub], color="tab:blue")
        for i, r in enumerate(sub):
            ax.text(r["ms"], i, f" {r['x_sgd']:.2f}x", va="center", fontsize=8)
        if section == "optimizer":  # the methods span orders of magnitude
            ax.set_xscale("log")
        else:
            ax.set_xlim(0, 1.25 * max(r["ms"] for r in sub))
        ax.set_xlabel("median ms per step" + (" (log)" if section == "optimizer" else ""))
        ax.set_title(f"{section}: {model}", fontsize=9)
        ax.invert_yaxis()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backend", default="auto", help="rwp_kernels backend for RWPSGD (default: auto)")
    parser.add_argument("--opt-models", nargs="*", default=["resnet18", "wrn28_10"])
    parser.add_argument("--train-model", default="resnet18")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--image", type=int, default=32)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="smoke run: small_cnn and ResNet-18, 1 rep")
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    args = parser.parse_args(argv)
    if args.quick:
        args.opt_models, args.train_model, args.batch, args.image = ["resnet18"], "small_cnn", 16, 8
        args.reps, args.warmup = 1, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    chosen = args.backend if args.backend != "auto" else backends.auto_choice(device.type)[0]
    print(f"device {device}, RWPSGD backend {chosen}, torch {torch.__version__}, {torch.get_num_threads()} threads")

    rows = []
    print("optimizer side (perturb + step):")
    for name in args.opt_models:
        rows += optimizer_side(name, device, args.backend, args.reps, args.warmup)
    print("whole training step:")
    rows += training_step(args.train_model, device, args.backend, args.batch, args.image, args.reps, args.warmup)
    add_ratios(rows)
    for r in rows:
        r["backend"], r["device"] = chosen, str(device)

    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "bench_step.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)), restval="")
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, args.out / "bench_step.png", f"rwp_kernels bench_step ({device}, RWPSGD backend: {chosen})")
    print()
    print(markdown(rows))
    print(f"\nwrote {args.out / 'bench_step.csv'} and {args.out / 'bench_step.png'}")
    for r in rows:
        if r["method"] == "RWPSGD perturb+step":
            print(f"target {r['model']}: RWPSGD/SGD foreach {r['x_foreach']:.2f}, paired "
                  f"{r.get('paired_x_foreach', float('nan')):.2f} (<= 1.5); RWPSGD/SGD fused {r['x_fused']:.2f}, "
                  f"paired {r.get('paired_x_fused', float('nan')):.2f} (<= 3)")
        if r["method"] == "RWP two half batches":
            print(f"target {r['model']}: split-batch RWP step / SGD step {r['x_sgd']:.2f}, paired "
                  f"{r['paired_x_sgd']:.2f} (<= 1.10)")


if __name__ == "__main__":
    main()
