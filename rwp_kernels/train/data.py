"""Datasets of the training command: scikit-learn's digits (embedded, no download), CIFAR-10/100,
an ImageNet-style folder, and synthetic images for throughput runs.

Every loader's order and augmentation depend only on (seed, epoch), so a resumed run sees exactly
the batches the uninterrupted run would have seen.
"""
import os
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

DATASETS = ("digits", "cifar10", "cifar100", "imagenet-folder", "synthetic")

CIFAR_MEAN = {"cifar10": (0.4914, 0.4822, 0.4465), "cifar100": (0.5071, 0.4865, 0.4409)}
CIFAR_STD = {"cifar10": (0.2470, 0.2435, 0.2616), "cifar100": (0.2673, 0.2564, 0.2762)}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class DataError(ValueError):
    """The requested data cannot be loaded; the message says what to do."""


@dataclass
class Data:
    name: str
    train: Dataset
    test: Dataset
    num_classes: int
    in_channels: int
    image_size: int


def _digits(seed_split: int = 0) -> Data:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(bunch.target, dtype=torch.int64)
    # a fixed, class-stratified 80/20 split: every 5th image of each class is held out
    test_mask = torch.zeros(len(labels), dtype=torch.bool)
    for c in range(10):
        idx = (labels == c).nonzero().flatten()
        test_mask[idx[seed_split::5]] = True
    mean, std = images[~test_mask].mean(), images[~test_mask].std()
    images = (images - mean) / std
    return Data("digits", TensorDataset(images[~test_mask], labels[~test_mask]),
                TensorDataset(images[test_mask], labels[test_mask]), 10, 1, 8)


class Cutout:
    """Zero a random ``size`` x ``size`` square of a CHW image tensor (DeVries & Taylor, 2017)."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        h, w = img.shape[-2:]
        cy, cx = torch.randint(h, ()).item(), torch.randint(w, ()).item()
        y0, y1 = max(cy - self.size // 2, 0), min(cy + self.size // 2, h)
        x0, x1 = max(cx - self.size // 2, 0), min(cx + self.size // 2, w)
        img = img.clone()
        img[..., y0:y1, x0:x1] = 0
        return img


def _torchvision(what: str):
    try:
        import torchvision
    except ImportError:
        raise DataError(f"{what} needs torchvision: pip install 'rwp-kernels[train]'") from None
    return torchvision


def _cifar(name: str, data_dir: str, download: bool, cutout: bool) -> Data:
    tv = _torchvision(name)
    T = tv.transforms
    cls = tv.datasets.CIFAR10 if name == "cifar10" else tv.datasets.CIFAR100
    normalize = T.Normalize(CIFAR_MEAN[name], CIFAR_STD[name])
    train_tf = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), normalize]
    if cutout:
        train_tf.append(Cutout(16 if name == "cifar10" else 8))
    try:
        train = cls(data_dir, train=True, download=download, transform=T.Compose(train_tf))
        test = cls(data_dir, train=False, download=download, transform=T.Compose([T.ToTensor(), normalize]))
    except RuntimeError as err:
        hint = "pass --download (needs network access)" if not download else "check the network and --data-dir"
        raise DataError(f"{name} not found under {os.path.abspath(data_dir)} ({err}); {hint}") from None
    return Data(name, train, test, 10 if name == "cifar10" else 100, 3, 32)


def _imagenet_folder(data_dir: str) -> Data:
    tv = _torchvision("imagenet-folder")
    T = tv.transforms
    train_dir, val_dir = os.path.join(data_dir, "train"), os.path.join(data_dir, "val")
    for d in (train_dir, val_dir):
        if not os.path.isdir(d):
            raise DataError(f"imagenet-folder expects {d}/ with one sub-folder of images per class")
    normalize = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train = tv.datasets.ImageFolder(train_dir, T.Compose(
        [T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(), normalize]))
    test = tv.datasets.ImageFolder(val_dir, T.Compose(
        [T.Resize(256), T.CenterCrop(224), T.ToTensor(), normalize]))
    return Data("imagenet-folder", train, test, len(train.classes), 3, 224)


def _synthetic(num_classes: int, image_size: int, train_size: int) -> Data:
    gen = torch.Generator().manual_seed(0)

    def make(n):
        return TensorDataset(torch.randn(n, 3, image_size, image_size, generator=gen),
                             torch.randint(0, num_classes, (n,), generator=gen))

    return Data("synthetic", make(train_size), make(max(train_size // 5, 1)), num_classes, 3, image_size)


def load_data(name: str, *, data_dir: str = "data", download: bool = False, cutout: bool = False,
              synthetic_classes: int = 10, synthetic_size: int = 32, synthetic_train: int = 2048) -> Data:
    if name == "digits":
        return _digits()
    if name in ("cifar10", "cifar100"):
        return _cifar(name, data_dir, download, cutout)
    if name == "imagenet-folder":
        return _imagenet_folder(data_dir)
    if name == "synthetic":
        return _synthetic(synthetic_classes, synthetic_size, synthetic_train)
    raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


class EpochBatches:
    """The index batches of one epoch: the order depends only on (seed, epoch). With ``shard=(rank, world)``
    each batch is the share ``rank::world`` of the global batch of ``batch_size`` (``--parallel``: the ranks
    split every update's batch)."""

    def __init__(self, n: int, batch_size: int, *, shuffle: bool, drop_last: bool, seed: int, shard=(0, 1)):
        self.n, self.batch_size, self.shuffle, self.drop_last, self.seed = n, batch_size, shuffle, drop_last, seed
        self.rank, self.world = shard
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)

    def generator(self) -> torch.Generator:
        """The epoch's random generator (the shuffle here; DataLoader's worker seeds in SeededLoader)."""
        return torch.Generator().manual_seed(self.seed * 100003 + self.epoch)

    def __iter__(self):
        order = torch.arange(self.n)
        if self.shuffle:
            order = torch.randperm(self.n, generator=self.generator())
        for b in range(len(self)):
            yield order[b * self.batch_size:(b + 1) * self.batch_size][self.rank::self.world]


class TensorBatches:
    """Mini-batches of an in-memory TensorDataset, without DataLoader's per-sample overhead."""

    def __init__(self, dataset: TensorDataset, indices: EpochBatches):
        self.tensors, self.indices = dataset.tensors, indices

    def set_epoch(self, epoch: int) -> None:
        self.indices.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self):
        for idx in self.indices:
            yield tuple(t[idx] for t in self.tensors)


class _IndexLists:
    """EpochBatches as the lists of ints DataLoader's batch_sampler yields."""

    def __init__(self, indices: EpochBatches):
        self.indices = indices

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self):
        return (idx.tolist() for idx in self.indices)


class SeededLoader:
    """A DataLoader whose batches and worker seeds come from (seed, epoch)."""

    def __init__(self, dataset: Dataset, indices: EpochBatches, *, workers: int):
        self.dataset, self.indices, self.workers = dataset, indices, workers

    def set_epoch(self, epoch: int) -> None:
        self.indices.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self):
        return iter(DataLoader(self.dataset, batch_sampler=_IndexLists(self.indices), num_workers=self.workers,
                               generator=self.indices.generator(), pin_memory=torch.cuda.is_available(), persistent_workers=False))


def make_loader(dataset: Dataset, batch_size: int, *, train: bool, seed: int, workers: int, shard=(0, 1)):
    """Batches of ``dataset`` (shuffled, full batches only, when ``train``); ``shard``: see EpochBatches."""
    indices = EpochBatches(len(dataset), batch_size, shuffle=train, drop_last=train, seed=seed, shard=shard)
    if isinstance(dataset, TensorDataset):
        return TensorBatches(dataset, indices)
    return SeededLoader(dataset, indices, workers=workers)
