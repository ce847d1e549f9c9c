"""timm ``Eva`` backend: the rotary-position (RoPE) ViTs of ``timm.models.eva`` built from ``EvaBlock`` with
``EvaAttention`` or ``AttentionRope`` — EVA-02 (RoPE, SwiGLU), DINOv3 (RoPE, registers, LayerScale), the RoPE-ViTs
``vit_*_rope_*`` (axial and mixed RoPE) and the other ``Eva`` models with a class token.

Where the scores come from: the block's own attention runs unchanged (fused SDPA stays on). Its queries and keys
are read as they leave ``attn.q_norm`` / ``attn.k_norm`` (taps, as for ``VisionTransformer``), which is before the
rotary embedding; :func:`rotate_like_attention` then applies the same rotation with timm's own
``apply_rot_embed_cat``, the way the attention does, so the class row is computed from exactly the queries and keys
the attention used.

Where the reduction happens: between ``x + gamma_1 * attn(norm1(x))`` and the MLP half of the block.

Positions: ``Eva.forward_features`` hands every block the same rotary table, one row per patch of the image (prefix
tokens have none: timm's attention leaves its first ``num_prefix_tokens`` tokens unrotated). Once a block has
reduced, each block from then on takes the rows of its surviving tokens (:func:`tokenmerge_patch.reduce.rotary_rows`
with the positions the tokens' record carries): a merged token sits at its crucial token's patch, a bipartite merge
at its destination token's, and EViT's fused token gets the identity row (no rotation), like a prefix token.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from timm.layers import AttentionRope, apply_rot_embed_cat
from timm.models.eva import Eva, EvaAttention, EvaBlock
from torch import Tensor, nn

from ..records import record_positions
from ..reduce import rotary_rows
from .shared import OutputTap, RecordKeepingNorm, check_device, check_overridable, read_taps, refuse_masks
from .timm import FeatureGetterNet, GridCheckedIntermediates, SizeWeightedPool

if TYPE_CHECKING:
    from ..patch import PatchConfig, TokenMergeState

ATTENTIONS = (EvaAttention, AttentionRope)


def surviving_rope(rope: Tensor | None, positions: Tensor | None) -> Tensor | None:
    """The rows of timm's rotary table ``rope`` (``[N, 2d]`` sin then cos, ``[H, N, 2d]`` for mixed RoPE, or with a
    batch dimension) that the tokens at ``positions`` use; ``rope`` itself before any reduction."""
    if rope is None or positions is None:
        return rope
    half = rope.shape[-1] // 2
    identity = torch.cat([rope.new_zeros(half), rope.new_ones(half)])  # sin 0, cos 1: no rotation
    return rotary_rows(rope, positions, identity)


def rotate_like_attention(attn: nn.Module, q: Tensor, k: Tensor, rope: Tensor | None) -> tuple[Tensor, Tensor]:
    """What ``EvaAttention`` / ``AttentionRope`` do to their queries and keys between the q/k norm and the attention:
    rotate the patch tokens (not the first ``num_prefix_tokens``) by ``rope``; grouped-query keys are repeated to
    the query heads, as the attention does."""
    if rope is not None:
        npt, half = attn.num_prefix_tokens, getattr(attn, "rotate_half", False)
        dtype = q.dtype  # the attention's .type_as(v): v left the same projection as q
        q = torch.cat([q[:, :, :npt, :], apply_rot_embed_cat(q[:, :, npt:, :], rope, half=half)], dim=2).to(dtype)
        k = torch.cat([k[:, :, :npt, :], apply_rot_embed_cat(k[:, :, npt:, :], rope, half=half)], dim=2).to(dtype)
    groups = getattr(attn, "num_kv_groups", 1)
    return q, (k.repeat_interleave(groups, dim=1) if groups > 1 else k)


def _weight(attn: nn.Module) -> Tensor:
    return attn.proj.weight


class EvaReducingBlockForward:
    """Replaces ``EvaBlock.forward`` on a reducing block (an instance attribute: the block stays the same object
    with the same submodules, and its forward hooks see the reduced output)."""

    def __init__(self, block: EvaBlock, state: TokenMergeState, layer: int) -> None:
        self.block = block
        self.state = state
        self.layer = layer
        self.taps = (OutputTap(block.attn.q_norm), OutputTap(block.attn.k_norm))

    def __call__(
        self, x: Tensor, rope: Tensor | None = None, attn_mask: Tensor | None = None, is_causal: bool = False
    ) -> Tensor:
        refuse_masks(self.layer, attn_mask, is_causal)
        block, state = self.block, self.state
        attn = block.attn
        check_device(x, _weight(attn))
        record = state.incoming(self.layer, x)
        rope = surviving_rope(rope, record_positions(record))
        bias = state.attention_bias(record, x)
        normed = block.norm1(x)
        y, (q, k) = read_taps(self.taps, lambda: attn(normed, rope=rope, attn_mask=bias))
        q, k = rotate_like_attention(attn, q, k, rope)
        if block.gamma_1 is not None:
            y = block.gamma_1 * y
        x = x + block.drop_path1(y)
        x, record = state.reduce(self.layer, x, q, k, attn.scale, record, attn_bias=bias)
        y = block.mlp(block.norm2(x))
        if block.gamma_2 is not None:
            y = block.gamma_2 * y
        out = state.collect(x + block.drop_path2(y), record)
        if self.layer == state.depth - 1:
            state.publish(record)
        return out

    def __repr__(self) -> str:
        return f"EvaReducingBlockForward(layer={self.layer})"


class EvaLaterBlockForward:
    """A block after the first reduction that does not reduce itself: runs its own forward with the rotary rows of
    its tokens (and, with ``prop_attn``, ``log(size)`` as the attention's float mask), and passes the tokens'
    record on to its output."""

    def __init__(self, block: nn.Module, state: TokenMergeState, layer: int) -> None:
        self.block = block
        self.state = state
        self.layer = layer

    def __call__(
        self, x: Tensor, rope: Tensor | None = None, attn_mask: Tensor | None = None, is_causal: bool = False
    ) -> Tensor:
        block, state = self.block, self.state
        record = state.incoming(self.layer, x)
        rope = surviving_rope(rope, record_positions(record))
        bias = state.attention_bias(record, x)
        if bias is not None:
            refuse_masks(self.layer, attn_mask, is_causal)
            check_device(x, _weight(block.attn))
            attn_mask = bias
        out = type(block).forward(block, x, rope=rope, attn_mask=attn_mask, is_causal=is_causal)
        if self.layer == state.depth - 1:
            state.publish(record)
        return state.collect(out, record)

    def __repr__(self) -> str:
        return f"EvaLaterBlockForward(layer={self.layer})"


class EvaBackend:
    name = "timm-eva"

    def claims(self, model: nn.Module) -> bool:
        return _eva(model) is not None

    def blocks(self, model: nn.Module) -> Sequence[nn.Module]:
        return _eva(model).blocks

    def check(self, model: nn.Module, config: PatchConfig) -> int:
        model = _eva(model)
        if getattr(model, "cls_token", None) is None:
            raise ValueError(
                "model has no class token (class_token=False, e.g. vit_*_rope_reg*_gap_256 and the PE gigantic "
                "models), so there is no class-attention score to select tokens by; tokenmerge_patch needs an Eva "
                "model with a class token"
            )
        for layer in (*config.layers, *config.proportional_layers(len(model.blocks))):
            block = model.blocks[layer]
            if not isinstance(block, EvaBlock) or type(block).forward is not EvaBlock.forward:
                raise TypeError(
                    f"block {layer} is {type(block).__name__}; tokenmerge_patch supports timm's pre-norm "
                    "eva.EvaBlock (and subclasses that keep its forward), not EvaBlockPostNorm (use_post_norm=True)"
                )
            attn = block.attn
            if not any(isinstance(attn, cls) and type(attn).forward is cls.forward for cls in ATTENTIONS):
                raise TypeError(
                    f"block {layer}'s attention is {type(attn).__name__}; tokenmerge_patch supports timm's "
                    "EvaAttention and AttentionRope (and subclasses that keep their forward)"
                )
            for name in ("q_norm", "k_norm"):
                check_overridable(getattr(attn, name), f"block {layer}'s attn.{name}", (OutputTap,))
        for layer in (*config.layers, *config.later_layers(len(model.blocks))):
            check_overridable(model.blocks[layer], f"block {layer}", OWN_FORWARDS)
        check_overridable(model.norm, "model.norm", (RecordKeepingNorm,))
        return int(model.num_prefix_tokens)

    def install(self, model: nn.Module, state: TokenMergeState) -> None:
        model = _eva(model)
        config = state.config
        for layer in config.layers:
            block = model.blocks[layer]
            forward = EvaReducingBlockForward(block, state, layer)
            state.override(block, "forward", forward)
            state.override(block.attn.q_norm, "forward", forward.taps[0])
            state.override(block.attn.k_norm, "forward", forward.taps[1])
        for layer in config.later_layers(len(model.blocks)):  # rotary rows of the survivors, the record, prop_attn
            block = model.blocks[layer]
            state.override(block, "forward", EvaLaterBlockForward(block, state, layer))
        state.override(model.norm, "forward", RecordKeepingNorm(model.norm, state))
        state.override(model, "pool", SizeWeightedPool(model, state))
        state.override(model, "forward_intermediates", GridCheckedIntermediates(model, state))

    def input_size(self, model: nn.Module) -> tuple[int, int, int]:
        embed = _eva(model).patch_embed
        return (int(embed.proj.in_channels), *(int(v) for v in embed.img_size))

    def class_token_head(self, model: nn.Module) -> bool:
        if not isinstance(model, Eva):  # features_only: dense feature maps read every patch
            return False
        return model.global_pool == "token" and getattr(model, "attn_pool", None) is None

    def tokens_of(self, block_output: object) -> int:
        return block_output.shape[1]

    def block_parts(self, block: nn.Module) -> tuple[nn.Module, nn.Module, int]:
        return block.attn, block.mlp, block.attn.num_heads * block.attn.head_dim


def _eva(model: nn.Module) -> Eva | None:
    """The ``Eva`` of ``model``: itself, or the one a ``features_only=True`` model (timm's ``FeatureGetterNet``, which
    calls its ``forward_intermediates``) wraps; ``None`` for anything else."""
    if isinstance(model, FeatureGetterNet):
        model = getattr(model, "model", None)
    return model if isinstance(model, Eva) else None


OWN_FORWARDS = (EvaReducingBlockForward, EvaLaterBlockForward)
BACKEND = EvaBackend()
