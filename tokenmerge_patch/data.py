"""Small, offline datasets for accuracy checks and fine-tuning: MNIST idx files, the CIFAR-10 ``.npz``
of ``../shared``, any ImageFolder, and ImageNet validation images (e.g. the 1000 samples of ``../shared``).

A dataset spec is ``mnist:DIR``, ``cifar10:FILE.npz``, ``imagefolder:DIR`` or ``imagenet:DIR``. ``imagenet:DIR``
is an ImageFolder of ``<wnid>/`` folders (``DIR`` or ``DIR/val``) with the standard evaluation transform (resize
the shorter side to ``int(224 / 0.875) = 256``, bicubic; centre crop 224; normalise) and the standard class
indices (the order of ``synset_words.txt`` next to the folders; without it, the sorted wnids of all 1000 classes).
:func:`split_by_class` splits such a set deterministically in two halves (calibration: even class indices;
evaluation: odd), :func:`evenly_spaced` picks a subset, :func:`to_tensor_dataset` decodes one into memory once.

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
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset
from tqdm.auto import tqdm


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
    """``mnist:DIR`` (test split), ``cifar10:FILE.npz``, ``imagefolder:DIR`` or ``imagenet:DIR`` (see
    :func:`load_imagenet`), optionally a subset."""
    kind, _, location = spec.partition(":")
    if not location:
        raise ValueError(
            f"dataset spec must be mnist:DIR, cifar10:FILE.npz, imagefolder:DIR or imagenet:DIR, got {spec!r}"
        )
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
    elif kind == "imagenet":
        if in_chans != 3:
            raise ValueError(f"imagenet: images are RGB, the model takes {in_chans} channels")
        dataset = load_imagenet(location, image_size=image_size, mean=mean, std=std)
    else:
        raise ValueError(f"dataset kind must be mnist, cifar10, imagefolder or imagenet, got {kind!r} in {spec!r}")
    return dataset if indices is None else Subset(dataset, list(indices))


# -- ImageNet -----------------------------------------------------------------------------------------------------
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENET_CROP_PCT = 0.875  # resize to image_size / 0.875 (256 for 224), then centre-crop image_size
SYNSET_WORDS = "synset_words.txt"


def imagenet_transform(
    image_size: int | tuple[int, int] = 224,
    *,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    crop_pct: float = IMAGENET_CROP_PCT,
):
    """The standard ImageNet evaluation transform: shorter side to ``int(size / crop_pct)`` (bicubic,
    antialiased), centre crop ``image_size``, to a tensor in 0..1, normalise by ``mean``/``std``.

    >>> imagenet_transform(224).transforms[0].size
    256
    """
    from torchvision import transforms

    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    return transforms.Compose(
        [
            transforms.Resize(int(min(size) / crop_pct), interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(size),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ]
    )


def _imagenet_root(folder: Path) -> Path:
    """``folder`` if it holds class folders, else ``folder/val`` when that does."""
    if not folder.is_dir():
        raise FileNotFoundError(f"imagenet: {folder} is not a directory")
    has_classes = any(p.is_dir() and p.name != "val" for p in folder.iterdir())
    return folder / "val" if not has_classes and (folder / "val").is_dir() else folder


def imagenet_synsets(folder: str | Path) -> list[tuple[str, str]] | None:
    """``[(wnid, class name), ...]`` in class-index order from ``synset_words.txt`` in ``folder`` or its parent
    (``None`` when there is none); the name is the first of the comma-separated synonyms."""
    folder = Path(folder)
    path = next((d / SYNSET_WORDS for d in (folder, folder.parent) if (d / SYNSET_WORDS).is_file()), None)
    if path is None:
        return None
    synsets = []
    for line in path.read_text().splitlines():
        if line.strip():
            wnid, _, words = line.strip().partition(" ")
            synsets.append((wnid, words.split(",")[0].strip()))
    return synsets


def load_imagenet(
    folder: str | Path,
    *,
    image_size: int | tuple[int, int] = 224,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Dataset:
    """ImageNet validation images in ImageFolder layout (``folder/<wnid>/*.JPEG``, or ``folder/val/<wnid>/``) with
    :func:`imagenet_transform`, labelled with the standard class indices: the line order of ``synset_words.txt``
    (in the folder or its parent) when there is one, so a subset of the classes keeps its true indices; without
    it the folder must hold all 1000 classes (sorted wnids are the standard order). The dataset's ``targets``
    are those indices and ``class_names`` the readable names (or the wnids).
    """
    from torchvision import datasets

    root = _imagenet_root(Path(folder))
    dataset = datasets.ImageFolder(root, transform=imagenet_transform(image_size, mean=mean, std=std))
    synsets = imagenet_synsets(root)
    if synsets is None:
        if len(dataset.classes) != 1000:
            raise ValueError(
                f"imagenet: {root} has {len(dataset.classes)} class folders; without {SYNSET_WORDS} beside them "
                "the class indices are only known for all 1000"
            )
        dataset.class_names = list(dataset.classes)
        return dataset
    index = {wnid: i for i, (wnid, _) in enumerate(synsets)}
    unknown = [c for c in dataset.classes if c not in index]
    if unknown:
        raise ValueError(f"imagenet: folders {unknown[:5]} of {root} are not in its {SYNSET_WORDS}")
    dataset.samples = [(path, index[dataset.classes[target]]) for path, target in dataset.samples]
    dataset.imgs = dataset.samples
    dataset.targets = [target for _, target in dataset.samples]
    dataset.classes = [wnid for wnid, _ in synsets]
    dataset.class_to_idx = index
    dataset.class_names = [name for _, name in synsets]
    return dataset


class Split(NamedTuple):
    """Indices into a dataset: the calibration half and the evaluation half."""

    calibration: list[int]
    evaluation: list[int]


def split_by_class(labels: Sequence[int] | Tensor) -> Split:
    """Split a labelled set deterministically in two disjoint halves by class index: samples of an **even** class
    index (0, 2, ..., 998) are for calibration, those of an **odd** one (1, 3, ..., 999) for evaluation. On the
    1000 ImageNet samples of ``../shared`` (one image per class) that is 500 and 500 images, and no class is seen
    on both sides. Indices stay in dataset order.

    >>> split_by_class([0, 1, 2, 3, 3, 6])
    Split(calibration=[0, 2, 5], evaluation=[1, 3, 4])
    """
    labels = [int(label) for label in labels]
    return Split(
        [i for i, label in enumerate(labels) if label % 2 == 0],
        [i for i, label in enumerate(labels) if label % 2 == 1],
    )


def evenly_spaced(indices: Sequence[int], count: int | None) -> list[int]:
    """``count`` of ``indices`` spread evenly over them (the ``floor(i * len / count)``-th, i = 0..count-1), so a
    subset of a class-sorted set covers the whole class range; all of them when ``count`` is ``None`` or not
    smaller.

    >>> evenly_spaced(list(range(0, 20, 2)), 4)
    [0, 4, 10, 14]
    """
    indices = list(indices)
    if count is None or count >= len(indices):
        return indices
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    return [indices[(i * len(indices)) // count] for i in range(count)]


def to_tensor_dataset(
    dataset: Dataset,
    indices: Sequence[int] | None = None,
    *,
    batch_size: int = 32,
    workers: int = 0,
    desc: str = "decode",
    progress: bool = True,
) -> TensorDataset:
    """Decode ``dataset`` (or the samples at ``indices``) once into memory: a ``TensorDataset`` of ``(images,
    labels)``, so repeated evaluations do not decode JPEGs again (224-px RGB: 0.6 MB an image).

    >>> data = to_tensor_dataset(TensorDataset(torch.zeros(5, 2), torch.arange(5)), [4, 1], progress=False)
    >>> data.tensors[1].tolist()
    [4, 1]
    """
    subset = dataset if indices is None else Subset(dataset, list(indices))
    loader = DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=workers)
    images, labels = [], []
    for batch_images, batch_labels in tqdm(loader, desc=desc, disable=not progress, leave=False):
        images.append(batch_images)
        labels.append(torch.as_tensor(batch_labels))
    if not images:
        raise ValueError("to_tensor_dataset: no samples to decode")
    return TensorDataset(torch.cat(images), torch.cat(labels).long())
