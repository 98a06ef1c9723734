"""The C++/CUDA extension as a backend: the backend functions call the registered ops.

One class serves both libraries of registered ops: ``torch.ops.rwp_kernels`` (backends "cpu" and "cuda")
and ``torch.ops.rwp_kernels_emu`` (backend "cuda-emu": the CUDA kernels compiled for the CPU).
``ops_backend`` requires the library to be loaded (``rwp_kernels.extension.load()``); it registers the
ops' fake (meta) implementations, so the ops work under FakeTensor / torch.compile.
Absent companions travel as empty lists (whole list) or empty tensors (one parameter); a float that
may be a device tensor travels as (tensor or None, float).
"""
import torch

from .contract import GradMix, NoiseKey, SgdHyper

NAMESPACES = {False: "rwp_kernels", True: "rwp_kernels_emu"}  # by `emulated`


def _list(tensors) -> list:
    return [] if tensors is None else list(tensors)


def _entries(tensors, params) -> list:
    """A companion list with every None replaced by an empty tensor (absent for that parameter)."""
    if tensors is None:
        return []
    return [p.new_empty(0) if t is None else t for t, p in zip(tensors, params)]


def _plan_words(plan) -> list[int]:
    """The plan as the registered ops take it: four words per parameter (csrc/binding.cpp, make_table)."""
    return [w for e in plan for w in (e.row_len, e.sigma_len, e.param_index, int(e.vector))]


def _scalar(value):
    if isinstance(value, torch.Tensor):
        return value, 1.0
    return None, float(value)


class OpsBackend:
    """The backend functions (rwp_kernels.contract.Backend) over the library ``torch.ops.<namespace>``."""

    def __init__(self, namespace: str):
        self.NAME = f"extension ({namespace})"
        self._ops = getattr(torch.ops, namespace)
        _register_fakes(namespace)

    def philox4x32_10(self, counter: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        shape = torch.broadcast_shapes(counter.shape[:-1], key.shape[:-1])
        c = counter.expand(*shape, 4).reshape(-1, 4)
        k = key.expand(*shape, 2).reshape(-1, 2)
        return self._ops.philox4x32_10(c, k).view(*shape, 4)

    def noise(self, numel, *, key: NoiseKey, param_index, offset, device) -> torch.Tensor:
        out = torch.empty(numel, dtype=torch.float32, device=device)
        k0, k1, step = key.words()
        self._ops.noise_(out, k0, k1, param_index, step, offset)
        return out

    def perturb_(self, params, *, key: NoiseKey, plan, gammas, etas, backups, grads, grad_scale, fisher):
        k0, k1, step = key.words()
        flat = self._ops.perturb_(
            params, _list(backups), _entries(grads, params), _list(fisher), gammas, etas, _plan_words(plan),
            k0, k1, step, *_scalar(grad_scale),
        )
        return list(flat.split([e.sigma_count for e in plan]))

    def restore_(self, params, *, key: NoiseKey | None, plan, backups, sigmas, mix: GradMix):
        k0, k1, step = key.words() if key is not None else (0, 0, 0)
        self._ops.restore_(
            params, _list(backups), _list(sigmas), _entries(mix.grads, params), _list(mix.fisher),
            _entries(mix.clean_grads, params), _plan_words(plan), k0, k1, step, *_scalar(mix.grad_scale), mix.beta,
            *_scalar(mix.fisher_scale), *_scalar(mix.clean_scale),
        )

    def sgd_step_(self, params, *, hyper: SgdHyper, plan, momentum_buffers, backups, found_inf, mix: GradMix):
        self._ops.sgd_step_(
            params, list(mix.grads), _list(momentum_buffers), _list(backups), _list(mix.fisher),
            _entries(mix.clean_grads, params), _plan_words(plan), hyper.lr,
            hyper.momentum, hyper.dampening, hyper.weight_decay,
            hyper.nesterov, hyper.maximize, hyper.is_first_step, *_scalar(mix.grad_scale), found_inf, mix.beta,
            *_scalar(mix.fisher_scale), *_scalar(mix.clean_scale),
        )


_backends: dict[bool, OpsBackend] = {}


def ops_backend(emulated: bool = False) -> OpsBackend:
    """The backend over the loaded library (``emulated``: rwp_kernels_emu)."""
    if emulated not in _backends:
        _backends[emulated] = OpsBackend(NAMESPACES[emulated])
    return _backends[emulated]


# ---- fake (meta) implementations: shapes only, for FakeTensor tracing and torch.compile ----------------

def _register_fakes(namespace: str) -> None:
    def philox_fake(counter, key):
        return counter.new_empty(counter.shape)

    def perturb_fake(params, backups, grads, fisher, gammas, etas, plan, key0, key1, step, grad_scale_tensor,
                     grad_scale):
        sigma_lens = plan[1::4]
        return params[0].new_empty(sum(p.numel() // n for p, n in zip(params, sigma_lens)), dtype=torch.float32)

    def no_result(*args):
        return None

    torch.library.register_fake(f"{namespace}::philox4x32_10")(philox_fake)
    torch.library.register_fake(f"{namespace}::perturb_")(perturb_fake)
    for op in ("noise_", "restore_", "sgd_step_"):
        torch.library.register_fake(f"{namespace}::{op}")(no_result)
