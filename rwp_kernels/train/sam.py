"""A plain SAM baseline (Foret et al., 2021) for comparison: ascend to ``w + rho * g / ||g||``, take the
gradient there, come back, and let SGD step with it. Two sequential passes on the same batch."""
import torch


class SAM(torch.optim.SGD):
    def __init__(self, params, lr: float, *, rho: float = 0.05, **sgd_kwargs):
        if rho < 0:
            raise ValueError(f"SAM: rho must be >= 0, got {rho}")
        super().__init__(params, lr=lr, **sgd_kwargs)
        self.rho = rho

    @torch.no_grad()
    def ascend(self) -> None:
        """Move to the worst-case point of the rho-ball along the current gradient (keeps a copy of w)."""
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])) if grads else 0
        scale = self.rho / (norm + 1e-12)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                self.state[p]["sam_backup"] = p.detach().clone()
                p.add_(p.grad * scale)

    @torch.no_grad()
    def descend(self) -> None:
        """Return to the original weights and take the SGD step with the gradient found at the ascended point."""
        for group in self.param_groups:
            for p in group["params"]:
                backup = self.state[p].pop("sam_backup", None)
                if backup is not None:
                    p.copy_(backup)
        super().step()
