"""The optimizers the training command compares, and one training update of each.

- ``sgd``: torch.optim.SGD on the whole batch.
- ``rwp`` / ``arwp``: rwp_kernels.optim.RWPSGD (``arwp``: adaptive). The clean and the perturbed gradient
  come from different data, as in the paper: with the ``halves`` schedule the two halves of each batch
  (the same compute per update as SGD), with ``consecutive`` two consecutive batches (one update per two
  batches, as the official single-device m-RWP code). BatchNorm running statistics come from the clean
  pass. alpha=1 is the 1x variant: only the perturbed pass, on the whole batch.
- ``sam``: the SAM baseline, two sequential passes on the same batch.

With ``--parallel`` (rwp_kernels.train.parallel) ``rwp`` runs on several processes: each runs one pass on
its share of the batch, the clean or the perturbed one, through ``ParallelRWP``.
"""
import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from ..optim import RWPSGD, freeze_bn_stats
from .sam import SAM

METHODS = ("sgd", "rwp", "arwp", "sam")
SCHEDULES = ("halves", "consecutive")


@dataclass
class StepResult:
    """Sums over the examples of one update; loss and correct stay on the device (no host sync per step)."""

    loss_sum: torch.Tensor
    correct: torch.Tensor
    count: int

    def __add__(self, other: "StepResult") -> "StepResult":
        return StepResult(self.loss_sum + other.loss_sum, self.correct + other.correct, self.count + other.count)


@dataclass
class MethodConfig:
    lr: float
    momentum: float
    weight_decay: float
    nesterov: bool
    gamma: float
    alpha: float
    eta: float
    beta: float
    rho: float
    schedule: str
    backend: str


def build_optimizer(method: str, model: nn.Module, cfg: MethodConfig, seed: int) -> torch.optim.Optimizer:
    sgd = dict(lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)
    params = [p for p in model.parameters() if p.requires_grad]
    if method == "sgd":
        return torch.optim.SGD(params, **sgd)
    if method == "sam":
        return SAM(params, rho=cfg.rho, **sgd)
    return RWPSGD(params, **sgd, gamma=cfg.gamma, alpha=cfg.alpha, adaptive=method == "arwp", eta=cfg.eta,
                  beta=cfg.beta, seed=seed, backend=cfg.backend)


def batches_per_update(method: str, cfg: MethodConfig) -> int:
    return 2 if method in ("rwp", "arwp") and cfg.schedule == "consecutive" and cfg.alpha < 1 else 1


class Stepper:
    """Runs one update of ``method`` on a list of batches (``batches_per_update`` of them)."""

    def __init__(self, method: str, model: nn.Module, optimizer, criterion, cfg: MethodConfig, *,
                 autocast, scaler, parallel=None):
        self.method, self.model, self.opt, self.criterion, self.cfg = method, model, optimizer, criterion, cfg
        self.autocast = autocast  # a callable returning a context manager
        self.scaler = scaler  # torch.amp.GradScaler or None
        self.parallel = parallel  # rwp_kernels.optim.ParallelRWP for rwp with --parallel

    def _forward_backward(self, x, y) -> StepResult:
        with self.autocast():
            out = self.model(x)
            loss = self.criterion(out, y)
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        return StepResult(loss.detach().float() * len(y), (out.argmax(1) == y).sum(), len(y))

    def _apply(self, step) -> None:
        if self.scaler is not None:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            step()

    def __call__(self, batches) -> StepResult:
        self.opt.zero_grad(set_to_none=True)
        if self.method == "sgd":
            result = self._forward_backward(*batches[0])
            self._apply(self.opt.step)
            return result
        if self.method == "sam":
            return self._sam(*batches[0])
        return self._rwp(batches)

    def _sam(self, x, y) -> StepResult:
        result = self._forward_backward(x, y)
        self.opt.ascend()
        self.opt.zero_grad(set_to_none=True)
        with freeze_bn_stats(self.model):
            self._forward_backward(x, y)
        self.opt.descend()
        self._apply(self.opt.step)
        return result

    def _rwp(self, batches) -> StepResult:
        if self.parallel is not None:  # this rank's one pass, clean or perturbed; the hook mixes
            with self.parallel.pass_():
                result = self._forward_backward(*batches[0])
            self._apply(self.opt.step)
            return result
        if self.cfg.alpha == 1.0:  # the 1x variant: the perturbed pass alone, BN statistics from it
            with self.opt.perturbed():
                result = self._forward_backward(*batches[0])
            self._apply(self.opt.step)
            return result
        if len(batches) == 2:
            (xc, yc), (xp, yp) = batches
        else:
            x, y = batches[0]
            half = len(y) // 2
            (xc, yc), (xp, yp) = (x[:half], y[:half]), (x[half:], y[half:])
        clean = self._forward_backward(xc, yc)
        with self.opt.perturbed(), freeze_bn_stats(self.model):
            perturbed = self._forward_backward(xp, yp)
        self._apply(self.opt.step)
        return clean + perturbed


def autocast_factory(mode: str, device: torch.device):
    if mode == "off":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if mode == "bf16" else torch.float16
    return lambda: torch.autocast(device.type, dtype=dtype)
