"""Top-1 accuracy over a dataset, with a progress bar, and what a loader's batch may look like.

:func:`parse_batch` is the one place that reads a batch: :func:`evaluate`, :func:`~tokenmerge_patch.finetune`
and :func:`~tokenmerge_patch.finetune.evaluate_loader` all accept the same forms; :func:`collect_images` gathers
the unlabelled images :func:`~tokenmerge_patch.calibrate` and :func:`~tokenmerge_patch.heal` take.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .utils import eval_mode

IMAGE_KEYS = ("pixel_values", "image", "images")
LABEL_KEYS = ("labels", "label")
BATCH_FORMS = (
    "a batch must be a Tensor of images; a tuple or list (images,), (images, labels) or (images, labels, "
    "*extras) with the extras ignored; or a dict with the images under 'pixel_values', 'image' or 'images' and "
    "the labels (optional) under 'labels' or 'label' — images a Tensor [B, ...], labels an integer Tensor [B]"
)


class Batch(NamedTuple):
    """One parsed batch: images, and class-index labels or ``None`` when the batch carries none."""

    images: Tensor
    labels: Tensor | None

    def to(self, device: torch.device, non_blocking: bool = False) -> Batch:
        labels = None if self.labels is None else self.labels.to(device, non_blocking=non_blocking)
        return Batch(self.images.to(device, non_blocking=non_blocking), labels)


def parse_batch(batch: object, name: str = "loader") -> Batch:
    """Read a loader's batch in any of the common forms (see ``BATCH_FORMS``); ``name`` says whose batch it
    is in the error a wrong form gets (a ``TypeError`` listing the forms, or a ``ValueError`` for labels
    whose length is not the batch's).

    >>> images, labels = torch.zeros(2, 3, 8, 8), torch.tensor([0, 1])
    >>> parse_batch((images, labels, ["a.png", "b.png"])).labels.tolist()  # extras ignored
    [0, 1]
    >>> parse_batch({"pixel_values": images, "labels": labels}).images.shape  # Hugging Face style
    torch.Size([2, 3, 8, 8])
    >>> parse_batch(images).labels is None  # images alone: no labels
    True
    >>> parse_batch("cat.png", "train_loader")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    TypeError: train_loader yielded a str; a batch must be a Tensor of images; ...
    """
    if isinstance(batch, Tensor):
        images, labels = batch, None
    elif isinstance(batch, (tuple, list)):
        if not batch:
            raise TypeError(f"{name} yielded an empty {type(batch).__name__}; {BATCH_FORMS}")
        images, labels = batch[0], (batch[1] if len(batch) > 1 else None)
    elif isinstance(batch, Mapping):
        image_key = next((key for key in IMAGE_KEYS if key in batch), None)
        if image_key is None:
            raise TypeError(f"{name} yielded a dict with keys {list(batch)}, none of them images; {BATCH_FORMS}")
        images = batch[image_key]
        labels = next((batch[key] for key in LABEL_KEYS if key in batch), None)
    else:
        raise TypeError(f"{name} yielded a {type(batch).__name__}; {BATCH_FORMS}")
    if not isinstance(images, Tensor) or images.ndim == 0:
        raise TypeError(f"{name} yielded images of type {type(images).__name__}, not a batch Tensor; {BATCH_FORMS}")
    if labels is not None:
        if not isinstance(labels, Tensor) or labels.is_floating_point() or labels.is_complex():
            what = f"a {labels.dtype} Tensor" if isinstance(labels, Tensor) else f"a {type(labels).__name__}"
            raise TypeError(f"{name} yielded labels as {what}; {BATCH_FORMS}")
        if labels.dtype == torch.bool or labels.shape != images.shape[:1]:
            raise ValueError(
                f"{name} yielded labels of shape {tuple(labels.shape)} and dtype {labels.dtype} for "
                f"{images.shape[0]} images; labels must be integer class indices, one per image"
            )
    return Batch(images, labels)


def collect_images(
    data: object,
    limit: int,
    *,
    channels: int,
    input_size: Sequence[int] | None = None,
    name: str = "data",
    purpose: str = "calibrate",
) -> Tensor:
    """The first ``limit`` images of ``data`` (a tensor ``[N, C, H, W]``, or an iterable of such batches or of
    ``(images, labels)``/dict batches, labels ignored) as one float tensor; clear errors for anything else, naming
    the argument (``name``) and what wants the images (``purpose``): images that are not float ``[N, channels, H,
    W]`` (or not ``input_size`` when it is given), batches of different sizes, non-finite values (naming the batch and
    the image).

    >>> collect_images([torch.zeros(2, 1, 4, 4), (torch.ones(3, 1, 4, 4), torch.arange(3))], 4, channels=1).shape
    torch.Size([4, 1, 4, 4])
    >>> collect_images([], 4, channels=1, name="val_data", purpose="heal")
    Traceback (most recent call last):
    ValueError: val_data holds no images: heal needs a few (e.g. 256) unlabelled images
    """
    if isinstance(data, Tensor):
        batches: Iterable = [data]
    elif isinstance(data, (str, bytes)) or not isinstance(data, Iterable):
        raise TypeError(
            f"{name} must be a float tensor [N, C, H, W] or an iterable of such batches (or of (images, labels)), "
            f"got {type(data).__name__}"
        )
    else:
        batches = data
    taken: list[Tensor] = []
    count = 0
    for index, batch in enumerate(batches):
        images = parse_batch(batch, name).images
        if images.ndim != 4 or not images.is_floating_point():
            raise ValueError(
                f"{name} images must be normalised float tensors [N, C, H, W], got {images.dtype} {tuple(images.shape)}"
            )
        if input_size is not None and tuple(images.shape[1:]) != tuple(input_size):
            raise ValueError(
                f"{name} images are {tuple(images.shape[1:])} but the model takes {tuple(input_size)} (C, H, W): "
                f"{purpose} on images the model will see"
            )
        if images.shape[1] != channels:
            raise ValueError(f"{name} images have {images.shape[1]} channels but the model takes {channels}")
        if taken and images.shape[1:] != taken[0].shape[1:]:
            raise ValueError(
                f"{name} batch {index} holds images of {tuple(images.shape[1:])} (C, H, W), the batches before it "
                f"{tuple(taken[0].shape[1:])}: give images of one size, the size the model will see"
            )
        images = images[: limit - count]
        finite = torch.isfinite(images).flatten(1).all(dim=1)
        if not bool(finite.all()):
            bad = int((~finite).nonzero()[0])
            raise ValueError(
                f"{name} batch {index}, image {bad} holds non-finite values (NaN or inf): give real images, "
                "normalised as the model expects"
            )
        taken.append(images)
        count += len(images)
        if count >= limit:
            break
    if count == 0:
        raise ValueError(f"{name} holds no images: {purpose} needs a few (e.g. 256) unlabelled images")
    return torch.cat(taken)


def logits_of(output: object) -> Tensor:
    """The logits in a model's output: a Tensor as is, a DeiT distilled model's two heads averaged (as timm
    does at inference), a Hugging Face output's ``.logits``.

    >>> logits_of((torch.tensor([1.0, 3.0]), torch.tensor([3.0, 1.0])))
    tensor([2., 2.])
    """
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and all(isinstance(o, Tensor) for o in output[:2]):
        return output[0] if len(output) == 1 else (output[0] + output[1]) / 2
    logits = getattr(output, "logits", None)  # Hugging Face outputs
    if isinstance(logits, Tensor):
        return logits
    raise TypeError(f"the model returned {type(output).__name__}; expected logits (a Tensor)")


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    desc: str = "eval",
    progress: bool = True,
) -> float:
    """Top-1 accuracy (0..1) of ``model`` on ``dataset`` of ``(image, label)`` pairs (or dicts with
    ``"pixel_values"``/``"image"`` and ``"labels"``/``"label"``; see :func:`parse_batch`).

    >>> from torch.utils.data import TensorDataset
    >>> data = TensorDataset(torch.eye(3), torch.tensor([0, 1, 1]))
    >>> evaluate(nn.Identity(), data, progress=False)
    0.6666666666666666
    """
    correct = total = 0
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    with eval_mode(model):
        for batch in tqdm(loader, desc=desc, disable=not progress, leave=False):
            images, labels = parse_batch(batch, "dataset")
            if labels is None:
                raise ValueError("evaluate needs labelled samples: the dataset's samples carry no labels")
            logits = logits_of(model(images.to(device)))
            correct += (logits.argmax(-1).cpu() == labels.cpu()).sum().item()
            total += labels.numel()
    return correct / max(total, 1)
