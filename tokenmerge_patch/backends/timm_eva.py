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

from typing import TYPE_CHECKING

import torch
from timm.layers import AttentionRope, apply_rot_embed_cat
from timm.models.eva import Eva, EvaAttention, EvaBlock
from torch import Tensor, nn

from ..records import record_positions
from ..reduce import rotary_rows
from .shared import LaterBlockForward, OutputTap, ReducingBlockForward, check_device, read_taps, refuse_masks
from .timm import TimmBackend

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


class EvaReducingBlockForward(ReducingBlockForward):
    """Replaces ``EvaBlock.forward`` on a reducing block."""

    def __init__(self, block: EvaBlock, state: TokenMergeState, layer: int) -> None:
        super().__init__(block, state, layer)
        self.taps = (OutputTap(block.attn.q_norm), OutputTap(block.attn.k_norm))

    def __call__(
        self, x: Tensor, rope: Tensor | None = None, attn_mask: Tensor | None = None, is_causal: bool = False
    ) -> Tensor:
        refuse_masks(self.layer, attn_mask, is_causal)
        check_device(x, _weight(self.block.attn))
        return self.run(x, rope)

    def attention_half(
        self, x: Tensor, record: tuple | None, bias: Tensor | None, rope: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor, float]:
        block, attn = self.block, self.block.attn
        rope = surviving_rope(rope, record_positions(record))
        normed = block.norm1(x)
        y, (q, k) = read_taps(self.taps, lambda: attn(normed, rope=rope, attn_mask=bias))
        q, k = rotate_like_attention(attn, q, k, rope)
        if block.gamma_1 is not None:
            y = block.gamma_1 * y
        return block.drop_path1(y), q, k, attn.scale

    def mlp_half(self, x: Tensor) -> Tensor:
        block = self.block
        y = block.mlp(block.norm2(x))
        if block.gamma_2 is not None:
            y = block.gamma_2 * y
        return block.drop_path2(y)


class EvaLaterBlockForward(LaterBlockForward):
    """A block after the first reduction that does not reduce itself: runs its own forward with the rotary rows of
    its tokens (and, with ``prop_attn``, ``log(size)`` as the attention's float mask), and passes the tokens'
    record on to its output."""

    def compute(
        self,
        x: Tensor,
        record: tuple | None,
        rope: Tensor | None = None,
        attn_mask: Tensor | None = None,
        is_causal: bool = False,
    ) -> Tensor:
        block, state = self.block, self.state
        rope = surviving_rope(rope, record_positions(record))
        bias = state.attention_bias(record, x)
        if bias is not None:
            refuse_masks(self.layer, attn_mask, is_causal)
            check_device(x, _weight(block.attn))
            attn_mask = bias
        return type(block).forward(block, x, rope=rope, attn_mask=attn_mask, is_causal=is_causal)


class EvaBackend(TimmBackend):
    """timm ``Eva``: the ``VisionTransformer`` backend with Eva's block, attentions and rotary-aware forwards."""

    name = "timm-eva"
    model_class = Eva
    block_classes = (EvaBlock,)
    attention_classes = ATTENTIONS
    reducing_forward = EvaReducingBlockForward
    later_forward = EvaLaterBlockForward
    supported_blocks = (
        "timm's pre-norm eva.EvaBlock (and subclasses that keep its forward), not EvaBlockPostNorm (use_post_norm=True)"
    )
    supported_attentions = "timm's EvaAttention and AttentionRope (and subclasses that keep their forward)"
    no_class_token = "class_token=False, e.g. vit_*_rope_reg*_gap_256 and the PE gigantic models"

    def check_timm(self, config: PatchConfig) -> None:
        """Every timm with RoPE ``Eva`` models passes ``attn_mask`` through its blocks."""


BACKEND = EvaBackend()
