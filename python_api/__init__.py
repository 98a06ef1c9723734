"""rwp_kernels.optim: drop-in torch.optim optimizers for RWP, m-RWP and adaptive RWP (ARWP).

The training loop (docs/optim.md has the details)::

    opt = RWPSGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3, gamma=0.01, alpha=0.5)
    for (x1, y1), (x2, y2) in batch_pairs:
        opt.zero_grad()
        loss_fn(model(x1), y1).backward()          # clean pass
        with opt.perturbed(), freeze_bn_stats(model):
            loss_fn(model(x2), y2).backward()      # perturbed pass (gradients accumulate)
        opt.step()                                 # restore + (1 - alpha) g_c + alpha g_p + SGD, fused

What p.grad holds between perturb() and step(): the clean gradient times (1 - alpha) / alpha plus the
perturbed gradient, i.e. the mix divided by alpha; for ARWP with 0 < alpha < 1 the perturbed gradient
alone (the clean one is kept aside). ``opt.clip_grad_norm_`` clips the true mix.

``ParallelRWP`` (torch.distributed) computes the clean and the perturbed gradient on different ranks at
the same time (docs/distributed.md).
"""
from .bn import freeze_bn_stats
from .distributed import ParallelRWP
from .sgd import RWPSGD
from .wrapper import RWP

__all__ = ["RWPSGD", "RWP", "ParallelRWP", "freeze_bn_stats"]
