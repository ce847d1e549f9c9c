"""heal(): it moves the student toward its teacher on images it never saw, keeps the plan and FLOPs, is deterministic,
keeps the best held-out state (the model as it was when nothing helps), trains only what ``trainable`` names, honours
a time budget, refuses bad input before touching anything, and runs on Hugging Face and open_clip models. Checked
against hand computations of KL and agreement, on tiny random models."""

from __future__ import annotations

import copy
import math
import time

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from tiny_models import TINY, assert_untouched, model_snapshot
from torch import Tensor, nn

import tokenmerge_patch as tm
from tokenmerge_patch.training.augment import Views

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models


def make(seed: int = 0, **kwargs: object) -> VisionTransformer:
    """A tiny timm ViT with weights far from init (its predictions differ from image to image)."""
    torch.manual_seed(seed)
    model = VisionTransformer(**{**TINY, **kwargs}).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.5)
    return model


def smooth(count: int, seed: int) -> Tensor:
    """Images with structure at several scales (upsampled noise), so crops and flips give other images."""
    generator = torch.Generator().manual_seed(seed)
    return F.interpolate(torch.randn(count, 3, 8, 8, generator=generator), size=32, mode="bilinear")


def shifted_teacher(model: nn.Module, seed: int = 0) -> nn.Module:
    """The unpatched model with its final norm's bias moved: a gap the norms can close."""
    teacher = copy.deepcopy(model).eval()
    with torch.no_grad():
        teacher.norm.bias.add_(torch.randn(teacher.norm.bias.shape, generator=torch.Generator().manual_seed(seed)) / 2)
    return teacher


def patched(model: nn.Module) -> nn.Module:
    return tm.patch(model, layers=(1, 2), keep_rate=0.5)


def kl_and_agreement(student: nn.Module, teacher: nn.Module, images: Tensor) -> tuple[float, float]:
    """KL(teacher || student) per image and top-1 agreement, written out."""
    with torch.no_grad():
        log_t, log_s = teacher(images).log_softmax(-1), student(images).log_softmax(-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1).mean().item()
    return kl, (log_t.argmax(-1) == log_s.argmax(-1)).float().mean().item()


def state(model: nn.Module) -> dict[str, Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def test_moves_the_student_toward_its_teacher_on_unseen_images() -> None:
    model = make()
    teacher = shifted_teacher(model)
    patched(model)
    unseen = smooth(128, seed=2)
    before = kl_and_agreement(model, teacher, unseen)
    report = tm.heal(model, smooth(64, seed=1), teacher=teacher, steps=20, batch_size=16, progress=False)
    after = kl_and_agreement(model, teacher, unseen)
    assert after[0] < 0.7 * before[0] and after[1] >= before[1]
    assert report.steps == 20 and report.kept_step > 0
    assert report.divergence_after < report.divergence_before and report.agreement_after >= report.agreement_before
    assert report.train_images == 56 and report.held_out == 8 and report.metric == "top-1 agreement"


def test_the_report_measures_the_held_out_images_against_the_unpatched_twin() -> None:
    """teacher=None: the twin is the unpatched copy; every 8th image is held out and never trained on."""
    model = make()
    twin = copy.deepcopy(model)
    patched(model)
    images = smooth(40, seed=1)
    held = images[7::8]
    kl, agree = kl_and_agreement(model, twin, held)
    seen: list[Tensor] = []
    model.register_forward_pre_hook(lambda _m, args: seen.append(args[0]) if torch.is_grad_enabled() else None)
    report = tm.heal(model, images, steps=3, batch_size=8, augment=False, progress=False)
    assert report.history[0][0] == 0 and report.agreement_before == agree
    assert report.divergence_before == pytest.approx(kl, rel=1e-5)
    trained_on = torch.cat(seen)
    assert len(trained_on) == 3 * 8 and all((trained_on - image).abs().amax((1, 2, 3)).min() > 0 for image in held)
    assert not tm.is_patched(twin) and tm.patch_config(model).keep_rates == (0.5, 0.5)


@pytest.mark.parametrize("trainable", ["norms", "all"])
def test_the_plan_and_flops_stay_as_they_were(trainable: str) -> None:
    model = make()
    teacher = shifted_teacher(model)
    patched(model)
    config, flops = tm.patch_config(model), tm.count_flops(model, (3, 32, 32))
    keys, classes = list(model.state_dict()), [type(m) for m in model.modules()]
    tm.heal(model, smooth(32, 1), teacher=teacher, steps=4, batch_size=8, trainable=trainable, progress=False)
    assert tm.is_patched(model) and tm.patch_config(model) == config
    after = tm.count_flops(model, (3, 32, 32))
    assert after.total == flops.total and [b.tokens_out for b in after.blocks] == [b.tokens_out for b in flops.blocks]
    assert list(model.state_dict()) == keys and [type(m) for m in model.modules()] == classes
    assert not model.training and all(p.requires_grad and p.grad is None for p in model.parameters())


def test_deterministic_for_a_seed() -> None:
    def run(seed: int) -> tuple[dict, list]:
        model = make()
        teacher = shifted_teacher(model)
        patched(model)
        report = tm.heal(model, smooth(48, 1), teacher=teacher, steps=6, batch_size=8, seed=seed, progress=False)
        return state(model), report.history

    (first, history), (again, history_again), (other, _) = run(0), run(0), run(1)
    assert all(torch.equal(first[k], again[k]) for k in first) and history == history_again
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_a_heal_that_cannot_help_returns_the_model_as_it_was() -> None:
    """An absurd learning rate wrecks every step: no check beats the start, which is put back bit for bit."""
    model = patched(make())
    before = model_snapshot(model)
    report = tm.heal(model, smooth(32, 1), steps=4, batch_size=8, lr=1e3, progress=False)
    assert report.kept_step == 0 and report.steps == 4 and len(report.history) == 5
    assert all(d > report.divergence_before or not math.isfinite(d) for _, _, d in report.history[1:])
    assert (report.agreement_after, report.divergence_after) == (report.agreement_before, report.divergence_before)
    assert_untouched(model, before)


TRAINABLE = {
    "norms": lambda name: ".norm" in f".{name}",
    "norms+bias": lambda name: ".norm" in f".{name}" or name.endswith(".bias"),
    "all": lambda name: True,
    "predicate": lambda name: name.startswith("blocks.3."),
}


@pytest.mark.parametrize("trainable", sorted(TRAINABLE))
def test_trainable_freezes_everything_else(trainable: str) -> None:
    model = make()
    teacher = shifted_teacher(model)
    patched(model)
    model.pos_embed.requires_grad_(False)  # the user's own flags come back as they were
    model.blocks[3].norm1.weight.requires_grad_(False)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    before = state(model)
    choice = TRAINABLE["predicate"] if trainable == "predicate" else trainable
    lr = 1e-2 if trainable.startswith("norms") else 1e-3
    report = tm.heal(model, smooth(32, 1), teacher=teacher, steps=6, batch_size=8, trainable=choice, lr=lr,
                     progress=False)  # fmt: skip
    expected = [name for name, _ in model.named_parameters() if TRAINABLE[trainable](name)]
    assert list(report.trained) == expected and report.kept_step > 0
    assert report.trainable == trainable and report.trained_parameters == sum(before[n].numel() for n in expected)
    after = model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in after if name not in expected)
    assert any(not torch.equal(before[name], after[name]) for name in expected)
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())


def test_a_time_budget_is_honoured() -> None:
    model = patched(make())
    started = time.perf_counter()
    report = tm.heal(model, smooth(64, 1), seconds=1.5, batch_size=8, progress=False)
    elapsed = time.perf_counter() - started
    assert report.steps >= 1 and report.seconds <= elapsed < 1.5 + 1.0  # a step and a check of slack
    assert tm.heal(patched(make()), smooth(16, 1), seconds=60, steps=2, batch_size=8, progress=False).steps == 2
    nothing = patched(make())
    before = model_snapshot(nothing)
    assert tm.heal(nothing, smooth(16, 1), seconds=1e-6, progress=False).steps == 0
    assert_untouched(nothing, before)


class Flaky(nn.Module):
    """A teacher that is interrupted at its ``fail_at``-th call (1: the shape check, 2: the held-out targets)."""

    def __init__(self, model: nn.Module, fail_at: int) -> None:
        super().__init__()
        self.model, self.calls, self.fail_at = model, 0, fail_at

    def forward(self, images: Tensor) -> Tensor:
        self.calls += 1
        if self.calls == self.fail_at:
            raise KeyboardInterrupt
        return self.model(images)


def test_an_interrupted_heal_puts_everything_back() -> None:
    model = make()
    teacher = Flaky(shifted_teacher(model), fail_at=6)
    patched(model)
    model.cls_token.requires_grad_(False)
    before = model_snapshot(model)
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(KeyboardInterrupt):
        tm.heal(model, smooth(32, 1), teacher=teacher, steps=10, batch_size=8, lr=1e-2, progress=False)
    assert teacher.calls == 6  # three steps were taken
    assert_untouched(model, before)
    assert [p.requires_grad for p in model.parameters()] == flags


class Other(nn.Module):
    def forward(self, images: Tensor) -> Tensor:
        return images.flatten(1)[:, :7]


BAD = [
    ("empty tensor", dict(data=torch.empty(0, 3, 32, 32)), ValueError, "data holds no images: heal needs"),
    ("empty list", dict(data=[]), ValueError, "data holds no images"),
    ("a path", dict(data="images/"), TypeError, "data must be a float tensor"),
    ("wrong size", dict(data=torch.randn(8, 3, 16, 16)), ValueError, "data images are .* heal on images"),
    ("one image", dict(data=torch.randn(1, 3, 32, 32)), ValueError, "data holds 1 image.*val_data"),
    ("empty val_data", dict(val_data=[]), ValueError, "val_data holds no images"),
    ("seconds=0", dict(seconds=0), ValueError, "seconds must be"),
    ("seconds<0", dict(seconds=-5), ValueError, "seconds must be"),
    ("seconds=nan", dict(seconds=math.nan), ValueError, "seconds must be .*finite"),
    ("seconds str", dict(seconds="60"), TypeError, "seconds must be"),
    ("steps=0", dict(steps=0), ValueError, "steps must be"),
    ("steps float", dict(steps=2.5), TypeError, "steps must be"),
    ("teacher shape", dict(teacher=Other()), ValueError, r"teacher gives outputs of shape \[2, 7\] .* \[2, 5\]"),
    ("teacher str", dict(teacher="deit"), TypeError, "teacher must be a torch.nn.Module"),
    ("trainable name", dict(trainable="biases"), ValueError, "trainable must be one of"),
    ("trainable type", dict(trainable=3), TypeError, "trainable must be one of"),
    ("trainable none", dict(trainable=lambda name: False), ValueError, "trainable=.* selects none"),
    ("trainable not bool", dict(trainable=lambda name: name), TypeError, "trainable .* must return True or False"),
    ("lr=0", dict(lr=0), ValueError, "lr must be"),
    ("lr=inf", dict(lr=math.inf), ValueError, "lr must be"),
    ("augment", dict(augment="yes"), TypeError, "augment must be True or False"),
    ("batch_size", dict(batch_size=0), ValueError, "batch_size must be"),
    ("feature_loss", dict(feature_loss="l1"), ValueError, "feature_loss must be"),
    ("device", dict(device=3), TypeError, "device must be"),
    ("progress", dict(progress="no"), TypeError, "progress must be"),
    ("seed", dict(seed=1.5), TypeError, "seed must be"),
]


@pytest.mark.parametrize(("kwargs", "error", "match"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_is_refused_and_the_model_left_as_it_was(kwargs: dict, error: type, match: str) -> None:
    model = patched(make())
    before = model_snapshot(model)
    kwargs = {"data": smooth(16, 1), "steps": 2, "progress": False, **kwargs}
    with pytest.raises(error, match=match):
        tm.heal(model, kwargs.pop("data"), **kwargs)
    assert_untouched(model, before)


def test_unpatched_wrapped_or_self_taught_models_are_refused() -> None:
    model = make()
    before = model_snapshot(model)
    with pytest.raises(ValueError, match="not patched"):
        tm.heal(model, smooth(16, 1), progress=False)
    assert_untouched(model, before)
    patched(model)
    with pytest.raises(ValueError, match="not a DDP/DataParallel wrapper"):
        tm.heal(nn.DataParallel(model), smooth(16, 1), progress=False)
    with pytest.raises(ValueError, match="teacher must be a separate model"):
        tm.heal(model, smooth(16, 1), teacher=model, progress=False)
    with pytest.warns(UserWarning, match="teacher is patched"):
        tm.heal(model, smooth(16, 1), teacher=patched(make()), steps=1, progress=False)


def test_views_flip_crop_and_mix() -> None:
    images = smooth(4, 3)
    generator = torch.Generator().manual_seed(0)
    flipped = Views(scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=1.0, mix=0.0)(images, generator)
    torch.testing.assert_close(flipped, images.flip(-1), rtol=0, atol=1e-5)
    mixed = Views(scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=0.0, mix=1.0)(images, generator)
    other = images.roll(1, dims=0)
    share = (mixed - other) / (images - other)  # mixup: one share everywhere; cutmix: 0 in a box, 1 elsewhere
    assert not torch.equal(mixed, images) and share.isfinite().float().mean() > 0.99
    assert ((share - share.median()).abs() < 1e-3).all() or set(share.round().unique().tolist()) <= {0.0, 1.0}
    cropped = Views(scale=(0.25, 0.25), flip=0.0, mix=0.0)(images, generator)
    assert cropped.shape == images.shape and not torch.allclose(cropped, images)


def test_report_reads() -> None:
    model = make()
    report = tm.heal(patched(model), smooth(16, 1), steps=2, batch_size=8, progress=False)
    text = str(report)
    assert text.startswith("healed norms (") and "for 2 steps" in text and "top-1 agreement" in text


# -- Hugging Face and open_clip ---------------------------------------------------------------------------------------


def test_hugging_face_classifier_and_embedding_models() -> None:
    transformers = pytest.importorskip("transformers", minversion="5")
    common = dict(image_size=32, patch_size=4, hidden_size=32, num_hidden_layers=4, num_attention_heads=2)
    torch.manual_seed(0)
    vit = transformers.ViTForImageClassification(transformers.ViTConfig(**common, intermediate_size=64, num_labels=5))
    tm.patch(vit.eval(), keep_rate=0.5)
    config = tm.patch_config(vit)
    report = tm.heal(vit, smooth(16, 1), steps=2, batch_size=8, progress=False)
    assert report.metric == "top-1 agreement" and report.steps == 2 and tm.patch_config(vit) == config
    assert all("layernorm" in name for name in report.trained)

    dinov2 = transformers.Dinov2Model(transformers.Dinov2Config(**common, layerscale_value=0.5, use_mask_token=False))
    tm.patch(dinov2.eval(), keep_rate=0.5)
    for loss in ("cosine", "mse"):
        report = tm.heal(dinov2, smooth(16, 1), steps=2, batch_size=8, feature_loss=loss, progress=False)
        assert report.metric == "cosine similarity" and -1 <= report.agreement_after <= 1
        assert report.divergence_after <= report.divergence_before


def test_clip_model_learns_its_image_features_and_leaves_the_text_tower() -> None:
    transformers = pytest.importorskip("transformers", minversion="5")
    common = dict(image_size=32, patch_size=4, hidden_size=32, num_hidden_layers=4, num_attention_heads=2)
    text = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=50)
    text |= dict(max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    config = transformers.CLIPConfig(vision_config=dict(**common, intermediate_size=64), text_config=text,
                                     projection_dim=8)  # fmt: skip
    torch.manual_seed(0)
    clip = tm.patch(transformers.CLIPModel(config).eval(), keep_rate=0.5)
    before = state(clip)
    report = tm.heal(clip, smooth(24, 1), steps=3, batch_size=8, trainable="all", lr=1e-3, progress=False)
    assert report.metric == "cosine similarity" and report.trained
    assert all(name.startswith(("vision_model.", "visual_projection.")) for name in report.trained)
    after = clip.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in after if k.startswith(("text_model.", "text_projection.")))
    assert torch.equal(before["logit_scale"], after["logit_scale"])
    ids = torch.randint(2, 50, (2, 6))
    assert clip(input_ids=ids, pixel_values=smooth(3, 4)).logits_per_image.shape == (3, 2)  # zero-shot, as before


def test_open_clip_model_learns_its_image_features() -> None:
    open_clip = pytest.importorskip("open_clip")
    from open_clip.model import CLIP

    torch.manual_seed(0)
    text = dict(context_length=8, vocab_size=50, width=32, heads=2, layers=2)
    vision = dict(image_size=32, patch_size=4, width=32, layers=4, head_width=16, mlp_ratio=2.0)
    model = tm.patch(CLIP(embed_dim=8, vision_cfg=vision, text_cfg=text).eval(), keep_rate=0.5)
    assert open_clip is not None
    before = state(model)
    report = tm.heal(model, smooth(24, 1), steps=3, batch_size=8, progress=False)
    assert report.metric == "cosine similarity" and all(name.startswith("visual.") for name in report.trained)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in after if not k.startswith("visual."))
    assert tm.patch_config(model).keep_rates == (0.5, 0.5, 0.5)
