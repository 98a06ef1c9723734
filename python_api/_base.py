"""The perturbation machinery shared by ``RWPSGD`` and the ``RWP`` wrapper.

A subclass provides ``_check_group`` (its param-group hyperparameters) and ``_update`` (the update that
``step()`` applies once the perturbation window is known). Everything else, the training-loop API
(perturb, restore, perturbed, step with a closure), the noise bookkeeping (seed, stream, step counter,
param_index), clipping of the mixed gradient, zero_grad and the state dict, lives here.
"""
import contextlib
import re
import warnings

import torch

import rwp_kernels
from rwp_kernels._validate import check_companions, check_params

from . import _hyper, _state_dict
from ._amp import LossScale
from ._window import SCALED, SPLIT, Entry, Window, group_by, like_param, same_layout
from .clip import clip_weighted_grad_norm_

# How an op's error message names the tensors of one launch: "params[3]", "grads[0]", ...
_LAUNCH_INDEX = re.compile(r"\b(\w+)\[(\d+)\]")


class _RWPOptimizer(torch.optim.Optimizer):
    # GradScaler hands over grad_scale / found_inf instead of unscaling and skipping the step itself.
    _step_supports_amp_scaling = True
    # Top-level state-dict entries of a subclass (written by _extra_state_dict).
    _EXTRA_STATE_KEYS: tuple[str, ...] = ()
    # The per-parameter state entries that have the parameter's shape (checked by load_state_dict).
    _PER_ELEMENT_STATE: tuple[str, ...] = ("fisher",)

    def __init__(self, params, defaults: dict, *, seed, stream, restore, backend):
        restore = _hyper.check_restore(restore)
        stream = _hyper.check_stream(stream)
        backend = _hyper.check_backend(backend)
        super().__init__(params, defaults)
        for i, group in enumerate(self.param_groups):
            self._check_group(group, f"param group {i}: ")
        self._seed = _hyper.initial_seed(seed)
        self._stream = stream
        self._restore_mode = restore
        self._backend = backend
        self._steps = 0
        self._window: Window | None = None
        self._backups: dict = {}  # param -> its backup buffer (restore="exact"), kept across steps
        # Parallel mode (rwp_kernels.optim.distributed): the alpha this process applies itself instead of
        # the groups' alpha, whose mixing then happens between processes.
        self._local_alpha: float | None = None

    # ----------------------------------------------------------------------------------------- subclass API
    def _check_group(self, group: dict, where: str) -> None:
        raise NotImplementedError

    def _update(self, window: Window | None, scale: LossScale) -> None:
        """Apply the update: restore the perturbed weights (those still perturbed), mix, step."""
        raise NotImplementedError

    # ----------------------------------------------------------------------------------------- properties
    @property
    def seed(self) -> int:
        """The seed of the noise stream (saved in the state dict)."""
        return self._seed

    @property
    def stream(self) -> int:
        """The noise stream (e.g. a rank); not saved in the state dict."""
        return self._stream

    @property
    def steps(self) -> int:
        """Completed calls of step(); the noise of the next perturbation uses this as its step."""
        return self._steps

    @property
    def restore_mode(self) -> str:
        return self._restore_mode

    @property
    def backend(self) -> str:
        return self._backend

    @property
    def is_perturbed(self) -> bool:
        """True while the weights hold a perturbation (between perturb() and step() or restore())."""
        return self._window is not None and self._window.perturbed

    # ----------------------------------------------------------------------------------------- perturb
    @torch.no_grad()
    def perturb(self) -> None:
        """Perturb the weights for the perturbed pass, in one fused launch per device.

        Call it after the clean backward. Per row: sigma = gamma * ||row|| (ARWP: divided by
        sqrt(1 + eta * rowsum(F))), w <- w + sigma * z, and the clean gradient is prepared for the mix
        (see the module docs of ``rwp_kernels.optim``). A no-op when alpha is 0 in every param group.
        If it raises, nothing is pending and weights and gradients are as they were (see docs/optim.md).
        """
        if self._window is not None:
            if self._window.perturbed:
                raise RuntimeError("perturb(): the weights are already perturbed; call step() (or restore()) first")
            raise RuntimeError(
                "perturb(): the previous perturbation was restored but its gradients were not applied; "
                "call step() to apply them or zero_grad() to discard them"
            )
        entries = self._new_entries()
        if not entries:
            return
        window = Window(step=self._steps, entries=entries)
        calls = group_by(entries, lambda e: (e.param.device, e.clean_scale if e.mode == SCALED else None, e.adaptive))
        self._check_launches("perturb_", [([e.param for e in members], {}) for members in calls.values()])
        scaled_grads = _copies_of_scaled_grads(list(calls.items())[:-1])
        try:
            for (_, grad_scale, adaptive), members in calls.items():
                self._perturb_call(window, members, grad_scale, adaptive)
        except BaseException:
            self._restore_weights(window, entries)
            for grad, saved in scaled_grads:
                grad.copy_(saved)
            raise
        for e in entries:
            if e.mode == SPLIT:
                e.stash, e.param.grad = e.param.grad, None
        self._window = window

    def _new_entries(self) -> list[Entry]:
        entries, index = [], 0
        for gi, group in enumerate(self.param_groups):
            self._check_group(group, f"param group {gi}: ")
            alpha = group["alpha"] if self._local_alpha is None else self._local_alpha
            adaptive = group["adaptive"]
            mode = SPLIT if adaptive and 0.0 < alpha < 1.0 else SCALED
            for p in group["params"]:
                if p.requires_grad and p.numel():
                    entries.append(Entry(p, index, group, alpha, adaptive, mode))
                index += 1
        if all(e.alpha == 0.0 for e in entries):
            return []
        zero = sorted({i for i, g in enumerate(self.param_groups) if g["alpha"] == 0.0})
        if zero:
            raise ValueError(
                f"perturb(): alpha is 0 in param group(s) {zero} but not in the others; alpha=0 (plain SGD, "
                "no perturbed pass) must hold for every group or for none"
            )
        for e in entries:
            self._prepare_grad(e.param)
        return entries

    def _prepare_grad(self, p: torch.Tensor, fill: torch.Tensor | None = None) -> torch.Tensor | None:
        """p.grad as the fused ops need it (dense, the parameter's layout); ``fill`` if p has none."""
        grad = p.grad
        if grad is None and fill is not None:
            p.grad = grad = torch.zeros_like(fill)
        if grad is None:
            return None
        if grad.is_sparse:
            raise TypeError(f"a parameter of shape {tuple(p.shape)} has a sparse gradient; RWP needs dense ones")
        if not same_layout(grad, p):
            p.grad = grad = like_param(p, grad)
        return grad

    def _perturb_call(self, window: Window, members: list[Entry], grad_scale, adaptive: bool) -> None:
        params = [e.param for e in members]
        grads = None
        if grad_scale is not None and any(p.grad is not None for p in params):
            grads = [p.grad for p in params]
        backups = [self._backup(p) for p in params] if self._restore_mode == "exact" else None
        with self._naming_launch_errors(params):
            sigmas = rwp_kernels.perturb_(
                params, gamma=[e.group["gamma"] for e in members], eta=[e.group["eta"] for e in members],
                seed=self._seed, step=window.step, stream=self._stream, param_indices=[e.index for e in members],
                backups=backups, grads=grads, grad_scale=1.0 if grad_scale is None else grad_scale,
                fisher=[self._fisher(p) for p in params] if adaptive else None, backend=self._backend,
            )
        for i, e in enumerate(members):
            e.perturbed = True
            if backups is None:
                e.sigma = sigmas[i]
            else:
                e.backup = backups[i]

    def _backup(self, p: torch.Tensor) -> torch.Tensor:
        b = self._backups.get(p)
        if b is None or b.dtype != p.dtype or b.device != p.device or not same_layout(b, p):
            b = self._backups[p] = torch.empty_like(p)
        return b

    def _fisher(self, p: torch.Tensor) -> torch.Tensor:
        """The ARWP Fisher state of ``p`` (float32, the parameter's layout), created as zeros."""
        state = self.state[p]
        f = state.get("fisher")
        if f is None:
            f = state["fisher"] = torch.zeros_like(p, dtype=torch.float32)
        elif not same_layout(f, p):
            f = state["fisher"] = like_param(p, f)
        return f

    # ----------------------------------------------------------------------------------------- launches
    def _check_launches(self, op: str, launches: list[tuple[list, dict]]) -> None:
        """Refuse, before the first of several launches of ``op`` runs, what ``op`` would refuse in any of them:
        its parameters, and the optimizer state it updates. ``launches``: (params, state) pairs, state
        {argument name: (tensors or None, their dtype, None for the parameter's)}."""
        if len(launches) < 2:
            return  # the op checks all its arguments before it writes anything
        for params, state in launches:
            with self._naming_launch_errors(params):
                check_params(op, params)
                for name, (tensors, dtype) in state.items():
                    check_companions(op, name, tensors, params, dtype=dtype)

    @contextlib.contextmanager
    def _naming_launch_errors(self, params: list[torch.Tensor]):
        """An op's error about ``params[i]`` (``grads[i]``, ...) of one launch names the optimizer's parameter:
        its param group, its index in the group."""
        try:
            yield
        except (TypeError, ValueError) as error:
            names = {p: f"param group {i}, parameter {j}"
                     for i, group in enumerate(self.param_groups) for j, p in enumerate(group["params"])}

            def name(match):
                argument, k = match[1], int(match[2])
                if k >= len(params) or params[k] not in names:
                    return match[0]
                return names[params[k]] if argument == "params" else f"{argument} of {names[params[k]]}"

            error.args = (_LAUNCH_INDEX.sub(name, str(error)), *error.args[1:])
            raise

    # ----------------------------------------------------------------------------------------- restore
    @torch.no_grad()
    def restore(self) -> None:
        """Put the clean weights back now (one launch per device). A later step() still applies the mixed
        gradient of this perturbation (then without restoring again); zero_grad() discards it instead.
        A no-op if the weights are not perturbed."""
        if self._window is not None:
            self._restore_weights(self._window, self._window.entries)

    def _restore_weights(self, window: Window, entries: list[Entry]) -> None:
        """Restore the weights of those ``entries`` that are still perturbed (weights only)."""
        todo = [e for e in entries if e.perturbed]
        for members in group_by(todo, lambda e: e.param.device).values():
            self._restore_call(window, members)

    def _restore_call(self, window: Window, members: list[Entry], **mix) -> None:
        """One restore_ launch for perturbed ``members`` (all on one device), with an optional gradient mix."""
        params = [e.param for e in members]
        with self._naming_launch_errors(params):
            if self._restore_mode == "exact":
                rwp_kernels.restore_(params, backups=[e.backup for e in members], backend=self._backend, **mix)
            else:
                rwp_kernels.restore_(
                    params, sigmas=[e.sigma for e in members], seed=self._seed, step=window.step,
                    stream=self._stream, param_indices=[e.index for e in members], backend=self._backend, **mix,
                )
        for e in members:
            e.perturbed = False

    def _cancel(self) -> None:
        """Restore the weights and forget the perturbation (its mix will not be applied)."""
        window = self._window
        if window is None:
            return
        with torch.no_grad():
            self._restore_weights(window, window.entries)
        self._window = None

    @contextlib.contextmanager
    def perturbed(self):
        """``with opt.perturbed(): <perturbed forward/backward>``: perturb() on entry. If the block raises,
        the weights are restored and the perturbation is dropped (optimizer state untouched; the gradients
        are left as the block made them: call zero_grad()). On a normal exit the weights stay perturbed
        until step(), which restores them in the same launch as the update."""
        self.perturb()
        try:
            yield self
        except BaseException:
            self._cancel()
            raise

    # ----------------------------------------------------------------------------------------- step
    def step(self, closure=None):
        """Apply the update. After perturb(): restore the clean weights, mix the two gradients and update,
        fused. Without a pending perturbation: a plain update with p.grad.

        With ``closure`` (forward + backward, returning the loss; it must not zero the gradients): runs
        the clean pass, perturb(), the perturbed pass and the update; returns the clean pass's loss (the
        perturbed one when alpha is 1 everywhere, where the clean pass is skipped).
        """
        if closure is not None:
            return self._step_with_closure(closure)
        self._apply_step()
        return None

    def _apply_step(self) -> None:
        window = self._window
        scale = LossScale(self)
        try:
            if window is not None and scale.already_unscaled and any(e.stash is not None for e in window.entries):
                raise RuntimeError(
                    "scaler.unscale_() was called on an adaptive optimizer with 0 < alpha < 1: it keeps the clean "
                    "gradient aside, where GradScaler cannot unscale it. Let scaler.step() do the unscaling "
                    "(gradient clipping is not available with GradScaler in this mode)"
                )
            with torch.no_grad():
                self._update(window, scale)
        except BaseException:
            self._cancel()
            raise
        self._window = None
        self._steps += 1

    def _step_with_closure(self, closure):
        if self._window is not None:
            raise RuntimeError("step(closure) runs both passes itself; do not call it between perturb() and step()")
        if self._local_alpha is not None:
            raise RuntimeError("step(closure) runs both passes in this process; in parallel mode (ParallelRWP) run "
                               "the pass inside par.pass_() and call step() without a closure")
        alphas = [group["alpha"] for group in self.param_groups]
        loss = None
        if any(a < 1.0 for a in alphas):
            with torch.enable_grad():
                loss = closure()
        if any(a > 0.0 for a in alphas):
            with self.perturbed(), torch.enable_grad():
                perturbed_loss = closure()
            loss = perturbed_loss if loss is None else loss
        self._apply_step()
        return loss

    def _step_entries(self) -> dict:
        """param -> Entry of the pending perturbation, if any."""
        return self._window.by_param() if self._window is not None else {}

    # ----------------------------------------------------------------------------------------- gradients
    def zero_grad(self, set_to_none: bool = True) -> None:
        """As torch.optim.Optimizer.zero_grad, for the clean gradient kept aside by ARWP too. If the weights
        were already restored (restore()) the pending mix has nothing left to apply and is dropped."""
        super().zero_grad(set_to_none)
        window = self._window
        if window is None:
            return
        for e in window.entries:
            if e.stash is not None:
                if set_to_none:
                    e.stash = None
                else:
                    e.stash.zero_()
        if not window.perturbed:
            self._window = None

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False):
        """Clip the gradient that step() will apply, as ``torch.nn.utils.clip_grad_norm_`` would clip it.

        Between perturb() and step(), p.grad does not hold that gradient (it holds the mix divided by
        alpha, or for ARWP with 0 < alpha < 1 the perturbed gradient alone): this computes the norm of the
        true mix ``(1 - alpha) g_c + alpha g_p`` and scales the stored pieces so that the mix is clipped.
        Outside that window it is torch's clip on p.grad. Under GradScaler call ``scaler.unscale_(opt)``
        first, as with torch's clip. Returns the total norm before clipping.
        """
        entries = self._step_entries()
        parts = []
        for group in self.param_groups:
            for p in group["params"]:
                e = entries.get(p)
                stash = e.stash if e is not None else None
                tensors, weights = [], []
                if p.grad is not None:
                    tensors.append(p.grad)
                    weights.append(1.0 if e is None else e.alpha)
                if stash is not None:
                    tensors.append(stash)
                    weights.append(1.0 - e.alpha)
                if tensors:
                    parts.append((tensors, weights))
        return clip_weighted_grad_norm_(parts, max_norm, norm_type, error_if_nonfinite)

    # ----------------------------------------------------------------------------------------- state dict
    def state_dict(self) -> dict:
        """torch's optimizer state (momentum buffers, ARWP Fisher state, ...) plus the noise seed and the
        step counter. Take it outside the perturbed window: the model's weights are perturbed inside it."""
        if self.is_perturbed:
            warnings.warn(
                "state_dict() called while the weights are perturbed: the optimizer state is the clean one, but the "
                "model's parameters hold the perturbation now; checkpoint after step() (or restore())",
                RuntimeWarning,
                stacklevel=2,
            )
        state_dict = super().state_dict()
        state_dict["rwp"] = {"seed": self._seed, "steps": self._steps}
        state_dict.update(self._extra_state_dict())
        return state_dict

    def _extra_state_dict(self) -> dict:
        """The ``_EXTRA_STATE_KEYS`` entries of the state dict (loaded by ``_check_extra_state_dict``)."""
        return {}

    def _check_extra_state_dict(self, extra: dict, groups: list[dict], params: dict):
        """Check the ``_EXTRA_STATE_KEYS`` entries of a state dict (``groups`` and ``params`` as
        ``_state_dict.param_groups`` returns them); return the function that loads them, which
        load_state_dict calls once everything is checked."""
        return lambda: None

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's load_state_dict plus the RWP entries. Everything is checked before anything is loaded: on
        an error (a state dict of another model, a corrupted one) the optimizer is left unchanged."""
        if self._window is not None:
            raise RuntimeError("load_state_dict(): a perturbation is pending; call step() or restore() and zero_grad() first")
        state_dict = dict(state_dict)
        rwp = state_dict.pop("rwp", None)
        extra = {key: state_dict.pop(key) for key in self._EXTRA_STATE_KEYS if key in state_dict}
        # The groups are completed with the defaults: e.g. a torch.optim.SGD state dict has no RWP hyperparameters.
        groups, params = _state_dict.param_groups(state_dict, self.param_groups, self.defaults, self._check_group)
        state = _state_dict.param_state("state", _state_dict.required(state_dict, "state"), params,
                                        self._PER_ELEMENT_STATE)
        seed, steps = _state_dict.rwp_counters(rwp, self._seed, self._steps)
        load_extra = self._check_extra_state_dict(extra, groups, params)

        # torch casts floating state to the parameter's dtype; the Fisher state stays float32.
        fisher = {saved_id: entry.pop("fisher") for saved_id, entry in state.items() if entry.get("fisher") is not None}
        super().load_state_dict({**state_dict, "state": state, "param_groups": groups})
        for saved_id, f in fisher.items():
            p, _ = params[saved_id]
            self.state[p]["fisher"] = torch.empty_like(p, dtype=torch.float32).copy_(f)
        self._seed, self._steps = seed, steps
        load_extra()


def _copies_of_scaled_grads(calls) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(p.grad, a copy of it) for each gradient that these perturb() launches ((key, entries) pairs) scale by
    a factor other than 1: what puts the gradients back if a later launch fails."""
    return [(e.param.grad, e.param.grad.clone()) for (_, grad_scale, _), members in calls
            if grad_scale not in (None, 1.0) for e in members if e.param.grad is not None]
