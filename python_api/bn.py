"""``freeze_bn_stats``: BatchNorm running statistics untouched during the perturbed pass."""
import contextlib

import torch
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


# The layers frozen by the current bn_stats_frozen_while_called block, and the modules whose trees it has seen.
_frozen: list = []
_seen: set = set()


def _freeze_tree_on_call(module, args) -> None:
    """Global forward pre-hook: freeze the BatchNorm layers of ``module``'s tree. Skipped while dynamo traces:
    a torch.compile'd model is frozen from its (eager) outer module's call, before its graph runs."""
    if torch.compiler.is_compiling() or module in _seen:
        return
    for m in module.modules():
        _seen.add(m)
        if isinstance(m, _BatchNorm) and m.training and m.track_running_stats:
            m.track_running_stats = False
            _frozen.append(m)


@contextlib.contextmanager
def bn_stats_frozen_while_called():
    """``freeze_bn_stats`` for the models that run inside the block: for step(closure), which does not know
    the model. A global forward pre-hook freezes every BatchNorm layer in training mode in the module tree of
    each module called in the block (the whole model at its first call); the end of the block unfreezes
    them. Not re-entrant (step(closure) does not nest)."""
    handle = register_module_forward_pre_hook(_freeze_tree_on_call)
    try:
        yield
    finally:
        handle.remove()
        for m in _frozen:
            m.track_running_stats = True
        _frozen.clear()
        _seen.clear()
