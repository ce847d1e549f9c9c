"""Hugging Face transformers (>= 5) backend: ViT, DeiT, Dinov2 (with or without registers), DINOv3 ViT, CLIP vision
models and the whole ``CLIPModel`` (its vision tower is patched; the text tower is left alone).

Where the scores come from: the layer's own attention module runs unchanged (``sdpa`` stays fused, ``eager``
still returns its weights); its queries and keys are read as they leave ``q_proj`` / ``k_proj`` and only the
class row is recomputed from them. Where the reduction happens: a reducing layer gets an instance-level
``forward`` that calls the layer's own submodules in its own order (pre-norm, attention, [LayerScale,
drop path,] residual), reduces, then runs the MLP half. Layer, attention and model classes stay the same, so
``output_hidden_states`` / ``output_attentions`` capture (forward hooks keyed by class) keeps working.

Rotary positions (DINOv3): the model computes its ``(cos, sin)`` tables once per forward, one row per patch, and
passes them to every layer as ``position_embeddings``. The projections' outputs are before the rotation, so a
reducing layer rotates the queries and keys it read with the model's own ``apply_rotary_pos_emb``; and from the
first reduction on, each layer gets the rows of its surviving tokens (the positions their record carries, see
:func:`tokenmerge_patch.reduce.move_positions`; EViT's fused token gets ``cos = 1, sin = 0``, no rotation).

Example:
    >>> import torch, tokenmerge_patch as tm
    >>> from transformers import ViTConfig, ViTForImageClassification
    >>> config = ViTConfig(image_size=32, patch_size=4, hidden_size=32, num_hidden_layers=4,
    ...                    num_attention_heads=2, intermediate_size=64, num_labels=3)
    >>> model = tm.patch(ViTForImageClassification(config).eval(), layers=(1, 2), keep_rate=0.5)
    >>> out = model(torch.randn(2, 3, 32, 32), output_hidden_states=True)
    >>> out.logits.shape, [h.shape[1] for h in out.hidden_states]
    (torch.Size([2, 3]), [65, 65, 33, 17, 17])
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from functools import cache, partial, reduce
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor, nn

from ..dense import unmerge
from ..records import TokenRecord, computed_tokens, record_of, record_positions, record_sizes
from ..reduce import exporting, rotary_rows, size_weighted_mean
from .shared import (
    LaterBlockForward,
    OutputTap,
    RecordKeepingNorm,
    ReducingBlockForward,
    check_device,
    check_overridable,
    read_taps,
    refuse_masks,
)

if TYPE_CHECKING:
    from ..patch import PatchConfig, TokenMergeState

SUPPORTED_HF = (
    "transformers ViTModel, ViTForImageClassification, DeiTModel, DeiTForImageClassification, "
    "DeiTForImageClassificationWithTeacher, Dinov2Model, Dinov2ForImageClassification, Dinov2Backbone, "
    "Dinov2WithRegistersModel, Dinov2WithRegistersForImageClassification, DINOv3ViTModel, CLIPVisionModel, "
    "CLIPVisionModelWithProjection, CLIPModel, SiglipVisionModel and SiglipModel (their vision tower; and subclasses "
    "that keep their forward)"
)
# families refused for a reason worth saying (matched on the class name's start)
WHY_NOT = {
    "Siglip2": "SigLIP 2 runs at variable resolutions with a padding mask over its patches, which a patched layer "
    "cannot honour; SigLIP (SiglipVisionModel, SiglipModel) is supported",
}


class LayerLayout(NamedTuple):
    """Names of a layer's submodules in the order its forward calls them, and of its attention's scale."""

    norm1: str
    attention: str
    after_attention: tuple[str, ...]  # applied to the attention output before the residual
    norm2: str
    mlp: str
    after_mlp: tuple[str, ...]
    scale: str


VIT_LAYOUT = LayerLayout(
    "layernorm_before", "attention", ("dropout",), "layernorm_after", "mlp", ("dropout",), "scaling"
)
DINOV2_LAYOUT = LayerLayout(
    "norm1", "attention", ("layer_scale1", "drop_path"), "norm2", "mlp", ("layer_scale2", "drop_path"), "scaling"
)
CLIP_LAYOUT = LayerLayout("layer_norm1", "self_attn", (), "layer_norm2", "mlp", (), "scale")


class _Registry(NamedTuple):
    models: dict[type, int]  # supported top-level class -> number of prefix tokens (before register tokens)
    no_class_token: tuple[type, ...]  # top-level classes whose towers have no class token (their prefix count is 0)
    backbones: dict[type, tuple[str, ...]]  # model.base_model class -> attribute path of its layer list
    layers: dict[type, tuple[LayerLayout, type]]  # layer class -> its layout and attention class
    concat_mean: tuple[type, ...]  # classifier input is cat([cls, mean of patch tokens])
    towers: dict[type, str]  # multimodal model class -> attribute of its vision backbone (else model.base_model)
    rotary: dict[type, Callable]  # layer class -> the model's apply_rotary_pos_emb(q, k, cos, sin)
    top_norms: dict[type, str]  # top-level class -> its final norm, when it is not base_model.layernorm
    dense: type  # a backbone returning feature maps made from its encoder's hidden states


@cache
def _registry() -> _Registry:
    # Imported on first use: claims() only gets here for a transformers model, so timm users never pay for it.
    from transformers.models.clip import modeling_clip as clip
    from transformers.models.deit import modeling_deit as deit
    from transformers.models.dinov2 import modeling_dinov2 as dinov2
    from transformers.models.dinov2_with_registers import modeling_dinov2_with_registers as registers
    from transformers.models.dinov3_vit import modeling_dinov3_vit as dinov3
    from transformers.models.siglip import modeling_siglip as siglip
    from transformers.models.vit import modeling_vit as vit

    models = {vit.ViTModel: 1, vit.ViTForImageClassification: 1, dinov2.Dinov2Model: 1, dinov2.Dinov2Backbone: 1}
    models |= {dinov2.Dinov2ForImageClassification: 1, clip.CLIPVisionModel: 1, clip.CLIPVisionModelWithProjection: 1}
    # every DeiT embedding appends the distillation token: class + distillation token are both prefix tokens
    models |= {deit.DeiTModel: 2, deit.DeiTForImageClassification: 2, deit.DeiTForImageClassificationWithTeacher: 2}
    # + config.num_register_tokens (see _resolve); CLIPModel: the class token of its vision tower
    models |= {registers.Dinov2WithRegistersModel: 1, registers.Dinov2WithRegistersForImageClassification: 1}
    models |= {clip.CLIPModel: 1}
    # DINOv3: class token, then the register tokens; no absolute position embedding, rotary tables for the patches
    models[dinov3.DINOv3ViTModel] = 1
    # SigLIP: patch tokens only (its head pools them by attention)
    models |= {siglip.SiglipVisionModel: 0, siglip.SiglipModel: 0}
    no_class_token = (siglip.SiglipVisionModel, siglip.SiglipModel)
    backbones = {
        vit.ViTModel: ("layers",),
        deit.DeiTModel: ("layers",),
        dinov2.Dinov2Model: ("encoder", "layer"),
        registers.Dinov2WithRegistersModel: ("encoder", "layer"),
        dinov2.Dinov2Backbone: ("encoder", "layer"),  # its own base model
        clip.CLIPVisionModel: ("encoder", "layers"),
        siglip.SiglipVisionModel: ("encoder", "layers"),
        dinov3.DINOv3ViTEncoder: ("layer",),  # DINOv3ViTModel.base_model is its encoder (base_model_prefix "model")
    }
    layers = {
        vit.ViTLayer: (VIT_LAYOUT, vit.ViTAttention),
        deit.DeiTLayer: (VIT_LAYOUT, deit.DeiTAttention),
        dinov2.Dinov2Layer: (DINOV2_LAYOUT, dinov2.Dinov2Attention),
        registers.Dinov2WithRegistersLayer: (DINOV2_LAYOUT, registers.Dinov2WithRegistersAttention),
        clip.CLIPEncoderLayer: (CLIP_LAYOUT, clip.CLIPAttention),
        dinov3.DINOv3ViTLayer: (DINOV2_LAYOUT, dinov3.DINOv3ViTAttention),
        siglip.SiglipEncoderLayer: (CLIP_LAYOUT, siglip.SiglipAttention),
    }
    rotary = {dinov3.DINOv3ViTLayer: dinov3.apply_rotary_pos_emb}
    top_norms = {dinov3.DINOv3ViTModel: "norm", siglip.SiglipVisionModel: "post_layernorm"}
    concat_mean = (dinov2.Dinov2ForImageClassification, registers.Dinov2WithRegistersForImageClassification)
    towers = {clip.CLIPModel: "vision_model", siglip.SiglipModel: "vision_model"}
    return _Registry(
        models, no_class_token, backbones, layers, concat_mean, towers, rotary, top_norms, dinov2.Dinov2Backbone
    )


def _known_base(cls: type, table: dict[type, object]) -> type | None:
    """The class of ``table`` that ``cls`` is (or subclasses without changing its forward), else ``None``."""
    base = next((c for c in cls.__mro__ if c in table), None)
    return base if base is not None and _unwrapped(cls.forward) is _unwrapped(base.forward) else None


def _unwrapped(forward: object) -> object:
    """Peel the activation-checkpointing wrappers transformers puts on every layer subclass's forward (FSDP2
    makes such subclasses), and nothing else."""
    while getattr(getattr(forward, "__code__", None), "co_name", "") == "forward_with_checkpointing":
        forward = forward.__wrapped__
    return forward


def _resolve(model: nn.Module) -> tuple[nn.Module, nn.ModuleList, int, bool]:
    """The (vision) backbone (``model.base_model``, ``CLIPModel.vision_model``), its layer list, the number of
    prefix tokens (class [+ distillation] token, then the backbone's register tokens) and whether the first is a
    class token."""
    registry = _registry()
    top = _known_base(type(model), registry.models)
    tower = None if top is None else registry.towers.get(top)
    backbone = getattr(model, "base_model" if tower is None else tower, None)
    kind = None if backbone is None else _known_base(type(backbone), registry.backbones)
    if top is None or kind is None:
        name = type(model).__name__
        reason = next((f" ({why})" for start, why in WHY_NOT.items() if name.startswith(start)), "")
        raise TypeError(f"tokenmerge_patch supports {SUPPORTED_HF}; got {name}{reason}")
    num_prefix = registry.models[top] + int(getattr(backbone.config, "num_register_tokens", 0) or 0)
    class_token = not issubclass(top, registry.no_class_token)
    return backbone, reduce(getattr, registry.backbones[kind], backbone), num_prefix, class_token


def _sequence_norm(model: nn.Module, backbone: nn.Module) -> nn.Module | None:
    """The norm applied to the whole sequence after the last layer (it keeps the record), if the model has one."""
    registry = _registry()
    for owner in (model, backbone):  # the model's own (DINOv3), or its tower's (SigLIP's post_layernorm)
        top = next((cls for cls in type(owner).__mro__ if cls in registry.top_norms), None)
        if top is not None:
            norm = getattr(owner, registry.top_norms[top])
            return norm if isinstance(norm, nn.Module) else None
    norm = getattr(backbone, "layernorm", None)
    return norm if isinstance(norm, nn.Module) else None


def _attention_head(backbone: nn.Module) -> nn.Module | None:
    """SigLIP's attention-pooling head, if the tower uses it."""
    return getattr(backbone, "head", None) if getattr(backbone, "use_head", False) else None


def _rotary(layer: nn.Module) -> Callable | None:
    """The model's ``apply_rotary_pos_emb`` if ``layer`` takes rotary ``position_embeddings``, else ``None``."""
    rotary = _registry().rotary
    return next((rotary[cls] for cls in type(layer).__mro__ if cls in rotary), None)


def _surviving_rotary(kwargs: dict, record: TokenRecord | None) -> dict:
    """``kwargs`` with ``position_embeddings = (cos, sin)`` cut to the rows of the tokens ``record`` describes."""
    positions = record_positions(record)
    tables = kwargs.get("position_embeddings")
    if positions is None or tables is None:
        return kwargs
    cos, sin = tables
    cos = rotary_rows(cos, positions, cos.new_ones(cos.shape[-1]))
    sin = rotary_rows(sin, positions, sin.new_zeros(sin.shape[-1]))
    return {**kwargs, "position_embeddings": (cos, sin)}


def _layout(layer: nn.Module, index: int | None = None) -> LayerLayout:
    """Where ``layer``'s parts are; ``TypeError`` unless its layer and attention classes are known."""
    registry = _registry()
    kind = _known_base(type(layer), registry.layers)
    where = "this layer" if index is None else f"layer {index}"
    if kind is None:
        names = ", ".join(cls.__name__ for cls in registry.layers)
        raise TypeError(f"{where} is {type(layer).__name__}; tokenmerge_patch supports {names}")
    layout, attention_class = registry.layers[kind]
    attention = getattr(layer, layout.attention, None)
    if _known_base(type(attention), {attention_class: None}) is None:
        raise TypeError(
            f"{where}'s attention is {type(attention).__name__}; tokenmerge_patch supports "
            f"{attention_class.__name__} (and subclasses that keep its forward)"
        )
    return layout


def _mask_outside_export(mask: Tensor | None) -> Tensor | None:
    """The mask a layer got, or ``None`` under ``torch.export`` / ``torch.onnx.export``: there transformers cannot
    look at a mask's values, so for a model called without ``attention_mask`` it materialises the all-visible
    ``[B, 1, N, N]`` mask that it skips (``None``) in eager. A patched layer cannot honour a full-sequence mask
    anyway (eager refuses a real one), so export the model called with the image alone."""
    return None if exporting() else mask


class ReducingLayerForward(ReducingBlockForward):
    """Replaces a reducing layer's ``forward`` (forward hooks on the layer, such as ``output_hidden_states`` capture,
    see the reduced output)."""

    def __init__(self, layer: nn.Module, state: TokenMergeState, index: int, layout: LayerLayout) -> None:
        super().__init__(layer, state, index)
        self.layout = layout
        attention = getattr(layer, layout.attention)
        # q and k are read as they leave q_proj / k_proj, whose forwards are taps installed next to this one
        self.taps = (OutputTap(attention.q_proj), OutputTap(attention.k_proj))
        self.rotary = _rotary(layer)

    def __call__(self, hidden_states: Tensor, attention_mask: Tensor | None = None, **kwargs: object) -> Tensor:
        refuse_masks(self.layer, _mask_outside_export(attention_mask), name="attention_mask")
        check_device(hidden_states, getattr(self.block, self.layout.attention).q_proj.weight)
        layer = self.block
        # what the class-level forward would have done (HF's wrapper also skips checkpointing without grad)
        if layer.gradient_checkpointing and layer.training and torch.is_grad_enabled():
            return layer._gradient_checkpointing_func(partial(self.run, call=kwargs), hidden_states)
        return self.run(hidden_states, kwargs)

    def attention_half(
        self, x: Tensor, record: TokenRecord | None, bias: Tensor | None, kwargs: dict
    ) -> tuple[Tensor, Tensor, Tensor, float]:
        layer, layout = self.block, self.layout
        attention = getattr(layer, layout.attention)
        if self.rotary is not None:
            kwargs = _surviving_rotary(kwargs, record)
        normed = getattr(layer, layout.norm1)(x)
        y, taken = read_taps(self.taps, lambda: attention(normed, attention_mask=bias, **kwargs)[0])
        # [B, N, H * d] -> [B, H, N, d], as the attention itself reshapes them
        q, k = (t.unflatten(-1, (-1, attention.head_dim)).transpose(1, 2) for t in taken)
        if self.rotary is not None:  # the projections' outputs are not rotated yet: as the attention does
            q, k = self.rotary(q, k, *kwargs["position_embeddings"])
        for name in layout.after_attention:
            y = getattr(layer, name)(y)
        return y, q, k, getattr(attention, layout.scale)

    def mlp_half(self, x: Tensor) -> Tensor:
        layer, layout = self.block, self.layout
        y = getattr(layer, layout.mlp)(getattr(layer, layout.norm2)(x))
        for name in layout.after_mlp:
            y = getattr(layer, name)(y)
        return y


class LaterLayerForward(LaterBlockForward):
    """A layer after the first reduction that does not reduce itself: runs its own forward (with ``prop_attn``,
    with ``log(size)`` as the additive attention mask: sdpa and eager both add a float mask to the logits) and
    passes the tokens' record on to its output."""

    def __init__(self, layer: nn.Module, state: TokenMergeState, index: int) -> None:
        super().__init__(layer, state, index)
        self.rotary = _rotary(layer)

    def compute(
        self, x: Tensor, record: TokenRecord | None, attention_mask: Tensor | None = None, **kwargs: object
    ) -> Tensor | tuple:
        attention_mask = _mask_outside_export(attention_mask)
        if self.rotary is not None:
            kwargs = _surviving_rotary(kwargs, record)
        bias = self.state.attention_bias(record, x)
        if bias is not None:
            refuse_masks(self.layer, attention_mask, name="attention_mask")
            attention_mask = bias
        return type(self.block).forward(self.block, x, attention_mask, **kwargs)


class SizeWeightedPatchMean:
    """Dinov2[WithRegisters]ForImageClassification feeds its classifier ``cat([cls, patch_tokens.mean(1)])`` (patch
    tokens: after the class and register tokens); after a merge that mean must count each token as the patches it
    holds. :meth:`keep` replaces the backbone's ``layernorm.forward`` (keeping the
    record, as :class:`RecordKeepingNorm`) and hands the final tokens to ``__call__``, which replaces
    ``classifier.forward`` and swaps in the size-weighted mean. The hand-over is a stack, so a call that re-enters the
    model between the two (a hook) takes its own tokens, not the outer call's."""

    def __init__(self, model: nn.Module, state: TokenMergeState) -> None:
        self.model, self.state = model, state
        self.norm = RecordKeepingNorm(model.base_model.layernorm, state)
        self.pending: list[Tensor] = []

    def keep(self, x: Tensor) -> Tensor:
        tokens = self.norm(x)
        # the backbone run alone never reaches the classifier: keep only the newest few
        self.pending = [*self.pending[-3:], tokens]
        return tokens

    def __call__(self, linear_input: Tensor) -> Tensor:
        tokens = self.pending.pop() if self.pending else None  # used once: no stale tokens, no graph kept alive
        sizes = None if tokens is None else record_sizes(record_of(tokens))
        if sizes is not None and linear_input.shape == (tokens.shape[0], 2 * tokens.shape[2]):
            start = self.state.num_prefix
            mean = size_weighted_mean(tokens[:, start:], sizes[:, start:])
            linear_input = torch.cat([linear_input[:, : tokens.shape[2]], mean], dim=1)
        classifier = self.model.classifier
        return type(classifier).forward(classifier, linear_input)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "pending": []}  # per-forward, not part of the model


class ImageFeatures(nn.Module):
    """``get_image_features(pixel_values)`` of a ``CLIPModel`` / ``SiglipModel`` as a module of images alone, made of
    the model's own vision tower and projection (not a copy): what :func:`~tokenmerge_patch.count_flops` and
    :func:`~tokenmerge_patch.patch.token_counts` run for those models, whose forward wants text too."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.vision_model = model.vision_model
        self.visual_projection = getattr(model, "visual_projection", nn.Identity())  # SigLIP: none

    def forward(self, pixel_values: Tensor) -> Tensor:
        return self.visual_projection(self.vision_model(pixel_values=pixel_values).pooler_output)


class SizeWeightedAttentionPool:
    """Replaces the forward of SigLIP's attention-pooling head (``SiglipMultiheadAttentionPoolingHead``: a learned
    probe attends over every token, then a LayerNorm and an MLP with a residual): after a merge each key counts as the
    patches it holds (a ``log(size)`` bias on its logit, as proportional attention), so ``keep_rate=1.0`` is exact and
    a token merged from ``s`` equal patches pools as they would."""

    def __init__(self, head: nn.Module) -> None:
        self.head = head

    def __call__(self, hidden_state: Tensor) -> Tensor:
        head = self.head
        sizes = record_sizes(record_of(hidden_state))
        if sizes is None:
            return type(head).forward(head, hidden_state)
        batch, heads = hidden_state.shape[0], head.attention.num_heads
        probe = head.probe.repeat(batch, 1, 1)
        # nn.MultiheadAttention adds a float mask of [B * heads, queries, keys] to the logits
        bias = sizes.log().to(hidden_state.dtype)[:, None, :].repeat_interleave(heads, dim=0)
        pooled = head.attention(probe, hidden_state, hidden_state, attn_mask=bias, need_weights=False)[0]
        pooled = pooled + head.mlp(head.layernorm(pooled))
        return pooled[:, 0]


class UnmergedHiddenStates:
    """Replaces ``Dinov2Backbone.encoder.forward``: the backbone builds its feature maps from the encoder's hidden
    states in its own code (optionally normalised, then the class token cut off and the patch tokens reshaped to the
    grid, or the sequence handed to a head such as DPT's). After a reducing layer those hidden states are unmerged
    (:func:`tokenmerge_patch.unmerge`, by the record each one carries), so the backbone's code finds the full sequence
    and its ``feature_maps`` and ``hidden_states`` have the unpatched shapes: every patch gets its token's features.
    The layers themselves still pass the reduced tokens on."""

    def __init__(self, encoder: nn.Module, state: TokenMergeState) -> None:
        self.encoder, self.state = encoder, state

    def __call__(self, *args: object, **kwargs: object) -> object:
        output = type(self.encoder).forward(self.encoder, *args, **kwargs)
        hidden_states = getattr(output, "hidden_states", None)
        if isinstance(hidden_states, tuple):
            output.hidden_states = tuple(self._unmerge(h) for h in hidden_states)
        return output

    def _unmerge(self, hidden_state: Tensor) -> Tensor:
        record = record_of(hidden_state)  # None before the first reducing layer: the full sequence already
        return hidden_state if record is None else unmerge(hidden_state, record, num_prefix=self.state.num_prefix)


class HFBackend:
    name = "hf"

    def claims(self, model: nn.Module) -> bool:
        # A transformers model implies transformers.modeling_utils is imported; never import it for timm users.
        modeling_utils = sys.modules.get("transformers.modeling_utils")
        return modeling_utils is not None and isinstance(model, modeling_utils.PreTrainedModel)

    def blocks(self, model: nn.Module) -> Sequence[nn.Module]:
        return _resolve(model)[1]

    def check(self, model: nn.Module, config: PatchConfig) -> int:
        backbone, layers, num_prefix, class_token = _resolve(model)
        if config.needs_class_token and not class_token:
            raise ValueError(
                f"{type(model).__name__} has no class token (its head pools every token by attention), so there is no "
                "class-attention score to select tokens by: patch it with score='received' (the default for such "
                "models: the attention each token receives) or method='bipartite', and without merge_into_cls"
            )
        norm = _sequence_norm(model, backbone)
        if norm is not None:
            check_overridable(norm, "the backbone's layernorm", (RecordKeepingNorm, SizeWeightedPatchMean))
        if (head := _attention_head(backbone)) is not None:
            check_overridable(head, "the tower's attention-pooling head", (SizeWeightedAttentionPool,))
        for index in (*config.layers, *config.proportional_layers(len(layers))):
            layout = _layout(layers[index], index)
            attention = getattr(layers[index], layout.attention)
            implementation = attention.config._attn_implementation
            if config.prop_attn and implementation not in ("sdpa", "eager"):
                raise ValueError(
                    f"prop_attn needs attn_implementation 'sdpa' or 'eager' (a float attention mask); layer {index} "
                    f"uses {implementation!r}: call model.set_attn_implementation('sdpa') first, or patch with "
                    "prop_attn=False (add keep_norm=True to keep the norm-keeping merge, which prop_attn=False turns "
                    "off with it)"
                )
            for name in ("q_proj", "k_proj"):
                check_overridable(getattr(attention, name), f"layer {index}'s {name}", (OutputTap,))
        for index in (*config.layers, *config.later_layers(len(layers))):
            check_overridable(layers[index], f"layer {index}", (ReducingLayerForward, LaterLayerForward))
        if isinstance(model, _registry().dense):
            check_overridable(model.encoder, "the backbone's encoder", (UnmergedHiddenStates,))
        return num_prefix

    def install(self, model: nn.Module, state: TokenMergeState) -> None:
        backbone, layers, _, _ = _resolve(model)
        config = state.config
        for index in config.layers:
            layer = layers[index]
            forward = ReducingLayerForward(layer, state, index, _layout(layer, index))
            state.override(layer, "forward", forward)
            for tap in forward.taps:
                state.override(tap.module, "forward", tap)
        for index in config.later_layers(len(layers)):  # pass the record on (with prop_attn: log(size) masks)
            state.override(layers[index], "forward", LaterLayerForward(layers[index], state, index))
        if isinstance(model, _registry().dense):  # feature maps: unmerged back to the full patch grid
            state.override(model.encoder, "forward", UnmergedHiddenStates(model.encoder, state))
        elif isinstance(model, _registry().concat_mean):
            pool = SizeWeightedPatchMean(model, state)
            state.override(backbone.layernorm, "forward", pool.keep)
            state.override(model.classifier, "forward", pool)
        elif (norm := _sequence_norm(model, backbone)) is not None:  # ViT, DeiT, Dinov2, DINOv3, SigLIP
            state.override(norm, "forward", RecordKeepingNorm(norm, state))
        if (head := _attention_head(backbone)) is not None:  # SigLIP's attention pooling: size-aware
            state.override(head, "forward", SizeWeightedAttentionPool(head))

    def image_model(self, model: nn.Module) -> nn.Module:
        """The module that maps images to the model's image output: the model itself, except for ``CLIPModel`` and
        ``SiglipModel`` (their image features)."""
        if _known_base(type(model), _registry().towers) is not None:
            return ImageFeatures(model)
        return model

    def num_prefix(self, model: nn.Module) -> int:
        return _resolve(model)[2]

    def has_class_token(self, model: nn.Module) -> bool:
        return _resolve(model)[3]

    def input_size(self, model: nn.Module) -> tuple[int, int, int]:
        config = _resolve(model)[0].config
        size = config.image_size
        height, width = (size, size) if isinstance(size, int) else size
        return int(config.num_channels), int(height), int(width)

    def class_token_head(self, model: nn.Module) -> bool:
        # classifiers on the class (and distillation) token, and CLIP's projected class token; base models return
        # every token and Dinov2ForImageClassification also averages the patch tokens
        names = ("ViTForImageClassification", "DeiTForImageClassification", "CLIPVisionModelWithProjection")
        names += ("CLIPModel",)  # its image features: the projected class token
        return any(cls.__name__.startswith(names) for cls in type(model).__mro__ if cls in _registry().models)

    def tokens_of(self, block_output: object) -> int:
        return computed_tokens(block_output[0] if isinstance(block_output, (tuple, list)) else block_output)

    def block_parts(self, block: nn.Module) -> tuple[nn.Module, nn.Module, int]:
        layout = _layout(block)
        attention = getattr(block, layout.attention)
        return attention, getattr(block, layout.mlp), attention.q_proj.out_features


BACKEND = HFBackend()
