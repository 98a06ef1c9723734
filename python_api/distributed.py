"""Parallel RWP on torch.distributed: the clean and the perturbed gradient computed at the same time by
different processes (the paper's 1x-time scheme).

A chosen set of ranks (default: the odd ones) runs its forward/backward at perturbed weights, the other
ranks at the clean weights, each on its own data. A DDP communication hook weights each rank's gradient
bucket before a summing all-reduce, so every rank receives

    g = alpha * mean(perturbed ranks' gradients) + (1 - alpha) * mean(clean ranks' gradients)

for any world size and any split, without the user scaling losses. The perturbed ranks then restore
their weights from the backup in the same fused launch as the SGD update, so all replicas stay
bit-identical step after step (the official code restores with ``w.sub_(noise)``, which is not exact and
lets the perturbed replicas drift). Each perturbed rank draws its own noise (``stream = rank``); seed and
step counter are the same everywhere.

BatchNorm: DDP broadcasts rank 0's buffers at every forward (``broadcast_buffers=True``, its default), so
the running statistics are rank 0's, computed at the clean weights: rank 0 must be a clean rank.
"""
import contextlib

import torch
import torch.distributed as dist

from ._base import _RWPOptimizer
from .bn import freeze_bn_stats


class _HookState:
    def __init__(self, optimizer: _RWPOptimizer, perturbed: bool, n_perturbed: int, n_clean: int, group):
        self.optimizer, self.perturbed, self.group = optimizer, perturbed, group
        self.n_perturbed, self.n_clean = n_perturbed, n_clean

    def weight(self) -> float:
        """This rank's share of the mix, from the optimizer's (possibly scheduled) alpha."""
        alphas = {group["alpha"] for group in self.optimizer.param_groups}
        if len(alphas) != 1:
            raise ValueError(f"parallel RWP needs one alpha for all param groups, got {sorted(alphas)}")
        alpha = alphas.pop()
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"parallel RWP needs 0 < alpha < 1 (clean and perturbed ranks both contribute), got {alpha}")
        return alpha / self.n_perturbed if self.perturbed else (1.0 - alpha) / self.n_clean


def _mix_hook(state: _HookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    buffer = bucket.buffer()
    buffer.mul_(state.weight())
    work = dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=state.group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


class ParallelRWP:
    """Runs an RWP optimizer in parallel mode on a DistributedDataParallel model.

    ::

        ddp = DistributedDataParallel(model)
        opt = RWPSGD(ddp.parameters(), lr=0.1, momentum=0.9, gamma=0.01, alpha=0.5)
        par = ParallelRWP(ddp, opt)                  # default: odd ranks perturbed
        for x, y in loader:                          # each rank its own shard
            opt.zero_grad()
            with par.pass_():                        # perturbs this rank's weights if it is a perturbed rank
                loss_fn(ddp(x), y).backward()        # one all-reduce: the weighted mix
            opt.step()                               # restore (perturbed ranks) + SGD, one fused launch

    ``perturbed_ranks``: the ranks that compute the perturbed gradient (default: the odd ranks); there must
    be at least one perturbed and one clean rank, and rank 0 must be clean. The constructor is collective
    (every rank calls it): it sets one seed on all ranks (rank 0's) and registers the communication hook.
    Only RWP with ``adaptive=False`` (the ARWP Fisher state needs each rank's own perturbed gradient) and
    0 < alpha < 1, the same in every param group, ``restore="exact"``. The optimizer's stream becomes the
    rank. Use ``pass_()`` and ``step()``; ``step(closure)`` (both passes in one process) is refused.
    """

    def __init__(self, ddp_model: torch.nn.parallel.DistributedDataParallel, optimizer: _RWPOptimizer, *,
                 perturbed_ranks=None, process_group=None):
        if not isinstance(ddp_model, torch.nn.parallel.DistributedDataParallel):
            raise TypeError(f"ParallelRWP needs a DistributedDataParallel model, got {type(ddp_model).__name__}")
        if not isinstance(optimizer, _RWPOptimizer):
            raise TypeError(f"ParallelRWP needs an rwp_kernels.optim optimizer, got {type(optimizer).__name__}")
        if any(group["adaptive"] for group in optimizer.param_groups):
            raise ValueError("parallel RWP does not support adaptive=True (ARWP): its Fisher state needs each "
                             "rank's own perturbed gradient, which the all-reduce mixes away")
        if optimizer.restore_mode != "exact":
            raise ValueError(f"parallel RWP needs restore='exact', got restore={optimizer.restore_mode!r}: subtracting "
                             "the regenerated noise rounds differently on perturbed and clean ranks, and the replicas drift")
        if optimizer.is_perturbed:
            raise RuntimeError("ParallelRWP: the optimizer has a pending perturbation; call step() first")
        rank, world = dist.get_rank(process_group), dist.get_world_size(process_group)
        ranks = set(range(1, world, 2)) if perturbed_ranks is None else {int(r) for r in perturbed_ranks}
        if not ranks <= set(range(world)):
            raise ValueError(f"perturbed_ranks {sorted(ranks)} are not all in 0..{world - 1}")
        if not ranks or len(ranks) == world:
            raise ValueError(f"parallel RWP needs at least one perturbed and one clean rank; world size {world}, "
                             f"perturbed ranks {sorted(ranks)}")
        if 0 in ranks:
            raise ValueError("rank 0 must be a clean rank: DDP broadcasts its BatchNorm statistics to all ranks")
        self.ddp_model, self.optimizer = ddp_model, optimizer
        self.rank, self.world_size, self.perturbed_ranks = rank, world, sorted(ranks)
        self.is_perturbed_rank = rank in ranks

        seed = torch.tensor([optimizer.seed - (1 << 63)], dtype=torch.int64)  # int64 holds the uint64 seed shifted
        device = next(ddp_model.parameters()).device
        backend_device = device if dist.get_backend(process_group) == "nccl" else torch.device("cpu")
        seed = seed.to(backend_device)
        dist.broadcast(seed, src=dist.get_global_rank(process_group, 0) if process_group else 0, group=process_group)
        optimizer._enter_parallel_mode(seed=int(seed.item()) + (1 << 63), stream=rank)
        ddp_model.register_comm_hook(
            _HookState(optimizer, self.is_perturbed_rank, len(ranks), world - len(ranks), process_group), _mix_hook
        )

    @contextlib.contextmanager
    def pass_(self):
        """The forward/backward of this rank: at perturbed weights on a perturbed rank (BatchNorm running
        statistics left alone there), at the clean weights on a clean rank. If the block raises, the
        weights are restored (bit for bit) and the perturbation is dropped."""
        if not self.is_perturbed_rank:
            yield self
            return
        with self.optimizer.perturbed(), freeze_bn_stats(self.ddp_model):
            yield self
