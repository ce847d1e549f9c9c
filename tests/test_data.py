"""Dataset specs the benchmarks accept: mnist:DIR, cifar10:FILE.npz, imagefolder:DIR."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import CIFAR_NPZ, MNIST_DIR, needs_shared

from tokenmerge_patch.data import dataset_from_spec, load_cifar10, load_mnist


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
    with pytest.raises(ValueError, match=r"mnist:DIR, cifar10:FILE\.npz or imagefolder:DIR"):
        dataset_from_spec("mnist", mean=(0.5,), std=(0.5,), image_size=(28, 28), in_chans=1)
    with pytest.raises(ValueError, match="kind must be mnist, cifar10 or imagefolder"):
        dataset_from_spec("svhn:/tmp", mean=(0.5,), std=(0.5,), image_size=(28, 28), in_chans=1)
