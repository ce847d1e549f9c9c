"""The multi-scale fusion (paper §3.4): zero-init equivalence, shapes, FLOPs, gradients, composition."""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import timm
import torch
from tiny_models import make_model

import tokenmerge_patch as tm
from tokenmerge_patch.multiscale import add_multiscale, has_multiscale, remove_multiscale


@pytest.mark.parametrize("flavour", ["vit", "distilled", "registers_dinov2", "layerscale_deit3", "avg_pool"])
@pytest.mark.parametrize("patched", [False, True])
def test_adding_it_leaves_the_output_unchanged(flavour: str, patched: bool, images: torch.Tensor) -> None:
    model = make_model(flavour)
    if patched:
        tm.patch(model, layers=(1, 2), keep_rate=0.5)
    with torch.no_grad():
        before = model(images)
        add_multiscale(model)
        after = model(images)
    assert has_multiscale(model) and model.multiscale.fuse_at == 1
    assert (after - before).abs().max() <= 1e-5


def test_eq6_changes_the_output_and_the_first_blocks_attend_over_fewer_tokens(images: torch.Tensor) -> None:
    model = make_model("vit")
    tm.patch(model, layers=(2,), keep_rate=0.5)
    with torch.no_grad():
        before = model(images)
    add_multiscale(model, downsample_blocks=2)
    lengths = []
    original = torch.nn.functional.scaled_dot_product_attention

    def spy(q, *args, **kwargs):
        lengths.append(q.shape[2])
        return original(q, *args, **kwargs)

    torch.nn.functional.scaled_dot_product_attention = spy
    try:
        with torch.no_grad():
            after = model(images)
    finally:
        torch.nn.functional.scaled_dot_product_attention = original
    # blocks 0, 1: high scale down-sampled to 4x4 (+ class), then the low-scale group (4x4 + class);
    # block 2 (fusion, reducing) and 3 at full and reduced length
    assert lengths == [17, 17, 17, 17, 65, 33]
    assert (after - before).abs().max() > 1e-3


def test_shapes_at_224_and_with_dynamic_image_size() -> None:
    model = timm.create_model("deit_tiny_patch16_224").eval()
    add_multiscale(model, downsample_blocks=3)
    assert model.multiscale.low_grid == (7, 7)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 1000)
    dynamic = make_model("dynamic")
    tm.patch(dynamic, layers=(1, 3), keep_rate=0.5)
    with torch.no_grad():
        expected = dynamic(torch.randn(2, 3, 40, 24))
        add_multiscale(dynamic, downsample_blocks=1)
        out = dynamic(torch.randn(2, 3, 40, 24))  # high grid 10x6, low grid 5x3
    assert out.shape == expected.shape == (2, 5)
    assert dynamic.multiscale.current_grid == (10, 6)


def test_flops_count_the_module() -> None:
    model = timm.create_model("deit_small_patch16_224")
    tm.patch(model, layers=(3, 6, 9), keep_rate=0.7)
    plain = tm.count_flops(model).total
    add_multiscale(model)
    with_module = tm.count_flops(model)
    remove_multiscale(model)
    add_multiscale(model, downsample_blocks=3)
    with_eq6 = tm.count_flops(model)
    # by hand, per image: low embedding 49 x (3*32*32) x 384; 3 blocks over 50 low-scale tokens (qkv, proj,
    # attention, MLP, two LayerNorms); fusion convolutions on the 14x14 grid; nearest upsampling (1 flop per
    # output element in fvcore)
    d, n, grid = 384, 50, 196
    low_block = n * d * 3 * d + n * d * d + 2 * n * n * d + 2 * n * d * 4 * d + 2 * 5 * n * d
    fusion = grid * d * (d + 25 + 49 + d + 9) + grid * d
    assert with_module.total - plain == 49 * 3 * 32 * 32 * d + 3 * low_block + fusion
    assert abs(with_module.analytic / with_module.total - 1) < 0.01
    assert abs(with_eq6.analytic / with_eq6.total - 1) < 0.01
    assert round(with_module.gflops, 2) == 3.40 and round(with_eq6.gflops, 2) == 3.06  # paper: 3.1 with module


def test_gradients_reach_every_new_parameter_after_one_step(images: torch.Tensor) -> None:
    model = make_model("vit").train()
    tm.patch(model, layers=(2,), keep_rate=0.5)
    add_multiscale(model)
    new = dict(model.multiscale.named_parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    labels = torch.tensor([0, 1, 2])
    grads = []
    for _ in range(2):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        grads.append({name: p.grad.abs().sum().item() for name, p in new.items()})
        optimizer.step()
    # at zero init only the zero-initialised last layers (and everything upstream of PEG) learn ...
    assert grads[0]["lka.conv1.weight"] > 0 and grads[0]["peg.weight"] > 0
    assert grads[0]["low_proj.weight"] == 0 and grads[0]["lka.conv0.weight"] == 0
    # ... and after one step the gradient reaches every new parameter
    assert all(value > 0 for value in grads[1].values()), grads[1]


def test_state_dict_round_trip_and_composition_in_either_order(images: torch.Tensor) -> None:
    source = make_model("layerscale_deit3")
    add_multiscale(source, low_patch_size=16)
    with torch.no_grad():
        for param in source.multiscale.parameters():
            param.add_(torch.randn_like(param) * 0.1)  # as if fine-tuned
    tm.patch(source, layers=(1, 3), keep_rate=0.5)
    state = source.state_dict()
    assert any(key.startswith("multiscale.low_proj") for key in state)

    target = make_model("layerscale_deit3", seed=7)
    tm.patch(target, layers=(1, 3), keep_rate=0.5)  # patched first, module second
    add_multiscale(target, low_patch_size=16)
    target.load_state_dict(state, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(target(images), source(images))
        for clone in (copy.deepcopy(source), pickle.loads(pickle.dumps(source))):
            torch.testing.assert_close(clone(images), source(images))


def test_remove_restores_the_model(images: torch.Tensor) -> None:
    model = make_model("vit")
    with torch.no_grad():
        before = model(images)
    keys = set(model.state_dict())
    add_multiscale(model, downsample_blocks=1)
    remove_multiscale(model)
    assert set(model.state_dict()) == keys and not has_multiscale(model)
    assert "forward" not in model.blocks[0].__dict__ and "forward_features" not in model.__dict__
    assert "forward_intermediates" not in model.__dict__
    with torch.no_grad():
        assert torch.equal(model(images), before)


def test_low_patch_default_is_twice_the_patch() -> None:
    model = make_model("vit")
    add_multiscale(model)
    assert model.multiscale.low_patch_size == 8 and model.multiscale.low_grid == (4, 4)
    assert math.prod(model.multiscale.low_pos.shape) == 16 * 32


@pytest.mark.parametrize(
    ("setup", "kwargs", "error", "message"),
    [
        (None, dict(low_patch_size=4), ValueError, "larger than the patch size 4"),
        (None, dict(downsample_blocks=2, fuse_at=1), ValueError, r"downsample_blocks must be in 0\.\.1"),
        (None, dict(fuse_at=9), ValueError, "fuse_at must be a block index"),
        ((0, 2), dict(fuse_at=1), ValueError, r"blocks \[0\] reduce tokens before the fusion"),
        (None, dict(downsample_blocks=1.0), TypeError, "downsample_blocks must be an int"),
    ],
)
def test_bad_input(setup, kwargs, error, message) -> None:
    model = make_model("vit")
    if setup:
        tm.patch(model, layers=setup, keep_rate=0.5)
    keys = set(model.state_dict())
    with pytest.raises(error, match=message):
        add_multiscale(model, **kwargs)
    assert set(model.state_dict()) == keys and "forward_features" not in model.__dict__


def test_unsupported_models() -> None:
    with pytest.raises(TypeError, match="supports timm VisionTransformer"):
        add_multiscale(timm.create_model("resnet18"))
    model = make_model("vit")
    add_multiscale(model)
    with pytest.raises(ValueError, match="already has a multi-scale module"):
        add_multiscale(model)


def test_the_finetune_loop_trains_every_new_parameter() -> None:
    from torch.utils.data import DataLoader, TensorDataset

    model = make_model("vit").train()
    tm.patch(model, layers=(1, 3), keep_rate=0.5)
    add_multiscale(model, downsample_blocks=1)
    before = {name: p.detach().clone() for name, p in model.multiscale.named_parameters()}
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(
        torch.randn(16, 3, 32, 32, generator=generator), torch.randint(0, 5, (16,), generator=generator)
    )
    tm.finetune(model, DataLoader(data, batch_size=4), epochs=1, lr=1e-2, lr_warmup=0.0, progress=False)
    unchanged = [name for name, p in model.multiscale.named_parameters() if torch.equal(p, before[name])]
    assert unchanged == []
    assert tm.is_patched(model) and has_multiscale(model)


def test_activation_checkpointing_is_honoured(images: torch.Tensor, monkeypatch) -> None:
    grads, calls = [], []
    original = torch.utils.checkpoint.checkpoint

    def counting(function, *args, **kwargs):
        calls.append(1)
        return original(function, *args, **kwargs)

    monkeypatch.setattr("tokenmerge_patch.multiscale.checkpoint", counting)
    for checkpointing in (False, True):
        model = make_model("vit").train()
        tm.patch(model, layers=(2,), keep_rate=0.5)
        add_multiscale(model, downsample_blocks=1)
        with torch.no_grad():
            for param in model.multiscale.parameters():
                param.add_(0.05)  # leave the zero init, so every path carries gradient
        model.set_grad_checkpointing(checkpointing)
        model(images).square().sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert len(calls) == 4 + 2  # every block, and the low-scale pass through the two blocks before the fusion
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


def test_a_foreign_forward_features_is_not_replaced() -> None:
    model = make_model("vit")
    model.forward_features = lambda x: x
    with pytest.raises(TypeError, match="instance-level forward_features"):
        add_multiscale(model)
    assert not has_multiscale(model)


def test_forward_intermediates_is_refused_while_the_module_is_on(images: torch.Tensor) -> None:
    """timm's forward_intermediates runs the single-scale path: with the module on it would skip the fusion, so it is
    refused (patched or not, in either order); after remove_multiscale it is timm's own again."""
    for order in ("unpatched", "patch first", "module first"):
        model = make_model("vit")
        if order == "patch first":
            tm.patch(model, layers=(1, 3), keep_rate=0.5)
        add_multiscale(model, low_patch_size=16)
        if order == "module first":
            tm.patch(model, layers=(1, 3), keep_rate=0.5)
        for fmt in ("NCHW", "NLC"):
            with pytest.raises(ValueError, match="skips the multi-scale fusion"):
                model.forward_intermediates(images, output_fmt=fmt)
        remove_multiscale(model)
        tm.unpatch(model)
        with torch.no_grad():
            _, maps = model.forward_intermediates(images)
            reference = make_model("vit").forward_intermediates(images)[1]
        assert all(torch.equal(a, b) for a, b in zip(maps, reference, strict=True))
