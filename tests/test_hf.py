"""patch()/unpatch() on Hugging Face transformers ViT / DeiT / Dinov2 / CLIP vision models (tiny, random weights,
built from config objects: no hub access), against unpatched runs, timm twins with the same weights, HF's own
eager attention weights and hand computations."""

from __future__ import annotations

import copy
import io
import pickle
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer
from tiny_models import perturb
from torch import Tensor, nn

import tokenmerge_patch as tm

transformers = pytest.importorskip("transformers", minversion="5")
from transformers import (  # noqa: E402
    BertConfig,
    BertModel,
    CLIPConfig,
    CLIPForImageClassification,
    CLIPVisionConfig,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
    DeiTConfig,
    DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher,
    DeiTModel,
    Dinov2Config,
    Dinov2ForImageClassification,
    Dinov2Model,
    ViTConfig,
    ViTForImageClassification,
    ViTForMaskedImageModeling,
    ViTImageProcessor,
    ViTModel,
)
from transformers.models.vit.modeling_vit import ViTLayer  # noqa: E402

from tokenmerge_patch.backends import find_backend  # noqa: E402
from tokenmerge_patch.backends.hf import BACKEND  # noqa: E402

COMMON = dict(image_size=32, patch_size=4, hidden_size=32, num_hidden_layers=4, num_attention_heads=2)
COMMON |= dict(layer_norm_eps=1e-6)  # timm's LayerNorm eps, so the timm twins match

CONFIGS = {
    "vit": lambda: ViTConfig(**COMMON, intermediate_size=128, num_labels=5),
    "deit": lambda: DeiTConfig(**COMMON, intermediate_size=128, num_labels=5),
    "dinov2": lambda: Dinov2Config(**COMMON, layerscale_value=0.5, use_mask_token=False, num_labels=5),
    "clip": lambda: CLIPVisionConfig(**COMMON, intermediate_size=128, projection_dim=8),
}
MODELS = {
    cls.__name__: (cls, family)
    for family, classes in {
        "vit": (ViTModel, ViTForImageClassification),
        "deit": (DeiTModel, DeiTForImageClassification, DeiTForImageClassificationWithTeacher),
        "dinov2": (Dinov2Model, Dinov2ForImageClassification),
        "clip": (CLIPVisionModel, CLIPVisionModelWithProjection),
    }.items()
    for cls in classes
}
PREFIX = {"vit": 1, "deit": 2, "dinov2": 1, "clip": 1}


def make_hf(name: str, attn: str = "sdpa", seed: int = 0) -> nn.Module:
    cls, family = MODELS[name]
    torch.manual_seed(seed)
    model = perturb(cls(CONFIGS[family]()), seed)
    model.set_attn_implementation(attn)
    return model


def outputs(model: nn.Module, images: Tensor, **kwargs) -> dict[str, Tensor]:
    """Every tensor a model returns (logits, last_hidden_state, pooler_output, image_embeds, ...)."""
    return {key: value for key, value in model(images, **kwargs).items() if isinstance(value, Tensor)}


def main_output(model: nn.Module, images: Tensor) -> Tensor:
    out = model(images)
    for key in ("logits", "image_embeds", "pooler_output"):
        if getattr(out, key, None) is not None:
            return out[key]
    raise AssertionError(f"no main output in {list(out)}")


def _layers(model: nn.Module) -> nn.ModuleList:
    return find_backend(model).blocks(model)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models


@pytest.fixture
def images() -> Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


# -- keep_rate = 1 is the unpatched model; scores are the class token's attention row ----------------------------


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_keep_rate_one_equals_unpatched(name: str, attn: str, images: Tensor) -> None:
    model = make_hf(name, attn)
    with torch.no_grad():
        expected = outputs(model, images)
        for kwargs in (dict(layers=(0, 1, 2, 3)), dict(layers=(1,), prop_attn=True)):
            tm.patch(model, keep_rate=1.0, **kwargs)
            patched = outputs(model, images)
            assert patched.keys() == expected.keys()
            for key in expected:
                assert (patched[key] - expected[key]).abs().max() <= 1e-5, key
        # the same patch at a lower keep rate is live: fewer tokens, other outputs
        tm.patch(model, layers=(1,), keep_rate=0.5)
        prefix = PREFIX[MODELS[name][1]]
        assert tm.token_counts(model, images) == [prefix + 64] + [prefix + 32] * 3
        assert (main_output(model, images) - main_output(tm.unpatch(model), images)).abs().max() > 1e-3


@pytest.mark.parametrize(
    "name", ["ViTModel", "DeiTForImageClassificationWithTeacher", "Dinov2Model", "CLIPVisionModel"]
)
def test_kept_tokens_are_the_top_of_the_class_tokens_eager_attention(name: str, images: Tensor) -> None:
    """HF's own eager attention weights (output_attentions) of the reducing layer, row 0 averaged over heads, rank
    the patches; ``drop`` keeps the top half. DeiT: row 0 (class token) scores, class + distillation token kept."""
    model = make_hf(name, "eager")
    prefix = PREFIX[MODELS[name][1]]
    tm.patch(model, layers=(1,), keep_rate=0.5, method="drop", trace_source=True)
    with torch.no_grad():
        out = model(images, output_attentions=True)
    probs = out.attentions[1]  # [B, H, N, N], N = prefix + 64
    assert probs.shape == (3, 2, prefix + 64, prefix + 64)
    expected = probs[:, :, 0, prefix:].mean(dim=1).topk(32, dim=1).indices
    kept = tm.reduction_trace(model)[1].source >= 0  # [B, 64]: which original patch survived
    for b in range(3):
        assert set(kept[b].nonzero().flatten().tolist()) == set(expected[b].tolist())
    assert out.attentions[2].shape[-1] == prefix + 32


# -- timm twins with the same weights ---------------------------------------------------------------------------

TIMM_TWINS = {
    "vit": lambda: VisionTransformer(img_size=32, patch_size=4, embed_dim=32, depth=4, num_heads=2, num_classes=5),
    "deit": lambda: VisionTransformerDistilled(
        img_size=32, patch_size=4, embed_dim=32, depth=4, num_heads=2, num_classes=5
    ),
    "dinov2": lambda: VisionTransformer(
        img_size=32, patch_size=4, embed_dim=32, depth=4, num_heads=2, num_classes=0, init_values=0.5
    ),
    "clip": lambda: VisionTransformer(
        img_size=32,
        patch_size=4,
        embed_dim=32,
        depth=4,
        num_heads=2,
        num_classes=8,
        pre_norm=True,
        act_layer="quick_gelu",
    ),
}
HF_TWINS = {
    "vit": ViTForImageClassification,
    "deit": DeiTForImageClassificationWithTeacher,
    "dinov2": Dinov2ForImageClassification,
    "clip": CLIPVisionModelWithProjection,
}
# HF name -> timm name, applied in order; q/k/v projections are stacked into timm's fused qkv afterwards
RENAMES = [
    (r"^(vit|deit|dinov2|vision_model)\.", ""),
    (r"^embeddings\.(cls_token|class_embedding)$", "cls_token"),
    (r"^embeddings\.distillation_token$", "dist_token"),
    (r"^embeddings\.(position_embeddings|position_embedding\.weight)$", "pos_embed"),
    (r"^embeddings\.(patch_embeddings\.projection|patch_embedding)\.", "patch_embed.proj."),
    (r"^pre_layrnorm\.", "norm_pre."),
    (r"^(encoder\.)?layers?\.(\d+)\.", r"blocks.\2."),
    (r"\.(layernorm_before|layer_norm1)\.", ".norm1."),
    (r"\.(layernorm_after|layer_norm2)\.", ".norm2."),
    (r"\.(attention|self_attn)\.(o_proj|out_proj)\.", ".attn.proj."),
    (r"\.(attention|self_attn)\.([qkv])_proj\.", r".attn.\2."),
    (r"\.layer_scale(\d)\.lambda1$", r".ls\1.gamma"),
    (r"^(layernorm|post_layernorm)\.", "norm."),
    (r"^(classifier|cls_classifier|visual_projection)\.", "head."),
    (r"^distillation_classifier\.", "head_dist."),
]


def load_hf_weights_into_timm(hf: nn.Module, timm_model: nn.Module) -> nn.Module:
    """Copy an HF model's weights into its timm twin (strict: every timm tensor is set exactly once)."""
    target = timm_model.state_dict()
    mapped: dict[str, Tensor] = {}
    for name, value in hf.state_dict().items():
        if isinstance(hf, Dinov2ForImageClassification) and name.startswith("classifier."):
            continue  # cat([cls, mean]) head: applied by hand in the test
        for pattern, replacement in RENAMES:
            name = re.sub(pattern, replacement, name)
        mapped[name] = value
    for name in [n for n in mapped if re.search(r"\.attn\.q\.", n)]:
        parts = [mapped.pop(name.replace(".attn.q.", f".attn.{p}.")) for p in "qkv"]
        mapped[name.replace(".attn.q.", ".attn.qkv.")] = torch.cat(parts)
    if "head.bias" in target and "head.bias" not in mapped:  # CLIP's projection has no bias
        mapped["head.bias"] = torch.zeros_like(target["head.bias"])
    timm_model.load_state_dict({name: value.reshape(target[name].shape) for name, value in mapped.items()})
    return timm_model.eval()


def make_twins(family: str) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    hf = perturb(HF_TWINS[family](CONFIGS[family]()), 0)
    return hf, load_hf_weights_into_timm(hf, TIMM_TWINS[family]())


def hand_size_weighted_mean(tokens: Tensor, sizes: Tensor | None) -> Tensor:
    if sizes is None:
        return tokens.mean(dim=1)
    return (tokens * sizes[..., None]).sum(dim=1) / sizes.sum(dim=1, keepdim=True)


def twin_output(hf: nn.Module, timm_model: nn.Module, images: Tensor) -> Tensor:
    """What the HF twin should return, computed from the timm model (the Dinov2 head by hand)."""
    if not isinstance(hf, Dinov2ForImageClassification):
        return timm_model(images)
    features = timm_model.forward_features(images)
    trace = tm.reduction_trace(timm_model) if tm.is_patched(timm_model) else {}
    sizes = trace[max(trace)].sizes[:, 1:] if trace else None
    pooled = torch.cat([features[:, 0], hand_size_weighted_mean(features[:, 1:], sizes)], dim=1)
    return F.linear(pooled, hf.classifier.weight, hf.classifier.bias)


@pytest.mark.parametrize("variant", ["merge", "drop", "merge_prop_attn"])
@pytest.mark.parametrize("family", sorted(HF_TWINS))
def test_timm_twin_gives_the_same_patched_output(family: str, variant: str, images: Tensor) -> None:
    hf, timm_model = make_twins(family)
    with torch.no_grad():
        unpatched = main_output(hf, images)
        torch.testing.assert_close(unpatched, twin_output(hf, timm_model, images), atol=1e-5, rtol=1e-5)
        kwargs = dict(layers=(1, 2), keep_rate=0.5, method=variant.split("_")[0], prop_attn="prop" in variant)
        for model in (hf, timm_model):
            tm.patch(model, **kwargs)
        patched = main_output(hf, images)
        torch.testing.assert_close(patched, twin_output(hf, timm_model, images), atol=1e-4, rtol=1e-4)
        assert tm.token_counts(hf, images) == tm.token_counts(timm_model, images)
    assert (patched - unpatched).abs().max() > 1e-3


def test_count_flops_equals_the_timm_twins() -> None:
    for family in ("vit", "deit"):
        hf, timm_model = make_twins(family)
        for keep_rate in (1.0, 0.5):
            for model in (hf, timm_model):
                tm.patch(model, layers=(1, 2), keep_rate=keep_rate)
            hf_report, timm_report = tm.count_flops(hf, (3, 32, 32)), tm.count_flops(timm_model, (3, 32, 32))
            assert hf_report.total == timm_report.total
            assert hf_report.blocks == timm_report.blocks
            assert hf_report.analytic == timm_report.analytic
        assert [b.tokens_out for b in hf_report.blocks] == [PREFIX[family] + n for n in (64, 32, 16, 16)]


# -- pooling, hidden states, other image sizes --------------------------------------------------------------------


@pytest.mark.parametrize("method", ["merge", "fuse"])
def test_dinov2_classifier_mean_is_size_weighted(method: str, images: Tensor) -> None:
    model = make_hf("Dinov2ForImageClassification")
    tm.patch(model, layers=(1, 2), keep_rate=0.5, method=method)
    with torch.no_grad():
        out = model(images, output_hidden_states=True)
        norm = model.dinov2.layernorm
        tokens = F.layer_norm(out.hidden_states[-1], (32,), norm.weight, norm.bias, norm.eps)
        sizes = tm.reduction_trace(model)[2].sizes[:, 1:]
        assert sizes.sum(dim=1).eq(64).all() and not sizes.eq(1).all()

        def head(mean: Tensor) -> Tensor:
            return F.linear(torch.cat([tokens[:, 0], mean], dim=1), model.classifier.weight, model.classifier.bias)

        torch.testing.assert_close(out.logits, head(hand_size_weighted_mean(tokens[:, 1:], sizes)))
        assert (out.logits - head(tokens[:, 1:].mean(dim=1))).abs().max() > 1e-3
        assert model.classifier.forward.pending == []  # nothing kept around after the forward


@pytest.mark.parametrize("name", ["ViTModel", "DeiTModel", "Dinov2Model", "CLIPVisionModel"])
def test_hidden_states_and_attentions_have_reduced_shapes(name: str, images: Tensor) -> None:
    prefix = PREFIX[MODELS[name][1]]
    for attn in ("sdpa", "eager"):
        model = make_hf(name, attn)
        with torch.no_grad():
            unpatched = model(images, output_hidden_states=True, output_attentions=True)
            tm.patch(model, layers=(1, 2), keep_rate=0.5)
            seen = []
            _layers(model)[-1].register_forward_hook(lambda _m, _a, out, seen=seen: seen.append(out))
            out = model(images, output_hidden_states=True, output_attentions=True)
        counts = [prefix + n for n in (64, 64, 32, 16, 16)]  # embeddings, then after each layer
        assert [h.shape for h in out.hidden_states] == [(3, n, 32) for n in counts]
        assert torch.equal(out.hidden_states[0], unpatched.hidden_states[0])
        assert torch.equal(out.hidden_states[-1], seen[0])
        if attn == "sdpa":  # HF's rule: sdpa returns no weights, patched or not
            assert len(out.attentions) == len(unpatched.attentions) == 0
        else:  # each layer's weights over the tokens entering it
            assert [a.shape for a in out.attentions] == [(3, 2, n, n) for n in counts[:-1]]
            torch.testing.assert_close(out.attentions[3].sum(-1), torch.ones(3, 2, counts[3], dtype=torch.float32))


@pytest.mark.parametrize(
    "name", ["ViTForImageClassification", "DeiTForImageClassificationWithTeacher", "Dinov2Model", "CLIPVisionModel"]
)
def test_other_image_size_with_interpolated_positions(name: str) -> None:
    model = make_hf(name)
    images = torch.randn(2, 3, 48, 40)  # 12 x 10 = 120 patches
    kwargs = {} if name == "Dinov2Model" else dict(interpolate_pos_encoding=True)  # Dinov2 always interpolates
    prefix = PREFIX[MODELS[name][1]]
    with torch.no_grad():
        expected = outputs(model, images, **kwargs)
        tm.patch(model, layers=(1, 2), keep_rate=1.0)
        same = outputs(model, images, **kwargs)
        tm.patch(model, layers=(1, 2), keep_rate=0.5)
        reduced = outputs(model, images, **kwargs)
    for key in expected:
        assert (same[key] - expected[key]).abs().max() <= 1e-5
    assert [(r.tokens_in, r.tokens_out) for r in tm.reduction_trace(model).values()] == [
        (prefix + 120, prefix + 60),
        (prefix + 60, prefix + 30),
    ]
    assert next(iter(reduced.values())).shape[0] == 2


def test_pipeline_runs_on_a_patched_model() -> None:
    from PIL import Image

    model = make_hf("ViTForImageClassification")
    tm.patch(model, layers=(1, 2), keep_rate=0.5)
    processor = ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    classify = transformers.pipeline("image-classification", model=model, image_processor=processor)
    rng = np.random.default_rng(0)
    pictures = [Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)) for _ in range(2)]
    results = classify(pictures, top_k=5)
    assert tm.reduction_trace(model)[2].tokens_out == 17  # the pipeline ran the reduced model
    with torch.no_grad():
        probs = model(processor(pictures, return_tensors="pt").pixel_values).logits.softmax(-1)
    for result, expected in zip(results, probs, strict=True):
        assert {r["label"]: r["score"] for r in result} == pytest.approx(
            {model.config.id2label[i]: p for i, p in enumerate(expected.tolist())}, abs=1e-5
        )


# -- install / uninstall, copies, gradients -----------------------------------------------------------------------


def _snapshot(model: nn.Module) -> dict[str, tuple]:
    return {
        name: (set(module.__dict__), len(module._forward_pre_hooks), len(module._forward_hooks))
        for name, module in model.named_modules()
    }


@pytest.mark.parametrize("name", sorted(MODELS))
def test_unpatch_is_bit_exact_and_leaves_nothing_behind(name: str, images: Tensor) -> None:
    model = make_hf(name)
    before = _snapshot(model)
    state = {key: value.clone() for key, value in model.state_dict().items()}
    layers, submodules = list(_layers(model)), dict(model.named_modules())
    with torch.no_grad():
        expected = outputs(model, images)
        tm.patch(model, layers=(1,), keep_rate=0.5, prop_attn=True)  # reducing + proportional layers
        tm.patch(model, layers=(1, 2), keep_rate=0.5, method="drop")  # re-configures
        model(images)
        assert list(_layers(model)) == layers and dict(model.named_modules()) == submodules
        assert list(model.state_dict()) == list(state)
        assert all(torch.equal(model.state_dict()[key], value) for key, value in state.items())
        tm.unpatch(model)
        after = outputs(model, images)
    assert not tm.is_patched(model)
    assert _snapshot(model) == before
    assert all(torch.equal(after[key], expected[key]) for key in expected)


def test_deepcopy_and_pickle(images: Tensor) -> None:
    model = make_hf("Dinov2ForImageClassification")
    tm.patch(model, layers=(1, 2), keep_rate=0.5, prop_attn=True, trace_source=True)
    with torch.no_grad():
        expected = model(images).logits
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model)), torch.load(buffer, weights_only=False)):
        assert tm.is_patched(clone) and type(clone) is type(model)
        assert clone.dinov2.encoder.layer[1].forward.block is clone.dinov2.encoder.layer[1]
        assert clone.classifier.forward.model is clone
        with torch.no_grad():
            assert torch.equal(clone(images).logits, expected)
    with torch.no_grad():
        assert torch.equal(model(images).logits, expected)


@pytest.mark.parametrize("clone", [copy.deepcopy, lambda model: pickle.loads(pickle.dumps(model))])
def test_unpatch_of_a_copy_restores_it(clone, images: Tensor) -> None:
    model = make_hf("Dinov2ForImageClassification")
    before = _snapshot(model)
    with torch.no_grad():
        expected = model(images).logits
    copied = clone(tm.patch(model, layers=(1, 2), keep_rate=0.5))
    tm.unpatch(copied)
    assert tm.is_patched(model) and _snapshot(copied) == before
    with torch.no_grad():
        assert torch.equal(copied(images).logits, expected)


@pytest.mark.parametrize(
    "name", ["ViTModel", "DeiTForImageClassificationWithTeacher", "Dinov2ForImageClassification", "CLIPVisionModel"]
)
def test_backward_reaches_every_parameter(name: str, images: Tensor) -> None:
    def with_grad(patched: bool) -> set[str]:
        model = make_hf(name).train()
        if patched:
            tm.patch(model, layers=(1, 2), keep_rate=0.5, prop_attn=True)
        sum(value.square().sum() for value in outputs(model, images).values()).backward()
        return {n for n, p in model.named_parameters() if p.grad is not None and p.grad.any()}

    reached = with_grad(patched=True)
    assert reached == with_grad(patched=False) == {n for n, _ in make_hf(name).named_parameters()}


def test_activation_checkpointing_recomputes_the_same_reduction(images: Tensor) -> None:
    grads, checkpointed = [], []
    for checkpointing in (False, True):
        model = make_hf("ViTForImageClassification").train()
        tm.patch(model, layers=(1, 2), keep_rate=0.5, prop_attn=True)
        if checkpointing:
            model.activation_checkpointing_enable()
            for index, layer in enumerate(model.vit.layers):
                original = layer._gradient_checkpointing_func

                def spy(*args, _index=index, _original=original, **kwargs):
                    checkpointed.append(_index)
                    return _original(*args, **kwargs)

                layer._gradient_checkpointing_func = spy
        model(images).logits.square().sum().backward()
        grads.append([p.grad for p in model.parameters()])
    assert sorted(set(checkpointed)) == [0, 1, 2, 3]  # reducing (1, 2) and proportional (3) layers too
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


# -- bad input: a clear error, and the model as it was -----------------------------------------------------------


@pytest.mark.parametrize("name", ["ViTModel", "Dinov2Model"])
def test_attention_mask_is_refused_clearly(name: str, images: Tensor) -> None:
    model = make_hf(name)
    tm.patch(model, layers=(2,), keep_rate=0.5)
    with torch.no_grad():
        expected = model(images).last_hidden_state
        padding = torch.ones(3, 65, dtype=torch.long)
        padding[:, -5:] = 0
        with pytest.raises(ValueError, match=r"block 2 is patched to reduce tokens .* so an attention_mask"):
            model(images, attention_mask=padding)
        # a mask that masks nothing is dropped by HF (None reaches the layers) and is fine
        assert torch.equal(
            model(images, attention_mask=torch.ones(3, 65, dtype=torch.long)).last_hidden_state, expected
        )
        assert torch.equal(model(images).last_hidden_state, expected)


def _unsupported() -> dict[str, nn.Module]:
    tiny = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    return {
        "ViTForMaskedImageModeling": ViTForMaskedImageModeling(ViTConfig(**COMMON, intermediate_size=64)),
        "BertModel": BertModel(BertConfig(**tiny, vocab_size=50)),
        "CLIPForImageClassification": CLIPForImageClassification(
            CLIPConfig(vision_config=dict(**COMMON, intermediate_size=64), text_config=dict(**tiny, vocab_size=50))
        ),
    }


def test_unsupported_models_are_refused_and_untouched() -> None:
    for name, model in _unsupported().items():
        before = _snapshot(model)
        with pytest.raises(TypeError, match=rf"supports transformers ViTModel, .*; got {name}$"):
            tm.patch(model, layers=(1,), keep_rate=0.5)
        assert not tm.is_patched(model) and _snapshot(model) == before


def test_unsupported_layer_or_attention_is_refused(images: Tensor) -> None:
    class MyLayer(ViTLayer):
        def forward(self, hidden_states, attention_mask=None, **kwargs):
            return super().forward(hidden_states, attention_mask, **kwargs)

    model = make_hf("ViTModel")
    custom = MyLayer(model.config).eval()
    custom.load_state_dict(model.layers[1].state_dict())
    model.layers[1] = custom
    model.layers[3].attention = nn.Identity()
    before = _snapshot(model)
    with pytest.raises(TypeError, match="layer 1 is MyLayer; tokenmerge_patch supports ViTLayer, DeiTLayer"):
        tm.patch(model, layers=(1, 2), keep_rate=0.5)
    with pytest.raises(TypeError, match="layer 1 is MyLayer"):  # prop_attn would change layer 1's forward too
        tm.patch(model, layers=(0,), keep_rate=0.5, prop_attn=True)
    with pytest.raises(TypeError, match="layer 3's attention is Identity; tokenmerge_patch supports ViTAttention"):
        tm.patch(model, layers=(3,), keep_rate=0.5)
    assert not tm.is_patched(model) and _snapshot(model) == before
    tm.patch(model, layers=(0,), keep_rate=0.5, prop_attn=False)  # without prop_attn later layers only pass along


def test_layer_subclasses_that_keep_the_forward_are_accepted(images: Tensor) -> None:
    class Plain(ViTLayer):  # what FSDP2 makes: transformers re-wraps forward for checkpointing, nothing else
        pass

    model = make_hf("ViTForImageClassification")
    with torch.no_grad():
        tm.patch(model, layers=(1, 2), keep_rate=0.5)
        expected = model(images).logits
        tm.unpatch(model)
        model.vit.layers[1].__class__ = Plain
        tm.patch(model, layers=(1, 2), keep_rate=0.5)
        torch.testing.assert_close(model(images).logits, expected)


def test_prop_attn_needs_a_float_mask_implementation(images: Tensor) -> None:
    model = make_hf("ViTForImageClassification")
    model.set_attn_implementation("flex_attention")
    with pytest.raises(ValueError, match="prop_attn needs attn_implementation 'sdpa' or 'eager'"):
        tm.patch(model, layers=(1, 2), keep_rate=0.5, prop_attn=True)
    assert not tm.is_patched(model)
    tm.patch(model, layers=(1, 2), keep_rate=0.5, prop_attn=False)  # without prop_attn any implementation will do


def test_prop_attn_changes_the_output_the_same_way_for_sdpa_and_eager(images: Tensor) -> None:
    results = {}
    for attn in ("sdpa", "eager"):
        model = make_hf("CLIPVisionModelWithProjection", attn)
        for prop_attn in (False, True):
            tm.patch(model, layers=(1, 2), keep_rate=0.5, prop_attn=prop_attn)
            with torch.no_grad():
                results[attn, prop_attn] = model(images).image_embeds
    assert (results["sdpa", True] - results["sdpa", False]).abs().max() > 1e-3
    torch.testing.assert_close(results["sdpa", True], results["eager", True], atol=1e-5, rtol=1e-5)


def test_backend_claims_transformers_models_only() -> None:
    timm_model = TIMM_TWINS["vit"]()
    assert not BACKEND.claims(timm_model) and not BACKEND.claims(nn.Linear(2, 2))
    assert BACKEND.claims(make_hf("ViTModel")) and find_backend(make_hf("CLIPVisionModel")) is BACKEND
    assert find_backend(timm_model).name == "timm"
