"""``--parallel``: the training command under torchrun, one process per device.

Every update uses one global batch of ``--batch-size`` images, split evenly over the ranks. ``sgd`` is
plain data parallelism (DDP averages the ranks' gradients); ``rwp`` is ``ParallelRWP``: the perturbed
ranks (the odd ones) compute their gradient at perturbed weights while the clean ranks compute theirs,
and one all-reduce mixes them. Both make the same number of updates on the same data, so their times
compare directly. Rank 0 evaluates, logs and writes checkpoints; BatchNorm statistics are rank 0's.
"""
import contextlib
import os
import sys
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from .methods import StepResult

LAUNCH_HINT = "torchrun --nproc_per_node 2 -m rwp_kernels.train --parallel ..."
# The optimizers --parallel runs, and why not the others.
UNSUPPORTED = {
    "arwp": "ARWP's Fisher state needs each rank's own perturbed gradient, which the all-reduce mixes away",
    "sam": "SAM's two passes are sequential by nature",
}


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.world > 1


def ranks_from_env() -> Ranks:
    """This process's place in a torchrun job (RANK, WORLD_SIZE, LOCAL_RANK)."""
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    except (KeyError, ValueError):
        raise ValueError(f"--parallel runs one process per device under torchrun: {LAUNCH_HINT}") from None
    if world < 2:
        raise ValueError(f"--parallel needs at least 2 processes (a clean and a perturbed one); WORLD_SIZE is {world}")
    return Ranks(rank, world, int(os.environ.get("LOCAL_RANK", rank)))


def device_of(ranks: Ranks, requested: str | None) -> torch.device:
    """``cuda:<local rank>`` where GPUs are used (the default when there are any), else the CPU."""
    kind = torch.device(requested).type if requested else ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {requested} asked for, but no CUDA GPU is visible to torch")
        if ranks.local_rank >= torch.cuda.device_count():
            raise ValueError(f"local rank {ranks.local_rank} has no GPU: {torch.cuda.device_count()} visible")
        return torch.device("cuda", ranks.local_rank)
    return torch.device(kind)


@contextlib.contextmanager
def process_group(device: torch.device):
    """The default process group for the block: nccl for GPUs, gloo for the CPU, the rendezvous from
    torchrun's environment."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    try:
        yield
        dist.barrier()  # leave together (on an error torchrun stops every rank anyway)
    finally:
        dist.destroy_process_group()


def exit_process(code: int) -> NoReturn:
    """End this process now that its work is done and its process group destroyed: flush the output and
    ``os._exit``, skipping the interpreter's shutdown.

    A gloo worker thread may still hold the last collectives' work, with tensors whose Python objects it
    now owns (the all-reduced totals, a DDP comm hook's bucket). If it releases them while the
    interpreter shuts down, it asks for the GIL, Python ends the thread, and the unwinding aborts the
    process ("terminate called without an active exception"): a finished run reported as failed.
    DistributedDataParallel keeps the process group, and so those threads, alive past
    ``destroy_process_group``, so this is the reliable way out.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def wrap(model: torch.nn.Module, device: torch.device) -> DistributedDataParallel:
    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def sum_over_ranks(result: StepResult) -> StepResult:
    """The epoch's training totals of all ranks (one all-reduce, on the device they were computed on)."""
    totals = torch.stack([result.loss_sum.double(), result.correct.double(),
                          torch.tensor(float(result.count), dtype=torch.float64, device=result.loss_sum.device)])
    dist.all_reduce(totals)
    return StepResult(totals[0], totals[1].round().long(), int(totals[2].item()))
