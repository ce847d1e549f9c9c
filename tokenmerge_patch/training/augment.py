"""The views function matching trains on: random resized crops, flips, and mixup or cutmix between the images of a
batch, all on normalised image tensors and all drawn from one ``torch.Generator`` (deterministic for a seed).

Function matching (Beyer et al., "Knowledge distillation: a good teacher is patient and consistent", 2022) shows
the teacher and the student the *same* augmented view, so no label has to survive the augmentation: a mixed or
cropped image is simply another input on which the student should answer as the teacher does. That is what lets a
few hundred images give thousands of distinct inputs.

>>> images = torch.randn(4, 3, 16, 16)
>>> views = Views()
>>> out = views(images, torch.Generator().manual_seed(0))
>>> out.shape, torch.equal(out, views(images, torch.Generator().manual_seed(0)))
(torch.Size([4, 3, 16, 16]), True)
>>> torch.equal(Views.none()(images, torch.Generator()), images)
True
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class Views:
    """How views are drawn. ``scale``: the crop's share of the image area; ``ratio``: its aspect ratio (both ranges,
    the ratio sampled log-uniformly), the crop resized back to the input size (bilinear); ``flip``: probability of a
    horizontal flip; ``mix``: probability that a batch is mixed, by mixup (a ``Beta(mixup_alpha, mixup_alpha)``
    blend with another image of the batch) or cutmix (a box of another image pasted in, its area from
    ``Beta(cutmix_alpha, cutmix_alpha)``), half and half."""

    scale: tuple[float, float] = (0.25, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: float = 0.5
    mix: float = 0.5
    mixup_alpha: float = 1.0
    cutmix_alpha: float = 1.0

    @classmethod
    def none(cls) -> Views:
        """The identity: every image as it is."""
        return cls(scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=0.0, mix=0.0)

    def __call__(self, images: Tensor, generator: torch.Generator) -> Tensor:
        """A view of each image of ``images`` ``[B, C, H, W]``; every random number comes from ``generator`` (CPU)."""
        out = self.crop_and_flip(images, generator)
        return self.mixed(out, generator)

    def crop_and_flip(self, images: Tensor, generator: torch.Generator) -> Tensor:
        """Random resized crops and flips in one ``grid_sample``: each output pixel reads the crop's point."""
        batch = images.shape[0]
        if self.scale == (1.0, 1.0) and self.flip == 0.0:
            return images
        area = _uniform(batch, *self.scale, generator)
        log_ratio = _uniform(batch, math.log(self.ratio[0]), math.log(self.ratio[1]), generator)
        ratio = log_ratio.exp()
        width = (area * ratio).sqrt().clamp(max=1.0)  # fractions of the image side
        height = (area / ratio).sqrt().clamp(max=1.0)
        # the crop's centre, in grid_sample's [-1, 1] coordinates, keeps the crop inside the image
        centre_x = (2 * torch.rand(batch, generator=generator) - 1) * (1 - width)
        centre_y = (2 * torch.rand(batch, generator=generator) - 1) * (1 - height)
        sign = torch.where(torch.rand(batch, generator=generator) < self.flip, -1.0, 1.0)
        theta = torch.zeros(batch, 2, 3)
        theta[:, 0, 0], theta[:, 0, 2] = width * sign, centre_x
        theta[:, 1, 1], theta[:, 1, 2] = height, centre_y
        theta = theta.to(images.device, images.dtype)
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        return F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    def mixed(self, images: Tensor, generator: torch.Generator) -> Tensor:
        """With probability ``mix``, the batch mixed with itself rolled by one image (mixup or cutmix)."""
        if self.mix <= 0 or images.shape[0] < 2:
            return images
        draw = torch.rand(2, generator=generator).tolist()
        if draw[0] >= self.mix:
            return images
        other = images.roll(1, dims=0)
        if draw[1] < 0.5:
            share = _beta(self.mixup_alpha, generator)
            return share * images + (1 - share) * other
        # cutmix: a box covering 1 - share of the image, from the other image
        share = _beta(self.cutmix_alpha, generator)
        height, width = images.shape[-2:]
        cut_h, cut_w = round(height * math.sqrt(1 - share)), round(width * math.sqrt(1 - share))
        top = int(torch.randint(0, height - cut_h + 1, (1,), generator=generator))
        left = int(torch.randint(0, width - cut_w + 1, (1,), generator=generator))
        out = images.clone()
        out[..., top : top + cut_h, left : left + cut_w] = other[..., top : top + cut_h, left : left + cut_w]
        return out


def _uniform(count: int, low: float, high: float, generator: torch.Generator) -> Tensor:
    return low + (high - low) * torch.rand(count, generator=generator)


def _beta(alpha: float, generator: torch.Generator) -> float:
    """A ``Beta(alpha, alpha)`` draw from ``generator`` (as the ratio of two gamma draws, which torch cannot seed with
    a generator: through uniforms, by inverse transform of ``Beta``'s symmetric case for ``alpha = 1``, else by
    Joehnk's method)."""
    if alpha == 1.0:
        return float(torch.rand(1, generator=generator))
    while True:  # Joehnk: accept u^(1/a) + v^(1/a) <= 1
        u, v = torch.rand(2, generator=generator, dtype=torch.float64).tolist()
        x, y = u ** (1 / alpha), v ** (1 / alpha)
        if 0 < x + y <= 1:
            return x / (x + y)
