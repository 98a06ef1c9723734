"""The pure-PyTorch reference backend: the oracle every fused backend is tested against.

Clarity over speed, but vectorized over elements: Philox runs as int64 tensor arithmetic on whole
chunks of counters, so a ResNet-18's worth of noise takes a fraction of a second. Inputs arrive already
validated by ``rwp_kernels.ops``. The normals are csrc/rwp_common.h's float32 Box-Muller (Cephes logf,
sinf/cosf polynomials), op for op: float32 torch arithmetic, an exact emulation of each fmaf, a correctly
rounded sqrtf; so they are the C++ and CUDA kernels' normals bit for bit (docs/spec.md section 3). Norms
are accumulated in float64. Updates are done in float32 (float64 for float64 tensors) and written back in
the tensor's dtype.
"""
import math
import struct
from fractions import Fraction

import torch

from . import stream as S
from .contract import GradMix, NoiseKey, SgdHyper
from .layout import ParamPlan, flat_view

NAME = "reference"

# Philox blocks generated per chunk: the temporaries of a chunk (64k elements, 512 kB in float64) stay in
# the CPU's cache; with 2^20 blocks the float32 Box-Muller took 20 times as long.
_CHUNK_BLOCKS = 1 << 16


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


def _f32(literal: str) -> float:
    """The float32 nearest to the decimal ``literal`` (ties to even), as a C++ compiler rounds ``literal``f;
    converting through float64 could round twice."""
    x = Fraction(literal)
    bits = struct.unpack("<I", struct.pack("<f", float(x)))[0]  # within one float32 step of the answer
    near = [struct.unpack("<f", struct.pack("<I", b))[0] for b in (bits - 1, bits, bits + 1)]
    return min(near, key=lambda v: (abs(Fraction(v) - x), struct.unpack("<I", struct.pack("<f", v))[0] & 1))


# csrc/rwp_common.h's constants, from the same decimal literals.
_SQRT_HALF = _f32("0.707106781186547524")
_LOG_POLY = tuple(_f32(c) for c in ("7.0376836292e-2", "-1.1514610310e-1", "1.1676998740e-1", "-1.2420140846e-1",
                                    "1.4249322787e-1", "-1.6668057665e-1", "2.0000714765e-1", "-2.4999993993e-1",
                                    "3.3333331174e-1"))
_LOG_C1, _LOG_C2 = _f32("-2.12194440e-4"), _f32("0.693359375")
_TWO_PI = _f32("6.28318530717958647692")
_SIN_POLY = tuple(_f32(c) for c in ("-1.9515295891e-4", "8.3321608736e-3", "-1.6666654611e-1"))
_COS_POLY = tuple(_f32(c) for c in ("2.443315711809948e-5", "-1.388731625493765e-3", "4.166664568298827e-2"))


# float64 bit patterns: the 29 mantissa bits below float32's 23, which hold 1 followed by zeros exactly at a
# float32 midpoint (normal range); the float64 bits of 2^-126, float32's smallest normal number.
_BELOW_F32_MASK, _F32_MIDPOINT_BITS = (1 << 29) - 1, 1 << 28
_F64_ABS_MASK, _F32_TINY_BITS = (1 << 63) - 1, 0x3810000000000000


def _fma32(a, b, c) -> torch.Tensor:
    """fmaf(a, b, c): a * b + c rounded once to float32 (float32 tensors, or Python floats that are float32
    values; at least one of a and b a tensor).

    The product of two float32 is exact in float64, the float64 sum s = a*b + c rounds once, and rounding s
    to float32 gives the correctly rounded result unless s is a float32 midpoint that the exact sum is not
    (RN64 is monotonic and the midpoints are float64 numbers, so only there can the second rounding go the
    wrong way), or lies in float32's subnormal range, whose midpoints sit elsewhere. Those rare elements are
    redone by rounding to odd: TwoSum gives the exact error e = a*b + c - s; where e != 0, s truncated towards
    zero with its last bit set is the round-to-odd sum, and round-to-odd in float64 followed by rounding to
    float32 (53 >= 24 + 2 bits) is correctly rounded (Boldo and Melquiond, "Emulation of FMA and correctly
    rounded sums: proved algorithms using rounding to odd", IEEE Trans. Computers 57(4), 2008).
    """
    p = (a.double() if isinstance(a, torch.Tensor) else a) * (b.double() if isinstance(b, torch.Tensor) else b)
    c = c.double() if isinstance(c, torch.Tensor) else c
    s = p + c
    bits = s.view(torch.int64)
    redo = ((bits & _BELOW_F32_MASK) == _F32_MIDPOINT_BITS) | ((bits & _F64_ABS_MASK) < _F32_TINY_BITS)
    out = s.to(torch.float32)
    if redo.any():
        idx = redo.nonzero().squeeze(1)
        p, s = p[idx], s[idx]
        c = c[idx] if isinstance(c, torch.Tensor) else c
        b_virtual = s - p
        err = (p - (s - b_virtual)) + (c - b_virtual)  # TwoSum: p + c == s + err exactly
        odd = (s.view(torch.int64) - (err * s < 0).to(torch.int64)) | (err != 0).to(torch.int64)
        out[idx] = odd.view(torch.float64).to(torch.float32)
    return out


def _uniform(x: torch.Tensor) -> torch.Tensor:
    """u = (x >> 8) * 2^-24 + 2^-25 in float32: the product is exact, so one rounding (as the header's fma)."""
    return (x >> 8).to(torch.float32) * S.UNIFORM_SCALE + S.UNIFORM_OFFSET


def _log_unit(x: torch.Tensor) -> torch.Tensor:
    """csrc/rwp_common.h ``log_unit`` (Cephes logf for x in (0, 1]), op for op in float32."""
    bits = x.view(torch.int32)
    m = ((bits & 0x007FFFFF) | 0x3F000000).view(torch.float32)  # x = m * 2^e, m in [0.5, 1)
    small = m < _SQRT_HALF
    fe = ((bits >> 23) - 126 - small.to(torch.int32)).to(torch.float32)  # e - 1 where m < sqrt(1/2)
    t = (m - 1.0) + torch.where(small, m, 0.0)  # exact: 2m - 1 or m - 1
    z = t * t
    p = _fma32(_LOG_POLY[0], t, _LOG_POLY[1])
    for coef in _LOG_POLY[2:]:
        p = _fma32(p, t, coef)
    y = (p * t) * z
    y = _fma32(fe, _LOG_C1, y)
    y = _fma32(z, -0.5, y)
    return _fma32(fe, _LOG_C2, t + y)


def _sincos_2pi(u: torch.Tensor):
    """csrc/rwp_common.h ``sincos_2pi``: (cos 2 pi u, sin 2 pi u), op for op in float32."""
    k = torch.round(u * 4.0)  # ties to even: the header adds 1.5 * 2^23 to 4u instead (the same k)
    q = k.to(torch.int32)
    th = (u - k * 0.25) * _TWO_PI
    z = th * th
    ps = _fma32(_SIN_POLY[0], z, _SIN_POLY[1])
    ps = _fma32(ps, z, _SIN_POLY[2])
    sr = _fma32(ps * z, th, th)
    pc = _fma32(_COS_POLY[0], z, _COS_POLY[1])
    pc = _fma32(pc, z, _COS_POLY[2])
    cr = _fma32(pc * z, z, _fma32(-0.5, z, 1.0))
    # k quarter turns: odd k swaps cos and sin; flipping the sign bit is negation
    odd = (q & 1) != 0
    cs, sn = torch.where(odd, sr, cr), torch.where(odd, cr, sr)
    return torch.where(((q + 1) & 2) != 0, -cs, cs), torch.where((q & 2) != 0, -sn, sn)


def _sqrt32(x: torch.Tensor) -> torch.Tensor:
    """sqrtf(x) for float32 x >= 0, correctly rounded. torch.sqrt is not on every build (float32 and float64
    results 1 ulp off were measured on the CPU with torch 2.14), so its float64 root, rounded to float32 (at
    most one step off), is corrected: a midpoint between two float32 has 25 bits, its square is exact in
    float64, and comparing it with x says on which side the root lies (never on it)."""
    r = torch.sqrt(x.double()).to(torch.float32)
    xd, rd = x.double(), r.double()
    up, down = torch.nextafter(r, r.new_tensor(math.inf)), torch.nextafter(r, r.new_tensor(0.0))
    mid_up, mid_down = (rd + up.double()) * 0.5, (rd + down.double()) * 0.5
    return torch.where(mid_up * mid_up < xd, up, torch.where(mid_down * mid_down > xd, down, r))


def _box_muller(xa: torch.Tensor, xb: torch.Tensor):
    """Two standard normals from two Philox words (int64 tensors), as csrc/rwp_common.h ``box_muller``."""
    r = _sqrt32(-2.0 * _log_unit(_uniform(xa)))
    c, s = _sincos_2pi(_uniform(xb))
    return r * c, r * s


def _normal_blocks(q: torch.Tensor, param_index, *, key: NoiseKey) -> torch.Tensor:
    """Normals of the Philox blocks ``q`` (int64) of parameter ``param_index`` (an int, or an int64 tensor of
    one index per block) as a float32 tensor of shape [len(q), 4]."""
    k0, k1, step = key.words()
    x0, x1, x2, x3 = _philox_rounds(q & S.MASK32, q >> 32, param_index, step, k0, k1)
    z0, z1 = _box_muller(x0, x1)
    z2, z3 = _box_muller(x2, x3)
    return torch.stack([z0, z1, z2, z3], dim=-1)


def noise(numel, *, key: NoiseKey, param_index, offset, device) -> torch.Tensor:
    out = torch.empty(numel, dtype=torch.float32, device=device)
    if numel == 0:
        return out
    per = S.NORMALS_PER_BLOCK
    q_first, q_last = offset // per, (offset + numel - 1) // per
    done = 0
    for q_begin in range(q_first, q_last + 1, _CHUNK_BLOCKS):
        q_end = min(q_begin + _CHUNK_BLOCKS, q_last + 1)
        q = torch.arange(q_begin, q_end, dtype=torch.int64, device=device)
        block = _normal_blocks(q, param_index, key=key).view(-1)
        skip = offset - q_begin * per if q_begin == q_first else 0
        take = min(block.numel() - skip, numel - done)
        out[done : done + take] = block[skip : skip + take]
        done += take
    return out


def _blocks(p: torch.Tensor) -> int:
    return -(-p.numel() // S.NORMALS_PER_BLOCK)


def _group_noise(params, param_indices, key: NoiseKey) -> list[torch.Tensor]:
    """The normals of parameters that fit one chunk together, from one pass with a parameter index per block."""
    device = params[0].device
    counts = torch.tensor([_blocks(p) for p in params], device=device)
    starts = torch.cumsum(counts, 0) - counts
    q = torch.arange(int(counts.sum()), device=device) - torch.repeat_interleave(starts, counts)
    index = torch.repeat_interleave(torch.tensor(list(param_indices), device=device), counts)
    normals = _normal_blocks(q, index, key=key).view(-1)
    return [normals[start * S.NORMALS_PER_BLOCK :][: p.numel()] for p, start in zip(params, starts.tolist())]


def params_noise(params, param_indices, key: NoiseKey):
    """Yields each parameter's normals from offset 0 (flat, in memory order) on the stream of its entry of
    ``param_indices``. A Box-Muller pass costs a few hundred small torch ops whatever its length, so consecutive
    parameters on one device whose blocks fit a chunk share one pass; a parameter longer than a chunk has passes
    of its own, drawn when its turn comes (no more than a chunk is held beyond the parameter's own normals)."""
    group: list[int] = []
    blocks = 0
    for i, p in enumerate(params):
        n = _blocks(p)
        if group and (n > _CHUNK_BLOCKS or blocks + n > _CHUNK_BLOCKS or params[group[0]].device != p.device):
            yield from _group_noise([params[j] for j in group], [param_indices[j] for j in group], key)
            group, blocks = [], 0
        if n > _CHUNK_BLOCKS:
            yield noise(p.numel(), key=key, param_index=param_indices[i], offset=0, device=p.device)
        else:
            group.append(i)
            blocks += n
    if group:
        yield from _group_noise([params[j] for j in group], [param_indices[j] for j in group], key)


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


def perturb_(params, *, key: NoiseKey, plan, gammas, etas, backups, grads, grad_scale, fisher):
    noisy = [i for i in range(len(params)) if gammas[i] != 0.0]
    normals = params_noise([params[i] for i in noisy], [plan[i].param_index for i in noisy], key)
    sigmas = []
    for i, p in enumerate(params):
        sigma = _sigma(p, plan[i], gammas[i], fisher[i] if fisher is not None else None, etas[i])
        if backups is not None:
            backups[i].copy_(p)
        if gammas[i] != 0.0:
            _add_noise_(p, sigma, next(normals), +1.0)
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
    normals = params_noise(params, [x.param_index for x in plan], key) if backups is None else None
    for i, p in enumerate(params):
        if backups is not None:
            p.copy_(backups[i])
        else:
            _add_noise_(p, sigmas[i], next(normals), -1.0)
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
