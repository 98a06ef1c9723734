"""GradScaler's fused-optimizer contract, as multipliers on the device (no host synchronization).

``torch.amp.GradScaler.step`` sets ``optimizer.grad_scale`` (the loss scale S: gradients must be divided
by it) and ``optimizer.found_inf`` on optimizers with ``_step_supports_amp_scaling = True``. After an
explicit ``scaler.unscale_(optimizer)`` the gradients are already unscaled: ``grad_scale`` is None then,
while ``found_inf`` is still set.
"""
import torch


class LossScale:
    """The loss scale of the current step: multipliers for the gradients and the overflow flag per device."""

    def __init__(self, optimizer):
        grad_scale = getattr(optimizer, "grad_scale", None)
        self.found_inf = getattr(optimizer, "found_inf", None)
        # The reciprocal in float64, as GradScaler.unscale_ computes it.
        self.inv = None if grad_scale is None else grad_scale.double().reciprocal().float()
        self._factors: dict = {}
        self._found: dict = {}

    @property
    def active(self) -> bool:
        return self.found_inf is not None or self.inv is not None

    @property
    def already_unscaled(self) -> bool:
        """True after ``scaler.unscale_(optimizer)``: p.grad was divided by S, nothing else was."""
        return self.found_inf is not None and self.inv is None

    def factor(self, value: float, device: torch.device):
        """``value / S`` on ``device``: a 0-d float32 tensor under GradScaler, else the Python float."""
        if self.inv is None:
            return value
        key = (device, value)
        if key not in self._factors:
            self._factors[key] = self.inv.to(device, non_blocking=True) * value
        return self._factors[key]

    def found_inf_on(self, device: torch.device):
        if self.found_inf is None:
            return None
        if device not in self._found:
            self._found[device] = self.found_inf.to(device=device, dtype=torch.float32, non_blocking=True)
        return self._found[device]

    def include(self, tensors: list[torch.Tensor]) -> None:
        """Also count non-finite values in ``tensors`` (gradients GradScaler does not see) as an overflow."""
        if self.found_inf is None or not tensors:
            return
        by_device: dict = {}
        for t in tensors:
            by_device.setdefault(t.device, []).append(t)
        for device, group in by_device.items():
            flag = self.found_inf_on(device).clone()
            one = torch.ones((), dtype=torch.float32, device=device)
            torch._amp_foreach_non_finite_check_and_unscale_(group, flag, one)
            self._found[device] = flag

    def any_overflow(self) -> bool:
        """Whether this step overflowed (one host synchronization)."""
        if self.found_inf is None:
            return False
        # Each per-device flag holds the global one (plus what include() added on that device).
        return any(bool(f.item()) for f in (list(self._found.values()) or [self.found_inf]))
