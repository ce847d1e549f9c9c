"""Vision-language models: fewer image tokens for the language model to read.

A LLaVA-1.5 hands its language model 576 CLIP tokens per image, and the LLM's prefill over them, not the vision
tower, is the bill. ``patch(vlm, visual_tokens=K)`` patches the tower so that the layer the LLM reads gives ``K``
tokens per image: by default one reduction in that very layer (the tower's features are computed on every patch,
as LLaVA-PruMerge and VisionZip do), or spread over ``layers=`` (which also saves tower FLOPs). The prompt must then
carry ``K`` image placeholder tokens per image: :func:`patch_processor` makes the model's processor emit them, and
:func:`visual_token_count` says how many.

>>> import torch, tokenmerge_patch as tm
>>> from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
>>> vision = CLIPVisionConfig(image_size=32, patch_size=4, hidden_size=32, num_hidden_layers=4,
...                           num_attention_heads=2, intermediate_size=64)
>>> text = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
...                    vocab_size=100)
>>> vlm = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text, image_token_id=99))
>>> tm.visual_token_count(vlm)  # 8 x 8 patches; the class token dropped ("default" strategy)
64
>>> _ = tm.patch(vlm, visual_tokens=16)
>>> tm.visual_token_count(vlm)
16
>>> ids = torch.tensor([[1] + [99] * 16 + [5, 6]])  # a prompt with 16 image tokens
>>> vlm(input_ids=ids, pixel_values=torch.randn(1, 3, 32, 32)).logits.shape
torch.Size([1, 19, 100])
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from numbers import Integral

import torch
from torch import Tensor, nn

from .backends import vlm as adapter
from .budget import keep_rates_for_counts, token_counts_for
from .model_info import ModelInfo, describe
from .plan import PatchConfig

__all__ = [
    "VLMFlops",
    "count_vlm_flops",
    "llm_prefill_flops",
    "patch_processor",
    "unpatch_processor",
    "visual_token_count",
]


def _vlm_info(model: nn.Module) -> tuple[ModelInfo, adapter.Contract]:
    info = describe(model)
    if info.backend is not adapter.BACKEND:
        raise TypeError(f"expected a vision-language model ({adapter.SUPPORTED_VLM}), got {type(info.model).__name__}")
    return info, adapter.contract(info.model)


def _patch_count(info: ModelInfo, terms: adapter.Contract) -> int:
    """Patch tokens the tower makes of an image of its input size."""
    size = terms.tower.config.patch_size
    _, height, width = info.input_size
    return (height // size) * (width // size)


def visual_token_count(model: nn.Module) -> int:
    """Image placeholder tokens a prompt must carry per image for ``model`` as it is now (patched or not): the
    tokens the language model reads from the tower's layer, the class token counted only where the model keeps it.

    >>> import tokenmerge_patch as tm
    >>> from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    >>> vision = CLIPVisionConfig(image_size=32, patch_size=4, hidden_size=32, num_hidden_layers=4,
    ...                           num_attention_heads=2, intermediate_size=64)
    >>> text = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    >>> vlm = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text))
    >>> tm.visual_token_count(vlm), tm.visual_token_count(tm.patch(vlm, keep_rate=0.5))
    (64, 16)
    """
    from .patch import patch_config

    info, terms = _vlm_info(model)
    patches, prefix = _patch_count(info, terms), info.num_prefix
    config = patch_config(info.model)
    tokens = prefix + patches
    if config is not None:
        counts = token_counts_for(tokens, prefix, info.depth, config.layers, config.keep_rates, config.method)
        tokens = counts[terms.read_layer][1]
    return tokens - (0 if terms.keeps_prefix else prefix)


def visual_plan(info: ModelInfo, visual_tokens: object, layers: Sequence[int] | None, base: PatchConfig) -> PatchConfig:
    """The plan that leaves ``visual_tokens`` image features per image at the layer the LLM reads: one reduction in
    that layer (``layers=None``), or geometric steps over ``layers`` (all at or before it) that end there."""
    terms = adapter.contract(info.model)
    if isinstance(visual_tokens, bool) or not isinstance(visual_tokens, Integral):
        raise TypeError(f"visual_tokens must be an int, got {type(visual_tokens).__name__}")
    patches, prefix = _patch_count(info, terms), info.num_prefix
    extra = prefix if terms.keeps_prefix else 0  # the LLM reads the class token too ("full" strategy)
    low, high = 1 + extra, patches + extra
    if not low <= visual_tokens <= high:
        raise ValueError(
            f"visual_tokens must be in [{low}, {high}] for this model ({patches} patch tokens per image at "
            f"{info.input_size[1]}x{info.input_size[2]}{', plus the class token it reads' if extra else ''}), "
            f"got {visual_tokens}"
        )
    read = terms.read_layer
    if layers is None:
        layers = (read,)
    else:
        layers = tuple(sorted({int(layer) for layer in layers}))
        if not layers or layers[0] < 0 or layers[-1] > read:
            raise ValueError(
                f"with visual_tokens, layers must be tower layers at or before {read}, the layer the language model "
                f"reads; got {list(layers)}"
            )
    keep = int(visual_tokens) - extra
    steps = len(layers)
    counts = [max(keep, math.ceil(patches * (keep / patches) ** (j / steps) - 1e-9)) for j in range(1, steps + 1)]
    if base.method == "fuse":
        counts[-1] = keep - 1  # the fused token is the last one
        if counts[-1] < 1:
            raise ValueError("method='fuse' adds its fused token to at least one kept token: visual_tokens too small")
    plan = replace(base, layers=layers, keep_rates=keep_rates_for_counts(patches, counts), depth=info.depth)
    reached = token_counts_for(prefix + patches, prefix, info.depth, plan.layers, plan.keep_rates, plan.method)
    if reached[read][1] - prefix != keep:
        raise ValueError(
            f"method={plan.method!r} cannot reach {visual_tokens} visual tokens over layers {list(layers)} (bipartite "
            f"merges at most half the tokens per layer): spread it over more layers"
        )
    return plan


# -- processors -------------------------------------------------------------------------------------------------
_PROCESSOR = "_tokenmerge_processor"


class _ImageTokens:
    """Replaces a processor's ``replace_image_token``: ``count`` placeholder tokens per image."""

    def __init__(self, processor: object, count: int) -> None:
        self.processor, self.count = processor, count

    def __call__(self, image_inputs: dict, image_idx: int, **kwargs: object) -> str:
        return self.processor.image_token * self.count


def patch_processor(processor: object, model: nn.Module) -> object:
    """Make ``processor`` (the model's Hugging Face ``LlavaProcessor`` / ``PaliGemmaProcessor``) put
    :func:`visual_token_count` image tokens per image into the prompts it builds, in place; returns it.
    :func:`unpatch_processor` undoes it. Call it again after re-patching the model with another count.

    Raises:
        TypeError: a processor that does not expand image placeholder tokens, or a model that is not a VLM.
    """
    count = visual_token_count(model)
    if not callable(getattr(processor, "replace_image_token", None)) or not hasattr(processor, "image_token"):
        raise TypeError(
            f"processor must be the model's Hugging Face processor (LlavaProcessor, PaliGemmaProcessor: one that "
            f"expands image placeholder tokens), got {type(processor).__name__}"
        )
    unpatch_processor(processor)
    saved = {
        name: processor.__dict__[name]
        for name in ("replace_image_token", "image_seq_length")
        if name in processor.__dict__
    }
    processor.__dict__[_PROCESSOR] = saved
    processor.__dict__["replace_image_token"] = _ImageTokens(processor, count)
    if "image_seq_length" in processor.__dict__:  # PaliGemma's count, read elsewhere in its processor
        processor.__dict__["image_seq_length"] = count
    return processor


def unpatch_processor(processor: object) -> object:
    """Undo :func:`patch_processor` (a no-op on a processor it did not change); returns the processor."""
    saved = processor.__dict__.pop(_PROCESSOR, None)
    if saved is not None:
        processor.__dict__.pop("replace_image_token", None)
        processor.__dict__.update(saved)
    return processor


# -- FLOPs of the whole VLM -------------------------------------------------------------------------------------
@dataclass
class VLMFlops:
    """FLOPs (one multiply-add = one flop) of one VLM forward over a prompt: the image side and the language model's
    prefill (every prompt token, image tokens included, plus the logits of the last one).

    Attributes:
        images: images in the prompt.
        image_tokens: image tokens per image the language model reads.
        text_tokens: the prompt's other tokens.
        image_side: tower and projector, all images.
        prefill: the language model over ``text_tokens + images * image_tokens`` tokens.
    """

    images: int
    image_tokens: int
    text_tokens: int
    image_side: int
    prefill: int

    @property
    def total(self) -> int:
        return self.image_side + self.prefill


class _LanguageModel(nn.Module):
    """The language model over input embeddings, with the logits of the last token: what a prefill runs."""

    def __init__(self, model: nn.Module, inner: nn.Module) -> None:
        super().__init__()
        self.language_model = inner.language_model
        self.lm_head = getattr(model, "lm_head", None)

    def forward(self, embeddings: Tensor) -> Tensor:
        hidden = self.language_model(inputs_embeds=embeddings, use_cache=False).last_hidden_state
        return hidden if self.lm_head is None else self.lm_head(hidden[:, -1:])


def count_vlm_flops(model: nn.Module, text_tokens: int = 64, images: int = 1) -> VLMFlops:
    """FLOPs of ``model`` (patched or not) answering a prompt of ``text_tokens`` text tokens and ``images`` images at
    the tower's input size: the tower and projector per image (:func:`~tokenmerge_patch.count_flops`) and the
    language model's prefill over every prompt token (fvcore, with fused attention counted in full).

    Raises:
        TypeError: not a supported VLM; ValueError: counts below 0 (text) or 1 (images).
    """
    from .flops import count_flops, count_module_flops

    info, terms = _vlm_info(model)
    for name, value, least in (("text_tokens", text_tokens, 0), ("images", images, 1)):
        if isinstance(value, bool) or not isinstance(value, Integral) or value < least:
            raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
    per_image = visual_token_count(model)
    length = int(text_tokens) + int(images) * per_image
    image_side = count_flops(model).total * int(images)
    language = _LanguageModel(info.model, terms.inner)
    width = terms.inner.config.get_text_config().hidden_size
    param = next(language.parameters())
    example = torch.zeros(1, length, width, dtype=param.dtype, device=param.device)
    prefill = count_module_flops(language, example)
    return VLMFlops(int(images), per_image, int(text_tokens), image_side, prefill)


def llm_prefill_flops(config: object, tokens: int, logits: int = 1) -> int:
    """Multiply-adds of a Llama/Qwen/Gemma-shaped decoder's prefill over ``tokens`` tokens, from its config alone
    (no weights: for shapes too large to build, e.g. a 7B): per layer the q/k/v/o projections (grouped-query keys
    and values), the gated MLP, and attention's ``q k^T`` and ``attn v`` over the whole ``tokens x tokens`` square (as
    :func:`count_vlm_flops` counts fused attention), plus the LM head for ``logits`` tokens.

    >>> from transformers import LlamaConfig
    >>> llm_prefill_flops(LlamaConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1,
    ...                               num_attention_heads=2, num_key_value_heads=1, vocab_size=10), tokens=4)
    2640
    """
    width = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or width // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    projections = width * head_dim * (2 * heads + 2 * kv_heads)
    mlp = 3 * width * config.intermediate_size
    attention = 2 * tokens * tokens * heads * head_dim
    per_layer = tokens * (projections + mlp) + attention
    return config.num_hidden_layers * per_layer + logits * width * config.vocab_size
