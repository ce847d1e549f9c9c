"""Dense outputs after a reduction: ``unmerge``, timm ``forward_intermediates(output_fmt="NCHW")`` and
``features_only`` models, Hugging Face ``Dinov2Backbone``; against independent computations.

The independent reference (:func:`reference_maps`) runs tests/reference.py's hand-written reduction on an
unpatched model and follows which original patches each token holds by giving every token, for the reduction only,
extra channels holding a tiny indicator of its patches: the reduction averages (merge, bipartite), sums (fuse) or
keeps (drop) rows, so after it a token's extra channels are non-zero exactly at the patches it holds. At 1e-20 the
indicator cannot move a similarity, distance or score in float32.
"""

from __future__ import annotations

import pytest
import timm
import torch
from reference import MARK, Options, eager_attention, reference_reduce
from tiny_models import TINY, make_model, model_snapshot
from torch import Tensor

import tokenmerge_patch as tm
from tokenmerge_patch.records import record_of

METHODS = ["merge", "drop", "fuse", "bipartite"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models


@torch.no_grad()
def reference_maps(model, images: Tensor, plan: dict[int, float], **options: object) -> list[Tensor]:
    """Per block, the ``[B, C, H, W]`` map an unpatched ``model`` reduced by ``plan`` should give: each patch the
    features of the token holding it (zeros if dropped). Python loops over images, blocks and patches."""
    opt = Options(**options)
    tokens = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
    prefix = model.num_prefix_tokens
    height, width = model.patch_embed.dynamic_feat_size(tuple(images.shape[-2:]))
    per_image = []
    for x in tokens:
        channels, patches = x.shape[1], x.shape[0] - prefix
        holds = torch.zeros(x.shape[0], patches)  # holds[t, p] != 0: token t holds original patch p
        holds[prefix:] = torch.eye(patches)
        sizes, maps = [1.0] * x.shape[0], []
        for index, block in enumerate(model.blocks):
            bias = torch.tensor(sizes).log() if opt.prop_attn and any(s != 1 for s in sizes) else None
            y, probs, keys = eager_attention(block.attn, block.norm1(x), bias)
            x = x + block.ls1(y)
            if index in plan:
                marked = torch.cat([x, MARK * holds], dim=1)
                marked, sizes = reference_reduce(marked, sizes, probs, keys, prefix, plan[index], opt)
                x, holds = marked[:, :channels], marked[:, channels:]
            x = x + block.ls2(block.mlp(block.norm2(x)))
            grid = torch.zeros(channels, height, width)
            for p in range(patches):
                holders = holds[:, p].nonzero().flatten().tolist()
                assert len(holders) <= 1, "a patch is held by one token at most"
                if holders:
                    grid[:, p // width, p % width] = x[holders[0]]
            maps.append(grid)
        per_image.append(maps)
    return [torch.stack([maps[i] for maps in per_image]) for i in range(len(model.blocks))]


def unmerge_by_hand(tokens: Tensor, source: Tensor, num_prefix: int, dropped: float = 0.0) -> Tensor:
    out = torch.full((tokens.shape[0], num_prefix + source.shape[1], tokens.shape[2]), dropped)
    for b in range(tokens.shape[0]):
        out[b, :num_prefix] = tokens[b, :num_prefix]
        for p in range(source.shape[1]):
            if source[b, p] >= 0:
                out[b, num_prefix + p] = tokens[b, source[b, p]]
    return out


# -- keep_rate = 1 is the unpatched model ---------------------------------------------------------------------


def test_keep_rate_one_equals_unpatched(flavour: str, images: Tensor) -> None:
    model = make_model(flavour)
    calls = [
        dict(),
        dict(norm=True, return_prefix_tokens=True),
        dict(indices=[1, 3], intermediates_only=True),
        dict(indices=2, stop_early=True, output_dict=True, return_prefix_tokens=True),
    ]
    with torch.no_grad():
        expected = [model.forward_intermediates(images, **kwargs) for kwargs in calls]
        tm.patch(model, layers=(0, 1, 2, 3), keep_rate=1.0)
        patched = [model.forward_intermediates(images, **kwargs) for kwargs in calls]
    for want, got in zip(expected, patched, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


# -- the maps after a reduction, against the independent reference -------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_maps_match_the_independent_reference(method: str, images: Tensor) -> None:
    model = make_model("vit")
    plan = {1: 0.5, 2: 0.6}
    expected = reference_maps(model, images, plan, method=method)
    tm.patch(model, layers=tuple(plan), keep_rate=tuple(plan.values()), method=method)
    with torch.no_grad():
        final, maps = model.forward_intermediates(images)
        unpatched_shapes = [m.shape for m in tm.unpatch(model).forward_intermediates(images)[1]]
    assert [m.shape for m in maps] == unpatched_shapes == [(3, 32, 8, 8)] * 4
    for got, want in zip(maps, expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert final.shape[1] < 65  # the final tokens stay reduced
    # every image has its own merge groups
    sources = [(maps[3][b] != maps[3][0]).any() for b in range(1, 3)]
    assert all(sources)


def test_merge_into_cls_and_registers_match_the_reference(images: Tensor) -> None:
    for flavour, options in (("vit", dict(merge_into_cls=True)), ("registers_dinov2", {}), ("distilled", {})):
        model = make_model(flavour)
        expected = reference_maps(model, images, {1: 0.4}, **options)
        tm.patch(model, layers=1, keep_rate=0.4, **options)
        with torch.no_grad():
            maps = model.forward_intermediates(images, intermediates_only=True)
        for got, want in zip(maps, expected, strict=True):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_non_square_dynamic_image_size() -> None:
    model = make_model("dynamic")
    images = torch.randn(2, 3, 40, 24)
    expected = reference_maps(model, images, {1: 0.6})
    tm.patch(model, layers=1, keep_rate=0.6)
    with torch.no_grad():
        maps = model.forward_intermediates(images, intermediates_only=True)
    assert maps[-1].shape == (2, 32, 10, 6)
    for got, want in zip(maps, expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_norm_prefix_tokens_and_dict_output(images: Tensor) -> None:
    model = make_model("registers_dinov2")
    tm.patch(model, layers=(1, 2), keep_rate=0.5)
    with torch.no_grad():
        plain = model.forward_intermediates(images, intermediates_only=True)
        normed = model.forward_intermediates(images, intermediates_only=True, norm=True)
        pairs = model.forward_intermediates(images, intermediates_only=True, return_prefix_tokens=True)
        as_dict = model.forward_intermediates(images, output_dict=True, return_prefix_tokens=True)
        tokens = model.forward_intermediates(images, output_fmt="NLC", intermediates_only=True)
        final = model.forward_features(images)
    for map_, normed_map in zip(plain, normed, strict=True):  # a norm is per token: it commutes with unmerging
        torch.testing.assert_close(normed_map, model.norm(map_.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))
    assert all(torch.equal(m, p[0]) and p[1].shape == (3, 5, 32) for m, p in zip(plain, pairs, strict=True))
    assert all(torch.equal(m, d) for m, d in zip(plain, as_dict["image_intermediates"], strict=True))
    torch.testing.assert_close(as_dict["image_features"], final)
    assert [p.shape[0] for p in as_dict["image_intermediates_prefix"]] == [3] * 4
    assert [t.shape[1] for t in tokens] == [64, 32, 16, 16]  # NLC: the reduced patch tokens, as documented


def test_get_intermediate_layers_reshape(images: Tensor) -> None:
    model = make_model("vit")
    tm.patch(model, layers=(1,), keep_rate=0.5)
    with torch.no_grad():
        layers = model.get_intermediate_layers(images, n=2, reshape=True)
        maps = model.forward_intermediates(images, indices=2, intermediates_only=True)
    assert all(torch.equal(a, b) for a, b in zip(layers, maps, strict=True))


# -- features_only models --------------------------------------------------------------------------------------


def test_features_only_model(images: Tensor) -> None:
    torch.manual_seed(0)
    kwargs = {k: v for k, v in TINY.items() if k != "num_classes"}
    net = timm.create_model("vit_tiny_patch16_224", features_only=True, out_indices=(1, 2, 3), **kwargs).eval()
    with torch.no_grad():
        for param in net.parameters():
            param.add_(torch.randn_like(param) * 0.2)
        unpatched = net(images)
        tm.patch(net, layers=(0, 1, 2, 3), keep_rate=1.0)
        torch.testing.assert_close(net(images), unpatched, atol=1e-5, rtol=0)
        expected = reference_maps(net.model, images, {1: 0.5, 2: 0.5})
        tm.patch(net, layers=(1, 2), keep_rate=0.5)
        maps = net(images)
    assert tm.is_patched(net) and [m.shape for m in maps] == [m.shape for m in unpatched]
    for got, want in zip(maps, expected[1:], strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    report = tm.count_flops(net, input_size=(3, 32, 32))
    assert [b.tokens_out for b in report.blocks] == [65, 33, 17, 17]
    # the wrapper counts what its VisionTransformer (pruned: no norm, no head) counts; unmerging is gathers only
    assert report.total == tm.count_flops(net.model, input_size=(3, 32, 32)).total
    before = model_snapshot(tm.unpatch(net))
    overrides = ("forward", "pool", "forward_intermediates", "__prepare_scriptable__", "_tokenmerge")
    assert not any(name in m.__dict__ for m in net.modules() for name in overrides)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(net(images), unpatched, strict=True))
    assert model_snapshot(net)[1] == before[1]


def test_features_only_model_is_refused_by_calibrate_and_left_as_it_was(images: Tensor) -> None:
    """calibrate compares a head's outputs; feature maps are not one: a clear TypeError, the patch unchanged."""
    kwargs = {k: v for k, v in TINY.items() if k != "num_classes"}
    net = timm.create_model("vit_tiny_patch16_224", features_only=True, out_indices=(1, 2, 3), **kwargs).eval()
    tm.patch(net, layers=(1, 2), keep_rate=0.5)
    before = tm.patch_config(net)
    with pytest.raises(TypeError, match="feature maps of a dense backbone"):
        tm.calibrate(net, images, flops=0.6, progress=False)
    assert tm.patch_config(net) == before


def test_a_dense_call_keeps_the_tensors_it_filed_alive() -> None:
    """Records are found by storage: a tensor filed during a dense call stays alive until the call ends, so no later
    tensor of the call can be allocated in its storage and be taken for it (records of None are filed too)."""
    import gc
    import weakref

    model = tm.patch(make_model("vit"), layers=(1,), keep_rate=0.5)
    state = model._tokenmerge
    with state.collecting() as filed:
        x = torch.randn(2, 5, 8)
        alive = weakref.ref(x)
        pointer = x.untyped_storage().data_ptr()
        state.collect(x, None)
        del x
        gc.collect()
        assert alive() is not None and pointer in filed and filed[pointer] is None
    del filed  # the call is over: nothing of the model holds the tensor any more
    gc.collect()
    assert alive() is None and state.collectors == []


# -- unmerge, the pure function ---------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_unmerge_equals_a_loop_over_patches(method: str, images: Tensor) -> None:
    model = make_model("distilled")
    tm.patch(model, layers=(1, 2), keep_rate=0.4, method=method)
    with torch.no_grad():
        tokens = model.forward_features(images)
    source = tm.reduction_trace(model)[2].source
    assert all((source[b] != source[0]).any() for b in (1, 2))  # different merges per image
    expected = unmerge_by_hand(tokens, source, 2)
    torch.testing.assert_close(tm.unmerge(tokens), expected, atol=0, rtol=0)
    torch.testing.assert_close(tm.unmerge(tokens, record_of(tokens)), expected, atol=0, rtol=0)
    torch.testing.assert_close(tm.unmerge(tokens, tm.reduction_trace(model)[2], num_prefix=2), expected)
    torch.testing.assert_close(
        tm.unmerge(tokens, source, num_prefix=2, dropped=-7.0), unmerge_by_hand(tokens, source, 2, -7.0)
    )
    assert ((source < 0).any()) == (method == "drop")
    # the source map agrees with the size bookkeeping: a token holds as many patches as its size
    sizes = record_of(tokens)[0]
    held = torch.stack([torch.bincount(s[s >= 0], minlength=tokens.shape[1]) for s in source]).float()
    if method != "drop":
        torch.testing.assert_close(held[:, 2:], sizes[:, 2:])


def test_unmerge_errors(images: Tensor) -> None:
    model = make_model("vit")
    tm.patch(model, layers=(1,), keep_rate=0.5)
    with torch.no_grad():
        tokens = model.forward_features(images)
    source = tm.reduction_trace(model)[1].source
    with pytest.raises(ValueError, match="carry no merge record"):
        tm.unmerge(tokens.clone())
    with pytest.raises(ValueError, match="give num_prefix="):
        tm.unmerge(tokens, source)
    with pytest.raises(ValueError, match="for 2 images but tokens has 3"):
        tm.unmerge(tokens, source[:2], num_prefix=1)
    with pytest.raises(ValueError, match="points at token"):
        tm.unmerge(tokens[:, :10], source, num_prefix=1)
    with pytest.raises(ValueError, match=r"\[B, N, C\]"):
        tm.unmerge(tokens[0])


def test_gradients_flow_through_the_maps(images: Tensor) -> None:
    model = make_model("vit")
    tm.patch(model, layers=(1, 2), keep_rate=0.5)
    maps = model.forward_intermediates(images, indices=[3], intermediates_only=True)
    maps[0].square().sum().backward()
    for name in ("patch_embed.proj.weight", "blocks.1.attn.qkv.weight", "blocks.3.mlp.fc2.weight"):
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0 and grad.isfinite().all(), name
    # d(sum of the unmerged tokens)/d(token) is the number of patches the token holds
    tokens = model.forward_features(images).detach().requires_grad_()
    record = record_of(model.forward_features(images))
    tm.unmerge(tokens, record).sum().backward()
    torch.testing.assert_close(tokens.grad, record[0].unsqueeze(-1).expand_as(tokens))


def test_forward_head_after_forward_intermediates(images: Tensor) -> None:
    for flavour in ("vit", "avg_pool"):
        model = make_model(flavour)
        tm.patch(model, layers=(1, 2), keep_rate=0.5)
        with torch.no_grad():
            final, _ = model.forward_intermediates(images)
            torch.testing.assert_close(model.forward_head(final), model(images), atol=1e-6, rtol=0)


def test_unpatch_round_trip(images: Tensor) -> None:
    model = make_model("registers_dinov2")
    before = model_snapshot(model)
    with torch.no_grad():
        expected = model.forward_intermediates(images, return_prefix_tokens=True)
        tm.patch(model, layers=(1, 2), keep_rate=0.5)
        model.forward_intermediates(images)
        tm.unpatch(model)
        got = model.forward_intermediates(images, return_prefix_tokens=True)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    after = model_snapshot(model)
    assert after[1] == before[1] and after[2] is None


# -- Hugging Face Dinov2Backbone ---------------------------------------------------------------------------------

transformers = pytest.importorskip("transformers")


def make_backbone(seed: int = 0, stages: tuple[int, ...] = (1, 2, 3, 4), **config: object):
    from transformers import Dinov2Backbone, Dinov2Config

    torch.manual_seed(seed)
    cfg = Dinov2Config(
        image_size=32, patch_size=4, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
        layerscale_value=0.5, out_features=[f"stage{i}" for i in stages], **config,
    )  # fmt: skip
    model = Dinov2Backbone(cfg).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.2)
    return model


def test_dinov2_backbone_keep_rate_one_equals_unpatched(images: Tensor) -> None:
    model = make_backbone()
    with torch.no_grad():
        expected = model(images).feature_maps
        tm.patch(model, layers=(0, 1, 2, 3), keep_rate=1.0)
        got = model(images).feature_maps
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("apply_layernorm", [True, False])
@pytest.mark.parametrize("method", ["merge", "drop"])
def test_dinov2_backbone_maps_unmerge_the_layer_outputs(method: str, apply_layernorm: bool, images: Tensor) -> None:
    model = make_backbone(apply_layernorm=apply_layernorm)
    with torch.no_grad():
        unpatched = model(images, output_hidden_states=True)
        tm.patch(model, layers=(1, 2), keep_rate=0.5, method=method)
        layer_outputs = []  # what each layer passed on (hooks see the reduced tokens), as copies
        handles = [
            layer.register_forward_hook(lambda _m, _i, out: layer_outputs.append(out.clone()))
            for layer in model.encoder.layer
        ]
        out = model(images, output_hidden_states=True)
        for handle in handles:
            handle.remove()
    trace = tm.reduction_trace(model)
    assert [h.shape[1] for h in layer_outputs] == [65, 33, 17, 17]
    assert [m.shape for m in out.feature_maps] == [m.shape for m in unpatched.feature_maps]
    assert [h.shape for h in out.hidden_states] == [h.shape for h in unpatched.hidden_states]  # unmerged too
    for layer, (hidden, got) in enumerate(zip(out.hidden_states[1:], out.feature_maps, strict=True)):
        reducing = [r for r in trace if r <= layer]
        want = layer_outputs[layer]
        if reducing:
            want = unmerge_by_hand(want, trace[reducing[-1]].source, 1)
        torch.testing.assert_close(hidden, want, atol=0, rtol=0)
        if apply_layernorm:
            want = torch.nn.functional.layer_norm(want, (32,), model.layernorm.weight, model.layernorm.bias, 1e-6)
        torch.testing.assert_close(got, want[:, 1:].reshape(3, 8, 8, 32).permute(0, 3, 1, 2), atol=1e-5, rtol=1e-5)


def test_dinov2_backbone_sequences_dpt_and_gradients(images: Tensor) -> None:
    from transformers import DPTConfig, DPTForDepthEstimation

    model = make_backbone(reshape_hidden_states=False, apply_layernorm=False)  # as the DPT-DINOv2 checkpoints
    tm.patch(model, layers=(1,), keep_rate=0.5)
    assert [m.shape for m in model(images).feature_maps] == [(3, 65, 32)] * 4  # the full sequence, for DPT's readout
    config = DPTConfig(
        backbone_config=model.config, hidden_size=32, neck_hidden_sizes=[16, 16, 32, 32],
        reassemble_factors=[4, 2, 1, 0.5], fusion_hidden_size=16, is_hybrid=False, image_size=32, patch_size=4,
    )  # fmt: skip
    dpt = DPTForDepthEstimation(config).eval()
    with torch.no_grad():
        expected = dpt(images).predicted_depth
        tm.patch(dpt.backbone, layers=(0, 1, 2, 3), keep_rate=1.0)
        torch.testing.assert_close(dpt(images).predicted_depth, expected, atol=1e-5, rtol=1e-5)
    tm.patch(dpt.backbone, layers=(1, 2), keep_rate=0.5)
    depth = dpt(images).predicted_depth
    assert depth.shape == expected.shape
    depth.sum().backward()
    grad = dpt.backbone.embeddings.patch_embeddings.projection.weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_dinov2_backbone_flops_per_layer_equal_dinov2_models() -> None:
    from transformers import Dinov2Model

    backbone = make_backbone()
    twin = Dinov2Model(backbone.config).eval()
    for model in (backbone, twin):
        tm.patch(model, layers=(1, 2), keep_rate=0.5)
    report, twin_report = (tm.count_flops(m, input_size=(3, 32, 32)) for m in (backbone, twin))
    assert [b.tokens_out for b in report.blocks] == [65, 33, 17, 17]
    assert [(b.tokens_in, b.tokens_out, b.flops) for b in report.blocks] == [
        (b.tokens_in, b.tokens_out, b.flops) for b in twin_report.blocks
    ]


def test_dinov2_backbone_round_trip(images: Tensor) -> None:
    model = make_backbone()
    before = model_snapshot(model)
    with torch.no_grad():
        expected = model(images).feature_maps
        tm.patch(model, layers=(1,), keep_rate=0.5)
        model(images)
        tm.unpatch(model)
        got = model(images).feature_maps
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    assert model_snapshot(model)[1] == before[1]


def test_inference_mode_and_re_entrant_calls(images: Tensor) -> None:
    model = make_model("vit")
    tm.patch(model, layers=(1, 2), keep_rate=0.5)
    with torch.no_grad():
        expected = model.forward_intermediates(images, intermediates_only=True)
    with torch.inference_mode():  # views there have no ._base: records are found by storage
        got = model.forward_intermediates(images, intermediates_only=True)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    inner = []

    def hook(_module, _args, _out) -> None:  # another image's dense call and forward, from inside the outer call
        if not inner:
            inner.append(None)
            inner[0] = model.forward_intermediates(images[:1].flip(-1), intermediates_only=True)
            model(images.flip(-2))

    handle = model.blocks[2].register_forward_hook(hook)
    with torch.no_grad():
        got = model.forward_intermediates(images, intermediates_only=True)
        handle.remove()
        alone = model.forward_intermediates(images[:1].flip(-1), intermediates_only=True)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(inner[0], alone, strict=True))
    assert model._tokenmerge.collectors == []


def test_unmerge_a_hugging_face_last_hidden_state(images: Tensor) -> None:
    from transformers import Dinov2Model

    model = Dinov2Model(make_backbone().config).eval()
    tm.patch(model, layers=(1, 2), keep_rate=0.5)
    with torch.no_grad():
        hidden = model(images).last_hidden_state
    assert hidden.shape == (3, 17, 32)
    expected = unmerge_by_hand(hidden, tm.reduction_trace(model)[2].source, 1)
    torch.testing.assert_close(tm.unmerge(hidden), expected, atol=0, rtol=0)
