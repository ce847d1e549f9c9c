"""Training objectives: labels (cross-entropy), distillation from a teacher's soft targets (KL), and the
label-free matching of a teacher that :func:`~tokenmerge_patch.heal` uses (KL on logits, cosine or MSE on
features).

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


# -- matching a teacher without labels (heal) ----------------------------------------------------------


def matching_loss(student: Tensor, teacher: Tensor, kind: str, feature_loss: str = "cosine") -> Tensor:
    """What :func:`~tokenmerge_patch.heal` minimises on a view both models saw: ``KL(teacher || student)`` of the
    logits (``kind="logits"``), or for embeddings one minus their cosine similarity (``feature_loss="cosine"``) or
    their mean squared difference (``"mse"``), averaged over the batch."""
    if kind == "logits":
        return distillation(student.float(), teacher)
    student, teacher = student.float().flatten(1), teacher.float().flatten(1)
    if feature_loss == "cosine":
        return (1 - F.cosine_similarity(student, teacher, dim=-1)).mean()
    return F.mse_loss(student, teacher)


def agreement(student: Tensor, teacher: Tensor, kind: str, feature_loss: str = "cosine") -> tuple[Tensor, Tensor]:
    """Per image, how well the student agrees with the teacher and how far it is from it: for logits, whether the
    top-1 classes are the same (1.0 or 0.0) and ``KL(teacher || student)``; for embeddings, their cosine similarity
    and the divergence :func:`matching_loss` trains on (``1 - cos`` or the mean squared difference).

    >>> import torch
    >>> logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    >>> agree, divergence = agreement(logits, torch.tensor([[1.0, 0.0], [1.0, 0.0]]), "logits")
    >>> agree.tolist(), bool(divergence[0] < divergence[1])
    ([1.0, 0.0], True)
    """
    student, teacher = student.float(), teacher.float()
    if kind == "logits":
        log_s, log_t = student.log_softmax(-1), teacher.log_softmax(-1)
        same = (student.argmax(-1) == teacher.argmax(-1)).float()
        return same, (log_t.exp() * (log_t - log_s)).sum(-1)
    student, teacher = student.flatten(1), teacher.flatten(1)
    cos = F.cosine_similarity(student, teacher, dim=-1)
    divergence = 1 - cos if feature_loss == "cosine" else (student - teacher).pow(2).mean(-1)
    return cos, divergence
