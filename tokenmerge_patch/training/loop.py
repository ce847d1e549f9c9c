"""The epoch loop of :func:`~tokenmerge_patch.finetune`: :class:`Trainer` builds the optimizer, schedule and
loss scaler, runs the epochs (keep-rate warm-up, one :func:`~tokenmerge_patch.training.step.train_step` per batch,
validation at the targets), wraps the model in DDP under ``torchrun`` and saves / resumes exactly through
:class:`~tokenmerge_patch.training.checkpoint.Checkpoints`. What it reports: :class:`EpochStats`, :class:`StepInfo`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from ..evaluation import Batch, logits_of, parse_batch
from ..patch import set_keep_rate
from ..schedule import warmup_keep_rates
from ..utils import eval_mode
from .batches import LABEL_FREE, NEEDS, rng_state, set_epoch, set_rng_state
from .checkpoint import Checkpoints
from .checks import pick_device
from .distill import supervised_objective
from .step import param_groups, train_step, warmup_cosine


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
class Running:
    """Sums over the current epoch, kept in checkpoints so a resumed epoch reports what an uninterrupted
    one would."""

    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    seconds: float = 0.0
    rates: tuple[float, ...] = field(default_factory=tuple)
    lr: float = 0.0


@dataclass(frozen=True)
class Options:
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
    device = pick_device(device)
    correct = total = 0
    with eval_mode(model):
        for batch in loader:
            images, labels = parse_batch(batch, "loader")
            if labels is None:
                raise ValueError(f"evaluate_loader needs labels to measure top-1, the loader's batch has none; {NEEDS}")
            with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
                logits = logits_of(model(images.to(device)))
            correct += (logits.argmax(-1).cpu() == labels.cpu()).sum().item()
            total += labels.numel()
    correct, total = all_sum([correct, total], device)
    return correct / max(total, 1)


# -- the epoch loop ---------------------------------------------------------------------------------


class Trainer:
    """One fine-tuning run: what it builds (optimizer, schedule, scaler), where it is (step, history, the
    epoch's running sums, RNG states for an exact resume) and the epoch loop."""

    def __init__(
        self,
        model: nn.Module,
        train_loader: Iterable,
        options: Options,
        *,
        targets: tuple[float, ...],
        steps_per_epoch: int,
        val_loader: Iterable | None,
        teacher: nn.Module | None,
        device: torch.device,
        amp_dtype: torch.dtype | None,
        checkpoints: Checkpoints,
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
        self.optimizer = torch.optim.AdamW(param_groups(model, options.weight_decay), lr=options.lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            warmup_cosine(total_steps, round(options.lr_warmup * total_steps), options.min_lr / options.lr),
        )
        # fp16 needs loss scaling against underflow; bf16 has fp32's range and does not.
        self.scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None

        self.step = 0
        self.history: list[EpochStats] = []
        self.running = Running()
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
        self.running = Running(**{**saved["running"], "rates": tuple(saved["running"]["rates"])})
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
                set_rng_state(self.train_loader, self.pending_rng)
                self.pending_rng = None
            self.epoch_rng = rng_state(self.train_loader)
            self.running = Running()
        else:  # rebuild this epoch's batch order from its start, then continue the RNG where it was
            set_rng_state(self.train_loader, self.epoch_rng)
        set_epoch(self.train_loader, epoch)
        batches = iter(self.train_loader)
        for _ in range(done):
            next(batches)
        if self.pending_rng is not None:
            set_rng_state(self.train_loader, self.pending_rng)
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
            loss, correct = self._step(net, batch)
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
                keep=format_rates(rates),
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

    def _step(self, net: nn.Module, batch: Batch) -> tuple[float, int]:
        """One step on ``batch``: its labels and/or the teacher's soft targets (see :func:`supervised_objective`);
        ``correct`` counts the labels hit, or the teacher's top-1 for a batch without labels."""
        images, labels = batch
        if labels is None and self.teacher is None:  # checked before the forward: nothing has changed yet
            raise ValueError(f"train_loader yielded a batch without labels and there is no teacher; {LABEL_FREE}")
        options, teacher = self.options, self.teacher

        def objective(output: object, soft: Tensor | None) -> tuple[Tensor, int]:
            loss, logits = supervised_objective(
                output,
                labels,
                soft,
                label_smoothing=options.label_smoothing,
                distill_weight=options.distill_weight,
                temperature=options.distill_temperature,
            )
            reference = labels if labels is not None else soft.argmax(-1)
            return loss, int((logits.argmax(-1) == reference).sum().item())

        return train_step(
            net,
            images,
            objective,
            self.optimizer,
            teacher=None if teacher is None else (lambda x: logits_of(teacher(x))),
            scaler=self.scaler,
            amp_dtype=self.amp_dtype,
            grad_clip=options.grad_clip,
        )

    def _finish_epoch(self, epoch: int, started: float) -> None:
        """Validate at the targets, record the epoch's stats (summed over ranks) and checkpoint."""
        set_keep_rate(self.model, self.targets)
        val = None
        if self.val_loader is not None:
            val = evaluate_loader(self.model, self.val_loader, device=self.device, amp_dtype=self.amp_dtype)
        self.model.train()
        running = self.running
        loss_sum, correct, seen = all_sum([running.loss_sum, running.correct, running.seen], self.device)
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
            tqdm.write(describe(self.history[-1]))
        self.running = Running()
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

        self.checkpoints.save(payload, rng_state(self.train_loader), self.epoch_rng)


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum over ranks (identity without torch.distributed); ints stay ints."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    backend_device = device if dist.get_backend() == "nccl" else torch.device("cpu")
    summed = torch.tensor([float(v) for v in values], dtype=torch.float64, device=backend_device)
    dist.all_reduce(summed)
    return [type(v)(s) for v, s in zip(values, summed.tolist(), strict=True)]


def format_rates(rates: tuple[float, ...]) -> str:
    return f"{rates[0]:.2f}" if len(set(rates)) == 1 else "/".join(f"{r:.2f}" for r in rates)


def describe(stats: EpochStats) -> str:
    val = "" if stats.val_accuracy is None else f", val top-1 {100 * stats.val_accuracy:.2f} %"
    return (
        f"epoch {stats.epoch}: loss {stats.train_loss:.4f}, train top-1 {100 * stats.train_accuracy:.2f} %{val}, "
        f"keep {format_rates(stats.keep_rates)}, lr {stats.lr:.2e}, {stats.seconds:.1f} s"
    )
