"""Training a patched model: :func:`finetune` (epochs at the target keep rates, labels and/or a teacher, AMP, DDP,
exact resume) and :func:`heal` (label-free recovery in minutes: the unpatched model teaches, function matching on
augmented views of a few hundred images, a time or step budget, the best held-out state kept).

The package, in reading order: :mod:`.batches` (what a batch may be, the loaders' checks, data order and RNG),
:mod:`.checks` (argument checks), :mod:`.distill` (objectives), :mod:`.augment` (the views function matching
trains on), :mod:`.step` (one optimizer step, optimizer groups and schedule: the core both share), :mod:`.loop`
(finetune's epoch loop), :mod:`.checkpoint` (atomic save, exact resume), :mod:`.heal_inputs` (what heal is given,
checked; which parameters it trains), :mod:`.finetune` and :mod:`.heal` (the public functions).
"""

from .checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_NAME
from .finetune import finetune
from .heal import HealReport, heal
from .loop import EpochStats, StepInfo, evaluate_loader

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_NAME",
    "EpochStats",
    "HealReport",
    "StepInfo",
    "evaluate_loader",
    "finetune",
    "heal",
]
