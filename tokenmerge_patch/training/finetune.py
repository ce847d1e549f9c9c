"""A short fine-tune of a patched model at its target keep rate: AdamW, cosine learning rate with warm-up,
optional cosine keep-rate warm-up (EViT) and distillation from the unpatched model (with labels, or from the
teacher alone on unlabelled images); resumable exactly, ``DistributedDataParallel`` under ``torchrun``, mixed
precision on CUDA.

A patched model loses a little accuracy off the shelf; a few epochs at the keep rate it will run at win
most of it back (EViT fine-tunes DeiT-S for 30 epochs at lr 2e-5). See :func:`finetune`; for a label-free
recovery in minutes, :func:`~tokenmerge_patch.heal`.

How it reads: :func:`finetune` checks every argument and the loaders' first batches before it touches anything
(:mod:`.checks`, :mod:`.batches`), then hands over to :class:`~.loop.Trainer` (the epoch loop), which calls
:func:`~.step.train_step` once per batch with the objective of :mod:`.distill`, and
:class:`~.checkpoint.Checkpoints` to save and resume.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ..backends import image_model
from ..patch import PatchConfig, patch_config
from .batches import check_first_batches, has_set_epoch, loader_length
from .checkpoint import Checkpoints, check_directory, fingerprint
from .checks import amp_dtype as autocast_dtype
from .checks import check_flag, check_patched_model, check_teacher, integer, number, pick_device
from .loop import EpochStats, Options, StepInfo, Trainer


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
    config = check_model(model, teacher)
    options = check_options(
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
        check_flag(flag, name)
    if amp is not None:
        check_flag(amp, "amp")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable (it gets a StepInfo) or None, got {type(callback).__name__}")
    steps_per_epoch = loader_length(train_loader, "train_loader")
    if val_loader is not None:
        loader_length(val_loader, "val_loader")
    directory = check_directory(checkpoint_dir, resume)
    device = pick_device(device)
    amp_dtype = autocast_dtype(device, amp)
    labelled = check_first_batches(train_loader, val_loader, teacher)

    distributed = dist.is_available() and dist.is_initialized()
    world_size = dist.get_world_size() if distributed else 1
    settings = {k: v for k, v in asdict(options).items() if k != "checkpoint_every"}  # it does not change the result
    identity = fingerprint(
        model,
        config,
        **settings,
        steps_per_epoch=steps_per_epoch,
        amp=str(amp_dtype),
        teacher=teacher is not None,
        world_size=world_size,
        **({"labels": False} if labelled is False else {}),  # labelled runs keep the fingerprint they always had
    )
    checkpoints = Checkpoints(directory, identity)
    checkpoints.check_writable()
    if distributed and not has_set_epoch(train_loader):
        warnings.warn(
            "training under torch.distributed without a DistributedSampler: every rank sees the whole data set",
            stacklevel=2,
        )

    trainer = Trainer(
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


def check_model(model: nn.Module, teacher: nn.Module | None) -> PatchConfig:
    check_patched_model(model, "finetune", "finetune trains at the patch's keep rates")
    if image_model(model) is not model:
        raise TypeError(
            f"finetune trains a classifier on images; {type(model).__name__} is a multimodal model whose forward wants "
            "text too (CLIP): fine-tune an image classifier, or patch the vision model you train on its own "
            "(tokenmerge_patch.heal trains a CLIPModel's image features)"
        )
    if not any(param.requires_grad for param in model.parameters()):
        raise ValueError("the model has no trainable parameters (all have requires_grad=False)")
    check_teacher(teacher, model)
    return patch_config(model)


def check_options(**values: object) -> Options:
    """Check every numeric argument of :func:`finetune` (type, finiteness, range) and normalise it."""
    out: dict[str, object] = {}
    for name in ("epochs", "checkpoint_every"):
        value = values[name]
        if value is None and name == "checkpoint_every":
            out[name] = None
            continue
        allowed = "an integer >= 1" + (" or None" if name == "checkpoint_every" else "")
        out[name] = count = integer(value, name, allowed)
        if count < 1:
            raise ValueError(f"{name} must be {allowed}, got {value!r}")
    fractions = ("lr_warmup", "keep_rate_warmup", "label_smoothing", "distill_weight")
    for name in fractions:
        out[name] = fraction = number(values[name], name, "a number in [0, 1]")
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"{name} must be a number in [0, 1], got {values[name]!r}")
    for name, positive in (("lr", True), ("distill_temperature", True), ("weight_decay", False)):
        allowed = "a number > 0" if positive else "a number >= 0"
        out[name] = value = number(values[name], name, allowed)
        if value < 0 or (positive and value == 0):
            raise ValueError(f"{name} must be {allowed}, got {values[name]!r}")
    out["min_lr"] = min_lr = number(values["min_lr"], "min_lr", "a number in [0, lr]")
    if not 0.0 <= min_lr <= out["lr"]:
        raise ValueError(f"min_lr must be a number in [0, lr] = [0, {out['lr']}], got {values['min_lr']!r}")
    grad_clip = values["grad_clip"]
    out["grad_clip"] = None if grad_clip is None else number(grad_clip, "grad_clip", "a number > 0 or None")
    if out["grad_clip"] is not None and out["grad_clip"] <= 0:
        raise ValueError(f"grad_clip must be a number > 0 or None, got {grad_clip!r}")
    return Options(**out)
