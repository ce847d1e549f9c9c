"""``tokenmerge_patch.finetune``: the import path of :func:`finetune` and what goes with it, kept for code written
before the training package. Everything lives in :mod:`tokenmerge_patch.training`."""

from .training.checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_NAME
from .training.finetune import finetune
from .training.loop import EpochStats, StepInfo, evaluate_loader

__all__ = ["CHECKPOINT_FORMAT", "CHECKPOINT_NAME", "EpochStats", "StepInfo", "evaluate_loader", "finetune"]
