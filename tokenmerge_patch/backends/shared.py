"""Pieces both backends use: reading q/k out of an unchanged attention, and the guards every patched
forward applies."""

from __future__ import annotations

from torch import Tensor, nn


class OutputTap:
    """Set as the instance ``forward`` of a submodule (timm's ``attn.q_norm``, Hugging Face's ``q_proj``): runs
    the module's own forward and, while armed, keeps its output for the reducing block.

    Installed once at patch time (no hook is registered per forward, so ``torch.compile`` sees a plain
    graph) and taken back by ``unpatch``; only armed during the reducing block's own attention call.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.armed = False
        self.output: Tensor | None = None

    def __call__(self, *args: object, **kwargs: object) -> Tensor:
        output = type(self.module).forward(self.module, *args, **kwargs)
        if self.armed:
            self.output = output
        return output

    def arm(self) -> None:
        self.armed, self.output = True, None

    def take(self, what: str) -> Tensor:
        output, self.output, self.armed = self.output, None, False
        if output is None:
            raise RuntimeError(
                f"tokenmerge_patch could not read the {what} of this attention: the submodule it reads them from "
                "was not called. This attention implementation is not supported."
            )
        return output

    def __getstate__(self) -> dict:
        return {**self.__dict__, "armed": False, "output": None}

    def __repr__(self) -> str:
        return f"OutputTap({type(self.module).__name__})"


def refuse_masks(layer: int, mask: Tensor | None, is_causal: bool = False, name: str = "attn_mask") -> None:
    if mask is not None or is_causal:
        raise ValueError(
            f"block {layer} is patched to reduce tokens (or to attend proportionally after a reduction), so an "
            f"{name} / is_causal sized for the full sequence cannot be honoured; call the model without one, or "
            "unpatch it to use masks"
        )


def check_device(x: Tensor, weight: Tensor) -> None:
    """A patched forward belongs to one module; ``nn.DataParallel`` replicas would silently share it."""
    if x.device != weight.device:
        raise RuntimeError(
            f"a patched block got tokens on {x.device} but its weights are on {weight.device}: nn.DataParallel is "
            "not supported (its replicas share the patch); use DistributedDataParallel, one process per device"
        )


def check_overridable(module: nn.Module, where: str, own: tuple[type, ...]) -> None:
    """Refuse to replace an instance-level ``forward`` someone else set (a wrapper, accelerate's hooks)."""
    current = module.__dict__.get("forward")
    if current is not None and not isinstance(current, own):
        raise TypeError(
            f"{where} already has an instance-level forward ({current!r}, e.g. a wrapper or an offloading hook); "
            "tokenmerge_patch would bypass it. Remove it before patching."
        )
