"""Backends: thin adapters that say where a model's class-token scores come from, which tokens are
prefix tokens, and where in a block the reduction happens. The reduction itself is ``reduce.py``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from torch import nn

if TYPE_CHECKING:
    from ..patch import PatchConfig, TokenMergeState


class Backend(Protocol):
    name: str

    def claims(self, model: nn.Module) -> bool:
        """Whether this backend handles ``model``'s family (even if some blocks are unsupported)."""

    def blocks(self, model: nn.Module) -> Sequence[nn.Module]:
        """The transformer blocks, in order."""

    def check(self, model: nn.Module, config: PatchConfig) -> int:
        """Raise ``TypeError``/``ValueError`` if ``model`` cannot be patched with ``config`` (e.g. at
        ``config.layers``); return the number of prefix tokens."""

    def install(self, model: nn.Module, state: TokenMergeState) -> None:
        """Install the reduction through ``state.override`` only (so ``unpatch`` can take it all back)."""

    def input_size(self, model: nn.Module) -> tuple[int, int, int]:
        """``(channels, height, width)`` of the images the model is built for."""

    def num_prefix(self, model: nn.Module) -> int:
        """Tokens before the patch tokens (class, distillation, register tokens)."""

    def has_class_token(self, model: nn.Module) -> bool:
        """Whether the first token is a class token."""

    def class_token_head(self, model: nn.Module) -> bool:
        """Whether the model's output reads only the prefix tokens after its last block (a class-token head):
        then the last block's patch tokens feed nothing, and reducing them to one costs no accuracy."""

    def tokens_of(self, block_output: object) -> int:
        """Number of tokens in what a block returned."""

    def block_parts(self, block: nn.Module) -> tuple[nn.Module, nn.Module, int]:
        """A block's attention module, its MLP module, and the attention width (heads x head dim)."""


SUPPORTED = (
    "timm VisionTransformer models built from timm's Block and Attention (vit_*, deit_*, deit_*_distilled, "
    "deit3_*, *_dinov2, register-token models, qk-norm models, SigLIP and other models without a class token), timm "
    "Eva models built from EvaBlock with EvaAttention or AttentionRope (RoPE: eva02_*, *_dinov3, vit_*_rope_*), "
    "Hugging Face transformers ViT, DeiT, Dinov2 (with or without registers), DINOv3 ViT, CLIP and SigLIP vision "
    "models, CLIPModel and SiglipModel, open_clip ViT image towers (open_clip.create_model('ViT-*'), alone or in the "
    "CLIP model), and the vision towers of transformers LLaVA and PaliGemma models"
)


def _backends() -> list[Backend]:
    # hf.py imports transformers only once it meets a transformers model, and openclip.py open_clip only once it meets
    # an open_clip model: timm users never pay for either
    from . import hf, openclip, timm, timm_eva, vlm

    return [timm.BACKEND, timm_eva.BACKEND, vlm.BACKEND, hf.BACKEND, openclip.BACKEND]


def image_model(model: nn.Module) -> nn.Module:
    """The module that maps a batch of images to ``model``'s image output (what ``count_flops``, ``token_counts``
    and ``calibrate`` run): ``model`` itself, except for multimodal models whose forward wants text too (Hugging
    Face ``CLIPModel``: its ``get_image_features``). A backend says so with an optional ``image_model`` method."""
    backend = find_backend(model)
    get = getattr(backend, "image_model", None)
    return model if get is None else get(model)


def find_backend(model: nn.Module) -> Backend:
    """The backend that handles ``model``; ``TypeError`` naming what is supported otherwise."""
    for backend in _backends():
        if backend.claims(model):
            return backend
    raise TypeError(f"tokenmerge_patch supports {SUPPORTED}; got {type(model).__module__}.{type(model).__name__}")
