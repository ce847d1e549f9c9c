"""The ``flops=`` rule lands in ``[f - 0.01, f]`` for every supported family and input size, counted by
``count_flops`` at the same size: DINOv2's patch 14 at the 518 px its config says and at 224, registers, Hugging Face
and timm, ``dynamic_img_size``, RoPE, ``dense=True`` plans; and ``calibrate`` lands at the size of its images."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

import tokenmerge_patch as tm
from tokenmerge_patch.budget import TOLERANCE

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(embed_dim=96, num_heads=2, depth=8, num_classes=7)


def _hf(kind: str) -> nn.Module:
    from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    common = dict(hidden_size=96, num_hidden_layers=8, num_attention_heads=2, intermediate_size=384, patch_size=14)
    if kind == "dinov2_518":
        return Dinov2Model(Dinov2Config(**common, image_size=518))
    return Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**common, image_size=224, num_register_tokens=4))


FAMILIES = {
    "timm_vit_64": lambda: timm.create_model("vit_tiny_patch16_224", img_size=64, **TINY),
    "timm_dinov2_518": lambda: timm.create_model("vit_small_patch14_dinov2", dynamic_img_size=True, **TINY),
    "timm_registers": lambda: timm.create_model("vit_small_patch14_reg4_dinov2", img_size=112, **TINY),
    "timm_dynamic": lambda: timm.create_model("vit_tiny_patch16_224", img_size=96, dynamic_img_size=True, **TINY),
    "timm_eva_rope": lambda: timm.create_model("vit_base_patch16_rope_224", img_size=96, **TINY),
    "hf_dinov2_518": lambda: _hf("dinov2_518"),
    "hf_registers": lambda: _hf("registers"),
}
# the sizes a budget is asked at: None = the model's own (518 for DINOv2 checkpoints), then what users run them at
SIZES = {
    "timm_dinov2_518": [None, (3, 224, 224)],
    "timm_dynamic": [None, (3, 160, 128)],
    "hf_dinov2_518": [None, (3, 224, 224)],
}


def _cases() -> list[tuple[str, tuple[int, int, int] | None]]:
    return [(family, size) for family in FAMILIES for size in SIZES.get(family, [None])]


@pytest.mark.parametrize("family, size", _cases())
@pytest.mark.parametrize("flops", [0.5, 0.65])
def test_the_rule_lands_at_the_size_it_is_asked_for(family: str, size: tuple | None, flops: float) -> None:
    pytest.importorskip("transformers") if family.startswith("hf") else None
    torch.manual_seed(0)
    model = FAMILIES[family]().eval()
    full = tm.count_flops(model, size).total
    tm.patch(model, flops=flops, input_size=size)
    measured = tm.count_flops(model, size).total / full
    assert flops - TOLERANCE <= measured <= flops, (family, size, measured)


@pytest.mark.parametrize(
    "family, size", [("timm_dinov2_518", (3, 224, 224)), ("hf_dinov2_518", (3, 224, 224)), ("timm_registers", None)]
)
def test_the_rule_lands_for_dense_plans(family: str, size: tuple | None) -> None:
    """dense=True: the blocks compute on the same counts, but the final norm (and a dense head) sees every patch."""
    pytest.importorskip("transformers") if family.startswith("hf") else None
    torch.manual_seed(0)
    model = FAMILIES[family]().eval()
    full = tm.count_flops(model, size).total
    for flops in (0.5, 0.8):
        tm.patch(model, flops=flops, input_size=size, dense=True)
        assert tm.patch_config(model).dense
        measured = tm.count_flops(model, size).total / full
        assert flops - TOLERANCE <= measured <= flops, (family, size, flops, measured)


def test_a_518_px_dinov2_budgets_at_its_own_size_by_default() -> None:
    pytest.importorskip("transformers")
    model = _hf("dinov2_518").eval()
    info = tm.describe(model)
    assert info.input_size == (3, 518, 518)
    tm.patch(model, flops=0.65)
    patched = tm.count_flops(model).total  # the default size of count_flops is the same 518
    assert patched == tm.count_flops(model, (3, 518, 518)).total
    full = tm.count_flops(tm.unpatch(model)).total
    assert 0.64 <= patched / full <= 0.65


def test_a_size_the_model_does_not_take_is_refused_clearly() -> None:
    model = timm.create_model("vit_tiny_patch16_224", img_size=64, **TINY)
    with pytest.raises(ValueError, match=r"input_size \(3, 96, 96\) \(C, H, W\): the model is built for"):
        tm.patch(model, flops=0.65, input_size=(3, 96, 96))
    assert not tm.is_patched(model)


def test_calibrate_budgets_at_the_size_of_its_images() -> None:
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = _hf("dinov2_518").eval()
    images = torch.randn(8, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    plan = tm.calibrate(model, images, flops=0.65, progress=False, max_block_runs=12)
    size = (3, 112, 112)
    full = tm.count_flops(model, size).total
    tm.patch(model, config=plan)
    assert 0.64 <= tm.count_flops(model, size).total / full <= 0.65
