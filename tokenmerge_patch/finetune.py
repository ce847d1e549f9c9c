"""A short fine-tune of a patched model at its target keep rate: AdamW, cosine learning rate with warm-up,
optional cosine keep-rate warm-up (EViT) and distillation from the unpatched model; resumable exactly,
``DistributedDataParallel`` under ``torchrun``, mixed precision on CUDA.

A patched model loses a little accuracy off the shelf; a few epochs at the keep rate it will run at win
most of it back (EViT fine-tunes DeiT-S for 30 epochs at lr 2e-5). See :func:`finetune`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from numbers import Real
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from .patch import PatchConfig, is_patched, patch_config, set_keep_rate
from .schedule import warmup_keep_rates
from .utils import eval_mode

CHECKPOINT_NAME = "last.pt"
CHECKPOINT_FORMAT = 1


@dataclass
class EpochStats:
    """One entry of the history :func:`finetune` returns (one per epoch, in order).

    Attributes:
        epoch: 1-based epoch number.
        step: optimizer steps done when the epoch ended (counted from the start of the run).
        train_loss: mean training objective over the epoch's images (cross-entropy, combined with the
            distillation term when a teacher is given), all ranks together under DDP.
        train_accuracy: top-1 (0..1) on the training batches, in train mode, at the scheduled keep rates.
        val_accuracy: top-1 (0..1) on ``val_loader`` at the *target* keep rates, ``None`` without one.
        keep_rates: per reducing block, the keep rates of the epoch's last training step.
        lr: learning rate of the epoch's last step.
        seconds: wall time of the epoch, validation included (summed over the runs of a resumed epoch).
    """

    epoch: int
    step: int
    train_loss: float
    train_accuracy: float
    val_accuracy: float | None
    keep_rates: tuple[float, ...]
    lr: float
    seconds: float


@dataclass
class StepInfo:
    """What a ``callback`` of :func:`finetune` receives after each optimizer step (this rank's batch)."""

    step: int  # optimizer steps done so far (1 after the first)
    epoch: int  # 1-based
    loss: float
    accuracy: float
    lr: float  # the learning rate this step used
    keep_rates: tuple[float, ...]  # the keep rates this step used


@dataclass
class _Running:
    """Sums over the current epoch, kept in checkpoints so a resumed epoch reports what an uninterrupted
    one would."""

    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    seconds: float = 0.0
    rates: tuple[float, ...] = field(default_factory=tuple)
    lr: float = 0.0


def finetune(
    model: nn.Module,
    train_loader: Iterable,
    *,
    epochs: int = 1,
    lr: float = 1e-4,
    weight_decay: float = 0.05,
    val_loader: Iterable | None = None,
    keep_rate_warmup: float = 0.0,
    teacher: nn.Module | None = None,
    device: str | torch.device | None = None,
    amp: bool | None = None,
    grad_clip: float | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    checkpoint_every: int | None = None,
    lr_warmup: float = 0.05,
    min_lr: float = 0.0,
    label_smoothing: float = 0.0,
    distill_weight: float = 0.5,
    distill_temperature: float = 1.0,
    find_unused_parameters: bool = False,
    progress: bool = True,
    callback: Callable[[StepInfo], None] | None = None,
) -> list[EpochStats]:
    """Fine-tune a patched model in place at its target keep rates; it stays patched at them.

    Optimiser: AdamW (no weight decay on biases, norms, position embeddings and prefix tokens) with a
    linear learning-rate warm-up over the first ``lr_warmup`` of the steps, then a cosine down to
    ``min_lr``. Keep rates: a cosine from 1 to each block's target over the first ``keep_rate_warmup``
    of the steps (EViT's ``adjust_keep_rate``), then the targets; validation always runs at the targets.

    Loss: cross-entropy (``label_smoothing``, default 0) against the labels. With a ``teacher`` (normally
    the model as it was before patching, e.g. a ``copy.deepcopy`` taken before :func:`patch`):
    ``(1 - distill_weight) * CE + distill_weight * T² * KL(softmax(teacher / T) || softmax(student / T))``
    with ``T = distill_temperature`` (default weight 0.5, T = 1: the teacher's soft targets). The teacher
    runs in eval mode without gradients. A DeiT distilled model in distilled-training mode returns
    ``(class logits, distillation logits)``: the class head learns from the labels and the distillation
    head from the teacher (both from the labels without one); accuracy uses their mean, as timm does at
    inference.

    Devices and precision: ``device=None`` picks CUDA when available, else CPU. ``amp=None`` means on for
    CUDA (bf16 when ``torch.cuda.is_bf16_supported()``, else fp16 with a ``GradScaler``), off elsewhere;
    ``amp=True`` on CPU runs the forward under bf16 autocast (no scaler needed for bf16).

    Distributed: if ``torch.distributed`` is initialised (e.g. under ``torchrun``), the model is wrapped in
    ``DistributedDataParallel`` inside this function (the patch lives on the inner module, so it is
    returned patched and unwrapped); give ``train_loader`` a ``DistributedSampler`` (its ``set_epoch`` is
    called each epoch). Loss, accuracy and validation are summed over ranks; only rank 0 shows progress
    and writes checkpoints. Every parameter gets a gradient with every reduction method (the scores
    are a selection index for ``"drop"``, but q/k still train through the attention), so
    ``find_unused_parameters`` stays off unless you freeze paths yourself.

    Checkpoints (``checkpoint_dir/last.pt``, replaced atomically) are written every ``checkpoint_every``
    steps and at each epoch end: model, optimizer, scheduler, scaler, RNG states (every rank's), the step
    (which is also the keep-rate schedule's position), the epoch's running sums and the history so far.
    ``resume=True`` continues from it exactly: same parameters at the end as an uninterrupted run. A
    mid-epoch resume rebuilds the epoch's batch order by restoring the RNG and loader-generator states of
    the epoch start and re-iterating the loader past the batches already trained on (those batches are
    loaded again but not computed on). It needs a loader whose order comes from those states (any
    ``DataLoader`` with ``shuffle``, a seeded ``generator`` or a ``DistributedSampler``; with
    ``persistent_workers`` worker-side randomness is not restored). Without ``last.pt`` in the folder,
    ``resume=True`` starts from scratch; a checkpoint of another model or configuration is refused.

    Args:
        model: a model patched with :func:`tokenmerge_patch.patch` (not wrapped in DDP).
        train_loader: yields ``(images, labels)`` batches and has a ``len``.
        epochs: passes over ``train_loader``.
        lr, weight_decay: AdamW's peak learning rate and weight decay.
        val_loader: optional ``(images, labels)`` batches, evaluated after each epoch.
        keep_rate_warmup: fraction of all steps, in [0, 1], over which keep rates go from 1 to the targets.
        teacher: a model whose soft targets the student also learns (see above); moved to ``device``.
        device: where to train (``None``: CUDA if available, else CPU). The model is moved there.
        amp: mixed precision (see above).
        grad_clip: clip the gradient norm to this (``None``: no clipping).
        checkpoint_dir: folder for ``last.pt``; ``None`` writes nothing.
        resume: continue from ``checkpoint_dir/last.pt`` when it exists.
        checkpoint_every: also write a checkpoint every this many steps.
        lr_warmup: fraction of all steps spent warming the learning rate up linearly.
        min_lr: learning rate at the end of the cosine.
        label_smoothing: of the cross-entropy (0 by default: 0.1 recovers less on the MNIST check).
        distill_weight, distill_temperature: the distillation term (see above).
        find_unused_parameters: passed to ``DistributedDataParallel``.
        progress: show a tqdm bar per epoch (loss, accuracy, lr, keep rate).
        callback: called after every optimizer step with a :class:`StepInfo` (an exception stops training).

    Returns:
        One :class:`EpochStats` per epoch (all epochs of the run, those before a resume included).

    Raises:
        ValueError: an unpatched or DDP-wrapped model, an empty loader, ``keep_rate_warmup`` outside
            [0, 1], other bad arguments, or a checkpoint from another model or configuration.
        TypeError: a loader without ``len``.

    Example:
        >>> import copy, timm, torch, tokenmerge_patch as tm
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> model = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=3)
        >>> teacher = copy.deepcopy(model).eval()  # the unpatched model, for distillation
        >>> _ = tm.patch(model, keep_rate=0.5)
        >>> data = DataLoader(TensorDataset(torch.randn(8, 3, 32, 32), torch.randint(0, 3, (8,))), batch_size=4)
        >>> history = finetune(model, data, epochs=2, keep_rate_warmup=0.5, teacher=teacher, progress=False)
        >>> [(h.epoch, h.step, h.keep_rates) for h in history]  # keep rates of each epoch's last step
        [(1, 2, (0.75, 0.75, 0.75)), (2, 4, (0.5, 0.5, 0.5))]
        >>> tm.patch_config(model).keep_rates  # still patched, at the target
        (0.5, 0.5, 0.5)
    """
    config = _check_model(model, teacher)
    steps_per_epoch = _loader_length(train_loader, "train_loader")
    _check_arguments(epochs, lr, weight_decay, keep_rate_warmup, grad_clip, checkpoint_every, lr_warmup, min_lr)
    _check_fraction(label_smoothing, "label_smoothing")
    _check_fraction(distill_weight, "distill_weight")
    if not isinstance(distill_temperature, Real) or not distill_temperature > 0:
        raise ValueError(f"distill_temperature must be > 0, got {distill_temperature!r}")
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs checkpoint_dir (the folder holding last.pt)")
    if val_loader is not None:
        _loader_length(val_loader, "val_loader")

    device = _pick_device(device)
    amp_dtype = _amp_dtype(device, amp)
    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    world_size = dist.get_world_size() if distributed else 1
    if distributed and not _has_set_epoch(train_loader):
        warnings.warn(
            "training under torch.distributed without a DistributedSampler: every rank sees the whole data set",
            stacklevel=2,
        )

    targets = tuple(config.keep_rates)
    total_steps = epochs * steps_per_epoch
    keep_warmup_steps = round(keep_rate_warmup * total_steps)
    model.to(device)
    if teacher is not None:
        teacher.to(device).eval()
    optimizer = torch.optim.AdamW(_param_groups(model, weight_decay), lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _warmup_cosine(total_steps, round(lr_warmup * total_steps), min_lr / lr)
    )
    # fp16 needs loss scaling against underflow; bf16 has fp32's range and does not.
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    fingerprint = _fingerprint(
        model,
        config,
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        lr=lr,
        weight_decay=weight_decay,
        keep_rate_warmup=keep_rate_warmup,
        lr_warmup=lr_warmup,
        min_lr=min_lr,
        grad_clip=grad_clip,
        label_smoothing=label_smoothing,
        amp=str(amp_dtype),
        teacher=teacher is not None,
        distill_weight=distill_weight,
        distill_temperature=distill_temperature,
        world_size=world_size,
    )

    step = 0
    history: list[EpochStats] = []
    running = _Running()
    epoch_rng: dict | None = None  # RNG states at the start of the current epoch
    pending_rng: dict | None = None  # RNG states to restore once the resumed epoch's loader is rebuilt
    path = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
    if resume and path is not None and path.is_file():
        saved = _load_checkpoint(path, fingerprint)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        if scaler is not None:
            scaler.load_state_dict(saved["scaler"])
        step = saved["step"]
        history = [EpochStats(**{**h, "keep_rates": tuple(h["keep_rates"])}) for h in saved["history"]]
        running = _Running(**{**saved["running"], "rates": tuple(saved["running"]["rates"])})
        epoch_rng = saved["epoch_rng"][rank]
        pending_rng = saved["rng"][rank]

    net: nn.Module = model
    if distributed:
        device_ids = [device.index] if device.type == "cuda" else None
        net = DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=find_unused_parameters)
    was_training = model.training

    def save() -> None:
        if path is None:
            return
        rng = [_rng_state(train_loader)]
        starts = [epoch_rng]
        if distributed:  # every rank's RNG, so a resumed run continues each rank's stream
            rng, starts = [None] * world_size, [None] * world_size
            dist.all_gather_object(rng, _rng_state(train_loader))
            dist.all_gather_object(starts, epoch_rng)
        if rank == 0:
            payload = {
                "format": CHECKPOINT_FORMAT,
                "fingerprint": fingerprint,
                "step": step,
                "keep_rates": list(warmup_keep_rates(targets, max(step - 1, 0), keep_warmup_steps)),
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": None if scaler is None else scaler.state_dict(),
                "rng": rng,
                "epoch_rng": starts,
                "running": asdict(running),
                "history": [asdict(h) for h in history],
            }
            _atomic_save(payload, path)
        if distributed:
            dist.barrier()  # nobody runs ahead of a checkpoint that is not on disk yet

    try:
        for epoch in range(step // steps_per_epoch, epochs):
            done = step - epoch * steps_per_epoch  # batches of this epoch already trained on (resume)
            if done == 0:
                if pending_rng is not None:
                    _set_rng_state(train_loader, pending_rng)
                    pending_rng = None
                epoch_rng = _rng_state(train_loader)
                running = _Running()
            else:  # rebuild this epoch's batch order from its start, then continue the RNG where it was
                _set_rng_state(train_loader, epoch_rng)
            _set_epoch(train_loader, epoch)
            model.train()
            started = time.perf_counter()
            batches = iter(train_loader)
            for _ in range(done):
                next(batches)
            if pending_rng is not None:
                _set_rng_state(train_loader, pending_rng)
                pending_rng = None
            bar = tqdm(
                total=steps_per_epoch,
                initial=done,
                desc=f"epoch {epoch + 1}/{epochs}",
                disable=not progress or rank != 0,
                dynamic_ncols=True,
            )
            for images, labels in batches:
                rates = warmup_keep_rates(targets, step, keep_warmup_steps)
                set_keep_rate(model, rates)
                step_lr = optimizer.param_groups[0]["lr"]
                images = images.to(device, non_blocking=True)
                labels = labels.to(device, non_blocking=True)
                loss, correct = _train_step(
                    net,
                    teacher,
                    images,
                    labels,
                    optimizer,
                    scaler,
                    amp_dtype,
                    grad_clip,
                    label_smoothing,
                    distill_weight,
                    distill_temperature,
                )
                scheduler.step()
                step += 1
                count = labels.shape[0]
                running.loss_sum += loss * count
                running.correct += correct
                running.seen += count
                running.rates, running.lr = rates, step_lr
                bar.update(1)
                bar.set_postfix(
                    loss=f"{running.loss_sum / running.seen:.4f}",
                    acc=f"{running.correct / running.seen:.3f}",
                    lr=f"{step_lr:.2e}",
                    keep=_format_rates(rates),
                    refresh=False,
                )
                if callback is not None:
                    callback(StepInfo(step, epoch + 1, loss, correct / max(count, 1), step_lr, rates))
                if checkpoint_every and step % checkpoint_every == 0 and step % steps_per_epoch:
                    running.seconds += time.perf_counter() - started
                    started = time.perf_counter()
                    save()
            bar.close()

            set_keep_rate(model, targets)
            val = None if val_loader is None else evaluate_loader(model, val_loader, device=device, amp_dtype=amp_dtype)
            model.train()
            loss_sum, correct, seen = _all_sum([running.loss_sum, running.correct, running.seen], device)
            running.seconds += time.perf_counter() - started
            history.append(
                EpochStats(
                    epoch=epoch + 1,
                    step=step,
                    train_loss=loss_sum / max(seen, 1),
                    train_accuracy=correct / max(seen, 1),
                    val_accuracy=val,
                    keep_rates=tuple(running.rates),
                    lr=running.lr,
                    seconds=running.seconds,
                )
            )
            if progress and rank == 0:
                tqdm.write(_describe(history[-1]))
            running = _Running()
            save()
    finally:
        set_keep_rate(model, targets)
        model.train(was_training)
    return history


@torch.no_grad()
def evaluate_loader(
    model: nn.Module,
    loader: Iterable,
    *,
    device: str | torch.device | None = None,
    amp_dtype: torch.dtype | None = None,
) -> float:
    """Top-1 accuracy (0..1) over ``(images, labels)`` batches, in eval mode; summed over ranks when
    ``torch.distributed`` is initialised (give each rank its share of the data, or all of it).

    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> evaluate_loader(nn.Identity(), DataLoader(TensorDataset(torch.eye(3), torch.tensor([0, 1, 1]))))
    0.6666666666666666
    """
    device = _pick_device(device)
    correct = total = 0
    with eval_mode(model):
        for images, labels in loader:
            with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
                logits = _logits(model(images.to(device)))
            correct += (logits.argmax(-1).cpu() == labels).sum().item()
            total += labels.numel()
    correct, total = _all_sum([correct, total], device)
    return correct / max(total, 1)


# -- one step ---------------------------------------------------------------------------------------


def _train_step(
    net: nn.Module,
    teacher: nn.Module | None,
    images: Tensor,
    labels: Tensor,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    amp_dtype: torch.dtype | None,
    grad_clip: float | None,
    label_smoothing: float,
    distill_weight: float,
    temperature: float,
) -> tuple[float, int]:
    """One optimizer step; returns the loss and the number of correct predictions."""
    with torch.autocast(images.device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
        output = net(images)
        soft = None
        if teacher is not None:
            with torch.no_grad():
                soft = _logits(teacher(images))
    loss, logits = _objective(output, labels, soft, label_smoothing, distill_weight, temperature)
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
    correct = int((logits.argmax(-1) == labels).sum().item())
    return loss.item(), correct


def _objective(
    output: object,
    labels: Tensor,
    soft: Tensor | None,
    label_smoothing: float,
    distill_weight: float,
    temperature: float,
) -> tuple[Tensor, Tensor]:
    """The loss, and the logits accuracy is measured on (see :func:`finetune`)."""
    if isinstance(output, (tuple, list)):  # timm DeiT distilled in distilled-training mode
        cls_logits, dist_logits = output[0].float(), output[1].float()
        logits = (cls_logits + dist_logits) / 2
    else:
        cls_logits = dist_logits = logits = _logits(output).float()
    loss = F.cross_entropy(cls_logits, labels, label_smoothing=label_smoothing)
    if soft is None:
        if dist_logits is not cls_logits:
            loss = 0.5 * (loss + F.cross_entropy(dist_logits, labels, label_smoothing=label_smoothing))
        return loss, logits.detach()
    kd = F.kl_div(
        F.log_softmax(dist_logits / temperature, dim=-1),
        F.log_softmax(soft.float() / temperature, dim=-1),
        reduction="batchmean",
        log_target=True,
    ) * (temperature**2)  # T² keeps the gradient scale independent of T (Hinton et al.)
    return (1 - distill_weight) * loss + distill_weight * kd, logits.detach()


def _logits(output: object) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)):  # a teacher or eval-time model returning both DeiT heads
        return (output[0] + output[1]) / 2
    logits = getattr(output, "logits", None)  # Hugging Face outputs
    if isinstance(logits, Tensor):
        return logits
    raise TypeError(f"the model returned {type(output).__name__}; expected logits (a Tensor)")


def _warmup_cosine(total: int, warmup: int, min_ratio: float) -> Callable[[int], float]:
    """LambdaLR factor at step ``s``: linear warm-up to 1 over ``warmup`` steps, then cosine to ``min_ratio``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no decay on 1-d parameters (biases, norms) and on what the model lists in
    ``no_weight_decay()`` (timm: position embedding, class/distillation/register tokens)."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 or name in skip else decay).append(param)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters (all have requires_grad=False)")
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


# -- checks -----------------------------------------------------------------------------------------


def _check_model(model: nn.Module, teacher: nn.Module | None) -> PatchConfig:
    if isinstance(model, (DistributedDataParallel, nn.DataParallel)):
        raise ValueError("pass the model itself, not a DDP/DataParallel wrapper: finetune wraps it under torchrun")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not is_patched(model):
        raise ValueError(
            "model is not patched; call tokenmerge_patch.patch(model, layers=..., keep_rate=...) first "
            "(finetune trains at the patch's keep rates)"
        )
    if teacher is model:
        raise ValueError("teacher must be a separate model (e.g. copy.deepcopy(model) taken before patching)")
    if teacher is not None and not isinstance(teacher, nn.Module):
        raise TypeError(f"teacher must be a torch.nn.Module, got {type(teacher).__name__}")
    if teacher is not None and is_patched(teacher):
        warnings.warn("the teacher is patched; distillation normally uses the unpatched model", stacklevel=3)
    return patch_config(model)


def _loader_length(loader: Iterable, name: str) -> int:
    try:
        length = len(loader)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(
            f"{name} must have a len() (the learning-rate and keep-rate schedules need the number of steps)"
        ) from None
    if length == 0:
        raise ValueError(f"{name} is empty: it yields no batches (dataset smaller than one batch with drop_last?)")
    return length


def _check_fraction(value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, Real) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")


def _check_arguments(
    epochs: int,
    lr: float,
    weight_decay: float,
    keep_rate_warmup: float,
    grad_clip: float | None,
    checkpoint_every: int | None,
    lr_warmup: float,
    min_lr: float,
) -> None:
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be an int >= 1, got {epochs!r}")
    if isinstance(lr, bool) or not isinstance(lr, Real) or not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, Real) or weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
    _check_fraction(keep_rate_warmup, "keep_rate_warmup (the fraction of steps warming keep rates up)")
    _check_fraction(lr_warmup, "lr_warmup")
    if isinstance(min_lr, bool) or not isinstance(min_lr, Real) or not 0 <= min_lr <= lr:
        raise ValueError(f"min_lr must be in [0, lr], got {min_lr!r}")
    if grad_clip is not None and (not isinstance(grad_clip, Real) or not grad_clip > 0):
        raise ValueError(f"grad_clip must be > 0 or None, got {grad_clip!r}")
    if checkpoint_every is not None and (
        isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 1
    ):
        raise ValueError(f"checkpoint_every must be an int >= 1 or None, got {checkpoint_every!r}")


def _pick_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} was asked for but CUDA is not available")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _amp_dtype(device: torch.device, amp: bool | None) -> torch.dtype | None:
    """The autocast dtype, ``None`` for full precision."""
    if amp is None:
        amp = device.type == "cuda"
    if not amp:
        return None
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


# -- data order and RNG -----------------------------------------------------------------------------


def _samplers(loader: Iterable) -> list:
    found = [getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None)]
    unique: list = []
    for sampler in found:
        if sampler is not None and all(sampler is not s for s in unique):
            unique.append(sampler)
    return unique


def _has_set_epoch(loader: Iterable) -> bool:
    return any(hasattr(sampler, "set_epoch") for sampler in _samplers(loader))


def _set_epoch(loader: Iterable, epoch: int) -> None:
    for sampler in _samplers(loader):
        if hasattr(sampler, "set_epoch"):  # DistributedSampler: the epoch seeds its shuffle
            sampler.set_epoch(epoch)


def _generators(loader: Iterable) -> list[torch.Generator]:
    """The generators that decide a DataLoader's order and worker seeds (its own and its samplers')."""
    found = [getattr(loader, "generator", None), *(getattr(s, "generator", None) for s in _samplers(loader))]
    unique: list[torch.Generator] = []
    for generator in found:
        if isinstance(generator, torch.Generator) and all(generator is not g for g in unique):
            unique.append(generator)
    return unique


def _rng_state(loader: Iterable) -> dict:
    """Every RNG state a step or a loader iterator may draw from (checkpoint-friendly: tensors and ints)."""
    _, keys, position, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(gauss)],
        "python": list(random.getstate()),
        "generators": [generator.get_state() for generator in _generators(loader)],
    }


def _set_rng_state(loader: Iterable, state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    generators = _generators(loader)
    if len(generators) != len(state["generators"]):
        raise ValueError(
            f"the checkpoint saved {len(state['generators'])} data-loader generator states but this train_loader "
            f"has {len(generators)}; build the loader the same way as in the interrupted run"
        )
    for generator, saved in zip(generators, state["generators"], strict=True):
        generator.set_state(saved)


# -- checkpoints ------------------------------------------------------------------------------------


def _fingerprint(model: nn.Module, config: PatchConfig, **settings: object) -> dict:
    """What must match for a checkpoint to continue this run (JSON-normalised for comparison)."""
    shapes = [(name, list(param.shape)) for name, param in model.state_dict().items()]
    digest = hashlib.sha256(json.dumps(shapes).encode()).hexdigest()[:16]
    return json.loads(
        json.dumps(
            {
                "model": f"{type(model).__module__}.{type(model).__name__}",
                "parameters": f"{len(shapes)} tensors, names and shapes sha256 {digest}",
                "patch": asdict(config),
                **settings,
            }
        )
    )


def _load_checkpoint(path: Path, fingerprint: dict) -> dict:
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(saved, dict) or saved.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a tokenmerge_patch fine-tune checkpoint (format {CHECKPOINT_FORMAT})")
    theirs = saved["fingerprint"]
    differences = [
        f"{key}: checkpoint {theirs.get(key)!r}, this run {fingerprint.get(key)!r}"
        for key in sorted(set(theirs) | set(fingerprint))
        if theirs.get(key) != fingerprint.get(key)
    ]
    if differences:
        raise ValueError(
            f"{path} was written by a different model or configuration, so it cannot be resumed:\n  "
            + "\n  ".join(differences)
            + "\nuse another checkpoint_dir, resume=False, or the original settings"
        )
    return saved


def _atomic_save(payload: dict, path: Path) -> None:
    """Write then rename, so a kill mid-write leaves the previous checkpoint intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    torch.save(payload, partial)
    os.replace(partial, path)


# -- small helpers ----------------------------------------------------------------------------------


def _all_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum over ranks (identity without torch.distributed); ints stay ints."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    backend_device = device if dist.get_backend() == "nccl" else torch.device("cpu")
    summed = torch.tensor([float(v) for v in values], dtype=torch.float64, device=backend_device)
    dist.all_reduce(summed)
    return [type(v)(s) for v, s in zip(values, summed.tolist(), strict=True)]


def _format_rates(rates: tuple[float, ...]) -> str:
    return f"{rates[0]:.2f}" if len(set(rates)) == 1 else "/".join(f"{r:.2f}" for r in rates)


def _describe(stats: EpochStats) -> str:
    val = "" if stats.val_accuracy is None else f", val top-1 {100 * stats.val_accuracy:.2f} %"
    return (
        f"epoch {stats.epoch}: loss {stats.train_loss:.4f}, train top-1 {100 * stats.train_accuracy:.2f} %{val}, "
        f"keep {_format_rates(stats.keep_rates)}, lr {stats.lr:.2e}, {stats.seconds:.1f} s"
    )
