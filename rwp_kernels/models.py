"""CNNs used by the tests, benchmarks, self-test and training command.

The CIFAR networks of the RWP paper: ``resnet18`` (3x3 stem, no max-pool; 11.2M parameters for 10
classes), ``vgg16_bn`` (VGG-16 with BatchNorm and a 512-512 classifier with dropout), and the
pre-activation wide ResNets ``wrn16_8`` and ``wrn28_10``. ``small_cnn`` is a tiny network for 8x8 images
(scikit-learn's digits). All take ``num_classes`` and ``in_channels``.
"""
import torch
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.residual = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.residual(x) + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, blocks_per_stage=(2, 2, 2, 2), num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True)
        )
        stages, channels = [], 64
        for i, (width, blocks) in enumerate(zip((64, 128, 256, 512), blocks_per_stage)):
            for j in range(blocks):
                stride = 2 if i > 0 and j == 0 else 1
                stages.append(BasicBlock(channels, width, stride))
                channels = width
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.stages(self.stem(x))), 1))


def resnet18(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return CifarResNet((2, 2, 2, 2), num_classes, in_channels)


VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def vgg16_bn(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    layers, channels = [], in_channels
    for item in VGG16_LAYOUT:
        if item == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(channels, item, 3, padding=1), nn.BatchNorm2d(item), nn.ReLU(inplace=True)]
            channels = item
    return nn.Sequential(
        *layers, nn.Flatten(),
        nn.Dropout(), nn.Linear(512, 512), nn.ReLU(inplace=True),
        nn.Dropout(), nn.Linear(512, 512), nn.ReLU(inplace=True),
        nn.Linear(512, num_classes),
    )


class WideBlock(nn.Module):
    """Pre-activation residual unit: BN-ReLU-conv-BN-ReLU-conv, with a 1x1 projection where the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.pre = nn.Sequential(nn.BatchNorm2d(in_channels), nn.ReLU(inplace=True))
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
        )
        self.project = None
        if stride != 1 or in_channels != out_channels:
            self.project = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.project is None:
            return x + self.body(self.pre(x))
        x = self.pre(x)
        return self.project(x) + self.body(x)


class WideResNet(nn.Module):
    def __init__(self, depth: int, width: int, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n+4, got {depth}")
        units = (depth - 4) // 6
        widths = (16 * width, 32 * width, 64 * width)
        blocks, channels = [], 16
        for i, w in enumerate(widths):
            for j in range(units):
                blocks.append(WideBlock(channels, w, 2 if i > 0 and j == 0 else 1))
                channels = w
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, padding=1, bias=False), *blocks,
            nn.BatchNorm2d(channels), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(channels, num_classes),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def wrn16_8(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return WideResNet(16, 8, num_classes, in_channels)


def wrn28_10(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return WideResNet(28, 10, num_classes, in_channels)


def small_cnn(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(in_channels, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
        nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(64, num_classes),
    )


MODELS = {"resnet18": resnet18, "vgg16_bn": vgg16_bn, "wrn16_8": wrn16_8, "wrn28_10": wrn28_10,
          "small_cnn": small_cnn}


def build_model(name: str, num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(sorted(MODELS))}")
    return MODELS[name](num_classes=num_classes, in_channels=in_channels)
