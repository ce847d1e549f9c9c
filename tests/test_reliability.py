"""Silent wrong results and late failures found by using the library as a new user would: per-forward
bookkeeping that belongs to its own forward, empty batches, cleanup after an exception, numpy numbers."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch
from tiny_models import make_model, needs_attn_mask

import tokenmerge_patch as tm
from tokenmerge_patch.records import record_of

OPTIONS = [
    dict(size_weighted=False, prop_attn=False),
    dict(size_weighted=True, prop_attn=False),
    dict(size_weighted=False, prop_attn=True),
    dict(),  # the defaults
]


def _batches() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    return torch.randn(3, 3, 32, 32, generator=generator), torch.randn(3, 3, 32, 32, generator=generator)


def test_forward_head_pools_with_the_sizes_of_its_own_features() -> None:
    model = tm.patch(make_model("avg_pool"), layers=(1, 2), keep_rate=0.4)
    x1, x2 = _batches()
    with torch.no_grad():
        expected = model(x1)
        f1 = model.forward_features(x1)
        model.forward_features(x2)  # same batch size: the old shared slot would have been read silently
        torch.testing.assert_close(model.forward_head(f1), expected)
        model.forward_features(x2[:2])  # another batch size: it used to fall back to an unweighted mean
        torch.testing.assert_close(model.forward_head(f1), expected)
        # an unweighted mean is really different here, so the assertions above can fail
        sizes = record_of(f1)[0][:, 1:, None]
        weighted = (f1[:, 1:] * sizes).sum(1) / sizes.sum(1)
        assert not torch.allclose(weighted, f1[:, 1:].mean(1), atol=1e-3)


def test_forward_head_refuses_reduced_tokens_whose_sizes_were_lost() -> None:
    model = tm.patch(make_model("avg_pool"), layers=(1, 2), keep_rate=0.4)
    with torch.no_grad():
        features = model.forward_features(_batches()[0])
        with pytest.raises(ValueError, match="without their merge sizes"):
            model.forward_head(features.clone())
        # unreduced tokens (keep 1) need no sizes
        tm.patch(model, layers=(1, 2), keep_rate=1.0)
        model.forward_head(model.forward_features(_batches()[0]).clone())


def test_a_tagged_feature_tensor_saves_and_loads_with_weights_only() -> None:
    model = tm.patch(make_model("avg_pool"), layers=(1, 2), keep_rate=0.4)
    with torch.no_grad():
        features = model.forward_features(_batches()[0])
    buffer = io.BytesIO()
    torch.save(features, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    torch.testing.assert_close(model.forward_head(loaded), model.forward_head(features))


@pytest.mark.parametrize("options", OPTIONS, ids=["paper", "size_weighted", "prop_attn", "defaults"])
@needs_attn_mask
def test_a_reentrant_call_from_a_block_hook_changes_nothing(options: dict) -> None:
    model = tm.patch(make_model("avg_pool"), layers=(1, 2), keep_rate=0.4, **options)
    x1, x2 = _batches()
    with torch.no_grad():
        expected = model(x1)
        trace = {layer: (r.tokens_in, r.tokens_out, r.sizes.clone()) for layer, r in tm.reduction_trace(model).items()}
        inner = []
        for block_index in (1, 2, 3):  # after the first reduction, between the two, on the last block
            calls = []

            def reenter(_module, _args, _output, calls=calls):
                if not calls:  # once, or the inner call would re-enter again
                    calls.append(1)
                    inner.append(model(x2[:2]))

            handle = model.blocks[block_index].register_forward_hook(reenter)
            try:
                torch.testing.assert_close(model(x1), expected)
            finally:
                handle.remove()
            now = tm.reduction_trace(model)  # describes the outer call, not the inner one
            assert {layer: (r.tokens_in, r.tokens_out) for layer, r in now.items()} == {
                layer: t[:2] for layer, t in trace.items()
            }
            for layer, record in now.items():
                torch.testing.assert_close(record.sizes, trace[layer][2])
        torch.testing.assert_close(inner[0], model(x2[:2]))


@needs_attn_mask
def test_a_reentrant_call_from_inside_the_attention_works() -> None:
    model = tm.patch(make_model("vit"), layers=(1, 2), keep_rate=0.4)
    x1, x2 = _batches()
    with torch.no_grad():
        expected, inner_expected = model(x1), model(x2)
        inner, calls = [], []

        def reenter(_module, _args, _output):
            if not calls:  # once: the inner call runs this hook too
                calls.append(1)
                inner.append(model(x2))

        handle = model.blocks[2].attn.register_forward_hook(reenter)  # while block 2's q/k taps are armed
        try:
            torch.testing.assert_close(model(x1), expected)
        finally:
            handle.remove()
        torch.testing.assert_close(inner[0], inner_expected)


def test_tokens_that_lost_their_record_between_blocks_are_refused() -> None:
    model = tm.patch(make_model("vit"), layers=(1, 2), keep_rate=0.4)
    handle = model.blocks[1].register_forward_hook(lambda _m, _a, out: out.clone())  # a hook returning a new tensor
    with torch.no_grad(), pytest.raises(RuntimeError, match="without the merge record"):
        model(_batches()[0])
    handle.remove()
    with torch.no_grad():
        model(_batches()[0])


@pytest.mark.parametrize("method", ["merge", "drop", "fuse", "bipartite"])
@pytest.mark.parametrize("flavour", ["vit", "avg_pool", "distilled"])
def test_an_empty_batch_gives_an_empty_result(method: str, flavour: str) -> None:
    model = make_model(flavour)
    with torch.no_grad():
        expected = model(torch.zeros(0, 3, 32, 32))
        tm.patch(model, layers=(1, 2), keep_rate=0.4, method=method, trace_source=True)
        out = model(torch.zeros(0, 3, 32, 32))
    assert out.shape == expected.shape == (0, 5)
    assert [r.sizes.shape[0] for r in tm.reduction_trace(model).values()] == [0, 0]


def test_an_exception_mid_forward_leaves_no_armed_tap_and_no_mixed_trace() -> None:
    model = tm.patch(make_model("vit"), layers=(1, 2), keep_rate=0.4)
    x1, x2 = _batches()
    with torch.no_grad():
        model(x1)
    before = {layer: r.sizes.clone() for layer, r in tm.reduction_trace(model).items()}

    def fail(_module, _args, _output):
        raise KeyError("boom")

    handle = model.blocks[2].attn.register_forward_hook(fail)  # inside block 2's armed attention
    with torch.no_grad(), pytest.raises(KeyError, match="boom"):
        model(x2)
    handle.remove()
    for block in (model.blocks[1], model.blocks[2]):
        for tap in block.forward.taps:
            assert tap.slots == []  # nothing armed, no tensor (or autograd graph) held
    after = tm.reduction_trace(model)  # still the last forward that completed, not a mix of two
    assert set(after) == set(before)
    for layer, record in after.items():
        torch.testing.assert_close(record.sizes, before[layer])
    with torch.no_grad():
        model(x2)  # and the model works on


def test_numpy_integers_are_accepted_everywhere() -> None:
    model = make_model("vit")
    tm.patch(model, layers=[np.int64(1), np.int32(2)], keep_rate=np.float32(0.5), seed=np.int64(3))
    assert tm.patch_config(model).seed == 3 and type(tm.patch_config(model).seed) is int
    report = tm.count_flops(model, (np.int64(3), np.int64(32), np.int64(32)))
    assert report.total == tm.count_flops(model, (3, 32, 32)).total


def test_hf_checkpointed_layers_do_not_checkpoint_without_grad() -> None:
    pytest.importorskip("transformers")
    from test_hf import make_hf

    model = make_hf("ViTForImageClassification")
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    model.train()
    tm.patch(model, layers=(1, 2), keep_rate=0.5)
    calls = []
    for layer in model.vit.layers:
        original = layer._gradient_checkpointing_func

        def spy(*args, original=original, **kwargs):
            calls.append(torch.is_grad_enabled())
            return original(*args, **kwargs)

        layer._gradient_checkpointing_func = spy
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "None of the inputs have requires_grad=True" would fail here
        with torch.no_grad():
            model(_batches()[0])
    assert calls == []  # HF's own wrapper checks torch.is_grad_enabled(); so do the reducing layers
    loss = model(_batches()[0]).logits.sum()  # with grad every layer still checkpoints, and it trains
    loss.backward()
    assert calls == [True] * 4 and model.classifier.weight.grad is not None
