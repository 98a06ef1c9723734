"""Which backend runs an op: the registry, availability (with the reason when absent), and "auto".

A backend is a module that implements ``rwp_kernels.contract.Backend``: the functions ``philox4x32_10``,
``noise``, ``perturb_``, ``restore_`` and ``sgd_step_`` over the validated, bundled arguments that
``rwp_kernels.ops`` builds. Parameters of a dtype that a fused backend does not handle (float64) go to the
reference backend in the same call.
"""
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

NAMES = ("auto", "reference", "cpu", "cuda", "triton", "cuda-emu")
FUSED_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32})
ALL_DTYPES = FUSED_DTYPES | {torch.float64}


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run here; the message says why."""


@dataclass(frozen=True)
class Backend:
    name: str
    description: str
    device_types: tuple[str, ...]  # the tensors it can run on, in principle
    dtypes: frozenset
    load: Callable[[str], object]  # device type -> backend module, or raises BackendUnavailableError
    one_dtype_per_call: bool = False  # its kernels are compiled per dtype: assign() splits calls by dtype

    def module(self, device_type: str):
        return _load(self.name, device_type)


def _load_reference(device_type: str):
    from . import reference

    return reference


def _load_cpu(device_type: str):
    if device_type != "cpu":
        raise BackendUnavailableError(f"it runs on CPU tensors, not {device_type} tensors")
    from . import extension

    return extension.backend()[0]


def _require_gpu() -> None:
    if not torch.cuda.is_available():
        raise BackendUnavailableError("no CUDA GPU is visible to torch")


def _load_cuda(device_type: str):
    if device_type != "cuda":
        raise BackendUnavailableError(f"it runs on CUDA tensors, not {device_type} tensors")
    _require_gpu()
    from . import extension

    module, ext = extension.backend()
    if not ext.with_cuda:
        raise BackendUnavailableError(ext.why_no_cuda)
    return module


def _load_cuda_emu(device_type: str):
    if device_type != "cpu":
        raise BackendUnavailableError(f"it runs the CUDA kernels on CPU tensors, not on {device_type} tensors")
    from . import extension

    return extension.backend(emulated=True)[0]


def _require_triton_version() -> str:
    """Triton's version, read without importing it (an older Triton can fail at import in other ways)."""
    from importlib import metadata

    from ._version import MIN_TRITON, release

    try:
        version = metadata.version("triton")
    except metadata.PackageNotFoundError:
        raise BackendUnavailableError('triton is not installed (pip install "rwp-kernels[triton]")') from None
    if release(version) < release(MIN_TRITON):
        raise BackendUnavailableError(f"triton {version} is installed; the Triton kernels need triton >= {MIN_TRITON}")
    return version


def _require_interpreter_numpy(triton_version: str) -> None:
    """Triton 3.6's interpreter turns a scalar tensor into an index with int() of a one-element array, which numpy
    2.4 refuses (the kernels' loops over a row's tiles)."""
    from importlib import metadata

    from ._version import release, triton_3_6

    if not triton_3_6(triton_version):
        return
    try:
        numpy_version = metadata.version("numpy")
    except metadata.PackageNotFoundError:
        return  # (the interpreter's own import of numpy says so)
    if release(numpy_version) >= (2, 4):
        raise BackendUnavailableError(f"Triton {triton_version}'s interpreter needs numpy < 2.4 (numpy "
                                      f"{numpy_version} is installed); Triton 3.7 and later work with it")


def _load_triton(device_type: str):
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if device_type == "cpu" and not interpret:
        raise BackendUnavailableError("it runs on CPU tensors only under TRITON_INTERPRET=1 (for testing)")
    if device_type == "cuda" and interpret:
        raise BackendUnavailableError("TRITON_INTERPRET=1 is set: Triton's interpreter runs it on CPU tensors only")
    if device_type not in ("cpu", "cuda"):
        raise BackendUnavailableError(f"it runs on CUDA tensors, not {device_type} tensors")
    if device_type == "cuda":
        _require_gpu()
    triton_version = _require_triton_version()
    if interpret:
        _require_interpreter_numpy(triton_version)
    try:
        from . import triton as module
    except ImportError as err:
        raise BackendUnavailableError(f"triton is not importable ({err}); pip install triton") from None
    if module.INTERPRETED != interpret:
        raise BackendUnavailableError(
            f"its kernels were created {'with' if module.INTERPRETED else 'without'} TRITON_INTERPRET=1, which is "
            f"{'unset' if module.INTERPRETED else 'set'} now; set it before rwp_kernels.triton is first imported"
        )
    return module


REGISTRY = {
    "reference": Backend("reference", "pure PyTorch (the oracle)", ("cpu", "cuda"), ALL_DTYPES, _load_reference),
    "cpu": Backend("cpu", "C++ extension, CPU kernels", ("cpu",), FUSED_DTYPES, _load_cpu),
    "cuda": Backend("cuda", "C++ extension, CUDA kernels", ("cuda",), FUSED_DTYPES, _load_cuda),
    "triton": Backend("triton", "Triton kernels", ("cuda", "cpu"), FUSED_DTYPES, _load_triton, one_dtype_per_call=True),
    # Never chosen by "auto": a test bed that runs the CUDA kernels' code on the CPU, slowly.
    "cuda-emu": Backend("cuda-emu", "the CUDA kernels emulated on the CPU (for testing)", ("cpu",), FUSED_DTYPES,
                        _load_cuda_emu),
}

# Preference of backend="auto" per device type; the reference is the last resort everywhere.
AUTO_ORDER = {"cuda": ("cuda", "triton"), "cpu": ("cpu",)}

_warned_fallback: set[str] = set()


_loaded: dict[tuple[str, str], object] = {}


def _load(name: str, device_type: str):
    """The backend's module; the outcome (module or reason) is remembered, so a failed build is tried once."""
    key = (name, device_type)
    if key not in _loaded:
        try:
            _loaded[key] = REGISTRY[name].load(device_type)
        except BackendUnavailableError as err:
            _loaded[key] = err
    outcome = _loaded[key]
    if isinstance(outcome, BackendUnavailableError):
        raise BackendUnavailableError(str(outcome))
    return outcome


def unavailable_reason(name: str, device_type: str) -> str | None:
    """None if backend ``name`` can run on ``device_type`` tensors, else why not."""
    try:
        _load(name, device_type)
    except BackendUnavailableError as err:
        return str(err)
    return None


def _device_types() -> list[str]:
    types = ["cpu"]
    if torch.cuda.is_available():
        types.append("cuda")
    return types


def available_backends(device=None) -> list[str]:
    """Names of the backends that can run here (on ``device``'s type, or on any local device)."""
    types = [torch.device(device).type] if device is not None else _device_types()
    return [name for name in REGISTRY if any(unavailable_reason(name, t) is None for t in types)]


def check_name(backend: str) -> None:
    if backend not in NAMES:
        raise ValueError(f"backend must be one of {', '.join(repr(n) for n in NAMES)}; got {backend!r}")


def _caller_stacklevel() -> int:
    """The stacklevel of the first frame outside rwp_kernels (and torch's decorators around its methods),
    so that a warning points at user code."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get("__name__", "").split(".")[0] in ("rwp_kernels", "torch"):
        frame, level = frame.f_back, level + 1
    return level


def auto_choice(device_type: str) -> tuple[str, list[str]]:
    """The backend "auto" picks for ``device_type`` tensors, and why each faster one was passed over."""
    reasons = []
    for name in AUTO_ORDER.get(device_type, ()):
        reason = unavailable_reason(name, device_type)
        if reason is None:
            return name, []
        reasons.append(f"{name}: {reason}")
    return "reference", reasons


def resolve(backend: str, device: torch.device) -> Backend:
    """The backend that runs on ``device`` for the requested name ("auto" picks the fastest one)."""
    check_name(backend)
    if backend != "auto":
        reason = unavailable_reason(backend, device.type)
        if reason is not None:
            raise BackendUnavailableError(f"backend {backend!r} is not available for {device.type} tensors: {reason}")
        return REGISTRY[backend]
    name, reasons = auto_choice(device.type)
    if name == "reference" and device.type not in _warned_fallback:
        _warned_fallback.add(device.type)
        why = "; ".join(reasons) if reasons else f"no compiled backend exists for {device.type} tensors"
        warnings.warn(
            f"rwp_kernels: no fused backend for {device.type} tensors ({why}); "
            "using the pure-PyTorch reference backend, which is correct but slow. "
            "`python -m rwp_kernels.report` shows what is installed.",
            RuntimeWarning,
            stacklevel=_caller_stacklevel(),
        )
    return REGISTRY[name]


def assign(backend: str, device: torch.device, dtypes: list[torch.dtype]) -> list[tuple[object, list[int]]]:
    """(backend module, indices of the tensors it takes) pairs covering every tensor of a call: the chosen
    backend takes the dtypes it handles (one part per dtype where it needs that), the reference the rest."""
    chosen = resolve(backend, device)
    groups: dict = {}
    for i, d in enumerate(dtypes):
        if d not in chosen.dtypes:
            key = "reference"
        else:
            key = d if chosen.one_dtype_per_call else chosen.name
        groups.setdefault(key, []).append(i)
    rest = groups.pop("reference", None)
    parts = [(chosen.module(device.type), idx) for idx in groups.values()]
    if rest:
        parts.append((REGISTRY["reference"].module(device.type), rest))
    return parts
