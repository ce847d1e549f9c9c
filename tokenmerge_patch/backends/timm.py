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

# timm.models.vision_transformer has had Attention in every 1.0.x (it moved to timm.layers later)
from timm.models.vision_transformer import Attention, Block, VisionTransformer
from torch import Tensor, nn

try:  # features_only=True models (timm >= 1.0: forward_intermediates); a private module, so guarded
    from timm.models._features import FeatureGetterNet
except ImportError:  # pragma: no cover
    FeatureGetterNet = ()

from ..dense import intermediate_map
from ..records import computed_tokens, record_of, record_sizes
from ..reduce import size_weighted_mean
from . import shared
from .shared import OutputTap, RecordKeepingNorm, check_device, check_overridable, read_taps, refuse_masks

if TYPE_CHECKING:
    from ..patch import PatchConfig, TokenMergeState


class ReducingBlockForward(shared.ReducingBlockForward):
    """Replaces ``Block.forward`` on a reducing block."""

    def __init__(self, block: Block, state: TokenMergeState, layer: int) -> None:
        super().__init__(block, state, layer)
        # q and k are read as they leave q_norm / k_norm, whose forwards are taps installed next to this one
        self.taps = (OutputTap(block.attn.q_norm), OutputTap(block.attn.k_norm))

    def __call__(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        refuse_masks(self.layer, attn_mask, is_causal)
        check_device(x, self.block.attn.qkv.weight)
        return self.run(x)

    def attention_half(
        self, x: Tensor, record: tuple | None, bias: Tensor | None, call: object
    ) -> tuple[Tensor, Tensor, Tensor, float]:
        block, attn = self.block, self.block.attn
        normed = block.norm1(x)
        y, (q, k) = read_taps(self.taps, lambda: attn(normed) if bias is None else attn(normed, attn_mask=bias))
        return block.drop_path1(block.ls1(y)), q, k, attn.scale

    def mlp_half(self, x: Tensor) -> Tensor:
        block = self.block
        return block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


class LaterBlockForward(shared.LaterBlockForward):
    """timm ``Block`` after the first reduction: with ``prop_attn``, ``log(size)`` is its attention's float mask."""

    def with_bias(self, x: Tensor, bias: Tensor, args: tuple, kwargs: dict) -> Tensor:
        refuse_masks(self.layer, args[0] if args else kwargs.get("attn_mask"), bool(kwargs.get("is_causal")))
        check_device(x, self.block.attn.qkv.weight)
        return type(self.block).forward(self.block, x, attn_mask=bias)


class GridCheckedIntermediates:
    """Replaces ``VisionTransformer.forward_intermediates``: after a reducing block the tokens no longer fill the
    patch grid, so NCHW feature maps (timm's default, ``features_only`` models, ``get_intermediate_layers(...,
    reshape=True)``) are built by unmerging: each grid cell gets the features of the token that holds that patch
    (:func:`tokenmerge_patch.unmerge`; a patch ``method="drop"`` discarded gets zeros). The maps have the unpatched
    shapes at any keep rate. ``output_fmt="NLC"`` returns the reduced tokens as they are (fewer than the grid).

    timm's own method runs with ``output_fmt="NLC"`` and the prefix tokens returned; the blocks file their outputs'
    records while it runs (:meth:`TokenMergeState.collecting`), and each intermediate, a slice of such an output,
    finds its record by the storage it shares with it."""

    def __init__(self, model: VisionTransformer, state: TokenMergeState) -> None:
        self.model = model
        self.state = state

    def __call__(self, x: Tensor, indices: int | list[int] | None = None, *args: object, **kwargs: object) -> object:
        from ..multiscale import refuse_intermediates  # multiscale imports the patch machinery: imported late

        model = self.model
        refuse_intermediates(model)
        call = inspect.signature(type(model).forward_intermediates).bind(model, x, indices, *args, **kwargs)
        call.apply_defaults()
        if call.arguments.get("output_fmt") != "NCHW":
            return type(model).forward_intermediates(model, x, indices, *args, **kwargs)
        want_prefix = call.arguments.get("return_prefix_tokens", False)
        call.arguments.update(output_fmt="NLC", return_prefix_tokens=True)
        embed = model.patch_embed
        size = tuple(x.shape[-2:])
        grid = embed.dynamic_feat_size(size) if hasattr(embed, "dynamic_feat_size") else embed.grid_size
        with self.state.collecting() as records:
            result = type(model).forward_intermediates(*call.args, **call.kwargs)

            def to_map(patches: Tensor, prefix: Tensor) -> Tensor | tuple[Tensor, Tensor]:
                dense = intermediate_map(patches, prefix, records, grid)
                return (dense, prefix) if want_prefix and not isinstance(result, dict) else dense

            if isinstance(result, dict):
                prefixes = result["image_intermediates_prefix"]
                maps = [to_map(t, p) for t, p in zip(result["image_intermediates"], prefixes, strict=True)]
                out = {**result, "image_intermediates": maps}
                if not want_prefix:
                    del out["image_intermediates_prefix"]
                return out
            if call.arguments.get("intermediates_only"):
                return [to_map(*pair) for pair in result]
            final, pairs = result
            return final, [to_map(*pair) for pair in pairs]


class SizeWeightedPool:
    """Replaces ``VisionTransformer.pool``: averaging pools count each token as the patches it holds (read from
    the record its tokens carry), so ``global_pool='avg'`` still averages over the image's patches after a
    merge, and ``forward_head(features)`` pools ``features`` with their own sizes whatever ran since."""

    def __init__(self, model: VisionTransformer, state: TokenMergeState) -> None:
        self.model = model
        self.state = state
        # timm's VisionTransformer attention-pools the patch tokens (unless pool_include_prefix), Eva every token
        self.pool_includes_prefix = not isinstance(model, VisionTransformer) or model.pool_include_prefix

    def __call__(self, x: Tensor, pool_type: str | None = None) -> Tensor:
        model = self.model
        pool_type = model.global_pool if pool_type is None else pool_type
        if model.attn_pool is None and pool_type not in ("avg", "avgmax"):
            return type(model).pool(model, x, pool_type)
        record = record_of(x)
        sizes = record_sizes(record)
        if model.attn_pool is not None and sizes is not None:
            return self._attention_pool(x, sizes)
        if sizes is None:
            if record is None:  # tokens that carry a record, even of no reduction, say what they are
                self._refuse_if_reduced(x)
            return type(model).pool(model, x, pool_type)
        start = 0 if getattr(model, "pool_include_prefix", False) else model.num_prefix_tokens
        tokens, sizes = x[:, start:], sizes[:, start:]
        mean = size_weighted_mean(tokens, sizes)
        return mean if pool_type == "avg" else 0.5 * (tokens.amax(dim=1) + mean)

    def _attention_pool(self, x: Tensor, sizes: Tensor) -> Tensor:
        """Attention pooling (SigLIP's MAP head) over merged tokens: each key counts as the patches it holds (a
        ``log(size)`` bias, as proportional attention), so a token merged from ``s`` equal patches pools as they
        would."""
        model = self.model
        start = 0 if self.pool_includes_prefix else model.num_prefix_tokens
        tokens, sizes = x[:, start:], sizes[:, start:]
        return model.attn_pool(tokens, attn_mask=sizes.log().to(tokens.dtype)[:, None, None, :])

    def _refuse_if_reduced(self, x: Tensor) -> None:
        """Tokens fewer than the patch grid but without a record: their merge sizes were lost (a copy,
        ``.detach()``, ``.to()``), and a plain mean would silently weigh merged tokens as single patches."""
        model = self.model
        if getattr(model, "dynamic_img_size", False):
            return  # the grid depends on the input size: a short sequence may be a small image
        if model.training and getattr(model.patch_drop, "prob", 0.0) > 0:
            return  # timm's patch dropout keeps a random subset of the patches in training
        full = model.patch_embed.num_patches + model.num_prefix_tokens
        if x.shape[1] < full:
            raise ValueError(
                f"pooling {x.shape[1]} tokens (the unreduced model has {full}) without their merge sizes: pass "
                "forward_head the tensor forward_features returned itself (a copy such as .detach(), .clone() or "
                ".to() drops the sizes it carries), or use global_pool='token'"
            )


class TimmBackend:
    """timm ``VisionTransformer``; a subclass says which model, block and attention classes it takes and which
    forwards it installs (:class:`~tokenmerge_patch.backends.timm_eva.EvaBackend`), the rest is shared."""

    name = "timm"
    model_class: type = VisionTransformer
    block_classes: tuple[type, ...] = (Block,)
    attention_classes: tuple[type, ...] = (Attention,)
    reducing_forward: type = ReducingBlockForward
    later_forward: type = LaterBlockForward
    supported_blocks = "timm's vision_transformer.Block (and subclasses that keep its forward)"
    supported_attentions = "timm.layers.Attention (and subclasses that keep its forward)"
    no_class_token = "class_token=False, e.g. global_pool='map' or 'avg' models without one"

    def unwrap(self, model: nn.Module) -> nn.Module | None:
        """The model itself, or the one a ``features_only=True`` model (timm's ``FeatureGetterNet``, which calls its
        ``forward_intermediates``) wraps; ``None`` for anything else."""
        if isinstance(model, FeatureGetterNet):
            model = getattr(model, "model", None)
        return model if isinstance(model, self.model_class) else None

    @property
    def own_forwards(self) -> tuple[type, ...]:
        return (self.reducing_forward, self.later_forward)

    def claims(self, model: nn.Module) -> bool:
        return self.unwrap(model) is not None

    def blocks(self, model: nn.Module) -> Sequence[nn.Module]:
        return self.unwrap(model).blocks

    def check(self, model: nn.Module, config: PatchConfig) -> int:
        model = self.unwrap(model)
        if config.needs_class_token and not self.has_class_token(model):
            raise ValueError(
                f"model has no class token ({self.no_class_token}), so there is no class-attention score to select "
                "tokens by: patch it with score='received' (the default for such models: the attention each token "
                "receives) or method='bipartite', and without merge_into_cls"
            )
        pool = getattr(model, "attn_pool", None)
        if pool is not None:
            if getattr(pool, "pos_embed", None) is not None:
                raise ValueError(
                    "this model's attention pool adds a position embedding per token, which merged tokens do not "
                    "have; tokenmerge_patch supports attention pools without one (SigLIP's 'map')"
                )
            if "attn_mask" not in inspect.signature(type(pool).forward).parameters:
                raise ValueError("this timm's attention pool takes no attn_mask; a newer timm (>= 1.0.16) is needed")
        self.check_timm(config)
        for layer in (*config.layers, *config.proportional_layers(len(model.blocks))):
            block = model.blocks[layer]
            if not _keeps_forward(block, self.block_classes):
                raise TypeError(
                    f"block {layer} is {type(block).__name__}; tokenmerge_patch supports {self.supported_blocks}"
                )
            attn = getattr(block, "attn", None)
            if not _keeps_forward(attn, self.attention_classes):
                raise TypeError(
                    f"block {layer}'s attention is {type(attn).__name__}; tokenmerge_patch supports "
                    f"{self.supported_attentions}"
                )
            for name in ("q_norm", "k_norm"):
                check_overridable(getattr(attn, name), f"block {layer}'s attn.{name}", (OutputTap,))
        for layer in (*config.layers, *config.later_layers(len(model.blocks))):
            check_overridable(model.blocks[layer], f"block {layer}", self.own_forwards)
        check_overridable(model.norm, "model.norm", (RecordKeepingNorm,))
        return self.num_prefix(model)

    def num_prefix(self, model: nn.Module) -> int:
        return int(self.unwrap(model).num_prefix_tokens)

    def has_class_token(self, model: nn.Module) -> bool:
        return getattr(self.unwrap(model), "cls_token", None) is not None

    def check_timm(self, config: PatchConfig) -> None:
        """What the installed timm must offer for ``config``."""
        if config.prop_attn and "attn_mask" not in inspect.signature(Block.forward).parameters:
            raise ValueError("prop_attn needs a timm whose Block.forward takes attn_mask (timm >= 1.0.16)")

    def install(self, model: nn.Module, state: TokenMergeState) -> None:
        model = self.unwrap(model)
        config = state.config
        for layer in config.layers:
            block = model.blocks[layer]
            forward = self.reducing_forward(block, state, layer)
            state.override(block, "forward", forward)
            state.override(block.attn.q_norm, "forward", forward.taps[0])
            state.override(block.attn.k_norm, "forward", forward.taps[1])
        for layer in config.later_layers(len(model.blocks)):  # pass the record on (with prop_attn: log(size) masks)
            block = model.blocks[layer]
            state.override(block, "forward", self.later_forward(block, state, layer))
        state.override(model.norm, "forward", RecordKeepingNorm(model.norm, state))
        state.override(model, "pool", SizeWeightedPool(model, state))
        if hasattr(type(model), "forward_intermediates"):
            state.override(model, "forward_intermediates", GridCheckedIntermediates(model, state))

    def input_size(self, model: nn.Module) -> tuple[int, int, int]:
        embed = self.unwrap(model).patch_embed
        return (int(embed.proj.in_channels), *(int(v) for v in embed.img_size))

    def class_token_head(self, model: nn.Module) -> bool:
        if not isinstance(model, self.model_class):  # features_only: dense feature maps read every patch
            return False
        has_class = self.has_class_token(model)
        return has_class and model.global_pool == "token" and getattr(model, "attn_pool", None) is None

    def tokens_of(self, block_output: object) -> int:
        return computed_tokens(block_output)

    def block_parts(self, block: nn.Module) -> tuple[nn.Module, nn.Module, int]:
        return block.attn, block.mlp, block.attn.num_heads * block.attn.head_dim


def _keeps_forward(module: object, classes: tuple[type, ...]) -> bool:
    """``module`` is an instance of one of ``classes`` whose forward it has not replaced."""
    return any(isinstance(module, cls) and type(module).forward is cls.forward for cls in classes)


BACKEND = TimmBackend()
