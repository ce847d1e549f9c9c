"""patch() / unpatch(): validate, find the backend, install, remember what was there.

Patching changes no class and no parameter. It sets a few instance attributes (a reducing block's
``forward``, the model's pooling) and one forward pre-hook on the embedding that starts each forward
with fresh bookkeeping. Everything set is recorded on ``model._tokenmerge`` and taken back by
:func:`unpatch`, which restores whatever instance attribute was there before.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .backends import Backend, find_backend
from .reduce import METHODS, reduce_tokens
from .schedule import KeepRateSpec, LayerSpec, resolve_plan

ATTRIBUTE = "_tokenmerge"
_MISSING = object()


@dataclass(frozen=True)
class PatchConfig:
    """How a model is patched (see :func:`patch` for the meaning of each field)."""

    layers: tuple[int, ...]
    keep_rates: tuple[float, ...]
    method: str = "merge"
    merge_into_cls: bool = False
    trace_source: bool = False

    def keep_rate_of(self, layer: int) -> float:
        return self.keep_rates[self.layers.index(layer)]


@dataclass
class LayerRecord:
    """What one reducing block did in the last forward (all tensors detached).

    Attributes:
        tokens_in: tokens entering the block (prefix included).
        tokens_out: tokens leaving it.
        sizes: ``[B, tokens_out]`` how many original tokens each output token holds.
        source: ``[B, N0]`` for each original patch, the index of the output token holding it (-1 if
            dropped); ``None`` unless patched with ``trace_source=True``.
    """

    tokens_in: int
    tokens_out: int
    sizes: Tensor
    source: Tensor | None


class TokenMergeState:
    """Lives on a patched model as ``model._tokenmerge``: the configuration, what was installed, and
    the current forward's per-layer bookkeeping (reset whenever the embedding runs)."""

    def __init__(self, config: PatchConfig, backend: Backend, num_prefix: int) -> None:
        self.config = config
        self.backend_name = backend.name
        self.num_prefix = num_prefix
        self.records: dict[int, LayerRecord] = {}
        self._overrides: list[tuple[nn.Module, str, object]] = []
        self._hooks: list[tuple[nn.Module, int]] = []

    # -- installation ---------------------------------------------------------------------------
    def override(self, module: nn.Module, name: str, value: object) -> None:
        """Set an instance attribute (not a parameter, buffer or submodule), remembering what was there."""
        self._overrides.append((module, name, module.__dict__.get(name, _MISSING)))
        module.__dict__[name] = value

    def add_reset_hook(self, embedding: nn.Module) -> None:
        handle = embedding.register_forward_pre_hook(self.reset)
        self._hooks.append((embedding, handle.id))

    def uninstall(self) -> None:
        for module, name, previous in reversed(self._overrides):
            if previous is _MISSING:
                module.__dict__.pop(name, None)
            else:
                module.__dict__[name] = previous
        for module, hook_id in self._hooks:
            module._forward_pre_hooks.pop(hook_id, None)
        self._overrides.clear()
        self._hooks.clear()
        self.records = {}

    # -- per forward ----------------------------------------------------------------------------
    def reset(self, *_: object) -> None:
        """Forget the previous forward (a forward pre-hook on the embedding)."""
        self.records = {}

    def reduce(self, layer: int, x: Tensor, q: Tensor, k: Tensor, scale: float) -> Tensor:
        """Called by a backend's reducing block with its tokens after the attention residual."""
        config = self.config
        position = config.layers.index(layer)
        previous = self.records.get(config.layers[position - 1]) if position else None
        # Each block reads the record of the reducing block before it (not a running "current"
        # slot), so a recomputation under activation checkpointing sees the same input.
        if previous is None or previous.sizes.shape != x.shape[:2]:
            previous = None
        out = reduce_tokens(
            x,
            q,
            k,
            scale,
            num_prefix=self.num_prefix,
            keep_rate=config.keep_rates[position],
            method=config.method,
            merge_into_cls=config.merge_into_cls,
            sizes=None if previous is None else previous.sizes,
            source=None if previous is None else previous.source,
            trace_source=config.trace_source,
        )
        self.records[layer] = LayerRecord(
            tokens_in=x.shape[1],
            tokens_out=out.x.shape[1],
            sizes=out.sizes.detach(),
            source=None if out.source is None else out.source.detach(),
        )
        return out.x

    def final_sizes(self, x: Tensor) -> Tensor | None:
        """Sizes of the tokens ``x`` leaving the last reducing block, if they belong to ``x``."""
        records = [self.records[layer] for layer in self.config.layers if layer in self.records]
        if not records or all(r.tokens_in == r.tokens_out for r in records):
            return None  # nothing was reduced: every token holds one patch
        sizes = records[-1].sizes
        return sizes if sizes.shape == x.shape[:2] else None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["records"] = {}  # per-forward bookkeeping is not part of the model
        return state


def _state(model: nn.Module) -> TokenMergeState | None:
    state = model.__dict__.get(ATTRIBUTE)
    return state if isinstance(state, TokenMergeState) else None


def is_patched(model: nn.Module) -> bool:
    """Whether :func:`patch` has been applied to ``model`` (and not undone).

    >>> import timm
    >>> model = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=0)
    >>> is_patched(patch(model)), is_patched(unpatch(model))
    (True, False)
    """
    return _state(model) is not None


def patch_config(model: nn.Module) -> PatchConfig | None:
    """The :class:`PatchConfig` of a patched model, ``None`` if it is not patched."""
    state = _state(model)
    return None if state is None else state.config


def reduction_trace(model: nn.Module) -> dict[int, LayerRecord]:
    """Per reducing block, what the last forward did: token counts, sizes and (with
    ``trace_source=True``) source maps. Empty before the first forward.

    >>> import timm, torch
    >>> model = patch(timm.create_model("vit_tiny_patch16_224", img_size=64), keep_rate=0.5)
    >>> _ = model(torch.randn(1, 3, 64, 64))
    >>> [(r.tokens_in, r.tokens_out) for r in reduction_trace(model).values()]
    [(17, 9), (9, 5), (5, 3)]
    """
    state = _state(model)
    if state is None:
        raise ValueError("model is not patched; call tokenmerge_patch.patch(model) first")
    return dict(state.records)


def patch(
    model: nn.Module,
    layers: LayerSpec = None,
    keep_rate: KeepRateSpec = 0.7,
    *,
    method: str = "merge",
    merge_into_cls: bool = False,
    trace_source: bool = False,
) -> nn.Module:
    """Make a pretrained ViT cheaper in place: chosen blocks keep their most attended tokens and merge
    the rest into them (arXiv 2306.04897).

    In each chosen block, after the attention residual and before the MLP, the class token's attention
    row (post-softmax, averaged over heads) scores the patch tokens; the ``ceil(keep_rate * N_patch)``
    best are kept as crucial and every other token is merged into its most cosine-similar crucial token,
    weighted by the scores (eq. 4). Prefix tokens (class, distillation, registers) are never reduced.

    Args:
        model: a timm ``VisionTransformer`` (vit_*, deit_*, deit3_*, dinov2, register models, ...) built
            from timm's ``Block``/``Attention``, or a supported Hugging Face vision transformer.
        layers: 0-based indices of the reducing blocks; ``None`` for the paper's placement
            ``(d//4, d//2, 3d//4)``, i.e. ``(3, 6, 9)`` for 12 blocks.
        keep_rate: fraction of patch tokens each reducing block keeps, in (0, 1]: one float for all, or
            one per entry of ``layers``.
        method: ``"merge"`` (the paper) or ``"drop"`` (keep the crucial tokens, discard the rest).
        merge_into_cls: also let the class token absorb non-crucial tokens (the paper's literal
            reading); by default prefix tokens are never merge targets.
        trace_source: record which original patch ends in which token (see :func:`reduction_trace`).

    Returns:
        ``model`` itself, patched. Patching a patched model re-configures it.

    Raises:
        TypeError / ValueError: unsupported model, bad ``layers``/``keep_rate``/``method``; the model
            is then left exactly as it was.

    Example:
        >>> import timm, torch
        >>> model = timm.create_model("deit_tiny_patch16_224")
        >>> patch(model, layers=(3, 6, 9), keep_rate=0.7) is model
        True
        >>> model(torch.randn(1, 3, 224, 224)).shape
        torch.Size([1, 1000])
        >>> [r.tokens_out for r in reduction_trace(model).values()]
        [139, 98, 69]
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    backend = find_backend(model)
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    for name, flag in (("merge_into_cls", merge_into_cls), ("trace_source", trace_source)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    plan = resolve_plan(len(backend.blocks(model)), layers, keep_rate)
    chosen = tuple(layer for layer, _ in plan)
    num_prefix = backend.check(model, chosen)
    if merge_into_cls and method != "merge":
        raise ValueError(f"merge_into_cls applies to method='merge' only, got method={method!r}")

    config = PatchConfig(
        layers=chosen,
        keep_rates=tuple(rate for _, rate in plan),
        method=method,
        merge_into_cls=merge_into_cls,
        trace_source=trace_source,
    )
    unpatch(model)
    state = TokenMergeState(config, backend, num_prefix)
    backend.install(model, state)
    model.__dict__[ATTRIBUTE] = state
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo :func:`patch`: the model behaves exactly as before (a no-op on an unpatched model).

    >>> import timm
    >>> model = timm.create_model("vit_tiny_patch16_224", img_size=32)
    >>> unpatch(patch(model)) is model, is_patched(model)
    (True, False)
    """
    state = _state(model)
    if state is not None:
        state.uninstall()
        del model.__dict__[ATTRIBUTE]
    return model


def patched_layers(model: nn.Module) -> Sequence[int]:
    """The reducing block indices of a patched model (empty if unpatched)."""
    state = _state(model)
    return () if state is None else state.config.layers


@torch.no_grad()
def token_counts(model: nn.Module, example: Tensor) -> list[int]:
    """Tokens leaving each block for one forward of ``example`` (patched or not).

    >>> import timm, torch
    >>> model = patch(timm.create_model("deit_small_patch16_224"), keep_rate=0.7)
    >>> token_counts(model, torch.randn(1, 3, 224, 224))[2:5]
    [197, 139, 139]
    """
    backend = find_backend(model)
    counts: list[int] = []
    handles = [
        block.register_forward_hook(lambda _m, _i, out: counts.append(backend.tokens_of(out)))
        for block in backend.blocks(model)
    ]
    try:
        model(example)
    finally:
        for handle in handles:
            handle.remove()
    return counts
