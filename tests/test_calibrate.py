"""calibrate(): deterministic, within the budget, the model untouched, every data form, better than the data-free
rule on its own images, timm and Hugging Face, and clear errors for bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from tiny_models import assert_untouched, model_snapshot
from torch.utils.data import DataLoader, TensorDataset

import tokenmerge_patch as tm

SIZE = (3, 32, 32)
FAST = dict(images=24, batch_size=12, max_block_runs=30, progress=False)


def deep_tiny(seed: int = 0) -> VisionTransformer:
    """6 blocks on a 8x8 patch grid, weights far from init so attention is far from uniform."""
    torch.manual_seed(seed)
    model = VisionTransformer(img_size=32, patch_size=4, embed_dim=32, depth=6, num_heads=2, num_classes=10)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.2)
    return model.eval()


def calibration_images(n: int = 24) -> torch.Tensor:
    return torch.randn(n, *SIZE, generator=torch.Generator().manual_seed(3))


def fraction(model: torch.nn.Module, plan: tm.PatchConfig) -> float:
    full = tm.count_flops(tm.unpatch(model), SIZE).total
    reduced = tm.count_flops(tm.patch(model, config=plan), SIZE).total
    tm.unpatch(model)
    return reduced / full


def kl_to_unpatched(model: torch.nn.Module, images: torch.Tensor, **patch_args: object) -> float:
    with torch.no_grad():
        target = tm.unpatch(model)(images).log_softmax(-1)
        tm.patch(model, **patch_args)
        output = model(images).log_softmax(-1)
        tm.unpatch(model)
    return float(F.kl_div(output, target, log_target=True, reduction="batchmean"))


def test_calibrate_is_deterministic_within_budget_and_leaves_the_model_alone() -> None:
    model = deep_tiny()
    before = model_snapshot(model)
    plan = tm.calibrate(model, calibration_images(), flops=0.6, **FAST)
    assert_untouched(model, before)
    assert plan == tm.calibrate(model, calibration_images(), flops=0.6, **FAST)
    assert 0.59 <= fraction(model, plan) <= 0.6
    assert plan.depth == 6 and plan.prop_attn and plan.method == "merge"


@pytest.mark.parametrize("keep_norm", [False, True])
def test_a_given_keep_norm_is_kept(keep_norm: bool) -> None:
    """keep_norm=None lets the search decide; a value given stays in the plan (e.g. the paper's plain eq. 4)."""
    plan = tm.calibrate(deep_tiny(), calibration_images(), flops=0.6, keep_norm=keep_norm, **FAST)
    assert plan.keep_norm is keep_norm
    plain = tm.calibrate(deep_tiny(), calibration_images(), flops=0.6, prop_attn=False, keep_norm=False, **FAST)
    assert not plain.prop_attn and not plain.keep_norm


def test_a_patched_model_keeps_its_patch() -> None:
    model = tm.patch(deep_tiny(), layers=(2,), keep_rate=0.5)
    model.train()
    before = model_snapshot(model)
    tm.calibrate(model, calibration_images(), flops=0.7, **FAST)
    assert_untouched(model, before)
    assert model.training


def test_calibrated_plan_beats_the_data_free_rule_on_its_images() -> None:
    model = deep_tiny()
    images = calibration_images()
    plan = tm.calibrate(model, images, flops=0.6, **FAST)
    calibrated = kl_to_unpatched(model, images, config=plan)
    rule = kl_to_unpatched(model, images, flops=0.6)
    assert calibrated <= rule, (calibrated, rule)


def test_every_data_form_gives_the_same_plan() -> None:
    model = deep_tiny()
    images = calibration_images()
    expected = tm.calibrate(model, images, flops=0.7, **FAST)
    labels = torch.arange(len(images)) % 10
    forms = [
        list(images.split(5)),  # batches of images
        DataLoader(TensorDataset(images, labels), batch_size=7),  # (images, labels), labels ignored
        [{"pixel_values": chunk} for chunk in images.split(8)],  # Hugging Face style
        torch.cat([images, calibration_images(10)]),  # more than `images`: the first 24 are used
    ]
    for data in forms:
        assert tm.calibrate(model, data, flops=0.7, **FAST) == expected


def test_hugging_face_models_calibrate() -> None:
    pytest.importorskip("transformers")
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=32, patch_size=4, hidden_size=32, num_hidden_layers=6, num_attention_heads=2,
        intermediate_size=64, num_labels=10,
    )  # fmt: skip
    torch.manual_seed(0)
    model = ViTForImageClassification(config).eval()
    before = model_snapshot(model)
    plan = tm.calibrate(model, calibration_images(), flops=0.65, **FAST)
    assert_untouched(model, before)
    assert 0.64 <= fraction(model, plan) <= 0.65


@pytest.mark.parametrize(
    "data, error, match",
    [
        (torch.zeros(0, *SIZE), ValueError, "no images"),
        ([], ValueError, "no images"),
        (
            torch.zeros(4, 3, 16, 16),
            ValueError,
            r"data images \(3, 16, 16\) \(C, H, W\): the model is built for \(3, 32, 32\) and does not take",
        ),
        (torch.zeros(4, 32, 32), ValueError, r"\[N, C, H, W\]"),
        (torch.zeros(4, *SIZE, dtype=torch.uint8), ValueError, "normalised float"),
        ("images/", TypeError, "data must be a float tensor"),
        (42, TypeError, "data must be a float tensor"),
        ([("not", "images")], TypeError, "a batch must be"),
    ],
)
def test_bad_data_is_refused_and_the_model_left_alone(data: object, error: type, match: str) -> None:
    model = tm.patch(deep_tiny(), layers=(2,), keep_rate=0.5)
    before = model_snapshot(model)
    with pytest.raises(error, match=match):
        tm.calibrate(model, data, flops=0.6, **FAST)
    assert_untouched(model, before)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(flops=1.2), ValueError, r"flops must be in \(0, 1\)"),
        (dict(flops=0.0), ValueError, r"flops must be in \(0, 1\)"),
        (dict(flops="0.5"), TypeError, "flops must be a number"),
        (dict(flops=0.5, images=0), ValueError, "images must be an int >= 1"),
        (dict(flops=0.5, batch_size=2.5), ValueError, "batch_size must be an int >= 1"),
        (dict(flops=0.5, method="nope"), ValueError, "method must be one of"),
        (dict(flops=0.5, max_block_runs=-1), ValueError, "max_block_runs"),
    ],
)
def test_bad_options_are_refused(kwargs: dict, error: type, match: str) -> None:
    model = deep_tiny()
    before = model_snapshot(model)
    with pytest.raises(error, match=match):
        tm.calibrate(model, calibration_images(), progress=False, **kwargs)
    assert_untouched(model, before)
