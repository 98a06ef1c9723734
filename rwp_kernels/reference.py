"""The pure-PyTorch reference backend: the oracle every fused backend is tested against.

Clarity over speed, but vectorized over elements: Philox runs as int64 tensor arithmetic on whole
chunks of counters, so a ResNet-18's worth of noise takes seconds, not hours. Inputs arrive already
validated by ``rwp_kernels.ops``. Normals are computed in float64 from the float32 uniforms and
rounded once, so they are the most accurate rendering of the stream; norms are accumulated in float64.
Updates are done in float32 (float64 for float64 tensors) and written back in the tensor's dtype.
"""
import math

import torch

from . import stream as S
from .contract import GradMix, NoiseKey, SgdHyper
from .layout import ParamPlan, flat_view

NAME = "reference"

# Philox blocks generated per chunk (bounds the int64 temporaries to a few tens of MB).
_CHUNK_BLOCKS = 1 << 20


def _mulhilo(a: int, b):
    """(high, low) 32-bit words of the 64-bit product of the constant ``a`` and uint32 words ``b``.

    int64 cannot hold the full product, so ``b`` is split into 16-bit halves.
    """
    b_lo = b & 0xFFFF
    b_hi = b >> 16
    p_lo = a * b_lo
    p_hi = a * b_hi
    mid = p_lo + ((p_hi & 0xFFFF) << 16)
    return (p_hi >> 16) + (mid >> 32), mid & S.MASK32


def _philox_rounds(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on words that are Python ints or int64 tensors (broadcasting)."""
    for r in range(S.PHILOX_ROUNDS):
        if r:
            k0 = (k0 + S.PHILOX_W0) & S.MASK32
            k1 = (k1 + S.PHILOX_W1) & S.MASK32
        hi0, lo0 = _mulhilo(S.PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(S.PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def philox4x32_10(counter: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    c0, c1, c2, c3 = counter.unbind(-1)
    k0, k1 = key.unbind(-1)
    shape = torch.broadcast_shapes(c0.shape, k0.shape)
    words = _philox_rounds(c0, c1, c2, c3, k0, k1)
    return torch.stack([w.expand(shape) for w in words], dim=-1)


def _uniform(x: torch.Tensor) -> torch.Tensor:
    return (x >> 8).to(torch.float32) * S.UNIFORM_SCALE + S.UNIFORM_OFFSET


def _box_muller(xa: torch.Tensor, xb: torch.Tensor):
    r = torch.sqrt(-2.0 * torch.log(_uniform(xa).double()))
    t = (2.0 * math.pi) * _uniform(xb).double()
    return r * torch.cos(t), r * torch.sin(t)


def _normal_blocks(q_begin: int, q_end: int, *, key: NoiseKey, param_index, device) -> torch.Tensor:
    """Normals of blocks q_begin .. q_end-1 as a float32 tensor of shape [q_end - q_begin, 4]."""
    k0, k1, step = key.words()
    q = torch.arange(q_begin, q_end, dtype=torch.int64, device=device)
    x0, x1, x2, x3 = _philox_rounds(q & S.MASK32, q >> 32, param_index, step, k0, k1)
    z0, z1 = _box_muller(x0, x1)
    z2, z3 = _box_muller(x2, x3)
    return torch.stack([z0, z1, z2, z3], dim=-1).to(torch.float32)


def noise(numel, *, key: NoiseKey, param_index, offset, device) -> torch.Tensor:
    out = torch.empty(numel, dtype=torch.float32, device=device)
    if numel == 0:
        return out
    per = S.NORMALS_PER_BLOCK
    q_first, q_last = offset // per, (offset + numel - 1) // per
    done = 0
    for q_begin in range(q_first, q_last + 1, _CHUNK_BLOCKS):
        q_end = min(q_begin + _CHUNK_BLOCKS, q_last + 1)
        block = _normal_blocks(q_begin, q_end, key=key, param_index=param_index, device=device).view(-1)
        skip = offset - q_begin * per if q_begin == q_first else 0
        take = min(block.numel() - skip, numel - done)
        out[done : done + take] = block[skip : skip + take]
        done += take
    return out


def _math_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _sigma(p: torch.Tensor, plan: ParamPlan, gamma: float, fisher, eta: float) -> torch.Tensor:
    """Per-row noise std of ``p`` (float32), computed from its current (clean) values."""
    w = flat_view(p).double()
    if plan.vector:
        sigma = (gamma * (w.norm() + S.NORM_EPS)).reshape(1)
    else:
        sigma = gamma * w.view(plan.rows, -1).norm(dim=1)
    if fisher is not None:
        row_fisher = flat_view(fisher).double().view(plan.sigma_count, -1).sum(dim=1)
        sigma = sigma / torch.sqrt(1.0 + eta * row_fisher)
    return sigma.to(torch.float32)


def _add_noise_(p: torch.Tensor, sigma: torch.Tensor, z: torch.Tensor, sign: float) -> None:
    flat = flat_view(p)
    rows = sigma.numel()
    dtype = _math_dtype(p)
    w = flat.to(dtype).view(rows, -1)
    flat.copy_((w + sign * (sigma.to(dtype).view(rows, 1) * z.to(dtype).view(rows, -1))).view(-1))


def _param_noise(p, index, key: NoiseKey) -> torch.Tensor:
    return noise(p.numel(), key=key, param_index=index, offset=0, device=p.device)


def perturb_(params, *, key: NoiseKey, plan, gammas, etas, backups, grads, grad_scale, fisher):
    sigmas = []
    for i, p in enumerate(params):
        sigma = _sigma(p, plan[i], gammas[i], fisher[i] if fisher is not None else None, etas[i])
        if backups is not None:
            backups[i].copy_(p)
        if gammas[i] != 0.0:
            _add_noise_(p, sigma, _param_noise(p, plan[i].param_index, key), +1.0)
        if grads is not None and grads[i] is not None:
            grads[i].copy_(grads[i].to(_math_dtype(grads[i])) * grad_scale)
        sigmas.append(sigma)
    return sigmas


def _mix_grad(mix: GradMix, i: int):
    """The gradient of parameter ``i`` to use (float32; float64 for float64), and its updated Fisher state
    (or None)."""
    grad = mix.grads[i]
    g = grad.to(_math_dtype(grad))
    new_fisher = None
    if mix.fisher is not None:
        new_fisher = mix.beta * mix.fisher[i] + (g * mix.fisher_scale) ** 2
    g = g * mix.grad_scale
    if mix.clean_grads is not None:
        g = g + mix.clean_grads[i].to(g.dtype) * mix.clean_scale
    return g, new_fisher


def restore_(params, *, key: NoiseKey | None, plan, backups, sigmas, mix: GradMix):
    for i, p in enumerate(params):
        if backups is not None:
            p.copy_(backups[i])
        else:
            _add_noise_(p, sigmas[i], _param_noise(p, plan[i].param_index, key), -1.0)
        if mix.grads is not None and mix.grads[i] is not None:
            g, new_fisher = _mix_grad(mix, i)
            mix.grads[i].copy_(g)
            if new_fisher is not None:
                mix.fisher[i].copy_(new_fisher)


def sgd_step_(params, *, hyper: SgdHyper, plan, momentum_buffers, backups, found_inf, mix: GradMix):
    """torch.optim.SGD's update, op for op (so fp32 results are bit-identical to it); elementwise, so the
    plan is not needed."""
    for i, p in enumerate(params):
        if backups is not None:
            p.copy_(backups[i])
        g, new_fisher = _mix_grad(mix, i)
        if hyper.maximize:
            g = -g
        w = p.to(_math_dtype(p))
        if hyper.weight_decay != 0:
            g = g.add(w, alpha=hyper.weight_decay)
        new_buf = None
        if hyper.momentum != 0:
            if hyper.is_first_step:
                new_buf = g.clone()
            else:
                new_buf = momentum_buffers[i].to(w.dtype).mul(hyper.momentum).add(g, alpha=1 - hyper.dampening)
            g = g.add(new_buf, alpha=hyper.momentum) if hyper.nesterov else new_buf
        new_w = w.add(g, alpha=-hyper.lr)

        updates = [(p, new_w)]
        if new_buf is not None:
            updates.append((momentum_buffers[i], new_buf))
        if new_fisher is not None:
            updates.append((mix.fisher[i], new_fisher))
        for target, value in updates:
            if found_inf is not None:
                value = torch.where(found_inf != 0, target.to(value.dtype), value)
            target.copy_(value)
