"""What :func:`~tokenmerge_patch.heal` is given, checked before anything is touched: its budget and options, which
parameters it trains (``trainable``), what the model outputs (logits or embedding features) and whether the teacher
answers in the same shape. A bad argument raises here and leaves the model exactly as it was."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor, nn

from ..backends import find_backend, image_model
from ..calibration import _output_vector
from ..utils import eval_mode
from .augment import Views
from .checks import check_flag, integer, number

TRAINABLE = ("norms", "norms+bias", "all")
FEATURE_LOSSES = ("cosine", "mse")


def check_options(lr: object, default_lr: float, seed: object, batch_size: object, feature_loss: object,
                  progress: object, amp: object) -> tuple[float, int, int]:  # fmt: skip
    """The peak learning rate (``default_lr`` for ``None``), the seed and the batch size, checked; and the flags."""
    peak = default_lr if lr is None else number(lr, "lr", "a number > 0 or None")
    if peak <= 0:
        raise ValueError(f"lr must be a number > 0 or None, got {lr!r}")
    seed = integer(seed, "seed", "an integer")
    batch_size = integer(batch_size, "batch_size", "an integer >= 1")
    if batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if feature_loss not in FEATURE_LOSSES:
        raise ValueError(f"feature_loss must be 'cosine' or 'mse', got {feature_loss!r}")
    check_flag(progress, "progress")
    if amp is not None:
        check_flag(amp, "amp")
    return peak, seed, batch_size


def check_budget(seconds: object, steps: object, default_steps: int) -> tuple[float | None, int | None]:
    """``seconds`` (> 0) and ``steps`` (>= 1), either may be ``None``; with neither, ``default_steps``."""
    if seconds is not None:
        seconds = number(seconds, "seconds", "a number of seconds > 0 or None")
        if seconds <= 0:
            raise ValueError(f"seconds must be a number of seconds > 0 or None, got {seconds!r}")
    if steps is not None:
        steps = integer(steps, "steps", "an integer >= 1 or None")
        if steps < 1:
            raise ValueError(f"steps must be an integer >= 1 or None, got {steps!r}")
    if seconds is None and steps is None:
        steps = default_steps
    return seconds, steps


def check_trainable(trainable: object) -> tuple[str, Callable[[str], bool] | None]:
    """The label the report gives ``trainable`` (``"predicate"`` for a callable) and the predicate, if any."""
    if isinstance(trainable, str):
        if trainable not in TRAINABLE:
            raise ValueError(f"trainable must be one of {', '.join(map(repr, TRAINABLE))} or a predicate on "
                             f"parameter names, got {trainable!r}")  # fmt: skip
        return trainable, None
    if callable(trainable):
        return "predicate", trainable
    raise TypeError(
        f"trainable must be one of {', '.join(map(repr, TRAINABLE))} or a callable taking a parameter name, got "
        f"{type(trainable).__name__}"
    )


def check_views(augment: object) -> Views:
    """The views to train on: ``True`` the default :class:`Views`, ``False`` the images as they are."""
    if isinstance(augment, Views):
        return augment
    check_flag(augment, "augment")
    return Views() if augment else Views.none()


def is_norm(module: nn.Module) -> bool:
    """LayerNorm and its relatives (GroupNorm, RMSNorm, timm's RmsNorm, open_clip's LayerNorm subclasses)."""
    norms = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._NormBase)
    return isinstance(module, norms) or type(module).__name__.lower().endswith("norm")


def select_trainable(
    model: nn.Module, student: nn.Module, predicate: Callable[[str], bool] | None, label: str, trainable: object
) -> list[str]:
    """Names (``model.named_parameters()``) of the parameters to train: among those the image output depends on."""
    candidates = {id(p) for p in student.parameters()}
    norms = {id(p) for m in student.modules() if is_norm(m) for p in m.parameters(recurse=False)}
    chosen = []
    for name, param in model.named_parameters():
        if id(param) not in candidates:
            continue
        if predicate is not None:
            take = predicate(name)
            if not isinstance(take, (bool, np.bool_)):
                raise TypeError(f"trainable (a predicate) must return True or False, got {take!r} for {name!r}")
        elif label == "all":
            take = True
        else:
            take = id(param) in norms or (label == "norms+bias" and name.rsplit(".", 1)[-1] == "bias")
        if take:
            chosen.append(name)
    if not chosen:
        raise ValueError(
            f"trainable={trainable!r} selects none of the parameters the model's image output depends on"
            + (" (the model has no norm layers)" if label == "norms" else "")
        )
    return chosen


def output_kind(model: nn.Module, student: nn.Module, sample: Tensor) -> tuple[str, torch.Size]:
    """``"logits"`` for a classifier (timm with a head, a Hugging Face output with ``logits``), ``"features"`` for an
    embedding model (CLIP image features, Dinov2Model, open_clip towers, timm with ``num_classes=0``); and the shape
    of its output vector for two images."""
    parameter = next(student.parameters(), None)
    with torch.no_grad(), eval_mode(model):
        output = student(sample.to(parameter.device) if parameter is not None else sample)
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor) and output[0].dim() != 2:
        raise TypeError(
            f"heal matches a classifier's logits or an embedding model's features; {type(model).__name__} returns "
            f"{output[0].dim()}-d feature maps (a dense backbone, e.g. features_only=True): heal the model with its "
            "head, or its embedding model"
        )
    vector = _output_vector(output)
    if isinstance(getattr(output, "logits", None), Tensor):
        return "logits", vector.shape
    timm_head = find_backend(model).name.startswith("timm") and getattr(model, "num_classes", 0) > 0
    return ("logits" if timm_head else "features"), vector.shape


def teacher_image_model(teacher: nn.Module, sample: Tensor, shape: torch.Size) -> nn.Module:
    """What maps images to the teacher's output (its image model for a multimodal one), checked to give the
    student's shape."""
    try:
        net = image_model(teacher)
    except TypeError:  # not a model this library patches: a plain module of images
        net = teacher
    parameter = next(net.parameters(), None)
    with torch.no_grad(), eval_mode(teacher):
        theirs = _output_vector(net(sample.to(parameter.device) if parameter is not None else sample)).shape
    if theirs != shape:
        raise ValueError(
            f"teacher gives outputs of shape {list(theirs)} where the model gives {list(shape)} (two images): heal "
            "needs a teacher for the same task, normally the unpatched model (teacher=None builds it)"
        )
    return net
