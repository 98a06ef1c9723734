"""Hooks into other training libraries. Each submodule imports its library only when one of its functions is
called, so ``rwp_kernels.integrations`` imports without any of them installed.

- :mod:`rwp_kernels.integrations.timm`: ``register_timm_optimizers()`` puts RWPSGD (and ARWP, RWP around
  AdamW) into timm's optimizer factory (``timm.optim.create_optimizer_v2(model, "rwpsgd", ...)``).
"""
from .timm import TIMM_OPTIMIZERS, register_timm_optimizers

__all__ = ["TIMM_OPTIMIZERS", "register_timm_optimizers"]
