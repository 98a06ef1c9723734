"""``RWPSGD``: SGD with Random Weight Perturbation, two fused launches per step."""
import torch

import rwp_kernels
from rwp_kernels.layout import same_layout

from . import _hyper
from ._base import _RWPOptimizer
from ._window import group_by, like_param

_SGD_KEYS = ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize")


class RWPSGD(_RWPOptimizer):
    """torch.optim.SGD fused with RWP (``adaptive=True``: ARWP).

    Per step and per device: one ``perturb_`` launch in ``perturb()`` (norms, noise, perturbation, backup,
    gradient scaling for the mix) and one ``sgd_step_`` launch per distinct set of step hyperparameters
    in ``step()`` (restore, mix, weight decay, momentum, update; one launch for a model with one param
    group). ``restore="regenerate"`` keeps no backup (saving one copy of the weights) and adds one
    ``restore_`` launch that subtracts the regenerated noise (rounding, not bit-exact).

    lr, momentum, dampening, weight_decay, nesterov, maximize: as torch.optim.SGD.
    gamma: noise std relative to each filter's norm (0 for a group: never perturbed).
    alpha: weight of the perturbed gradient in the mix (0: plain SGD; 1: perturbed pass only).
    adaptive, eta, beta: ARWP, noise of row i divided by sqrt(1 + eta * sum_j F[i, j]), F <- beta F + g_p^2.
    seed: seed of the noise (None: drawn from torch's default generator); stream: independent noise streams.
    backend: "auto", "cpu", "cuda", "triton" or "reference" (see rwp_kernels).
    """

    _PER_ELEMENT_STATE = ("momentum_buffer", "fisher")

    def __init__(self, params, lr, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False,
                 *, gamma=0.01, alpha=0.5, adaptive=False, eta=0.1, beta=0.99, seed=None, stream=0,
                 restore="exact", backend="auto"):
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize)
        _hyper.check_sgd_group(defaults, "")
        defaults.update(_hyper.rwp_group_defaults(gamma=gamma, alpha=alpha, adaptive=adaptive, eta=eta, beta=beta))
        super().__init__(params, defaults, seed=seed, stream=stream, restore=restore, backend=backend)

    def _check_group(self, group: dict, where: str) -> None:
        _hyper.check_sgd_group(group, where)
        _hyper.check_rwp_group(group, where)

    def _update(self, window, scale) -> None:
        entries = self._step_entries()
        members, restore_only = [], []
        for i, group in enumerate(self.param_groups):
            self._check_group(group, f"param group {i}: ")
            hyper = tuple(group[k] for k in _SGD_KEYS)
            for p in group["params"]:
                e = entries.get(p)
                grad = self._prepare_grad(p, fill=e.stash if e is not None else None)
                if grad is None:
                    if e is not None and e.perturbed:
                        restore_only.append(e)
                    continue
                first = group["momentum"] != 0 and "momentum_buffer" not in self.state[p]
                if not p.numel():  # nothing to update; the (empty) buffer torch.optim.SGD would keep
                    if first:
                        self.state[p]["momentum_buffer"] = torch.zeros_like(p)
                    continue
                key = (
                    p.device, hyper, first,
                    e is not None and e.perturbed and e.backup is not None,  # restore from the backup in the launch
                    group["beta"] if e is not None and e.adaptive else None,  # Fisher update
                    e.stash_scale if e is not None and e.stash is not None else None,  # clean gradient kept aside
                    e.alpha if e is not None else 1.0,  # multiplier of p.grad
                )
                members.append((key, p, grad, e))
        if window is not None:
            scale.include([e.stash for e in window.entries if e.stash is not None])
        launches = [self._sgd_launch(key, [m[1:] for m in call], scale)
                    for key, call in group_by(members, lambda m: m[0]).items()]
        self._check_launches("sgd_step_", [
            (params, {"momentum_buffers": (args["momentum_buffers"], None), "fisher": (args["fisher"], torch.float32)})
            for params, args, _ in launches
        ])
        if window is not None and self.restore_mode == "regenerate":
            self._restore_weights(window, window.entries)
        for params, args, done in launches:
            with self._naming_launch_errors(params):
                rwp_kernels.sgd_step_(params, **args)
            done()
        if window is not None:
            self._restore_weights(window, restore_only)

    def _momentum_buffer(self, p: torch.Tensor, first: bool) -> torch.Tensor:
        if first:
            # Zeros, not empty: a first step skipped by GradScaler leaves a well-defined buffer.
            return torch.zeros_like(p)
        buf = self.state[p]["momentum_buffer"]
        if not same_layout(buf, p):
            buf = self.state[p]["momentum_buffer"] = like_param(p, buf)
        return buf

    def _sgd_launch(self, key, call, scale):
        """One sgd_step_ launch, prepared: its params, its other arguments, and what to record once it ran."""
        device, (lr, momentum, dampening, weight_decay, nesterov, maximize), first, restore, beta, stash_scale, alpha = key
        params = [p for p, _, _ in call]
        entries = [e for _, _, e in call]
        buffers = [self._momentum_buffer(p, first) for p in params] if momentum != 0 else None
        args = dict(
            grads=[g for _, g, _ in call], momentum_buffers=buffers,
            lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
            maximize=maximize, is_first_step=first,
            grad_scale=scale.factor(alpha, device), found_inf=scale.found_inf_on(device),
            backups=[e.backup for e in entries] if restore else None,
            fisher=[self._fisher(p) for p in params] if beta is not None else None,
            beta=0.0 if beta is None else beta, fisher_scale=scale.factor(1.0, device),
            clean_grads=[e.stash for e in entries] if stash_scale is not None else None,
            clean_scale=scale.factor(stash_scale, device) if stash_scale is not None else 0.0,
            backend=self.backend,
        )

        def done():
            if first:
                for p, buf in zip(params, buffers):
                    self.state[p]["momentum_buffer"] = buf
            if restore:
                for e in entries:
                    e.perturbed = False

        return params, args, done
