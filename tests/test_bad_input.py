"""Bad input to every public function gets a clear TypeError/ValueError naming what is wrong, and leaves the
model exactly as it was (parameters, buffers, instance attributes, hooks, train flags, patch configuration)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import assert_untouched, make_model, model_snapshot
from torch.utils.data import DataLoader, TensorDataset

import tokenmerge_patch as tm

IMAGES = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))

PATCH_CASES = [
    (dict(layers=(1, 9)), ValueError, r"block index 9 is out of range; the model has blocks 0\.\.3"),
    (dict(layers=(1, 1)), ValueError, "must not repeat a block"),
    (dict(layers=()), ValueError, "at least one block"),
    (dict(layers="1,2"), TypeError, "layers must be None, an int or a sequence of ints"),
    (dict(layers=(1.5,)), TypeError, "layers must hold block indices"),
    (dict(layers=(True,)), TypeError, "layers must hold block indices"),
    (dict(keep_rate=0.0), ValueError, r"keep_rate must be in \(0, 1\]"),
    (dict(keep_rate=1.2), ValueError, r"keep_rate must be in \(0, 1\]"),
    (dict(keep_rate=float("nan")), ValueError, r"keep_rate must be in \(0, 1\]"),
    (dict(keep_rate="0.7"), TypeError, "keep_rate must be a float"),
    (dict(layers=(1, 2), keep_rate=(0.5,)), ValueError, "keep_rate has 1 rates but 2 layers"),
    (dict(method="tome"), ValueError, "method must be one of"),
    (dict(similarity="dot"), ValueError, "similarity must be one of"),
    (dict(method="drop", similarity="l2"), ValueError, "similarity applies to method='merge' only"),
    (dict(method="fuse", size_weighted=True), ValueError, "size_weighted applies to method='merge' only"),
    (dict(prop_attn=1), TypeError, "prop_attn must be a bool"),
    (dict(method="fuse", prop_attn=True), ValueError, "prop_attn does not apply to method='fuse'"),
    (dict(trace_source="yes"), TypeError, "trace_source must be a bool"),
    (dict(seed=1.5), TypeError, "seed must be an int"),
    (dict(flops=1.0), ValueError, r"flops must be in \(0, 1\)"),
    (dict(flops=0.5, keep_rate=0.5), ValueError, "either flops="),
    (dict(config={"layers": [9], "keep_rates": [0.5]}), ValueError, "do not fit a model"),
    (dict(config=[1, 2]), TypeError, "config must be a PatchConfig or its to_dict"),
]


@pytest.fixture(params=["unpatched", "patched"])
def model(request: pytest.FixtureRequest) -> torch.nn.Module:
    model = make_model("registers_dinov2")
    return model if request.param == "unpatched" else tm.patch(model, layers=(2,), keep_rate=0.5)


@pytest.mark.parametrize("kwargs, error, match", PATCH_CASES)
def test_patch(model: torch.nn.Module, kwargs: dict, error: type, match: str) -> None:
    before = model_snapshot(model)
    with pytest.raises(error, match=match):
        tm.patch(model, **kwargs)
    assert_untouched(model, before)


def test_patch_refuses_what_is_not_a_supported_model() -> None:
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module"):
        tm.patch("deit_tiny_patch16_224")
    linear = torch.nn.Linear(2, 2)
    with pytest.raises(TypeError, match="tokenmerge_patch supports timm VisionTransformer"):
        tm.patch(linear)
    assert "_tokenmerge" not in linear.__dict__


@pytest.mark.parametrize(
    "rate, error, match",
    [
        (0.0, ValueError, r"keep_rate must be in \(0, 1\]"),
        ((0.5, 0.5), ValueError, "keep_rate has 2 rates but 1 layers"),
        ("high", TypeError, "keep_rate must be a float"),
    ],
)
def test_set_keep_rate(rate: object, error: type, match: str) -> None:
    model = tm.patch(make_model("vit"), layers=(2,), keep_rate=0.5)
    before = model_snapshot(model)
    with pytest.raises(error, match=match):
        tm.set_keep_rate(model, rate)
    assert_untouched(model, before)
    with pytest.raises(ValueError, match="model is not patched"):
        tm.set_keep_rate(make_model("vit"), 0.5)


@pytest.mark.parametrize(
    "size, error, match",
    [
        ((3, 32), TypeError, "input_size must be"),
        ((3.0, 32, 32), TypeError, "input_size must be"),
        ((3, 0, 32), ValueError, "input_size"),
        ("3,32,32", TypeError, "input_size must be"),
    ],
)
def test_count_flops(model: torch.nn.Module, size: object, error: type, match: str) -> None:
    before = model_snapshot(model)
    with pytest.raises(error, match=match):
        tm.count_flops(model, size)
    assert_untouched(model, before)


def test_count_flops_accepts_numpy_sizes(model: torch.nn.Module) -> None:
    assert tm.count_flops(model, np.array([3, 32, 32])).total == tm.count_flops(model, (3, 32, 32)).total


@pytest.mark.parametrize(
    "data, kwargs, error, match",
    [
        (IMAGES, dict(flops=0.0), ValueError, r"flops must be in \(0, 1\)"),
        (IMAGES, dict(flops=0.5, images=0), ValueError, "images must be an int >= 1"),
        (torch.zeros(0, 3, 32, 32), dict(flops=0.5), ValueError, "no images"),
        (IMAGES[:, :, :16], dict(flops=0.5), ValueError, "does not take"),
        ("folder/", dict(flops=0.5), TypeError, "data must be a float tensor"),
    ],
)
def test_calibrate(model: torch.nn.Module, data: object, kwargs: dict, error: type, match: str) -> None:
    before = model_snapshot(model)
    with pytest.raises(error, match=match):
        tm.calibrate(model, data, progress=False, **kwargs)
    assert_untouched(model, before)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(lr=float("inf")), ValueError, "lr"),
        (dict(weight_decay=float("nan")), ValueError, "weight_decay"),
        (dict(distill_temperature=float("inf")), ValueError, "distill_temperature"),
        (dict(epochs=0), ValueError, "epochs"),
        (dict(keep_rate_warmup=2.0), ValueError, "keep_rate_warmup"),
    ],
)
def test_finetune(kwargs: dict, error: type, match: str) -> None:
    model = tm.patch(make_model("vit"), layers=(2,), keep_rate=0.5)
    before = model_snapshot(model)
    loader = DataLoader(TensorDataset(IMAGES, torch.tensor([0, 1, 2, 3])), batch_size=2)
    with pytest.raises(error, match=match):
        tm.finetune(model, loader, progress=False, **kwargs)
    assert_untouched(model, before)


def test_finetune_refuses_an_unpatched_model() -> None:
    model = make_model("vit")
    before = model_snapshot(model)
    with pytest.raises(ValueError, match="model is not patched"):
        tm.finetune(model, DataLoader(TensorDataset(IMAGES, torch.zeros(4, dtype=torch.long))), progress=False)
    assert_untouched(model, before)


@pytest.mark.parametrize(
    "image, kwargs, error, match",
    [
        (IMAGES[0].numpy(), {}, TypeError, "image must be a float tensor"),
        (IMAGES, {}, ValueError, r"image must be a float tensor \[C, H, W\]"),
        (IMAGES[0, :1], {}, ValueError, "image has 1 channels but the model takes 3"),
        (IMAGES[0], dict(path="/no/such/folder/groups.png"), ValueError, "does not exist"),
    ],
)
def test_show_merges(image: object, kwargs: dict, error: type, match: str) -> None:
    model = tm.patch(make_model("vit"), layers=(2,), keep_rate=0.5)
    before = model_snapshot(model)
    with pytest.raises(error, match=match):
        tm.show_merges(model, image, **kwargs)
    assert_untouched(model, before)
    with pytest.raises(ValueError, match="model is not patched"):
        tm.show_merges(make_model("vit"), IMAGES[0])
