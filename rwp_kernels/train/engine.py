"""One training run (one optimizer, one seed): epochs with a progress bar, evaluation, a JSON-lines log,
a checkpoint after every epoch, and a bit-exact resume from it. Under ``--parallel`` every rank trains on
its share of each batch, and rank 0 alone evaluates, logs and checkpoints."""
import json
import os
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..optim import ParallelRWP
from . import checkpoint, parallel
from .data import Data, make_loader
from .methods import MethodConfig, Stepper, autocast_factory, batches_per_update, build_optimizer
from .netbuild import build_network

CHECKPOINT = "checkpoint.pt"
LOG = "log.jsonl"


@dataclass
class RunConfig:
    method: str
    seed: int
    model: str
    epochs: int
    batch_size: int
    lr_schedule: str  # "cosine", "step" (x0.1 at 50% and 75%) or "constant"
    label_smoothing: float
    amp: str  # "off", "bf16", "fp16"
    channels_last: bool
    compile: bool
    device: str
    workers: int
    method_cfg: MethodConfig
    progress: bool = True
    stop_after: int | None = None  # end this invocation after that epoch (continue later with resume)
    world_size: int = 1  # processes of a --parallel run
    settings: dict = field(default_factory=dict)  # the command's settings that decide this run (checked on resume)


def _scheduler(optimizer, schedule: str, epochs: int):
    if schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    if schedule == "step":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[epochs // 2, epochs * 3 // 4], gamma=0.1)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _restore(path: str, net, optimizer, scheduler, scaler) -> tuple[list[dict], int]:
    """Load the checkpoint at ``path`` into the run's objects (each copies the tensors to its device; the RNG
    states stay on the CPU); its history and the epoch to continue from."""
    ckpt = checkpoint.load(path)
    try:
        net.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if scaler is not None and ckpt["scaler"]:
            scaler.load_state_dict(ckpt["scaler"])
        _set_rng_state(ckpt["rng"])
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise checkpoint.CheckpointError(f"checkpoint {path}: does not fit this run ({reason})") from None
    return ckpt["history"], ckpt["epoch"]


@torch.no_grad()
def evaluate(model: nn.Module, loader, criterion, device, autocast) -> tuple[float, float]:
    model.eval()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    count = 0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast():
            out = model(x)
            loss_sum += criterion(out, y).float() * len(y)
        correct += (out.argmax(1) == y).sum()
        count += len(y)
    return loss_sum.item() / count, correct.item() / count


def _grouped(loader, size: int):
    group = []
    for batch in loader:
        group.append(batch)
        if len(group) == size:
            yield group
            group = []


def run(cfg: RunConfig, data: Data, run_dir: str, *, resume: bool = False,
        ranks: parallel.Ranks = parallel.Ranks()) -> list[dict]:
    """Train, evaluate after every epoch, and return the per-epoch records (also in run_dir/log.jsonl);
    under --parallel the records on rank 0 only (the other ranks return an empty list)."""
    from tqdm.auto import tqdm

    device = torch.device(cfg.device)
    os.makedirs(run_dir, exist_ok=True)
    torch.manual_seed(cfg.seed)
    net = build_network(cfg.model, data).to(device)
    if cfg.channels_last:
        net = net.to(memory_format=torch.channels_last)
    model = parallel.wrap(net, device) if ranks.parallel else net
    forward = torch.compile(model) if cfg.compile else model
    # DDP's forward is collective: rank 0 evaluates the plain network alone.
    evaluated = forward if not ranks.parallel else net
    optimizer = build_optimizer(cfg.method, model, cfg.method_cfg, cfg.seed)
    scheduler = _scheduler(optimizer, cfg.lr_schedule, cfg.epochs)
    scaler = torch.amp.GradScaler(device.type) if cfg.amp == "fp16" else None
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    autocast = autocast_factory(cfg.amp, device)
    par = ParallelRWP(model, optimizer) if ranks.parallel and cfg.method == "rwp" else None
    stepper = Stepper(cfg.method, forward, optimizer, criterion, cfg.method_cfg, autocast=autocast, scaler=scaler,
                      parallel=par)
    group = batches_per_update(cfg.method, cfg.method_cfg)
    train_loader = make_loader(data.train, cfg.batch_size, train=True, seed=cfg.seed, workers=cfg.workers,
                               shard=(ranks.rank, ranks.world))
    test_loader = make_loader(data.test, max(cfg.batch_size, 256), train=False, seed=cfg.seed, workers=cfg.workers)

    history, start = [], 0
    ckpt_path, log_path = os.path.join(run_dir, CHECKPOINT), os.path.join(run_dir, LOG)
    if resume and os.path.exists(ckpt_path):
        history, start = _restore(ckpt_path, net, optimizer, scheduler, scaler)
    if ranks.is_main:
        with open(log_path, "w") as log:  # rewritten from the history, so a resumed log has no duplicates
            for record in history:
                log.write(json.dumps(record) + "\n")

    last = cfg.epochs if cfg.stop_after is None else min(cfg.epochs, cfg.stop_after)
    for epoch in range(start, last):
        train_loader.set_epoch(epoch)
        model.train()
        steps = len(train_loader) // group
        bar = tqdm(total=steps, desc=f"{cfg.method} seed {cfg.seed} epoch {epoch + 1}/{cfg.epochs}",
                   disable=None if cfg.progress and ranks.is_main else True, leave=False, dynamic_ncols=True)
        totals = None
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        began = time.perf_counter()
        for i, batches in enumerate(_grouped(train_loader, group)):
            batches = [(x.to(device, non_blocking=True), y.to(device, non_blocking=True)) for x, y in batches]
            if cfg.channels_last:
                batches = [(x.contiguous(memory_format=torch.channels_last), y) for x, y in batches]
            result = stepper(batches)
            totals = result if totals is None else totals + result
            bar.update(1)
            if i % 10 == 0 or i == steps - 1:
                seen = time.perf_counter() - began
                bar.set_postfix(loss=f"{totals.loss_sum.item() / totals.count:.3f}",
                                acc=f"{totals.correct.item() / totals.count:.3f}",
                                img_s=f"{totals.count / max(seen, 1e-9):.0f}")
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        epoch_time = time.perf_counter() - began
        bar.close()
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        if ranks.parallel:
            totals = parallel.sum_over_ranks(totals)
            if not ranks.is_main:
                continue
        test_loss, test_acc = evaluate(evaluated, test_loader, criterion, device, autocast)
        record = dict(
            method=cfg.method, seed=cfg.seed, epoch=epoch + 1, lr=lr,
            train_loss=totals.loss_sum.item() / totals.count, train_acc=totals.correct.item() / totals.count,
            test_loss=test_loss, test_acc=test_acc, epoch_time=epoch_time, images_per_s=totals.count / epoch_time,
        )
        history.append(record)
        with open(log_path, "a") as log:
            log.write(json.dumps(record) + "\n")
        checkpoint.save(dict(
            model=net.state_dict(), optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
            scaler=scaler.state_dict() if scaler is not None else None, rng=_rng_state(), history=history,
            epoch=epoch + 1, config=asdict(cfg),
        ), ckpt_path)
    return history
