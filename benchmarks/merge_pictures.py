"""Merge-group pictures (the paper's Fig. 6) for the README: real ImageNet images through the real ImageNet
DeiT-Tiny of ../shared, real MNIST digits through the real pretrained MNIST ViT of ../shared, and photographs
bundled with scikit-image through DeiT-S (ImageNet weights when the hub is reachable, otherwise random weights,
said in the title).

    python benchmarks/merge_pictures.py   # writes merge_groups_imagenet.png, _mnist.png and _photos.png to --out

The default run makes the committed pictures the README shows; another ``--keep-rate`` (or ``--digits``,
``--imagenet-classes``) writes ``merge_groups_*_quick.png`` instead. Without ../shared only the photographs are
drawn.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import timm
import torch
import torch.nn.functional as F

import tokenmerge_patch as tm
from tokenmerge_patch.checkpoint import hub_reachable, load_checkpoint
from tokenmerge_patch.data import IMAGENET_MEAN, IMAGENET_STD, load_imagenet, load_mnist
from tokenmerge_patch.vis import merge_sources, plot_merge_groups

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import IMAGENET_DIR, RESULTS, SHARED, imagenet_available, load_imagenet_model, output_stem

DEFAULT_KEEP_RATE, DEFAULT_DIGITS = 0.5, "0,1,2,3"  # the committed pictures
# ImageNet class indices of the committed pictures: goldfish, school bus, daisy, giant panda (one image each)
DEFAULT_IMAGENET_CLASSES = "1,779,985,388"


def stack_figures(figures: list, path: Path) -> None:
    """Save several one-row figures as one PNG, one above the other."""
    images = []
    for figure in figures:
        figure.canvas.draw()
        images.append(np.asarray(figure.canvas.buffer_rgba())[..., :3])
        plt.close(figure)
    width = max(image.shape[1] for image in images)
    padded = [np.pad(i, ((0, 0), (0, width - i.shape[1]), (0, 0)), constant_values=255) for i in images]
    plt.imsave(path, np.concatenate(padded, axis=0))


def mnist_pictures(path: Path, keep_rate: float, digits: list[int]) -> Path:
    checkpoint = load_checkpoint(SHARED / "models" / "vit_mnist_tiny")
    images, labels = load_mnist(SHARED / "data" / "mnist")
    tm.patch(checkpoint.model, layers=(1, 3, 5), keep_rate=keep_rate)
    figures = []
    for index in digits:
        pixels = torch.tensor(images[index], dtype=torch.float32) / 255
        normalised = ((pixels - checkpoint.mean[0]) / checkpoint.std[0])[None]
        sources = merge_sources(checkpoint.model, normalised)
        title = f"vit_mnist_tiny (pretrained), test digit {index} (a {labels[index]}), merge at keep {keep_rate}"
        figures.append(plot_merge_groups(pixels.numpy(), sources, (4, 4), title=title))
    stack_figures(figures, path)
    return path


@torch.no_grad()
def imagenet_pictures(path: Path, keep_rate: float, classes: list[int]) -> Path:
    """One image of each of ``classes`` (ImageNet indices) from ../shared through its real ImageNet DeiT-Tiny,
    merged in blocks 3, 6, 9 with the library's default flags; titles give both models' top-1 class."""
    model = load_imagenet_model()
    dataset = load_imagenet(IMAGENET_DIR)
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    by_class = {target: index for index, target in enumerate(dataset.targets)}
    figures = []
    for label in classes:
        image, _ = dataset[by_class[label]]
        before = int(tm.unpatch(model)(image[None]).argmax())
        tm.patch(model, layers=(3, 6, 9), keep_rate=keep_rate)
        after = int(model(image[None]).argmax())
        sources = merge_sources(model, image)
        names = dataset.class_names
        title = (
            f"ImageNet '{names[label]}' through DeiT-T (ImageNet weights), merge at keep {keep_rate}: "
            f"top-1 '{names[before]}' unpatched, '{names[after]}' patched"
        )
        figures.append(plot_merge_groups(image * std + mean, sources, (16, 16), title=title))
    stack_figures(figures, path)
    return path


def photo_pictures(path: Path, keep_rate: float) -> Path:
    import skimage.data

    online = hub_reachable()
    model = timm.create_model("deit_small_patch16_224", pretrained=online).eval()
    weights = "ImageNet weights" if online else "RANDOM weights: offline"
    tm.patch(model, layers=(3, 6, 9), keep_rate=keep_rate)
    mean, std = torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    figures = []
    for name in ("astronaut", "chelsea", "coffee"):
        image = torch.tensor(getattr(skimage.data, name)(), dtype=torch.float32).permute(2, 0, 1) / 255
        image = F.interpolate(image[None], scale_factor=224 / min(image.shape[1:]), mode="bilinear", antialias=True)[0]
        top, left = (image.shape[1] - 224) // 2, (image.shape[2] - 224) // 2
        image = image[:, top : top + 224, left : left + 224]
        sources = merge_sources(model, (image - mean) / std)
        figures.append(
            plot_merge_groups(image, sources, (16, 16), title=f"{name}: DeiT-S ({weights}), keep {keep_rate}")
        )
    stack_figures(figures, path)
    return path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Arguments, plus ``mnist_path`` and ``photos_path``: the committed names for the default run only."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--keep-rate", type=float, default=DEFAULT_KEEP_RATE)
    parser.add_argument("--digits", default=DEFAULT_DIGITS, help="MNIST test indices")
    parser.add_argument(
        "--imagenet-classes", default=DEFAULT_IMAGENET_CLASSES, help="ImageNet class indices (one image each)"
    )
    parser.add_argument("--no-photos", action="store_true")
    args = parser.parse_args(argv)
    args.digits = [int(d) for d in args.digits.split(",") if d.strip()]
    args.imagenet_classes = [int(c) for c in args.imagenet_classes.split(",") if c.strip()]
    default_rate = args.keep_rate == DEFAULT_KEEP_RATE
    full_mnist = default_rate and args.digits == [int(d) for d in DEFAULT_DIGITS.split(",")]
    full_imagenet = default_rate and args.imagenet_classes == [int(c) for c in DEFAULT_IMAGENET_CLASSES.split(",")]
    args.mnist_path = args.out / f"{output_stem(None, 'merge_groups_mnist', full=full_mnist)}.png"
    args.imagenet_path = args.out / f"{output_stem(None, 'merge_groups_imagenet', full=full_imagenet)}.png"
    args.photos_path = args.out / f"{output_stem(None, 'merge_groups_photos', full=default_rate)}.png"
    return args


def main(argv: list[str] | None = None) -> list[Path]:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    written = []
    if imagenet_available():
        written.append(imagenet_pictures(args.imagenet_path, args.keep_rate, args.imagenet_classes))
    else:
        print(f"{SHARED} has no ImageNet model and images: no ImageNet pictures")
    if SHARED.is_dir():
        written.append(mnist_pictures(args.mnist_path, args.keep_rate, args.digits))
    else:
        print(f"{SHARED} not found: no MNIST pictures")
    if not args.no_photos:
        written.append(photo_pictures(args.photos_path, args.keep_rate))
    print("wrote", ", ".join(str(p) for p in written))
    return written


if __name__ == "__main__":
    main()
