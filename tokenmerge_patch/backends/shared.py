"""Pieces both backends use: reading q/k out of an unchanged attention, and the guards every patched
forward applies."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from torch import Tensor, nn

from ..dense import merge_groups, spread_groups
from ..records import groups_of, record_of, tag_groups

if TYPE_CHECKING:
    from ..patch import TokenMergeState

T = TypeVar("T")


class OutputTap:
    """Set as the instance ``forward`` of a submodule (timm's ``attn.q_norm``, Hugging Face's ``q_proj``): runs
    the module's own forward and, while a reducing block has armed it, keeps its output for that block.

    Installed once at patch time (no hook is registered per forward, so ``torch.compile`` sees a plain
    graph) and taken back by ``unpatch``. Each arming opens its own slot, so a call that re-enters the model
    from inside the attention (a hook) arms, fills and releases a slot above the outer call's, never the
    outer call's own.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.slots: list[Tensor | None] = []

    def __call__(self, *args: object, **kwargs: object) -> Tensor:
        output = type(self.module).forward(self.module, *args, **kwargs)
        if self.slots:
            self.slots[-1] = output
        return output

    def arm(self) -> int:
        self.slots.append(None)
        return len(self.slots) - 1

    def release(self, slot: int) -> Tensor | None:
        """What the module returned since :meth:`arm` gave ``slot`` (``None`` if it was not called); closes the
        slot and any a failed inner call left above it."""
        output = self.slots[slot] if slot < len(self.slots) else None
        del self.slots[slot:]
        return output

    def __getstate__(self) -> dict:
        return {**self.__dict__, "slots": []}

    def __repr__(self) -> str:
        return f"OutputTap({type(self.module).__name__})"


class BlockForward:
    """Base of the forwards a backend sets on a block (an instance attribute: the block stays the same object with
    the same submodules, and forward hooks on it see what the forward returns). :meth:`leave` attaches the tokens'
    record to the block's output (filed for a dense call) and, at the last block, publishes its trace."""

    def __init__(self, block: nn.Module, state: TokenMergeState, layer: int) -> None:
        self.block, self.state, self.layer = block, state, layer

    def leave(self, out: Tensor, record: tuple | None) -> Tensor:
        state = self.state
        if self.layer == state.depth - 1:
            state.publish(record)
        if state.config.dense:  # full-resolution tokens, read as such; their merge groups travel apart
            return tag_groups(state.collect(out, None), record)
        return state.collect(out, record)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(layer={self.layer})"


class ReducingBlockForward(BlockForward):
    """Base of a reducing block's forward: where the reduction sits in a block, written once for every backend. A
    backend says how its block computes its attention half (:meth:`attention_half`) and its MLP half
    (:meth:`mlp_half`); its ``__call__`` checks the call and hands :meth:`run` what the attention half needs.

    ``dense=False``: attention, reduce the tokens (the residual stream goes on with fewer), MLP. ``dense=True``: the
    residual stream ``x`` keeps every patch; the attention half runs on the merge groups ``x`` arrived with, the
    reduction makes the new groups from its output, the MLP half runs on those, and each update goes back to every
    patch of its group (:func:`~tokenmerge_patch.dense.merge_groups`, :func:`~tokenmerge_patch.dense.spread_groups`).
    """

    def attention_half(
        self, x: Tensor, record: tuple | None, bias: Tensor | None, call: object
    ) -> tuple[Tensor, Tensor, Tensor, float]:
        """The attention branch for tokens ``x`` whose record is ``record`` (RoPE: where they sit): the update the
        block adds to its residual stream (after LayerScale and drop path), the queries and keys ``[B, H, N, d]``
        its attention used (rotated, for RoPE) and the softmax scale. ``bias``: ``log(size)`` per key
        ``[B, 1, 1, N]`` to add to the attention logits, or ``None``; ``call``: what the block was called with."""
        raise NotImplementedError

    def mlp_half(self, x: Tensor) -> Tensor:
        """The MLP branch's update for tokens ``x`` (after LayerScale and drop path)."""
        raise NotImplementedError

    def run(self, x: Tensor, call: object = None) -> Tensor:
        state, layer = self.state, self.layer
        record = state.incoming(layer, x)
        if state.config.dense:
            return self._run_dense(x, record, call)
        bias = state.attention_bias(record, x)
        y, q, k, scale = self.attention_half(x, record, bias, call)
        x, record = state.reduce(layer, x + y, q, k, scale, record, attn_bias=bias)
        return self.leave(x + self.mlp_half(x), record)

    def _run_dense(self, x: Tensor, groups: tuple | None, call: object) -> Tensor:
        state, prefix = self.state, self.state.num_prefix
        merged = merge_groups(x, groups, prefix)
        bias = state.attention_bias(groups, merged)
        y, q, k, scale = self.attention_half(merged, groups, bias, call)
        after = merged + y
        _, new_groups = state.reduce(self.layer, after, q, k, scale, groups, attn_bias=bias)  # the groups only
        x = after if merged is x else x + spread_groups(y, groups, prefix)
        update = self.mlp_half(merge_groups(x, new_groups, prefix))
        return self.leave(x + spread_groups(update, new_groups, prefix), new_groups)


class LaterBlockForward(BlockForward):
    """A block after the first reduction that does not reduce itself: runs its own forward (:meth:`compute`) and
    passes the tokens' record on. With ``dense=True`` it computes on the merge groups of the full-resolution stream
    and hands each group's update back to its patches."""

    def __call__(self, x: Tensor, *args: object, **kwargs: object) -> Tensor | tuple:
        state = self.state
        record = state.incoming(self.layer, x)
        merged = merge_groups(x, record, state.num_prefix) if state.config.dense else x
        out = self.compute(merged, record, *args, **kwargs)
        out, rest = (out[0], out[1:]) if isinstance(out, tuple) else (out, ())  # older layouts: (hidden_states, ...)
        if merged is not x:
            out = x + spread_groups(out - merged, record, state.num_prefix)
        out = self.leave(out, record)
        return (out, *rest) if rest else out

    def compute(self, x: Tensor, record: tuple | None, *args: object, **kwargs: object) -> Tensor | tuple:
        """The block's own forward on tokens ``x`` whose record is ``record``; with ``prop_attn`` (a ``log(size)``
        key bias to add), a backend's :meth:`with_bias` runs it."""
        bias = self.state.attention_bias(record, x)
        if bias is None:
            return type(self.block).forward(self.block, x, *args, **kwargs)
        return self.with_bias(x, bias, args, kwargs)

    def with_bias(self, x: Tensor, bias: Tensor, args: tuple, kwargs: dict) -> Tensor:
        """The block's forward with ``bias`` ``[B, 1, 1, N]`` added to its attention logits (``args``/``kwargs``: the
        call's own, to refuse a mask that cannot be honoured)."""
        raise NotImplementedError


def read_taps(taps: tuple[OutputTap, ...], run: Callable[[], T]) -> tuple[T, list[Tensor]]:
    """Run ``run()`` (a block's attention) with ``taps`` armed and return its result and what each tap saw.
    The taps are released however ``run`` ends, so an exception leaves no tensor (or autograd graph) behind."""
    slots = [tap.arm() for tap in taps]
    try:
        result = run()
    finally:
        seen = [tap.release(slot) for tap, slot in zip(taps, slots, strict=True)]
    if any(output is None for output in seen):
        raise RuntimeError(
            "tokenmerge_patch could not read the queries and keys of this attention: the submodule it reads them "
            "from was not called. This attention implementation is not supported."
        )
    return result, seen


class RecordKeepingNorm:
    """Replaces the forward of the norm after the last block (timm ``model.norm``, HF ``layernorm``): its output
    keeps the tokens' record (the pool and ``forward_head`` read it), and the trace of the forward that got here
    becomes :func:`reduction_trace`."""

    def __init__(self, norm: nn.Module, state: TokenMergeState) -> None:
        self.norm = norm
        self.state = state

    def __call__(self, x: Tensor) -> Tensor:
        record = record_of(x)
        self.state.publish(record)
        out = self.state.collect(type(self.norm).forward(self.norm, x), record)
        return tag_groups(out, groups_of(x))  # dense=True: still the full-resolution stream (unmerge returns it)


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
    if current is not None and not isinstance(getattr(current, "__self__", current), own):  # own methods too
        raise TypeError(
            f"{where} already has an instance-level forward ({current!r}, e.g. a wrapper or an offloading hook); "
            "tokenmerge_patch would bypass it. Remove it before patching."
        )


class ScriptingRefused:
    """Set as ``__prepare_scriptable__`` on a patched model and on every module whose forward a patch replaced:
    ``torch.jit.script`` calls it before compiling anything, so scripting fails with this message instead of an
    internal ``AttributeError`` (``__globals__``) on the patch's Python forwards."""

    def __call__(self) -> nn.Module:
        raise RuntimeError(
            "torch.jit.script cannot compile a model patched by tokenmerge_patch: its reducing blocks run Python "
            "objects as forwards and carry per-forward bookkeeping on the token tensors, which TorchScript does not "
            "support. Use torch.compile, torch.export.export (the batch dimension can stay dynamic) or "
            "tokenmerge_patch.export_onnx / torch.onnx.export(..., dynamo=True) instead, or script the model "
            "unpatched (tokenmerge_patch.unpatch)."
        )

    def __repr__(self) -> str:
        return "ScriptingRefused()"


def refuse_scripting(state: TokenMergeState, model: nn.Module) -> None:
    """Install :class:`ScriptingRefused` on ``model`` and on every module ``state`` gave a forward (undone with the
    rest of the patch), so scripting the model or any patched part of it is refused clearly."""
    modules = {id(model): model}
    modules |= {id(module): module for module, name, _ in state._overrides if name == "forward"}
    for module in modules.values():
        state.override(module, "__prepare_scriptable__", ScriptingRefused())
