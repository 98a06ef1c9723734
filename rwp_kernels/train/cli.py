"""``python -m rwp_kernels.train``: train CNNs with SGD, RWP, adaptive RWP and SAM side by side.

With no arguments: scikit-learn's handwritten digits (shipped with scikit-learn, no download), a small
CNN, SGD vs RWP with the same seed and the same number of updates, and a table of test accuracy, test
loss and time per epoch. Bad input is reported in one line, before any long work starts.
"""
import argparse
import contextlib
import importlib.util
import json
import math
import os
import statistics
import sys

import torch
from torch import nn

from ..backends import unavailable_reason
from . import checkpoint, parallel
from .data import DATASETS, Data, DataError, load_data
from .engine import CHECKPOINT, LOG, RunConfig, run
from .methods import METHODS, SCHEDULES, MethodConfig, autocast_factory, batches_per_update, build_optimizer
from .netbuild import build_network, check_model_name

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
# The settings that decide what a run computes: those of every run, of its optimizer and of its dataset.
# --resume refuses a checkpoint made with other values; the other flags (--workers, the output flags, the
# index of a --device) may change.
RUN_SETTINGS = ("dataset", "model", "epochs", "batch_size", "schedule", "label_smoothing", "amp", "channels_last",
                "compile", "device")
SGD_SETTINGS = ("lr", "momentum", "weight_decay", "nesterov")
RWP_SETTINGS = SGD_SETTINGS + ("gamma", "alpha", "rwp_schedule", "backend")
METHOD_SETTINGS = {"sgd": SGD_SETTINGS, "sam": SGD_SETTINGS + ("rho",), "rwp": RWP_SETTINGS,
                   "arwp": RWP_SETTINGS + ("eta", "beta")}
DATA_SETTINGS = {"cifar10": ("cutout",), "cifar100": ("cutout",), "synthetic": ("synthetic_train", "synthetic_size")}
# The data order of a run is seeded with seed * 100003 + epoch, which must stay below 2**64.
SEED_LIMIT = 2**32


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _seed(text: str) -> int:
    value = int(text)
    if not 0 <= value < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**32), got {value}")
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
    a("--model", help="small_cnn, resnet18 (CIFAR-style), vgg16_bn, wrn16_8, wrn28_10, a torchvision model "
                      "by name (torchvision:resnet18 for its ImageNet ResNet-18), or a timm model as timm:<name> "
                      "(e.g. timm:resnet10t; needs timm; never pretrained)")
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
    a("--seeds", nargs="+", type=_seed, help="one run per seed; mean and std are reported")
    a("--device", help="default: cuda if available, else cpu (--parallel: cuda:<local rank>)")
    a("--parallel", action="store_true",
      help="run under torchrun, one process per device: sgd as data parallelism, rwp with the clean and the "
           "perturbed pass on different processes at once (odd ranks perturbed); --batch-size is split over them")
    a("--workers", type=_non_negative_int, help="DataLoader worker processes")
    a("--backend", default="auto", choices=("auto", "reference", "cpu", "cuda", "triton"),
      help="rwp_kernels backend of the RWP optimizers")
    a("--out-dir", default="rwp_runs", help="logs, checkpoints, summary.json and the plot go here")
    a("--resume", action="store_true",
      help="continue each run from its last checkpoint in --out-dir (with the same settings)")
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
    settings["backend"] = args.backend
    if dataset == "synthetic":
        settings.update(synthetic_train=args.synthetic_train, synthetic_size=args.synthetic_size)
    return settings


def run_settings(s: dict, method: str) -> dict:
    """The settings that decide what ``method``'s runs compute (kept in their checkpoints)."""
    keys = RUN_SETTINGS + METHOD_SETTINGS[method] + DATA_SETTINGS.get(s["dataset"], ())
    settings = {key: s[key] for key in keys}
    settings["device"] = torch.device(s["device"]).type
    return settings


def setting_changes(saved: dict, current: dict) -> list[str]:
    """``--flag old -> new`` for every setting of ``current`` that differs from ``saved``."""
    return [f"--{key.replace('_', '-')} {saved.get(key)} -> {value}" for key, value in current.items()
            if saved.get(key) != value]


def _fail(message: str) -> int:
    print(f"rwp_kernels.train: error: {message}", file=sys.stderr)
    return 2


def _method_config(s: dict) -> MethodConfig:
    return MethodConfig(lr=s["lr"], momentum=s["momentum"], weight_decay=s["weight_decay"], nesterov=s["nesterov"],
                        gamma=s["gamma"], alpha=s["alpha"], eta=s["eta"], beta=s["beta"], rho=s["rho"],
                        schedule=s["rwp_schedule"], backend=s["backend"])


def _experiment_dir(out_dir: str, s: dict, ranks: parallel.Ranks) -> str:
    return os.path.join(out_dir, f"{s['dataset']}-{s['model'].replace(':', '-')}"
                        + (f"-parallel{ranks.world}" if ranks.parallel else ""))


def _runs(experiment: str, s: dict) -> list[tuple[str, int, str]]:
    """(optimizer, seed, run folder) of every run, in the order they train."""
    return [(method, seed, os.path.join(experiment, f"{method}-seed{seed}"))
            for method in s["optimizer"] for seed in s["seeds"]]


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
        data, ranks = _check_all(args, s)
    except (ValueError, DataError, OSError, RuntimeError) as err:
        return _fail(str(err))
    with parallel.process_group(torch.device(s["device"])) if ranks.parallel else contextlib.nullcontext():
        return _train(args, s, data, ranks)


def _check_all(args: argparse.Namespace, s: dict) -> tuple[Data, parallel.Ranks]:
    """Every check of the input, before the first run trains; the data and this process's ranks. The checks
    that need no data come first (loading it can take a while)."""
    check_model_name(s["model"])
    _check_unique(s)
    ranks = _check_parallel(args, s) if args.parallel else parallel.Ranks()
    _check_device(s)
    _check_amp(s)
    _check_backend(s)
    _check_optimizer_settings(s)
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise ValueError("--plot needs matplotlib: pip install 'rwp-kernels[train]'")
    experiment = _experiment_dir(args.out_dir, s, ranks)
    _check_writable(experiment, ("summary.json", "curves.png"))
    for _, _, run_dir in _runs(experiment, s):
        _check_writable(run_dir, (CHECKPOINT, CHECKPOINT + ".tmp", LOG))
    if args.resume:
        _check_resume(s, experiment)
    data = load_data(s["dataset"], data_dir=args.data_dir, download=args.download, cutout=s["cutout"],
                     synthetic_size=args.synthetic_size, synthetic_train=args.synthetic_train)
    _check_batch_size(s, data, ranks)
    _check_network(s, data)
    return data, ranks


def _check_unique(s: dict) -> None:
    for flag, values in (("--optimizer", s["optimizer"]), ("--seeds", s["seeds"])):
        repeated = sorted({str(v) for v in values if values.count(v) > 1})
        if repeated:
            raise ValueError(f"{flag} names {', '.join(repeated)} more than once")


def _check_device(s: dict) -> None:
    device = torch.device(s["device"])
    if device.type != "cuda":
        return  # other devices: moving the network there (_check_network) tells
    if not torch.cuda.is_available():
        raise ValueError(f"--device {s['device']} asked for, but no CUDA GPU is visible to torch")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {s['device']} asked for, but torch sees {torch.cuda.device_count()} GPU(s)")


def _check_amp(s: dict) -> None:
    if s["amp"] == "fp16" and "sam" in s["optimizer"]:
        raise ValueError("the SAM baseline does not support --amp fp16 (GradScaler); use --amp bf16")
    if s["amp"] == "bf16" and torch.device(s["device"]).type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("--amp bf16: this GPU does not support bfloat16; use --amp fp16")


def _check_backend(s: dict) -> None:
    """An explicit --backend of the RWP optimizers runs on the device (auto always finds one)."""
    if s["backend"] == "auto" or not {"rwp", "arwp"} & set(s["optimizer"]):
        return
    device_type = torch.device(s["device"]).type
    reason = unavailable_reason(s["backend"], device_type)
    if reason is not None:
        raise ValueError(f"--backend {s['backend']} cannot run on {device_type} tensors here: {reason}")


def _check_optimizer_settings(s: dict) -> None:
    """The optimizers accept the settings (e.g. --nesterov needs a --momentum)."""
    probe = nn.Linear(1, 1)
    for method in s["optimizer"]:
        try:
            build_optimizer(method, probe, _method_config(s), s["seeds"][0])
        except ValueError as err:
            raise ValueError(f"--optimizer {method}: {err}") from None


def _check_writable(folder: str, files: tuple[str, ...]) -> None:
    """Create ``folder``, and make sure files can be written in it, over those of ``files`` that exist too."""
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".write-test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as err:
        raise OSError(f"cannot write in {folder}: {err.strerror or err}") from None
    for name in files:
        path = os.path.join(folder, name)
        if os.path.isdir(path) or (os.path.exists(path) and not os.access(path, os.W_OK)):
            raise OSError(f"cannot write {path}")


def _check_resume(s: dict, experiment: str) -> None:
    """Every checkpoint to resume from loads and was made with the settings given now."""
    changes = []
    for method, _, run_dir in _runs(experiment, s):
        path = os.path.join(run_dir, CHECKPOINT)
        if os.path.exists(path):
            saved = checkpoint.load(path)["config"]["settings"]
            changes += [c for c in setting_changes(saved, run_settings(s, method)) if c not in changes]
    if changes:
        raise ValueError(f"--resume: the checkpoints in {experiment} were trained with other settings: "
                         f"{', '.join(changes)}; give those again, or another --out-dir to start over")


def _check_batch_size(s: dict, data: Data, ranks: parallel.Ranks) -> None:
    train_images, method_cfg = len(data.train), _method_config(s)
    if s["batch_size"] > train_images:
        raise ValueError(f"--batch-size {s['batch_size']} is larger than the {train_images} training images")
    if any(batches_per_update(m, method_cfg) == 2 for m in s["optimizer"]) and 2 * s["batch_size"] > train_images:
        raise ValueError(f"--rwp-schedule consecutive makes an update of two batches of {s['batch_size']}, more "
                         f"than the {train_images} training images")
    halves = not ranks.parallel and s["rwp_schedule"] == "halves" and s["alpha"] < 1
    if halves and s["batch_size"] < 2 and {"rwp", "arwp"} & set(s["optimizer"]):
        raise ValueError("RWP's halves schedule needs --batch-size >= 2")


def _check_network(s: dict, data: Data) -> None:
    """The network takes the dataset's images on the device (vgg16_bn's five poolings, for one, need more
    than digits' 8x8 pixels)."""
    device = torch.device(s["device"])
    net = build_network(s["model"], data).to(device).eval()
    images = torch.stack([data.test[i][0] for i in range(min(2, len(data.test)))]).to(device)
    try:
        with torch.no_grad(), autocast_factory(s["amp"], device)():
            net(images)
    except (RuntimeError, AssertionError, ValueError) as err:  # timm's models check sizes with assertions
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"--model {s['model']} does not run on {s['dataset']} images: {reason}") from None


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
    method_cfg = _method_config(s)
    experiment = _experiment_dir(args.out_dir, s, ranks)
    where = (f"{ranks.world} processes ({len(range(1, ranks.world, 2))} perturbed), device {s['device'].split(':')[0]}"
             if ranks.parallel else f"device {s['device']}")
    if ranks.is_main:
        print(f"rwp_kernels.train: {s['dataset']} ({len(data.train)} train / {len(data.test)} test images), "
              f"model {s['model']}, {s['epochs']} epochs, batch {s['batch_size']}, {where}; "
              f"optimizers {' '.join(s['optimizer'])}; seeds {' '.join(map(str, s['seeds']))}; output {experiment}")
    results = {}
    for method, seed, run_dir in _runs(experiment, s):
        epochs = s["epochs"] * batches_per_update(method, method_cfg)
        cfg = RunConfig(method=method, seed=seed, model=s["model"], epochs=epochs, batch_size=s["batch_size"],
                        lr_schedule=s["schedule"], label_smoothing=s["label_smoothing"], amp=s["amp"],
                        channels_last=s["channels_last"], compile=s["compile"], device=s["device"],
                        workers=s["workers"], method_cfg=method_cfg, progress=not args.no_progress,
                        stop_after=args.stop_after, world_size=ranks.world, settings=run_settings(s, method))
        ckpt_path = os.path.join(run_dir, CHECKPOINT)
        if args.resume and ranks.is_main and not os.path.exists(ckpt_path):
            print(f"rwp_kernels.train: --resume: no checkpoint at {ckpt_path}; starting {method} seed {seed} "
                  f"from scratch", file=sys.stderr, flush=True)
        try:
            history = run(cfg, data, run_dir, resume=args.resume, ranks=ranks)
        except checkpoint.CheckpointError as err:
            return _fail(str(err))
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
