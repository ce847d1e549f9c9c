"""Training a patched model: :func:`finetune` (epochs at the target keep rates, labels and/or a teacher, AMP, DDP,
exact resume).

The package, in reading order: :mod:`.batches` (what a batch may be, the loaders' checks, data order and RNG),
:mod:`.checks` (argument checks), :mod:`.distill` (objectives), :mod:`.step` (one optimizer step, optimizer groups
and schedule: the training core), :mod:`.loop` (the epoch loop), :mod:`.checkpoint` (atomic save, exact resume),
:mod:`.finetune` (the public function).
"""

from .checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_NAME
from .finetune import finetune
from .loop import EpochStats, StepInfo, evaluate_loader

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_NAME",
    "EpochStats",
    "StepInfo",
    "evaluate_loader",
    "finetune",
]
