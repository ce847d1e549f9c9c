"""patch()/unpatch() on timm ViTs of every supported flavour, against independent computations."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import timm
import torch
from reference import eager_attention, reference_logits
from timm.models.vision_transformer import VisionTransformer
from tiny_models import FLAVOURS, assert_patch_refused, make_model, needs_attn_mask

import tokenmerge_patch as tm
from tokenmerge_patch.backends.capture import CaptureOutputs
from tokenmerge_patch.reduce import class_attention


def test_keep_rate_one_equals_unpatched(flavour: str, images: torch.Tensor) -> None:
    model = make_model(flavour)
    with torch.no_grad():
        expected = model(images)
        tm.patch(model, layers=(0, 1, 2, 3), keep_rate=1.0)
        patched = model(images)
    assert (patched - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("method", ["merge", "drop"])
def test_matches_independent_eager_reference(flavour: str, images: torch.Tensor, method: str) -> None:
    model = make_model(flavour)
    plan = {1: 0.7, 2: 0.5}
    expected, counts = reference_logits(model, images, plan, method=method)
    tm.patch(model, layers=tuple(plan), keep_rate=tuple(plan.values()), method=method)
    with torch.no_grad():
        patched = model(images)
        assert tm.token_counts(model, images[:1]) == counts[0]
    torch.testing.assert_close(patched, expected, atol=1e-4, rtol=1e-4)
    # and the reduction really changed the output
    assert (patched - tm.unpatch(model)(images)).abs().max() > 1e-3


def test_merge_into_cls_matches_reference(images: torch.Tensor) -> None:
    model = make_model("vit")
    expected, _ = reference_logits(model, images, {1: 0.5, 3: 0.5}, merge_into_cls=True)
    tm.patch(model, layers=(1, 3), keep_rate=0.5, merge_into_cls=True)
    with torch.no_grad():
        torch.testing.assert_close(model(images), expected, atol=1e-4, rtol=1e-4)


def test_dynamic_image_size_matches_reference() -> None:
    model = make_model("dynamic")
    images = torch.randn(2, 3, 40, 24)
    expected, counts = reference_logits(model, images, {1: 0.6})
    tm.patch(model, layers=1, keep_rate=0.6)
    with torch.no_grad():
        torch.testing.assert_close(model(images), expected, atol=1e-4, rtol=1e-4)
    assert counts[0][1] == 1 + 36  # 10 x 6 = 60 patches, keep ceil(0.6 * 60)


def test_deit_small_token_counts() -> None:
    model = timm.create_model("deit_small_patch16_224")
    tm.patch(model, layers=(3, 6, 9), keep_rate=0.7)
    counts = tm.token_counts(model, torch.randn(1, 3, 224, 224))
    assert counts == [197] * 3 + [139] * 3 + [98] * 3 + [69] * 3
    with torch.no_grad():
        model(torch.randn(1, 3, 224, 224))  # counting leaves the trace alone: a forward makes it
    assert [(r.tokens_in, r.tokens_out) for r in tm.reduction_trace(model).values()] == [
        (197, 139),
        (139, 98),
        (98, 69),
    ]


def test_distilled_keeps_both_prefix_tokens(images: torch.Tensor) -> None:
    model = make_model("distilled")
    tm.patch(model, layers=(0, 2), keep_rate=0.25)
    with torch.no_grad():
        assert tm.token_counts(model, images) == [2 + 16, 2 + 16, 2 + 4, 2 + 4]


def test_default_layers_are_the_papers() -> None:
    model = timm.create_model("vit_tiny_patch16_224", img_size=64, num_classes=3)
    tm.patch(model)
    assert tm.patch_config(model).layers == (3, 6, 9)
    assert tm.patch_config(model).keep_rates == (0.7, 0.7, 0.7)
    assert tm.default_layers(6) == (1, 3, 4)


def test_unpatch_is_bit_exact_and_leaves_nothing_behind(flavour: str, images: torch.Tensor) -> None:
    model = make_model(flavour)
    dict_before = {name: set(module.__dict__) for name, module in model.named_modules()}
    hooks_before = {name: len(module._forward_pre_hooks) for name, module in model.named_modules()}
    with torch.no_grad():
        expected = model(images)
        tm.patch(model, layers=(1, 2), keep_rate=0.5)
        assert tm.is_patched(model)
        model(images)
        tm.unpatch(model)
        after = model(images)
    assert torch.equal(after, expected)
    assert not tm.is_patched(model)
    assert {name: set(module.__dict__) for name, module in model.named_modules()} == dict_before
    assert {name: len(module._forward_pre_hooks) for name, module in model.named_modules()} == hooks_before


def test_unpatch_restores_a_users_own_instance_attribute(images: torch.Tensor) -> None:
    model = make_model("avg_pool")

    def users_pool(x, pool_type=None):
        return x[:, 1:].amax(dim=1)

    model.pool = users_pool
    tm.patch(model, keep_rate=0.5)
    tm.unpatch(model)
    assert model.pool is users_pool


def test_patching_twice_reconfigures(images: torch.Tensor) -> None:
    model = make_model("vit")
    tm.patch(model, layers=(0, 1), keep_rate=0.5)
    tm.patch(model, layers=(2,), keep_rate=0.25, method="drop")
    assert tm.patch_config(model).layers == (2,)
    assert model.blocks[0].__dict__.get("forward") is None
    with torch.no_grad():
        assert tm.token_counts(model, images) == [65, 65, 17, 17]
    tm.unpatch(model)
    assert all("forward" not in block.__dict__ for block in model.blocks)


def test_state_dict_unchanged() -> None:
    model = make_model("registers_dinov2")
    before = {key: value.clone() for key, value in model.state_dict().items()}
    tm.patch(model, keep_rate=0.5)
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[key], before[key]) for key in before)


def test_in_place_identity_and_hooks(images: torch.Tensor) -> None:
    model = make_model("qk_norm")
    blocks = list(model.blocks)
    submodules = {name: module for name, module in model.named_modules()}
    seen = []
    model.blocks[1].register_forward_hook(lambda _m, _i, out: seen.append(out.shape[1]))
    assert tm.patch(model, layers=(1,), keep_rate=0.5) is model
    assert list(model.blocks) == blocks
    assert {name: module for name, module in model.named_modules()} == submodules
    assert type(model.blocks[1]) is type(blocks[0])
    with torch.no_grad():
        model(images)
        assert seen == [1 + 32]
        # a block that is not chosen is untouched and still works on its own
        tokens = torch.randn(2, 65, 32)
        assert "forward" not in model.blocks[0].__dict__
        assert model.blocks[0](tokens).shape == tokens.shape


def test_sdpa_scores_equal_eager_scores() -> None:
    model = make_model("qk_norm")
    block = model.blocks[1]
    assert block.attn.fused_attn, "timm should use fused attention here"
    x = torch.randn(2, 65, 32)
    with torch.no_grad(), CaptureOutputs(block.attn.q_norm, block.attn.k_norm) as captured:
        block.attn(block.norm1(x))
        q, k = captured.require("q/k")
        fast = class_attention(q, k, block.attn.scale)
        eager = torch.stack([eager_attention(block.attn, block.norm1(img))[1][:, 0].mean(0) for img in x])
    torch.testing.assert_close(fast, eager, atol=1e-6, rtol=1e-5)


def test_fused_attention_stays_on() -> None:
    model = make_model("vit")
    tm.patch(model, keep_rate=0.5)
    assert all(block.attn.fused_attn for block in model.blocks)
    calls = []
    original = torch.nn.functional.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(args[0].shape[2])
        return original(*args, **kwargs)

    torch.nn.functional.scaled_dot_product_attention = counting
    try:
        with torch.no_grad():
            model(torch.randn(1, 3, 32, 32))
    finally:
        torch.nn.functional.scaled_dot_product_attention = original
    # default layers (1, 2, 3) at 0.5: each reducing block attends over the tokens it receives
    assert calls == [65, 65, 33, 17]


def test_deepcopy_and_pickle(images: torch.Tensor) -> None:
    model = make_model("head_dim" if "head_dim" in FLAVOURS else "qk_norm")
    tm.patch(model, layers=(1, 2), keep_rate=0.5, trace_source=True)
    with torch.no_grad():
        expected = model(images)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert tm.is_patched(clone)
        assert clone.blocks[1].forward.block is clone.blocks[1]
        with torch.no_grad():
            assert torch.equal(clone(images), expected)
            tm.unpatch(clone)
            assert "forward" not in clone.blocks[1].__dict__ and "pool" not in clone.__dict__
            torch.testing.assert_close(clone(images), tm.unpatch(copy.deepcopy(model))(images))
        assert tm.is_patched(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        assert torch.equal(loaded(images), expected)


def test_backward_reaches_every_parameter(flavour: str, images: torch.Tensor) -> None:
    model = make_model(flavour).train()
    tm.patch(model, layers=(1, 2), keep_rate=0.5)
    out = model(images)
    out = out[0] + out[1] if isinstance(out, tuple) else out  # distilled models in training mode
    out.square().sum().backward()
    missing = [name for name, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert missing == []


def test_gradient_checkpointing_recomputes_the_same_reduction(images: torch.Tensor) -> None:
    torch.manual_seed(0)
    plain, checkpointed = make_model("avg_pool").train(), make_model("avg_pool").train()
    checkpointed.set_grad_checkpointing(True)
    grads = []
    for model in (plain, checkpointed):
        tm.patch(model, layers=(1, 2), keep_rate=0.5)
        model(images).square().sum().backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


def test_bfloat16_and_batch_size_one() -> None:
    model = make_model("layerscale_deit3")
    image = torch.randn(1, 3, 32, 32)
    tm.patch(model, layers=(1, 2), keep_rate=0.5)
    with torch.no_grad():
        full = model(image)
        low = model.to(torch.bfloat16)(image.bfloat16())
    assert low.dtype == torch.bfloat16 and low.shape == (1, 5)
    assert (low.float() - full).abs().max() < 0.1 * full.abs().max()


def test_avg_pool_is_size_weighted(images: torch.Tensor) -> None:
    model = make_model("avg_pool")
    tm.patch(model, layers=(3,), keep_rate=0.5)
    with torch.no_grad():
        features = model.forward_features(images)
        sizes = tm.reduction_trace(model)[3].sizes
        weighted = (features[:, 1:] * sizes[:, 1:, None]).sum(1) / sizes[:, 1:].sum(1, keepdim=True)
        assert not torch.allclose(weighted, features[:, 1:].mean(1))
        torch.testing.assert_close(model.forward_head(features, pre_logits=True), model.fc_norm(weighted))


def test_each_forward_replaces_the_bookkeeping(images: torch.Tensor) -> None:
    model = make_model("vit").train()
    tm.patch(model, layers=(1, 2), keep_rate=0.5, trace_source=True)
    model(images).sum().backward()
    first = tm.reduction_trace(model)
    assert first[2].source.shape == (3, 64) and first[2].sizes.shape == (3, 17)
    assert all(r.sizes.grad_fn is None and not r.sizes.requires_grad for r in first.values())  # no graph kept
    with torch.no_grad():
        model(images[:1])
    second = tm.reduction_trace(model)
    assert [r.sizes.shape for r in second.values()] == [(1, 33), (1, 17)]
    assert pickle.loads(pickle.dumps(model))._tokenmerge.records == {}


# -- bad input: a clear error, and the model exactly as it was ------------------------------------

BAD_INPUTS = [
    (dict(keep_rate=0.0), ValueError, r"keep_rate must be in \(0, 1\]"),
    (dict(keep_rate=1.5), ValueError, r"keep_rate must be in \(0, 1\]"),
    (dict(keep_rate=float("nan")), ValueError, r"keep_rate must be in \(0, 1\]"),
    (dict(keep_rate="0.7"), TypeError, "keep_rate must be a float"),
    (dict(keep_rate=True), TypeError, "keep_rate must be a float"),
    (dict(layers=(1, 4)), ValueError, r"block index 4 is out of range; the model has blocks 0\.\.3"),
    (dict(layers=(-1,)), ValueError, "out of range"),
    (dict(layers=(1, 1)), ValueError, r"repeated: \[1\]"),
    (dict(layers=()), ValueError, "at least one block"),
    (dict(layers=(1.0,)), TypeError, "layers must hold block indices"),
    (dict(layers="12"), TypeError, "layers must be None, an int or a sequence"),
    (dict(layers=(1, 2), keep_rate=(0.5,)), ValueError, "keep_rate has 1 rates but 2 layers"),
    (dict(method="prune"), ValueError, "method must be one of"),
    (dict(method="drop", merge_into_cls=True), ValueError, "merge_into_cls applies to method='merge'"),
    (dict(trace_source=1), TypeError, "trace_source must be a bool"),
]


@pytest.mark.parametrize(("kwargs", "error", "message"), BAD_INPUTS)
@pytest.mark.parametrize("already_patched", [False, True])
def test_bad_input_leaves_model_untouched(kwargs, error, message, already_patched, images) -> None:
    model = make_model("vit")
    if already_patched:
        tm.patch(model, layers=(2,), keep_rate=0.5)
    config = tm.patch_config(model)
    with torch.no_grad():
        expected = model(images)
    with pytest.raises(error, match=message):
        tm.patch(model, **kwargs)
    assert tm.patch_config(model) == config
    with torch.no_grad():
        assert torch.equal(model(images), expected)


def test_model_without_class_token() -> None:
    model = VisionTransformer(
        img_size=32, patch_size=4, embed_dim=32, depth=4, num_heads=2, class_token=False, global_pool="avg"
    )
    with pytest.raises(ValueError, match="no class token"):
        tm.patch(model, score="cls")  # nothing to take the class row of
    assert not tm.is_patched(model)
    assert tm.patch_config(tm.patch(model)).score == "received"  # the default without one


def test_unsupported_models_are_named() -> None:
    with pytest.raises(TypeError, match="supports timm VisionTransformer"):
        tm.patch(timm.create_model("resnet18"))
    with pytest.raises(TypeError, match=r"must be a torch\.nn\.Module"):
        tm.patch("deit_small_patch16_224")
    beit = timm.create_model("beit_base_patch16_224", img_size=32, embed_dim=32, depth=1, num_heads=2)  # not Eva
    with pytest.raises(TypeError, match="supports timm VisionTransformer"):
        tm.patch(beit)
    # windowed attention without a class token (Swin) and SAM's image encoder (no class token, a neck): refused
    swin = timm.create_model("swin_tiny_patch4_window7_224", embed_dim=24, depths=(1, 1), num_heads=(1, 2))
    sam = timm.create_model("samvit_base_patch16", img_size=64, embed_dim=32, depth=2, num_heads=2, neck_chans=16)
    for model in (swin, sam):
        assert_patch_refused(model, TypeError, "supports timm VisionTransformer")


def test_unsupported_block_or_attention_is_refused() -> None:
    from timm.models.vision_transformer import ResPostBlock

    model = VisionTransformer(img_size=32, patch_size=4, embed_dim=32, depth=4, num_heads=2, block_fn=ResPostBlock)
    with pytest.raises(TypeError, match="ResPostBlock"):
        tm.patch(model, keep_rate=0.5)
    assert not tm.is_patched(model) and "forward" not in model.blocks[1].__dict__


@needs_attn_mask
def test_masks_are_refused_clearly(images: torch.Tensor) -> None:
    model = make_model("vit")
    tm.patch(model, layers=(1,), keep_rate=0.5)
    with pytest.raises(ValueError, match="attn_mask"):
        model(images, attn_mask=torch.zeros(65, 65))


# -- what the review asked for --------------------------------------------------------------------


def test_forward_intermediates_unmerges_grids_after_reduction(images: torch.Tensor) -> None:
    model = make_model("vit")
    tm.patch(model, layers=(2,), keep_rate=0.5)
    with torch.no_grad():
        maps = model.forward_intermediates(images, indices=4, intermediates_only=True)
        assert [tuple(t.shape) for t in maps] == [(3, 32, 8, 8)] * 4  # unmerged (tests/test_dense.py checks values)
        tokens = model.forward_intermediates(images, indices=4, output_fmt="NLC", intermediates_only=True)
        assert [t.shape[1] for t in tokens] == [64, 64, 32, 32]  # patch tokens (prefix stripped) after each block
        # a hook that replaces the last block's output drops the merge record: the grid cannot be rebuilt
        model.blocks[3].register_forward_hook(lambda _m, _i, out: out * 1.0)
        with pytest.raises(ValueError, match="32 patch tokens for a grid of 64 patches and no merge record"):
            model.forward_intermediates(images, indices=4)


def test_float16_model_matches_float32(images: torch.Tensor) -> None:
    model = make_model("vit")
    tm.patch(model, layers=(1, 2), keep_rate=0.5)
    with torch.no_grad():
        full = model(images)
        half = model.half()(images.half())
    assert half.dtype == torch.float16 and not half.isnan().any()
    assert (half.float() - full).abs().max() < 0.03 * full.abs().max()  # fp16 rounding, same tokens kept


def test_fp16_merge_has_no_nan_when_scores_underflow() -> None:
    from tokenmerge_patch.reduce import reduce_tokens

    n = 17
    x = torch.randn(1, n, 8)
    q, k = torch.zeros(1, 1, n, 1), torch.zeros(1, 1, n, 1)
    q[0, 0, 0] = 1.0
    k[0, 0, 1:4] = 25.0  # three patches take all the attention; the others' scores flush to zero in fp16
    for keep_norm in (False, True):
        half = reduce_tokens(x.half(), q.half(), k.half(), 1.0, num_prefix=1, keep_rate=0.5, keep_norm=keep_norm)
        full = reduce_tokens(x, q, k, 1.0, num_prefix=1, keep_rate=0.5, keep_norm=keep_norm)
        assert not half.x.isnan().any()
        torch.testing.assert_close(half.x.float(), full.x, atol=2e-2, rtol=2e-2)


def test_keep_norm_of_a_cancelling_group_stays_finite_in_fp16() -> None:
    from tokenmerge_patch.reduce import group_weighted_mean

    # two opposite tokens of equal weight: their mean is zero, and no scale may turn it into inf or NaN
    tokens = torch.tensor([[[1.0, 2.0], [-1.0, -2.0], [0.5, 0.5]]])
    group, weights = torch.tensor([[0, 0, 1]]), torch.ones(1, 3)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        out = group_weighted_mean(tokens.to(dtype), weights, group, 2, keep_norm=True)
        assert out.dtype == dtype and out.isfinite().all()
        torch.testing.assert_close(out[0, 1].float(), tokens[0, 2])


def test_bfloat16_selects_what_float32_selects() -> None:
    from tokenmerge_patch.reduce import reduce_tokens

    generator = torch.Generator().manual_seed(0)
    x, q = torch.randn(2, 1 + 40, 16, generator=generator), torch.randn(2, 4, 41, 8, generator=generator)
    k = torch.randn(2, 4, 41, 8, generator=generator) * 2
    full = reduce_tokens(x, q, k, 0.35, num_prefix=1, keep_rate=0.5, trace_source=True)
    low = reduce_tokens(x.bfloat16(), q.bfloat16(), k.bfloat16(), 0.35, num_prefix=1, keep_rate=0.5, trace_source=True)
    assert low.x.dtype == torch.bfloat16
    assert torch.equal(low.keep_index, full.keep_index)
    assert (low.source == full.source).float().mean() > 0.9  # near-ties in cosine may flip in bf16
    torch.testing.assert_close(low.x.float(), full.x, atol=0.1, rtol=0.05)


def test_a_users_instance_forward_is_not_bypassed(images: torch.Tensor) -> None:
    model = make_model("vit")
    calls = []
    block = model.blocks[2]

    def wrapper(x, **kwargs):
        calls.append(1)
        return type(block).forward(block, x, **kwargs)

    block.forward = wrapper
    with pytest.raises(TypeError, match="block 2 already has an instance-level forward"):
        tm.patch(model, layers=(1, 2), keep_rate=0.5)
    assert not tm.is_patched(model) and block.forward is wrapper and "forward" not in model.blocks[1].__dict__
    model.blocks[1].attn.k_norm.forward = lambda t: t
    with pytest.raises(TypeError, match=r"block 1's attn\.k_norm already has an instance-level forward"):
        tm.patch(model, layers=(1,), keep_rate=0.5)


def test_data_parallel_replicas_are_refused_clearly() -> None:
    model = make_model("vit")
    tm.patch(model, layers=(1,), keep_rate=0.5)
    # a replica on another device would call the original block's patched forward with its own tokens
    with pytest.raises(RuntimeError, match=r"nn\.DataParallel is not supported"):
        model.blocks[1](torch.empty(2, 65, 32, device="meta"))


@needs_attn_mask
def test_torch_compile_sees_one_graph(images: torch.Tensor) -> None:
    model = make_model("registers_dinov2")
    tm.patch(model, layers=(1, 2), keep_rate=0.5, prop_attn=True)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(images)
    assert explained.graph_break_count == 0, [r.reason for r in explained.break_reasons]
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(images), model(images))


def test_set_keep_rate_changes_rates_without_reinstalling(images: torch.Tensor) -> None:
    model = make_model("vit")
    tm.patch(model, layers=(1, 2), keep_rate=0.5)
    forward = model.blocks[1].forward
    tm.set_keep_rate(model, (0.25, 1.0))
    assert model.blocks[1].forward is forward and tm.patch_config(model).keep_rates == (0.25, 1.0)
    with torch.no_grad():
        assert tm.token_counts(model, images) == [65, 17, 17, 17]
    with pytest.raises(ValueError, match="keep_rate has 3 rates but 2 layers"):
        tm.set_keep_rate(model, (0.5, 0.5, 0.5))
    assert tm.patch_config(model).keep_rates == (0.25, 1.0)
    with pytest.raises(ValueError, match="not patched"):
        tm.set_keep_rate(make_model("vit"), 0.5)


def test_checkpointing_recomputes_reducing_blocks(images: torch.Tensor) -> None:
    model = make_model("vit").train()
    model.set_grad_checkpointing(True)
    tm.patch(model, layers=(1, 2), keep_rate=0.5)
    state, reduce = model._tokenmerge, model._tokenmerge.reduce
    reduced = []

    def counting_reduce(layer, *args, **kwargs):
        reduced.append((layer, torch.is_grad_enabled()))
        return reduce(layer, *args, **kwargs)

    state.reduce = counting_reduce
    out = model(images)
    assert [layer for layer, _ in reduced] == [1, 2]
    out.sum().backward()
    # each reduction ran again while backward recomputed its checkpointed block
    assert sorted(layer for layer, _ in reduced) == [1, 1, 2, 2]


def test_eval_mode_helpers_keep_a_users_frozen_block(images: torch.Tensor) -> None:
    from tokenmerge_patch.vis import merge_sources

    model = make_model("vit").train()
    model.blocks[0].eval()
    tm.patch(model, layers=(1,), keep_rate=0.5)
    tm.count_flops(model, (3, 32, 32))
    merge_sources(model, images[0])
    assert model.training and model.blocks[1].training and not model.blocks[0].training
