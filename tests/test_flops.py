"""count_flops: the paper's FLOPs, fused = eager attention, and the analytic cross-check."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from tiny_models import make_model

import tokenmerge_patch as tm

# (model, keep rate) -> GFLOPs at layers (3, 6, 9), method merge; keep 1.0 = unpatched.
# Paper: Table 1 DeiT-T 1.3 / 0.8, DeiT-B 17.5 / 11.5, DeiT-S 4.6; Table 3 "+TM" DeiT-S 3.0 (0.7), 2.3 (0.5).
PAPER = [
    ("deit_tiny_patch16_224", 1.0, 1.26),
    ("deit_tiny_patch16_224", 0.7, 0.82),
    ("deit_small_patch16_224", 1.0, 4.61),
    ("deit_small_patch16_224", 0.7, 3.01),
    ("deit_small_patch16_224", 0.5, 2.29),
    ("deit_base_patch16_224", 1.0, 17.58),
    ("deit_base_patch16_224", 0.7, 11.51),
]


@pytest.fixture(scope="module")
def deit_models() -> dict[str, torch.nn.Module]:
    return {name: timm.create_model(name) for name in {name for name, _, _ in PAPER}}


@pytest.mark.parametrize(("name", "keep_rate", "gflops"), PAPER)
def test_reproduces_the_papers_flops(deit_models, name: str, keep_rate: float, gflops: float) -> None:
    model = deit_models[name]
    tm.patch(model, layers=(3, 6, 9), keep_rate=keep_rate) if keep_rate < 1 else tm.unpatch(model)
    report = tm.count_flops(model)
    assert round(report.gflops, 2) == gflops
    assert abs(report.analytic / report.total - 1) < 0.01
    # fvcore skips only ops that are no multiply-adds (element-wise, sorting, indexing)
    multiply_adds = {
        "aten::matmul",
        "aten::bmm",
        "aten::mm",
        "aten::addmm",
        "aten::baddbmm",
        "aten::linear",
        "aten::einsum",
        "aten::_convolution",
        "aten::scaled_dot_product_attention",
    }
    assert not multiply_adds & set(report.unsupported)


def test_fused_attention_counts_the_same_as_eager() -> None:
    model = timm.create_model("deit_small_patch16_224")
    fused = tm.count_flops(model).total
    for block in model.blocks:
        block.attn.fused_attn = False
    eager = tm.count_flops(model).total
    # by hand: 12 x (qkv + proj + 2 N^2 D + MLP + 2 LayerNorms at 5 flops/element) + patch embedding
    # + final norm + head, with N = 197, D = 384, MLP 1536; fvcore alone says 4.25 G for the fused model
    per_block = 197 * 384 * 1152 + 197 * 384 * 384 + 2 * 197 * 197 * 384 + 2 * 197 * 384 * 1536 + 2 * 5 * 197 * 384
    assert fused == eager == 12 * per_block + 196 * 768 * 384 + 5 * 197 * 384 + 384 * 1000


def test_fvcore_alone_misses_fused_attention() -> None:
    import warnings

    from fvcore.nn import FlopCountAnalysis

    model = timm.create_model("deit_small_patch16_224").eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        analysis = FlopCountAnalysis(model, (torch.randn(1, 3, 224, 224),)).unsupported_ops_warnings(False)
        plain = analysis.tracer_warnings("none").total()
    assert round(plain / 1e9, 2) == 4.25  # what count_flops' SDPA handle adds back: 12 x 2 N^2 D
    assert tm.count_flops(model).total - plain == 12 * 2 * 197 * 197 * 384


def test_per_block_breakdown_matches_token_counts(flavour: str) -> None:
    model = make_model(flavour)
    tm.patch(model, layers=(1, 2), keep_rate=(0.6, 0.5))
    report = tm.count_flops(model, (3, 32, 32))
    counts = tm.token_counts(model, torch.randn(1, 3, 32, 32))
    assert [b.tokens_out for b in report.blocks] == counts
    assert [b.tokens_in for b in report.blocks][1:] == counts[:-1]
    assert report.blocks[1].flops > report.blocks[2].flops > report.blocks[3].flops
    assert abs(report.analytic / report.total - 1) < 0.1  # tiny models: norms (and qk-norm) weigh more
    assert sum(b.flops for b in report.blocks) + report.outside_blocks == report.total
    assert "| **total** |" in str(report)


def test_example_input_is_counted_per_image() -> None:
    model = make_model("dynamic")
    one = tm.count_flops(model, (3, 32, 32)).total
    assert tm.count_flops(model, torch.randn(4, 3, 32, 32)).total == one
    assert tm.count_flops(model, torch.randn(1, 3, 48, 48)).total > one


def test_bad_input_size() -> None:
    with pytest.raises(TypeError, match="input_size must be"):
        tm.count_flops(make_model("vit"), (32, 32))


@pytest.mark.parametrize(
    "size",
    [(np.int64(3), np.int32(32), np.int64(32)), list(np.array([3, 32, 32])), [3, np.uint8(32), 32]],
    ids=["numpy", "list", "mixed"],
)
def test_input_size_takes_any_integral(size) -> None:
    model = make_model("vit")
    python = tm.count_flops(model, (3, 32, 32))
    report = tm.count_flops(model, size)
    assert report.total == python.total and report.analytic == python.analytic
    assert [b.tokens_out for b in report.blocks] == [b.tokens_out for b in python.blocks]


BAD_SIZES = [
    ((3, 32.0, 32), TypeError),
    ((True, 32, 32), TypeError),
    ((3, np.bool_(True), 32), TypeError),
    ((3, np.float64(32), 32), TypeError),
    ((3, "32", 32), TypeError),
    ("abc", TypeError),
    ((3, 32, 32, 1), TypeError),
    (32, TypeError),
    ((3, 0, 32), ValueError),
    ((3, 32, np.int64(-1)), ValueError),
]


@pytest.mark.parametrize(("size", "error"), BAD_SIZES, ids=[repr(s) for s, _ in BAD_SIZES])
def test_bad_input_sizes_are_refused_and_leave_the_model_alone(size, error: type) -> None:
    model = tm.patch(make_model("vit"), layers=(1, 2), keep_rate=0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=r"input_size must be \(channels, height, width\), three integers"):
        tm.count_flops(model, size)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert tm.patch_config(model).keep_rates == (0.5, 0.5) and not model.training
