"""Gradient-norm clipping of a gradient that is stored as a weighted sum of tensors (the RWP mix)."""
import torch


def _norm(tensors: list[torch.Tensor], weights: list[float], norm_type: float) -> torch.Tensor:
    if len(tensors) == 1:
        return weights[0] * torch.linalg.vector_norm(tensors[0], norm_type, dtype=torch.float32)
    mix = sum(t.to(torch.float32) * w for t, w in zip(tensors, weights))
    return torch.linalg.vector_norm(mix, norm_type)


def clip_weighted_grad_norm_(parts, max_norm: float, norm_type: float = 2.0,
                             error_if_nonfinite: bool = False) -> torch.Tensor:
    """Clip gradients the way ``torch.nn.utils.clip_grad_norm_`` does, where the gradient of each parameter
    is ``sum(w * t for t, w in zip(tensors, weights))`` for one ``(tensors, weights)`` pair of ``parts``
    (weights >= 0). Every tensor is multiplied in place by ``min(1, max_norm / (total_norm + 1e-6))``,
    which scales each weighted sum by the same factor. Returns the total norm before clipping.
    """
    max_norm, norm_type = float(max_norm), float(norm_type)
    if not parts:
        return torch.tensor(0.0)
    norms = [_norm(tensors, weights, norm_type) for tensors, weights in parts]
    device = norms[0].device
    total = torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]), norm_type)
    if error_if_nonfinite and not torch.isfinite(total):
        raise RuntimeError(
            f"The total norm of order {norm_type} for gradients is non-finite, so it cannot be clipped. "
            "To disable this error and scale the gradients by the non-finite norm anyway, "
            "set `error_if_nonfinite=False`"
        )
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for tensors, _ in parts:
        for t in tensors:
            t.mul_(coef.to(t.device))
    return total
