"""Merge-group pictures (the paper's Fig. 6): after each reducing block, the patches that ended in the same
token share one colour over the image; patches that were dropped are greyed out.

>>> import timm, torch, tempfile, os
>>> model = timm.create_model("vit_tiny_patch16_224", img_size=64, num_classes=3).eval()
>>> _ = patch(model, layers=(2, 5, 8), keep_rate=0.5)
>>> path = os.path.join(tempfile.mkdtemp(), "groups.png")
>>> figure = show_merges(model, torch.randn(3, 64, 64), path=path)
>>> os.path.getsize(path) > 0, len(figure.axes)
(True, 4)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from .backends import image_model
from .patch import _state, patch, reduction_trace  # noqa: F401  (patch: doctest)
from .utils import eval_mode

__all__ = ["group_map", "merge_sources", "plot_merge_groups", "show_merges"]


def _patch_size(model: nn.Module) -> tuple[int, int]:
    """The stride of the model's patch-embedding convolution (its first ``Conv2d``)."""
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None:
        raise TypeError("cannot find the patch embedding (a Conv2d) of this model")
    return int(conv.stride[0]), int(conv.stride[1])


@torch.no_grad()
def merge_sources(model: nn.Module, image: Tensor) -> dict[int, Tensor]:
    """Run one image ``[C, H, W]`` (normalised as the model expects) through a patched model and return,
    per reducing block, the source map ``[N0]``: for each original patch, the token holding it (-1 if
    dropped)."""
    state = _state(model)
    if state is None:
        raise ValueError("model is not patched; call tokenmerge_patch.patch(model, ...) first")
    if not isinstance(image, Tensor):
        raise TypeError(f"image must be a float tensor [C, H, W], got {type(image).__name__}")
    if image.ndim != 3 or not image.is_floating_point():
        raise ValueError(f"image must be a float tensor [C, H, W], got {image.dtype} of shape {tuple(image.shape)}")
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is not None and image.shape[0] != conv.in_channels:
        raise ValueError(f"image has {image.shape[0]} channels but the model takes {conv.in_channels}")
    with eval_mode(model):  # source maps are always tracked
        param = next(model.parameters())
        image_model(model)(image[None].to(param.device, param.dtype))  # CLIP: its image side
    trace = reduction_trace(model)
    return {layer: record.source[0].cpu() for layer, record in trace.items()}


def group_map(source: Tensor, grid: tuple[int, int]) -> np.ndarray:
    """The source map as a ``grid``-shaped array of group ids (-1: dropped)."""
    return source.reshape(grid).numpy()


def _display(image: Tensor | np.ndarray) -> np.ndarray:
    """``[C, H, W]`` tensor (any range) or ``[H, W(, C)]`` array as an ``[H, W, 3]`` float array in 0..1."""
    array = image.detach().cpu().float().numpy() if isinstance(image, Tensor) else np.asarray(image, np.float32)
    if isinstance(image, Tensor) and array.ndim == 3:
        array = array.transpose(1, 2, 0)
    if array.ndim == 2:
        array = array[..., None]
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    low, high = float(array.min()), float(array.max())
    return (array - low) / (high - low) if high > low else np.zeros_like(array)


def plot_merge_groups(
    image: Tensor | np.ndarray,
    sources: dict[int, Tensor],
    patch_size: tuple[int, int],
    *,
    path: str | Path | None = None,
    title: str | None = None,
    seed: int = 0,
):
    """Draw one panel for the image and one per reducing block: every group of two or more patches that
    merged into one token gets its own colour; kept single patches show the image; dropped patches are
    greyed out. Returns the matplotlib figure (also saved as PNG at ``path``)."""
    import matplotlib.pyplot as plt

    picture = _display(image)
    height, width = picture.shape[:2]
    grid = (height // patch_size[0], width // patch_size[1])
    picture = picture[: grid[0] * patch_size[0], : grid[1] * patch_size[1]]
    # distinct colours (tab20), shuffled by ``seed`` so neighbouring tokens rarely share one
    palette = np.array(plt.get_cmap("tab20").colors)[np.random.default_rng(seed).permutation(20)]
    figure, axes = plt.subplots(1, len(sources) + 1, figsize=(2.6 * (len(sources) + 1), 2.9))
    axes = np.atleast_1d(axes)
    axes[0].imshow(picture)
    axes[0].set_title("image")
    for axis, (layer, source) in zip(axes[1:], sources.items(), strict=True):
        groups = group_map(source, grid)
        counts = {g: int((groups == g).sum()) for g in np.unique(groups) if g >= 0}
        overlay = picture.copy()
        for rank, (g, count) in enumerate(counts.items()):
            if count > 1:
                mask = np.kron(groups == g, np.ones(patch_size, dtype=bool))
                overlay[mask] = 0.35 * overlay[mask] + 0.65 * palette[rank % len(palette)]
        dropped = np.kron(groups < 0, np.ones(patch_size, dtype=bool))
        overlay[dropped] = 0.15 * overlay[dropped] + 0.35
        axis.imshow(overlay)
        tokens = len(counts)
        axis.set_title(f"after block {layer}: {tokens} tokens", fontsize=9)
    for axis in axes:
        axis.set_xticks([])
        axis.set_yticks([])
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    if path is not None:
        figure.savefig(path, dpi=120)
    return figure


def show_merges(
    model: nn.Module,
    image: Tensor,
    *,
    display: Tensor | np.ndarray | None = None,
    path: str | Path | None = None,
    title: str | None = None,
):
    """Fig. 6 for one image: run it through a patched ``model`` and draw the merge groups after each
    reducing block.

    Args:
        image: ``[C, H, W]`` normalised as the model expects.
        display: what to draw underneath (e.g. the un-normalised image); default: ``image`` rescaled.
        path: save the figure as PNG here.
    """
    if path is not None and not Path(path).parent.is_dir():
        raise ValueError(f"path: the folder {Path(path).parent} does not exist")
    sources = merge_sources(model, image)
    return plot_merge_groups(
        display if display is not None else image, sources, _patch_size(model), path=path, title=title
    )
