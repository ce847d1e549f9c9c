"""What a training batch may be, the loaders' checks, and the data order.

:func:`~tokenmerge_patch.evaluation.parse_batch` reads a batch in every accepted form (a Tensor of images, a tuple or
list ``(images, labels, *extras)``, a Hugging Face style dict). Before training touches anything, the loaders' lengths
and first batches are checked (:func:`check_first_batches`), with every RNG state put back afterwards so the look
does not change the data order. :func:`rng_state` / :func:`set_rng_state` capture and restore everything a loader's
order and a step's randomness come from: what an exact resume needs.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator

import numpy as np
import torch
from torch import nn

from ..evaluation import Batch, parse_batch

__all__ = ["Batch", "parse_batch"]

NEEDS = "yield (images, labels) or a dict with 'labels'"
LABEL_FREE = (
    "pass teacher=... (e.g. a copy of the model taken before patching) to distil from it without labels, or " + NEEDS
)


def loader_length(loader: Iterable, name: str) -> int:
    try:
        length = len(loader)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(
            f"{name} must have a len() (the learning-rate and keep-rate schedules need the number of steps)"
        ) from None
    if length == 0:
        raise ValueError(f"{name} is empty: it yields no batches (dataset smaller than one batch with drop_last?)")
    return length


def first_batch(loader: Iterable, name: str) -> Batch | None:
    """The loader's first batch, parsed; every RNG state its iteration may draw from (shuffle, worker
    seeds, augmentations) is put back, so the run sees the data in the order it would have without the
    look. ``None`` for a one-shot iterator, which the look would consume."""
    if isinstance(loader, Iterator):
        return None
    state = rng_state(loader)
    try:
        batches = iter(loader)
        try:
            raw = next(batches)
        except StopIteration:
            raise ValueError(f"{name} is empty: it yields no batches although its len() says otherwise") from None
        del batches  # shuts a DataLoader's workers down
        return parse_batch(raw, name)
    finally:
        set_rng_state(loader, state)


def check_first_batches(train_loader: Iterable, val_loader: Iterable | None, teacher: nn.Module | None) -> bool | None:
    """Whether the training batches carry labels (``None``: not looked at, a one-shot iterator); refuses
    what cannot train or validate before anything is touched."""
    first = first_batch(train_loader, "train_loader")
    if first is not None and first.labels is None and teacher is None:
        raise ValueError(f"train_loader's batches carry no labels and there is no teacher; {LABEL_FREE}")
    if val_loader is not None:
        val = first_batch(val_loader, "val_loader")
        if val is not None and val.labels is None:
            raise ValueError(
                f"val_loader's batches carry no labels, and validation measures top-1 against them; {NEEDS} "
                "(or leave val_loader out)"
            )
    return None if first is None else first.labels is not None


# -- data order and RNG -----------------------------------------------------------------------------


def samplers(loader: Iterable) -> list:
    found = [getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None)]
    unique: list = []
    for sampler in found:
        if sampler is not None and all(sampler is not s for s in unique):
            unique.append(sampler)
    return unique


def has_set_epoch(loader: Iterable) -> bool:
    return any(hasattr(sampler, "set_epoch") for sampler in samplers(loader))


def set_epoch(loader: Iterable, epoch: int) -> None:
    for sampler in samplers(loader):
        if hasattr(sampler, "set_epoch"):  # DistributedSampler: the epoch seeds its shuffle
            sampler.set_epoch(epoch)


def generators(loader: Iterable) -> list[torch.Generator]:
    """The generators that decide a DataLoader's order and worker seeds (its own and its samplers')."""
    found = [getattr(loader, "generator", None), *(getattr(s, "generator", None) for s in samplers(loader))]
    unique: list[torch.Generator] = []
    for generator in found:
        if isinstance(generator, torch.Generator) and all(generator is not g for g in unique):
            unique.append(generator)
    return unique


def rng_state(loader: Iterable) -> dict:
    """Every RNG state a step or a loader iterator may draw from (checkpoint-friendly: tensors and ints)."""
    _, keys, position, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(gauss)],
        "python": list(random.getstate()),
        "generators": [generator.get_state() for generator in generators(loader)],
    }


def set_rng_state(loader: Iterable, state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    found = generators(loader)
    if len(found) != len(state["generators"]):
        raise ValueError(
            f"the checkpoint saved {len(state['generators'])} data-loader generator states but this train_loader "
            f"has {len(found)}; build the loader the same way as in the interrupted run"
        )
    for generator, saved in zip(found, state["generators"], strict=True):
        generator.set_state(saved)
