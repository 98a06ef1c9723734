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
from rwp_kernels.layout import same_layout

from . import _hyper, _state_dict, _trainers
from ._amp import LossScale
from ._run_state import RunState, watch_gradients
from ._window import SCALED, SPLIT, Entry, Window, grad_mark, group_by, like_param
from .bn import bn_stats_frozen_while_called
from .clip import clip_weighted_grad_norm_

# How an op's error message names the tensors of one launch: "params[3]", "grads[0]", ...
_LAUNCH_INDEX = re.compile(r"\b(\w+)\[(\d+)\]")


# The training-loop methods run eagerly inside a torch.compile'd function (dynamo breaks the graph around
# them): they launch the fused ops and keep Python bookkeeping that tracing would only slow down, and the
# reference backend's noise would pull a large graph into inductor. torch._disable_dynamo is
# torch.compiler.disable applied at the first call (as torch.optim does it): importing torch._dynamo here would
# add a second or more to every `import rwp_kernels.optim`, compiled or not.
_eager = getattr(torch, "_disable_dynamo", torch.compiler.disable)


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
        self._restore_mode = restore
        self._backend = backend
        self._rwp = RunState(seed=_hyper.initial_seed(seed), stream=stream)

    def _enter_parallel_mode(self, *, seed: int, stream: int) -> None:
        """For ParallelRWP: the seed all ranks share, this rank's noise stream, and p.grad used as it comes
        (alpha 1 locally: the mix between ranks is made by ParallelRWP's communication hook)."""
        self._rwp.seed, self._rwp.stream, self._rwp.local_alpha = seed, stream, 1.0

    def add_param_group(self, param_group: dict) -> None:
        """As torch.optim.Optimizer.add_param_group, but a parameter listed twice in the group is an error (torch
        warns): the fused ops would perturb and update it twice in one launch."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*duplicate parameters")
            super().add_param_group(param_group)
        params = self.param_groups[-1]["params"]
        first = {}
        for j, p in enumerate(params):
            i = first.setdefault(p, j)
            if i != j:
                self.param_groups.pop()
                raise ValueError(
                    f"param group {len(self.param_groups)}: parameter {j} (shape {tuple(p.shape)}) is parameter {i} "
                    "of the same group again; list each parameter once (model.parameters() lists a shared one once)"
                )

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
        return self._rwp.seed

    @property
    def stream(self) -> int:
        """The noise stream (e.g. a rank); not saved in the state dict."""
        return self._rwp.stream

    @property
    def steps(self) -> int:
        """Completed calls of step(); the noise of the next perturbation uses this as its step."""
        return self._rwp.steps

    @property
    def restore_mode(self) -> str:
        return self._restore_mode

    @property
    def backend(self) -> str:
        return self._backend

    @property
    def is_perturbed(self) -> bool:
        """True while the weights hold a perturbation (between perturb() and step() or restore())."""
        return self._rwp.window is not None and self._rwp.window.perturbed

    # ----------------------------------------------------------------------------------------- perturb
    @_eager
    @torch.no_grad()
    def perturb(self) -> None:
        """Perturb the weights for the perturbed pass, in one fused launch per device.

        Call it after the clean backward. Per row: sigma = gamma * ||row|| (ARWP: divided by
        sqrt(1 + eta * rowsum(F))), w <- w + sigma * z, and the clean gradient is prepared for the mix
        (see the module docs of ``rwp_kernels.optim``). A no-op when alpha is 0 in every param group.
        If it raises, nothing is pending and weights and gradients are as they were (see docs/optim.md).
        """
        if self._rwp.window is not None:
            if self._rwp.window.perturbed:
                raise RuntimeError("perturb(): the weights are already perturbed; call step() (or restore()) first")
            raise RuntimeError(
                "perturb(): the previous perturbation was restored but its gradients were not applied; "
                "call step() to apply them or zero_grad() to discard them"
            )
        entries = self._new_entries()
        if not entries:
            return
        window = Window(step=self._rwp.steps, entries=entries)
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
                e.stash, e.stash_scale, e.param.grad = _kept_aside(e.param.grad), 1.0 - e.alpha, None
            else:
                e.scaled_mark = grad_mark(e.param)
        window.settle()
        watch_gradients(self._rwp, [e.param for e in entries])
        self._rwp.window = window

    def _new_entries(self) -> list[Entry]:
        entries, index = [], 0
        for gi, group in enumerate(self.param_groups):
            self._check_group(group, f"param group {gi}: ")
            alpha = group["alpha"] if self._rwp.local_alpha is None else self._rwp.local_alpha
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
                seed=self._rwp.seed, step=window.step, stream=self._rwp.stream, param_indices=[e.index for e in members],
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
        b = self._rwp.backups.get(p)
        if b is None or b.dtype != p.dtype or b.device != p.device or not same_layout(b, p):
            b = self._rwp.backups[p] = torch.empty_like(p)
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
            names = self._param_names()

            def name(match):
                argument, k = match[1], int(match[2])
                if k >= len(params) or params[k] not in names:
                    return match[0]
                return names[params[k]] if argument == "params" else f"{argument} of {names[params[k]]}"

            error.args = (_LAUNCH_INDEX.sub(name, str(error)), *error.args[1:])
            raise

    # ----------------------------------------------------------------------------------------- restore
    @_eager
    @torch.no_grad()
    def restore(self) -> None:
        """Put the clean weights back now (one launch per device). A later step() still applies the mixed
        gradient of this perturbation (then without restoring again); zero_grad() discards it instead.
        A no-op if the weights are not perturbed."""
        if self._rwp.window is not None:
            self._restore_weights(self._rwp.window, self._rwp.window.entries)

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
                    params, sigmas=[e.sigma for e in members], seed=self._rwp.seed, step=window.step,
                    stream=self._rwp.stream, param_indices=[e.index for e in members], backend=self._backend, **mix,
                )
        for e in members:
            e.perturbed = False

    def _cancel(self) -> None:
        """Restore the weights and forget the perturbation (its mix will not be applied)."""
        window = self._rwp.window
        if window is None:
            return
        with torch.no_grad():
            self._restore_weights(window, window.entries)
        self._rwp.window = None

    @_eager
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

    def _check_settled_gradients(self, window: Window) -> None:
        """Refuse gradients that something other than a backward pass or this optimizer changed since
        perturb() (the marks are settled at the end of every backward: _run_state.watch_gradients).
        GradScaler.unscale_ leaves the versions alone (torch 2.14); tests/test_optim_trainer_paths.py checks it."""
        for e in window.entries:
            if grad_mark(e.param) != e.settled_mark:
                raise RuntimeError(
                    f"step(): the gradient of {self._describe(e.param)} was changed after the perturbed pass, by "
                    "something other than this optimizer (e.g. torch.nn.utils.clip_grad_norm_, a trainer's gradient "
                    "clipping): between perturb() and step(), p.grad is not the gradient step() applies (it holds "
                    "the mix divided by alpha, or one of its two parts), so clipping or scaling it changes the mix "
                    "in a way nobody asked for. Clip with opt.clip_grad_norm_(max_norm), which clips the true mix. "
                    "The weights are restored and nothing was updated"
                )

    # ----------------------------------------------------------------------------------------- step
    @_eager
    def step(self, closure=None):
        """Apply the update. After perturb(): restore the clean weights, mix the two gradients and update,
        fused. Without a pending perturbation it raises (that update would not be RWP's), unless alpha is 0
        in every group (plain SGD) or in parallel mode (ParallelRWP's clean ranks).

        With ``closure`` (forward + backward, returning the loss; it may zero the gradients first, as
        torch's closures and Lightning's do): runs the clean pass, perturb(), the perturbed pass (BatchNorm
        running statistics left alone) and the update; returns the clean pass's loss (the perturbed one when
        alpha is 1 everywhere, where the clean pass is skipped). With a perturbation already pending (a
        trainer's step() after our perturbed() window), the closure runs once and the pending update is
        applied. See docs/optim.md for gradient accumulation and clipping with closures.
        """
        if closure is not None:
            return self._step_with_closure(closure)
        self._apply_step()
        return None

    def _apply_step(self) -> None:
        window = self._rwp.window
        if window is None:
            self._check_plain_step_allowed()
        scale = LossScale(self)
        try:
            if window is not None:
                self._check_settled_gradients(window)
            if window is not None and scale.already_unscaled and any(e.stash is not None for e in window.entries):
                raise RuntimeError(
                    "scaler.unscale_() was called while the clean gradient is kept aside (ARWP with 0 < alpha < 1, "
                    "or a zero_grad() inside the perturbation window), where GradScaler cannot unscale it. Let "
                    "scaler.step() do the unscaling (gradient clipping is not available with GradScaler then)"
                )
            with torch.no_grad():
                self._update(window, scale)
        except BaseException:
            self._cancel()
            raise
        self._rwp.window = None
        self._rwp.steps += 1

    def _check_plain_step_allowed(self) -> None:
        if self._rwp.local_alpha is not None:
            return
        perturbing = [i for i, g in enumerate(self.param_groups)
                      if g["alpha"] != 0.0 and any(p.requires_grad for p in g["params"])]
        if perturbing:
            raise RuntimeError(
                f"step(): no perturbation is pending, so this update would be plain {self._plain_update_name()} "
                f"on p.grad, not RWP (alpha is {self.param_groups[perturbing[0]]['alpha']} in param group "
                f"{perturbing[0]}). Call perturb() (or use `with opt.perturbed():`) for the perturbed pass before "
                "step(), or pass a closure to step(); for plain updates set alpha=0 in every param group. A trainer "
                "that runs the closure itself and then calls step() without it (e.g. Lightning's '16-mixed' "
                "precision with automatic optimization) cannot run RWP: see docs/integrations.md"
            )

    def _plain_update_name(self) -> str:
        return "SGD"

    def _step_with_closure(self, closure):
        if self._rwp.local_alpha is not None:
            raise RuntimeError("step(closure) runs both passes in this process; in parallel mode (ParallelRWP) run "
                               "the pass inside par.pass_() and call step() without a closure")
        if self._rwp.window is not None:
            with torch.enable_grad():
                loss = closure()
            self._apply_step()
            return loss
        self._check_closure_trainer(closure)
        alphas = [group["alpha"] for group in self.param_groups]
        loss = None
        if any(a < 1.0 for a in alphas):
            loss = self._clean_closure(closure)
        if any(a > 0.0 for a in alphas):
            with self.perturbed(), bn_stats_frozen_while_called(), torch.enable_grad():
                perturbed_loss = closure()
            loss = perturbed_loss if loss is None else loss
        self._apply_step()
        return loss

    @staticmethod
    def _check_closure_trainer(closure) -> None:
        clipping = _trainers.clipping_inside_closure(closure)
        if clipping:
            raise RuntimeError(
                f"step(closure): {clipping} clips the gradient inside the closure, after each of RWP's two passes, "
                "so each pass's gradient would be clipped on its own instead of the mix that step() applies. Leave "
                "gradient clipping off in the trainer and clip with opt.clip_grad_norm_(max_norm) in manual "
                "optimization (docs/integrations.md)"
            )
        accumulation = _trainers.accumulation_around_step()
        if accumulation:
            raise RuntimeError(
                f"step(closure): {accumulation} calls step(closure) for the last micro-batch only, so RWP's two passes "
                "would see that batch alone. Accumulate both passes in your own loop instead (docs/integrations.md)"
            )

    def _clean_closure(self, closure):
        """The clean pass of step(closure); refuses gradients accumulated before it that it did not zero (they
        would enter the clean gradient while the perturbed pass covers the closure's batch alone)."""
        params = [p for group in self.param_groups for p in group["params"]]
        after_zero = self._rwp.after_zero_grad
        earlier = {p: p.grad for p in params if p.grad is not None and grad_mark(p) != after_zero.get(p, (None, 0))}
        zero_grad_calls = self._rwp.zero_grad_calls
        with torch.enable_grad():
            loss = closure()
        if zero_grad_calls == self._rwp.zero_grad_calls:
            kept = [p for p, grad in earlier.items() if p.grad is grad]
            if kept:
                raise RuntimeError(
                    "step(closure): p.grad held gradients of earlier backward passes that the closure did not zero, "
                    "so they entered the clean gradient while the perturbed pass covers the closure's batch alone "
                    f"({self._describe(kept[0])}). Zero the gradients before step(closure) or in the closure. "
                    "Gradient accumulation over several batches (Lightning's accumulate_grad_batches > 1, "
                    "Accelerate's accumulate()) cannot go through step(closure): accumulate both passes in your "
                    "own loop instead (docs/optim.md, 'Gradient accumulation')"
                )
        return loss

    def _param_names(self) -> dict:
        """param -> "param group i, parameter j": how errors name the optimizer's parameters."""
        return {p: f"param group {i}, parameter {j}"
                for i, group in enumerate(self.param_groups) for j, p in enumerate(group["params"])}

    def _describe(self, p: torch.Tensor) -> str:
        return f"{self._param_names().get(p, 'a parameter')} (shape {tuple(p.shape)})"

    def _step_entries(self) -> dict:
        """param -> Entry of the pending perturbation, if any."""
        return self._rwp.window.by_param() if self._rwp.window is not None else {}

    # ----------------------------------------------------------------------------------------- gradients
    @_eager
    def zero_grad(self, set_to_none: bool = True) -> None:
        """As torch.optim.Optimizer.zero_grad, except that between perturb() and step() it never drops the
        clean gradient that step() needs: trainers zero the gradients before every backward, the perturbed
        one included. A clean gradient still held in p.grad is set aside first (p.grad itself, moved: the
        parameter then holds one gradient buffer more until step()); it raises instead if p.grad already
        holds part of the perturbed gradient too (the two cannot be told apart any more), changing nothing.
        After restore(), zero_grad() discards the pending update."""
        window = self._rwp.window
        if window is not None and window.perturbed:
            self._set_aside_clean_gradients(window)
        super().zero_grad(set_to_none)
        if window is not None and window.perturbed:
            window.settle()
        if window is not None and not window.perturbed:
            self._rwp.window = None
        self._rwp.zero_grad_calls += 1
        self._rwp.after_zero_grad = {p: grad_mark(p) for group in self.param_groups for p in group["params"]}

    def _set_aside_clean_gradients(self, window: Window) -> None:
        holding = [e for e in window.entries
                   if e.mode == SCALED and e.stash is None and e.alpha < 1.0 and e.scaled_mark[0] is not None]
        mixed = [e for e in holding if grad_mark(e.param) != e.scaled_mark]
        if mixed:
            raise RuntimeError(
                f"zero_grad(): the gradient of {self._describe(mixed[0].param)} holds the clean gradient and part of "
                "the perturbed one, which cannot be separated; the pending step() needs the clean one. Call step() "
                "to apply both, or restore() and then zero_grad() to discard this perturbation"
            )
        for e in holding:
            e.stash, e.stash_scale, e.param.grad = _kept_aside(e.param.grad), e.alpha, None

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
                    weights.append(e.stash_scale)
                if tensors:
                    parts.append((tensors, weights))
        total = clip_weighted_grad_norm_(parts, max_norm, norm_type, error_if_nonfinite)
        if self._rwp.window is not None:
            self._rwp.window.settle()
        return total

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
        state_dict["rwp"] = {"seed": self._rwp.seed, "steps": self._rwp.steps}
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
        if self._rwp.window is not None:
            raise RuntimeError("load_state_dict(): a perturbation is pending; call step() or restore() and zero_grad() first")
        state_dict = dict(state_dict)
        rwp = state_dict.pop("rwp", None)
        extra = {key: state_dict.pop(key) for key in self._EXTRA_STATE_KEYS if key in state_dict}
        # The groups are completed with the defaults: e.g. a torch.optim.SGD state dict has no RWP hyperparameters.
        groups, params = _state_dict.param_groups(state_dict, self.param_groups, self.defaults, self._check_group)
        state = _state_dict.param_state("state", _state_dict.required(state_dict, "state"), params,
                                        self._PER_ELEMENT_STATE)
        seed, steps = _state_dict.rwp_counters(rwp, self._rwp.seed, self._rwp.steps)
        load_extra = self._check_extra_state_dict(extra, groups, params)

        # torch casts floating state to the parameter's dtype; the Fisher state stays float32.
        fisher = {saved_id: entry.pop("fisher") for saved_id, entry in state.items() if entry.get("fisher") is not None}
        super().load_state_dict({**state_dict, "state": state, "param_groups": groups})
        for saved_id, f in fisher.items():
            p, _ = params[saved_id]
            self.state[p]["fisher"] = torch.empty_like(p, dtype=torch.float32).copy_(f)
        self._rwp.seed, self._rwp.steps = seed, steps
        load_extra()


def _kept_aside(grad: torch.Tensor | None) -> torch.Tensor | None:
    """A gradient moved out of p.grad until step(): the tensor itself, or a copy where it is a view (DDP's
    gradient_as_bucket_view makes p.grad a view of a bucket that the next backward overwrites)."""
    return grad.clone() if grad is not None and grad._is_view() else grad


def _copies_of_scaled_grads(calls) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(p.grad, a copy of it) for each gradient that these perturb() launches ((key, entries) pairs) scale by
    a factor other than 1: what puts the gradients back if a later launch fails."""
    return [(e.param.grad, e.param.grad.clone()) for (_, grad_scale, _), members in calls
            if grad_scale not in (None, 1.0) for e in members if e.param.grad is not None]
