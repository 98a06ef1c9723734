"""``freeze_bn_stats``: BatchNorm running statistics untouched during the perturbed pass."""
import contextlib

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.module import register_module_forward_pre_hook


@contextlib.contextmanager
def freeze_bn_stats(model: nn.Module):
    """Inside the block, BatchNorm layers of ``model`` do not update ``running_mean``, ``running_var`` or
    ``num_batches_tracked``; the forward pass is unchanged (training mode normalizes with the batch
    statistics either way, eval mode with the running ones). The official single-device code gets the
    same effect by setting the BN momentum to 0 for the perturbed pass.

    Works on any module tree (nn.BatchNorm1d/2d/3d, SyncBatchNorm, lazy variants, torch.compile'd models),
    is re-entrant, and restores the previous setting even if the block raises.
    """
    frozen = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    for m in frozen:
        # In training mode, BatchNorm passes no running buffers to F.batch_norm when this is False.
        m.track_running_stats = False
    try:
        yield model
    finally:
        for m in frozen:
            m.track_running_stats = True


@contextlib.contextmanager
def bn_stats_frozen_while_called():
    """``freeze_bn_stats`` for every BatchNorm layer in training mode that runs inside the block, in whatever
    model: for step(closure), which does not know the model. A global forward pre-hook freezes each such
    layer before its first forward in the block; the end of the block unfreezes them."""
    frozen = []

    def freeze(module, args):
        if isinstance(module, _BatchNorm) and module.training and module.track_running_stats:
            module.track_running_stats = False
            frozen.append(module)

    handle = register_module_forward_pre_hook(freeze)
    try:
        yield
    finally:
        handle.remove()
        for m in frozen:
            m.track_running_stats = True
