"""timm backend: ``VisionTransformer`` built from timm's ``Block`` and ``Attention``.

Where the scores come from: the block's own ``Attention.forward`` runs unchanged (fused SDPA stays on);
its queries and keys are read as they leave ``attn.q_norm`` / ``attn.k_norm`` (identities unless the
model uses qk-norm), and only the class row is recomputed from them.
Where the reduction happens: between ``x + ls1(attn(norm1(x)))`` and the MLP half of the block.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

from ..reduce import size_weighted_mean
from .capture import CaptureOutputs

if TYPE_CHECKING:
    from ..patch import PatchConfig, TokenMergeState


class ReducingBlockForward:
    """Replaces ``Block.forward`` on a reducing block (set as an instance attribute, so the block stays
    the same object with the same submodules, and its forward hooks see the reduced output)."""

    def __init__(self, block: Block, state: TokenMergeState, layer: int) -> None:
        self.block = block
        self.state = state
        self.layer = layer

    def __call__(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        _refuse_masks(self.layer, attn_mask, is_causal)
        block = self.block
        attn = block.attn
        bias = self.state.attention_bias(self.layer, x)
        with CaptureOutputs(attn.q_norm, attn.k_norm) as captured:
            y = attn(block.norm1(x), attn_mask=bias)
        q, k = captured.require("queries and keys")
        x = x + block.drop_path1(block.ls1(y))
        x = self.state.reduce(self.layer, x, q, k, attn.scale, attn_bias=bias)
        return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))

    def __repr__(self) -> str:
        return f"ReducingBlockForward(layer={self.layer})"


class ProportionalBlockForward:
    """With ``prop_attn``: a block after a reduction that does not reduce itself runs its own forward with
    ``log(size)`` as the attention's float mask."""

    def __init__(self, block: Block, state: TokenMergeState, layer: int) -> None:
        self.block = block
        self.state = state
        self.layer = layer

    def __call__(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        _refuse_masks(self.layer, attn_mask, is_causal)
        return type(self.block).forward(self.block, x, attn_mask=self.state.attention_bias(self.layer, x))

    def __repr__(self) -> str:
        return f"ProportionalBlockForward(layer={self.layer})"


def _refuse_masks(layer: int, attn_mask: Tensor | None, is_causal: bool) -> None:
    if attn_mask is not None or is_causal:
        raise ValueError(
            f"block {layer} is patched to reduce tokens, so an attn_mask / is_causal sized for the full "
            "sequence cannot be honoured; unpatch the model to use masks"
        )


class SizeWeightedPool:
    """Replaces ``VisionTransformer.pool``: averaging pools count each token as the patches it holds,
    so ``global_pool='avg'`` still averages over the image's patches after a merge."""

    def __init__(self, model: VisionTransformer, state: TokenMergeState) -> None:
        self.model = model
        self.state = state

    def __call__(self, x: Tensor, pool_type: str | None = None) -> Tensor:
        model = self.model
        pool_type = model.global_pool if pool_type is None else pool_type
        sizes = self.state.final_sizes(x)
        if sizes is None or model.attn_pool is not None or pool_type not in ("avg", "avgmax"):
            return type(model).pool(model, x, pool_type)
        start = 0 if model.pool_include_prefix else model.num_prefix_tokens
        tokens, sizes = x[:, start:], sizes[:, start:]
        mean = size_weighted_mean(tokens, sizes)
        return mean if pool_type == "avg" else 0.5 * (tokens.amax(dim=1) + mean)


class TimmBackend:
    name = "timm"

    def claims(self, model: nn.Module) -> bool:
        return isinstance(model, VisionTransformer)

    def blocks(self, model: nn.Module) -> Sequence[nn.Module]:
        return model.blocks

    def check(self, model: nn.Module, config: PatchConfig) -> int:
        if getattr(model, "cls_token", None) is None:
            raise ValueError(
                "model has no class token (class_token=False, e.g. global_pool='map' or 'avg' models "
                "without one), so there is no class-attention score to select tokens by; "
                "tokenmerge_patch needs a ViT with a class token"
            )
        checked = set(config.layers)
        if config.prop_attn:  # later blocks get log(size) masks through their own forward
            checked |= set(range(config.layers[0], len(model.blocks)))
        for layer in sorted(checked):
            block = model.blocks[layer]
            if not isinstance(block, Block) or type(block).forward is not Block.forward:
                raise TypeError(
                    f"block {layer} is {type(block).__name__}; tokenmerge_patch supports timm's "
                    "vision_transformer.Block (and subclasses that keep its forward)"
                )
            attn = getattr(block, "attn", None)
            if not isinstance(attn, Attention) or type(attn).forward is not Attention.forward:
                raise TypeError(
                    f"block {layer}'s attention is {type(attn).__name__}; tokenmerge_patch supports "
                    "timm.layers.Attention (and subclasses that keep its forward)"
                )
        return int(model.num_prefix_tokens)

    def install(self, model: nn.Module, state: TokenMergeState) -> None:
        config = state.config
        for layer in config.layers:
            block = model.blocks[layer]
            state.override(block, "forward", ReducingBlockForward(block, state, layer))
        if config.prop_attn:  # every later block attends with log(size), reducing or not
            for layer in range(config.layers[0] + 1, len(model.blocks)):
                if layer not in config.layers:
                    block = model.blocks[layer]
                    state.override(block, "forward", ProportionalBlockForward(block, state, layer))
        state.override(model, "pool", SizeWeightedPool(model, state))
        state.add_reset_hook(model.patch_embed)

    def tokens_of(self, block_output: object) -> int:
        return block_output.shape[1]

    def block_parts(self, block: nn.Module) -> tuple[nn.Module, nn.Module, int]:
        return block.attn, block.mlp, block.attn.num_heads * block.attn.head_dim


BACKEND = TimmBackend()
