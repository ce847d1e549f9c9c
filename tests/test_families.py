"""More Hugging Face families: Dinov2WithRegisters (register tokens are prefix tokens; the classifier's patch mean is
size-weighted) and the whole CLIPModel (its vision tower patched, zero-shot logits with text), against unpatched runs,
an independent hand-written forward (tests/reference.py's reductions), a CLIPVisionModelWithProjection twin with the
same weights and fvcore counts of unpatched models cut to the same token counts. SigLIP stays refused."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from reference import REFERENCE_METHODS, Options, hf_attention, hf_mlp, reference_tokens
from tiny_models import perturb
from torch import Tensor, nn

import tokenmerge_patch as tm

transformers = pytest.importorskip("transformers", minversion="5")
from transformers import (  # noqa: E402
    CLIPConfig,
    CLIPModel,
    CLIPVisionModelWithProjection,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersForImageClassification,
    Dinov2WithRegistersModel,
    SiglipConfig,
    SiglipModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

COMMON = dict(image_size=32, patch_size=4, hidden_size=32, num_hidden_layers=4, num_attention_heads=2)
REGISTERS = 3
TEXT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=50)
TEXT |= dict(max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)


def make_registers(head: bool = True, attn: str = "sdpa", swiglu: bool = False, seed: int = 0) -> nn.Module:
    config = Dinov2WithRegistersConfig(
        **COMMON, num_register_tokens=REGISTERS, layerscale_value=0.5, use_swiglu_ffn=swiglu, num_labels=5
    )
    torch.manual_seed(seed)
    model = perturb((Dinov2WithRegistersForImageClassification if head else Dinov2WithRegistersModel)(config), seed)
    model.set_attn_implementation(attn)
    return model


def make_clip(attn: str = "sdpa", seed: int = 0) -> CLIPModel:
    config = CLIPConfig(vision_config=dict(**COMMON, intermediate_size=64), text_config=TEXT, projection_dim=8)
    torch.manual_seed(seed)
    model = perturb(CLIPModel(config), seed)
    model.set_attn_implementation(attn)
    return model


def clip_twin(model: CLIPModel) -> CLIPVisionModelWithProjection:
    """A CLIPVisionModelWithProjection with the CLIPModel's vision tower and projection (the same parameter names)."""
    config = copy.deepcopy(model.config.vision_config)
    config.projection_dim = model.config.projection_dim
    twin = CLIPVisionModelWithProjection(config)
    parts = ("vision_model.", "visual_projection.")
    twin.load_state_dict({k: v for k, v in model.state_dict().items() if k.startswith(parts)})
    twin.set_attn_implementation(model.config._attn_implementation)
    return twin.eval()


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models


@pytest.fixture
def text() -> Tensor:
    return torch.randint(2, 50, (4, 7), generator=torch.Generator().manual_seed(2))


def _tensors(out: object) -> dict[str, Tensor]:
    return {key: value for key, value in out.items() if isinstance(value, Tensor)}


def _snapshot(model: nn.Module) -> dict[str, tuple]:
    return {
        name: (set(module.__dict__), len(module._forward_pre_hooks), len(module._forward_hooks))
        for name, module in model.named_modules()
    }


# -- Dinov2WithRegisters ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("head", [False, True])
def test_registers_keep_rate_one_equals_unpatched(head: bool, attn: str, images: Tensor) -> None:
    model = make_registers(head, attn)
    with torch.no_grad():
        expected = _tensors(model(images))
        for kwargs in (dict(layers=(0, 1, 2, 3)), dict(layers=(1,), prop_attn=True)):
            tm.patch(model, keep_rate=1.0, **kwargs)
            patched = _tensors(model(images))
            assert patched.keys() == expected.keys()
            for key in expected:
                assert (patched[key] - expected[key]).abs().max() <= 1e-5, key
        tm.patch(model, layers=(1,), keep_rate=0.5)
        prefix = 1 + REGISTERS  # class token and registers are never reduced
        assert tm.token_counts(model, images) == [prefix + 64] + [prefix + 32] * 3
        model(images)  # counting leaves the trace alone: a forward makes it
        assert tm.reduction_trace(model)[1].sizes[:, :prefix].eq(1).all()


@torch.no_grad()
def reference_registers(model: nn.Module, images: Tensor, plan: dict[int, float], **options: object) -> tuple:
    """The patched model's output computed on the unpatched one: logits (with the classifier's cat([class token,
    size-weighted mean of the patch tokens])) or the last hidden state; and the token count after every layer."""
    opt = Options(**options)
    backbone = model.base_model
    prefix = 1 + backbone.config.num_register_tokens
    outputs, counts = [], []
    for x in backbone.embeddings(images):
        layers = backbone.encoder.layer
        x, sizes, count = reference_tokens(x, layers, plan, opt, prefix, hf_attention, hf_mlp)
        x = backbone.layernorm(x)
        if isinstance(model, Dinov2WithRegistersForImageClassification):
            weights = torch.tensor(sizes[prefix:]).unsqueeze(-1)
            x = model.classifier(torch.cat([x[0], (x[prefix:] * weights).sum(0) / weights.sum()]))
        outputs.append(x)
        counts.append(count)
    return torch.stack(outputs), counts


METHODS = REFERENCE_METHODS


@pytest.mark.parametrize(("method", "options"), METHODS)
@pytest.mark.parametrize("variant", ["classifier", "base_swiglu"])
def test_registers_match_the_independent_reference(variant: str, method: str, options: dict, images: Tensor) -> None:
    head = variant == "classifier"
    model = make_registers(head=head, swiglu=not head)
    plan = {1: 0.5, 2: 0.6}
    expected, counts = reference_registers(model, images, plan, method=method, **options)
    tm.patch(model, layers=tuple(plan), keep_rate=tuple(plan.values()), method=method, **options)
    with torch.no_grad():
        out = model(images)
    torch.testing.assert_close(out.logits if head else out.last_hidden_state, expected, atol=1e-4, rtol=1e-4)
    assert tm.token_counts(model, images) == counts[0] and counts[0][2] < 1 + REGISTERS + 64


def test_registers_gradients_and_unpatch(images: Tensor) -> None:
    def with_grad(patched: bool) -> set[str]:
        model = make_registers().train()
        if patched:
            tm.patch(model, layers=(1, 2), keep_rate=0.5, prop_attn=True)
        model(images).logits.square().sum().backward()
        return {n for n, p in model.named_parameters() if p.grad is not None and p.grad.any()}

    everything = {n for n, _ in make_registers().named_parameters()} - {"dinov2_with_registers.embeddings.mask_token"}
    assert with_grad(True) == with_grad(False) == everything

    model = make_registers()
    before = _snapshot(model)
    with torch.no_grad():
        expected = model(images).logits
        tm.patch(model, layers=(1, 2), keep_rate=0.5, method="fuse")
        assert (model(images).logits - expected).abs().max() > 1e-3
        tm.unpatch(model)
        assert torch.equal(model(images).logits, expected)
    assert _snapshot(model) == before


@pytest.mark.parametrize("swiglu", [False, True])
def test_registers_count_flops_match_unpatched_models_cut_to_the_same_tokens(swiglu: bool) -> None:
    """A reduced layer counts what the unpatched model's layer counts at an image with that many patches (Dinov2
    interpolates its positions, so any image size runs), and a reducing layer lies between its input and output."""
    model = make_registers(head=False, swiglu=swiglu)
    per_block = {n: tm.count_flops(model, (3, 32, n // 8 * 4)).blocks[0].flops for n in (64, 32, 16)}  # patches
    tm.patch(model, layers=(1, 2), keep_rate=0.5, prop_attn=True)
    report = tm.count_flops(model, (3, 32, 32))
    prefix = 1 + REGISTERS
    assert [(b.tokens_in, b.tokens_out) for b in report.blocks] == [
        (prefix + 64, prefix + 64),
        (prefix + 64, prefix + 32),
        (prefix + 32, prefix + 16),
        (prefix + 16, prefix + 16),
    ]
    assert report.blocks[0].flops == per_block[64] and report.blocks[3].flops == per_block[16]
    assert per_block[32] < report.blocks[1].flops < per_block[64]
    assert per_block[16] < report.blocks[2].flops < per_block[32]


# -- CLIPModel: the vision tower patched, zero-shot logits with text ------------------------------------------------


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_clip_keep_rate_one_equals_unpatched(attn: str, images: Tensor, text: Tensor) -> None:
    model = make_clip(attn)
    with torch.no_grad():
        expected = _tensors(model(input_ids=text, pixel_values=images))
        features = model.get_image_features(pixel_values=images).pooler_output
        for kwargs in (dict(layers=(0, 1, 2, 3)), dict(layers=(1,), prop_attn=True)):
            tm.patch(model, keep_rate=1.0, **kwargs)
            patched = _tensors(model(input_ids=text, pixel_values=images))
            assert patched.keys() == expected.keys() >= {"logits_per_image", "image_embeds", "text_embeds"}
            for key in expected:
                assert (patched[key] - expected[key]).abs().max() <= 1e-5, key
            assert (model.get_image_features(pixel_values=images).pooler_output - features).abs().max() <= 1e-5
        tm.patch(model, layers=(1,), keep_rate=0.5)
        out = model(input_ids=text, pixel_values=images)
    assert tm.token_counts(model, images) == [65, 33, 33, 33]
    assert (out.logits_per_image - expected["logits_per_image"]).abs().max() > 1e-3
    assert torch.equal(out.text_embeds, expected["text_embeds"])  # the text tower is untouched
    assert all("forward" not in layer.__dict__ for layer in model.text_model.encoder.layers)


@pytest.mark.parametrize("method", ["merge", "drop", "fuse", "bipartite"])
def test_clip_matches_its_vision_twin_and_zero_shot_logits_follow(method: str, images: Tensor, text: Tensor) -> None:
    model = make_clip()
    twin = clip_twin(model)
    for patched in (model, twin):
        tm.patch(patched, layers=(1, 2), keep_rate=0.5, method=method)
    with torch.no_grad():
        features = model.get_image_features(pixel_values=images).pooler_output
        torch.testing.assert_close(features, twin(images).image_embeds, atol=1e-5, rtol=1e-5)
        out = model(input_ids=text, pixel_values=images)
        text_features = model.get_text_features(input_ids=text).pooler_output
    logits = model.logit_scale.exp() * F.normalize(features, dim=-1) @ F.normalize(text_features, dim=-1).T
    torch.testing.assert_close(out.logits_per_image, logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.logits_per_text, logits.T, atol=1e-5, rtol=1e-5)
    counts = [65, 34, 19, 19] if method == "fuse" else [65, 33, 17, 17]  # fuse: the fused token on top
    assert tm.token_counts(model, images) == tm.token_counts(twin, images) == counts
    ours, theirs = tm.count_flops(model, (3, 32, 32)), tm.count_flops(twin, (3, 32, 32))
    assert (ours.total, ours.blocks, ours.analytic) == (theirs.total, theirs.blocks, theirs.analytic)


def test_clip_prop_attn_sdpa_equals_eager(images: Tensor) -> None:
    results = {}
    for attn in ("sdpa", "eager"):
        model = tm.patch(make_clip(attn), layers=(1, 2), keep_rate=0.5, prop_attn=True)
        with torch.no_grad():
            results[attn] = model.get_image_features(pixel_values=images).pooler_output
    torch.testing.assert_close(results["sdpa"], results["eager"], atol=1e-5, rtol=1e-5)


def test_clip_gradients_and_unpatch(images: Tensor, text: Tensor) -> None:
    def with_grad(patched: bool) -> set[str]:
        model = make_clip().train()
        if patched:
            tm.patch(model, layers=(1, 2), keep_rate=0.5, prop_attn=True)
        model(input_ids=text[:3], pixel_values=images, return_loss=True).loss.backward()  # 3 pairs
        return {n for n, p in model.named_parameters() if p.grad is not None and p.grad.any()}

    reached = with_grad(True)
    assert reached == with_grad(False) and any(n.startswith("vision_model.encoder.layers.3.") for n in reached)

    model = make_clip()
    before = _snapshot(model)
    with torch.no_grad():
        expected = _tensors(model(input_ids=text, pixel_values=images))
        tm.patch(model, layers=(1,), keep_rate=0.5, prop_attn=True)
        tm.patch(model, layers=(1, 2), keep_rate=0.5, method="drop")  # re-configures
        model(input_ids=text, pixel_values=images)
        tm.unpatch(model)
        after = _tensors(model(input_ids=text, pixel_values=images))
    assert not tm.is_patched(model) and _snapshot(model) == before
    assert all(torch.equal(after[key], expected[key]) for key in expected)


def test_clip_flops_budget_and_calibration(images: Tensor) -> None:
    """patch(flops=...) and calibrate count and run the image side of a CLIPModel."""
    model = make_clip()
    full = tm.count_flops(model, (3, 32, 32)).total
    tm.patch(model, flops=0.6)
    assert 0.59 <= tm.count_flops(model, (3, 32, 32)).total / full <= 0.6
    budget = tm.patch_config(model)
    plan = tm.calibrate(model, images, flops=0.6, progress=False)
    assert tm.patch_config(model) == budget  # calibrate leaves the model as it was
    tm.patch(model, config=plan)
    assert plan.depth == 4 and 0.59 <= tm.count_flops(model, (3, 32, 32)).total / full <= 0.6


def test_clip_merge_pictures_export_and_finetune_use_the_image_side(images: Tensor, tmp_path) -> None:
    """The tools that run a model on images alone run a CLIPModel's image side (its forward wants text too):
    merge_sources sees the same groups as the vision twin, export_onnx writes get_image_features, and finetune
    (a classifier loop) refuses it clearly, leaving it as it was."""
    pytest.importorskip("onnxruntime")
    import onnxruntime

    from tokenmerge_patch.vis import merge_sources

    model = make_clip().eval()
    twin = clip_twin(model).eval()
    tm.patch(model, layers=(1, 2), keep_rate=0.5)
    tm.patch(twin, layers=(1, 2), keep_rate=0.5)
    ours, theirs = merge_sources(model, images[0]), merge_sources(twin, images[0])
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)

    tm.export_onnx(model, tmp_path / "clip.onnx")
    session = onnxruntime.InferenceSession(str(tmp_path / "clip.onnx"))
    got = session.run(None, {session.get_inputs()[0].name: images.numpy()})[0]
    with torch.no_grad():
        want = model.get_image_features(pixel_values=images).pooler_output
    torch.testing.assert_close(torch.from_numpy(got), want, atol=1e-4, rtol=1e-4)

    before = _snapshot(model)
    with pytest.raises(TypeError, match="multimodal model whose forward wants text"):
        tm.finetune(model, [images], epochs=1)
    assert _snapshot(model) == before and tm.is_patched(model)


# -- still refused: SigLIP has no class token ---------------------------------------------------------------------


def test_siglip_class_scores_are_refused_clearly_and_untouched() -> None:
    """SigLIP towers have no class token: scoring by one is refused (the received score is their default,
    tests/test_class_free.py)."""
    vision = dict(**COMMON, intermediate_size=64)
    models = [
        SiglipVisionModel(SiglipVisionConfig(**vision)),
        SiglipModel(SiglipConfig(vision_config=vision, text_config={**TEXT, "max_position_embeddings": 8})),
    ]
    for model in models:
        before = _snapshot(model)
        with pytest.raises(ValueError, match=r"Siglip\w*Model has no class token"):
            tm.patch(model, layers=(1,), keep_rate=0.5, score="cls")
        assert not tm.is_patched(model) and _snapshot(model) == before


def test_swin_and_sam_are_refused_clearly_and_untouched() -> None:
    """Windowed attention without a class token (Swin) and SAM's image encoder: nothing to score by, refused."""
    from transformers import SamVisionConfig, SamVisionModel, SwinConfig, SwinModel

    models = [
        SwinModel(
            SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=4)
        ),
        SamVisionModel(
            SamVisionConfig(
                image_size=64,
                patch_size=16,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                output_channels=16,
                global_attn_indexes=[1],
            )
        ),
    ]
    for model in models:
        before = _snapshot(model)
        with pytest.raises(TypeError, match=f"supports .*got {type(model).__name__}"):
            tm.patch(model, layers=(1,), keep_rate=0.5)
        assert not tm.is_patched(model) and _snapshot(model) == before
