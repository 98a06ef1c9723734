"""Networks by name: the CIFAR networks of rwp_kernels.models, any torchvision classification model (by its
name, or as ``torchvision:<name>`` where the name is also one of ours, e.g. ``torchvision:resnet18``), or any
timm model as ``timm:<name>`` (built with ``pretrained=False``: no weights are downloaded)."""
import difflib

from torch import nn

from ..models import MODELS
from .data import Data

TORCHVISION_PREFIX = "torchvision:"
TIMM_PREFIX = "timm:"


def _torchvision_models() -> list[str]:
    try:
        import torchvision
    except ImportError:
        return []
    return torchvision.models.list_models(module=torchvision.models)


def _torchvision_name(name: str) -> str | None:
    """The torchvision model that ``name`` means, or None if it means one of ours (or a timm model)."""
    if name.startswith(TORCHVISION_PREFIX):
        return name[len(TORCHVISION_PREFIX):]
    return None if name in MODELS or name.startswith(TIMM_PREFIX) else name


def _timm_name(name: str) -> str | None:
    """The timm model that ``name`` means (``timm:<name>``), or None."""
    return name[len(TIMM_PREFIX):] if name.startswith(TIMM_PREFIX) else None


def _import_timm(name: str):
    try:
        import timm
    except ImportError:
        raise ValueError(f"--model {name} needs timm: pip install timm") from None
    return timm


def _check_timm_name(name: str, timm_name: str) -> None:
    timm = _import_timm(name)
    if timm_name and timm.is_model(timm_name):  # is_model ignores a pretrained tag (resnet10t.c3_in1k) ...
        if "." not in timm_name or timm_name in timm.list_pretrained(timm_name):  # ... so check it here
            return
        tags = [t.split(".", 1)[1] for t in timm.list_pretrained(timm_name.split(".", 1)[0] + ".*")]
        raise ValueError(f"unknown model {name!r}: timm {timm.__version__} has no pretrained tag "
                         f"{timm_name.split('.', 1)[1]!r} for {timm_name.split('.', 1)[0]} (it has: "
                         f"{', '.join(tags) or 'none'}; the tag selects a configuration, no weights are loaded)")
    close = difflib.get_close_matches(timm_name, timm.list_models(), n=3, cutoff=0.75)
    hint = f" (did you mean {', '.join(TIMM_PREFIX + c for c in close)}?)" if close else ""
    raise ValueError(f"unknown model {name!r}: timm {timm.__version__} has no model {timm_name!r}{hint}; "
                     f"timm.list_models() lists them")


def check_model_name(name: str) -> None:
    timm_name = _timm_name(name)
    if timm_name is not None:
        _check_timm_name(name, timm_name)
        return
    tv_name = _torchvision_name(name)
    if tv_name is None or tv_name in _torchvision_models():
        return
    hint = "" if _torchvision_models() else " (install torchvision for its models)"
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(sorted(MODELS))}, a torchvision "
                     f"model name{hint} or timm:<name>")


def build_network(name: str, data: Data) -> nn.Module:
    check_model_name(name)
    timm_name = _timm_name(name)
    if timm_name is not None:
        timm = _import_timm(name)
        try:  # never pretrained: no download, and the classifier and stem fit the dataset
            return timm.create_model(timm_name, pretrained=False, num_classes=data.num_classes,
                                     in_chans=data.in_channels)
        except (TypeError, ValueError, RuntimeError, AssertionError, NotImplementedError) as err:
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise ValueError(f"--model {name}: timm cannot build it for {data.in_channels}-channel images and "
                             f"{data.num_classes} classes: {reason}") from None
    tv_name = _torchvision_name(name)
    if tv_name is None:
        return MODELS[name](num_classes=data.num_classes, in_channels=data.in_channels)
    import torchvision

    return torchvision.models.get_model(tv_name, weights=None, num_classes=data.num_classes)
