"""The training core :func:`~tokenmerge_patch.finetune` and :func:`~tokenmerge_patch.heal` share: one optimizer
step (both forwards under autocast, the objective, backward with loss scaling and clipping), AdamW's parameter
groups and the learning-rate schedule (linear warm-up, then cosine)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

Objective = Callable[[object, "Tensor | None"], tuple[Tensor, int]]


def train_step(
    net: nn.Module,
    images: Tensor,
    objective: Objective,
    optimizer: torch.optim.Optimizer,
    *,
    teacher: Callable[[Tensor], Tensor] | None = None,
    scaler: torch.amp.GradScaler | None = None,
    amp_dtype: torch.dtype | None = None,
    grad_clip: float | None = None,
) -> tuple[float, int]:
    """One optimizer step, the one :func:`~tokenmerge_patch.finetune` and :func:`~tokenmerge_patch.heal` share:
    the student's forward and the teacher's on the same images (without gradients) under autocast when
    ``amp_dtype`` is set, ``objective(student output, teacher output or None) -> (loss, correct)``, backward (scaled
    for fp16), the gradient norm clipped to ``grad_clip``, the step. Returns the loss and ``correct``."""
    with torch.autocast(images.device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
        output = net(images)
        target = None
        if teacher is not None:
            with torch.no_grad():
                target = teacher(images)
    loss, correct = objective(output, target)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        if grad_clip is not None:
            scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
            nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        if grad_clip is not None:
            nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
        optimizer.step()
    return loss.item(), correct


def warmup_cosine(total: int, warmup: int, min_ratio: float) -> Callable[[int], float]:
    """LambdaLR factor at step ``s``: linear warm-up to 1 over ``warmup`` steps, then cosine to ``min_ratio``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return cosine(min(1.0, (step - warmup) / max(1, total - warmup)), min_ratio)

    return factor


def cosine(progress: float, min_ratio: float = 0.0) -> float:
    """The cosine from 1 (``progress`` 0) down to ``min_ratio`` (``progress`` 1)."""
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no decay on 1-d parameters (biases, norms) and on what the model lists in
    ``no_weight_decay()`` (timm: position embedding, class/distillation/register tokens)."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 or name in skip else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]
