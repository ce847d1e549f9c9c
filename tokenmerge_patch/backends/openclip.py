"""open_clip backend: ``open_clip.transformer.VisionTransformer`` (``model.visual`` of
``open_clip.create_model("ViT-*")``), patched on its own or inside the whole CLIP model (``encode_image`` and the
model's forward with text; the text tower is left alone).

Where the scores come from: open_clip's default block (``ResidualAttentionBlock``) attends with
``nn.MultiheadAttention``, whose queries and keys never leave a submodule (``F.multi_head_attention_forward`` projects
them inside). A reducing block (and, with ``prop_attn``, a block after one) therefore computes that self-attention
itself from the same weights, exactly as ``nn.MultiheadAttention`` defines it: one ``in_proj`` matmul, fused
``scaled_dot_product_attention``, ``out_proj``; the class row comes from those queries and keys. (A per-image float
mask over the keys, what ``prop_attn`` adds, cannot be given to ``nn.MultiheadAttention`` without expanding it to
``[B * heads, N, N]``.) open_clip's own ``Attention`` (``CustomResidualAttentionBlock``: qk-norm, scaled heads, ...)
runs unchanged: its queries and keys are read as they leave ``ln_q`` / ``ln_k``, like timm's ``q_norm`` / ``k_norm``.
Where the reduction happens: between ``x + ls_1(attn(ln_1(x)))`` and the MLP half of the block.

Pooling: ``pool_type="tok"`` (the class token, every open_clip ViT-* model) and ``"avg"`` (the mean of the patch
tokens, made size-weighted) are supported; attentional pooling (CoCa) and ``"none"`` are refused.

Example:
    >>> import torch, open_clip, tokenmerge_patch as tm
    >>> model = open_clip.model.CLIP(embed_dim=8, vision_cfg=dict(image_size=32, patch_size=4, width=32, layers=4,
    ...     head_width=16), text_cfg=dict(context_length=8, vocab_size=50, width=32, heads=2, layers=2)).eval()
    >>> _ = tm.patch(model, layers=(1, 2), keep_rate=0.5)
    >>> model.encode_image(torch.randn(2, 3, 32, 32)).shape, tm.token_counts(model, torch.randn(1, 3, 32, 32))
    (torch.Size([2, 8]), [65, 33, 17, 17])
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch.nn.functional as F
from torch import Tensor, nn

from ..dense import intermediate_map
from ..records import computed_tokens, record_of, record_sizes
from ..reduce import size_weighted_mean
from . import shared
from .shared import OutputTap, RecordKeepingNorm, check_device, check_overridable, read_taps, refuse_masks

if TYPE_CHECKING:
    from ..patch import PatchConfig, TokenMergeState

SUPPORTED_OPENCLIP = (
    "open_clip VisionTransformer image towers (pool_type 'tok' or 'avg', no attentional pooler) built from "
    "ResidualAttentionBlock (nn.MultiheadAttention) or CustomResidualAttentionBlock (open_clip's Attention, without "
    "scaled cosine attention), alone or as the .visual of an open_clip CLIP / CustomTextCLIP model"
)


def _transformer_module():
    from open_clip import transformer  # only reached for an object whose class comes from open_clip

    return transformer


def _visual(model: nn.Module) -> nn.Module:
    """The open_clip ``VisionTransformer`` of ``model`` (the model itself, or its ``.visual``)."""
    oc = _transformer_module()
    visual = model if isinstance(model, oc.VisionTransformer) else getattr(model, "visual", None)
    if not isinstance(visual, oc.VisionTransformer):
        what = type(visual).__name__ if isinstance(visual, nn.Module) else "no .visual"
        trunk = getattr(visual, "trunk", None)  # open_clip's TimmModel wraps a timm model
        hint = f" (its .trunk is a timm {type(trunk).__name__}: patch that)" if isinstance(trunk, nn.Module) else ""
        raise TypeError(f"tokenmerge_patch supports {SUPPORTED_OPENCLIP}; got {type(model).__name__} with {what}{hint}")
    if type(visual).forward is not oc.VisionTransformer.forward:
        raise TypeError(
            f"{type(visual).__name__} replaces VisionTransformer.forward; tokenmerge_patch supports "
            f"{SUPPORTED_OPENCLIP}"
        )
    return visual


def mha_self_attention(mha: nn.MultiheadAttention, x: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """``mha(x, x, x, need_weights=False)[0]`` for batch-first ``x`` ``[B, N, C]``, written out (one ``in_proj`` matmul,
    SDPA with ``bias`` ``[B, 1, 1, N]`` added to the logits, ``out_proj``), returning the queries and keys
    ``[B, H, N, d]`` with it."""
    heads = mha.num_heads
    qkv = F.linear(x, mha.in_proj_weight, mha.in_proj_bias)  # [B, N, 3C]
    q, k, v = qkv.unflatten(-1, (3, heads, -1)).permute(2, 0, 3, 1, 4)  # each [B, H, N, d]
    dropout = mha.dropout if mha.training else 0.0
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=None if bias is None else bias.to(q.dtype), dropout_p=dropout
    )
    return mha.out_proj(out.transpose(1, 2).flatten(2)), q, k


def _is_custom(block: nn.Module) -> bool:
    return isinstance(block, _transformer_module().CustomResidualAttentionBlock)


def _attention(block: nn.Module, x: Tensor, bias: Tensor | None) -> Tensor:
    """The attention branch of ``block`` before its LayerScale, with ``bias`` as the additive key mask."""
    if _is_custom(block):
        return block.ln_attn(block.attn(x, attn_mask=bias))
    return mha_self_attention(block.attn, x, bias)[0]


def _refuse_extra(layer: int, args: tuple, kwargs: dict) -> None:
    """open_clip calls a block as ``blk(x, attn_mask=None)`` (or ``checkpoint(blk, x, None, None, None)``); a mask or
    separate keys and values cannot be honoured once tokens are reduced."""
    extra = [*args, *kwargs.values()]
    refuse_masks(layer, next((a for a in extra if a is not None), None), name="attn_mask / k_x / v_x")


class ReducingBlockForward(shared.ReducingBlockForward):
    """Replaces a reducing block's ``forward``."""

    def __init__(self, block: nn.Module, state: TokenMergeState, layer: int) -> None:
        super().__init__(block, state, layer)
        # open_clip's Attention: q and k are read as they leave ln_q / ln_k (taps installed next to this forward)
        self.taps = (OutputTap(block.attn.ln_q), OutputTap(block.attn.ln_k)) if _is_custom(block) else ()

    def __call__(self, x: Tensor, *args: object, **kwargs: object) -> Tensor:
        _refuse_extra(self.layer, args, kwargs)
        check_device(x, self.block.mlp.c_fc.weight)
        return self.run(x)

    def attention_half(
        self, x: Tensor, record: tuple | None, bias: Tensor | None, call: object
    ) -> tuple[Tensor, Tensor, Tensor, float]:
        block = self.block
        normed = block.ln_1(x)
        if self.taps:
            attn = block.attn
            y, (q, k) = read_taps(self.taps, lambda: block.ln_attn(attn(normed, attn_mask=bias)))
            scale = attn.scale
        else:
            y, q, k = mha_self_attention(block.attn, normed, bias)
            scale = block.attn.head_dim**-0.5
        return block.ls_1(y), q, k, scale

    def mlp_half(self, x: Tensor) -> Tensor:
        block = self.block
        return block.ls_2(block.mlp(block.ln_2(x)))


class LaterBlockForward(shared.LaterBlockForward):
    """An open_clip block after the first reduction: with ``prop_attn``, its attention gets ``log(size)`` as an
    additive key mask (see the module doc)."""

    def with_bias(self, x: Tensor, bias: Tensor, args: tuple, kwargs: dict) -> Tensor:
        _refuse_extra(self.layer, args, kwargs)
        block = self.block
        x = x + block.ls_1(_attention(block, block.ln_1(x), bias))
        return x + block.ls_2(block.mlp(block.ln_2(x)))


class SizeWeightedGlobalPool:
    """Replaces ``visual._global_pool``: ``pool_type="avg"`` averages the patch tokens counting each as the patches it
    holds (read from the record its tokens carry); ``"tok"`` is unchanged."""

    def __init__(self, visual: nn.Module) -> None:
        self.visual = visual

    def __call__(self, x: Tensor) -> tuple[Tensor, Tensor]:
        visual = self.visual
        sizes = record_sizes(record_of(x))
        if visual.pool_type != "avg" or sizes is None:
            return type(visual)._global_pool(visual, x)
        return size_weighted_mean(x[:, 1:], sizes[:, 1:]), x[:, 1:]


class GridCheckedIntermediates:
    """Replaces ``visual.forward_intermediates``: after a reducing block the tokens no longer fill the patch grid, so
    ``output_fmt="NCHW"`` (open_clip's default) maps are built by unmerging, as for timm (each grid cell gets the
    features of the token holding that patch; :func:`tokenmerge_patch.unmerge`): the maps have the unpatched shapes.
    ``"NLC"`` returns the reduced tokens as they are."""

    def __init__(self, visual: nn.Module, state: TokenMergeState) -> None:
        self.visual, self.state = visual, state

    def __call__(self, x: Tensor, *args: object, **kwargs: object) -> object:
        visual = self.visual
        call = inspect.signature(type(visual).forward_intermediates).bind(visual, x, *args, **kwargs)
        call.apply_defaults()
        if call.arguments.get("output_fmt") != "NCHW":
            return type(visual).forward_intermediates(visual, x, *args, **kwargs)
        want_prefix = call.arguments.get("output_extra_tokens", False)
        call.arguments.update(output_fmt="NLC", output_extra_tokens=True)
        height, width = x.shape[-2] // visual.patch_size[0], x.shape[-1] // visual.patch_size[1]
        with self.state.collecting() as records:
            out = type(visual).forward_intermediates(*call.args, **call.kwargs)
            pairs = zip(out["image_intermediates"], out["image_intermediates_prefix"], strict=True)
            maps = [intermediate_map(patches, prefix, records, (height, width)) for patches, prefix in pairs]
        out["image_intermediates"] = maps
        if not want_prefix:
            del out["image_intermediates_prefix"]
        return out


class OpenCLIPBackend:
    name = "open_clip"

    def claims(self, model: nn.Module) -> bool:
        # any open_clip model (a tower that is not a ViT is then refused by check); open_clip is imported already
        return "open_clip" in sys.modules and type(model).__module__.split(".")[0] == "open_clip"

    def blocks(self, model: nn.Module) -> Sequence[nn.Module]:
        return _visual(model).transformer.resblocks

    def _check_block(self, block: nn.Module, layer: int) -> None:
        oc = _transformer_module()
        if _is_custom(block):
            attn = block.attn
            if type(block).forward is not oc.CustomResidualAttentionBlock.forward or type(attn) is not oc.Attention:
                raise TypeError(
                    f"block {layer} is {type(block).__name__} with {type(attn).__name__}; tokenmerge_patch "
                    f"supports {SUPPORTED_OPENCLIP}"
                )
            if attn.logit_scale is not None:
                raise TypeError(
                    f"block {layer} uses scaled cosine attention (scaled_cosine_attn=True), whose logits are not "
                    f"q·k/sqrt(d); tokenmerge_patch supports {SUPPORTED_OPENCLIP}"
                )
            for name in ("ln_q", "ln_k"):
                check_overridable(getattr(attn, name), f"block {layer}'s attn.{name}", (OutputTap,))
            return
        if (
            not isinstance(block, oc.ResidualAttentionBlock)
            or type(block).forward is not oc.ResidualAttentionBlock.forward
        ):
            raise TypeError(f"block {layer} is {type(block).__name__}; tokenmerge_patch supports {SUPPORTED_OPENCLIP}")
        mha = block.attn
        plain = (
            type(mha) is nn.MultiheadAttention
            and mha.batch_first
            and mha._qkv_same_embed_dim
            and mha.in_proj_weight is not None
            and mha.bias_k is None
            and mha.bias_v is None
            and not mha.add_zero_attn
            and not hasattr(block, "ln_1_kv")
        )
        if not plain:
            raise TypeError(
                f"block {layer}'s attention is not a plain batch-first nn.MultiheadAttention self-attention (packed "
                f"in_proj, no bias_k/bias_v, no add_zero_attn, no cross-attention); tokenmerge_patch supports "
                f"{SUPPORTED_OPENCLIP}"
            )

    def check(self, model: nn.Module, config: PatchConfig) -> int:
        visual = _visual(model)
        if visual.attn_pool is not None or visual.pool_type not in ("tok", "avg"):
            what = "an attentional pooler" if visual.attn_pool is not None else f"pool_type={visual.pool_type!r}"
            raise ValueError(
                f"this open_clip image tower pools with {what}, which reads every token; tokenmerge_patch supports "
                "pool_type 'tok' (the class token) or 'avg' (made size-weighted) without an attentional pooler"
            )
        if not visual.transformer.batch_first:
            raise ValueError(
                "this open_clip image tower runs its transformer sequence-first (batch_first=False); "
                "tokenmerge_patch supports batch-first towers (every VisionTransformer of open_clip >= 3)"
            )
        blocks = visual.transformer.resblocks
        for layer in (*config.layers, *config.proportional_layers(len(blocks))):
            self._check_block(blocks[layer], layer)
        for layer in (*config.layers, *config.later_layers(len(blocks))):
            check_overridable(blocks[layer], f"block {layer}", (ReducingBlockForward, LaterBlockForward))
        check_overridable(visual.ln_post, "visual.ln_post", (RecordKeepingNorm,))
        return self.num_prefix(model)

    def num_prefix(self, model: nn.Module) -> int:
        return 1  # the class token

    def has_class_token(self, model: nn.Module) -> bool:
        return True

    def install(self, model: nn.Module, state: TokenMergeState) -> None:
        visual = _visual(model)
        blocks = visual.transformer.resblocks
        for layer in state.config.layers:
            forward = ReducingBlockForward(blocks[layer], state, layer)
            state.override(blocks[layer], "forward", forward)
            for tap in forward.taps:
                state.override(tap.module, "forward", tap)
        for layer in state.config.later_layers(len(blocks)):
            state.override(blocks[layer], "forward", LaterBlockForward(blocks[layer], state, layer))
        state.override(visual.ln_post, "forward", RecordKeepingNorm(visual.ln_post, state))
        state.override(visual, "_global_pool", SizeWeightedGlobalPool(visual))
        state.override(visual, "forward_intermediates", GridCheckedIntermediates(visual, state))

    def image_model(self, model: nn.Module) -> nn.Module:
        """The image tower: what count_flops, token_counts and calibrate run (a CLIP model's forward also takes text,
        and its text tower must not count as image flops)."""
        return _visual(model)

    def input_size(self, model: nn.Module) -> tuple[int, int, int]:
        visual = _visual(model)
        return (int(visual.conv1.in_channels), *(int(v) for v in visual.image_size))

    def class_token_head(self, model: nn.Module) -> bool:
        return _visual(model).pool_type == "tok"

    def tokens_of(self, block_output: object) -> int:
        return computed_tokens(block_output)

    def block_parts(self, block: nn.Module) -> tuple[nn.Module, nn.Module, int]:
        width = (
            block.attn.embed_dim if isinstance(block.attn, nn.MultiheadAttention) else block.attn.out_proj.in_features
        )
        return block.attn, block.mlp, width


BACKEND = OpenCLIPBackend()
