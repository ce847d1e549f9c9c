"""Describe a model once: which backend patches it, what runs its images, its depth, prefix tokens and the input
size every count is made at.

``patch``, the ``flops=`` rule, :func:`~tokenmerge_patch.count_flops`, :func:`~tokenmerge_patch.calibrate` and
``heal`` all start from one :class:`ModelInfo`, so they cannot disagree about the model (they did on a 518-px
DINOv2 run at 224: the rule solved at one size and the counter counted at another).

**The model's input size** is the size it is built for: timm ``patch_embed.img_size``, Hugging Face
``config.image_size``, open_clip ``visual.image_size``. A model that takes other sizes (HF DINOv2, timm
``dynamic_img_size``) is counted, budgeted and calibrated at another size only when asked: ``count_flops(model,
input_size)``, ``patch(model, flops=f, input_size=...)``, and ``calibrate`` at the size of its images.

Wrapped models are looked through: ``torch.compile(model)`` and ``DistributedDataParallel(model)`` patch, count and
calibrate the module they wrap (the wrapper follows it); ``nn.DataParallel`` is refused (its replicas would share
one patch).

>>> import timm
>>> info = describe(timm.create_model("deit_tiny_patch16_224"))
>>> info.backend.name, info.depth, info.num_prefix, info.class_token, info.input_size, info.class_token_head
('timm', 12, 1, True, (3, 224, 224), True)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from numbers import Integral

import numpy as np
import torch
from torch import nn

from .backends import Backend, find_backend
from .utils import eval_mode


@dataclass(frozen=True)
class ModelInfo:
    """What the library needs to know about a model, resolved once by :func:`describe`.

    Attributes:
        model: the module that is patched (a wrapper's inner module; the model itself otherwise).
        backend: the adapter that patches it.
        depth: number of transformer blocks.
        num_prefix: tokens before the patch tokens (class, distillation, register tokens), never reduced.
        class_token: whether the first token is a class token (whose attention row can score the others).
        input_size: ``(C, H, W)`` every FLOPs count, budget and calibration of this description is at.
        class_token_head: whether the output reads only the prefix tokens after the last block.
        images: the module that maps a batch of images to the model's image output (the model, or of a multimodal
            model its image side).
    """

    model: nn.Module
    backend: Backend
    depth: int
    num_prefix: int
    class_token: bool
    input_size: tuple[int, int, int]
    class_token_head: bool
    images: nn.Module

    def taking(self, input_size: Sequence[int] | None, what: str = "input_size") -> ModelInfo:
        """The same description at another input size (``None``: this one); ``ValueError`` if the model does not
        take images of that size (one forward of one image of zeros tells)."""
        if input_size is None:
            return self
        size = check_input_size(input_size)
        if size == self.input_size:
            return self
        param = next(self.model.parameters(), None)
        example = (
            torch.zeros(1, *size) if param is None else torch.zeros(1, *size, dtype=param.dtype, device=param.device)
        )
        try:
            with torch.no_grad(), eval_mode(self.model):
                self.images(example)
        except Exception as error:  # the model's own error says why; ours says what to do
            raise ValueError(
                f"{what} {size} (C, H, W): the model is built for {self.input_size} and does not take {size} "
                f"({type(error).__name__}: {error}); use a size the model takes"
            ) from error
        return replace(self, input_size=size)


def unwrap(model: nn.Module) -> nn.Module:
    """The module a wrapper runs: ``torch.compile``'s ``_orig_mod``, ``DistributedDataParallel``'s ``module``;
    ``nn.DataParallel`` is refused (its replicas on other devices would all run one patch meant for one module)."""
    if isinstance(model, nn.DataParallel) and not isinstance(model, nn.parallel.DistributedDataParallel):
        raise TypeError(
            "nn.DataParallel is not supported: its replicas would share the patch of one module. Patch the wrapped "
            "model (tokenmerge_patch.patch(model.module, ...)) and run it without DataParallel, or use "
            "DistributedDataParallel (one process per device)"
        )
    for _ in range(8):  # a compiled DDP model, a DDP of a compiled model
        inner = getattr(model, "_orig_mod", None)  # torch.compile's OptimizedModule
        if inner is None and isinstance(model, nn.parallel.DistributedDataParallel):
            inner = model.module
        if not isinstance(inner, nn.Module):
            return model
        model = inner
    return model


def check_input_size(input_size: object) -> tuple[int, int, int]:
    """``(C, H, W)`` as three positive Python ints; ``TypeError``/``ValueError`` naming ``input_size`` otherwise."""
    allowed = "(channels, height, width), three integers (int or numpy integer, not bool)"
    if isinstance(input_size, np.ndarray) and input_size.ndim == 1:
        input_size = tuple(input_size.tolist())  # a numpy array of sizes: its elements as Python numbers
    if not isinstance(input_size, Sequence) or isinstance(input_size, str) or len(input_size) != 3:
        raise TypeError(f"input_size must be {allowed}, got {input_size!r}")
    for value in input_size:
        if isinstance(value, bool) or not isinstance(value, Integral):  # numpy integers are Integral
            raise TypeError(f"input_size must be {allowed}, got {input_size!r} (holding a {type(value).__name__})")
    if any(value < 1 for value in input_size):
        raise ValueError(f"input_size must be {allowed}, each >= 1, got {input_size!r}")
    return tuple(int(value) for value in input_size)


def describe(model: nn.Module, input_size: Sequence[int] | None = None) -> ModelInfo:
    """Resolve ``model`` once: backend, depth, prefix tokens, input size (``None``: the size it is built for).

    Raises:
        TypeError: not a module, an unsupported model, ``nn.DataParallel``, a bad ``input_size``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    model = unwrap(model)
    backend = find_backend(model)
    size = backend.input_size(model) if input_size is None else check_input_size(input_size)
    get_images = getattr(backend, "image_model", None)
    return ModelInfo(
        model=model,
        backend=backend,
        depth=len(backend.blocks(model)),
        num_prefix=backend.num_prefix(model),
        class_token=bool(backend.has_class_token(model)),
        input_size=tuple(int(v) for v in size),
        class_token_head=bool(backend.class_token_head(model)),
        images=model if get_images is None else get_images(model),
    )
