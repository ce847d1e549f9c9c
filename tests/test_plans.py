"""Plans are data: PatchConfig round trips, patch(config=...) applies a plan exactly, and patch(flops=...)
lands in its budget for several depths."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from tiny_models import assert_untouched, make_model, model_snapshot

import tokenmerge_patch as tm
from tokenmerge_patch.budget import rule_start, token_counts_for, tome_keep_rates


def test_plan_round_trips_through_json_and_applies_exactly(images: torch.Tensor) -> None:
    model = make_model("registers_dinov2")
    tm.patch(model, layers=(1, 3), keep_rate=(0.6, 0.4), method="merge", trace_source=True, seed=4)
    plan = tm.patch_config(model)
    text = json.dumps(plan.to_dict())
    with torch.no_grad():
        expected = model(images)
    restored = tm.PatchConfig.from_dict(json.loads(text))
    assert restored == plan and restored.depth == 4
    twin = make_model("registers_dinov2")
    tm.patch(twin, config=restored)
    with torch.no_grad():
        assert torch.equal(twin(images), expected)
    tm.patch(twin, config=json.loads(text))  # the dict itself is accepted too
    assert tm.patch_config(twin) == plan


def test_literal_paper_flags_keep_their_exact_behaviour(images: torch.Tensor) -> None:
    model = make_model("vit")
    plan = tm.PatchConfig(layers=(1, 2), keep_rates=(0.5, 0.5), size_weighted=False, prop_attn=False)
    tm.patch(model, config=plan)
    with torch.no_grad():
        literal = model(images)
        tm.patch(model, layers=(1, 2), keep_rate=0.5, size_weighted=False, prop_attn=False)
        assert torch.equal(model(images), literal)
        tm.patch(model, layers=(1, 2), keep_rate=0.5)  # the default differs
        assert not torch.allclose(model(images), literal, atol=1e-4)


@pytest.mark.parametrize(
    "bad, error, match",
    [
        ({"layers": [1], "keep_rates": [0.5, 0.5]}, ValueError, "1 layers but 2 keep_rates"),
        ({"layers": [2, 1], "keep_rates": [0.5, 0.5]}, ValueError, "ascending"),
        ({"layers": [1], "keep_rates": [1.5]}, ValueError, "keep_rates must be numbers in"),
        ({"layers": [1], "keep_rates": [0.5], "method": "nope"}, ValueError, "method must be one of"),
        ({"layers": [1], "keep_rates": [0.5], "colour": "red"}, ValueError, "unknown fields"),
        ({"layers": [1], "keep_rates": [0.5], "format": "other/9"}, ValueError, "format"),
        ({"keep_rates": [0.5]}, ValueError, "needs 'layers'"),
        ({"layers": 1, "keep_rates": [0.5]}, TypeError, "must be a list"),
        ({"layers": [1], "keep_rates": [0.5], "prop_attn": "yes"}, TypeError, "prop_attn"),
        ({"layers": [1], "keep_rates": [0.5], "method": "drop", "size_weighted": True}, ValueError, "merge"),
        ([1, 2], TypeError, "must be a dict"),
    ],
)
def test_bad_plans_are_refused(bad: object, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        tm.PatchConfig.from_dict(bad)


def test_a_plan_for_another_model_or_with_other_options_leaves_the_model_alone() -> None:
    model = make_model("vit")  # 4 blocks
    tm.patch(model, layers=(1,), keep_rate=0.5)
    before = model_snapshot(model)
    deeper = tm.PatchConfig(layers=(1, 2), keep_rates=(0.5, 0.5), depth=12)
    with pytest.raises(ValueError, match="made for a model with 12 blocks; this model has 4"):
        tm.patch(model, config=deeper)
    with pytest.raises(ValueError, match=r"do not fit a model with blocks 0\.\.3"):
        tm.patch(model, config=tm.PatchConfig(layers=(1, 6), keep_rates=(0.5, 0.5)))
    with pytest.raises(ValueError, match="config= is a whole plan: give it alone, without keep_rate, method"):
        tm.patch(model, keep_rate=0.5, method="drop", config=tm.patch_config(model))
    with pytest.raises(TypeError, match="config must be a PatchConfig"):
        tm.patch(model, config="plan.json")
    assert_untouched(model, before)


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("deit_tiny_patch16_224", {}),
        ("deit_small_patch16_224", {}),
        ("vit_tiny_patch16_224", dict(depth=6, img_size=96)),
        ("vit_tiny_patch16_224", dict(depth=24, img_size=96)),
        ("deit_tiny_distilled_patch16_224", dict(img_size=128)),
    ],
)
def test_flops_budget_lands_in_its_window(name: str, kwargs: dict) -> None:
    model = timm.create_model(name, **kwargs).eval()
    size = (3, *model.patch_embed.img_size)
    unpatched = tm.count_flops(model, size).total
    for fraction in (0.8, 0.5):
        tm.patch(model, flops=fraction)
        measured = tm.count_flops(model, size).total / unpatched
        assert fraction - 0.01 <= measured <= fraction, (fraction, measured)
        plan = tm.patch_config(model)
        assert plan.layers[0] == rule_start(len(model.blocks)) and plan.depth == len(model.blocks)
        assert not plan.size_weighted and plan.prop_attn


def test_budget_rule_token_counts_match_the_model(images: torch.Tensor) -> None:
    model = make_model("distilled")
    tm.patch(model, layers=(1, 2, 3), keep_rate=(0.7, 0.5, 0.3), method="fuse")
    with torch.no_grad():
        counts = tm.token_counts(model, images[:1])
    predicted = token_counts_for(66, 2, 4, (1, 2, 3), (0.7, 0.5, 0.3), "fuse")
    assert [out for _, out in predicted] == counts


def test_tome_schedule_removes_a_constant_number_of_tokens(images: torch.Tensor) -> None:
    model = make_model("vit")
    rates = tome_keep_rates(65, 1, (0, 1, 2, 3), 8)
    tm.patch(model, layers=(0, 1, 2, 3), keep_rate=rates, method="bipartite")
    with torch.no_grad():
        assert tm.token_counts(model, images[:1]) == [57, 49, 41, 33]


def test_flops_with_layers_or_keep_rate_or_out_of_range_is_refused() -> None:
    model = make_model("vit")
    before = model_snapshot(model)
    with pytest.raises(ValueError, match=r"either flops= .* or layers=/keep_rate="):
        tm.patch(model, flops=0.5, keep_rate=0.7)
    with pytest.raises(ValueError, match="either flops="):
        tm.patch(model, layers=(1,), flops=0.5)
    for bad in (0.0, 1.0, 1.5, -0.2, float("nan")):
        with pytest.raises(ValueError, match=r"flops must be in \(0, 1\)"):
            tm.patch(model, flops=bad)
    with pytest.raises(TypeError, match="flops must be a number"):
        tm.patch(model, flops="half")
    assert_untouched(model, before)


def test_an_unreachable_budget_is_refused_and_the_previous_patch_kept() -> None:
    model = make_model("vit")
    tm.patch(model, layers=(2,), keep_rate=0.5)
    before = model_snapshot(model)
    with pytest.raises(ValueError, match="budget"):
        tm.patch(model, flops=0.05, method="bipartite")
    assert_untouched(model, before)
