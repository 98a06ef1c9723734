"""``python -m rwp_kernels.demo``: one RWP training step on a CIFAR ResNet-18, done by hand with the ops.

It shows what the fused ops do and what they cost here: the clean pass, ``perturb_`` (filter norms,
noise, backups, gradient pre-scaling for the mix), the perturbed pass, and ``sgd_step_`` (exact restore,
mix, momentum SGD), then checks that the mixed update equals the textbook formula.
"""
import argparse
import time

import torch
import torch.nn.functional as F

from . import backends, ops
from .models import resnet18


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, (time.perf_counter() - start) * 1e3


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rwp_kernels.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--gamma", type=float, default=0.01, help="noise scale relative to each filter's norm")
    parser.add_argument("--alpha", type=float, default=0.5, help="weight of the perturbed gradient in the mix")
    parser.add_argument("--batch", type=int, default=16, help="images per pass (random CIFAR-sized inputs)")
    parser.add_argument("--backend", default="auto", choices=backends.NAMES)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not 0 < args.alpha <= 1:
        parser.error(f"--alpha must be in (0, 1], got {args.alpha}")

    torch.manual_seed(args.seed)
    model = resnet18(num_classes=10)
    params = [p for p in model.parameters()]
    images, labels = torch.randn(2, args.batch, 3, 32, 32), torch.randint(0, 10, (2, args.batch))
    name = args.backend if args.backend != "auto" else backends.auto_choice("cpu")[0]
    print(f"ResNet-18 (CIFAR): {len(params)} tensors, {sum(p.numel() for p in params) / 1e6:.2f}M parameters; "
          f"backend {name!r}; gamma={args.gamma}, alpha={args.alpha}")

    clean = [p.detach().clone() for p in params]
    F.cross_entropy(model(images[0]), labels[0]).backward()
    clean_grads = [p.grad.clone() for p in params]

    backups = [torch.empty_like(p) for p in params]
    grads = [p.grad for p in params]
    sigmas, ms = _timed(lambda: ops.perturb_(params, gamma=args.gamma, seed=args.seed, step=0, backups=backups,
                                             grads=grads, grad_scale=(1 - args.alpha) / args.alpha,
                                             backend=args.backend))
    moved = max(((p.detach() - c).abs().max() / s.max().clamp_min(1e-30)).item() for p, c, s in zip(params, clean, sigmas)
                if p.dim() >= 2)
    print(f"perturb_: {ms:8.1f} ms  sigma per filter from {min(s.min().item() for s in sigmas):.2e} "
          f"to {max(s.max().item() for s in sigmas):.2e}; largest |w' - w| = {moved:.2f} sigma")

    F.cross_entropy(model(images[1]), labels[1]).backward()
    perturbed_grads = [p.grad - (1 - args.alpha) / args.alpha * g for p, g in zip(params, clean_grads)]

    bufs = [torch.empty_like(p) for p in params]
    _, ms = _timed(lambda: ops.sgd_step_(params, grads, bufs, lr=0.1, momentum=0.9, weight_decay=1e-3,
                                         is_first_step=True, grad_scale=args.alpha, backups=backups,
                                         backend=args.backend))
    expected = [c - 0.1 * ((1 - args.alpha) * gc + args.alpha * gp + 1e-3 * c)
                for c, gc, gp in zip(clean, clean_grads, perturbed_grads)]
    err = max((p.detach() - e).abs().max().item() for p, e in zip(params, expected))
    print(f"sgd_step_: {ms:7.1f} ms  restore + (1-alpha)*g_clean + alpha*g_perturbed + momentum SGD; "
          f"largest difference from the textbook update: {err:.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
