"""Vision-language models (tiny random LLaVA and PaliGemma, built offline): the language model reads K image tokens
per image, keep 1.0 and unpatch are exact, generate works, a prompt with the old count gets a clear error, the
processor emits the new count, the language model is never touched, and the FLOPs of the whole VLM."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import assert_untouched, model_snapshot, perturb

import tokenmerge_patch as tm

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

IMAGE = 99  # the image placeholder token id
VISION = dict(image_size=32, patch_size=4, hidden_size=32, num_hidden_layers=4, num_attention_heads=2)
TEXT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100)


def llava(layer: int = -2, strategy: str = "default", cls=None) -> torch.nn.Module:
    cls = cls or transformers.LlavaForConditionalGeneration
    config = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(**VISION, intermediate_size=64),
        text_config=transformers.LlamaConfig(**TEXT, num_key_value_heads=1, pad_token_id=0, bos_token_id=1),
        image_token_id=IMAGE,
        vision_feature_layer=layer,
        vision_feature_select_strategy=strategy,
    )
    torch.manual_seed(0)
    return perturb(cls(config), 0)


def paligemma() -> torch.nn.Module:
    config = transformers.PaliGemmaConfig(
        vision_config=dict(**VISION, intermediate_size=64, model_type="siglip_vision_model"),
        text_config=dict(**TEXT, num_key_value_heads=1, head_dim=16, model_type="gemma", pad_token_id=0),
        image_token_index=IMAGE,
        projection_dim=32,
        hidden_size=32,
        vocab_size=100,
    )
    torch.manual_seed(0)
    return perturb(transformers.PaliGemmaForConditionalGeneration(config), 0)


def prompt(images: int, per_image: int, text: int = 5) -> torch.Tensor:
    """A prompt per image: the image's tokens, then a few text tokens."""
    row = [IMAGE] * per_image + list(range(3, 3 + text))
    return torch.tensor([row] * images)


def pixels(images: int = 2) -> torch.Tensor:
    return torch.randn(images, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def language_model_state(model: torch.nn.Module) -> dict:
    """Everything of the language model a patch could change: parameters and every module's instance attributes."""
    inner = model.model.language_model
    return {
        "params": {k: v.clone() for k, v in inner.state_dict().items()},
        "attrs": {name: sorted(m.__dict__) for name, m in inner.named_modules()},
        "head": sorted(model.lm_head.__dict__),
    }


@pytest.mark.parametrize("factory", [llava, paligemma])
def test_keep_one_gives_the_unpatched_logits_and_unpatch_restores(factory) -> None:
    model = factory()
    count = tm.visual_token_count(model)
    assert count == 64
    ids, images = prompt(2, count), pixels(2)
    with torch.no_grad():
        expected = model(input_ids=ids, pixel_values=images).logits
        tm.patch(model, keep_rate=1.0)
        torch.testing.assert_close(model(input_ids=ids, pixel_values=images).logits, expected, rtol=0, atol=0)
        tm.patch(model, visual_tokens=16)
        reduced = model(input_ids=prompt(2, 16), pixel_values=images).logits
        assert reduced.shape == (2, 16 + 5, 100)
        tm.unpatch(model)
        torch.testing.assert_close(model(input_ids=ids, pixel_values=images).logits, expected, rtol=0, atol=0)


@pytest.mark.parametrize("factory", [llava, paligemma])
@pytest.mark.parametrize("method", ["merge", "drop", "bipartite"])
def test_the_language_model_reads_k_features_per_image(factory, method: str) -> None:
    model = factory()
    before = language_model_state(model)
    tm.patch(model, visual_tokens=36, method=method)
    assert tm.visual_token_count(model) == 36
    with torch.no_grad():
        features = model.get_image_features(pixel_values=pixels(2)).pooler_output
        out = model(input_ids=prompt(2, 36), pixel_values=pixels(2))
    shapes = [tuple(f.shape) for f in features]
    assert shapes == [(36, 32), (36, 32)]
    assert out.logits.shape == (2, 41, 100)
    after = language_model_state(model)
    assert after["attrs"] == before["attrs"] and after["head"] == before["head"]
    assert all(torch.equal(after["params"][k], v) for k, v in before["params"].items())


def test_scores_follow_the_tower() -> None:
    assert tm.patch_config(tm.patch(llava(), visual_tokens=16)).score == "cls"  # CLIP has a class token
    assert tm.patch_config(tm.patch(paligemma(), visual_tokens=16)).score == "received"  # SigLIP has none


@pytest.mark.parametrize("layer, strategy, full", [(-2, "default", 64), (-1, "default", 64), (-2, "full", 65)])
def test_the_layer_and_strategy_the_llm_reads_are_honoured(layer: int, strategy: str, full: int) -> None:
    model = llava(layer, strategy)
    assert tm.visual_token_count(model) == full
    tm.patch(model, visual_tokens=20)
    config = tm.patch_config(model)
    read = layer % 5 - 1  # hidden_states[layer] leaves tower layer read
    assert config.layers == (read,)  # one reduction, in the layer the LLM reads
    with torch.no_grad():
        features = model.get_image_features(pixel_values=pixels(1)).pooler_output
        hidden = model.model.vision_tower(pixels(1), output_hidden_states=True).hidden_states
    assert features[0].shape[0] == 20
    assert hidden[layer].shape[1] == 20 + (strategy == "default")  # the class token is still in the tower


def test_reducing_earlier_reaches_k_at_the_read_layer_and_saves_tower_flops() -> None:
    model = llava()
    one_shot = tm.count_flops(tm.patch(model, visual_tokens=16)).total
    tm.patch(model, visual_tokens=16, layers=(0, 1, 2))
    assert tm.visual_token_count(model) == 16
    with torch.no_grad():
        assert model.get_image_features(pixel_values=pixels(1)).pooler_output[0].shape[0] == 16
    assert tm.count_flops(model).total < one_shot


def test_a_prompt_with_the_old_count_gets_a_clear_error() -> None:
    model = tm.patch(llava(), visual_tokens=16)
    with torch.no_grad(), pytest.raises(ValueError, match=r"visual_token_count.*|patch_processor") as error:
        model(input_ids=prompt(1, 64), pixel_values=pixels(1))
    assert "64 image tokens" in str(error.value) and "16 per image" in str(error.value)


@pytest.mark.parametrize("factory", [llava, paligemma])
def test_generate_with_a_kv_cache_and_two_images(factory) -> None:
    model = factory()
    images = pixels(2)
    with torch.no_grad():
        expected = model.generate(input_ids=prompt(2, 64), pixel_values=images, max_new_tokens=4, do_sample=False)
        tm.patch(model, keep_rate=1.0)
        same = model.generate(input_ids=prompt(2, 64), pixel_values=images, max_new_tokens=4, do_sample=False)
        tm.patch(model, visual_tokens=16)
        reduced = model.generate(input_ids=prompt(2, 16), pixel_values=images, max_new_tokens=4, do_sample=False)
    assert torch.equal(same, expected)
    assert reduced.shape == (2, 16 + 5 + 4)


def test_bf16() -> None:
    model = llava().to(torch.bfloat16)
    tm.patch(model, visual_tokens=16)
    with torch.no_grad():
        logits = model(input_ids=prompt(2, 16), pixel_values=pixels(2).to(torch.bfloat16)).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(visual_tokens=65), ValueError, r"visual_tokens must be in \[1, 64\]"),
        (dict(visual_tokens=0), ValueError, r"visual_tokens must be in \[1, 64\]"),
        (dict(visual_tokens=2.5), TypeError, "visual_tokens must be an int"),
        (dict(visual_tokens=16, keep_rate=0.5), ValueError, "without keep_rate"),
        (dict(visual_tokens=16, flops=0.5), ValueError, "without flops"),
        (dict(visual_tokens=16, layers=(3,)), ValueError, "at or before 2"),
        (dict(visual_tokens=4, method="bipartite"), ValueError, "spread it over more layers"),
        (dict(visual_tokens=16, dense=True), ValueError, "dense=True keeps every patch token"),
    ],
)
def test_bad_visual_tokens_are_refused_and_the_model_untouched(kwargs: dict, error: type, match: str) -> None:
    model = tm.patch(llava(), visual_tokens=32)
    before = model_snapshot(model)
    with pytest.raises(error, match=match):
        tm.patch(model, **kwargs)
    assert_untouched(model, before)
    assert tm.visual_token_count(model) == 32


def test_calibrate_refuses_a_vlm_clearly() -> None:
    model = llava()
    with pytest.raises(TypeError, match="patch it with visual_tokens"):
        tm.calibrate(model, pixels(4), flops=0.7)
    assert not tm.is_patched(model)


def test_visual_tokens_on_a_plain_vit_is_refused() -> None:
    model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION, intermediate_size=64))
    with pytest.raises(ValueError, match="applies to vision-language models"):
        tm.patch(model, visual_tokens=16)
    assert not tm.is_patched(model)


def test_several_read_layers_and_grid_bound_families_are_refused() -> None:
    with pytest.raises(ValueError, match="reads several tower layers"):
        tm.patch(llava(layer=[-2, -3]), visual_tokens=16)
    config = transformers.LlavaNextConfig(
        vision_config=transformers.CLIPVisionConfig(**VISION, intermediate_size=64),
        text_config=transformers.LlamaConfig(**TEXT),
        image_grid_pinpoints=[[32, 32]],
    )
    model = transformers.LlavaNextForConditionalGeneration(config)
    before = model_snapshot(model)
    with pytest.raises(TypeError, match="packs each crop's features back onto its patch grid"):
        tm.patch(model, visual_tokens=16)
    assert_untouched(model, before)


# -- processors -------------------------------------------------------------------------------------------------
def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<pad>", "<s>", "</s>", "<unk>", "describe", "the", "image", "a", "cat", "USER:", "ASSISTANT:"]
    vocab = {word: index for index, word in enumerate(words)} | {"<image>": IMAGE}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.add_tokens(["<image>"], special_tokens=True)  # split out of "<image><image>..."
    return tokenizer


def llava_processor(size: int = 32, patch: int = 4):
    crop = {"height": size, "width": size}
    images = transformers.CLIPImageProcessor(size={"shortest_edge": size}, crop_size=crop)
    return transformers.LlavaProcessor(
        image_processor=images,
        tokenizer=_tokenizer(),
        patch_size=patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


def paligemma_processor():
    images = transformers.SiglipImageProcessor(size={"height": 32, "width": 32})
    images.image_seq_length = 64
    return transformers.PaliGemmaProcessor(image_processor=images, tokenizer=_tokenizer())


def _photos(count: int) -> list[np.ndarray]:
    generator = np.random.default_rng(0)
    return [generator.integers(0, 255, (40, 48, 3), dtype=np.uint8) for _ in range(count)]


@pytest.mark.parametrize("factory, make_processor", [(llava, llava_processor), (paligemma, paligemma_processor)])
def test_the_processor_emits_the_patched_count(factory, make_processor) -> None:
    model, processor = factory(), make_processor()
    text = ["<image> describe the image"] * 2
    unpatched = processor(images=_photos(2), text=text, return_tensors="pt")
    assert int((unpatched["input_ids"] == IMAGE).sum()) == 2 * 64
    tm.patch(model, visual_tokens=24)
    assert tm.patch_processor(processor, model) is processor
    inputs = processor(images=_photos(2), text=text, return_tensors="pt")
    assert int((inputs["input_ids"] == IMAGE).sum()) == 2 * 24
    with torch.no_grad():
        out = model(**{k: v for k, v in inputs.items() if k != "labels"})
        generated = model.generate(**{k: v for k, v in inputs.items() if k != "labels"}, max_new_tokens=2)
    assert out.logits.shape[:2] == inputs["input_ids"].shape and generated.shape[0] == 2
    tm.unpatch(model)
    tm.unpatch_processor(processor)
    again = processor(images=_photos(2), text=text, return_tensors="pt")
    assert torch.equal(again["input_ids"], unpatched["input_ids"])


def test_patch_processor_refuses_what_it_cannot_patch() -> None:
    with pytest.raises(TypeError, match="processor must be the model's Hugging Face processor"):
        tm.patch_processor(object(), llava())
    with pytest.raises(TypeError, match="expected a vision-language model"):
        tm.patch_processor(llava_processor(), transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION)))


# -- FLOPs ------------------------------------------------------------------------------------------------------
def test_flops_of_the_whole_vlm_fall_with_the_image_tokens() -> None:
    model = llava()
    full = tm.count_vlm_flops(model, text_tokens=10)
    assert (full.image_tokens, full.images, full.text_tokens) == (64, 1, 10)
    tm.patch(model, visual_tokens=16)
    reduced = tm.count_vlm_flops(model, text_tokens=10)
    assert reduced.image_tokens == 16 and reduced.prefill < full.prefill and reduced.total < full.total
    # the analytic count of the language model's prefill agrees with fvcore's (norms, rotary, softmax: no MACs)
    config = model.config.text_config
    for counted in (full, reduced):
        analytic = tm.llm_prefill_flops(config, counted.text_tokens + counted.image_tokens)
        assert abs(analytic / counted.prefill - 1) < 0.01
    two = tm.count_vlm_flops(model, text_tokens=10, images=2)
    assert two.image_side == 2 * reduced.image_side and two.prefill > reduced.prefill
