"""Defects found by trying the library as a new user would (the reliability issue): budgets near 1 and below the
reachable, timm patch dropout, counting that must not touch the trace, calibration that lands where the rule
does, non-finite images, wrapped models, and one input size for every entry point."""

from __future__ import annotations

import signal
from contextlib import contextmanager

import pytest
import timm
import torch
from tiny_models import model_snapshot

import tokenmerge_patch as tm
from tokenmerge_patch.budget import TOLERANCE, fill_to

pytestmark = pytest.mark.usefixtures("one_thread")


@contextmanager
def deadline(seconds: int):
    """Fail instead of hanging (the budget fill once looped forever)."""

    def expired(*_: object) -> None:
        raise TimeoutError(f"did not return within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def small_vit(**kwargs: object) -> torch.nn.Module:
    torch.manual_seed(0)
    options = dict(img_size=64, depth=6, embed_dim=48, num_heads=2, num_classes=10) | kwargs
    return timm.create_model("vit_tiny_patch16_224", **options).eval()


def fraction_of(model: torch.nn.Module, input_size: tuple[int, int, int] | None = None) -> float:
    patched = tm.count_flops(model, input_size).total
    config = tm.patch_config(model)
    tm.unpatch(model)
    full = tm.count_flops(model, input_size).total
    tm.patch(model, config=config)
    return patched / full


def test_fill_never_raises_a_count_past_the_tokens_a_block_gets() -> None:
    # an estimate that never exceeds the aim: the fill used to raise the first count forever
    assert fill_to([5, 3, 1], lambda counts: 0.0, aim=1.0, limit=8) == [8, 8, 8]


@pytest.mark.parametrize("flops", [0.9, 0.95, 0.97, 0.99])
def test_budgets_near_one_land_promptly(flops: float) -> None:
    model = small_vit()
    with deadline(120):
        tm.patch(model, flops=flops)
    assert flops - TOLERANCE <= fraction_of(model) <= flops


@pytest.mark.slow
@pytest.mark.parametrize("flops", [0.96, 0.99])
def test_deit_tiny_budgets_near_one_land(flops: float) -> None:
    model = timm.create_model("deit_tiny_patch16_224").eval()
    with deadline(300):
        tm.patch(model, flops=flops)
    assert flops - TOLERANCE <= fraction_of(model) <= flops


def test_an_unreachable_budget_names_the_value_given_and_the_smallest_reachable() -> None:
    model = small_vit()
    before = model_snapshot(model)
    with deadline(120), pytest.raises(ValueError, match=r"flops=0\.001 is below the smallest budget") as error:
        tm.patch(model, flops=0.001)
    smallest = float(str(error.value).split("(")[2].split(" of the FLOPs")[0])
    assert f"choose flops >= {smallest + 0.01:.2f}" in str(error.value)
    assert model_snapshot(model)[0].keys() == before[0].keys() and tm.patch_config(model) is None
    tm.patch(model, flops=round(smallest + 0.02, 2))  # just above it lands
    assert fraction_of(model) >= smallest


def test_calibrate_lands_near_one_and_with_bipartite() -> None:
    model = small_vit()
    images = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    for method, flops in (("bipartite", 0.7), ("bipartite", 0.75), ("bipartite", 0.8), ("merge", 0.97)):
        with deadline(300):
            plan = tm.calibrate(model, images, flops=flops, method=method, progress=False, max_block_runs=30)
        assert not tm.is_patched(model)
        tm.patch(model, config=plan)
        assert flops - TOLERANCE <= fraction_of(model) <= flops, (method, flops)
        tm.unpatch(model)


@pytest.mark.parametrize("bad", ["nan", "inf_image"])
def test_calibrate_refuses_non_finite_images_naming_batch_and_image(bad: str) -> None:
    model = tm.patch(small_vit(), keep_rate=0.5)
    images = torch.randn(8, 3, 64, 64)
    if bad == "nan":
        data: object = torch.full((8, 3, 64, 64), float("nan"))
        where = "batch 0, image 0"
    else:
        images[5] = float("inf")
        data = [torch.randn(4, 3, 64, 64), images]
        where = "batch 1, image 5"
    before = model_snapshot(model)
    with pytest.raises(ValueError, match=f"data {where} holds non-finite values"):
        tm.calibrate(model, data, flops=0.7, progress=False)
    _, modules, config = model_snapshot(model)
    assert modules == before[1] and config == before[2]


def test_counting_leaves_the_trace_of_the_last_forward() -> None:
    model = tm.patch(small_vit(), keep_rate=0.7)
    x = torch.randn(8, 3, 64, 64)
    with torch.no_grad():
        y = model.forward_features(x)
    before = {layer: (r.tokens_out, r.sizes.clone()) for layer, r in tm.reduction_trace(model).items()}
    tm.count_flops(model)
    tm.calibrate(model, x, flops=0.7, progress=False, max_block_runs=12)  # re-installs the patch it found
    after = tm.reduction_trace(model)
    assert after.keys() == before.keys()
    for layer, (tokens, sizes) in before.items():
        assert type(after[layer].tokens_out) is int and after[layer].tokens_out == tokens
        assert torch.equal(after[layer].sizes, sizes)
    last = max(after)
    dense = tm.unmerge(y.detach(), after[last], num_prefix=1)  # the copy needs the trace: it must be this forward's
    assert dense.shape == (8, 1 + 16, 48)


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "vit_small_patch16_rope_224"])
@pytest.mark.parametrize("pool", ["avg", "token"])
def test_timm_patch_dropout_is_understood_by_the_records(name: str, pool: str) -> None:
    torch.manual_seed(0)
    model = timm.create_model(name, img_size=64, depth=4, global_pool=pool, patch_drop_rate=0.5, num_classes=5)
    model.train()
    x = torch.randn(4, 3, 64, 64)
    torch.manual_seed(1)
    reference = model(x)
    tm.patch(model, keep_rate=1.0)
    torch.manual_seed(1)
    torch.testing.assert_close(model(x), reference, rtol=0, atol=0)  # keep 1.0: exactly the unpatched model
    tm.patch(model, keep_rate=0.5)
    torch.manual_seed(1)
    out = model(x)
    out.sum().backward()
    kept = 1 + 8  # class token + the half of 16 patches patch dropout keeps
    trace = tm.reduction_trace(model)
    assert next(iter(trace.values())).tokens_in == kept
    for record in trace.values():
        # sizes count the patches patch dropout kept; sources map each of them to its token
        torch.testing.assert_close(record.sizes.sum(dim=1), torch.full((4,), float(kept)))
        assert record.source.shape == (4, 8) and bool((record.source >= 1).all())


def test_finetune_with_patch_dropout_and_a_keep_rate_warmup() -> None:
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=64, depth=4, global_pool="avg", patch_drop_rate=0.5)
    teacher = timm.create_model("vit_tiny_patch16_224", img_size=64, depth=4, global_pool="avg").eval()
    teacher.load_state_dict(model.state_dict())
    tm.patch(model, keep_rate=0.5)
    loader = [torch.randn(4, 3, 64, 64) for _ in range(2)]
    history = tm.finetune(model, loader, teacher=teacher, epochs=1, keep_rate_warmup=0.5, progress=False)
    assert len(history) == 1 and history[0].train_loss == history[0].train_loss  # finite, not NaN


def test_a_compiled_model_is_patched_through_its_wrapper() -> None:
    model = small_vit()
    compiled = torch.compile(model)
    x = torch.randn(2, 3, 64, 64)
    assert tm.patch(compiled, keep_rate=0.5) is compiled
    assert tm.is_patched(compiled) and tm.is_patched(model)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)  # the wrapper runs the patch
    assert tm.patch_config(compiled) == tm.patch_config(model)
    assert tm.count_flops(compiled).total == tm.count_flops(model).total
    tm.unpatch(compiled)
    assert not tm.is_patched(model)


def test_data_parallel_is_refused_naming_its_module() -> None:
    model = small_vit()
    wrapped = torch.nn.DataParallel(model)
    before = model_snapshot(model)
    with pytest.raises(TypeError, match=r"nn\.DataParallel is not supported.*model\.module"):
        tm.patch(wrapped)
    assert model_snapshot(model)[2] is None and model_snapshot(model)[1] == before[1]


def test_describe_is_the_one_input_size_of_every_entry_point() -> None:
    model = timm.create_model("vit_tiny_patch16_224", img_size=48, patch_size=8, depth=4, dynamic_img_size=True)
    info = tm.describe(model)
    assert info.input_size == (3, 48, 48) and info.num_prefix == 1 and info.depth == 4
    # count_flops' default is the model's own size, the size flops= budgets at
    assert tm.count_flops(model).total == tm.count_flops(model, (3, 48, 48)).total
    assert tm.count_flops(model).total < tm.count_flops(model, (3, 96, 96)).total
    with pytest.raises(ValueError, match="input_size= is the size a flops= budget is counted at"):
        tm.patch(model, keep_rate=0.5, input_size=(3, 96, 96))
