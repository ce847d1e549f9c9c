"""Top-1 accuracy over a dataset, with a progress bar."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .utils import eval_mode


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    desc: str = "eval",
    progress: bool = True,
) -> float:
    """Top-1 accuracy (0..1) of ``model`` on ``dataset`` of ``(image, label)`` pairs.

    >>> import torch
    >>> from torch.utils.data import TensorDataset
    >>> data = TensorDataset(torch.eye(3), torch.tensor([0, 1, 1]))
    >>> evaluate(nn.Identity(), data, progress=False)
    0.6666666666666666
    """
    correct = total = 0
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    with eval_mode(model):
        for images, labels in tqdm(loader, desc=desc, disable=not progress, leave=False):
            logits = model(images.to(device))
            logits = logits if isinstance(logits, torch.Tensor) else logits.logits
            correct += (logits.argmax(-1).cpu() == labels).sum().item()
            total += labels.numel()
    return correct / max(total, 1)
