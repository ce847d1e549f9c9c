"""``heal(model, images)``: label-free recovery of what a patch costs, in minutes, with the unpatched model as teacher.

The recipe (chosen on the calibration half of the shared ImageNet images, ``python benchmarks/heal.py``): function
matching — the teacher and the student see the same augmented view (:class:`~.augment.Views`: random resized
crops, flips, mixup or cutmix), the student learns ``KL(teacher || student)`` of the logits (for an embedding model:
one minus the cosine of the features, or their squared difference) — trains only the LayerNorms (weights and biases),
with AdamW at a default learning rate, a linear warm-up and a cosine down to zero over the budget. A held-out part of
the images (or ``val_data``) is checked a few times; the state closest to the teacher there (KL) that agrees with it on
at least as many of those images as before is kept, the model as it was included: a heal never leaves the model
agreeing less with its teacher on the held-out images.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..backends import image_model
from ..calibration import _output_vector
from ..evaluation import collect_images
from ..model_info import describe
from ..patch import unpatch
from ..utils import eval_mode
from .augment import Views
from .checks import amp_dtype as autocast_dtype
from .checks import check_patched_model, check_teacher, pick_device
from .distill import agreement, matching_loss
from .heal_inputs import (
    check_budget,
    check_options,
    check_trainable,
    check_views,
    output_kind,
    select_trainable,
    teacher_image_model,
)
from .step import cosine, train_step

# default peak learning rates by what is trained (AdamW; measured on the calibration half, benchmarks/heal.py)
DEFAULT_LR = {"norms": 2e-3, "norms+bias": 2e-3, "all": 3e-5, "predicate": 1e-3}
DEFAULT_STEPS = 120  # with neither seconds nor steps (DeiT-T at batch 32: about 2 s a step on 2 CPU cores)
DEFAULT_BATCH_SIZE = 32
WARMUP = 0.1  # share of the budget spent warming the learning rate up
CHECKS = 8  # held-out checks over the budget (and one before, one at the end)
HOLD_OUT_EVERY = 8  # without val_data, every 8th image is held out (never trained on)
MAX_IMAGES = 100_000  # what is read from data (and from val_data)


@dataclass
class HealReport:
    """What :func:`heal` did. ``agreement_*`` and ``divergence_*`` are measured on the held-out images without
    augmentation; those images also chose the state that was kept (``*_after`` are its figures: the lowest divergence
    among the checks whose agreement is at least ``agreement_before``), so they flatter it a little.

    Attributes:
        steps: optimizer steps taken.
        seconds: wall time of the whole call (the teacher's copy and the checks included).
        kept_step: the step whose parameters the model now has (0: the model as it was; nothing helped).
        agreement_before, agreement_after: for a classifier, the share (0..1) of held-out images whose top-1 class
            is the teacher's; for an embedding model, the mean cosine similarity of its features to the teacher's.
        divergence_before, divergence_after: the mean ``KL(teacher || student)`` per image (classifier), or ``1 -
            cosine`` / the mean squared difference (embedding, as ``feature_loss``).
        metric: ``"top-1 agreement"`` or ``"cosine similarity"``: what ``agreement_*`` is.
        trainable: the ``trainable`` asked for (``"predicate"`` for a callable).
        trained: names of the parameters trained (as ``model.named_parameters()`` gives them).
        trained_parameters: how many numbers they hold.
        train_images, held_out: images trained on and images that tracked agreement.
        lr: the peak learning rate.
        history: ``(step, agreement, divergence)`` at every held-out check, the one before training first.
    """

    steps: int
    seconds: float
    kept_step: int
    agreement_before: float
    agreement_after: float
    divergence_before: float
    divergence_after: float
    metric: str
    trainable: str
    trained: tuple[str, ...]
    trained_parameters: int
    train_images: int
    held_out: int
    lr: float
    history: list[tuple[int, float, float]] = field(default_factory=list)

    def __str__(self) -> str:
        percent = self.metric == "top-1 agreement"
        show = (lambda v: f"{100 * v:.2f} %") if percent else (lambda v: f"{v:.4f}")
        kept = (
            "the model as it was (no check beat it)"
            if self.kept_step == 0
            else f"the state after step {self.kept_step}"
        )
        return (
            f"healed {self.trainable} ({len(self.trained)} tensors, {self.trained_parameters:,} numbers) for "
            f"{self.steps} steps in {self.seconds:.1f} s on {self.train_images} images; {self.metric} with the teacher "
            f"on {self.held_out} held-out images {show(self.agreement_before)} -> {show(self.agreement_after)}; kept "
            f"{kept}"
        )


def heal(
    model: nn.Module,
    data: Tensor | Iterable,
    *,
    teacher: nn.Module | None = None,
    seconds: float | None = None,
    steps: int | None = None,
    trainable: str | Callable[[str], bool] = "norms",
    lr: float | None = None,
    augment: bool | Views = True,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = True,
    val_data: Tensor | Iterable | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    feature_loss: str = "cosine",
    amp: bool | None = None,
) -> HealReport:
    """Recover, in place and without labels, what a patch costs: the patched ``model`` learns to answer as its
    unpatched self on augmented views of ``data``. The plan (layers, keep rates, options) and the FLOPs stay
    exactly as they were; only the ``trainable`` parameters change.

    Args:
        model: a model patched with :func:`~tokenmerge_patch.patch` (timm, Hugging Face, open_clip; a ``CLIPModel``
            or open_clip ``CLIP`` learns its image features).
        data: unlabelled images, normalised as the model expects, as :func:`~tokenmerge_patch.calibrate` takes them:
            a float tensor ``[N, C, H, W]`` or an iterable of such batches, of ``(images, labels)`` or of
            ``{"pixel_values": ...}`` dicts (labels are ignored). A few hundred are enough.
        teacher: the model to agree with; ``None`` (the default) builds the unpatched twin: a copy of ``model`` with
            the patch removed. It must give outputs of the model's shape.
        seconds: a wall-time budget for the whole call (> 0), or ``None``.
        steps: a number of optimizer steps (>= 1), or ``None``. With neither, ``steps=120``; with both, whichever
            ends first. The learning rate warms up over the first tenth of the budget and follows a cosine to zero.
        trainable: ``"norms"`` (LayerNorm and other norm layers' weights and biases; the default, which measured
            best), ``"norms+bias"`` (also every bias), ``"all"``, or a predicate on parameter names
            (``model.named_parameters()``). Parameters outside it stay bit-identical; ``requires_grad`` flags are
            restored afterwards.
        lr: AdamW's peak learning rate (no weight decay); ``None``: 2e-3 for norms and norms+bias, 1e-3 for a
            predicate, 3e-5 for all.
        augment: ``True``: function matching on random resized crops, flips, mixup and cutmix (:class:`Views`);
            ``False``: the images as they are; or a ``Views`` of your own.
        seed: seeds the order of the images and the views (the held-out images are always every 8th): on CPU the
            same seed and ``steps`` give bit-identical results (a ``seconds`` budget stops where the clock says).
        device: where to heal (``None``: where the model is); the model (and teacher) are moved there and stay.
        progress: show a progress bar.
        val_data: images to track agreement on instead of holding out every 8th image of ``data`` (same forms).
        batch_size: images per step.
        feature_loss: for embedding models (no logits): ``"cosine"`` or ``"mse"``.
        amp: autocast (``None``: on for CUDA, bf16 or fp16; off on CPU).

    Returns:
        A :class:`HealReport`: steps, seconds, agreement with the teacher on the held-out images before and after,
        what was trained.

    Raises:
        ValueError / TypeError: naming the argument — an unpatched model, empty data or images of the wrong size, a
            budget that is not positive, an unknown ``trainable`` or one that selects nothing, a teacher whose
            output has another shape, ... Raised before the model is touched. An exception during training
            (e.g. ``KeyboardInterrupt``) puts the parameters back as they were before re-raising.

    Example:
        >>> import timm, torch, tokenmerge_patch as tm
        >>> model = tm.patch(timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=4,
        ...                                    num_classes=10), keep_rate=0.5)
        >>> report = tm.heal(model, torch.randn(24, 3, 32, 32), steps=4, batch_size=8, progress=False)
        >>> report.steps, report.trainable, report.held_out, tm.patch_config(model).keep_rates
        (4, 'norms', 3, (0.5, 0.5, 0.5))
        >>> report.agreement_after >= report.agreement_before
        True
    """
    started = time.perf_counter()
    check_patched_model(model, "heal", "heal recovers what the patch costs")
    seconds, steps = check_budget(seconds, steps, DEFAULT_STEPS)
    label, chosen = check_trainable(trainable)
    peak, seed, batch_size = check_options(lr, DEFAULT_LR[label], seed, batch_size, feature_loss, progress, amp)
    views = check_views(augment)
    check_teacher(teacher, model, stacklevel=3)
    parameter = next(model.parameters(), None)
    device = pick_device(device) if device is not None else (parameter.device if parameter is not None else None)
    device = device or torch.device("cpu")
    amp_dtype = autocast_dtype(device, amp)
    student_net = image_model(model)
    names = select_trainable(model, student_net, chosen, label, trainable)
    input_size = describe(model).input_size
    images = collect_images(
        data, MAX_IMAGES, channels=input_size[0], input_size=input_size, name="data", purpose="heal"
    )
    if val_data is not None:
        held = collect_images(
            val_data, MAX_IMAGES, channels=input_size[0], input_size=input_size, name="val_data", purpose="heal"
        )
    else:
        if len(images) < 2:
            raise ValueError(
                "data holds 1 image: heal needs at least 2 (every 8th is held out to check the heal), or pass val_data"
            )
        mask = torch.arange(len(images)) % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1
        mask[-1] |= not mask.any()  # fewer than 8 images: the last one is held out
        images, held = images[~mask], images[mask]
    kind, shape = output_kind(model, student_net, held[:2])
    teacher_net = None if teacher is None else teacher_image_model(teacher, held[:2], shape)

    # every check passed: from here on the model may change (and is put back if anything fails)
    if teacher is None:
        teacher = unpatch(copy.deepcopy(model))
        teacher_net = image_model(teacher)
    teacher.to(device)
    model.to(device)
    parameters = dict(model.named_parameters())
    trained = [parameters[name] for name in names]
    before = {name: parameters[name].detach().clone() for name in names}
    flags = {name: p.requires_grad for name, p in parameters.items()}
    grads = {name: parameters[name].grad for name in names}
    try:
        with eval_mode(model), eval_mode(teacher):
            for name, param in parameters.items():
                param.requires_grad_(name in before)
            healer = _Healer(student_net, teacher_net, held.to(device), kind, feature_loss, amp_dtype)
            report = healer.run(
                images,
                trained,
                list(before.values()),
                views,
                torch.Generator().manual_seed(seed),
                lr=peak,
                batch_size=batch_size,
                steps=steps,
                deadline=None if seconds is None else started + seconds,
                progress=progress,
            )
    except BaseException:
        with torch.no_grad():
            for name, value in before.items():
                parameters[name].copy_(value)
        raise
    finally:
        for name, param in parameters.items():
            param.requires_grad_(flags[name])
        for name, grad in grads.items():
            parameters[name].grad = grad
    return HealReport(
        seconds=time.perf_counter() - started,
        metric="top-1 agreement" if kind == "logits" else "cosine similarity",
        trainable=label,
        trained=tuple(names),
        trained_parameters=sum(p.numel() for p in trained),
        train_images=len(images),
        held_out=len(held),
        lr=peak,
        **report,
    )


class _Healer:
    """The budgeted loop: steps of :func:`~.step.train_step` on views, held-out checks, the best state kept."""

    def __init__(
        self, student: nn.Module, teacher: nn.Module, held: Tensor, kind: str, feature_loss: str, amp_dtype
    ) -> None:
        self.student, self.teacher, self.held = student, teacher, held
        self.kind, self.feature_loss, self.amp_dtype = kind, feature_loss, amp_dtype
        with torch.no_grad():
            self.targets = [self._vector(teacher, chunk) for chunk in held.split(64)]

    def _vector(self, net: nn.Module, images: Tensor) -> Tensor:
        device = images.device.type
        with torch.autocast(device, dtype=self.amp_dtype or torch.bfloat16, enabled=self.amp_dtype is not None):
            return _output_vector(net(images)).float()

    @torch.no_grad()
    def check(self) -> tuple[float, float]:
        """Mean agreement and divergence with the teacher on the held-out images."""
        agree, divergence = [], []
        for chunk, target in zip(self.held.split(64), self.targets, strict=True):
            a, d = agreement(self._vector(self.student, chunk), target, self.kind, self.feature_loss)
            agree.append(a)
            divergence.append(d)
        return float(torch.cat(agree).double().mean()), float(torch.cat(divergence).double().mean())

    def better(self, score: tuple[float, float], best: tuple[float, float]) -> bool:
        """Whether a checked state beats the best so far: less divergence from the teacher on the held-out images (the
        KL of the logits, smoother than top-1 on a few dozen images; for embeddings what is trained), and for a
        classifier no fewer top-1 agreements than before healing. Outputs that are no longer finite never win."""
        if not math.isfinite(score[1]):
            return False
        if self.kind == "logits" and score[0] < self.before[0]:
            return False
        return score[1] < best[1]

    def run(
        self,
        images: Tensor,
        trained: list[nn.Parameter],
        initial: list[Tensor],
        views: Views,
        generator: torch.Generator,
        *,
        lr: float,
        batch_size: int,
        steps: int | None,
        deadline: float | None,
        progress: bool,
    ) -> dict:
        """Train until the budget is spent; leave ``trained`` at the best checked state (``initial``: the model as it
        was, which competes too)."""
        tick = time.perf_counter()
        self.before = before = best = self.check()
        check_seconds = time.perf_counter() - tick
        history, kept, best_state = [(0, *before)], 0, initial
        optimizer = torch.optim.AdamW(trained, lr=lr, weight_decay=0.0)
        scaler = torch.amp.GradScaler(self.held.device.type) if self.amp_dtype == torch.float16 else None
        start = time.perf_counter()
        budget = None if deadline is None else deadline - start  # seconds left for the steps and checks
        batches = _Batches(images, min(batch_size, len(images)), generator)
        step, step_seconds, next_check, loss = 0, 0.0, 1 / CHECKS, float("nan")
        bar = tqdm(total=steps or round(budget), desc="heal", unit="step" if steps else "s", disable=not progress)
        while True:
            done = _progress(step, steps, time.perf_counter() - start, budget)
            # stop when the budget is spent, or when one more step and the last check would overrun the deadline
            if done >= 1 or (deadline is not None and time.perf_counter() + step_seconds + check_seconds > deadline):
                break
            view = views(batches.next().to(self.held.device), generator)
            ahead = _progress(step + 1, steps, time.perf_counter() - start + step_seconds, budget)
            for group in optimizer.param_groups:
                group["lr"] = lr * _lr_factor(done, ahead)
            tick = time.perf_counter()
            loss, _ = train_step(
                self.student, view, self._objective, optimizer, teacher=self.teacher, scaler=scaler,
                amp_dtype=self.amp_dtype,
            )  # fmt: skip
            step += 1
            step_seconds = time.perf_counter() - tick
            done = _progress(step, steps, time.perf_counter() - start, budget)
            bar.update(1 if steps else min(bar.total, round(time.perf_counter() - start)) - bar.n)
            if done >= next_check:
                tick = time.perf_counter()
                score = self.check()
                check_seconds = time.perf_counter() - tick
                history.append((step, *score))
                if self.better(score, best):
                    best, kept, best_state = score, step, [p.detach().clone() for p in trained]
                next_check = (int(done * CHECKS) + 1) / CHECKS
            bar.set_postfix(loss=f"{loss:.4f}", best=f"{best[0]:.4f}", refresh=False)
        bar.close()
        if history[-1][0] != step:  # the deadline stopped the loop between checks: check where it ended
            score = self.check()
            history.append((step, *score))
            if self.better(score, best):
                best, kept, best_state = score, step, None  # None: the parameters as they are
        if best_state is not None:
            with torch.no_grad():
                for param, value in zip(trained, best_state, strict=True):
                    param.copy_(value)
        return dict(
            steps=step,
            kept_step=kept,
            agreement_before=before[0],
            divergence_before=before[1],
            agreement_after=best[0],
            divergence_after=best[1],
            history=history,
        )

    def _objective(self, output: object, target: Tensor) -> tuple[Tensor, int]:
        return matching_loss(_output_vector(output), _output_vector(target), self.kind, self.feature_loss), 0


class _Batches:
    """Batches of ``images`` in a fresh random order each pass (from ``generator``)."""

    def __init__(self, images: Tensor, batch_size: int, generator: torch.Generator) -> None:
        self.images, self.batch_size, self.generator = images, batch_size, generator
        self.order, self.position = torch.empty(0, dtype=torch.long), 0

    def next(self) -> Tensor:
        if self.position + self.batch_size > len(self.order):
            self.order, self.position = torch.randperm(len(self.images), generator=self.generator), 0
        self.position += self.batch_size
        return self.images[self.order[self.position - self.batch_size : self.position]]


def _lr_factor(done: float, ahead: float) -> float:
    """Linear warm-up over the first ``WARMUP`` of the budget (by where this step ends, ``ahead``, so the first step
    moves), then a cosine to zero (by where it starts, ``done``)."""
    if done < WARMUP:
        return min(1.0, ahead / WARMUP)
    return cosine((done - WARMUP) / (1 - WARMUP))


def _progress(step: int, steps: int | None, elapsed: float, budget: float | None) -> float:
    """How much of the budget is spent, 0..1: the larger of the step and time shares."""
    shares = [step / steps] if steps else []
    if budget is not None:
        shares.append(elapsed / budget if budget > 0 else 1.0)
    return max(shares)
