"""Tiny timm ViTs of every supported flavour (random weights) and the ../shared paths."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
from timm.layers import LayerNorm
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import Attention, Block, VisionTransformer

from tokenmerge_patch.checkpoint import build_model

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
MNIST_DIR = SHARED / "data" / "mnist"
CIFAR_NPZ = SHARED / "data" / "cifar10" / "test.npz"
MNIST_MODEL = SHARED / "models" / "vit_mnist_tiny"

needs_shared = pytest.mark.skipif(
    not (MNIST_DIR.is_dir() and MNIST_MODEL.is_dir()),
    reason=f"../shared (real MNIST data and pretrained model) not found at {SHARED}",
)

TINY = dict(img_size=32, patch_size=4, embed_dim=32, depth=4, num_heads=2, num_classes=5)


def perturb(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights far from the libraries' near-zero init (timm, Hugging Face, open_clip), so attention is far
    from uniform and every parameter (LayerScale, norms, biases) matters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.2)
    return model.eval()


def _gated_scale_norm() -> VisionTransformer:
    model = VisionTransformer(**TINY)
    for block in model.blocks:
        block.attn = Attention(32, num_heads=2, qkv_bias=True, scale_norm=True, gated=True, norm_layer=LayerNorm)
    return model


FLAVOURS = {
    "vit": lambda: VisionTransformer(**TINY),
    "distilled": lambda: VisionTransformerDistilled(**TINY),
    "layerscale_deit3": lambda: VisionTransformer(**TINY, init_values=0.5, no_embed_class=True),
    "registers_dinov2": lambda: VisionTransformer(**TINY, init_values=0.5, reg_tokens=4, no_embed_class=True),
    "qk_norm": lambda: VisionTransformer(**TINY, qk_norm=True),
    "dynamic": lambda: VisionTransformer(**TINY, dynamic_img_size=True),
    "avg_pool": lambda: VisionTransformer(**TINY, global_pool="avg", fc_norm=True),
}
# flavours only newer timm versions can build (CI runs the newest; older ones skip them)
HAS_ATTN_HEAD_DIM = "attn_head_dim" in inspect.signature(Attention.__init__).parameters
if HAS_ATTN_HEAD_DIM:
    FLAVOURS["head_dim"] = lambda: build_model({**TINY, "attn_head_dim": 24, "act_layer": "relu", "qkv_bias": False})
if "gated" in inspect.signature(Attention.__init__).parameters:  # timm >= 1.0.31
    FLAVOURS["gated_scale_norm"] = _gated_scale_norm

# Block.forward(attn_mask=...) arrived after timm 1.0.15: what prop_attn and mask refusal need
HAS_ATTN_MASK = "attn_mask" in inspect.signature(Block.forward).parameters
needs_attn_mask = pytest.mark.skipif(not HAS_ATTN_MASK, reason="this timm's Block.forward takes no attn_mask")


def make_model(flavour: str, seed: int = 0) -> VisionTransformer:
    torch.manual_seed(seed)
    return perturb(FLAVOURS[flavour](), seed)


def model_snapshot(model: torch.nn.Module) -> tuple:
    """Everything a failed call must leave as it was: parameters and buffers, which instance attributes each
    module has (and of which type: a patch's overrides), hooks, train flags, and the patch configuration."""
    from tokenmerge_patch import patch_config

    modules = {
        name: (
            sorted((key, type(value).__name__) for key, value in module.__dict__.items() if not key.startswith("_")),
            len(module._forward_pre_hooks),
            len(module._forward_hooks),
            module.training,
        )
        for name, module in model.named_modules()
    }
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, modules, patch_config(model)


def assert_untouched(model: torch.nn.Module, before: tuple) -> None:
    state, modules, config = model_snapshot(model)
    assert state.keys() == before[0].keys() and all(torch.equal(state[k], before[0][k]) for k in state)
    assert modules == before[1]
    assert config == before[2]


def assert_patch_refused(model: torch.nn.Module, error: type[Exception], match: str) -> None:
    """``tokenmerge_patch.patch(model)`` raises ``error`` matching ``match`` and leaves ``model`` as it was."""
    from tokenmerge_patch import patch

    before = model_snapshot(model)
    with pytest.raises(error, match=match):
        patch(model)
    assert_untouched(model, before)
