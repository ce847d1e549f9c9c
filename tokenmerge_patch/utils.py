"""Small helpers shared across the package."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for a while, then give every submodule back its own ``training`` flag
    (``model.train(was_training)`` would also flip submodules the user had set apart, e.g. a frozen block).

    >>> model = nn.Sequential(nn.Dropout(), nn.Dropout()).train()
    >>> _ = model[1].eval()
    >>> with eval_mode(model):
    ...     print(model.training, model[0].training)
    False False
    >>> model.training, model[0].training, model[1].training
    (True, True, False)
    """
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in flags:
            module.training = training
