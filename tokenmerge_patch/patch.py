"""patch() / unpatch(): validate, find the backend, install, remember what was there.

Patching changes no class, parameter, buffer or hook. It sets a few instance attributes (a reducing
block's ``forward``, taps on the submodules its queries and keys leave through, the model's pooling).
Everything set is recorded on ``model._tokenmerge`` and taken back by :func:`unpatch`, which restores
whatever instance attribute was there before.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace

import torch
from torch import Tensor, nn

from .backends import Backend
from .backends.shared import refuse_scripting
from .model_info import ModelInfo, describe, unwrap
from .plan import PatchConfig, check_fraction
from .records import LayerRecord, TokenRecord, groups_of, record_of, record_sizes, tag
from .reduce import exporting, reduce_tokens
from .schedule import KeepRateSpec, LayerSpec, resolve_plan

ATTRIBUTE = "_tokenmerge"


class _Missing:
    """Marks "no instance attribute was there"; stays the one object through deepcopy and pickle, so
    unpatching a copy removes the override instead of writing a stray sentinel."""

    def __reduce__(self) -> str:
        return "_MISSING"


_MISSING = _Missing()


class TokenMergeState:
    """Lives on a patched model as ``model._tokenmerge``: the configuration, what was installed, and the trace of the
    last forward that went through the last block (``reduction_trace``). Per-forward bookkeeping is not kept here:
    it travels with the tokens (see :func:`record_of`)."""

    # Source maps (which token holds each original patch, what :func:`tokenmerge_patch.unmerge` and dense outputs
    # read) are always tracked: a [B, N0] index gather per reduction. Only benchmarks/source_overhead.py turns this
    # off, to measure what tracking costs.
    track_source = True

    def __init__(self, config: PatchConfig, backend: Backend, num_prefix: int, depth: int) -> None:
        self.config = config
        self.backend_name = backend.name
        self.num_prefix = num_prefix
        self.depth = depth
        self.records: dict[int, LayerRecord] = {}
        self.collectors: list[dict[int, TokenRecord]] = []  # open dense calls, innermost last (see collect)
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
    def incoming(self, layer: int, x: Tensor) -> TokenRecord | None:
        """The record of the tokens ``x`` entering block ``layer`` (with ``dense=True``: the merge groups of the
        full-resolution stream ``x``). Every block from the first reducing one on tags what it returns, so tokens
        arriving later without a record lost it on the way: refuse rather than guess their sizes."""
        record = groups_of(x) if self.config.dense else record_of(x)
        if record is None and layer > self.config.layers[0]:
            raise RuntimeError(
                f"block {layer} got tokens without the merge record the reducing blocks before it attach to their "
                "output: something between the blocks replaced the tensor (a forward hook returning a new tensor, "
                "re-entrant activation checkpointing, a manual copy). tokenmerge_patch needs the blocks' own outputs "
                "(use torch.utils.checkpoint with use_reentrant=False; hooks that modify outputs in place are fine)"
            )
        return record

    def attention_bias(self, record: TokenRecord | None, x: Tensor) -> Tensor | None:
        """With ``prop_attn``: ``log(size)`` of the tokens ``x``, shaped ``[B, 1, 1, N]`` as an additive float mask
        for SDPA; ``None`` when every token is one patch (before any reduction, or when tokens are only dropped)."""
        sizes = record_sizes(record) if self.config.prop_attn and self.config.method != "drop" else None
        if sizes is None:
            return None
        # one view, not three index ops: at batch 1 every op launched in each later block shows in the latency
        return sizes.log().to(x.dtype).unsqueeze(1).unsqueeze(1)

    def reduce(
        self,
        layer: int,
        x: Tensor,
        q: Tensor,
        k: Tensor,
        scale: float,
        record: TokenRecord | None,
        attn_bias: Tensor | None = None,
    ) -> tuple[Tensor, TokenRecord]:
        """Called by a backend's reducing block with its tokens after the attention residual, the queries and keys
        of its attention (``[B, H, N, d]``, after any q/k norm), the softmax scale, the record its input carried and
        the additive attention bias it used (see :meth:`attention_bias`). Returns the reduced tokens and their
        record, which the block attaches to its output with :func:`tag`."""
        config = self.config
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
            keep_norm=config.keep_norm,
            score=config.score,
            attn_bias=attn_bias,
            sizes=None if record is None else record[0],
            source=None if record is None else record[1],
            trace_source=self.track_source,
            seed=config.seed + layer,
            positions=None if record is None else record[4],
        )
        sizes, source = out.sizes.detach(), None if out.source is None else out.source.detach()
        reduced = (record is not None and record[2]) or out.x.shape[1] < x.shape[1]
        trace = (() if record is None else record[3]) + ((layer, x.shape[1], out.x.shape[1], sizes, source),)
        return out.x, (sizes, source, reduced, trace, out.positions)

    @contextmanager
    def collecting(self) -> Iterator[dict[int, TokenRecord | None]]:
        """Open a dense call (timm ``forward_intermediates``): while it is open, :meth:`collect` files each block's
        output record under the tensor's storage, so slices the caller cuts from those outputs (which carry no
        record of their own) can still be unmerged. Nested calls get their own collector."""
        collector = _Collector()
        self.collectors.append(collector)
        try:
            yield collector
        finally:
            self.collectors.remove(collector)

    def collect(self, x: Tensor, record: TokenRecord | None) -> Tensor:
        """Tag ``x`` with ``record`` and, inside :meth:`collecting`, file the record (``None`` too) under ``x``'s
        storage. The collector holds ``x`` until the dense call ends, so no later tensor of the call (a normalised
        intermediate, say) can be allocated in the same storage and be mistaken for it; a re-entrant forward only
        adds entries for storages of its own."""
        if self.collectors:
            collector = self.collectors[-1]
            collector[x.untyped_storage().data_ptr()] = record
            collector.alive.append(x)
        return tag(x, record)

    def publish(self, record: TokenRecord | None) -> None:
        """Make ``record``'s trace what :func:`reduction_trace` reports (called where a forward leaves the blocks).
        Not while exporting or tracing (``count_flops``): the tensors of a traced forward are placeholders or
        traced sizes, and counting is not a forward the trace should report."""
        if record is not None and not exporting() and not torch.jit.is_tracing():
            self.records = {layer: LayerRecord(*fields) for layer, *fields in record[3]}

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["records"] = {}  # per-forward bookkeeping is not part of the model
        state["collectors"] = []
        return state


class _Collector(dict):
    """Records filed by storage during one dense call, and the tensors they were filed for (kept alive)."""

    def __init__(self) -> None:
        super().__init__()
        self.alive: list[Tensor] = []


def _state(model: nn.Module) -> TokenMergeState | None:
    state = unwrap(model).__dict__.get(ATTRIBUTE)
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
    """Per reducing block, what the last forward did: token counts, sizes and source maps (which token holds
    each original patch; see :func:`tokenmerge_patch.unmerge`). Empty before the first forward.

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
    keep_rate: KeepRateSpec | None = None,
    *,
    flops: float | None = None,
    config: PatchConfig | dict | None = None,
    method: str = "merge",
    similarity: str = "cosine",
    merge_into_cls: bool = False,
    size_weighted: bool = False,
    keep_norm: bool | None = None,
    prop_attn: bool | None = None,
    trace_source: bool = False,
    seed: int = 0,
    input_size: Sequence[int] | None = None,
    score: str | None = None,
    visual_tokens: int | None = None,
    dense: bool = False,
) -> nn.Module:
    """Make a pretrained ViT cheaper in place: chosen blocks keep their most attended tokens and merge
    the rest into them (arXiv 2306.04897).

    In each chosen block, after the attention residual and before the MLP, the class token's attention
    row (post-softmax, averaged over heads) scores the patch tokens; the ``ceil(keep_rate * N_patch)``
    best are kept as crucial and every other token is merged into its most cosine-similar crucial token,
    weighted by the scores (eq. 4). Prefix tokens (class, distillation, registers) are never reduced.

    By default two corrections for merged tokens keep off-the-shelf accuracy far better: attention counts a merged
    token as the patches it holds (proportional attention, ``prop_attn``), and a merged token keeps the norm of its
    longest member (``keep_norm``); see the README for the measured effect on a real ImageNet DeiT-T (``python
    benchmarks/accuracy.py --imagenet``). The paper's literal version is ``prop_attn=False``, which turns both off
    (with ``size_weighted=False``, the default).

    Three ways to say how much to reduce (use one):

    - ``layers`` / ``keep_rate``: the blocks and their keep rates (default: the paper's blocks, 0.7);
    - ``flops=f``: a fraction of the unpatched model's FLOPs (:func:`count_flops` at the model's input size, the
      size it is built for, or at ``input_size``); a fixed rule (:func:`tokenmerge_patch.budget.budget_plan`, no
      data) picks the blocks and keep rates so the patched count lands in ``[f - 0.01, f]`` at that size;
    - ``config=plan``: a :class:`PatchConfig` (e.g. from :func:`calibrate` or ``patch_config(other)``), or its
      :meth:`~PatchConfig.to_dict`, applied exactly; the other options must then stay at their defaults.

    Args:
        model: a timm ``VisionTransformer`` (vit_*, deit_*, deit3_*, dinov2, register models, ...) built
            from timm's ``Block``/``Attention``, or a supported Hugging Face vision transformer.
        layers: 0-based indices of the reducing blocks; ``None`` for the paper's placement
            ``(d//4, d//2, 3d//4)``, i.e. ``(3, 6, 9)`` for 12 blocks.
        keep_rate: fraction of patch tokens each reducing block keeps, in (0, 1]: one float for all, or
            one per entry of ``layers``; ``None`` for 0.7.
        flops: a FLOPs budget in (0, 1) instead of ``layers``/``keep_rate``.
        config: a whole plan instead of everything else.
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
            the score alone (``"merge"`` only; off: measured a tie, slightly worse by KL).
        keep_norm: give each merged token the largest norm among the tokens merged into it, keeping eq. 4's
            direction (``"merge"`` only; a norm-preserving merge after ToFu's MLERP: the mean of dissimilar tokens
            is shorter than any of them, and the residual stream would carry it weakened). ``None``: on when
            ``method="merge"`` attends proportionally (the default), so ``prop_attn=False`` is the paper's eq. 4.
        prop_attn: proportional attention: after a reduction, attention adds ``log(size)`` to each key's
            logit (passed to SDPA as a float mask), so a merged token counts as the patches it holds.
            ``None``: on for ``"merge"`` and ``"bipartite"``; it does nothing for ``"drop"`` (every token is
            one patch) and is refused for ``"fuse"`` (EViT's fused token is a score-weighted sum, not a mean).
        trace_source: kept for compatibility and plans made before; source maps (which original patch ends in
            which token, see :func:`reduction_trace` and :func:`tokenmerge_patch.unmerge`) are always tracked
            now (a ``[B, N0]`` index gather per reduction: well under 1 % of a forward,
            ``benchmarks/source_overhead.py``).
        seed: seed of ``similarity="random"``.
        score: what picks the crucial tokens and weighs eq. 4: ``"cls"``, the class token's attention (the paper),
            or ``"received"``, the attention each token receives from every query (exact, for models without a class
            token such as SigLIP; it recomputes the block's attention matrix, half the attention's multiply-adds in
            each reducing block). ``None``: ``"cls"`` where the model has a class token, ``"received"`` where not.
            ``method="bipartite"`` needs no score.
        visual_tokens: of a vision-language model (LLaVA, PaliGemma), the image tokens per image its language model
            reads: the tower reduces to that many at the layer the LLM reads, in that layer alone (``layers=None``:
            the tower's features are computed on every patch) or in geometric steps over ``layers`` (all at or
            before it: fewer tower FLOPs too). Prompts must then carry as many image tokens per image
            (:func:`~tokenmerge_patch.visual_token_count`, :func:`~tokenmerge_patch.patch_processor`).
        dense: keep the full resolution: the residual stream keeps every patch, and each block from the first
            reduction on computes on merged tokens (the mean of each group's patches) and hands its update back to
            every patch of a group (merge, compute, unmerge per block, as token merging for Stable Diffusion). The
            groups come from the same scores and method, made in the reducing blocks and reused by the blocks between
            them. Outputs (hidden states, feature maps, ``forward_intermediates``) have the unpatched shapes and every
            patch its own features, for dense heads (segmentation, depth, saliency); the blocks cost what they cost
            with ``dense=False`` at the same plan. ``keep_norm``, ``size_weighted`` and ``merge_into_cls`` do not
            apply. Not for vision-language models (their language model reads fewer tokens).
        input_size: with ``flops``, the ``(C, H, W)`` the budget is counted at (``None``: the size the model is
            built for, see :func:`~tokenmerge_patch.describe`; e.g. ``(3, 224, 224)`` for a DINOv2 whose config
            says 518 but which runs at 224).

    Returns:
        ``model`` itself, patched (a ``torch.compile`` or ``DistributedDataParallel`` wrapper: the module it wraps
        is patched and the wrapper returned). Patching a patched model re-configures it.

    Raises:
        TypeError / ValueError: unsupported model, bad ``layers``/``keep_rate``/``flops``/``config``/... ,
            or two ways of saying how much to reduce; the model is then left exactly as it was.

    Example:
        >>> import timm, torch
        >>> model = timm.create_model("deit_tiny_patch16_224")
        >>> patch(model, layers=(3, 6, 9), keep_rate=0.7) is model
        True
        >>> model(torch.randn(1, 3, 224, 224)).shape
        torch.Size([1, 1000])
        >>> [r.tokens_out for r in reduction_trace(model).values()]
        [139, 98, 69]
        >>> from tokenmerge_patch import count_flops
        >>> patch(model, flops=0.6) is model  # a FLOPs budget: 60 % of the unpatched count
        True
        >>> 0.59 <= count_flops(model).total / count_flops(unpatch(model)).total <= 0.6
        True
    """
    given_model = model
    info = describe(model)
    model, backend, depth = info.model, info.backend, info.depth
    if input_size is not None and flops is None:
        raise ValueError("input_size= is the size a flops= budget is counted at: give it with flops=, or not at all")
    options = dict(
        method=method,
        similarity=similarity,
        merge_into_cls=merge_into_cls,
        size_weighted=size_weighted,
        keep_norm=keep_norm,
        prop_attn=prop_attn,
        trace_source=trace_source,
        seed=seed,
        score=score,
        dense=dense,
    )
    if visual_tokens is not None:
        from .vlm import visual_plan  # imports transformers: only for a VLM

        given = [n for n, v in (("keep_rate", keep_rate), ("flops", flops), ("config", config)) if v is not None]
        if given:
            raise ValueError(f"visual_tokens= says how much to reduce: give it without {', '.join(given)}")
        if info.backend.name != "hf-vlm":
            raise ValueError(
                f"visual_tokens applies to vision-language models (LLaVA, PaliGemma), not {type(model).__name__}"
            )
        base = _validated_config(info, None, 0.7, **options)
        plan = visual_plan(info, visual_tokens, layers, base)
    elif config is not None:
        given = [n for n, v in (("layers", layers), ("keep_rate", keep_rate), ("flops", flops)) if v is not None]
        given += [name for name, value in options.items() if value != _OPTION_DEFAULTS[name]]
        if given:
            raise ValueError(f"config= is a whole plan: give it alone, without {', '.join(given)}")
        if isinstance(config, dict):
            config = PatchConfig.from_dict(config)
        if not isinstance(config, PatchConfig):
            raise TypeError(f"config must be a PatchConfig or its to_dict(), got {type(config).__name__}")
        plan = config.validate(depth)
        plan = plan if plan.depth is not None else replace(plan, depth=depth)
    else:
        if flops is not None and (layers is not None or keep_rate is not None):
            raise ValueError("give either flops= (a FLOPs budget) or layers=/keep_rate=, not both")
        layers = None if flops is not None else layers
        plan = _validated_config(info, layers, 0.7 if keep_rate is None else keep_rate, **options)
        if flops is not None:
            fraction = check_fraction(flops, "flops")
            budget_info = info.taking(input_size)
            backend.check(model, replace(plan, layers=tuple(range(depth)), keep_rates=(1.0,) * depth))
            from .budget import budget_plan  # budget counts FLOPs, which needs this module

            plan = _with_previous_patch_restored(info, lambda: budget_plan(budget_info, fraction, plan))
    num_prefix = backend.check(model, plan)
    _install(model, backend, plan, num_prefix)
    return given_model


_OPTION_DEFAULTS = dict(
    method="merge",
    similarity="cosine",
    merge_into_cls=False,
    size_weighted=False,
    keep_norm=None,
    prop_attn=None,
    trace_source=False,
    seed=0,
    score=None,
    dense=False,
)


def _install(model: nn.Module, backend: Backend, plan: PatchConfig, num_prefix: int) -> None:
    """Replace whatever patch ``model`` has by ``plan`` (already checked by ``backend.check``)."""
    unpatch(model)
    state = TokenMergeState(plan, backend, num_prefix, len(backend.blocks(model)))
    try:
        backend.install(model, state)
        refuse_scripting(state, model)  # torch.jit.script: a clear error instead of an internal one
    except BaseException:
        state.uninstall()  # never leave a half-installed patch behind
        raise
    model.__dict__[ATTRIBUTE] = state


def _with_previous_patch_restored(info: ModelInfo, search):
    """Run ``search()`` (which patches the model with trial plans) and put back the patch the model had before,
    with the trace of its last forward, whether the search succeeds or fails."""
    model, backend = info.model, info.backend
    previous = _state(model)
    records = None if previous is None else previous.records  # unpatching clears them: keep the dict itself
    try:
        return search()
    finally:
        if previous is None:
            unpatch(model)
        else:
            _install(model, backend, previous.config, backend.check(model, previous.config))
            _state(model).records = records


def _validated_config(
    info: ModelInfo,
    layers: LayerSpec,
    keep_rate: KeepRateSpec,
    *,
    prop_attn: bool | None,
    keep_norm: bool | None = None,
    score: str | None = None,
    **options: object,
) -> PatchConfig:
    """``patch``'s arguments as a checked plan (``layers``/``keep_rate`` by ``resolve_plan``, the options by
    :meth:`PatchConfig.validate`; ``prop_attn=None`` is on for merge and bipartite, ``keep_norm=None`` for merge
    with proportional attention, ``score=None`` is the class token's attention where the model has one)."""
    method = options.get("method", "merge")
    if prop_attn is None:
        prop_attn = method in ("merge", "bipartite")
    if keep_norm is None:  # dense=True: no merged token is carried on, so there is no norm to keep
        keep_norm = method == "merge" and prop_attn is True and not options.get("dense", False)
    if score is None:
        score = "cls" if info.class_token else "received"
    checked = PatchConfig(
        layers=(0,), keep_rates=(1.0,), prop_attn=prop_attn, keep_norm=keep_norm, score=score, **options
    )
    checked = checked.validate()
    depth = info.depth
    plan = resolve_plan(depth, layers, keep_rate)
    return replace(
        checked,
        layers=tuple(layer for layer, _ in plan),
        keep_rates=tuple(rate for _, rate in plan),
        depth=depth,
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
        del unwrap(model).__dict__[ATTRIBUTE]
    return model


def patched_layers(model: nn.Module) -> Sequence[int]:
    """The reducing block indices of a patched model (empty if unpatched)."""
    state = _state(model)
    return () if state is None else state.config.layers


@torch.no_grad()
def token_counts(model: nn.Module, example: Tensor) -> list[int]:
    """Tokens leaving each block for one forward of ``example`` (patched or not; of a multimodal model, its image
    side).

    >>> import timm, torch
    >>> model = patch(timm.create_model("deit_small_patch16_224"), keep_rate=0.7)
    >>> token_counts(model, torch.randn(1, 3, 224, 224))[2:5]
    [197, 139, 139]
    """
    info = describe(model)
    counts: list[int] = []
    handles = [
        block.register_forward_hook(lambda _m, _i, out: counts.append(info.backend.tokens_of(out)))
        for block in info.backend.blocks(info.model)
    ]
    try:
        info.images(example)
    finally:
        for handle in handles:
            handle.remove()
    return counts
