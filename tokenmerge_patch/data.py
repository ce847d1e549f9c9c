"""Small, offline datasets for accuracy checks and fine-tuning: MNIST idx files, the CIFAR-10 ``.npz``
of ``../shared``, and any ImageFolder.

A dataset spec is ``mnist:DIR``, ``cifar10:FILE.npz`` or ``imagefolder:DIR``:

>>> import numpy as np
>>> data = ArrayImageDataset(np.zeros((4, 28, 28), np.uint8), np.arange(4), mean=(0.5,), std=(0.5,),
...                          image_size=(32, 32), in_chans=3)
>>> image, label = data[1]
>>> tuple(image.shape), int(label)
((3, 32, 32), 1)
"""

from __future__ import annotations

import gzip
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset, Subset


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    if data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte idx file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_mnist(folder: str | Path, split: str = "t10k") -> tuple[np.ndarray, np.ndarray]:
    """``(images [N, 28, 28] uint8, labels [N] int64)`` from ``{split}-images-idx3-ubyte[.gz]``."""
    folder = Path(folder)
    found = {}
    for kind, stem in (("images", f"{split}-images-idx3-ubyte"), ("labels", f"{split}-labels-idx1-ubyte")):
        candidates = [folder / stem, folder / f"{stem}.gz"]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise FileNotFoundError(f"no {stem}[.gz] in {folder}")
        found[kind] = _read_idx(path)
    return found["images"], found["labels"].astype(np.int64)


def load_cifar10(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``(images [N, 32, 32, 3] uint8, labels [N] int64)`` from an ``.npz`` with ``images`` and ``labels``."""
    with np.load(path) as archive:
        return archive["images"], archive["labels"].astype(np.int64)


class ArrayImageDataset(Dataset):
    """uint8 images (``[N, H, W]`` or ``[N, H, W, C]``) as normalised ``[C, H', W']`` float tensors.

    Channels are repeated (grey to colour) or averaged (colour to grey) to ``in_chans``; images are resized
    (bilinear, antialiased) to ``image_size`` when it differs.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        image_size: tuple[int, int],
        in_chans: int,
    ) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.image_size = tuple(image_size)
        self.in_chans = in_chans

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image = torch.tensor(self.images[index], dtype=torch.float32).div_(255)
        image = image.unsqueeze(0) if image.ndim == 2 else image.permute(2, 0, 1)
        if image.shape[0] != self.in_chans:
            image = image.mean(0, keepdim=True) if self.in_chans == 1 else image.expand(self.in_chans, -1, -1)
        if tuple(image.shape[1:]) != self.image_size:
            image = F.interpolate(image[None], size=self.image_size, mode="bilinear", antialias=True)[0]
        return (image - self.mean) / self.std, self.labels[index]


def dataset_from_spec(
    spec: str,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    image_size: tuple[int, int],
    in_chans: int,
    indices: Sequence[int] | range | None = None,
) -> Dataset:
    """``mnist:DIR`` (test split), ``cifar10:FILE.npz`` or ``imagefolder:DIR``, optionally a subset."""
    kind, _, location = spec.partition(":")
    if not location:
        raise ValueError(f"dataset spec must be mnist:DIR, cifar10:FILE.npz or imagefolder:DIR, got {spec!r}")
    if kind in ("mnist", "cifar10"):
        images, labels = load_mnist(location) if kind == "mnist" else load_cifar10(location)
        dataset: Dataset = ArrayImageDataset(
            images, labels, mean=mean, std=std, image_size=image_size, in_chans=in_chans
        )
    elif kind == "imagefolder":
        from torchvision import datasets, transforms

        steps = [transforms.Resize(image_size), transforms.CenterCrop(image_size)]
        if in_chans == 1:
            steps.append(transforms.Grayscale(1))
        steps += [transforms.ToTensor(), transforms.Normalize(mean, std)]
        dataset = datasets.ImageFolder(location, transform=transforms.Compose(steps))
    else:
        raise ValueError(f"dataset kind must be mnist, cifar10 or imagefolder, got {kind!r} in {spec!r}")
    return dataset if indices is None else Subset(dataset, list(indices))
