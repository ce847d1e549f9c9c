"""Dataset specs the benchmarks accept: mnist:DIR, cifar10:FILE.npz, imagefolder:DIR, imagenet:DIR; and the
ImageNet helpers (class indices, evaluation transform, calibration/evaluation split, decoding into memory)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import CIFAR_NPZ, MNIST_DIR, SHARED, needs_shared

from tokenmerge_patch.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    dataset_from_spec,
    evenly_spaced,
    load_cifar10,
    load_imagenet,
    load_mnist,
    split_by_class,
    to_tensor_dataset,
)

IMAGENET_DIR = SHARED / "data" / "imagenet_samples"
needs_imagenet = pytest.mark.skipif(
    not (IMAGENET_DIR / "val").is_dir(),
    reason=f"../shared ImageNet sample images (data/imagenet_samples/val) not found at {SHARED}",
)


@needs_shared
def test_mnist_and_cifar10_of_shared() -> None:
    images, labels = load_mnist(MNIST_DIR)
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8 and set(labels) == set(range(10))
    data = dataset_from_spec(f"mnist:{MNIST_DIR}", mean=(0.5,), std=(0.5,), image_size=(28, 28), in_chans=1)
    image, label = data[0]
    torch.testing.assert_close(image[0], (torch.tensor(images[0] / 255.0, dtype=torch.float32) - 0.5) / 0.5)
    assert int(label) == labels[0]

    cifar, cifar_labels = load_cifar10(CIFAR_NPZ)
    assert cifar.shape == (10000, 32, 32, 3)
    data = dataset_from_spec(
        f"cifar10:{CIFAR_NPZ}", mean=(0.0,) * 3, std=(1.0,) * 3, image_size=(64, 48), in_chans=3, indices=range(10, 20)
    )
    image, label = data[0]
    assert image.shape == (3, 64, 48) and len(data) == 10 and int(label) == cifar_labels[10]
    grey = dataset_from_spec(f"cifar10:{CIFAR_NPZ}", mean=(0.0,), std=(1.0,), image_size=(32, 32), in_chans=1)
    torch.testing.assert_close(grey[3][0][0], torch.tensor(cifar[3] / 255.0, dtype=torch.float32).mean(-1))


def test_imagefolder(tmp_path: Path) -> None:
    for name, value in (("cat", 10), ("dog", 200)):
        (tmp_path / name).mkdir()
        Image.fromarray(np.full((20, 30, 3), value, np.uint8)).save(tmp_path / name / "a.png")
    data = dataset_from_spec(
        f"imagefolder:{tmp_path}", mean=(0.0,) * 3, std=(1.0,) * 3, image_size=(16, 16), in_chans=3
    )
    (cat, cat_label), (dog, dog_label) = data[0], data[1]
    assert cat.shape == dog.shape == (3, 16, 16) and (int(cat_label), int(dog_label)) == (0, 1)
    assert cat.mean().item() == pytest.approx(10 / 255, abs=1e-3) and dog.mean().item() == pytest.approx(
        200 / 255, abs=1e-3
    )


def test_bad_specs() -> None:
    with pytest.raises(ValueError, match=r"mnist:DIR, cifar10:FILE\.npz, imagefolder:DIR or imagenet:DIR"):
        dataset_from_spec("mnist", mean=(0.5,), std=(0.5,), image_size=(28, 28), in_chans=1)
    with pytest.raises(ValueError, match="kind must be mnist, cifar10, imagefolder or imagenet"):
        dataset_from_spec("svhn:/tmp", mean=(0.5,), std=(0.5,), image_size=(28, 28), in_chans=1)
    with pytest.raises(ValueError, match="imagenet: images are RGB"):
        dataset_from_spec("imagenet:/tmp", mean=(0.5,), std=(0.5,), image_size=(28, 28), in_chans=1)


def _expected_eval_image(path: Path) -> torch.Tensor:
    """The standard ImageNet evaluation transform written out with PIL: shorter side to 256 (bicubic), centre
    crop 224, 0..1, normalise."""
    image = Image.open(path).convert("RGB")
    width, height = image.size
    scale = 256 / min(width, height)
    size = (256, int(height * scale)) if width <= height else (int(width * scale), 256)
    image = image.resize(size, Image.BICUBIC)
    left, top = round((size[0] - 224) / 2), round((size[1] - 224) / 2)
    array = np.asarray(image.crop((left, top, left + 224, top + 224)), np.float32) / 255
    mean, std = np.array(IMAGENET_MEAN, np.float32), np.array(IMAGENET_STD, np.float32)
    return torch.from_numpy((array - mean) / std).permute(2, 0, 1)


@needs_imagenet
def test_imagenet_spec_of_shared() -> None:
    """A handful of the real images: standard class indices and names, the evaluation transform, decoding."""
    data = load_imagenet(IMAGENET_DIR)  # the folder holding val/ and synset_words.txt
    assert len(data) == 1000 and data.targets == list(range(1000))  # one image per class, in class order
    assert (data.class_names[0], data.class_names[1], data.class_names[999]) == ("tench", "goldfish", "toilet tissue")
    subset = dataset_from_spec(
        f"imagenet:{IMAGENET_DIR / 'val'}",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        image_size=(224, 224),
        in_chans=3,
        indices=[1, 388, 999],
    )
    for position, index in enumerate([1, 388, 999]):
        image, label = subset[position]
        assert image.shape == (3, 224, 224) and int(label) == index
        path = Path(data.samples[index][0])
        assert path.parent.name == data.classes[index]  # the wnid folder of that class
        torch.testing.assert_close(image, _expected_eval_image(path), atol=1e-5, rtol=0)
    decoded = to_tensor_dataset(subset, [2, 0], progress=False)
    images, labels = decoded.tensors
    assert images.shape == (2, 3, 224, 224) and labels.tolist() == [999, 1]
    torch.testing.assert_close(images[1], subset[0][0])


def test_imagenet_class_indices_of_a_subset(tmp_path: Path) -> None:
    """With synset_words.txt beside the folders a subset keeps the true indices; without it only all 1000 do."""
    wnids = ["n00000001", "n00000002", "n00000003"]
    (tmp_path / "synset_words.txt").write_text("".join(f"{w} class {i}, other name\n" for i, w in enumerate(wnids)))
    for wnid in wnids[1:]:
        (tmp_path / "val" / wnid).mkdir(parents=True)
        Image.fromarray(np.full((300, 260, 3), 99, np.uint8)).save(tmp_path / "val" / wnid / "x.JPEG")
    data = load_imagenet(tmp_path)  # finds val/
    assert data.targets == [1, 2] and data.class_names == ["class 0", "class 1", "class 2"]
    image, label = data[0]
    assert image.shape == (3, 224, 224) and int(label) == 1
    (tmp_path / "synset_words.txt").unlink()
    with pytest.raises(ValueError, match="class indices are only known for all 1000"):
        load_imagenet(tmp_path / "val")
    with pytest.raises(FileNotFoundError):
        load_imagenet(tmp_path / "missing")


def test_split_by_class_and_evenly_spaced() -> None:
    """Calibration = even class indices, evaluation = odd: disjoint, deterministic, in dataset order."""
    labels = list(range(1000))  # the layout of ../shared: one image per class
    split = split_by_class(labels)
    assert len(split.calibration) == len(split.evaluation) == 500
    assert all(labels[i] % 2 == 0 for i in split.calibration) and all(labels[i] % 2 == 1 for i in split.evaluation)
    assert split == split_by_class(torch.tensor(labels))
    calibration = evenly_spaced(split.calibration, 256)
    assert len(set(calibration)) == 256 and calibration[:3] == [0, 2, 6] and calibration[-1] == 996
    evaluation = evenly_spaced(split.evaluation, 100)
    assert evaluation[:2] == [1, 11] and evaluation[-1] == 991 and not set(evaluation) & set(calibration)
    assert evenly_spaced(split.evaluation, None) == split.evaluation == evenly_spaced(split.evaluation, 600)
    with pytest.raises(ValueError, match="at least 1"):
        evenly_spaced(split.evaluation, 0)
