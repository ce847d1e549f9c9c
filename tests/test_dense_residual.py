"""``patch(..., dense=True)``: the full-resolution residual stream. Against an independent per-block reference written
with plain loops from the unpatched weights (tests/reference.py: each block computes on the mean of each group's
patches and adds the group's update to every patch of it; a reducing block makes the new groups), the unpatched model
at keep 1.0, and the same plan without ``dense``; shapes of every dense output, gradients, FLOPs, plans and refusals.
Tiny timm and Hugging Face models (ViT, Dinov2 with registers, CLIP, SigLIP). Elsewhere: RoPE families (test_rope.py),
the flops= rule (test_budget_sweep.py), ONNX and torch.export (test_export.py), VLMs refused (test_vlm.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from reference import Options, hf_attention, hf_mlp, reference_dense_tokens, timm_attention, timm_mlp
from tiny_models import SHARED, make_model, model_snapshot, perturb
from torch import Tensor, nn

import tokenmerge_patch as tm
from tokenmerge_patch.records import groups_of, record_of

METHODS = ["merge", "drop", "fuse", "bipartite"]
PLAN = {1: 0.5, 2: 0.6}

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models


def patch_dense(model: nn.Module, plan: dict[int, float] = PLAN, **options: object) -> nn.Module:
    return tm.patch(model, layers=tuple(plan), keep_rate=tuple(plan.values()), dense=True, **options)


@torch.no_grad()
def reference_timm(model: nn.Module, images: Tensor, plan: dict[int, float], **options: object) -> tuple:
    """The dense forward of an unpatched timm ViT by the reference: normalised tokens, logits, counts per block."""
    opt = Options(**options)
    tokens = model.norm_pre(model._pos_embed(model.patch_embed(images)))
    prefix = model.num_prefix_tokens
    runs = [reference_dense_tokens(x, model.blocks, plan, opt, prefix, timm_attention, timm_mlp) for x in tokens]
    features = model.norm(torch.stack([x for x, _ in runs]))
    return features, model.forward_head(features), runs[0][1]


# -- against the independent reference ------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_timm_matches_the_independent_reference(method: str, images: Tensor) -> None:
    model = make_model("vit")
    with torch.no_grad():
        unpatched = model.forward_features(images)
    features, logits, counts = reference_timm(model, images, PLAN, method=method)
    patch_dense(model, method=method)
    with torch.no_grad():
        got = model.forward_features(images)
        torch.testing.assert_close(got, features, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(model.forward_head(got), logits, atol=1e-4, rtol=1e-4)
    assert got.shape == unpatched.shape and (got - unpatched).abs().max() > 1e-2  # every patch, changed by the plan
    assert tm.token_counts(model, images) == counts and counts[2] < 65


@pytest.mark.parametrize("flavour", ["registers_dinov2", "avg_pool", "distilled"])
def test_timm_flavours_match_the_reference(flavour: str, images: Tensor) -> None:
    """Register and distillation tokens are prefix tokens; an averaging head averages the full-resolution patches."""
    model = make_model(flavour)
    features, logits, counts = reference_timm(model, images, PLAN)
    patch_dense(model)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(images), features, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(model(images), logits, atol=1e-4, rtol=1e-4)
    assert tm.token_counts(model, images) == counts


def hf_model(family: str) -> nn.Module:
    transformers = pytest.importorskip("transformers", minversion="5")
    common = dict(image_size=32, patch_size=4, hidden_size=32, num_hidden_layers=4, num_attention_heads=2)
    build = {
        "vit": lambda: transformers.ViTModel(transformers.ViTConfig(**common, intermediate_size=64)),
        "dinov2_registers": lambda: transformers.Dinov2WithRegistersModel(
            transformers.Dinov2WithRegistersConfig(**common, num_register_tokens=3, layerscale_value=0.5)
        ),
        "clip": lambda: transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**common, intermediate_size=64)),
        "siglip": lambda: transformers.SiglipVisionModel(
            transformers.SiglipVisionConfig(**common, intermediate_size=64)
        ),
    }
    torch.manual_seed(0)
    return perturb(build[family](), 0)


HF_CASES = [("vit", "merge"), ("dinov2_registers", "merge"), ("dinov2_registers", "bipartite"), ("clip", "drop")]
HF_CASES += [("siglip", "merge")]  # no class token: scored by the attention each token receives


@pytest.mark.parametrize(("family", "method"), HF_CASES)
def test_hugging_face_matches_the_independent_reference(family: str, method: str, images: Tensor) -> None:
    """The last layer's output (``hidden_states[-1]``: the tokens the final norm gets) against the reference run from
    the encoder's input (``hidden_states[0]`` of the unpatched model); keep 1.0 is the unpatched model."""
    model = hf_model(family)
    layers = tm.describe(model).backend.blocks(model)
    prefix, score = tm.describe(model).num_prefix, "cls" if family != "siglip" else "received"
    with torch.no_grad():
        unpatched = model(images, output_hidden_states=True)
        patch_dense(model, {1: 1.0, 2: 1.0}, method=method)
        same = model(images, output_hidden_states=True)
        for want, got in zip(unpatched.hidden_states, same.hidden_states, strict=True):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
        opt = Options(method=method, score=score)
        runs = [
            reference_dense_tokens(x, layers, PLAN, opt, prefix, hf_attention, hf_mlp)
            for x in unpatched.hidden_states[0]
        ]
        patch_dense(model, method=method)
        out = model(images, output_hidden_states=True)
    assert [h.shape for h in out.hidden_states] == [h.shape for h in unpatched.hidden_states]
    assert out.last_hidden_state.shape == unpatched.last_hidden_state.shape
    torch.testing.assert_close(out.hidden_states[-1], torch.stack([x for x, _ in runs]), atol=1e-4, rtol=1e-4)
    assert tm.token_counts(model, images) == runs[0][1]


def test_timm_and_hugging_face_dinov2_agree() -> None:
    """A DINOv2 the same in timm and Hugging Face gives the same dense output (HF's Dinov2Model and timm's
    VisionTransformer with LayerScale, one checkpoint converted between them)."""
    import timm

    transformers = pytest.importorskip("transformers", minversion="5")
    config = transformers.Dinov2Config(
        image_size=28, patch_size=7, hidden_size=32, num_hidden_layers=4, num_attention_heads=2, layerscale_value=0.5,
        layer_norm_eps=1e-6, use_mask_token=False,
    )  # fmt: skip
    torch.manual_seed(0)
    hf = perturb(transformers.Dinov2Model(config), 0)
    twin = timm.create_model(
        "vit_small_patch14_dinov2", img_size=28, patch_size=7, embed_dim=32, depth=4, num_heads=2, num_classes=0
    ).eval()
    state = {}
    for name, value in hf.state_dict().items():
        name = name.replace("embeddings.patch_embeddings.projection", "patch_embed.proj")
        name = name.replace("embeddings.cls_token", "cls_token").replace("embeddings.position_embeddings", "pos_embed")
        name = name.replace("encoder.layer.", "blocks.").replace("layernorm.", "norm.")
        name = name.replace(".attention.o_proj", ".attn.proj").replace(".layer_scale1.lambda1", ".ls1.gamma")
        name = name.replace(".layer_scale2.lambda1", ".ls2.gamma")
        state[name] = value
    for i in range(4):
        parts = [state.pop(f"blocks.{i}.attention.{p}_proj.{kind}") for kind in ("weight", "bias") for p in "qkv"]
        state[f"blocks.{i}.attn.qkv.weight"], state[f"blocks.{i}.attn.qkv.bias"] = (
            torch.cat(parts[:3]),
            torch.cat(parts[3:]),
        )
    twin.load_state_dict(state, strict=True)
    images = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(hf(images).last_hidden_state, twin.forward_features(images), atol=1e-5, rtol=0)
        for model in (hf, twin):
            patch_dense(model)
        torch.testing.assert_close(hf(images).last_hidden_state, twin.forward_features(images), atol=1e-5, rtol=0)
    assert tm.token_counts(hf, images) == tm.token_counts(twin, images)


# -- keep 1.0, shapes, what reads the outputs --------------------------------------------------------------------------


@pytest.mark.parametrize("flavour", ["vit", "registers_dinov2", "avg_pool", "dynamic"])
def test_keep_rate_one_is_the_unpatched_model(flavour: str, images: Tensor) -> None:
    model = make_model(flavour)
    with torch.no_grad():
        expected = (model(images), model.forward_intermediates(images, return_prefix_tokens=True))
        patch_dense(model, {0: 1.0, 1: 1.0, 3: 1.0})
        got = (model(images), model.forward_intermediates(images, return_prefix_tokens=True))
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_every_output_has_the_unpatched_shape_and_its_own_features(images: Tensor) -> None:
    model = make_model("registers_dinov2")
    calls = [dict(), dict(output_fmt="NLC"), dict(indices=[1, 3], intermediates_only=True, norm=True)]
    with torch.no_grad():
        expected = [model.forward_intermediates(images, **kwargs) for kwargs in calls]
        patch_dense(model)
        got = [model.forward_intermediates(images, **kwargs) for kwargs in calls]
        features = model.forward_features(images)
    for want, have in zip(expected, got, strict=True):
        want, have = torch.utils._pytree.tree_leaves(want), torch.utils._pytree.tree_leaves(have)
        assert [t.shape for t in have] == [t.shape for t in want]
    last = got[0][1][-1]  # NCHW map of the last block: every patch its own vector, not its group's
    assert last.flatten(2).transpose(1, 2).unique(dim=1).shape[1] == 64
    assert tm.unmerge(features) is features  # the full resolution already: nothing to unmerge
    assert record_of(features) is None and groups_of(features) is not None
    assert [r.tokens_out for r in tm.reduction_trace(model).values()] == [5 + 32, 5 + 20]


def test_features_only_and_hugging_face_backbone_maps(images: Tensor) -> None:
    import timm

    net = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, features_only=True, out_indices=(1, 3))
    with torch.no_grad():
        expected = [m.shape for m in net(images)]
        patch_dense(net)
        assert [m.shape for m in net(images)] == expected
    transformers = pytest.importorskip("transformers", minversion="5")
    config = transformers.Dinov2Config(
        image_size=32, patch_size=4, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
        out_features=["stage2", "stage4"], reshape_hidden_states=True,
    )  # fmt: skip
    backbone = perturb(transformers.Dinov2Backbone(config), 0)
    with torch.no_grad():
        expected = [m.shape for m in backbone(images).feature_maps]
        patch_dense(backbone)
        assert [m.shape for m in backbone(images).feature_maps] == expected == [(3, 32, 8, 8)] * 2


def test_blocks_cost_what_they_cost_without_dense(images: Tensor) -> None:
    """The same plan with and without dense: every block computes on the same token counts for the same FLOPs; only
    the final norm (and head) sees every patch again."""
    model = make_model("vit")
    reports = []
    for dense in (False, True):
        tm.patch(model, layers=(1, 2), keep_rate=(0.5, 0.6), dense=dense)
        reports.append(tm.count_flops(model, (3, 32, 32)))
    plain, dense = reports
    assert [(b.tokens_in, b.tokens_out, b.flops) for b in dense.blocks] == [
        (b.tokens_in, b.tokens_out, b.flops) for b in plain.blocks
    ]
    assert dense.analytic == plain.analytic and plain.total < dense.total < tm.count_flops(tm.unpatch(model)).total


def test_gradients_reach_every_parameter(images: Tensor) -> None:
    model = make_model("registers_dinov2").train()
    patch_dense(model)
    model(images).square().sum().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert missing == []


def test_unpatch_is_exact_and_plans_round_trip(images: Tensor) -> None:
    model = make_model("vit")
    before = model_snapshot(model)
    with torch.no_grad():
        expected = model(images)
        patch_dense(model)
        model(images)
        plan = tm.patch_config(model)
        tm.unpatch(model)
        assert torch.equal(model(images), expected)
    assert model_snapshot(model)[1] == before[1]
    assert plan.dense and not plan.keep_norm  # nothing merged is carried on: no norm to keep
    assert tm.PatchConfig.from_dict(plan.to_dict()) == plan
    old = {k: v for k, v in plan.to_dict().items() if k != "dense"}  # a plan written before the field
    assert tm.PatchConfig.from_dict(old).dense is False


def test_options_that_do_not_apply_are_refused_and_the_model_left_as_it_was() -> None:
    model = make_model("vit")
    before = model_snapshot(model)
    for option in ("keep_norm", "size_weighted", "merge_into_cls"):
        with pytest.raises(ValueError, match=f"{option} does not apply with dense=True"):
            tm.patch(model, dense=True, **{option: True})
    with pytest.raises(TypeError, match="dense must be a bool"):
        tm.patch(model, dense="yes")
    assert model_snapshot(model)[1:] == before[1:]


def _saliency_benchmark():
    """benchmarks/dense.py, which loads the real DINOv2-S and its saliency decoder of ../shared."""
    import importlib.util
    import sys

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "dense.py"
    spec = importlib.util.spec_from_file_location("benchmark_dense", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.skipif(
    not (SHARED / "models" / "dinov2_small_saliency" / "decoder.safetensors").is_file(),
    reason=f"../shared (the real DINOv2-S saliency model) not found at {SHARED}",
)
def test_real_dinov2_saliency_maps_at_keep_one_equal_the_unpatched_ones() -> None:
    pytest.importorskip("transformers", minversion="5")
    bench = _saliency_benchmark()
    backbone, decoder = bench.load_saliency()
    images, _ = bench.load_half(SHARED / "data" / "imagenet_samples", 2, calibration=False, workers=0)
    expected = bench.saliency(backbone, decoder, images)
    for dense in (True, False):
        tm.patch(backbone, layers=tuple(range(12)), keep_rate=1.0, dense=dense)
        got = bench.saliency(backbone, decoder, images)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    tm.patch(backbone, layers=(3, 6, 9), keep_rate=0.5, dense=True)  # and a real reduction changes them
    maps, _ = bench.saliency(backbone, decoder, images)
    assert maps.shape == expected[0].shape and (maps - expected[0]).abs().max() > 1e-3
