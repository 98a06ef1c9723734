"""RWP in timm's optimizer factory.

    from rwp_kernels.integrations.timm import register_timm_optimizers
    register_timm_optimizers()
    opt = timm.optim.create_optimizer_v2(model, "rwpsgd", lr=0.1, momentum=0.9, weight_decay=1e-3,
                                         gamma=0.01, alpha=0.5)

Every keyword that timm does not use itself (``gamma``, ``alpha``, ``eta``, ``beta``, ``seed``, ``stream``,
``restore``, ``backend``, ``nesterov``, ...) is passed on to the optimizer's constructor, whose defaults fill
every param group: timm's factory puts 1-D parameters (norm weights, biases) in a group of their own with
``weight_decay=0`` and nothing else, so those parameters are still perturbed with the same ``gamma`` (as in
the paper). To leave them unperturbed, give timm a ``param_group_fn`` whose groups set ``gamma=0``.

The training loop is RWP's (clean pass, ``with opt.perturbed(), freeze_bn_stats(model):`` perturbed pass,
``opt.step()``). timm's own train.py runs one backward and then ``step()`` without a perturbation, which
RWPSGD refuses (it would be a plain SGD step): use the loop above, or ``step(closure)``.

timm's factory orders the parameters by group (the 1-D ones first), and the noise of a parameter depends on
its position in the optimizer's order: with the same seed it is the noise of
``RWPSGD(timm.optim.param_groups_weight_decay(model, weight_decay), weight_decay=0, ...)``, not that of
``RWPSGD(model.parameters(), ...)``. ``lookahead_rwpsgd`` is not supported (Lookahead has no ``perturb``).

timm is imported only when :func:`register_timm_optimizers` is called.
"""
from __future__ import annotations

TIMM_OPTIMIZERS = ("rwpsgd", "arwpsgd", "rwpadamw")
"""The names :func:`register_timm_optimizers` registers (timm splits optimizer names at ``_``, so none has one)."""


def _rwpsgd(params, foreach=None, **kwargs):
    """RWPSGD from timm's factory. ``foreach`` (timm's ``--opt-foreach``) is accepted and ignored: RWPSGD's
    update is one fused launch per device, dtype and set of step hyperparameters."""
    from ..optim import RWPSGD

    return RWPSGD(params, **kwargs)


def _rwpadamw(params, **kwargs):
    """RWP around torch.optim.AdamW from timm's factory (``foreach``, ``eps``, ``betas`` go to AdamW)."""
    import torch

    from ..optim import RWP

    return RWP(params, torch.optim.AdamW, **kwargs)


def _infos(OptimInfo) -> list:
    return [
        OptimInfo(name="rwpsgd", opt_class=_rwpsgd, has_eps=False, has_momentum=True,
                  description="RWP (random weight perturbation) fused with SGD with classical momentum: "
                              "rwp_kernels.optim.RWPSGD"),
        OptimInfo(name="arwpsgd", opt_class=_rwpsgd, has_eps=False, has_momentum=True, defaults={"adaptive": True},
                  description="adaptive RWP (Fisher-scaled noise) fused with SGD: RWPSGD(adaptive=True)"),
        OptimInfo(name="rwpadamw", opt_class=_rwpadamw, has_eps=True, has_betas=True,
                  description="RWP around torch.optim.AdamW: rwp_kernels.optim.RWP(params, torch.optim.AdamW)"),
    ]


def register_timm_optimizers(registry=None) -> list[str]:
    """Register ``rwpsgd``, ``arwpsgd`` and ``rwpadamw`` in timm's optimizer registry (by default
    ``timm.optim._optim_factory.default_registry``, the one ``timm.optim.create_optimizer_v2`` and
    ``create_optimizer`` use) and return their names.

    - ``rwpsgd``: :class:`rwp_kernels.optim.RWPSGD`. Like timm's ``momentum`` (not its ``sgd``, which
      defaults to Nesterov), classical momentum unless ``nesterov=True`` is passed; timm's default
      ``momentum=0.9`` applies. ``foreach`` is accepted and ignored (the update is fused).
    - ``arwpsgd``: the same with ``adaptive=True`` (ARWP; ``eta``, ``beta``).
    - ``rwpadamw``: :class:`rwp_kernels.optim.RWP` around ``torch.optim.AdamW`` (``eps``, ``betas``,
      ``foreach`` go to AdamW).

    Calling it again is harmless. A name already registered by someone else raises ``ValueError`` (timm
    itself would overwrite it with a warning). Raises ``ImportError`` if timm is not installed, and
    ``RuntimeError`` if the installed timm has no optimizer registry (timm < 1.0.12 or so; there, build the
    optimizer directly: ``RWPSGD(timm.optim.param_groups_weight_decay(model, weight_decay), lr=..., ...)``).
    """
    try:
        import timm.optim._optim_factory as factory
    except ImportError as err:
        if "timm" in str(err) and "_optim_factory" not in str(err):
            raise ImportError("register_timm_optimizers needs timm: pip install timm") from err
        raise RuntimeError("this timm has no optimizer registry (timm.optim._optim_factory); construct RWPSGD "
                           "directly on timm.optim.param_groups_weight_decay(model, weight_decay)") from err
    if not hasattr(factory, "OptimInfo") or not hasattr(factory, "default_registry"):
        raise RuntimeError("this timm has no optimizer registry (timm.optim._optim_factory.OptimInfo, "
                           "default_registry); construct RWPSGD directly on "
                           "timm.optim.param_groups_weight_decay(model, weight_decay)")
    registry = factory.default_registry if registry is None else registry
    ours = (_rwpsgd, _rwpadamw)
    known = set(registry.list_optimizers())
    infos = _infos(factory.OptimInfo)
    for info in infos:  # check all before registering any
        if info.name in known and registry.get_optimizer_info(info.name).opt_class not in ours:
            raise ValueError(f"timm already has an optimizer named {info.name!r} that is not rwp_kernels'")
    for info in infos:
        if info.name not in known:
            registry.register(info)
    return [info.name for info in infos]
