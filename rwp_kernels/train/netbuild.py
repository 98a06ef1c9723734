"""Networks by name: the CIFAR networks of rwp_kernels.models, or any torchvision classification model
(by its name, or as ``torchvision:<name>`` where the name is also one of ours, e.g. ``torchvision:resnet18``)."""
from torch import nn

from ..models import MODELS
from .data import Data

TORCHVISION_PREFIX = "torchvision:"


def _torchvision_models() -> list[str]:
    try:
        import torchvision
    except ImportError:
        return []
    return torchvision.models.list_models(module=torchvision.models)


def _torchvision_name(name: str) -> str | None:
    """The torchvision model that ``name`` means, or None if it means one of ours."""
    if name.startswith(TORCHVISION_PREFIX):
        return name[len(TORCHVISION_PREFIX):]
    return None if name in MODELS else name


def check_model_name(name: str) -> None:
    tv_name = _torchvision_name(name)
    if tv_name is None or tv_name in _torchvision_models():
        return
    hint = "" if _torchvision_models() else " (install torchvision for its models)"
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(sorted(MODELS))} or a torchvision "
                     f"model name{hint}")


def build_network(name: str, data: Data) -> nn.Module:
    check_model_name(name)
    tv_name = _torchvision_name(name)
    if tv_name is None:
        return MODELS[name](num_classes=data.num_classes, in_channels=data.in_channels)
    import torchvision

    return torchvision.models.get_model(tv_name, weights=None, num_classes=data.num_classes)
