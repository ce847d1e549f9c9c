"""tokenmerge_patch: make a pretrained Vision Transformer cheaper in place, without retraining.

``patch(model, layers=None, keep_rate=0.7)`` makes the chosen blocks keep the tokens the class token
attends to most and merge every other token into its most similar kept token (arXiv 2306.04897).

>>> import timm, torch, tokenmerge_patch
>>> model = timm.create_model("deit_tiny_patch16_224")
>>> _ = tokenmerge_patch.patch(model, keep_rate=0.7)
>>> model(torch.randn(2, 3, 224, 224)).shape
torch.Size([2, 1000])
>>> _ = tokenmerge_patch.unpatch(model)
"""

from .calibration import calibrate
from .dense import unmerge
from .export import export_onnx
from .finetune import EpochStats, StepInfo, finetune
from .flops import FlopReport, count_flops
from .model_info import ModelInfo, describe
from .patch import (
    LayerRecord,
    PatchConfig,
    is_patched,
    patch,
    patch_config,
    reduction_trace,
    set_keep_rate,
    token_counts,
    unpatch,
)
from .reduce import kept_count, reduce_tokens
from .schedule import default_layers
from .training import HealReport, heal
from .vis import show_merges
from .vlm import count_vlm_flops, llm_prefill_flops, patch_processor, unpatch_processor, visual_token_count

__all__ = [
    "EpochStats",
    "FlopReport",
    "HealReport",
    "LayerRecord",
    "ModelInfo",
    "PatchConfig",
    "StepInfo",
    "calibrate",
    "count_flops",
    "count_vlm_flops",
    "default_layers",
    "describe",
    "export_onnx",
    "finetune",
    "heal",
    "is_patched",
    "kept_count",
    "llm_prefill_flops",
    "patch",
    "patch_config",
    "patch_processor",
    "reduce_tokens",
    "reduction_trace",
    "set_keep_rate",
    "show_merges",
    "token_counts",
    "unmerge",
    "unpatch",
    "unpatch_processor",
    "visual_token_count",
]
__version__ = "0.1.0"
