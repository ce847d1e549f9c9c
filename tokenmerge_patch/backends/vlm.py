"""Vision-language models: a tower plus a contract.

The tower (CLIP in LLaVA, SigLIP in PaliGemma) is patched by the Hugging Face backend it already has; this adapter
only states the contract with the language model: which layer of the tower the LLM reads (LLaVA's
``vision_feature_layer``, PaliGemma's last layer), whether the class token is dropped
(``vision_feature_select_strategy``), and how many image tokens a prompt must carry per image. The LLM is never
touched: it receives fewer image features, and the prompt carries as many placeholder tokens
(:func:`tokenmerge_patch.visual_token_count`, :func:`tokenmerge_patch.patch_processor`).

Supported: ``LlavaForConditionalGeneration`` / ``LlavaModel`` (CLIP tower) and ``PaliGemmaForConditionalGeneration`` /
``PaliGemmaModel`` (SigLIP tower). LLaVA-NeXT, LLaVA-OneVision, Gemma 3 and Idefics3/SmolVLM are refused with the
reason: they lay each crop's features back out on the patch grid (unpadding with a newline token per row, 2-D
pooling or pixel shuffle), which a reduced set of tokens no longer fills.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from functools import cache
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor, nn

from . import hf
from .shared import check_overridable

if TYPE_CHECKING:
    from ..patch import PatchConfig, TokenMergeState

SUPPORTED_VLM = (
    "transformers LlavaForConditionalGeneration and LlavaModel (a CLIP tower), PaliGemmaForConditionalGeneration and "
    "PaliGemmaModel (a SigLIP tower)"
)
# families that lay image features back out on the patch grid after the tower: no reduced token set fills it
GRID_BOUND = {
    "LlavaNext": "LLaVA-NeXT packs each crop's features back onto its patch grid (unpadding, a newline token per row)",
    "LlavaNextVideo": "LLaVA-NeXT-Video packs each crop's features back onto its patch grid",
    "LlavaOnevision": "LLaVA-OneVision packs each crop's features back onto its patch grid (unpadding, newline tokens)",
    "Gemma3": "Gemma 3 pools the SigLIP features 4x4 on the patch grid before its language model",
    "Idefics3": "Idefics3 shuffles the SigLIP features on the patch grid (pixel shuffle) before its language model",
    "SmolVLM": "SmolVLM shuffles the SigLIP features on the patch grid (pixel shuffle) before its language model",
}


class Contract(NamedTuple):
    """What the language model reads from the tower."""

    inner: nn.Module  # the model holding vision_tower, multi_modal_projector, language_model
    tower: nn.Module  # the vision tower (a CLIPVisionModel / SiglipVisionModel)
    read_layer: int  # 0-based index of the tower layer whose output the LLM reads
    keeps_prefix: bool  # whether the LLM reads the prefix (class) token too


@cache
def _classes() -> dict[type, str]:
    """Supported classes -> attribute of the inner model (``""``: the model itself)."""
    from transformers.models.llava import modeling_llava as llava
    from transformers.models.paligemma import modeling_paligemma as paligemma

    return {
        llava.LlavaForConditionalGeneration: "model",
        llava.LlavaModel: "",
        paligemma.PaliGemmaForConditionalGeneration: "model",
        paligemma.PaliGemmaModel: "",
    }


def _is_transformers_model(model: nn.Module) -> bool:
    modeling_utils = sys.modules.get("transformers.modeling_utils")
    return modeling_utils is not None and isinstance(model, modeling_utils.PreTrainedModel)


def contract(model: nn.Module) -> Contract:
    """The tower and what the LLM reads of it; ``TypeError``/``ValueError`` saying why for anything else."""
    name = type(model).__name__
    for start, why in GRID_BOUND.items():
        if name.startswith(start):
            raise TypeError(
                f"{name} is not supported: {why}, which a reduced set of tokens no longer fills. tokenmerge_patch "
                f"supports {SUPPORTED_VLM}"
            )
    path = next((path for cls, path in _classes().items() if isinstance(model, cls)), None)
    if path is None:
        raise TypeError(f"tokenmerge_patch supports {SUPPORTED_VLM}; got {name}")
    inner = getattr(model, path) if path else model
    tower = inner.vision_tower
    depth = len(hf.BACKEND.blocks(tower))
    config = inner.config
    layer = getattr(config, "vision_feature_layer", -1)  # PaliGemma: the tower's last hidden state
    if not isinstance(layer, int):
        raise ValueError(
            f"{name} reads several tower layers (vision_feature_layer={layer!r}) and concatenates them per token; "
            "tokenmerge_patch reduces the tokens of one layer: use a model that reads one"
        )
    index = layer % (depth + 1) - 1  # hidden_states[0] is the embedding, hidden_states[i] leaves layer i - 1
    if index < 0:
        raise ValueError(f"{name} reads the tower's embeddings (vision_feature_layer={layer}): nothing to reduce")
    strategy = getattr(config, "vision_feature_select_strategy", "full")
    return Contract(inner, tower, index, strategy != "default")


class VLMImageFeatures(nn.Module):
    """The image features the language model receives, ``[B, K, D]``: the VLM's own ``get_image_features`` (tower,
    layer selection, projector) as a module of images alone, for :func:`~tokenmerge_patch.count_flops`,
    :func:`~tokenmerge_patch.calibrate` and :func:`~tokenmerge_patch.patch.token_counts`."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, pixel_values: Tensor) -> Tensor:
        features = self.inner.get_image_features(pixel_values=pixel_values).pooler_output
        return torch.stack(list(features)) if isinstance(features, (list, tuple)) else features


class CheckedPlaceholders:
    """Replaces the inner model's ``get_placeholder_mask``: a prompt whose image tokens do not match the features the
    patched tower gives (a prompt made for the unpatched model) gets a ``ValueError`` that says what to do, instead of
    a shape error deep inside transformers."""

    def __init__(self, inner: nn.Module, model: nn.Module) -> None:
        self.inner, self.model = inner, model

    def __call__(self, input_ids: Tensor | None, inputs_embeds: Tensor, image_features: Tensor) -> Tensor:
        inner = self.inner
        if input_ids is not None:
            carried = int((input_ids == inner.config.image_token_id).sum())
            given = image_features.numel() // inputs_embeds.shape[-1]  # LLaVA: [images * K, D]; PaliGemma [B, K, D]
            if carried != given:
                from ..vlm import visual_token_count

                raise ValueError(
                    f"the prompt carries {carried} image tokens but the patched vision tower gives {given} image "
                    f"features ({visual_token_count(self.model)} per image): tokenmerge_patch.patch_processor("
                    "processor, model) makes the processor emit tokenmerge_patch.visual_token_count(model) image "
                    "tokens per image"
                )
        return type(inner).get_placeholder_mask(
            inner, input_ids, inputs_embeds=inputs_embeds, image_features=image_features
        )


class VLMBackend:
    """A vision-language model: its tower is patched by the Hugging Face backend, with the same state."""

    name = "hf-vlm"

    def claims(self, model: nn.Module) -> bool:
        if not _is_transformers_model(model):
            return False
        name = type(model).__name__
        return any(name.startswith(start) for start in GRID_BOUND) or any(isinstance(model, cls) for cls in _classes())

    def blocks(self, model: nn.Module) -> Sequence[nn.Module]:
        return hf.BACKEND.blocks(contract(model).tower)

    def check(self, model: nn.Module, config: PatchConfig) -> int:
        terms = contract(model)
        if config.dense:
            raise ValueError(
                f"dense=True keeps every patch token, but the language model of {type(model).__name__} is what fewer "
                "image tokens are for: patch it without dense (visual_tokens=K, or layers/keep_rate/flops)"
            )
        check_overridable(terms.inner, "the model's get_placeholder_mask", (CheckedPlaceholders,))
        return hf.BACKEND.check(terms.tower, config)

    def install(self, model: nn.Module, state: TokenMergeState) -> None:
        terms = contract(model)
        hf.BACKEND.install(terms.tower, state)
        state.override(terms.inner, "get_placeholder_mask", CheckedPlaceholders(terms.inner, model))

    def image_model(self, model: nn.Module) -> nn.Module:
        return VLMImageFeatures(contract(model).inner)

    def num_prefix(self, model: nn.Module) -> int:
        return hf.BACKEND.num_prefix(contract(model).tower)

    def has_class_token(self, model: nn.Module) -> bool:
        return hf.BACKEND.has_class_token(contract(model).tower)

    def input_size(self, model: nn.Module) -> tuple[int, int, int]:
        return hf.BACKEND.input_size(contract(model).tower)

    def class_token_head(self, model: nn.Module) -> bool:
        """The LLM reads the patch tokens of its layer; the tower's last layer feeds nothing when that layer is
        before it (LLaVA reads the second-to-last), so the ``flops=`` rule may keep one token there."""
        terms = contract(model)
        return terms.read_layer < len(self.blocks(model)) - 1

    def tokens_of(self, block_output: object) -> int:
        return hf.BACKEND.tokens_of(block_output)

    def block_parts(self, block: nn.Module) -> tuple[nn.Module, nn.Module, int]:
        return hf.BACKEND.block_parts(block)


BACKEND = VLMBackend()
