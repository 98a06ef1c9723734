"""``python -m rwp_kernels.train``: train CNNs with SGD, RWP, adaptive RWP and SAM side by side.

With no arguments: scikit-learn's handwritten digits (shipped with scikit-learn, no download), a small
CNN, SGD vs RWP with the same seed and the same number of updates, and a table of test accuracy, test
loss and time per epoch. Bad input is reported in one line, before any long work starts.
"""
import argparse
import contextlib
import json
import math
import os
import statistics
import sys

import torch

from . import parallel
from .data import DATASETS, DataError, load_data
from .engine import RunConfig, run
from .methods import METHODS, SCHEDULES, MethodConfig, batches_per_update
from .netbuild import check_model_name

# What a run uses unless the dataset, a recipe or a flag says otherwise (in that order of precedence).
DEFAULTS = dict(
    dataset="digits", model=None, optimizer=["sgd", "rwp"], epochs=30, batch_size=64, lr=0.1, momentum=0.9,
    weight_decay=1e-3, nesterov=False, schedule="cosine", gamma=0.01, alpha=0.5, eta=0.1, beta=0.99, rho=0.05,
    rwp_schedule="halves", label_smoothing=0.0, cutout=False, amp="off", channels_last=False, compile=False,
    seeds=[0], workers=4,
)
DATASET_DEFAULTS = {
    "digits": dict(model="small_cnn", workers=0),
    "cifar10": dict(model="resnet18", batch_size=256, epochs=200),
    "cifar100": dict(model="resnet18", batch_size=256, epochs=200),
    "imagenet-folder": dict(model="torchvision:resnet18", batch_size=256, epochs=90, weight_decay=1e-4),
    "synthetic": dict(model="resnet18", batch_size=128, epochs=1, workers=0),
}
RECIPES = {
    "cifar-rwp": dict(optimizer=["rwp"], gamma=0.01, alpha=0.5, weight_decay=1e-3, batch_size=256, lr=0.1,
                      schedule="cosine", epochs=200, cutout=True, momentum=0.9),
    "cifar-arwp": dict(optimizer=["arwp"], gamma=0.015, alpha=0.5, eta=0.1, beta=0.99, weight_decay=1e-3,
                       batch_size=256, lr=0.1, schedule="cosine", epochs=200, cutout=True, momentum=0.9),
    "imagenet-rwp": dict(dataset="imagenet-folder", optimizer=["rwp"], gamma=0.005, alpha=0.5, weight_decay=1e-4,
                         batch_size=256, lr=0.1, schedule="cosine", epochs=90, momentum=0.9),
}


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rwp_kernels.train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--dataset", choices=DATASETS, help="default: digits (embedded, no download)")
    a("--data-dir", default="data", help="where CIFAR files or the ImageNet-style train/ and val/ folders are")
    a("--download", action="store_true", help="download CIFAR into --data-dir (needs network access)")
    a("--model", help="small_cnn, resnet18 (CIFAR-style), vgg16_bn, wrn16_8, wrn28_10, or a torchvision model "
                      "by name (torchvision:resnet18 for its ImageNet ResNet-18)")
    a("--optimizer", nargs="+", choices=METHODS, help="optimizers to compare (default: sgd rwp)")
    a("--recipe", choices=sorted(RECIPES), help="the official settings of the paper as a preset")
    a("--epochs", type=_positive_int,
      help="SGD's epochs; optimizers that use two batches per update (RWP's consecutive schedule) run "
           "twice as many data epochs, so that every optimizer makes the same number of updates")
    a("--batch-size", type=_positive_int, help="images per update (RWP's halves schedule splits it in two)")
    a("--lr", type=_non_negative)
    a("--momentum", type=_non_negative)
    a("--weight-decay", type=_non_negative)
    a("--nesterov", action="store_true", default=None)
    a("--schedule", choices=("cosine", "step", "constant"), help="learning-rate schedule over the epochs")
    a("--gamma", type=_non_negative, help="RWP noise scale relative to each filter's norm")
    a("--alpha", type=_fraction, help="weight of the perturbed gradient (1: perturbed pass only)")
    a("--eta", type=_non_negative, help="ARWP: strength of the Fisher scaling")
    a("--beta", type=_fraction, help="ARWP: decay of the Fisher estimate")
    a("--rho", type=_non_negative, help="SAM: radius of the ascent step")
    a("--rwp-schedule", choices=SCHEDULES,
      help="halves: clean and perturbed gradient on the two halves of a batch (SGD's compute); "
           "consecutive: on two consecutive batches (one update per two batches)")
    a("--label-smoothing", type=_fraction)
    a("--cutout", action="store_true", default=None, help="CIFAR: cutout augmentation (the paper's setting)")
    a("--amp", choices=("off", "bf16", "fp16"), help="autocast dtype (fp16 uses a GradScaler)")
    a("--channels-last", action="store_true", default=None)
    a("--compile", action="store_true", default=None, help="torch.compile the model")
    a("--seeds", nargs="+", type=int, help="one run per seed; mean and std are reported")
    a("--device", help="default: cuda if available, else cpu (--parallel: cuda:<local rank>)")
    a("--parallel", action="store_true",
      help="run under torchrun, one process per device: sgd as data parallelism, rwp with the clean and the "
           "perturbed pass on different processes at once (odd ranks perturbed); --batch-size is split over them")
    a("--workers", type=int, help="DataLoader worker processes")
    a("--backend", default="auto", choices=("auto", "reference", "cpu", "cuda", "triton"),
      help="rwp_kernels backend of the RWP optimizers")
    a("--out-dir", default="rwp_runs", help="logs, checkpoints, summary.json and the plot go here")
    a("--resume", action="store_true", help="continue each run from its last checkpoint in --out-dir")
    a("--stop-after", type=_positive_int, metavar="EPOCH",
      help="end each run after this epoch (e.g. for time-limited jobs; continue with --resume)")
    a("--plot", action="store_true", help="write curves.png with loss and accuracy per optimizer")
    a("--no-progress", action="store_true", help="no progress bars")
    a("--synthetic-train", type=_positive_int, default=2048, help="synthetic: training images")
    a("--synthetic-size", type=_positive_int, default=32, help="synthetic: image side length")
    return p


def resolve(args: argparse.Namespace) -> dict:
    """Merge defaults, dataset defaults, the recipe and explicit flags (later wins)."""
    settings = dict(DEFAULTS)
    recipe = RECIPES.get(args.recipe, {})
    dataset = args.dataset or recipe.get("dataset") or settings["dataset"]
    if args.recipe and args.recipe.startswith("cifar") and args.dataset is None:
        dataset = "cifar10"
    settings.update(DATASET_DEFAULTS[dataset])
    settings.update(recipe)
    settings["dataset"] = dataset
    for key in list(DEFAULTS) + ["model"]:
        value = getattr(args, key, None)
        if value is not None:
            settings[key] = value
    settings["device"] = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return settings


def _fail(message: str) -> int:
    print(f"rwp_kernels.train: error: {message}", file=sys.stderr)
    return 2


def _check_out_dir(path: str) -> None:
    os.makedirs(path, exist_ok=True)
    probe = os.path.join(path, f".write-test-{os.getpid()}")
    with open(probe, "w") as f:
        f.write("ok")
    os.remove(probe)


def _mean_std(values):
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _train_time(history) -> float:
    """Training time of a run, robust to one slow epoch: the median epoch time times the number of epochs."""
    return statistics.median(r["epoch_time"] for r in history) * len(history)


def summarize(results: dict, reference: str = "sgd") -> list[dict]:
    """One row per optimizer: final test accuracy/loss (mean, std over seeds), the median time per data
    epoch, and the training time relative to the reference optimizer's (same number of updates)."""
    rows = []
    base_time = statistics.mean(_train_time(h) for h in results[reference]) if reference in results else None
    for method, histories in results.items():
        acc = _mean_std([h[-1]["test_acc"] for h in histories])
        loss = _mean_std([h[-1]["test_loss"] for h in histories])
        epoch_time = statistics.mean(statistics.median(r["epoch_time"] for r in h) for h in histories)
        train_time = statistics.mean(_train_time(h) for h in histories)
        rows.append(dict(optimizer=method, seeds=len(histories), test_acc_mean=acc[0], test_acc_std=acc[1],
                         test_loss_mean=loss[0], test_loss_std=loss[1], epoch_time=epoch_time,
                         train_time=train_time, time_ratio=train_time / base_time if base_time else None))
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [f"{'optimizer':<10} {'seeds':>5} {'test acc (%)':>16} {'test loss':>17} {'s/epoch':>9} "
             f"{'train s':>9} {'time vs sgd':>12}"]
    for r in rows:
        acc = f"{100 * r['test_acc_mean']:.2f} ± {100 * r['test_acc_std']:.2f}"
        loss = f"{r['test_loss_mean']:.4f} ± {r['test_loss_std']:.4f}"
        ratio = f"{r['time_ratio']:.2f}x" if r["time_ratio"] is not None else "-"
        lines.append(f"{r['optimizer']:<10} {r['seeds']:>5} {acc:>16} {loss:>17} {r['epoch_time']:>9.3f} "
                     f"{r['train_time']:>9.2f} {ratio:>12}")
    return "\n".join(lines)


def command() -> None:
    """The process entry of ``python -m rwp_kernels.train`` and ``rwp-train``: ``main()``, then exit (under
    torchrun through ``parallel.exit_process``, which skips the interpreter's shutdown)."""
    code = main()
    if torch.distributed.is_torchelastic_launched():
        parallel.exit_process(code)
    sys.exit(code)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    s = resolve(args)
    try:
        check_model_name(s["model"])
        if s["device"].startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--device {s['device']} asked for, but no CUDA GPU is visible to torch")
        torch.device(s["device"])
        _check_out_dir(args.out_dir)
        data = load_data(s["dataset"], data_dir=args.data_dir, download=args.download, cutout=s["cutout"],
                         synthetic_size=args.synthetic_size, synthetic_train=args.synthetic_train)
        if s["batch_size"] > len(data.train):
            raise ValueError(f"--batch-size {s['batch_size']} is larger than the {len(data.train)} training images")
        if s["amp"] == "fp16" and "sam" in s["optimizer"]:
            raise ValueError("the SAM baseline does not support --amp fp16 (GradScaler); use --amp bf16")
        if args.parallel:
            ranks = _check_parallel(args, s)
        elif s["batch_size"] < 2 and any(m in ("rwp", "arwp") for m in s["optimizer"]) and s["alpha"] < 1:
            raise ValueError("RWP's halves schedule needs --batch-size >= 2")
        else:
            ranks = parallel.Ranks()
    except (ValueError, DataError, OSError, RuntimeError) as err:
        return _fail(str(err))
    with parallel.process_group(torch.device(s["device"])) if ranks.parallel else contextlib.nullcontext():
        return _train(args, s, data, ranks)


def _check_parallel(args: argparse.Namespace, s: dict) -> parallel.Ranks:
    """The checks of --parallel that need no other process; sets the device of this rank."""
    for method in s["optimizer"]:
        if method in parallel.UNSUPPORTED:
            raise ValueError(f"--parallel does not run {method}: {parallel.UNSUPPORTED[method]}")
    if "rwp" in s["optimizer"] and not 0 < s["alpha"] < 1:
        raise ValueError(f"--parallel needs 0 < --alpha < 1 (clean and perturbed ranks both contribute), got {s['alpha']}")
    if args.rwp_schedule == "consecutive":
        raise ValueError("--rwp-schedule consecutive does not apply to --parallel: the clean and the perturbed "
                         "pass run on different processes, each on its share of every batch")
    ranks = parallel.ranks_from_env()
    if s["batch_size"] % ranks.world:
        raise ValueError(f"--batch-size {s['batch_size']} does not split evenly over {ranks.world} processes")
    s["device"] = str(parallel.device_of(ranks, args.device))
    s["rwp_schedule"] = "halves"
    return ranks


def _train(args: argparse.Namespace, s: dict, data, ranks: parallel.Ranks) -> int:
    method_cfg = MethodConfig(lr=s["lr"], momentum=s["momentum"], weight_decay=s["weight_decay"],
                              nesterov=s["nesterov"], gamma=s["gamma"], alpha=s["alpha"], eta=s["eta"], beta=s["beta"],
                              rho=s["rho"], schedule=s["rwp_schedule"], backend=args.backend)
    experiment = os.path.join(args.out_dir, f"{s['dataset']}-{s['model'].replace(':', '-')}"
                              + (f"-parallel{ranks.world}" if ranks.parallel else ""))
    where = (f"{ranks.world} processes ({len(range(1, ranks.world, 2))} perturbed), device {s['device'].split(':')[0]}"
             if ranks.parallel else f"device {s['device']}")
    if ranks.is_main:
        print(f"rwp_kernels.train: {s['dataset']} ({len(data.train)} train / {len(data.test)} test images), "
              f"model {s['model']}, {s['epochs']} epochs, batch {s['batch_size']}, {where}; "
              f"optimizers {' '.join(s['optimizer'])}; seeds {' '.join(map(str, s['seeds']))}; output {experiment}")
    results = {}
    for method in s["optimizer"]:
        for seed in s["seeds"]:
            epochs = s["epochs"] * batches_per_update(method, method_cfg)
            cfg = RunConfig(method=method, seed=seed, model=s["model"], epochs=epochs, batch_size=s["batch_size"],
                            lr_schedule=s["schedule"], label_smoothing=s["label_smoothing"], amp=s["amp"],
                            channels_last=s["channels_last"], compile=s["compile"], device=s["device"],
                            workers=s["workers"], method_cfg=method_cfg, progress=not args.no_progress,
                            stop_after=args.stop_after, world_size=ranks.world)
            history = run(cfg, data, os.path.join(experiment, f"{method}-seed{seed}"), resume=args.resume,
                          ranks=ranks)
            if not ranks.is_main:
                continue
            last = history[-1]
            print(f"  {method:<5} seed {seed}: test acc {100 * last['test_acc']:.2f}%, test loss {last['test_loss']:.4f}, "
                  f"{statistics.median(r['epoch_time'] for r in history):.3f} s/epoch", flush=True)
            results.setdefault(method, []).append(history)
    if not ranks.is_main:
        return 0

    rows = summarize(results)
    print(format_table(rows))
    summary = dict(settings={k: v for k, v in s.items()}, results=rows,
                   runs={m: [h[-1] for h in hs] for m, hs in results.items()})
    with open(os.path.join(experiment, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    if args.plot:
        from .plot import plot_curves

        path = plot_curves(results, os.path.join(experiment, "curves.png"))
        print(f"plot: {path}")
    print(f"summary: {os.path.join(experiment, 'summary.json')}")
    return 0
