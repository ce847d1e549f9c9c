"""The paper's multi-scale fusion (arXiv 2306.04897 §3.4, eq. 5 and 6), opt-in, for timm ViTs.

A second, low-scale token group (patches twice as large: 7x7 + class token at 224 px for 16-px patches)
runs through the blocks before the fusion point alongside the high-scale group, with the same weights. Just
before block ``fuse_at`` (by default the first reducing block) it is fused into the high-scale patch tokens:

    X = PEG(X_h + LKA(UP(X_l)))                                                        (eq. 5)

UP = nearest interpolation of the low-scale grid to the high-scale grid, then a 1x1 convolution;
LKA = VAN's large-kernel attention (5x5 depthwise, 7x7 depthwise dilation 3, 1x1; times its input);
PEG = conditional position encoding (3x3 depthwise convolution on the patch grid, added).

Optionally (``downsample_blocks``), the first blocks attend over down-sampled high-scale tokens, which pays
for the low-scale group: ``X_h = X_h + UP(MHSA(DOWN(X_h)))`` with the class token unchanged (eq. 6); DOWN is
2x2 average pooling of the patch grid, UP nearest interpolation back.

Choices the paper leaves open, made here:

- The last layer of each new residual branch (LKA's 1x1 convolution, PEG's convolution) starts at zero, so
  right after :func:`add_multiscale` the model computes exactly what it did (with ``downsample_blocks=0``);
  UP's 1x1 convolution starts as the identity. Fine-tuning learns the fusion.
- The low-scale patch embedding is the model's own, resampled to the larger patch (FlexiViT's
  pseudo-inverse resize, ``timm.layers.resample_patch_embed``); its position embedding is the model's,
  resampled to the low-scale grid; its class token starts as the model's class token (with its position).
  Both are new parameters, so the low-scale group is meaningful from the first step.
- The low-scale class token only serves the low-scale group in the shared blocks; after the fusion it is
  dropped (adding it to the high-scale class token would change the pretrained model's output).

Example:
    >>> import timm, torch, tokenmerge_patch
    >>> model = timm.create_model("deit_tiny_patch16_224").eval()
    >>> _ = tokenmerge_patch.patch(model, keep_rate=0.7)
    >>> images = torch.randn(1, 3, 224, 224)
    >>> before = model(images)
    >>> _ = add_multiscale(model)                     # low-scale 32-px patches, fused before block 3
    >>> bool((model(images) - before).abs().max() < 1e-5)
    True
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed, resample_patch_embed
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .backends.shared import check_overridable
from .backends.timm import ReducingBlockForward
from .patch import patch_config
from .schedule import default_layers

ATTRIBUTE = "multiscale"


class LargeKernelAttention(nn.Module):
    """VAN's LKA: ``u * conv1x1(dwconv7x7_dilation3(dwconv5x5(u)))``; the 1x1 starts at zero."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.conv_spatial = nn.Conv2d(dim, dim, 7, padding=9, groups=dim, dilation=3)
        self.conv1 = nn.Conv2d(dim, dim, 1)
        nn.init.zeros_(self.conv1.weight)
        nn.init.zeros_(self.conv1.bias)

    def forward(self, u: Tensor) -> Tensor:
        return u * self.conv1(self.conv_spatial(self.conv0(u)))


class MultiScaleFusion(nn.Module):
    """The new parameters: low-scale embedding (patch projection, class token, position embedding) and
    the fusion (UP's convolution, LKA, PEG). Registered on the model as ``model.multiscale``."""

    def __init__(self, model: VisionTransformer, low_patch_size: int, fuse_at: int, downsample_blocks: int) -> None:
        super().__init__()
        dim = model.embed_dim
        proj = model.patch_embed.proj
        self.low_patch_size = low_patch_size
        self.fuse_at = fuse_at
        self.downsample_blocks = downsample_blocks
        self.high_grid = tuple(model.patch_embed.grid_size)
        self.low_grid = tuple(size // low_patch_size for size in model.patch_embed.img_size)
        with torch.no_grad():
            self.low_proj = nn.Conv2d(
                proj.in_channels, dim, low_patch_size, stride=low_patch_size, bias=proj.bias is not None
            )
            self.low_proj.weight.copy_(resample_patch_embed(proj.weight, [low_patch_size, low_patch_size]))
            if proj.bias is not None:
                self.low_proj.bias.copy_(proj.bias)
            prefix = 0 if model.no_embed_class or model.pos_embed is None else model.num_prefix_tokens
            if model.pos_embed is None:
                patch_pos, cls_pos = torch.zeros(1, math.prod(self.low_grid), dim), torch.zeros(1, 1, dim)
            else:
                patch_pos = resample_abs_pos_embed(
                    model.pos_embed[:, prefix:], list(self.low_grid), self.high_grid, num_prefix_tokens=0
                )
                cls_pos = model.pos_embed[:, :1] if prefix else torch.zeros(1, 1, dim)
            self.low_pos = nn.Parameter(patch_pos.clone())
            self.low_cls = nn.Parameter((model.cls_token + cls_pos).clone())
        self.up = nn.Conv2d(dim, dim, 1)
        with torch.no_grad():
            self.up.weight.copy_(torch.eye(dim).view(dim, dim, 1, 1))
            nn.init.zeros_(self.up.bias)
        self.lka = LargeKernelAttention(dim)
        self.peg = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        nn.init.zeros_(self.peg.weight)
        nn.init.zeros_(self.peg.bias)

    def low_tokens(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """The low-scale group ``[B, 1 + h*w, D]`` (class token first) and its grid."""
        grid = self.low_proj(images)  # [B, D, h, w]
        size = tuple(grid.shape[-2:])
        pos = self.low_pos
        if size != self.low_grid:
            pos = resample_abs_pos_embed(pos, list(size), self.low_grid, num_prefix_tokens=0)
        tokens = grid.flatten(2).transpose(1, 2) + pos
        return torch.cat([self.low_cls.expand(len(tokens), -1, -1), tokens], dim=1), size

    def fuse(self, x: Tensor, low: Tensor, num_prefix: int, grid: tuple[int, int], low_grid: tuple[int, int]) -> Tensor:
        """Eq. 5 on the patch tokens of ``x``; prefix tokens pass unchanged, the low class token is dropped."""
        patches = _to_grid(x[:, num_prefix:], grid)
        upsampled = self.up(F.interpolate(_to_grid(low[:, 1:], low_grid), size=grid, mode="nearest"))
        fused = patches + self.lka(upsampled)
        fused = fused + self.peg(fused)
        return torch.cat([x[:, :num_prefix], fused.flatten(2).transpose(1, 2)], dim=1)


def _to_grid(tokens: Tensor, grid: tuple[int, int]) -> Tensor:
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *grid)


class DownsampledAttentionForward:
    """Eq. 6 on a block before the fusion: attention over [prefix, DOWN(patches)], its patch output brought
    back by nearest interpolation and added to the patches; the prefix tokens skip the attention update."""

    def __init__(self, block: Block, model: VisionTransformer) -> None:
        self.block = block
        self.model = model

    def __call__(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("multi-scale down-sampled attention cannot take attn_mask / is_causal")
        block, prefix = self.block, self.model.num_prefix_tokens
        grid = self.model.multiscale.current_grid
        patches = _to_grid(x[:, prefix:], grid)
        small = F.adaptive_avg_pool2d(patches, (math.ceil(grid[0] / 2), math.ceil(grid[1] / 2)))
        sequence = torch.cat([x[:, :prefix], small.flatten(2).transpose(1, 2)], dim=1)
        y = block.ls1(block.attn(block.norm1(sequence)))[:, prefix:]
        y = F.interpolate(_to_grid(y, small.shape[-2:]), size=grid, mode="nearest").flatten(2).transpose(1, 2)
        x = torch.cat([x[:, :prefix], x[:, prefix:] + block.drop_path1(y)], dim=1)
        return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


class MultiScaleForwardFeatures:
    """Replaces ``VisionTransformer.forward_features`` (an instance attribute): embeds both scales, runs the
    low-scale group through the blocks before the fusion, fuses, and runs the rest. Blocks are called as
    modules, so a patched model's reducing blocks and everyone's hooks work unchanged."""

    def __init__(self, model: VisionTransformer) -> None:
        self.model = model

    def __call__(self, images: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("a multi-scale model cannot take attn_mask / is_causal")
        model = self.model
        fusion: MultiScaleFusion = model.multiscale
        grid = model.patch_embed.dynamic_feat_size(tuple(images.shape[-2:]))
        fusion.current_grid = grid
        x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
        low, low_grid = fusion.low_tokens(images)
        prefix = model.num_prefix_tokens
        # honour timm's activation checkpointing, as forward_features does
        checkpointing = model.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting()

        def run(function, *args: Tensor) -> Tensor:
            return checkpoint(function, *args, use_reentrant=False) if checkpointing else function(*args)

        for index, block in enumerate(model.blocks):
            if index == fusion.fuse_at:
                x = fusion.fuse(x, low, prefix, grid, low_grid)
            x = run(block, x)
            if index < fusion.fuse_at:
                if isinstance(block.__dict__.get("forward"), ReducingBlockForward):
                    raise ValueError(
                        f"block {index} reduces tokens but comes before the multi-scale fusion at block "
                        f"{fusion.fuse_at}; fuse before the first reducing block"
                    )
                # the same weights, unpatched; the block's hooks see the high scale only
                low = run(partial(type(block).forward, block), low)
        return model.norm(x)


def refuse_intermediates(model: nn.Module) -> None:
    """``forward_intermediates`` runs timm's single-scale path: with the multi-scale module on it would silently skip
    the fusion, so its features would not be the ones the model's forward computes."""
    if ATTRIBUTE in model._modules:
        raise ValueError(
            "forward_intermediates runs timm's single-scale path, which skips the multi-scale fusion this model has: "
            "use forward_features (fused), or remove_multiscale(model) first"
        )


class MultiScaleIntermediates:
    """Replaces ``VisionTransformer.forward_intermediates`` while the multi-scale module is on (refused, see
    :func:`refuse_intermediates`); left behind after removal, it is timm's own method again."""

    def __init__(self, model: VisionTransformer) -> None:
        self.model = model

    def __call__(self, *args: object, **kwargs: object) -> object:
        refuse_intermediates(self.model)
        return type(self.model).forward_intermediates(self.model, *args, **kwargs)


def add_multiscale(
    model: VisionTransformer,
    *,
    low_patch_size: int | None = None,
    downsample_blocks: int = 0,
    fuse_at: int | None = None,
) -> VisionTransformer:
    """Add the paper's multi-scale fusion to a timm ViT in place (new parameters under ``model.multiscale``).

    Args:
        model: a timm ``VisionTransformer`` built from timm's ``Block`` (patched or not, in either order).
        low_patch_size: patch size of the low-scale group; ``None`` for twice the model's patch size.
        downsample_blocks: how many of the first blocks attend over down-sampled high-scale tokens (eq. 6);
            at most ``fuse_at``. 0 (default) keeps the pretrained model's output unchanged at first.
        fuse_at: the block before which the groups are fused; ``None`` for the first reducing block of a
            patched model, else the paper's first reducing block ``depth // 4``.

    Returns:
        ``model``. Remove with :func:`remove_multiscale`. ``count_flops`` counts the new work.
    """
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"add_multiscale supports timm VisionTransformer models, got {type(model).__name__}")
    if ATTRIBUTE in model._modules:
        raise ValueError("model already has a multi-scale module; remove_multiscale(model) first")
    if "forward_features" in model.__dict__:
        raise TypeError("model already has an instance-level forward_features; the multi-scale module would replace it")
    depth = len(model.blocks)
    if fuse_at is None:
        config = patch_config(model)
        fuse_at = config.layers[0] if config is not None else default_layers(depth)[0]
    if isinstance(fuse_at, bool) or not isinstance(fuse_at, int) or not 0 <= fuse_at < depth:
        raise ValueError(f"fuse_at must be a block index in 0..{depth - 1}, got {fuse_at!r}")
    if isinstance(downsample_blocks, bool) or not isinstance(downsample_blocks, int):
        raise TypeError(f"downsample_blocks must be an int, got {type(downsample_blocks).__name__}")
    if not 0 <= downsample_blocks <= fuse_at:
        raise ValueError(
            f"downsample_blocks must be in 0..{fuse_at} (the blocks before the fusion), got {downsample_blocks}"
        )
    patch = model.patch_embed.patch_size[0]
    low_patch_size = 2 * patch if low_patch_size is None else low_patch_size
    if isinstance(low_patch_size, bool) or not isinstance(low_patch_size, int) or low_patch_size <= patch:
        raise ValueError(f"low_patch_size must be an int larger than the patch size {patch}, got {low_patch_size!r}")
    if model.cls_token is None:
        raise ValueError("add_multiscale needs a model with a class token")
    if not isinstance(model.patch_drop, nn.Identity):
        raise ValueError("add_multiscale needs the patch grid intact: patch_drop_rate must be 0")
    for index in range(fuse_at + 1):
        block = model.blocks[index]
        if not isinstance(block, Block) or type(block).forward is not Block.forward:
            raise TypeError(f"block {index} is {type(block).__name__}; multi-scale needs timm's Block")
        if index < downsample_blocks:
            check_overridable(block, f"block {index}", ())
    reducing = [layer for layer in (patch_config(model).layers if patch_config(model) else ()) if layer < fuse_at]
    if reducing:
        raise ValueError(f"blocks {reducing} reduce tokens before the fusion at block {fuse_at}")

    param = next(model.parameters())
    fusion = MultiScaleFusion(model, low_patch_size, fuse_at, downsample_blocks).to(param.device, param.dtype)
    model.add_module(ATTRIBUTE, fusion)
    model.__dict__["forward_features"] = MultiScaleForwardFeatures(model)
    if "forward_intermediates" not in model.__dict__ and hasattr(type(model), "forward_intermediates"):
        model.__dict__["forward_intermediates"] = MultiScaleIntermediates(model)  # a patch's own checks it too
    for index in range(downsample_blocks):
        model.blocks[index].__dict__["forward"] = DownsampledAttentionForward(model.blocks[index], model)
    return model


def remove_multiscale(model: VisionTransformer) -> VisionTransformer:
    """Undo :func:`add_multiscale` (its parameters are dropped)."""
    fusion = model._modules.get(ATTRIBUTE)
    if fusion is None:
        return model
    for block in model.blocks:
        if isinstance(block.__dict__.get("forward"), DownsampledAttentionForward):
            del block.__dict__["forward"]
    if isinstance(model.__dict__.get("forward_features"), MultiScaleForwardFeatures):
        del model.__dict__["forward_features"]
    if isinstance(model.__dict__.get("forward_intermediates"), MultiScaleIntermediates):
        del model.__dict__["forward_intermediates"]
    del model._modules[ATTRIBUTE]
    return model


def has_multiscale(model: nn.Module) -> bool:
    return isinstance(getattr(model, "_modules", {}).get(ATTRIBUTE), MultiScaleFusion)


def analytic_extra_flops(model: VisionTransformer, example: Tensor, attention_linear: int, width: int, mlp: int) -> int:
    """Multiply-adds the multi-scale module adds to one image, analytically (for ``count_flops``' cross-check):
    the low-scale embedding and its pass through the blocks before the fusion, the fusion's convolutions, and
    (negative) what eq. 6 saves in the high-scale attention. ``attention_linear`` / ``mlp`` are a block's
    linear multiply-adds per token, ``width`` its attention width."""
    fusion: MultiScaleFusion = model.multiscale
    dim = model.embed_dim
    high = model.patch_embed.dynamic_feat_size(tuple(example.shape[-2:]))
    low = tuple(size // fusion.low_patch_size for size in example.shape[-2:])
    low_tokens, high_patches = 1 + math.prod(low), math.prod(high)
    total = math.prod(low) * fusion.low_proj.in_channels * fusion.low_patch_size**2 * dim
    total += fusion.fuse_at * (low_tokens * (attention_linear + mlp) + 2 * low_tokens**2 * width)
    total += high_patches * dim * (dim + 25 + 49 + dim + 9)  # UP 1x1, LKA 5x5 dw, 7x7 dw, 1x1, PEG 3x3 dw
    prefix = model.num_prefix_tokens
    full, small = prefix + high_patches, prefix + math.ceil(high[0] / 2) * math.ceil(high[1] / 2)
    saved = (full - small) * attention_linear + 2 * (full**2 - small**2) * width
    return total - fusion.downsample_blocks * saved
