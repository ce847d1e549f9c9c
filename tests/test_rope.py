"""Rotary-position (RoPE) ViTs: timm ``Eva`` (EVA-02, DINOv3, RoPE-ViT axial and mixed, grouped-query attention) and
Hugging Face ``DINOv3ViTModel``, tiny and random, built from the same classes as the hub models.

Checked against independent computations: the unpatched model (keep rate 1), a hand-written forward of the tiny
model (eager attention with its own rotation, the surviving tokens' table rows followed as Python lists, the
reduction by ``tokenmerge_patch.reduce``), a timm / Hugging Face DINOv3 twin with the same weights, token counts,
fvcore's count against a per-block formula, unpatch, gradients, ``torch.export``.
"""

from __future__ import annotations

import importlib.util
import io

import pytest
import timm
import torch
import torch.nn.functional as F
from tiny_models import assert_untouched, model_snapshot, perturb
from torch import Tensor, nn

import tokenmerge_patch as tm
from tokenmerge_patch.records import record_of, record_positions
from tokenmerge_patch.reduce import move_positions, reduce_tokens, reduced_patch_count, rotary_rows

SMALL = dict(img_size=48, patch_size=8, embed_dim=32, num_heads=2, depth=4, num_classes=5)  # 36 patches
FLAVOURS = {
    "eva02": lambda: timm.create_model("eva02_tiny_patch14_224", **SMALL),  # RoPE (interleaved), SwiGLU, avg pool
    "dinov3": lambda: timm.create_model("vit_base_patch16_dinov3", **SMALL),  # RoPE (half), 4 registers, LayerScale
    "rope_axial": lambda: timm.create_model("vit_base_patch16_rope_224", **SMALL),  # AttentionRope, token pool
    "rope_mixed": lambda: timm.create_model("vit_base_patch16_rope_mixed_224", **SMALL),  # learned per-block tables
    "rope_gqa": lambda: timm.create_model("vit_base_patch16_rope_224", **SMALL, qkv_fused=False, num_kv_heads=1),
}
METHODS = ("merge", "drop", "fuse", "bipartite")
LAYERS = (1, 2)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models


def make(flavour: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return perturb(FLAVOURS[flavour](), seed)


def images(batch: int = 2, size: int = 48, seed: int = 1) -> Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


# -- the independent reference ------------------------------------------------------------------------------------


def rotate(x: Tensor, rows: Tensor, half: bool) -> Tensor:
    """RoPE written out: ``rows`` holds [sin, cos]; pairs are (i, i + d/2) (half) or (2i, 2i + 1) (interleaved)."""
    sin, cos = rows.chunk(2, dim=-1)
    if half:
        first, second = x.chunk(2, dim=-1)
        turned = torch.cat([-second, first], dim=-1)
    else:
        turned = torch.stack([-x[..., 1::2], x[..., 0::2]], dim=-1).flatten(-2)
    return x * cos + turned * sin


def eager_eva_attention(attn, x: Tensor, rows: Tensor | None, bias: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """EvaAttention / AttentionRope from their weights, eagerly; returns (output, rotated q, rotated k per q head)."""
    batch, n, _ = x.shape
    heads, depth, prefix = attn.num_heads, attn.head_dim, attn.num_prefix_tokens
    if attn.qkv is not None:
        bias_qkv = attn.qkv.bias
        if getattr(attn, "q_bias", None) is not None:
            bias_qkv = torch.cat([attn.q_bias, attn.k_bias, attn.v_bias])
        q, k, v = F.linear(x, attn.qkv.weight, bias_qkv).view(batch, n, 3, heads, depth).permute(2, 0, 3, 1, 4)
    else:
        q = attn.q_proj(x).view(batch, n, heads, depth).transpose(1, 2)
        k, v = (proj(x).view(batch, n, -1, depth).transpose(1, 2) for proj in (attn.k_proj, attn.v_proj))
    q, k = attn.q_norm(q), attn.k_norm(k)
    if rows is not None:
        half = attn.rotate_half
        q = torch.cat([q[:, :, :prefix], rotate(q[:, :, prefix:], rows, half)], dim=2)
        k = torch.cat([k[:, :, :prefix], rotate(k[:, :, prefix:], rows, half)], dim=2)
    k, v = (t.repeat_interleave(heads // t.shape[1], dim=1) for t in (k, v))
    logits = (q * attn.scale) @ k.transpose(-1, -2)
    if bias is not None:
        logits = logits + bias[:, None, None, :]
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(batch, n, heads * depth)
    out = attn.norm(out)
    if attn.gate is not None:
        out = out * attn.gate(x).sigmoid()
    return attn.proj(out), q, k


def table_rows(table: Tensor, positions: list[list[int | None]]) -> Tensor:
    """Per image, the table row of each patch token; ``None`` (no position) -> sin 0, cos 1."""
    half = table.shape[-1] // 2
    identity = torch.cat([torch.zeros(half), torch.ones(half)])
    per_image = []
    for image in positions:
        rows = [table[..., p, :] if p is not None else identity.expand_as(table[..., 0, :]) for p in image]
        per_image.append(torch.stack(rows, dim=-2))
    out = torch.stack(per_image)
    return out if out.dim() == 4 else out.unsqueeze(1)  # [B, h, M, 2d]


@torch.no_grad()
def reference(
    model: nn.Module, x: Tensor, plan: dict[int, float], method: str = "merge", naive_positions: bool = False, **opts
) -> tuple[Tensor, list[int]]:
    """Logits of an unpatched timm Eva with the reductions of ``plan`` applied by hand, and tokens after each block.
    ``naive_positions``: deliberately wrong (every token keeps the table row of its index), to show positions matter.
    """
    prop_attn = opts.pop("prop_attn", method in ("merge", "bipartite"))
    if method == "merge":  # patch()'s default: keep_norm goes with proportional attention
        opts.setdefault("keep_norm", prop_attn)
    tokens, table = model._pos_embed(model.patch_embed(x))
    tokens = model.norm_pre(tokens)
    prefix = model.num_prefix_tokens
    batch, n = tokens.shape[0], tokens.shape[1] - prefix
    positions: list[list[int | None]] = [list(range(n)) for _ in range(batch)]
    sizes, reduced, counts = torch.ones(batch, tokens.shape[1]), False, []
    for index, block in enumerate(model.blocks):
        block_table = table[index] if model.rope_mixed else table
        rows = None
        if block_table is not None:
            used = [list(range(len(p))) for p in positions] if naive_positions else positions
            rows = table_rows(block_table, used)
        bias = sizes.log() if prop_attn and reduced and method != "drop" else None
        y, q, k = eager_eva_attention(block.attn, block.norm1(tokens), rows, bias)
        tokens = tokens + (y if block.gamma_1 is None else block.gamma_1 * y)
        if index in plan:
            out = reduce_tokens(
                tokens,
                q,
                k,
                block.attn.scale,
                num_prefix=prefix,
                keep_rate=plan[index],
                method=method,
                attn_bias=None if bias is None else bias[:, None, None, :],
                sizes=sizes,
                **opts,
            )
            reduced = reduced or out.x.shape[1] < tokens.shape[1]
            tokens, sizes = out.x, out.sizes
            # a token stays at its crucial (bipartite: destination) token's position; the fused token has none
            positions = [[p[j] for j in keep.tolist()] for p, keep in zip(positions, out.keep_index, strict=True)]
            if method == "fuse" and len(positions[0]) < tokens.shape[1] - prefix:
                positions = [[*p, None] for p in positions]
        y = block.mlp(block.norm2(tokens))
        tokens = tokens + (y if block.gamma_2 is None else block.gamma_2 * y)
        counts.append(tokens.shape[1])
    tokens = model.norm(tokens)
    if model.global_pool == "avg":
        weights = sizes[:, prefix:, None]
        pooled = (tokens[:, prefix:] * weights).sum(1) / weights.sum(1)
    else:
        assert model.global_pool == "token"
        pooled = tokens[:, 0]
    return model.head(model.fc_norm(pooled)), counts


def expected_counts(prefix: int, patches: int, depth: int, plan: dict[int, float], method: str) -> list[int]:
    counts, n = [], patches
    for index in range(depth):
        if index in plan:
            n = reduced_patch_count(n, plan[index], method)
        counts.append(prefix + n)
    return counts


# -- timm Eva -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_keep_rate_one_is_the_unpatched_model(flavour: str) -> None:
    model, x = make(flavour), images()
    with torch.no_grad():
        expected = model(x)
        for dense in (False, True):
            tm.patch(model, layers=LAYERS, keep_rate=1.0, dense=dense)
            assert (model(x) - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("method", METHODS)
def test_matches_the_independent_reference(flavour: str, method: str) -> None:
    model, x = make(flavour), images()
    plan = {1: 0.5, 2: 0.6}
    expected, counts = reference(model, x, plan, method)
    # the rotary rows matter: the same reductions with every token at the row of its index give other logits
    wrong, _ = reference(model, x, plan, method, naive_positions=True)
    assert (wrong - expected).abs().max() > 1e-3
    tm.patch(model, layers=tuple(plan), keep_rate=tuple(plan.values()), method=method)
    with torch.no_grad():
        got = model(x)
    assert (got - expected).abs().max() <= 1e-4
    assert tm.token_counts(model, x) == counts
    prefix, patches = model.num_prefix_tokens, model.patch_embed.num_patches
    assert counts == expected_counts(prefix, patches, len(model.blocks), plan, method)


@pytest.mark.parametrize(
    "options",
    [dict(prop_attn=False), dict(size_weighted=True), dict(similarity="attention"), dict(merge_into_cls=True)],
)
def test_merge_options_match_the_reference(options: dict) -> None:
    model, x = make("dinov3"), images()
    plan = {0: 0.5, 2: 0.5}
    expected, counts = reference(model, x, plan, "merge", **options)
    tm.patch(model, layers=tuple(plan), keep_rate=0.5, **options)
    with torch.no_grad():
        assert (model(x) - expected).abs().max() <= 1e-4
    assert tm.token_counts(model, x) == counts


def test_eager_attention_path_matches_fused() -> None:
    model, x = make("eva02"), images()
    tm.patch(model, layers=LAYERS, keep_rate=0.5)  # prop_attn on: log(size) as a float mask
    with torch.no_grad():
        fused = model(x)
        for block in model.blocks:
            block.attn.fused_attn = False
        assert (model(x) - fused).abs().max() <= 1e-5


def test_positions_travel_with_the_tokens() -> None:
    model, x = make("dinov3"), images()
    tm.patch(model, layers=LAYERS, keep_rate=0.5, method="fuse", prop_attn=False)
    with torch.no_grad():
        features = model.forward_features(x)
    positions = record_positions(record_of(features))
    assert positions.shape == (2, features.shape[1] - model.num_prefix_tokens)
    patches = model.patch_embed.num_patches
    assert (positions[:, -1] == -1).all()  # block 2's fused token: no position (block 1's may be among the crucial)
    assert ((positions >= -1) & (positions < patches)).all()
    real = [row[row >= 0].tolist() for row in positions]
    assert all(len(set(row)) == len(row) for row in real)  # no two tokens at one position


def test_position_helpers() -> None:
    positions = move_positions(torch.tensor([[3, 0, 5, 1]]), torch.tensor([[0, 2]]), fused=True)
    assert positions.tolist() == [[3, 5, -1]]
    table = torch.randn(6, 8)
    rows = rotary_rows(table, positions, torch.cat([torch.zeros(4), torch.ones(4)]))
    assert rows.shape == (1, 1, 3, 8)
    assert torch.equal(rows[0, 0, 0], table[3]) and torch.equal(rows[0, 0, 1], table[5])
    q = torch.randn(1, 2, 3, 4)
    assert torch.equal(rotate(q, rows, half=True)[:, :, 2], q[:, :, 2])  # the identity row: not rotated
    per_head = torch.randn(2, 6, 8)  # mixed RoPE: one table per head
    assert torch.equal(rotary_rows(per_head, positions, torch.zeros(8))[0, :, 1], per_head[:, 5])


def test_record_with_positions_saves_with_weights_only() -> None:
    model, x = make("eva02"), images()
    tm.patch(model, layers=LAYERS, keep_rate=0.5)
    with torch.no_grad():
        features = model.forward_features(x)
    buffer = io.BytesIO()
    torch.save(features, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert torch.equal(record_positions(record_of(loaded)), record_positions(record_of(features)))


@pytest.mark.parametrize("flavour", ["eva02", "rope_mixed"])
def test_unpatch_round_trip(flavour: str) -> None:
    model, x = make(flavour), images()
    before = model_snapshot(model)
    with torch.no_grad():
        expected = model(x)
        tm.patch(model, layers=LAYERS, keep_rate=0.5)
        model(x)
        tm.unpatch(model)
        assert torch.equal(model(x), expected)
    assert_untouched(model, before)


@pytest.mark.parametrize("flavour", ["eva02", "rope_mixed"])
def test_gradients_flow(flavour: str) -> None:
    model = make(flavour).train()
    tm.patch(model, layers=LAYERS, keep_rate=0.5)
    model(images()).logsumexp(-1).sum().backward()
    for name, param in model.named_parameters():
        if name.startswith(("blocks", "patch_embed", "rope", "head")):
            assert param.grad is not None and torch.isfinite(param.grad).all(), name
    assert model.blocks[3].attn.proj.weight.grad.abs().sum() > 0
    if flavour == "rope_mixed":  # the learned frequencies get gradients through the surviving rows too
        assert model.rope.freqs.grad.abs().sum() > 0


def test_other_image_sizes_use_their_own_grid() -> None:
    model, x = make("dinov3"), images(size=64)  # dynamic_img_size: an 8 x 8 grid and its rotary table
    plan = {1: 0.5, 2: 0.6}
    expected, counts = reference(model, x, plan, "merge")
    tm.patch(model, layers=tuple(plan), keep_rate=tuple(plan.values()))
    with torch.no_grad():
        assert (model(x) - expected).abs().max() <= 1e-4
    assert counts[-1] == model.num_prefix_tokens + reduced_patch_count(reduced_patch_count(64, 0.5), 0.6)


def test_activation_checkpointing_gives_the_same_gradients() -> None:
    grads = []
    for checkpointing in (False, True):
        model = make("eva02").train()
        model.set_grad_checkpointing(checkpointing)
        tm.patch(model, layers=LAYERS, keep_rate=0.5)
        model(images()).square().sum().backward()
        grads.append({name: p.grad for name, p in model.named_parameters()})
    assert all(torch.allclose(grads[0][name], grads[1][name], atol=1e-6) for name in grads[0])


def test_patch_dropout_in_training() -> None:
    torch.manual_seed(0)
    model = perturb(timm.create_model("vit_base_patch16_dinov3", **SMALL, patch_drop_rate=0.5), 0).train()
    tm.patch(model, layers=LAYERS, keep_rate=0.5)  # timm hands the blocks per-image rows: [B, 1, N', 2d]
    model(images()).sum().backward()
    assert [r.tokens_in for r in tm.reduction_trace(model).values()] == [5 + 18, 5 + 9]


def test_intermediates_and_flops_budget() -> None:
    model, x = make("eva02"), images()
    tm.patch(model, layers=LAYERS, keep_rate=0.5)
    with torch.no_grad():
        _, inner = model.forward_intermediates(x, output_fmt="NLC")
    assert [t.shape[1] for t in inner] == [36, 18, 9, 9]  # patch tokens after each block
    with torch.no_grad():  # NCHW maps: the full grid, each patch with the features of the token holding it
        maps = model.forward_intermediates(x, intermediates_only=True)
        source = tm.reduction_trace(model)[max(LAYERS)].source  # [B, 36] index of the token holding each patch
        unpatched = tm.unpatch(model).forward_intermediates(x, intermediates_only=True)
        tm.patch(model, layers=LAYERS, keep_rate=0.5)
    assert [m.shape for m in maps] == [m.shape for m in unpatched]
    assert torch.equal(maps[0], unpatched[0])  # before the first reduction
    last = maps[-1].flatten(2).transpose(1, 2)  # [B, 36, C] in grid order
    prefix = model.num_prefix_tokens
    for b in range(x.shape[0]):
        for patch_index in range(36):
            assert torch.equal(last[b, patch_index], inner[-1][b, source[b, patch_index] - prefix])
    tm.patch(model, flops=0.6)
    fraction = tm.count_flops(model, (3, 48, 48)).total / tm.count_flops(tm.unpatch(model), (3, 48, 48)).total
    assert 0.59 <= fraction <= 0.6


def _block_flops(block: nn.Module, n_in: int, n_out: int, overhead: int) -> int:
    """fvcore's convention by hand for one pre-norm Eva block: linear layers, ``2 n^2 A`` attention, LayerNorms at
    5 flops per element (rotary embedding, softmax, gathers: element-wise, zero), plus the reduction's products."""
    attn, dim = block.attn, block.norm1.normalized_shape[0]
    linears = sum(m.in_features * m.out_features for m in attn.modules() if isinstance(m, nn.Linear))
    mlp = sum(m.in_features * m.out_features for m in block.mlp.modules() if isinstance(m, nn.Linear))
    width = attn.num_heads * attn.head_dim
    return n_in * linears + 2 * n_in * n_in * width + n_out * mlp + 5 * dim * (n_in + n_out) + overhead


@pytest.mark.parametrize("flavour", ["eva02", "dinov3", "rope_gqa"])
def test_count_flops_per_block(flavour: str) -> None:
    model = make(flavour)
    size = (3, 48, 48)
    unpatched = tm.count_flops(model, size)
    tokens = model.patch_embed.num_patches + model.num_prefix_tokens
    assert [b.flops for b in unpatched.blocks] == [_block_flops(b, tokens, tokens, 0) for b in model.blocks]
    tm.patch(model, layers=LAYERS, keep_rate=0.5, method="merge")
    report = tm.count_flops(model, size)
    for entry, block in zip(report.blocks, model.blocks, strict=True):
        overhead = 0
        if entry.index in LAYERS:  # the class row (H n d) and cosine similarities of the rest to the kept (M K D)
            attn, prefix = block.attn, model.num_prefix_tokens
            patches, kept = entry.tokens_in - prefix, entry.tokens_out - prefix
            overhead = entry.tokens_in * attn.num_heads * attn.head_dim + (patches - kept) * kept * model.embed_dim
        assert entry.flops == _block_flops(block, entry.tokens_in, entry.tokens_out, overhead)
    # outside the blocks only the final LayerNorm (if any: eva02 normalises after pooling) sees fewer tokens
    fewer = tokens - report.blocks[-1].tokens_out
    assert unpatched.outside_blocks - report.outside_blocks == (
        5 * model.embed_dim * fewer if isinstance(model.norm, nn.LayerNorm) else 0
    )
    # the analytic cross-check leaves the norms out: 10 N D next to 12 N D^2 is a few per cent at D = 32
    assert abs(report.analytic / report.total - 1) < 0.05


def test_refuses_models_without_a_class_token() -> None:
    rope_gap = timm.create_model("vit_base_patch16_rope_reg1_gap_256", **SMALL)
    siglip = timm.create_model(
        "vit_base_patch16_siglip_224", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2
    )
    for model in (rope_gap, siglip):
        before = model_snapshot(model)
        with pytest.raises(ValueError, match="no class token"):
            tm.patch(model, score="cls")  # scored by the received attention instead (tests/test_class_free.py)
        assert_untouched(model, before)


def test_refuses_post_norm_blocks() -> None:
    model = timm.create_model("eva02_tiny_patch14_224", **SMALL, use_post_norm=True)
    before = model_snapshot(model)
    with pytest.raises(TypeError, match="EvaBlockPostNorm"):
        tm.patch(model, layers=LAYERS)
    assert_untouched(model, before)


def test_torch_export_keeps_a_dynamic_batch() -> None:
    model = tm.patch(make("dinov3"), layers=LAYERS, keep_rate=0.5)
    x = images(batch=2)
    exported = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},), strict=False)
    for batch in (1, 3):
        y = images(batch=batch, seed=batch)
        with torch.no_grad():
            assert (exported.module()(y) - model(y)).abs().max() <= 1e-5


@pytest.mark.skipif(
    not all(importlib.util.find_spec(name) for name in ("onnx", "onnxscript", "onnxruntime")),
    reason="onnx, onnxscript and onnxruntime are needed",
)
def test_onnx_export_runs_in_onnxruntime(tmp_path) -> None:
    import onnxruntime

    model = tm.patch(make("eva02"), layers=LAYERS, keep_rate=0.5, method="fuse")
    tm.export_onnx(model, tmp_path / "eva.onnx", images(batch=1))
    session = onnxruntime.InferenceSession(str(tmp_path / "eva.onnx"))
    for batch in (1, 3):
        y = images(batch=batch, seed=batch)
        got = session.run(None, {session.get_inputs()[0].name: y.numpy()})[0]
        with torch.no_grad():
            assert abs(got - model(y).numpy()).max() <= 1e-4


# -- Hugging Face DINOv3 and its timm twin -----------------------------------------------------------------------------


def dinov3_twin(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """A tiny HF ``DINOv3ViTModel`` with random weights and the timm ``vit_base_patch16_dinov3_qkvb`` holding the same
    weights (key bias: none in HF, a zero buffer in timm)."""
    transformers = pytest.importorskip("transformers", minversion="5")
    depth, dim = 4, 32
    config = transformers.DINOv3ViTConfig(
        image_size=48,
        patch_size=8,
        hidden_size=dim,
        num_hidden_layers=depth,
        num_attention_heads=2,
        intermediate_size=4 * dim,
        num_register_tokens=4,
    )
    torch.manual_seed(seed)
    hf = perturb(transformers.DINOv3ViTModel(config), seed)
    twin = timm.create_model("vit_base_patch16_dinov3_qkvb", **{**SMALL, "depth": depth, "num_classes": 0})
    twin.global_pool = "token"
    hf_state = hf.state_dict()
    names = {"cls_token": "embeddings.cls_token", "reg_token": "embeddings.register_tokens"}
    names |= {f"patch_embed.proj.{p}": f"embeddings.patch_embeddings.{p}" for p in ("weight", "bias")}
    names |= {f"norm.{p}": f"norm.{p}" for p in ("weight", "bias")}
    state = {mine: hf_state[theirs] for mine, theirs in names.items()}
    for i in range(depth):
        timm_block, hf_layer = f"blocks.{i}.", f"model.layer.{i}."
        parts = {"norm1": "norm1", "norm2": "norm2", "attn.proj": "attention.o_proj"}
        parts |= {"mlp.fc1": "mlp.up_proj", "mlp.fc2": "mlp.down_proj"}
        for mine, theirs in parts.items():
            for p in ("weight", "bias"):
                state[f"{timm_block}{mine}.{p}"] = hf_state[f"{hf_layer}{theirs}.{p}"]
        qkv = [hf_state[f"{hf_layer}attention.{n}_proj.weight"] for n in "qkv"]
        state[f"{timm_block}attn.qkv.weight"] = torch.cat(qkv)
        state[f"{timm_block}attn.q_bias"] = hf_state[f"{hf_layer}attention.q_proj.bias"]
        state[f"{timm_block}attn.v_bias"] = hf_state[f"{hf_layer}attention.v_proj.bias"]
        state[f"{timm_block}gamma_1"] = hf_state[f"{hf_layer}layer_scale1.lambda1"]
        state[f"{timm_block}gamma_2"] = hf_state[f"{hf_layer}layer_scale2.lambda1"]
    twin.load_state_dict(state, strict=True)
    return hf.eval(), twin.eval()


def test_twins_agree_unpatched() -> None:
    hf, twin = dinov3_twin()
    x = images()
    with torch.no_grad():
        assert (hf(x).last_hidden_state - twin.forward_features(x)).abs().max() <= 1e-5


@pytest.mark.parametrize("method", METHODS)
def test_twins_agree_patched(method: str) -> None:
    hf, twin = dinov3_twin()
    x = images()
    for model in (hf, twin):
        tm.patch(model, layers=LAYERS, keep_rate=0.5, method=method)
    with torch.no_grad():
        out = hf(x, output_hidden_states=True)
        features = twin.forward_features(x)
    assert out.last_hidden_state.shape == features.shape
    assert (out.last_hidden_state - features).abs().max() <= 1e-5
    counts = [h.shape[1] for h in out.hidden_states[1:]]
    assert counts == tm.token_counts(twin, x) == tm.token_counts(hf, x)
    assert [r.tokens_out for r in tm.reduction_trace(hf).values()] == [counts[i] for i in LAYERS]


@pytest.mark.parametrize("method", ["merge", "fuse"])
def test_dense_twins_agree(method: str) -> None:
    """dense=True: every block from the first reduction on computes on merged tokens, each at its crucial token's
    rotary row (EViT's fused token: none), and hands its update to every patch; the timm and HF twins agree."""
    hf, twin = dinov3_twin()
    x = images()
    with torch.no_grad():
        unpatched = twin.forward_features(x)
        for model in (hf, twin):
            tm.patch(model, layers=LAYERS, keep_rate=0.5, method=method, dense=True)
        out = hf(x, output_hidden_states=True)
        features = twin.forward_features(x)
    assert features.shape == out.last_hidden_state.shape == unpatched.shape
    assert (out.last_hidden_state - features).abs().max() <= 1e-5 and (features - unpatched).abs().max() > 1e-3
    assert [h.shape for h in out.hidden_states[1:]] == [unpatched.shape] * 4
    expected = [41, 23, 14, 14] if method == "merge" else [41, 24, 16, 16]  # fuse: + the fused token
    assert tm.token_counts(twin, x) == tm.token_counts(hf, x) == expected


@pytest.mark.parametrize("method", METHODS)
def test_hf_matches_the_independent_reference(method: str) -> None:
    hf, twin = dinov3_twin()
    x = images()
    plan = {1: 0.5, 2: 0.6}
    twin.reset_classifier(0, "token")
    expected, counts = reference(twin, x, plan, method)  # the head is an identity: the normed class token
    tm.patch(hf, layers=tuple(plan), keep_rate=tuple(plan.values()), method=method)
    with torch.no_grad():
        assert (hf(x).pooler_output - expected).abs().max() <= 1e-4
    assert tm.token_counts(hf, x) == counts


def test_hf_keep_rate_one_unpatch_and_gradients() -> None:
    hf, _ = dinov3_twin()
    x = images()
    before = model_snapshot(hf)
    with torch.no_grad():
        expected = hf(x).last_hidden_state
        tm.patch(hf, layers=LAYERS, keep_rate=1.0)
        assert (hf(x).last_hidden_state - expected).abs().max() <= 1e-5
    tm.patch(hf, layers=LAYERS, keep_rate=0.5)
    hf.train()
    hf(x).pooler_output.square().sum().backward()
    grads = {name: p.grad for name, p in hf.named_parameters() if name.startswith("model.layer.")}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert grads["model.layer.3.attention.o_proj.weight"].abs().sum() > 0
    hf.eval()
    tm.unpatch(hf)
    with torch.no_grad():
        assert torch.equal(hf(x).last_hidden_state, expected)
    hf.zero_grad(set_to_none=True)
    assert_untouched(hf, before)


def test_hf_eager_attention_matches_sdpa() -> None:
    hf, _ = dinov3_twin()
    x = images()
    tm.patch(hf, layers=LAYERS, keep_rate=0.5)  # prop_attn: log(size) as a float mask in both
    with torch.no_grad():
        sdpa = hf(x).last_hidden_state
        hf.set_attn_implementation("eager")
        out = hf(x, output_attentions=True)
    assert (out.last_hidden_state - sdpa).abs().max() <= 1e-5
    assert [a.shape[-1] for a in out.attentions] == tm.token_counts(hf, x)[:1] + tm.token_counts(hf, x)[:-1]


def test_hf_count_flops_matches_the_twin() -> None:
    hf, twin = dinov3_twin()
    for model in (hf, twin):
        tm.patch(model, layers=LAYERS, keep_rate=0.5)
    hf_report, twin_report = tm.count_flops(hf, (3, 48, 48)), tm.count_flops(twin, (3, 48, 48))
    assert [(b.tokens_in, b.tokens_out, b.flops) for b in hf_report.blocks] == [
        (b.tokens_in, b.tokens_out, b.flops) for b in twin_report.blocks
    ]
    for entry, block in zip(twin_report.blocks, twin.blocks, strict=True):
        overhead = 0
        if entry.index in LAYERS:
            patches, kept = entry.tokens_in - 5, entry.tokens_out - 5
            overhead = entry.tokens_in * 32 + (patches - kept) * kept * 32
        assert entry.flops == _block_flops(block, entry.tokens_in, entry.tokens_out, overhead)


def test_hf_torch_export() -> None:
    hf, _ = dinov3_twin()
    tm.patch(hf, layers=LAYERS, keep_rate=0.5)
    x = images(batch=2)
    exported = torch.export.export(hf, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},), strict=False)
    y = images(batch=3, seed=3)
    with torch.no_grad():
        got = exported.module()(y)
        assert (got["last_hidden_state"] - hf(y).last_hidden_state).abs().max() <= 1e-5


def test_features_only_dinov3_backbone_gives_unmerged_maps() -> None:
    """A timm DINOv3 features_only backbone (what segmentation and depth heads read) patches directly: keep 1 is the
    unpatched backbone; after a reduction each grid cell is the feature of the token that holds that patch."""
    kwargs = {key: value for key, value in SMALL.items() if key != "num_classes"}
    torch.manual_seed(0)
    net = timm.create_model("vit_base_patch16_dinov3", features_only=True, out_indices=(1, 2, 3), **kwargs).eval()
    perturb(net, 0)
    x = images()
    with torch.no_grad():
        unpatched = net(x)
        tm.patch(net, layers=(1, 2, 3), keep_rate=1.0)
        keep_one = net(x)
        tm.patch(net, layers=LAYERS, keep_rate=0.5)
        maps = net(x)
        tokens = net.model.forward_intermediates(x, indices=[3], output_fmt="NLC", intermediates_only=True)[0]
        source = tm.reduction_trace(net)[max(LAYERS)].source  # [B, 36]: the token (prefix counted) of each patch
    for got, want in zip(keep_one, unpatched, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert [m.shape for m in maps] == [m.shape for m in unpatched]
    cells = maps[-1].flatten(2).transpose(1, 2)  # [B, 36, C] in grid order
    prefix = net.model.num_prefix_tokens
    for b in range(x.shape[0]):
        for patch_index in range(36):
            torch.testing.assert_close(cells[b, patch_index], tokens[b, source[b, patch_index] - prefix])
    tm.unpatch(net)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(net(x), unpatched, strict=True))
