"""Read what a submodule returns during one call, without touching the module's own forward."""

from __future__ import annotations

from torch import Tensor, nn


class CaptureOutputs:
    """Context manager: ``outputs[i]`` is what ``modules[i]`` returned while the context was open.

    Used to take a block's queries and keys from inside its unchanged attention (fused SDPA stays on).

    >>> import torch
    >>> lin = nn.Linear(2, 3)
    >>> with CaptureOutputs(lin) as captured:
    ...     _ = lin(torch.ones(1, 2))
    >>> captured.outputs[0].shape
    torch.Size([1, 3])
    """

    def __init__(self, *modules: nn.Module) -> None:
        self.modules = modules
        self.outputs: list[Tensor | None] = [None] * len(modules)
        self._handles: list = []

    def _hook(self, index: int):
        def record(_module: nn.Module, _args: object, output: Tensor) -> None:
            self.outputs[index] = output

        return record

    def __enter__(self) -> CaptureOutputs:
        self._handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(self.modules)]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def require(self, what: str) -> list[Tensor]:
        """The outputs, or a clear error if a module was never called (an attention we do not know)."""
        missing = [i for i, out in enumerate(self.outputs) if out is None]
        if missing:
            raise RuntimeError(
                f"tokenmerge_patch could not read the {what} of this attention: a submodule it expects "
                "the attention to call was not called. This attention implementation is not supported."
            )
        return self.outputs  # type: ignore[return-value]
