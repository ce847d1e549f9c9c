"""Merge-group pictures (the paper's Fig. 6) for the README: real MNIST digits through the real pretrained
MNIST ViT of ../shared, and photographs bundled with scikit-image through DeiT-S (ImageNet weights when the
hub is reachable, otherwise random weights, said in the title).

    python benchmarks/merge_pictures.py          # writes merge_groups_mnist.png (and _photos.png) to --out
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
from tokenmerge_patch.data import load_mnist
from tokenmerge_patch.vis import merge_sources, plot_merge_groups

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, SHARED


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


def mnist_pictures(out: Path, keep_rate: float, digits: list[int]) -> Path:
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
    path = out / "merge_groups_mnist.png"
    stack_figures(figures, path)
    return path


def photo_pictures(out: Path, keep_rate: float) -> Path:
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
    path = out / "merge_groups_photos.png"
    stack_figures(figures, path)
    return path


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--keep-rate", type=float, default=0.5)
    parser.add_argument("--digits", default="0,1,2,3", help="MNIST test indices")
    parser.add_argument("--no-photos", action="store_true")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    written = []
    if SHARED.is_dir():
        written.append(mnist_pictures(args.out, args.keep_rate, [int(d) for d in args.digits.split(",")]))
    else:
        print(f"{SHARED} not found: no MNIST pictures")
    if not args.no_photos:
        written.append(photo_pictures(args.out, args.keep_rate))
    print("wrote", ", ".join(str(p) for p in written))
    return written


if __name__ == "__main__":
    main()
