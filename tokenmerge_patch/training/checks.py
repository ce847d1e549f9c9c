"""Argument checks shared by :func:`~tokenmerge_patch.finetune` and :func:`~tokenmerge_patch.heal`. They all run
before anything is touched, so a bad argument leaves the model exactly as it was."""

from __future__ import annotations

import math
import warnings
from numbers import Integral, Real

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..patch import is_patched


def check_patched_model(model: object, caller: str, why: str) -> nn.Module:
    """``model`` itself (not a DDP/DataParallel wrapper), a module, and patched; ``why`` finishes the sentence
    that says why ``caller`` needs a patch."""
    if isinstance(model, (DistributedDataParallel, nn.DataParallel)):
        raise ValueError(f"pass the model itself, not a DDP/DataParallel wrapper: {caller} wraps it under torchrun")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not is_patched(model):
        raise ValueError(
            f"model is not patched; call tokenmerge_patch.patch(model, layers=..., keep_rate=...) first ({why})"
        )
    return model


def check_teacher(teacher: object, model: nn.Module, stacklevel: int = 4) -> None:
    """A separate module (or ``None``); a patched teacher is allowed, with a warning at the user's call."""
    if teacher is model:
        raise ValueError("teacher must be a separate model (e.g. copy.deepcopy(model) taken before patching)")
    if teacher is not None and not isinstance(teacher, nn.Module):
        raise TypeError(f"teacher must be a torch.nn.Module, got {type(teacher).__name__}")
    if teacher is not None and is_patched(teacher):
        warnings.warn("the teacher is patched; distillation normally uses the unpatched model", stacklevel=stacklevel)


def number(value: object, name: str, allowed: str) -> float:
    """``value`` as a float: a ``TypeError`` unless it is a real number (bools are not), a ``ValueError``
    unless it is finite (an infinite lr or a NaN weight decay turns every parameter into NaN)."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be {allowed}, got {value!r} of type {type(value).__name__}")
    out = float(value)
    if not math.isfinite(out):
        raise ValueError(f"{name} must be {allowed} and finite, got {value!r}")
    return out


def integer(value: object, name: str, allowed: str) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be {allowed}, got {value!r} of type {type(value).__name__}")
    return int(value)


def check_flag(value: object, name: str) -> None:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r} of type {type(value).__name__}")


def pick_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device must be a str, a torch.device or None, got {type(device).__name__}")
    try:
        device = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"device {device!r} is not a device torch knows (e.g. 'cpu', 'cuda', 'cuda:1')") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} was asked for but CUDA is not available")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def amp_dtype(device: torch.device, amp: bool | None) -> torch.dtype | None:
    """The autocast dtype, ``None`` for full precision: ``amp=None`` means on for CUDA (bf16 where supported,
    else fp16), off elsewhere; ``amp=True`` on CPU is bf16."""
    if amp is None:
        amp = device.type == "cuda"
    if not amp:
        return None
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16
