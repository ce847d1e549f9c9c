"""timm backend: ``VisionTransformer`` built from timm's ``Block`` and ``Attention``.

Where the scores come from: the block's own ``Attention.forward`` runs unchanged (fused SDPA stays on);
its queries and keys are read as they leave ``attn.q_norm`` / ``attn.k_norm`` (identities unless the
model uses qk-norm; their forwards become taps that run the module and keep its output), and only the
class row is recomputed from them.
Where the reduction happens: between ``x + ls1(attn(norm1(x)))`` and the MLP half of the block.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import TYPE_CHECKING

from timm.models._features import feature_take_indices

# timm.models.vision_transformer has had Attention in every 1.0.x (it moved to timm.layers later)
from timm.models.vision_transformer import Attention, Block, VisionTransformer
from torch import Tensor, nn

from ..reduce import size_weighted_mean
from .shared import OutputTap, check_device, check_overridable, refuse_masks

if TYPE_CHECKING:
    from ..patch import PatchConfig, TokenMergeState


class ReducingBlockForward:
    """Replaces ``Block.forward`` on a reducing block (set as an instance attribute, so the block stays
    the same object with the same submodules, and its forward hooks see the reduced output)."""

    def __init__(self, block: Block, state: TokenMergeState, layer: int) -> None:
        self.block = block
        self.state = state
        self.layer = layer
        # q and k are read as they leave q_norm / k_norm, whose forwards are taps installed next to this one
        self.taps = (OutputTap(block.attn.q_norm), OutputTap(block.attn.k_norm))

    def __call__(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        refuse_masks(self.layer, attn_mask, is_causal)
        block = self.block
        attn = block.attn
        check_device(x, attn.qkv.weight)
        bias = self.state.attention_bias(self.layer, x)
        for tap in self.taps:
            tap.arm()
        y = attn(block.norm1(x)) if bias is None else attn(block.norm1(x), attn_mask=bias)
        q, k = self.taps[0].take("queries"), self.taps[1].take("keys")
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
        refuse_masks(self.layer, attn_mask, is_causal)
        check_device(x, self.block.attn.qkv.weight)
        return type(self.block).forward(self.block, x, attn_mask=self.state.attention_bias(self.layer, x))

    def __repr__(self) -> str:
        return f"ProportionalBlockForward(layer={self.layer})"


class GridCheckedIntermediates:
    """Replaces ``VisionTransformer.forward_intermediates``: after a reducing block the tokens no longer fill
    the patch grid, so asking for them as NCHW feature maps (timm's default, and ``features_only``) is
    refused instead of silently folding tokens into channels. ``output_fmt="NLC"`` works."""

    def __init__(self, model: VisionTransformer, state: TokenMergeState) -> None:
        self.model = model
        self.state = state

    def __call__(self, x: Tensor, indices: int | list[int] | None = None, *args: object, **kwargs: object) -> object:
        model = self.model
        call = inspect.signature(type(model).forward_intermediates).bind(model, x, indices, *args, **kwargs)
        call.apply_defaults()
        if call.arguments.get("output_fmt") == "NCHW":
            taken, _ = feature_take_indices(len(model.blocks), indices)
            first = self.state.config.layers[0]
            late = [i for i in taken if i >= first]
            if late:
                raise ValueError(
                    f"blocks {late} come after token reduction (block {first}), so their tokens no longer form an "
                    "image grid: use output_fmt='NLC', earlier indices, or unpatch"
                )
        return type(model).forward_intermediates(model, x, indices, *args, **kwargs)


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
        start = 0 if getattr(model, "pool_include_prefix", False) else model.num_prefix_tokens
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
        if config.prop_attn and "attn_mask" not in inspect.signature(Block.forward).parameters:
            raise ValueError("prop_attn needs a timm whose Block.forward takes attn_mask (timm >= 1.0.16)")
        for layer in (*config.layers, *config.proportional_layers(len(model.blocks))):
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
            check_overridable(block, f"block {layer}", OWN_FORWARDS)
            for name in ("q_norm", "k_norm"):
                check_overridable(getattr(attn, name), f"block {layer}'s attn.{name}", (OutputTap,))
        return int(model.num_prefix_tokens)

    def install(self, model: nn.Module, state: TokenMergeState) -> None:
        config = state.config
        for layer in config.layers:
            block = model.blocks[layer]
            forward = ReducingBlockForward(block, state, layer)
            state.override(block, "forward", forward)
            state.override(block.attn.q_norm, "forward", forward.taps[0])
            state.override(block.attn.k_norm, "forward", forward.taps[1])
        for layer in config.proportional_layers(len(model.blocks)):  # with prop_attn: log(size) masks
            block = model.blocks[layer]
            state.override(block, "forward", ProportionalBlockForward(block, state, layer))
        state.override(model, "pool", SizeWeightedPool(model, state))
        if hasattr(type(model), "forward_intermediates"):
            state.override(model, "forward_intermediates", GridCheckedIntermediates(model, state))

    def tokens_of(self, block_output: object) -> int:
        return block_output.shape[1]

    def block_parts(self, block: nn.Module) -> tuple[nn.Module, nn.Module, int]:
        return block.attn, block.mlp, block.attn.num_heads * block.attn.head_dim


OWN_FORWARDS = (ReducingBlockForward, ProportionalBlockForward)
BACKEND = TimmBackend()
