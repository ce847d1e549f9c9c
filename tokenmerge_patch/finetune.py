"""A short fine-tune of a patched model at its target keep rate: AdamW, cosine learning rate with warm-up,
optional cosine keep-rate warm-up (EViT) and distillation from the unpatched model (with labels, or from the
teacher alone on unlabelled images); resumable exactly, ``DistributedDataParallel`` under ``torchrun``, mixed
precision on CUDA.

A patched model loses a little accuracy off the shelf; a few epochs at the keep rate it will run at win
most of it back (EViT fine-tunes DeiT-S for 30 epochs at lr 2e-5). See :func:`finetune`.

How the module reads: :func:`finetune` checks every argument and the loaders' first batches before it
touches anything, then hands over to :class:`_Trainer` (the epoch loop), which calls :func:`_train_step` once
per batch and :class:`_Checkpoints` to save and resume. Batches are read by
:func:`~tokenmerge_patch.evaluation.parse_batch`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from numbers import Integral, Real
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from .backends import image_model
from .evaluation import Batch, logits_of, parse_batch
from .patch import PatchConfig, is_patched, patch_config, set_keep_rate
from .schedule import warmup_keep_rates
from .utils import eval_mode

CHECKPOINT_NAME = "last.pt"
CHECKPOINT_FORMAT = 1
_NEEDS = "yield (images, labels) or a dict with 'labels'"
_LABEL_FREE = (
    "pass teacher=... (e.g. a copy of the model taken before patching) to distil from it without labels, or " + _NEEDS
)


@dataclass
class EpochStats:
    """One entry of the history :func:`finetune` returns (one per epoch, in order).

    Attributes:
        epoch: 1-based epoch number.
        step: optimizer steps done when the epoch ended (counted from the start of the run).
        train_loss: mean training objective over the epoch's images (cross-entropy, combined with the
            distillation term when a teacher is given; the distillation term alone on unlabelled batches),
            all ranks together under DDP.
        train_accuracy: top-1 (0..1) on the training batches, in train mode, at the scheduled keep rates:
            against the labels, or — for batches without labels (distillation from a teacher alone) — the
            fraction of images on which the student's top-1 class is the teacher's.
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
    accuracy: float  # against the labels; agreement with the teacher's top-1 on a batch without labels
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


@dataclass(frozen=True)
class _Options:
    """The numeric arguments of :func:`finetune`, checked and made plain Python numbers (a numpy scalar
    would not survive the JSON of the checkpoint fingerprint)."""

    epochs: int
    lr: float
    weight_decay: float
    min_lr: float
    lr_warmup: float
    keep_rate_warmup: float
    grad_clip: float | None
    checkpoint_every: int | None
    label_smoothing: float
    distill_weight: float
    distill_temperature: float


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

    Batches: a Tensor of images; a tuple or list ``(images, labels)`` (further elements are ignored) or
    ``(images,)``; or a dict with ``"pixel_values"`` (or ``"image"``/``"images"``) and ``"labels"`` (or
    ``"label"``), as Hugging Face collators give. Anything else is refused with a ``TypeError`` saying so.

    Loss: cross-entropy (``label_smoothing``, default 0) against the labels. With a ``teacher`` (normally
    the model as it was before patching, e.g. a ``copy.deepcopy`` taken before :func:`patch`):
    ``(1 - distill_weight) * CE + distill_weight * T² * KL(softmax(teacher / T) || softmax(student / T))``
    with ``T = distill_temperature`` (default weight 0.5, T = 1: the teacher's soft targets). The teacher
    runs in eval mode without gradients. A DeiT distilled model in distilled-training mode returns
    ``(class logits, distillation logits)``: the class head learns from the labels and the distillation
    head from the teacher (both from the labels without one); accuracy uses their mean, as timm does at
    inference.

    Label-free recovery: with a ``teacher``, batches may carry no labels (a Tensor of images, a 1-tuple, a
    dict without labels). Such a batch is trained on the distillation term alone, ``T² * KL(teacher ||
    student)`` (no cross-entropy, ``distill_weight`` unused; both heads of a distilled DeiT learn from the
    teacher), and its "accuracy" is the agreement of the student's top-1 with the teacher's. Without a
    teacher, unlabelled batches are refused (a ``ValueError`` before any parameter changes); ``val_loader``
    always needs labels.

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
    ``checkpoint_dir`` is created and test-written before the first step, so an unusable folder fails at
    once, not after an epoch. ``resume=True`` continues from it exactly: same parameters at the end as an
    uninterrupted run. A mid-epoch resume rebuilds the epoch's batch order by restoring the RNG and
    loader-generator states of the epoch start and re-iterating the loader past the batches already
    trained on (those batches are loaded again but not computed on). It needs a loader whose order comes
    from those states (any ``DataLoader`` with ``shuffle``, a seeded ``generator`` or a
    ``DistributedSampler``; with ``persistent_workers`` worker-side randomness is not restored). Without
    ``last.pt`` in the folder, ``resume=True`` starts from scratch; a checkpoint of another model or
    configuration is refused.

    Before anything is touched, the first batch of ``train_loader`` (and of ``val_loader``) is read to
    check its form and labels, with every RNG state put back afterwards so the run's data order is the same
    as without the look (a one-shot iterator is not looked at: its batches are checked as they come).

    Args:
        model: a model patched with :func:`tokenmerge_patch.patch` (not wrapped in DDP).
        train_loader: yields batches (see above) and has a ``len``.
        epochs: passes over ``train_loader`` (an integer >= 1).
        lr, weight_decay: AdamW's peak learning rate (> 0) and weight decay (>= 0).
        val_loader: optional labelled batches, evaluated after each epoch.
        keep_rate_warmup: fraction of all steps, in [0, 1], over which keep rates go from 1 to the targets.
        teacher: a model whose soft targets the student also learns (see above); moved to ``device``.
        device: where to train (``None``: CUDA if available, else CPU). The model is moved there.
        amp: mixed precision (see above).
        grad_clip: clip the gradient norm to this (> 0; ``None``: no clipping).
        checkpoint_dir: folder for ``last.pt``; ``None`` writes nothing.
        resume: continue from ``checkpoint_dir/last.pt`` when it exists.
        checkpoint_every: also write a checkpoint every this many steps (an integer >= 1).
        lr_warmup: fraction of all steps, in [0, 1], spent warming the learning rate up linearly.
        min_lr: learning rate at the end of the cosine, in [0, lr].
        label_smoothing: of the cross-entropy, in [0, 1] (0 by default: 0.1 recovers less on the MNIST check).
        distill_weight, distill_temperature: the distillation term (see above): a weight in [0, 1], a
            temperature > 0.
        find_unused_parameters: passed to ``DistributedDataParallel``.
        progress: show a tqdm bar per epoch (loss, accuracy, lr, keep rate).
        callback: called after every optimizer step with a :class:`StepInfo` (an exception stops training).

    Numbers may be any ``numbers.Real`` (integers: ``numbers.Integral``), numpy scalars included; bools,
    infinities and NaN are refused.

    Returns:
        One :class:`EpochStats` per epoch (all epochs of the run, those before a resume included).

    Raises:
        ValueError: an unpatched or DDP-wrapped model, an empty loader, a number out of its range or not
            finite, unlabelled batches without a teacher (or in ``val_loader``), a ``checkpoint_dir`` that
            cannot be created or written, or a checkpoint from another model or configuration. Raised before
            the model is changed (except for an unlabelled batch met later in a one-shot iterator).
        TypeError: an argument of the wrong type (a bool or string for a number, a loader without ``len``),
            or a batch of a form not listed above.

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
        >>> images_only = DataLoader(torch.randn(8, 3, 32, 32), batch_size=4)  # no labels: the teacher teaches
        >>> 0 <= finetune(model, images_only, teacher=teacher, progress=False)[0].train_accuracy <= 1
        True
    """
    # Every check first: a bad argument must leave the model exactly as it was.
    config = _check_model(model, teacher)
    options = _check_options(
        epochs=epochs,
        lr=lr,
        weight_decay=weight_decay,
        min_lr=min_lr,
        lr_warmup=lr_warmup,
        keep_rate_warmup=keep_rate_warmup,
        grad_clip=grad_clip,
        checkpoint_every=checkpoint_every,
        label_smoothing=label_smoothing,
        distill_weight=distill_weight,
        distill_temperature=distill_temperature,
    )
    for name, flag in (("resume", resume), ("progress", progress), ("find_unused_parameters", find_unused_parameters)):
        _check_flag(flag, name)
    if amp is not None:
        _check_flag(amp, "amp")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable (it gets a StepInfo) or None, got {type(callback).__name__}")
    steps_per_epoch = _loader_length(train_loader, "train_loader")
    if val_loader is not None:
        _loader_length(val_loader, "val_loader")
    directory = _check_directory(checkpoint_dir, resume)
    device = _pick_device(device)
    amp_dtype = _amp_dtype(device, amp)
    labelled = _check_first_batches(train_loader, val_loader, teacher)

    distributed = dist.is_available() and dist.is_initialized()
    world_size = dist.get_world_size() if distributed else 1
    settings = {k: v for k, v in asdict(options).items() if k != "checkpoint_every"}  # it does not change the result
    fingerprint = _fingerprint(
        model,
        config,
        **settings,
        steps_per_epoch=steps_per_epoch,
        amp=str(amp_dtype),
        teacher=teacher is not None,
        world_size=world_size,
        **({"labels": False} if labelled is False else {}),  # labelled runs keep the fingerprint they always had
    )
    checkpoints = _Checkpoints(directory, fingerprint)
    checkpoints.check_writable()
    if distributed and not _has_set_epoch(train_loader):
        warnings.warn(
            "training under torch.distributed without a DistributedSampler: every rank sees the whole data set",
            stacklevel=2,
        )

    trainer = _Trainer(
        model,
        train_loader,
        options,
        targets=tuple(config.keep_rates),
        steps_per_epoch=steps_per_epoch,
        val_loader=val_loader,
        teacher=teacher,
        device=device,
        amp_dtype=amp_dtype,
        checkpoints=checkpoints,
        progress=progress,
        callback=callback,
    )
    if resume:
        trainer.resume()
    return trainer.run(find_unused_parameters=find_unused_parameters)


@torch.no_grad()
def evaluate_loader(
    model: nn.Module,
    loader: Iterable,
    *,
    device: str | torch.device | None = None,
    amp_dtype: torch.dtype | None = None,
) -> float:
    """Top-1 accuracy (0..1) over labelled batches (any form :func:`~tokenmerge_patch.evaluation.parse_batch`
    reads), in eval mode; summed over ranks when ``torch.distributed`` is initialised (give each rank its
    share of the data, or all of it). Batches without labels are refused with a ``ValueError``.

    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> evaluate_loader(nn.Identity(), DataLoader(TensorDataset(torch.eye(3), torch.tensor([0, 1, 1]))))
    0.6666666666666666
    """
    device = _pick_device(device)
    correct = total = 0
    with eval_mode(model):
        for batch in loader:
            images, labels = parse_batch(batch, "loader")
            if labels is None:
                raise ValueError(
                    f"evaluate_loader needs labels to measure top-1, the loader's batch has none; {_NEEDS}"
                )
            with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
                logits = logits_of(model(images.to(device)))
            correct += (logits.argmax(-1).cpu() == labels.cpu()).sum().item()
            total += labels.numel()
    correct, total = _all_sum([correct, total], device)
    return correct / max(total, 1)


# -- the epoch loop ---------------------------------------------------------------------------------


class _Trainer:
    """One fine-tuning run: what it builds (optimizer, schedule, scaler), where it is (step, history, the
    epoch's running sums, RNG states for an exact resume) and the epoch loop."""

    def __init__(
        self,
        model: nn.Module,
        train_loader: Iterable,
        options: _Options,
        *,
        targets: tuple[float, ...],
        steps_per_epoch: int,
        val_loader: Iterable | None,
        teacher: nn.Module | None,
        device: torch.device,
        amp_dtype: torch.dtype | None,
        checkpoints: _Checkpoints,
        progress: bool,
        callback: Callable[[StepInfo], None] | None,
    ) -> None:
        self.model, self.teacher, self.options = model, teacher, options
        self.train_loader, self.val_loader = train_loader, val_loader
        self.device, self.amp_dtype = device, amp_dtype
        self.checkpoints, self.progress, self.callback = checkpoints, progress, callback
        self.targets, self.steps_per_epoch = targets, steps_per_epoch
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0

        total_steps = options.epochs * steps_per_epoch
        self.keep_warmup_steps = round(options.keep_rate_warmup * total_steps)
        model.to(device)
        if teacher is not None:
            teacher.to(device).eval()
        self.optimizer = torch.optim.AdamW(_param_groups(model, options.weight_decay), lr=options.lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            _warmup_cosine(total_steps, round(options.lr_warmup * total_steps), options.min_lr / options.lr),
        )
        # fp16 needs loss scaling against underflow; bf16 has fp32's range and does not.
        self.scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None

        self.step = 0
        self.history: list[EpochStats] = []
        self.running = _Running()
        self.epoch_rng: dict | None = None  # RNG states at the start of the current epoch
        self.pending_rng: dict | None = None  # RNG states to restore once a resumed epoch's loader is rebuilt

    def resume(self) -> None:
        """Continue from the checkpoint, if there is one (otherwise start from scratch)."""
        saved = self.checkpoints.load()
        if saved is None:
            return
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        if self.scaler is not None:
            self.scaler.load_state_dict(saved["scaler"])
        self.step = saved["step"]
        self.history = [EpochStats(**{**h, "keep_rates": tuple(h["keep_rates"])}) for h in saved["history"]]
        self.running = _Running(**{**saved["running"], "rates": tuple(saved["running"]["rates"])})
        self.epoch_rng = saved["epoch_rng"][self.rank]
        self.pending_rng = saved["rng"][self.rank]

    def run(self, find_unused_parameters: bool = False) -> list[EpochStats]:
        net: nn.Module = self.model
        if self.distributed:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            net = DistributedDataParallel(
                self.model, device_ids=device_ids, find_unused_parameters=find_unused_parameters
            )
        was_training = self.model.training
        try:
            for epoch in range(self.step // self.steps_per_epoch, self.options.epochs):
                self._train_epoch(net, epoch)
        finally:  # whatever happened, the model stays patched at its targets, in the mode it came in
            set_keep_rate(self.model, self.targets)
            self.model.train(was_training)
        return self.history

    def _epoch_batches(self, epoch: int, done: int) -> Iterator:
        """The epoch's batches, past the ``done`` already trained on (a resumed epoch) in the same order as
        an uninterrupted run would see them."""
        if done == 0:
            if self.pending_rng is not None:
                _set_rng_state(self.train_loader, self.pending_rng)
                self.pending_rng = None
            self.epoch_rng = _rng_state(self.train_loader)
            self.running = _Running()
        else:  # rebuild this epoch's batch order from its start, then continue the RNG where it was
            _set_rng_state(self.train_loader, self.epoch_rng)
        _set_epoch(self.train_loader, epoch)
        batches = iter(self.train_loader)
        for _ in range(done):
            next(batches)
        if self.pending_rng is not None:
            _set_rng_state(self.train_loader, self.pending_rng)
            self.pending_rng = None
        return batches

    def _train_epoch(self, net: nn.Module, epoch: int) -> None:
        done = self.step - epoch * self.steps_per_epoch  # batches of this epoch already trained on (resume)
        self.model.train()
        started = time.perf_counter()
        batches = self._epoch_batches(epoch, done)
        bar = tqdm(
            total=self.steps_per_epoch,
            initial=done,
            desc=f"epoch {epoch + 1}/{self.options.epochs}",
            disable=not self.progress or self.rank != 0,
            dynamic_ncols=True,
        )
        running = self.running
        for raw in batches:
            batch = parse_batch(raw, "train_loader").to(self.device, non_blocking=True)
            rates = warmup_keep_rates(self.targets, self.step, self.keep_warmup_steps)
            set_keep_rate(self.model, rates)
            step_lr = self.optimizer.param_groups[0]["lr"]
            loss, correct = _train_step(
                net, self.teacher, batch, self.optimizer, self.scaler, self.amp_dtype, self.options
            )
            self.scheduler.step()
            self.step += 1
            count = batch.images.shape[0]
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
            if self.callback is not None:
                self.callback(StepInfo(self.step, epoch + 1, loss, correct / max(count, 1), step_lr, rates))
            every = self.options.checkpoint_every
            if every and self.step % every == 0 and self.step % self.steps_per_epoch:
                running.seconds += time.perf_counter() - started
                started = time.perf_counter()
                self._save()
        bar.close()
        self._finish_epoch(epoch, started)

    def _finish_epoch(self, epoch: int, started: float) -> None:
        """Validate at the targets, record the epoch's stats (summed over ranks) and checkpoint."""
        set_keep_rate(self.model, self.targets)
        val = None
        if self.val_loader is not None:
            val = evaluate_loader(self.model, self.val_loader, device=self.device, amp_dtype=self.amp_dtype)
        self.model.train()
        running = self.running
        loss_sum, correct, seen = _all_sum([running.loss_sum, running.correct, running.seen], self.device)
        running.seconds += time.perf_counter() - started
        self.history.append(
            EpochStats(
                epoch=epoch + 1,
                step=self.step,
                train_loss=loss_sum / max(seen, 1),
                train_accuracy=correct / max(seen, 1),
                val_accuracy=val,
                keep_rates=tuple(running.rates),
                lr=running.lr,
                seconds=running.seconds,
            )
        )
        if self.progress and self.rank == 0:
            tqdm.write(_describe(self.history[-1]))
        self.running = _Running()
        self._save()

    def _save(self) -> None:
        def payload() -> dict:
            keep_rates = warmup_keep_rates(self.targets, max(self.step - 1, 0), self.keep_warmup_steps)
            return {
                "step": self.step,
                "keep_rates": list(keep_rates),
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": None if self.scaler is None else self.scaler.state_dict(),
                "running": asdict(self.running),
                "history": [asdict(h) for h in self.history],
            }

        self.checkpoints.save(payload, _rng_state(self.train_loader), self.epoch_rng)


# -- one step ---------------------------------------------------------------------------------------


def _train_step(
    net: nn.Module,
    teacher: nn.Module | None,
    batch: Batch,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    amp_dtype: torch.dtype | None,
    options: _Options,
) -> tuple[float, int]:
    """One optimizer step; returns the loss and the number of correct predictions (agreements with the
    teacher's top-1 for a batch without labels)."""
    images, labels = batch
    if labels is None and teacher is None:  # checked before the forward: nothing has changed yet
        raise ValueError(f"train_loader yielded a batch without labels and there is no teacher; {_LABEL_FREE}")
    with torch.autocast(images.device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
        output = net(images)
        soft = None
        if teacher is not None:
            with torch.no_grad():
                soft = logits_of(teacher(images))
    loss, logits = _objective(output, labels, soft, options)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        if options.grad_clip is not None:
            scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
            nn.utils.clip_grad_norm_(net.parameters(), options.grad_clip)
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        if options.grad_clip is not None:
            nn.utils.clip_grad_norm_(net.parameters(), options.grad_clip)
        optimizer.step()
    reference = labels if labels is not None else soft.argmax(-1)
    correct = int((logits.argmax(-1) == reference).sum().item())
    return loss.item(), correct


def _objective(output: object, labels: Tensor | None, soft: Tensor | None, options: _Options) -> tuple[Tensor, Tensor]:
    """The loss, and the logits accuracy is measured on (see :func:`finetune`)."""
    if isinstance(output, (tuple, list)):  # timm DeiT distilled in distilled-training mode
        cls_logits, dist_logits = output[0].float(), output[1].float()
        logits = (cls_logits + dist_logits) / 2
    else:
        cls_logits = dist_logits = logits = logits_of(output).float()
    temperature = options.distill_temperature
    if labels is None:  # label-free: the teacher alone, for every head
        heads = [cls_logits] if dist_logits is cls_logits else [cls_logits, dist_logits]
        loss = sum(_distillation(head, soft, temperature) for head in heads) / len(heads)
        return loss, logits.detach()
    loss = F.cross_entropy(cls_logits, labels, label_smoothing=options.label_smoothing)
    if soft is None:
        if dist_logits is not cls_logits:
            loss = 0.5 * (loss + F.cross_entropy(dist_logits, labels, label_smoothing=options.label_smoothing))
        return loss, logits.detach()
    weight = options.distill_weight
    return (1 - weight) * loss + weight * _distillation(dist_logits, soft, temperature), logits.detach()


def _distillation(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """``T² KL(softmax(teacher / T) || softmax(student / T))``, averaged over the batch; T² keeps the
    gradient scale independent of T (Hinton et al.)."""
    return F.kl_div(
        F.log_softmax(student / temperature, dim=-1),
        F.log_softmax(teacher.float() / temperature, dim=-1),
        reduction="batchmean",
        log_target=True,
    ) * (temperature**2)


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
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


# -- checks (all run before anything is touched) ----------------------------------------------------


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
    if image_model(model) is not model:
        raise TypeError(
            f"finetune trains a classifier on images; {type(model).__name__} is a multimodal model whose forward wants "
            "text too (CLIP): fine-tune an image classifier, or patch the vision model you train on its own"
        )
    if not any(param.requires_grad for param in model.parameters()):
        raise ValueError("the model has no trainable parameters (all have requires_grad=False)")
    if teacher is model:
        raise ValueError("teacher must be a separate model (e.g. copy.deepcopy(model) taken before patching)")
    if teacher is not None and not isinstance(teacher, nn.Module):
        raise TypeError(f"teacher must be a torch.nn.Module, got {type(teacher).__name__}")
    if teacher is not None and is_patched(teacher):
        warnings.warn("the teacher is patched; distillation normally uses the unpatched model", stacklevel=3)
    return patch_config(model)


def _number(value: object, name: str, allowed: str) -> float:
    """``value`` as a float: a ``TypeError`` unless it is a real number (bools are not), a ``ValueError``
    unless it is finite (an infinite lr or a NaN weight decay turns every parameter into NaN)."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be {allowed}, got {value!r} of type {type(value).__name__}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name} must be {allowed} and finite, got {value!r}")
    return number


def _integer(value: object, name: str, allowed: str) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be {allowed}, got {value!r} of type {type(value).__name__}")
    return int(value)


def _check_options(**values: object) -> _Options:
    """Check every numeric argument of :func:`finetune` (type, finiteness, range) and normalise it."""
    out: dict[str, object] = {}
    for name in ("epochs", "checkpoint_every"):
        value = values[name]
        if value is None and name == "checkpoint_every":
            out[name] = None
            continue
        allowed = "an integer >= 1" + (" or None" if name == "checkpoint_every" else "")
        out[name] = number = _integer(value, name, allowed)
        if number < 1:
            raise ValueError(f"{name} must be {allowed}, got {value!r}")
    fractions = ("lr_warmup", "keep_rate_warmup", "label_smoothing", "distill_weight")
    for name in fractions:
        out[name] = number = _number(values[name], name, "a number in [0, 1]")
        if not 0.0 <= number <= 1.0:
            raise ValueError(f"{name} must be a number in [0, 1], got {values[name]!r}")
    for name, positive in (("lr", True), ("distill_temperature", True), ("weight_decay", False)):
        allowed = "a number > 0" if positive else "a number >= 0"
        out[name] = number = _number(values[name], name, allowed)
        if number < 0 or (positive and number == 0):
            raise ValueError(f"{name} must be {allowed}, got {values[name]!r}")
    out["min_lr"] = min_lr = _number(values["min_lr"], "min_lr", "a number in [0, lr]")
    if not 0.0 <= min_lr <= out["lr"]:
        raise ValueError(f"min_lr must be a number in [0, lr] = [0, {out['lr']}], got {values['min_lr']!r}")
    grad_clip = values["grad_clip"]
    out["grad_clip"] = None if grad_clip is None else _number(grad_clip, "grad_clip", "a number > 0 or None")
    if out["grad_clip"] is not None and out["grad_clip"] <= 0:
        raise ValueError(f"grad_clip must be a number > 0 or None, got {grad_clip!r}")
    return _Options(**out)


def _check_flag(value: object, name: str) -> None:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r} of type {type(value).__name__}")


def _check_directory(checkpoint_dir: object, resume: bool) -> Path | None:
    if checkpoint_dir is None:
        if resume:
            raise ValueError("resume=True needs checkpoint_dir (the folder holding last.pt)")
        return None
    if not isinstance(checkpoint_dir, (str, os.PathLike)):
        raise TypeError(
            f"checkpoint_dir must be a path (str or os.PathLike) or None, got {type(checkpoint_dir).__name__}"
        )
    return Path(checkpoint_dir)


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


def _first_batch(loader: Iterable, name: str) -> Batch | None:
    """The loader's first batch, parsed; every RNG state its iteration may draw from (shuffle, worker
    seeds, augmentations) is put back, so the run sees the data in the order it would have without the
    look. ``None`` for a one-shot iterator, which the look would consume."""
    if isinstance(loader, Iterator):
        return None
    state = _rng_state(loader)
    try:
        batches = iter(loader)
        try:
            raw = next(batches)
        except StopIteration:
            raise ValueError(f"{name} is empty: it yields no batches although its len() says otherwise") from None
        del batches  # shuts a DataLoader's workers down
        return parse_batch(raw, name)
    finally:
        _set_rng_state(loader, state)


def _check_first_batches(train_loader: Iterable, val_loader: Iterable | None, teacher: nn.Module | None) -> bool | None:
    """Whether the training batches carry labels (``None``: not looked at, a one-shot iterator); refuses
    what cannot train or validate before anything is touched."""
    first = _first_batch(train_loader, "train_loader")
    if first is not None and first.labels is None and teacher is None:
        raise ValueError(f"train_loader's batches carry no labels and there is no teacher; {_LABEL_FREE}")
    if val_loader is not None:
        val = _first_batch(val_loader, "val_loader")
        if val is not None and val.labels is None:
            raise ValueError(
                f"val_loader's batches carry no labels, and validation measures top-1 against them; {_NEEDS} "
                "(or leave val_loader out)"
            )
    return None if first is None else first.labels is not None


def _pick_device(device: str | torch.device | None) -> torch.device:
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


class _Checkpoints:
    """``checkpoint_dir/last.pt`` of one run (a no-op without a folder): checked for writing before the
    first step, written by rank 0 with every rank's RNG states, read by every rank on resume, and refused
    when another model or configuration wrote it."""

    def __init__(self, directory: Path | None, fingerprint: dict) -> None:
        self.directory, self.fingerprint = directory, fingerprint
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world_size = dist.get_world_size() if self.distributed else 1

    @property
    def path(self) -> Path | None:
        return None if self.directory is None else self.directory / CHECKPOINT_NAME

    def check_writable(self) -> None:
        """Create the folder and write (then remove) a probe file in it, so an unusable ``checkpoint_dir``
        fails now rather than at the first save, an epoch later. Only rank 0 writes checkpoints, so only
        rank 0 probes; every rank raises if it failed."""
        if self.directory is None:
            return
        problem = None
        if self.rank == 0:
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
                handle, probe = tempfile.mkstemp(prefix=".write-test-", dir=self.directory)
                try:
                    os.write(handle, b"probe")
                finally:
                    os.close(handle)
                    os.remove(probe)
            except OSError as error:
                problem = f"{type(error).__name__}: {error}"
        if self.distributed:
            shared = [problem]
            dist.broadcast_object_list(shared, src=0)
            problem = shared[0]
        if problem is not None:
            raise ValueError(
                f"checkpoint_dir {str(self.directory)!r} cannot hold checkpoints: it must be a folder this process "
                f"can create and write in ({problem})"
            )

    def load(self) -> dict | None:
        """The saved run, ``None`` when there is none to resume."""
        path = self.path
        if path is None or not path.is_file():
            return None
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(saved, dict) or saved.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path} is not a tokenmerge_patch fine-tune checkpoint (format {CHECKPOINT_FORMAT})")
        theirs = saved["fingerprint"]
        differences = [
            f"{key}: checkpoint {theirs.get(key)!r}, this run {self.fingerprint.get(key)!r}"
            for key in sorted(set(theirs) | set(self.fingerprint))
            if theirs.get(key) != self.fingerprint.get(key)
        ]
        if differences:
            raise ValueError(
                f"{path} was written by a different model or configuration, so it cannot be resumed:\n  "
                + "\n  ".join(differences)
                + "\nuse another checkpoint_dir, resume=False, or the original settings"
            )
        return saved

    def save(self, payload: Callable[[], dict], rng: dict, epoch_rng: dict | None) -> None:
        """Write ``payload()`` (built on rank 0 only) with this rank's ``rng`` and epoch-start RNG states,
        and every other rank's under DDP."""
        if self.path is None:
            return
        rngs, starts = [rng], [epoch_rng]
        if self.distributed:  # every rank's RNG, so a resumed run continues each rank's stream
            rngs, starts = [None] * self.world_size, [None] * self.world_size
            dist.all_gather_object(rngs, rng)
            dist.all_gather_object(starts, epoch_rng)
        if self.rank == 0:
            content = {"format": CHECKPOINT_FORMAT, "fingerprint": self.fingerprint, **payload()}
            _atomic_save({**content, "rng": rngs, "epoch_rng": starts}, self.path)
        if self.distributed:
            dist.barrier()  # nobody runs ahead of a checkpoint that is not on disk yet


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
