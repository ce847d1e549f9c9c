"""Training objectives: labels (cross-entropy) and distillation from a teacher's soft targets (KL).

Each objective is a plain function of the student's output and the teacher's; :func:`~tokenmerge_patch.training.step.
train_step` runs both forwards and hands them over.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ..evaluation import logits_of


def distillation(student: Tensor, teacher: Tensor, temperature: float = 1.0) -> Tensor:
    """``T² KL(softmax(teacher / T) || softmax(student / T))``, averaged over the batch; T² keeps the
    gradient scale independent of T (Hinton et al.)."""
    return F.kl_div(
        F.log_softmax(student / temperature, dim=-1),
        F.log_softmax(teacher.float() / temperature, dim=-1),
        reduction="batchmean",
        log_target=True,
    ) * (temperature**2)


def supervised_objective(
    output: object,
    labels: Tensor | None,
    soft: Tensor | None,
    *,
    label_smoothing: float,
    distill_weight: float,
    temperature: float,
) -> tuple[Tensor, Tensor]:
    """:func:`~tokenmerge_patch.finetune`'s loss, and the logits accuracy is measured on: cross-entropy against
    ``labels``; with a teacher's ``soft`` logits ``(1 - w) CE + w T² KL``; without labels the KL alone, for every
    head. A DeiT distilled model in distilled-training mode returns ``(class logits, distillation logits)``: the
    class head learns from the labels and the distillation head from the teacher (both from the labels without
    one); accuracy uses their mean."""
    if isinstance(output, (tuple, list)):  # timm DeiT distilled in distilled-training mode
        cls_logits, dist_logits = output[0].float(), output[1].float()
        logits = (cls_logits + dist_logits) / 2
    else:
        cls_logits = dist_logits = logits = logits_of(output).float()
    if labels is None:  # label-free: the teacher alone, for every head
        heads = [cls_logits] if dist_logits is cls_logits else [cls_logits, dist_logits]
        loss = sum(distillation(head, soft, temperature) for head in heads) / len(heads)
        return loss, logits.detach()
    loss = F.cross_entropy(cls_logits, labels, label_smoothing=label_smoothing)
    if soft is None:
        if dist_logits is not cls_logits:
            loss = 0.5 * (loss + F.cross_entropy(dist_logits, labels, label_smoothing=label_smoothing))
        return loss, logits.detach()
    weight = distill_weight
    return (1 - weight) * loss + weight * distillation(dist_logits, soft, temperature), logits.detach()
