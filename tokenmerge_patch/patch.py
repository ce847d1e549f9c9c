"""patch() / unpatch(): validate, find the backend, install, remember what was there.

Patching changes no class, parameter, buffer or hook. It sets a few instance attributes (a reducing
block's ``forward``, taps on the submodules its queries and keys leave through, the model's pooling).
Everything set is recorded on ``model._tokenmerge`` and taken back by :func:`unpatch`, which restores
whatever instance attribute was there before.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from .backends import Backend, find_backend
from .reduce import METHODS, SIMILARITIES, reduce_tokens
from .schedule import KeepRateSpec, LayerSpec, resolve_plan

ATTRIBUTE = "_tokenmerge"


class _Missing:
    """Marks "no instance attribute was there"; stays the one object through deepcopy and pickle, so
    unpatching a copy removes the override instead of writing a stray sentinel."""

    def __reduce__(self) -> str:
        return "_MISSING"


_MISSING = _Missing()


@dataclass(frozen=True)
class PatchConfig:
    """How a model is patched (see :func:`patch` for the meaning of each field)."""

    layers: tuple[int, ...]
    keep_rates: tuple[float, ...]
    method: str = "merge"
    similarity: str = "cosine"
    merge_into_cls: bool = False
    size_weighted: bool = False
    prop_attn: bool = False
    trace_source: bool = False
    seed: int = 0

    def keep_rate_of(self, layer: int) -> float:
        return self.keep_rates[self.layers.index(layer)]

    def proportional_layers(self, depth: int) -> tuple[int, ...]:
        """With ``prop_attn``: the blocks after the first reduction that do not reduce themselves (they
        attend with ``log(size)`` through their own forward)."""
        if not self.prop_attn:
            return ()
        return tuple(i for i in range(self.layers[0] + 1, depth) if i not in self.layers)


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
    the per-layer bookkeeping of the last forward (each reducing block replaces its own record)."""

    def __init__(self, config: PatchConfig, backend: Backend, num_prefix: int) -> None:
        self.config = config
        self.backend_name = backend.name
        self.num_prefix = num_prefix
        self.records: dict[int, LayerRecord] = {}
        self._overrides: list[tuple[nn.Module, str, object]] = []

    # -- installation ---------------------------------------------------------------------------
    def override(self, module: nn.Module, name: str, value: object) -> None:
        """Set an instance attribute (not a parameter, buffer or submodule), remembering what was there."""
        self._overrides.append((module, name, module.__dict__.get(name, _MISSING)))
        module.__dict__[name] = value

    def uninstall(self) -> None:
        for module, name, previous in reversed(self._overrides):
            if previous is _MISSING:
                module.__dict__.pop(name, None)
            else:
                module.__dict__[name] = previous
        self._overrides.clear()
        self.records = {}

    # -- per forward ----------------------------------------------------------------------------

    def record_before(self, layer: int, x: Tensor) -> LayerRecord | None:
        """This forward's record of the last reducing block before ``layer``, if it belongs to ``x``.

        Each block reads the record of the reducing block before it (not a running "current" slot), so a
        recomputation under activation checkpointing sees the same input."""
        earlier = [r for r in self.config.layers if r < layer]
        record = self.records.get(earlier[-1]) if earlier else None
        return record if record is not None and record.sizes.shape == x.shape[:2] else None

    def attention_bias(self, layer: int, x: Tensor) -> Tensor | None:
        """With ``prop_attn``: ``log(size)`` of the tokens ``x`` entering block ``layer``, shaped
        ``[B, 1, 1, N]`` as an additive float mask for SDPA; ``None`` when every token is one patch."""
        if not self.config.prop_attn:
            return None
        record = self.record_before(layer, x)
        if record is None or all(r.tokens_in == r.tokens_out for r in self.records.values()):
            return None
        return record.sizes.log().to(x.dtype)[:, None, None, :]

    def reduce(
        self, layer: int, x: Tensor, q: Tensor, k: Tensor, scale: float, attn_bias: Tensor | None = None
    ) -> Tensor:
        """Called by a backend's reducing block with its tokens after the attention residual, the queries
        and keys of its attention (``[B, H, N, d]``, after any q/k norm), the softmax scale, and the
        additive attention bias it used (see :meth:`attention_bias`)."""
        config = self.config
        previous = self.record_before(layer, x)
        out = reduce_tokens(
            x,
            q,
            k,
            scale,
            num_prefix=self.num_prefix,
            keep_rate=config.keep_rate_of(layer),
            method=config.method,
            similarity=config.similarity,
            merge_into_cls=config.merge_into_cls,
            size_weighted=config.size_weighted,
            attn_bias=attn_bias,
            sizes=None if previous is None else previous.sizes,
            source=None if previous is None else previous.source,
            trace_source=config.trace_source,
            seed=config.seed + layer,
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
    similarity: str = "cosine",
    merge_into_cls: bool = False,
    size_weighted: bool = False,
    prop_attn: bool = False,
    trace_source: bool = False,
    seed: int = 0,
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
        method: ``"merge"`` (the paper), ``"drop"`` (keep the crucial tokens, discard the rest),
            ``"fuse"`` (EViT: the rest become one extra token, their score-weighted sum) or
            ``"bipartite"`` (ToMe's bipartite soft matching on keys; at most half the patch tokens per
            block, so low keep rates are clamped).
        similarity: how ``"merge"`` picks a token's crucial token (the paper's Table 4): ``"cosine"``
            (default), ``"l1"``, ``"l2"``, ``"attention"`` (the token's attention to the crucial ones) or
            ``"random"`` (seeded by ``seed``).
        merge_into_cls: also let the class token absorb non-crucial tokens (the paper's literal
            reading); by default prefix tokens are never merge targets.
        size_weighted: weight eq. 4 by score x size (how many patches a token already holds) instead of
            the score alone. Off by default (the paper).
        prop_attn: proportional attention: after a reduction, attention adds ``log(size)`` to each key's
            logit (passed to SDPA as a float mask), so a merged token counts as the patches it holds.
        trace_source: record which original patch ends in which token (see :func:`reduction_trace`).
        seed: seed of ``similarity="random"``.

    Returns:
        ``model`` itself, patched. Patching a patched model re-configures it.

    Raises:
        TypeError / ValueError: unsupported model, bad ``layers``/``keep_rate``/``method``/... ; the model
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
    config = _validated_config(
        len(backend.blocks(model)),
        layers,
        keep_rate,
        method,
        similarity,
        merge_into_cls,
        size_weighted,
        prop_attn,
        trace_source,
        seed,
    )
    num_prefix = backend.check(model, config)
    unpatch(model)
    state = TokenMergeState(config, backend, num_prefix)
    try:
        backend.install(model, state)
    except BaseException:
        state.uninstall()  # never leave a half-installed patch behind
        raise
    model.__dict__[ATTRIBUTE] = state
    return model


def _validated_config(
    depth: int,
    layers: LayerSpec,
    keep_rate: KeepRateSpec,
    method: str,
    similarity: str,
    merge_into_cls: bool,
    size_weighted: bool,
    prop_attn: bool,
    trace_source: bool,
    seed: int,
) -> PatchConfig:
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not isinstance(similarity, str) or similarity not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
    if similarity != "cosine" and method != "merge":
        raise ValueError(f"similarity applies to method='merge' only, got method={method!r}")
    flags = (
        ("merge_into_cls", merge_into_cls),
        ("size_weighted", size_weighted),
        ("prop_attn", prop_attn),
        ("trace_source", trace_source),
    )
    for name, flag in flags:
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    for name, flag in (("merge_into_cls", merge_into_cls), ("size_weighted", size_weighted)):
        if flag and method != "merge":
            raise ValueError(f"{name} applies to method='merge' only, got method={method!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    plan = resolve_plan(depth, layers, keep_rate)
    return PatchConfig(
        layers=tuple(layer for layer, _ in plan),
        keep_rates=tuple(rate for _, rate in plan),
        method=method,
        similarity=similarity,
        merge_into_cls=merge_into_cls,
        size_weighted=size_weighted,
        prop_attn=prop_attn,
        trace_source=trace_source,
        seed=seed,
    )


def set_keep_rate(model: nn.Module, keep_rate: KeepRateSpec) -> nn.Module:
    """Change the keep rates of a patched model without re-installing anything (cheap enough to call
    every training step); one float for all reducing blocks or one per block.

    >>> import timm
    >>> model = patch(timm.create_model("vit_tiny_patch16_224", img_size=64), layers=(3, 6), keep_rate=0.5)
    >>> set_keep_rate(model, (0.9, 0.8)) is model, patch_config(model).keep_rates
    (True, (0.9, 0.8))
    """
    state = _state(model)
    if state is None:
        raise ValueError("model is not patched; call tokenmerge_patch.patch(model) first")
    plan = resolve_plan(max(state.config.layers) + 1, state.config.layers, keep_rate)
    state.config = replace(state.config, keep_rates=tuple(rate for _, rate in plan))
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
