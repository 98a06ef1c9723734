"""The public functional ops: validate, then hand each tensor to one backend.

Every op takes lists of tensors and treats all of them in one call (one launch per device and dtype
group on the fused backends). Rows: a >=2-D tensor has ``shape[0]`` rows (output filters), a 0-D/1-D
tensor is one row. Nothing is modified when an op raises on its arguments.
"""
from dataclasses import fields

import torch

from . import _validate as V
from . import backends
from . import layout as L
from .contract import GradMix, NoiseKey, SgdHyper, take

# The tensor arguments each op writes; it only reads the others.
WRITES = {
    "perturb_": {"params", "backups", "grads"},
    "restore_": {"params", "grads", "fisher"},
    "sgd_step_": {"params", "momentum_buffers", "fisher"},
}


def _tensor_arguments(op: str, params, per_param: dict, mix: GradMix | None, scalars: dict) -> list:
    """(name, tensors or tensor, written) for every tensor argument of a validated call."""
    named = [("params", params), *per_param.items(), *scalars.items()]
    if mix is not None:
        named += [(f.name, getattr(mix, f.name)) for f in fields(mix)]
    return [(name, value, name in WRITES[op]) for name, value in named
            if isinstance(value, torch.Tensor)
            or (isinstance(value, list) and any(isinstance(t, torch.Tensor) for t in value))]


def _run(op: str, backend: str, params, device, per_param: dict, *, mix: GradMix | None = None, **scalars):
    """Call backend function ``op`` (rwp_kernels.contract.Backend) of the assigned backend(s); per-parameter
    results come back in the order of ``params``.

    ``per_param``: the per-parameter lists, split with ``params`` where the call is split between backends; ``mix``
    is split the same way; ``scalars`` go to every part as they are. Before: no written tensor may share
    memory with another argument. After: the version counter of every written tensor is bumped, as
    torch's in-place ops do, so autograd sees the change.
    """
    V.check_not_capturing(op, device)
    arguments = _tensor_arguments(op, params, per_param, mix, scalars)
    V.check_no_aliasing(op, arguments)
    results = [None] * len(params)
    with torch.no_grad():
        for module, idx in backends.assign(backend, device, [p.dtype for p in params]):
            part = {k: take(v, idx) for k, v in per_param.items()}
            if mix is not None:
                part["mix"] = mix.take(idx)
            out = getattr(module, op)(take(params, idx), **part, **scalars)
            for j, i in enumerate(idx):
                results[i] = None if out is None else out[j]
    torch.autograd.graph.increment_version(
        [t for _, value, written in arguments if written for t in value if t is not None]
    )
    return results


def _check_mix(op, params, device, *, grads, grad_scale, fisher, beta, fisher_scale, clean_grads, clean_scale,
               grads_required=False) -> GradMix:
    """The gradient-mixing arguments shared by restore_ and sgd_step_, validated."""
    grads = V.check_companions(op, "grads", grads, params, allow_none=not grads_required)
    if grads_required and grads is None:
        raise TypeError(f"{op}: grads is required")
    fisher = V.check_companions(op, "fisher", fisher, params, dtype=torch.float32)
    clean_grads = V.check_companions(op, "clean_grads", clean_grads, params)
    if (fisher is not None or clean_grads is not None) and grads is None:
        raise ValueError(f"{op}: fisher and clean_grads need grads")
    if clean_grads is not None:
        for i, (g, c) in enumerate(zip(grads, clean_grads)):
            if (g is None) != (c is None):
                raise ValueError(f"{op}: grads[{i}] and clean_grads[{i}] must both be tensors or both be None")
    if fisher is not None:
        for i, g in enumerate(grads):
            if g is None:
                raise ValueError(f"{op}: grads[{i}] is None but fisher is given; the Fisher update needs it")
    return GradMix(
        grads=grads,
        grad_scale=V.check_scale(op, "grad_scale", grad_scale, device),
        fisher=fisher,
        beta=V.check_float(op, "beta", beta, low=0.0),
        fisher_scale=V.check_scale(op, "fisher_scale", fisher_scale, device),
        clean_grads=clean_grads,
        clean_scale=V.check_scale(op, "clean_scale", clean_scale, device),
    )


def philox4x32_10(counter, key, *, backend="auto") -> torch.Tensor:
    """Philox4x32-10 (Salmon et al., Random123): the four 32-bit output words of each block.

    ``counter`` has shape [..., 4] and ``key`` shape [..., 2] (broadcast against each other), integers
    in [0, 2**32). Returns an int64 tensor of shape [..., 4] holding the uint32 outputs.
    """
    op = "philox4x32_10"
    counter = V.check_words(op, "counter", counter, width=4)
    key = V.check_words(op, "key", key, width=2, device=counter.device)
    try:
        torch.broadcast_shapes(counter.shape[:-1], key.shape[:-1])
    except RuntimeError:
        raise ValueError(
            f"{op}: counter {tuple(counter.shape)} and key {tuple(key.shape)} do not broadcast"
        ) from None
    V.check_not_capturing(op, counter.device)
    module = backends.resolve(backend, counter.device).module(counter.device.type)
    return module.philox4x32_10(counter, key)


def noise(numel, *, seed, param_index=0, step=0, stream=0, offset=0, device="cpu", backend="auto") -> torch.Tensor:
    """Elements ``offset .. offset + numel - 1`` of the normal stream of one parameter (float32)."""
    op = "noise"
    numel = V.check_int(op, "numel", numel, high=V.INT64_LIMIT)
    device = torch.device(device)
    key = _noise_key(op, seed, step, stream)
    param_index = V.check_int(op, "param_index", param_index, high=V.UINT32_LIMIT)
    offset = V.check_int(op, "offset", offset, high=V.INT64_LIMIT)
    if offset + numel > V.INT64_LIMIT:
        raise ValueError(f"{op}: offset + numel is {offset + numel}; it must be at most 2**63 (offsets are int64)")
    V.check_not_capturing(op, device)
    module = backends.resolve(backend, device).module(device.type)
    return module.noise(numel, key=key, param_index=param_index, offset=offset, device=device)


def _noise_key(op: str, seed, step, stream) -> NoiseKey:
    return NoiseKey(seed=V.check_seed(op, seed), stream=V.check_int(op, "stream", stream),
                    step=V.check_int(op, "step", step))


def perturb_(params, *, gamma, seed, step, stream=0, param_indices=None, backups=None, grads=None,
             grad_scale=1.0, fisher=None, eta=0.0, backend="auto") -> list[torch.Tensor]:
    """Add filter-wise Gaussian noise to every tensor of ``params`` in place.

    Per row: ``sigma = gamma * ||row||`` of the clean weights (0-D/1-D tensors: ``gamma * (||w|| + 1e-16)``
    for the whole tensor); with an ARWP Fisher state, sigma is divided by ``sqrt(1 + eta * rowsum(fisher))``
    (a 0-D/1-D tensor's Fisher rows are single elements). Then ``w <- w + sigma * z`` with ``z`` the
    noise stream of (seed, param_indices[i], step, stream). If given, ``backups[i] <- w`` (before the
    noise, for an exact restore) and ``grads[i] <- grads[i] * grad_scale`` (None entries are skipped).
    ``gamma`` and ``eta`` are numbers or one number per tensor. Returns the float32 sigmas per row.
    """
    op = "perturb_"
    params, device = V.check_params(op, params)
    n = len(params)
    fisher = V.check_companions(op, "fisher", fisher, params, dtype=torch.float32)
    per_param = dict(
        gammas=V.per_param_floats(op, "gamma", gamma, n),
        etas=V.per_param_floats(op, "eta", eta, n),
        plan=L.plan(params, V.check_param_indices(op, param_indices, n),
                    [L.num_sigma_rows(p, adaptive=fisher is not None) for p in params]),
        backups=V.check_companions(op, "backups", backups, params),
        grads=V.check_companions(op, "grads", grads, params, allow_none=True),
        fisher=fisher,
    )
    key = _noise_key(op, seed, step, stream)
    return _run(op, backend, params, device, per_param, key=key,
                grad_scale=V.check_scale(op, "grad_scale", grad_scale, device))


def restore_(params, *, backups=None, sigmas=None, seed=None, step=None, stream=0, param_indices=None,
             grads=None, grad_scale=1.0, fisher=None, beta=0.0, fisher_scale=1.0, clean_grads=None,
             clean_scale=0.0, backend="auto") -> None:
    """Undo ``perturb_``: ``w <- backups[i]`` (exact), or ``w <- w - sigma * z`` with the noise regenerated
    from (seed, step, stream, param_indices) and the ``sigmas`` that ``perturb_`` returned (float rounding).

    Optionally, in the same pass, the gradient mix: with ``fisher``, ``F <- beta * F + (grad * fisher_scale)**2``
    (from the gradient as it arrives); then ``grad <- grad * grad_scale + clean_grad * clean_scale``.
    """
    op = "restore_"
    params, device = V.check_params(op, params)
    n = len(params)
    if (backups is None) == (sigmas is None):
        raise ValueError(f"{op}: pass either backups (exact restore) or sigmas with seed and step (regenerated noise)")
    backups = V.check_companions(op, "backups", backups, params)
    key = None
    if sigmas is not None:
        sigmas = V.check_sigmas(op, sigmas, params)
        if step is None:
            raise TypeError(f"{op}: step is required to regenerate the noise")
        key = _noise_key(op, seed, step, stream)
    mix = _check_mix(op, params, device, grads=grads, grad_scale=grad_scale, fisher=fisher, beta=beta,
                     fisher_scale=fisher_scale, clean_grads=clean_grads, clean_scale=clean_scale)
    counts = None if sigmas is None else [s.numel() for s in sigmas]
    per_param = dict(backups=backups, sigmas=sigmas, plan=L.plan(params, V.check_param_indices(op, param_indices, n),
                                                                 counts))
    _run(op, backend, params, device, per_param, mix=mix, key=key)


def sgd_step_(params, grads, momentum_buffers, *, lr, momentum=0.0, dampening=0.0, weight_decay=0.0,
              nesterov=False, maximize=False, is_first_step=False, grad_scale=1.0, found_inf=None, backups=None,
              fisher=None, beta=0.0, fisher_scale=1.0, clean_grads=None, clean_scale=0.0,
              backend="auto") -> None:
    """One fused step of torch.optim.SGD, after an optional exact restore.

    Per element: ``w <- backups[i]`` (if given); then, unless ``found_inf`` is nonzero (GradScaler
    overflow: restore only, nothing else changes), the Fisher update as in ``restore_``, the gradient
    ``g = grad * grad_scale (+ clean_grad * clean_scale)``, and exactly torch.optim.SGD's update with
    ``g`` (maximize, weight decay, momentum with dampening and nesterov; with ``is_first_step`` the
    momentum buffer is set to the gradient, as torch does on its first step). ``momentum_buffers`` may
    be None when ``momentum`` is 0. ``grad_scale`` and ``found_inf`` may be device tensors (no host sync).
    """
    op = "sgd_step_"
    params, device = V.check_params(op, params)
    momentum = V.check_float(op, "momentum", momentum, low=0.0)
    dampening = V.check_float(op, "dampening", dampening)
    V.check_nesterov(f"{op}: ", nesterov, momentum, dampening)
    if momentum != 0 and momentum_buffers is None:
        raise TypeError(f"{op}: momentum_buffers is required when momentum is {momentum}")
    mix = _check_mix(op, params, device, grads=grads, grad_scale=grad_scale, fisher=fisher, beta=beta,
                     fisher_scale=fisher_scale, clean_grads=clean_grads, clean_scale=clean_scale,
                     grads_required=True)
    per_param = dict(
        momentum_buffers=V.check_companions(op, "momentum_buffers", momentum_buffers, params)
        if momentum != 0 else None,
        backups=V.check_companions(op, "backups", backups, params),
        plan=L.plan(params, range(len(params))),
    )
    hyper = SgdHyper(
        lr=V.check_float(op, "lr", lr, low=0.0), momentum=momentum, dampening=dampening,
        weight_decay=V.check_float(op, "weight_decay", weight_decay, low=0.0), nesterov=bool(nesterov),
        maximize=bool(maximize), is_first_step=bool(is_first_step),
    )
    _run(op, backend, params, device, per_param, mix=mix, hyper=hyper,
         found_inf=V.check_found_inf(op, found_inf, device))
