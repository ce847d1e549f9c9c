"""The baselines and ablations (paper Tables 3, 4): fuse, bipartite, similarities, size weighting,
proportional attention and source maps, each against an independent reference."""

from __future__ import annotations

import math

import pytest
import torch
from reference import reference_logits
from tiny_models import make_model, needs_attn_mask

import tokenmerge_patch as tm
from tokenmerge_patch.reduce import reduce_tokens

PLAN = {1: 0.7, 2: 0.5}


def patched_logits(model, images, plan=PLAN, **options):
    tm.patch(model, layers=tuple(plan), keep_rate=tuple(plan.values()), **options)
    with torch.no_grad():
        return model(images)


@pytest.mark.parametrize("flavour", ["vit", "registers_dinov2", "avg_pool"])
@pytest.mark.parametrize("method", ["fuse", "bipartite"])
def test_methods_match_reference(flavour: str, method: str, images: torch.Tensor) -> None:
    model = make_model(flavour)
    expected, counts = reference_logits(model, images, PLAN, method=method)
    assert torch.allclose(patched_logits(model, images, method=method), expected, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        assert tm.token_counts(model, images[:1]) == counts[0]


@pytest.mark.parametrize("similarity", ["cosine", "l1", "l2", "attention"])
def test_similarities_match_reference(similarity: str, images: torch.Tensor) -> None:
    model = make_model("layerscale_deit3")
    expected, _ = reference_logits(model, images, PLAN, similarity=similarity)
    actual = patched_logits(model, images, similarity=similarity)
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)


def test_similarities_choose_differently(images: torch.Tensor) -> None:
    model = make_model("vit")
    outputs = {s: patched_logits(model, images, similarity=s) for s in ("cosine", "l1", "attention", "random")}
    for name, logits in outputs.items():
        if name != "cosine":
            assert not torch.allclose(logits, outputs["cosine"]), name


@needs_attn_mask
def test_size_weighted_and_prop_attn_match_reference(images: torch.Tensor) -> None:
    model = make_model("avg_pool")
    literal = dict(size_weighted=False, prop_attn=False)  # the paper's method
    paper = patched_logits(model, images, **literal)
    torch.testing.assert_close(paper, reference_logits(model, images, PLAN, **literal)[0], atol=1e-4, rtol=1e-4)
    for options in (
        dict(size_weighted=True, prop_attn=False),
        {},
        dict(size_weighted=True, prop_attn=True),
        dict(keep_norm=True, prop_attn=False),
        dict(keep_norm=False),
    ):
        expected, _ = reference_logits(model, images, PLAN, **options)
        actual = patched_logits(model, images, **options)
        torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)
        # and each option really changes the result
        assert not torch.allclose(actual, paper, atol=1e-4)
    # the default is proportional attention with keep_norm
    defaults = patched_logits(model, images)
    torch.testing.assert_close(defaults, patched_logits(model, images, prop_attn=True, keep_norm=True))
    assert not tm.patch_config(model).size_weighted and tm.patch_config(model).prop_attn
    assert tm.patch_config(model).keep_norm
    # prop_attn=False is the paper's eq. 4: keep_norm follows it unless given
    assert not tm.patch_config(tm.patch(model, prop_attn=False)).keep_norm
    assert tm.patch_config(tm.patch(model, prop_attn=False, keep_norm=True)).keep_norm
    assert not tm.patch_config(tm.patch(model, method="bipartite")).keep_norm


@needs_attn_mask
def test_prop_attn_passes_a_float_mask_to_sdpa(images: torch.Tensor) -> None:
    model = make_model("vit")
    tm.patch(model, layers=(1,), keep_rate=0.5, prop_attn=True)
    masks = []
    original = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        masks.append(kwargs.get("attn_mask"))
        return original(*args, **kwargs)

    torch.nn.functional.scaled_dot_product_attention = spy
    try:
        with torch.no_grad():
            model(images)
    finally:
        torch.nn.functional.scaled_dot_product_attention = original
    assert masks[:2] == [None, None]  # before and in the first reducing block: every token is one patch
    sizes = tm.reduction_trace(model)[1].sizes
    for mask in masks[2:]:
        assert mask.dtype == torch.float32 and mask.shape == (3, 1, 1, 33)
        torch.testing.assert_close(mask[:, 0, 0], sizes.log())
    assert all(block.attn.fused_attn for block in model.blocks)


@pytest.mark.parametrize(("num_prefix", "num_patches"), [(1, 20), (1, 21), (2, 20), (2, 21)])
def test_bipartite_keep_index_is_the_output_order(num_prefix: int, num_patches: int) -> None:
    """After a partial bipartite merge, output patch token j holds input patch keep_index[j] (its survivor): the
    order RoPE positions follow. A alternates with the whole sequence: patch p is in A when p + num_prefix is even."""
    torch.manual_seed(num_prefix + num_patches)
    n = num_prefix + num_patches
    x, q, k = torch.randn(2, n, 4), torch.randn(2, 2, n, 3), torch.randn(2, 2, n, 3)
    out = reduce_tokens(x, q, k, 0.5, num_prefix=num_prefix, keep_rate=0.75, method="bipartite", trace_source=True)
    kept = out.x.shape[1] - num_prefix
    assert 0 < num_patches - kept < num_patches // 2  # some A tokens merged, some survived
    landing = out.source.gather(1, out.keep_index)  # where each survivor's own patch landed
    assert landing.tolist() == [list(range(num_prefix, num_prefix + kept))] * 2
    for row in out.keep_index.tolist():
        a_part = [p for p in row if (p + num_prefix) % 2 == 0]
        b_part = [p for p in row if (p + num_prefix) % 2 == 1]
        assert row == a_part + b_part and a_part == sorted(a_part)
        assert b_part == list(range(1 - num_prefix % 2, num_patches, 2))  # every B token survives, in order


@pytest.mark.parametrize("method", ["merge", "drop", "fuse", "bipartite"])
@pytest.mark.parametrize("keep_rate", [0.9, 0.5, 0.2])
def test_token_counts_per_method(method: str, keep_rate: float) -> None:
    model = make_model("distilled")  # 2 prefix tokens, 64 patches
    tm.patch(model, layers=(0, 2), keep_rate=keep_rate, method=method)
    with torch.no_grad():
        counts = tm.token_counts(model, torch.randn(1, 3, 32, 32))
    n = 64
    for _ in range(2):
        k = math.ceil(round(keep_rate * n, 6))
        if method == "fuse":
            k += 1  # the fused token, an ordinary patch token at the next reducing block
        elif method == "bipartite":
            k = n - min(n - k, n // 2)  # at most half the tokens merge per step
        n = k
    assert counts[-1] == 2 + n


def test_fused_token_is_reduced_again_at_the_next_layer() -> None:
    torch.manual_seed(0)
    x, q, k = torch.randn(1, 1 + 10, 4), torch.randn(1, 2, 11, 3), torch.randn(1, 2, 11, 3)
    first = reduce_tokens(x, q, k, 0.5, num_prefix=1, keep_rate=0.5, method="fuse", trace_source=True)
    assert first.x.shape[1] == 1 + 5 + 1
    assert (first.source == 6).sum() == 5 and first.sizes[0, -1] == 5
    # the next layer scores the fused token like any patch; make it the most attended one
    q2 = torch.zeros(1, 1, 7, 1)
    q2[0, 0, 0, 0] = 1.0
    k2 = torch.zeros(1, 1, 7, 1)
    k2[0, 0, 6, 0] = 10.0
    second = reduce_tokens(
        first.x,
        q2,
        k2,
        1.0,
        num_prefix=1,
        keep_rate=0.4,
        method="fuse",
        sizes=first.sizes,
        source=first.source,
        trace_source=True,
    )
    assert second.keep_index[0].tolist()[-1] == 5  # the fused token (patch 5 of 6) was kept
    assert second.sizes[0].sum() == 11


def test_bipartite_clamps_at_half() -> None:
    x, q, k = torch.randn(2, 1 + 20, 4), torch.randn(2, 2, 21, 3), torch.randn(2, 2, 21, 3)
    out = reduce_tokens(x, q, k, 0.5, num_prefix=1, keep_rate=0.1, method="bipartite", trace_source=True)
    assert out.x.shape[1] == 1 + 10
    assert out.sizes[:, 1:].sum(1).tolist() == [20.0, 20.0]
    # ToMe's sets alternate over the whole sequence: with the class token at 0, A holds the odd patches; all ten
    # merge, and every B token (even patch) survives in order; sources partition the patches
    assert out.keep_index.tolist() == [list(range(0, 20, 2))] * 2
    for b in range(2):
        assert set(out.source[b].tolist()) == set(range(1, 11))
        assert out.source[b, 0::2].tolist() == list(range(1, 11))  # each B patch is its own token


@pytest.mark.parametrize("method", ["merge", "drop", "fuse", "bipartite"])
def test_source_maps_partition_the_patches(method: str) -> None:
    model = make_model("registers_dinov2")  # 5 prefix tokens
    tm.patch(model, layers=(0, 1, 3), keep_rate=0.5, method=method, trace_source=True)
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    trace = tm.reduction_trace(model)
    for layer, record in trace.items():
        source = record.source
        assert source.shape == (2, 64)
        held = source[source >= 0]
        assert held.min() >= 5 and held.max() < record.tokens_out  # patches never land in prefix tokens
        for b in range(2):
            counts = torch.bincount(source[b][source[b] >= 0], minlength=record.tokens_out)
            # each token's size is the number of original patches that ended in it
            torch.testing.assert_close(counts[5:].float(), record.sizes[b, 5:])
        if method != "drop":
            assert (source >= 0).all(), layer  # nothing is lost
    if method == "drop":
        assert (trace[3].source >= 0).sum(1).tolist() == [trace[3].tokens_out - 5] * 2


def test_merge_into_cls_source_maps_may_point_to_the_class_token() -> None:
    torch.manual_seed(3)
    x, q, k = torch.randn(4, 1 + 30, 4), torch.randn(4, 2, 31, 3), torch.randn(4, 2, 31, 3)
    out = reduce_tokens(x, q, k, 0.5, num_prefix=1, keep_rate=0.2, merge_into_cls=True, trace_source=True)
    assert (out.source == 0).any()
    assert out.sizes.sum(1).tolist() == [31.0] * 4


def test_random_similarity_is_seeded(images: torch.Tensor) -> None:
    model = make_model("vit")
    first = patched_logits(model, images, similarity="random", seed=3)
    again = patched_logits(model, images, similarity="random", seed=3)
    other = patched_logits(model, images, similarity="random", seed=4)
    assert torch.equal(first, again) and not torch.equal(first, other)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(similarity="dot"), ValueError, "similarity must be one of"),
        (dict(method="drop", similarity="l2"), ValueError, "similarity applies to method='merge' only"),
        (dict(method="fuse", size_weighted=True), ValueError, "size_weighted applies to method='merge' only"),
        (dict(method="drop", keep_norm=True), ValueError, "keep_norm applies to method='merge' only"),
        (dict(keep_norm=1), TypeError, "keep_norm must be a bool"),
        (dict(prop_attn="yes"), TypeError, "prop_attn must be a bool"),
        (dict(seed=1.5), TypeError, "seed must be an int"),
    ],
)
def test_bad_method_options(kwargs, error, message) -> None:
    model = make_model("vit")
    with pytest.raises(error, match=message):
        tm.patch(model, **kwargs)
    assert not tm.is_patched(model)
