"""patch()/unpatch() on open_clip image towers (tiny, random weights, built from config dicts: no hub access), against
unpatched runs, an independent hand-written forward of the tower (tests/reference.py's reductions), a timm twin with the
same weights, and fvcore counts of unpatched towers cut to the same token counts."""

from __future__ import annotations

import copy
import pickle
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from reference import REFERENCE_METHODS, Options, reference_dense_tokens, reference_tokens
from test_export import HAS_ONNX, NO_ONNX, onnx_outputs, standard_export
from timm.models.vision_transformer import VisionTransformer
from tiny_models import perturb
from torch import Tensor, nn

import tokenmerge_patch as tm

open_clip = pytest.importorskip(
    "open_clip", reason="open_clip is not installed: pip install 'tokenmerge_patch[openclip]'"
)
from open_clip.model import CLIP  # noqa: E402

TEXT = dict(context_length=8, vocab_size=50, width=32, heads=2, layers=2)
VISION = dict(image_size=32, patch_size=4, width=32, layers=4, head_width=16, mlp_ratio=2.0)
FLAVOURS = {
    "default": {},  # ResidualAttentionBlock: nn.MultiheadAttention, class-token pooling
    "avg_pool": dict(pool_type="avg"),
    "layerscale": dict(ls_init_value=0.5),
    "qk_norm": dict(qk_norm=True),  # CustomResidualAttentionBlock: open_clip's own Attention
    "final_ln_after_pool": dict(final_ln_after_pool=True, pool_type="avg"),
}


def make_clip(flavour: str = "default", seed: int = 0, **vision: object) -> CLIP:
    torch.manual_seed(seed)
    return perturb(CLIP(embed_dim=8, vision_cfg={**VISION, **FLAVOURS[flavour], **vision}, text_cfg=TEXT), seed)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models


@pytest.fixture
def text() -> Tensor:
    return torch.randint(0, 50, (4, 8), generator=torch.Generator().manual_seed(2))


# -- the model people load, built offline ---------------------------------------------------------------------------


def test_vit_b_32_builds_offline_and_patches() -> None:
    model = open_clip.create_model("ViT-B-32").eval()  # no pretrained weights: nothing is downloaded
    tm.patch(model, keep_rate=0.7)
    assert tm.patch_config(model).layers == (3, 6, 9)
    assert tm.token_counts(model, torch.randn(1, 3, 224, 224)) == [50] * 3 + [36] * 3 + [26] * 3 + [19] * 3
    assert model.transformer.resblocks[0].__dict__.get("forward") is None  # the text tower is left alone
    tm.unpatch(model)


# -- keep_rate = 1 is the unpatched model -----------------------------------------------------------------------------


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_keep_rate_one_equals_unpatched(flavour: str, images: Tensor, text: Tensor) -> None:
    model = make_clip(flavour)
    with torch.no_grad():
        expected = model(images, text)
        features = model.encode_image(images)
        for kwargs in (dict(layers=(0, 1, 2, 3)), dict(layers=(1,), prop_attn=True)):
            tm.patch(model, keep_rate=1.0, **kwargs)
            patched = model(images, text)
            for got, want in zip(patched, expected, strict=True):
                assert (got - want).abs().max() <= 1e-5
            assert (model.encode_image(images) - features).abs().max() <= 1e-5
        tm.patch(model, layers=(1,), keep_rate=0.5)
        assert tm.token_counts(model, images) == [65, 33, 33, 33]
        assert (model.encode_image(images) - features).abs().max() > 1e-3
        assert torch.equal(model(images, text)[1], expected[1])  # text features: the text tower is untouched


# -- an independent reference: the tower's forward written out, reduced by tests/reference.py --------------------


def _eager_attention(block: nn.Module, x: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """One image ``x`` [N, C] through a block's attention, from its weights; returns (output, probs [H, N, N],
    keys [H, N, d])."""
    attn = block.attn
    n, width = x.shape
    heads = attn.num_heads
    q, k, v = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).reshape(n, 3, heads, -1).permute(1, 2, 0, 3)
    if isinstance(attn, open_clip.transformer.Attention):
        q, k = attn.ln_q(q), attn.ln_k(k)
    logits = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if bias is not None:
        logits = logits + bias
    probs = logits.softmax(dim=-1)
    out = (probs @ v).transpose(0, 1).reshape(n, width)
    if isinstance(attn, open_clip.transformer.Attention):
        out = attn.out_proj(attn.ln_inner(out))
        return block.ln_attn(out), probs, k
    return attn.out_proj(out), probs, k


def _attention_half(block: nn.Module, x: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    y, probs, keys = _eager_attention(block, block.ln_1(x), bias)
    return block.ls_1(y), probs, keys


def _mlp_half(block: nn.Module, x: Tensor) -> Tensor:
    return block.ls_2(block.mlp(block.ln_2(x)))


@torch.no_grad()
def reference_features(model: CLIP, images: Tensor, plan: dict[int, float], **options: object) -> tuple[Tensor, list]:
    """Unnormalised image features of the patched tower, computed on the unpatched model, and the token counts."""
    opt = Options(**options)
    visual = model.visual
    outputs, counts = [], []
    for x in visual._embeds(images):  # conv, class token, positions, ln_pre: untouched by the patch
        x, sizes, count = reference_tokens(x, visual.transformer.resblocks, plan, opt, 1, _attention_half, _mlp_half)
        if visual.pool_type == "avg":
            tokens = x if visual.final_ln_after_pool else visual.ln_post(x)
            weights = torch.tensor(sizes[1:]).unsqueeze(-1)
            pooled = (tokens[1:] * weights).sum(0) / weights.sum()
            pooled = visual.ln_post(pooled) if visual.final_ln_after_pool else pooled
        else:
            pooled = visual.ln_post(x)[0]
        outputs.append(pooled @ visual.proj)
        counts.append(count)
    return torch.stack(outputs), counts


METHODS = REFERENCE_METHODS


@pytest.mark.parametrize(("method", "options"), METHODS)
@pytest.mark.parametrize("flavour", ["default", "avg_pool", "qk_norm", "layerscale"])
def test_matches_the_independent_reference(flavour: str, method: str, options: dict, images: Tensor) -> None:
    model = make_clip(flavour)
    plan = {1: 0.5, 2: 0.6}
    expected, counts = reference_features(model, images, plan, method=method, **options)
    tm.patch(model, layers=tuple(plan), keep_rate=tuple(plan.values()), method=method, **options)
    with torch.no_grad():
        got = model.encode_image(images)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(model(images)[0], F.normalize(expected, dim=-1), atol=1e-4, rtol=1e-4)
    assert tm.token_counts(model, images) == counts[0]
    assert counts[0][2] < 65


@pytest.mark.parametrize("flavour", ["default", "qk_norm", "avg_pool"])
def test_dense_matches_the_independent_reference(flavour: str, images: Tensor) -> None:
    """dense=True: the full-resolution stream through the tower (tests/reference.py's per-block loops), then its own
    pooling (an average over every patch)."""
    model = make_clip(flavour)
    visual, plan = model.visual, {1: 0.5, 2: 0.6}
    with torch.no_grad():
        runs = [
            reference_dense_tokens(x, visual.transformer.resblocks, plan, Options(), 1, _attention_half, _mlp_half)
            for x in visual._embeds(images)
        ]
        tokens = visual.ln_post(torch.stack([x for x, _ in runs]))
        expected = (tokens[:, 1:].mean(1) if visual.pool_type == "avg" else tokens[:, 0]) @ visual.proj
        tm.patch(model, layers=tuple(plan), keep_rate=tuple(plan.values()), dense=True)
        torch.testing.assert_close(model.encode_image(images), expected, atol=1e-4, rtol=1e-4)
    assert tm.token_counts(model, images) == runs[0][1]


def test_avg_pool_is_size_weighted(images: Tensor) -> None:
    """The mean of the patch tokens counts each merged token as the patches it holds (not as one)."""
    model = make_clip("avg_pool")
    tm.patch(model, layers=(1, 2), keep_rate=0.5)
    visual = model.visual
    with torch.no_grad():
        tokens = visual.transformer(visual._embeds(images))
        sizes = tm.reduction_trace(model)[2].sizes[:, 1:]
        normed = visual.ln_post(tokens)[:, 1:]
        weighted = (normed * sizes[..., None]).sum(1) / sizes.sum(1, keepdim=True)
        torch.testing.assert_close(model.encode_image(images), weighted @ visual.proj)
        assert (model.encode_image(images) - normed.mean(1) @ visual.proj).abs().max() > 1e-3
    assert sizes.sum(1).eq(64).all() and not sizes.eq(1).all()


# -- a timm twin with the same weights: same patched output, same flop count --------------------------------------


def timm_twin(model: CLIP) -> VisionTransformer:
    visual = model.visual
    twin = VisionTransformer(
        img_size=32,
        patch_size=4,
        embed_dim=32,
        depth=4,
        num_heads=2,
        mlp_ratio=2.0,
        num_classes=8,
        pre_norm=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-5),
    )
    state = {
        "cls_token": visual.class_embedding.reshape(1, 1, -1),
        "pos_embed": visual.positional_embedding[None],
        "patch_embed.proj.weight": visual.conv1.weight,
        "head.weight": visual.proj.T,
        "head.bias": torch.zeros(8),
    }
    renames = {"ln_pre": "norm_pre", "ln_post": "norm"}
    blocks = {"ln_1": "norm1", "ln_2": "norm2", "attn.out_proj": "attn.proj", "mlp.c_fc": "mlp.fc1"}
    blocks |= {"mlp.c_proj": "mlp.fc2", "attn.in_proj_weight": "attn.qkv.weight", "attn.in_proj_bias": "attn.qkv.bias"}
    for name, value in visual.state_dict().items():
        if name.startswith(tuple(renames)):
            state[renames[name.split(".")[0]] + name[len(name.split(".")[0]) :]] = value
        elif name.startswith("transformer.resblocks."):
            index, rest = name[len("transformer.resblocks.") :].split(".", 1)
            key = next(k for k in sorted(blocks, key=len, reverse=True) if rest.startswith(k))
            state[f"blocks.{index}.{blocks[key]}{rest[len(key) :]}"] = value
    twin.load_state_dict(state)
    return twin.eval()


@pytest.mark.parametrize("method", ["merge", "drop", "fuse", "bipartite"])
def test_timm_twin_gives_the_same_output_and_flops(method: str, images: Tensor) -> None:
    model = make_clip()
    twin = timm_twin(model)
    with torch.no_grad():
        torch.testing.assert_close(twin(images), model.encode_image(images), atol=1e-5, rtol=1e-5)
        for patched in (model, twin):
            tm.patch(patched, layers=(1, 2), keep_rate=0.5, method=method)
        torch.testing.assert_close(twin(images), model.encode_image(images), atol=1e-4, rtol=1e-4)
    assert tm.token_counts(model, images) == tm.token_counts(twin, images)
    ours, theirs = tm.count_flops(model, (3, 32, 32)), tm.count_flops(twin, (3, 32, 32))
    assert ours.total == theirs.total and ours.blocks == theirs.blocks


# -- count_flops: nn.MultiheadAttention's fused kernel counted, reduced blocks as unpatched ones of that size -------


def test_count_flops_matches_unpatched_towers_cut_to_the_same_tokens() -> None:
    model = make_clip()
    unpatched = tm.count_flops(model, (3, 32, 32))
    # by hand, per block: in_proj + out_proj (4 N D^2), 2 N^2 D for attention, the MLP (2 N D * 2D), two LayerNorms
    # (fvcore: 5 flops per element) - open_clip's nn.MultiheadAttention runs a fused kernel fvcore has no handle for
    n, width = 65, 32
    assert unpatched.blocks[0].flops == 4 * n * width**2 + 2 * n * n * width + 4 * n * width**2 + 2 * 5 * n * width
    tm.patch(model, layers=(1, 2), keep_rate=0.5, prop_attn=True)
    report = tm.count_flops(model, (3, 32, 32))
    assert [(b.tokens_in, b.tokens_out) for b in report.blocks] == [(65, 65), (65, 33), (33, 17), (17, 17)]
    # an unpatched tower whose image has 16 patches has block 3's 17 tokens (block 3 attends proportionally here)
    small = tm.count_flops(make_clip(image_size=(16, 16)), (3, 16, 16))
    assert report.blocks[3].flops == small.blocks[0].flops
    assert report.blocks[0].flops == unpatched.blocks[0].flops
    # a reducing block: between the unpatched block at its input and at its output size
    middle = tm.count_flops(make_clip(image_size=(32, 16)), (3, 32, 16)).blocks[0].flops  # 33 tokens
    assert middle < report.blocks[1].flops < unpatched.blocks[0].flops
    assert small.blocks[0].flops < report.blocks[2].flops < middle
    assert abs(report.analytic / report.total - 1) < 0.08


# -- install / uninstall, copies, gradients, export ----------------------------------------------------------------


def _snapshot(model: nn.Module) -> dict[str, tuple]:
    return {
        name: (set(module.__dict__), len(module._forward_pre_hooks), len(module._forward_hooks))
        for name, module in model.named_modules()
    }


@pytest.mark.parametrize("flavour", ["default", "qk_norm", "avg_pool"])
def test_unpatch_is_bit_exact_and_leaves_nothing_behind(flavour: str, images: Tensor, text: Tensor) -> None:
    model = make_clip(flavour)
    before = _snapshot(model)
    state = {key: value.clone() for key, value in model.state_dict().items()}
    with torch.no_grad():
        expected = model(images, text)
        tm.patch(model, layers=(1,), keep_rate=0.5, prop_attn=True)
        tm.patch(model, layers=(1, 2), keep_rate=0.5, method="drop")  # re-configures
        model(images, text)
        assert all(torch.equal(model.state_dict()[key], value) for key, value in state.items())
        tm.unpatch(model)
        after = model(images, text)
    assert not tm.is_patched(model) and _snapshot(model) == before
    assert all(torch.equal(a, b) for a, b in zip(after, expected, strict=True))


def test_deepcopy_and_pickle(images: Tensor) -> None:
    model = tm.patch(make_clip("avg_pool"), layers=(1, 2), keep_rate=0.5)
    with torch.no_grad():
        expected = model.encode_image(images)
        for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
            assert tm.is_patched(clone)
            assert torch.equal(clone.encode_image(images), expected)


@pytest.mark.parametrize("flavour", ["default", "qk_norm"])
def test_backward_reaches_every_image_parameter(flavour: str, images: Tensor, text: Tensor) -> None:
    def with_grad(patched: bool) -> set[str]:
        model = make_clip(flavour).train()
        if patched:
            tm.patch(model, layers=(1, 2), keep_rate=0.5, prop_attn=True)
        image_features, text_features, scale = model(images, text)
        (scale * image_features @ text_features.T).logsumexp(-1).sum().backward()
        return {n for n, p in model.named_parameters() if p.grad is not None and p.grad.any()}

    reached = with_grad(patched=True)
    assert reached == with_grad(patched=False)
    assert {n for n, _ in make_clip(flavour).visual.named_parameters(prefix="visual")} <= reached


def test_grad_checkpointing_recomputes_the_same_reduction(images: Tensor) -> None:
    grads = []
    for checkpointing in (False, True):
        model = make_clip().train()
        tm.patch(model, layers=(1, 2), keep_rate=0.5, prop_attn=True)
        model.visual.set_grad_checkpointing(checkpointing)
        model.encode_image(images).square().sum().backward()
        grads.append([p.grad for p in model.visual.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


def test_torch_export_and_onnx_with_a_dynamic_batch(images: Tensor, tmp_path: Path) -> None:
    """torch.export of a patched tower with a dynamic batch, run at batch 1 and 3; then that program to ONNX, run in
    onnxruntime at batch 1 and 3 (skipped without the export extra)."""
    visual = tm.patch(make_clip(), layers=(1, 2), keep_rate=0.5, prop_attn=True).visual
    exported = torch.export.export(visual, (images[:2],), dynamic_shapes=({0: torch.export.Dim("batch")},))
    with torch.no_grad():
        expected = {batch: visual(images[:batch]) for batch in (1, 3)}
    for batch in (1, 3):
        torch.testing.assert_close(exported.module()(images[:batch]), expected[batch], atol=1e-5, rtol=0)
    if not HAS_ONNX:
        pytest.skip(f"torch.export part passed; {NO_ONNX}")
    standard_export(exported, images[:2], tmp_path / "visual.onnx", optimize=False)
    for batch in (1, 3):
        (got,) = onnx_outputs(tmp_path / "visual.onnx", images[:batch])
        torch.testing.assert_close(torch.from_numpy(got), expected[batch], atol=1e-4, rtol=0)


# -- what stays refused, clearly, leaving the model as it was --------------------------------------------------------


def _refused(model: nn.Module, error: type, match: str, **kwargs: object) -> None:
    before = _snapshot(model)
    with pytest.raises(error, match=match):
        tm.patch(model, layers=(1,), keep_rate=0.5, **kwargs)
    assert not tm.is_patched(model) and _snapshot(model) == before


def test_unsupported_towers_are_refused() -> None:
    _refused(make_clip(attentional_pool=True), ValueError, "pools with an attentional pooler")
    _refused(make_clip(pool_type="none"), ValueError, "pool_type='none'")
    _refused(make_clip(scaled_cosine_attn=True), TypeError, "block 1 uses scaled cosine attention")
    sequence_first = make_clip()
    sequence_first.visual.transformer.batch_first = False
    _refused(sequence_first, ValueError, "batch_first=False")
    resnet = CLIP(embed_dim=8, vision_cfg=dict(image_size=32, layers=(1, 1, 1, 1), width=8), text_cfg=TEXT)
    _refused(resnet, TypeError, "supports open_clip VisionTransformer .* got CLIP with ModifiedResNet$")
    timm_tower = dict(timm_model_name="vit_tiny_patch16_224", timm_model_pretrained=False, timm_pool="")
    wrapped = CLIP(embed_dim=8, vision_cfg=dict(image_size=32, **timm_tower), text_cfg=TEXT)
    _refused(wrapped, TypeError, r"got CLIP with TimmModel \(its .trunk is a timm VisionTransformer: patch that\)")


def test_forward_intermediates_unmerges_grids_after_a_reduction(images: Tensor) -> None:
    model = tm.patch(make_clip(), layers=(2,), keep_rate=0.5)
    with torch.no_grad():
        early = model.visual.forward_intermediates(images, indices=[0, 1])
        assert [y.shape for y in early["image_intermediates"]] == [(3, 32, 8, 8)] * 2
        maps = model.visual.forward_intermediates(images, normalize_intermediates=True)["image_intermediates"]
        source = tm.reduction_trace(model)[2].source  # [B, 64]: the token holding each patch
        tokens = model.forward_intermediates(images, image_output_fmt="NLC")["image_intermediates"]
        normed = model.visual.forward_intermediates(images, output_fmt="NLC", normalize_intermediates=True)
    assert [y.shape[1] for y in tokens] == [64, 64, 32, 32]
    assert [y.shape for y in maps] == [(3, 32, 8, 8)] * 4
    cells = maps[3].flatten(2).transpose(1, 2)  # [B, 64, C] in grid order
    reduced = normed["image_intermediates"][3]
    for b in range(images.shape[0]):
        for patch_index in range(64):
            assert torch.equal(cells[b, patch_index], reduced[b, source[b, patch_index] - 1])


def test_masks_and_separate_keys_are_refused(images: Tensor) -> None:
    model = tm.patch(make_clip(), layers=(1,), keep_rate=0.5)
    block = model.visual.transformer.resblocks[1]
    x = torch.randn(2, 65, 32)
    with pytest.raises(ValueError, match="block 1 is patched to reduce tokens"):
        block(x, attn_mask=torch.zeros(65, 65))
    with pytest.raises(ValueError, match="block 1 is patched to reduce tokens"):
        block(x, x, x)
