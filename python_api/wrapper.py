"""``RWP``: the RWP perturbation around any torch optimizer (AdamW, SGD, ...)."""
import copy
import inspect

import torch

import rwp_kernels

from . import _hyper, _state_dict
from ._base import _RWPOptimizer
from ._window import group_by


class RWP(_RWPOptimizer):
    """RWP (``adaptive=True``: ARWP) for any ``torch.optim.Optimizer`` class.

    ``perturb()`` is the same fused launch as RWPSGD's; ``step()`` runs one fused ``restore_`` launch per
    device (restore + gradient mix + ARWP Fisher update), after which p.grad holds the mixed gradient,
    then the base optimizer's own ``step()``. The base optimizer shares this optimizer's param groups, so
    LR schedulers and param-group edits reach it.

    Under GradScaler, step() reads the overflow flag once (one host synchronization, as GradScaler does
    for any optimizer that is not fused); on overflow the weights are restored and nothing is updated.
    """

    _EXTRA_STATE_KEYS = ("base_state",)

    def __init__(self, params, base_optimizer=torch.optim.SGD, *, gamma=0.01, alpha=0.5, adaptive=False, eta=0.1,
                 beta=0.99, seed=None, stream=0, restore="exact", backend="auto", **base_kwargs):
        if not callable(base_optimizer):
            raise TypeError(f"base_optimizer must be an optimizer class, got {type(base_optimizer).__name__}")
        defaults = dict(base_kwargs)
        defaults.update(_hyper.rwp_group_defaults(gamma=gamma, alpha=alpha, adaptive=adaptive, eta=eta, beta=beta))
        super().__init__(params, defaults, seed=seed, stream=stream, restore=restore, backend=backend)
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        closure = inspect.signature(self.base_optimizer.step).parameters.get("closure")
        if closure is not None and closure.default is inspect.Parameter.empty:
            raise TypeError(
                f"RWP cannot wrap {type(self.base_optimizer).__name__}: its step() requires a closure, which it "
                "calls to re-evaluate the loss and gradient at weights of its own choosing, so the mixed gradient "
                "of the two RWP passes would not be what it steps with; use an optimizer whose closure is optional "
                "(SGD, AdamW, ...)"
            )
        if isinstance(self.base_optimizer, torch.optim.SparseAdam):
            raise TypeError("RWP cannot wrap SparseAdam: it steps only with sparse gradients, and RWP mixes dense ones "
                            "(use Adam or AdamW)")
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)

    def _check_group(self, group: dict, where: str) -> None:
        _hyper.check_rwp_group(group, where)

    def _plain_update_name(self) -> str:
        return type(self.base_optimizer).__name__

    def _update(self, window, scale) -> None:
        entries = window.entries if window is not None else []
        if scale.active:
            scale.include([e.stash for e in entries if e.stash is not None])
            if scale.any_overflow():
                if window is not None:
                    self._restore_weights(window, entries)
                return
        if window is not None:
            self._restore_and_mix(window, scale)
        elif scale.inv is not None:
            grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
            for device, members in group_by(grads, lambda g: g.device).items():
                torch._foreach_mul_(members, scale.inv.to(device))
        self.base_optimizer.step()

    def _restore_and_mix(self, window, scale) -> None:
        """One restore_ launch per device that restores the weights and leaves the true mix in p.grad."""
        with_grad, without_grad = [], []
        for e in window.entries:
            grad = self._prepare_grad(e.param, fill=e.stash)
            (with_grad if grad is not None else without_grad).append(e)

        def key(e):
            return (e.param.device, e.perturbed, e.alpha, e.group["beta"] if e.adaptive else None,
                    e.stash_scale if e.stash is not None else None)

        calls = group_by(with_grad, key)
        self._check_launches("restore_", [([e.param for e in members], {}) for members in calls.values()])
        for (device, perturbed, alpha, beta, stash_scale), members in calls.items():
            mix = dict(
                grads=[e.param.grad for e in members], grad_scale=scale.factor(alpha, device),
                fisher=[self._fisher(e.param) for e in members] if beta is not None else None,
                beta=0.0 if beta is None else beta, fisher_scale=scale.factor(1.0, device),
                clean_grads=[e.stash for e in members] if stash_scale is not None else None,
                clean_scale=scale.factor(stash_scale, device) if stash_scale is not None else 0.0,
            )
            if perturbed:
                self._restore_call(window, members, **mix)
            else:
                # Already restored by restore(): an identity copy from the clean weights carries the mix.
                params = [e.param for e in members]
                clean_weights = [e.backup if e.backup is not None else torch.empty_like(p).copy_(p)
                                 for e, p in zip(members, params)]
                with self._naming_launch_errors(params):
                    rwp_kernels.restore_(params, backups=clean_weights, backend=self.backend, **mix)
        self._restore_weights(window, without_grad)

    def _extra_state_dict(self) -> dict:
        return {"base_state": self.base_optimizer.state_dict()["state"]}

    def _check_extra_state_dict(self, extra: dict, groups: list[dict], params: dict):
        base_state_dict = {
            "state": _state_dict.param_state("base_state", extra.get("base_state", {}), params,
                                             _state_dict.TORCH_PER_ELEMENT_STATE),
            "param_groups": groups,
        }
        # Whatever else the base optimizer's load_state_dict refuses, it refuses on a copy (which shares no
        # state with it once loaded).
        copy.copy(self.base_optimizer).load_state_dict(base_state_dict)

        def load():
            self.base_optimizer.load_state_dict(base_state_dict)
            self.base_optimizer.param_groups = self.param_groups

        return load
