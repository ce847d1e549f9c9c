"""Encoders without a class token (SigLIP): the received-attention score against an independent eager reference,
attention pooling (MAP) that counts a merged token as the patches it holds, Hugging Face SigLIP towers and
``SiglipModel``, and the refusals that remain."""

from __future__ import annotations

import pytest
import timm
import torch
from reference import reference_logits
from timm.models.vision_transformer import VisionTransformer
from tiny_models import TINY, assert_untouched, model_snapshot, perturb

import tokenmerge_patch as tm
from tokenmerge_patch.records import tag
from tokenmerge_patch.reduce import received_attention, reduce_tokens

pytestmark = pytest.mark.usefixtures("one_thread")
PLAN = {1: 0.7, 2: 0.5}

CLASS_FREE = {
    "map": lambda: VisionTransformer(**TINY, class_token=False, global_pool="map"),  # SigLIP's head
    "avg": lambda: VisionTransformer(**TINY, class_token=False, global_pool="avg"),
    "registers_avg": lambda: VisionTransformer(**TINY, class_token=False, reg_tokens=2, global_pool="avg"),
}


def make(flavour: str, seed: int = 0) -> VisionTransformer:
    torch.manual_seed(seed)
    return perturb(CLASS_FREE[flavour](), seed)


def patched(model, images, plan=PLAN, **options):
    tm.patch(model, layers=tuple(plan), keep_rate=tuple(plan.values()), **options)
    with torch.no_grad():
        return model(images)


def test_received_attention_is_the_mean_attention_each_token_gets() -> None:
    generator = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 6, 4, generator=generator), torch.randn(2, 3, 6, 4, generator=generator)
    bias = torch.randn(2, 1, 1, 6, generator=generator)
    weights = torch.tensor([[1.0, 2, 1, 3, 1, 1], [1, 1, 1, 1, 1, 5]])
    probs = ((q @ k.transpose(-2, -1)) * 0.5 + bias).softmax(-1)  # [B, H, N, N]
    # by hand: each query's row weighted by the patches it holds, over all queries and heads
    expected = torch.stack(
        [(probs[b] * (weights[b] / weights[b].sum())[None, :, None]).sum(1).mean(0) for b in range(2)]
    )
    torch.testing.assert_close(received_attention(q, k, 0.5, bias, weights), expected)
    torch.testing.assert_close(received_attention(q, k, 0.5, bias, weights).sum(-1), torch.ones(2))


def test_received_attention_in_head_chunks_is_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    from tokenmerge_patch import reduce

    q, k = torch.randn(2, 4, 9, 3), torch.randn(2, 4, 9, 3)
    whole = received_attention(q, k, 0.3)
    monkeypatch.setattr(reduce, "_RECEIVED_CHUNK", 2 * 9 * 9)  # one head at a time
    torch.testing.assert_close(received_attention(q, k, 0.3), whole)


@pytest.mark.parametrize("flavour", sorted(CLASS_FREE))
@pytest.mark.parametrize("method", ["merge", "drop", "fuse", "bipartite"])
def test_class_free_models_match_the_reference(flavour: str, method: str, images: torch.Tensor) -> None:
    model = make(flavour)
    expected, counts = reference_logits(model, images, PLAN, method=method, score="received")
    torch.testing.assert_close(patched(model, images, method=method), expected, atol=1e-4, rtol=1e-4)
    assert tm.patch_config(model).score == "received"  # the default where there is no class token
    with torch.no_grad():
        assert tm.token_counts(model, images[:1]) == counts[0]


@pytest.mark.parametrize("options", [dict(prop_attn=False), dict(size_weighted=True)])
def test_received_score_options_match_the_reference(options: dict, images: torch.Tensor) -> None:
    model = make("map")
    expected, _ = reference_logits(model, images, PLAN, score="received", **options)
    torch.testing.assert_close(patched(model, images, **options), expected, atol=1e-4, rtol=1e-4)


def test_a_class_token_model_can_score_by_received_attention(images: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = perturb(VisionTransformer(**TINY), 0)
    expected, _ = reference_logits(model, images, PLAN, score="received")
    received = patched(model, images, score="received")
    torch.testing.assert_close(received, expected, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(received, patched(model, images))  # the class score chooses differently here


@pytest.mark.parametrize("flavour", sorted(CLASS_FREE))
def test_keep_rate_one_is_exact(flavour: str, images: torch.Tensor) -> None:
    model = make(flavour)
    with torch.no_grad():
        expected = model(images)
    torch.testing.assert_close(patched(model, images, plan={1: 1.0, 2: 1.0}), expected, rtol=0, atol=0)


def test_attention_pool_counts_a_merged_token_as_its_patches() -> None:
    model = make("map")
    tm.patch(model, keep_rate=0.5)
    generator = torch.Generator().manual_seed(3)
    a, b = torch.randn(1, 1, 32, generator=generator), torch.randn(1, 1, 32, generator=generator)
    with torch.no_grad():
        # three copies of a and one of b, unpatched pooling ...
        full = type(model).pool(model, torch.cat([a, a, a, b], dim=1))
        # ... equal a token of size 3 and one of size 1
        merged = tag(torch.cat([a, b], dim=1), (torch.tensor([[3.0, 1.0]]), None, True, (), None))
        torch.testing.assert_close(model.pool(merged), full)
        assert not torch.allclose(type(model).pool(model, torch.cat([a, b], dim=1)), full)


@pytest.mark.parametrize(
    "options", [dict(score="cls"), dict(merge_into_cls=True), dict(score="cls", method="drop"), dict(score="x")]
)
def test_what_needs_a_class_token_is_refused_and_the_model_untouched(options: dict) -> None:
    model = tm.patch(make("map"), keep_rate=0.5)  # a patched model stays patched as it was
    before = model_snapshot(model)
    with pytest.raises(ValueError, match=r"class token|score must be one of"):
        tm.patch(model, keep_rate=0.7, **options)
    assert_untouched(model, before)


def test_reduce_tokens_without_prefix_tokens() -> None:
    x, q, k = torch.randn(2, 8, 4), torch.randn(2, 2, 8, 3), torch.randn(2, 2, 8, 3)
    out = reduce_tokens(x, q, k, 0.5, num_prefix=0, keep_rate=0.5, score="received", trace_source=True)
    assert out.x.shape == (2, 4, 4) and torch.equal(out.sizes.sum(1), torch.full((2,), 8.0))
    assert sorted(out.source[0].unique().tolist()) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="count the class token"):
        reduce_tokens(x, q, k, 0.5, num_prefix=0, keep_rate=0.5)  # score="cls" needs one


def test_timm_siglip_and_gap_models_patch() -> None:
    for name, options in (("vit_base_patch16_siglip_224", {}), ("vit_base_patch16_siglip_gap_224", {})):
        model = timm.create_model(name, img_size=32, patch_size=4, embed_dim=32, depth=4, num_heads=2, **options)
        model = perturb(model, 0)
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            expected = model(x)
            tm.patch(model, keep_rate=1.0)
            torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
            tm.patch(model, flops=0.6)
            assert model(x).shape == expected.shape
        full = tm.count_flops(tm.unpatch(model)).total
        tm.patch(model, flops=0.6)
        assert 0.59 <= tm.count_flops(model).total / full <= 0.6


def _hf_siglip(kind: str = "vision", attn: str = "sdpa"):
    transformers = pytest.importorskip("transformers")
    vision = dict(
        image_size=32, patch_size=4, hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64
    )
    torch.manual_seed(0)
    if kind == "vision":
        model = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**vision, attn_implementation=attn))
    else:
        text = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=64)
        text |= dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
        config = transformers.SiglipConfig(vision_config=vision, text_config=text)
        model = transformers.SiglipModel(config)
        model.set_attn_implementation(attn)
    return perturb(model, 0)


def test_hf_siglip_keep_one_is_exact_and_unpatch_restores(images: torch.Tensor) -> None:
    model = _hf_siglip()
    with torch.no_grad():
        expected = model(images)
        tm.patch(model, keep_rate=1.0)
        out = model(images)
        torch.testing.assert_close(out.pooler_output, expected.pooler_output, rtol=0, atol=0)
        torch.testing.assert_close(out.last_hidden_state, expected.last_hidden_state, rtol=0, atol=0)
        tm.patch(model, keep_rate=0.5)
        reduced = model(images)
        assert reduced.last_hidden_state.shape == (3, 8, 32) and reduced.pooler_output.shape == (3, 32)
        assert not torch.allclose(reduced.pooler_output, expected.pooler_output)
        tm.unpatch(model)
        torch.testing.assert_close(model(images).pooler_output, expected.pooler_output, rtol=0, atol=0)


def test_hf_siglip_keeps_the_tokens_that_receive_most_attention(images: torch.Tensor) -> None:
    model = _hf_siglip(attn="eager")
    with torch.no_grad():
        attentions = model(images, output_attentions=True).attentions[1]  # [B, H, N, N] of layer 1
        received = attentions.mean(dim=(1, 2))  # over heads and queries (every token is one patch here)
        tm.patch(model, layers=(1,), keep_rate=0.25, method="drop")
        model(images)
    source = tm.reduction_trace(model)[1].source  # each patch's token, -1 if dropped
    for b in range(images.shape[0]):
        expected = set(received[b].topk(16).indices.tolist())
        assert set((source[b] >= 0).nonzero().flatten().tolist()) == expected


def test_hf_siglip_sdpa_and_eager_agree(images: torch.Tensor) -> None:
    outputs = []
    for attn in ("sdpa", "eager"):
        model = tm.patch(_hf_siglip(attn=attn), keep_rate=0.5)
        with torch.no_grad():
            outputs.append(model(images).pooler_output)
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-4, rtol=1e-4)


def test_hf_siglip_model_zero_shot_patches_the_image_side(images: torch.Tensor) -> None:
    model = _hf_siglip("both")
    ids = torch.randint(3, 64, (4, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(input_ids=ids, pixel_values=images)
        text = model.get_text_features(input_ids=ids).pooler_output
        tm.patch(model, keep_rate=1.0)
        torch.testing.assert_close(
            model(input_ids=ids, pixel_values=images).logits_per_image, expected.logits_per_image
        )
        tm.patch(model, keep_rate=0.5)
        out = model(input_ids=ids, pixel_values=images)
        assert out.logits_per_image.shape == (3, 4)
        torch.testing.assert_close(model.get_text_features(input_ids=ids).pooler_output, text)  # text side untouched
    full = tm.count_flops(tm.unpatch(model)).total
    tm.patch(model, flops=0.6)
    assert 0.59 <= tm.count_flops(model).total / full <= 0.6  # the image side's FLOPs


def test_hf_siglip2_is_refused_with_a_reason() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.Siglip2VisionConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, num_patches=16
    )
    model = transformers.Siglip2VisionModel(config)
    before = model_snapshot(model)
    with pytest.raises(TypeError, match="SigLIP 2 runs at variable resolutions"):
        tm.patch(model)
    assert_untouched(model, before)


def test_count_flops_counts_the_received_score() -> None:
    torch.manual_seed(0)
    model = VisionTransformer(**TINY).eval()  # a class token, so both scores apply to the same plan
    layers, rates = (1, 2), (0.7, 0.5)
    cls = tm.count_flops(tm.patch(model, layers, rates))
    received = tm.count_flops(tm.patch(model, layers, rates, score="received"))
    heads, width = 2, 32
    # the whole attention matrix (q k^T over every head) and the mean over the queries, in each reducing block,
    # against the class row alone
    expected = sum(heads * n * n * (width // heads) + heads * n * n - n * width for n in (65, 46))
    assert received.total - cls.total == expected
    assert [b.tokens_out for b in received.blocks] == [b.tokens_out for b in cls.blocks]
