"""Networks by name: the CIFAR networks of rwp_kernels.models, or any torchvision classification model."""
from torch import nn

from ..models import MODELS
from .data import Data


def _torchvision_models() -> list[str]:
    try:
        import torchvision
    except ImportError:
        return []
    return torchvision.models.list_models(module=torchvision.models)


def known_models() -> list[str]:
    return sorted(MODELS) + _torchvision_models()


def check_model_name(name: str) -> None:
    if name in MODELS:
        return
    if name in _torchvision_models():
        return
    hint = "" if _torchvision_models() else " (install torchvision for its ImageNet models)"
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(sorted(MODELS))} or a torchvision model{hint}")


def build_network(name: str, data: Data) -> nn.Module:
    check_model_name(name)
    if name in MODELS:
        return MODELS[name](num_classes=data.num_classes, in_channels=data.in_channels)
    import torchvision

    return torchvision.models.get_model(name, weights=None, num_classes=data.num_classes)
