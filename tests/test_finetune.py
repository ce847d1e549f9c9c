"""finetune(): learning, the keep-rate schedule the model sees, exact resume, checkpoints, distillation,
bad input, and the CLI under torchrun with two CPU processes."""

from __future__ import annotations

import copy
import importlib.util
import inspect
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from timm.models.vision_transformer import VisionTransformer
from tiny_models import HAS_ATTN_HEAD_DIM, MNIST_DIR, MNIST_MODEL, TINY, make_model, needs_shared
from torch.utils.data import DataLoader, TensorDataset

import tokenmerge_patch as tm
from tokenmerge_patch.finetune import CHECKPOINT_NAME, StepInfo, finetune

TARGETS = (0.5, 0.25)
ROOT = Path(__file__).resolve().parents[1]


def synthetic(n: int = 40, seed: int = 0) -> TensorDataset:
    """A learnable task: each class has its own colour, plus pixel noise."""
    colours = torch.randn(TINY["num_classes"], 3, 1, 1, generator=torch.Generator().manual_seed(100))
    labels = torch.arange(n) % TINY["num_classes"]
    noise = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    return TensorDataset(colours[labels] + 0.5 * noise, labels)


def loader(n: int = 40, batch_size: int = 8, seed: int = 0, shuffle: bool = True) -> DataLoader:
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(synthetic(n), batch_size=batch_size, shuffle=shuffle, generator=generator)


def tiny(**kwargs: object) -> VisionTransformer:
    """The same initial weights on every call, patched at TARGETS in blocks 1 and 2."""
    torch.manual_seed(1)
    return tm.patch(VisionTransformer(**TINY, **kwargs).eval(), layers=(1, 2), keep_rate=TARGETS)


def test_learns_and_reports_history() -> None:
    model = tiny()
    val = DataLoader(synthetic(40, seed=1), batch_size=8)  # other noise than the training images
    history = finetune(model, loader(), epochs=6, lr=3e-3, val_loader=val, progress=False)
    assert [h.epoch for h in history] == [1, 2, 3, 4, 5, 6]
    assert [h.step for h in history] == [5, 10, 15, 20, 25, 30]
    assert history[-1].train_loss < 0.6 * history[0].train_loss
    assert history[-1].val_accuracy >= 0.9 and history[-1].train_accuracy > history[0].train_accuracy + 0.3
    for h in history:
        assert math.isfinite(h.train_loss) and 0 <= h.train_accuracy <= 1 and 0 <= h.val_accuracy <= 1
        assert h.keep_rates == TARGETS and h.seconds > 0 and 0 < h.lr <= 3e-3
    assert [h.lr for h in history] == sorted((h.lr for h in history), reverse=True)  # cosine decay
    assert finetune(tiny(), loader(), progress=False)[0].val_accuracy is None


def test_keep_rate_schedule_as_seen_by_the_model() -> None:
    model = tiny()
    seen: list[tuple[bool, tuple[float, ...]]] = []
    model.register_forward_pre_hook(lambda m, _: seen.append((m.training, tm.patch_config(m).keep_rates)))
    tokens: list[list[int]] = []

    def after_step(info: StepInfo) -> None:
        tokens.append([r.tokens_out for r in tm.reduction_trace(model).values()])

    # 2 epochs x 5 steps; keep rates warm up over the first 6 steps.
    finetune(model, loader(), epochs=2, keep_rate_warmup=0.6, val_loader=loader(shuffle=False), callback=after_step)
    train = [rates for training, rates in seen if training]
    factors = [0.5 * (1 + math.cos(math.pi * step / 6)) if step < 6 else 0.0 for step in range(10)]
    expected = [tuple(t + (1 - t) * f for t in TARGETS) for f in factors]
    assert len(train) == 10 and train[0] == (1.0, 1.0)
    flat = [rate for rates in train for rate in rates]
    assert flat == pytest.approx([rate for rates in expected for rate in rates]) and train[6:] == [TARGETS] * 4
    assert [rates for training, rates in seen if not training] == [TARGETS] * 10  # validation at the targets
    for rates, counts in zip(train, tokens, strict=True):
        first = tm.kept_count(64, rates[0])
        assert counts == [1 + first, 1 + tm.kept_count(first, rates[1])]


def test_stays_patched_at_target_even_when_interrupted() -> None:
    model = tiny(drop_rate=0.1)
    finetune(model, loader(), keep_rate_warmup=1.0, progress=False)  # the schedule never reaches the targets
    config = tm.patch_config(model)
    assert tm.is_patched(model) and config.keep_rates == TARGETS and config.layers == (1, 2)
    assert not model.training  # mode restored
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert [r.tokens_out for r in tm.reduction_trace(model).values()] == [1 + 32, 1 + 8]

    def stop(info: StepInfo) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(model, loader(), keep_rate_warmup=1.0, progress=False, callback=stop)
    assert tm.patch_config(model).keep_rates == TARGETS and not model.training


@pytest.mark.parametrize("method", ["merge", "drop", "fuse", "bipartite"])
@pytest.mark.parametrize("flavour", ["vit", "distilled", "registers_dinov2"])
def test_every_parameter_gets_a_gradient(flavour: str, method: str) -> None:
    """Why DDP runs with find_unused_parameters=False: even with "drop" (scores only pick indices) or a
    reduction in the last block, every parameter is on a gradient path."""
    model = tm.patch(make_model(flavour).train(), layers=(1, 3), keep_rate=0.5, method=method)
    output = model(torch.randn(2, 3, 32, 32))
    loss = sum(o.sum() for o in output) if isinstance(output, tuple) else output.sum()
    loss.backward()
    assert [name for name, p in model.named_parameters() if p.grad is None or not p.grad.any()] == []


class Killed(Exception):
    pass


@pytest.mark.parametrize(("every", "kill_at"), [(3, 7), (None, 8)], ids=["mid-epoch", "epoch-end"])
def test_resume_is_bit_identical(tmp_path: Path, every: int | None, kill_at: int) -> None:
    """A run killed after step ``kill_at`` and resumed from its last checkpoint (step 6 mid-epoch 2, or
    the end of epoch 1) ends with exactly the parameters of an uninterrupted run."""
    # Dropout, drop-path, both warm-ups and validation all draw on the RNGs the checkpoint must restore.
    options = dict(drop_rate=0.1, proj_drop_rate=0.1, drop_path_rate=0.2)
    settings = dict(epochs=2, lr=1e-3, keep_rate_warmup=0.5, lr_warmup=0.2, checkpoint_every=every, progress=False)

    torch.manual_seed(0)
    reference = tiny(**options)
    expected = finetune(reference, loader(), val_loader=loader(shuffle=False), **settings)

    def kill(info: StepInfo) -> None:
        if info.step == kill_at:
            raise Killed

    torch.manual_seed(0)
    with pytest.raises(Killed):
        finetune(
            tiny(**options),
            loader(),
            val_loader=loader(shuffle=False),
            checkpoint_dir=tmp_path,
            callback=kill,
            **settings,
        )
    assert torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)["step"] == (6 if every else 5)

    # A new process: fresh model, other global RNG state, a loader seeded differently; the checkpoint decides.
    torch.manual_seed(1234)
    resumed = tiny(**options)
    steps: list[int] = []
    history = finetune(
        resumed,
        loader(seed=99),
        val_loader=loader(shuffle=False),
        checkpoint_dir=tmp_path,
        resume=True,
        callback=lambda info: steps.append(info.step),
        **settings,
    )
    assert steps == list(range(7 if every else 6, 11))
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    strip = [{**vars(h), "seconds": 0} for h in history]
    assert strip == [{**vars(h), "seconds": 0} for h in expected]


def test_checkpoint_every_and_contents(tmp_path: Path) -> None:
    model = tiny()
    on_disk: list[int | None] = []

    def look(info: StepInfo) -> None:  # runs before this step's checkpoint
        path = tmp_path / CHECKPOINT_NAME
        on_disk.append(torch.load(path, weights_only=True)["step"] if path.exists() else None)

    finetune(model, loader(), checkpoint_dir=tmp_path, checkpoint_every=2, keep_rate_warmup=0.5, callback=look)
    assert on_disk == [None, None, 2, 2, 4]
    saved = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    assert saved["step"] == 5 and saved["scheduler"]["last_epoch"] == 5 and saved["scaler"] is None
    assert all(torch.equal(saved["model"][k], v) for k, v in model.state_dict().items())
    state = saved["optimizer"]["state"]
    assert len(state) == len(list(model.parameters())) and all("exp_avg_sq" in s for s in state.values())
    rng = saved["rng"][0]
    assert set(rng) == {"torch", "cuda", "numpy", "python", "generators"} and len(rng["generators"]) == 1
    assert set(saved["epoch_rng"][0]) == set(rng)
    assert saved["keep_rates"] == list(TARGETS)  # the last step's rates (2 warm-up steps of 5)
    assert saved["fingerprint"]["patch"]["keep_rates"] == list(TARGETS) and len(saved["history"]) == 1
    assert {"loss_sum", "correct", "seen"} <= set(saved["running"])
    assert not list(tmp_path.glob("*.partial"))


def test_resume_refuses_another_run(tmp_path: Path) -> None:
    finetune(tiny(), loader(), checkpoint_dir=tmp_path, progress=False)
    other_rate = tm.patch(tiny(), layers=(1, 2), keep_rate=0.6)
    with pytest.raises(ValueError, match=r"different model or configuration(.|\n)*patch"):
        finetune(other_rate, loader(), checkpoint_dir=tmp_path, resume=True, progress=False)
    with pytest.raises(ValueError, match=r"lr: checkpoint 0\.0001, this run 0\.001"):
        finetune(tiny(), loader(), lr=1e-3, checkpoint_dir=tmp_path, resume=True, progress=False)
    torch.manual_seed(0)
    deeper = tm.patch(VisionTransformer(**{**TINY, "depth": 5}), layers=(1, 2), keep_rate=TARGETS)
    with pytest.raises(ValueError, match="parameters"):
        finetune(deeper, loader(), checkpoint_dir=tmp_path, resume=True, progress=False)


def test_resume_without_a_checkpoint_starts_fresh(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="checkpoint_dir"):
        finetune(tiny(), loader(), resume=True)
    history = finetune(tiny(), loader(), checkpoint_dir=tmp_path / "new", resume=True, progress=False)
    assert history[0].step == 5 and (tmp_path / "new" / CHECKPOINT_NAME).is_file()


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (
            lambda m, kw: kw.update(train_loader=DataLoader(synthetic(4), batch_size=8, drop_last=True)),
            ValueError,
            "empty",
        ),
        (lambda m, kw: tm.unpatch(m), ValueError, "not patched"),
        (lambda m, kw: kw.update(keep_rate_warmup=1.5), ValueError, "keep_rate_warmup"),
        (lambda m, kw: kw.update(keep_rate_warmup=-0.1), ValueError, "keep_rate_warmup"),
        (lambda m, kw: kw.update(epochs=0), ValueError, "epochs"),
        (lambda m, kw: kw.update(lr=0), ValueError, "lr"),
        (lambda m, kw: kw.update(teacher=m), ValueError, "separate"),
        (lambda m, kw: kw.update(train_loader=iter([])), TypeError, "len"),
    ],
    ids=["empty", "unpatched", "warmup>1", "warmup<0", "epochs", "lr", "teacher-is-model", "no-len"],
)
def test_bad_input(change, error: type, match: str) -> None:
    model = tiny()
    kwargs: dict = {"train_loader": loader()}
    change(model, kwargs)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(error, match=match):
        finetune(model, kwargs.pop("train_loader"), **kwargs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_teacher_distillation() -> None:
    # The unpatched copy as teacher of a student that reduces nothing: identical outputs, zero KL.
    torch.manual_seed(1)
    student = VisionTransformer(**TINY).eval()
    teacher = copy.deepcopy(student)
    tm.patch(student, layers=(1, 2), keep_rate=1.0)
    losses: list[float] = []
    finetune(student, loader(), teacher=teacher, distill_weight=1.0, callback=lambda i: losses.append(i.loss))
    assert abs(losses[0]) < 1e-6 and not teacher.training

    # At the real keep rates the distillation term changes the loss, and training still works.
    torch.manual_seed(1)
    teacher = VisionTransformer(**TINY).eval()
    plain = finetune(tiny(), loader(), epochs=2, lr=1e-3, progress=False)
    taught = finetune(tiny(), loader(), epochs=2, lr=1e-3, teacher=teacher, progress=False)
    assert all(math.isfinite(h.train_loss) for h in taught)
    assert [h.train_loss for h in plain] != pytest.approx([h.train_loss for h in taught], rel=1e-3)


@pytest.mark.parametrize("with_teacher", [False, True])
def test_deit_distilled_heads(with_teacher: bool) -> None:
    model = make_model("distilled")
    teacher = copy.deepcopy(model) if with_teacher else None
    model.set_distilled_training(True)
    tm.patch(model, layers=(1, 2), keep_rate=0.5)
    outputs: list[object] = []
    model.register_forward_hook(lambda m, _, out: outputs.append(out) if m.training else None)
    history = finetune(model, loader(), teacher=teacher, progress=False)
    assert isinstance(outputs[0], tuple) and len(outputs[0]) == 2  # both heads trained
    assert math.isfinite(history[0].train_loss) and 0 <= history[0].train_accuracy <= 1


def test_amp_on_cpu_uses_bf16_autocast() -> None:
    model = tiny()
    dtypes: list[torch.dtype] = []
    model.head.register_forward_hook(lambda m, _, out: dtypes.append(out.dtype) if m.training else None)
    history = finetune(model, loader(), amp=True, val_loader=loader(shuffle=False), progress=False)
    assert set(dtypes) == {torch.bfloat16} and math.isfinite(history[0].train_loss)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32
    dtypes.clear()
    finetune(model, loader(), progress=False)  # off by default on CPU
    assert set(dtypes) == {torch.float32}


def test_progress_bar_shows_loss_accuracy_lr_keep_rate(capsys: pytest.CaptureFixture) -> None:
    finetune(tiny(), loader(), progress=True)
    captured = capsys.readouterr()
    assert all(f"{key}=" in captured.err for key in ("loss", "acc", "lr", "keep"))
    assert "epoch 1: loss" in captured.out


# -- every bad argument is refused before anything is touched ------------------------------------------


def assert_refused(model: torch.nn.Module, error: type, match: str, train_loader=None, **kwargs: object) -> None:
    """``finetune`` raises ``error`` before its first step, and the model's state is exactly as it was."""
    before = copy.deepcopy(model.state_dict())
    modes, config = [m.training for m in model.modules()], tm.patch_config(model)
    steps: list[StepInfo] = []
    kwargs.setdefault("progress", False)
    with pytest.raises(error, match=match):
        finetune(model, loader() if train_loader is None else train_loader, callback=steps.append, **kwargs)
    assert steps == []
    after = model.state_dict()
    assert list(before) == list(after) and all(torch.equal(before[k], after[k]) for k in before)
    assert [m.training for m in model.modules()] == modes and tm.patch_config(model) == config


NON_FINITE = [
    ("lr", math.inf),
    ("lr", math.nan),
    ("lr", np.float32("inf")),
    ("weight_decay", math.nan),
    ("weight_decay", math.inf),
    ("weight_decay", np.float64("nan")),
    ("min_lr", math.nan),
    ("grad_clip", math.inf),
    ("grad_clip", math.nan),
    ("label_smoothing", math.nan),
    ("distill_weight", math.nan),
    ("distill_temperature", math.inf),
    ("distill_temperature", math.nan),
    ("keep_rate_warmup", math.nan),
    ("lr_warmup", math.inf),
]


@pytest.mark.parametrize(("name", "value"), NON_FINITE, ids=[f"{n}={v}" for n, v in NON_FINITE])
def test_non_finite_numbers_are_refused(name: str, value: float) -> None:
    """lr=inf, weight_decay=nan/inf or distill_temperature=inf used to pass and turn every parameter NaN."""
    teacher = VisionTransformer(**TINY).eval()
    assert_refused(tiny(), ValueError, rf"{name} must be .*finite", teacher=teacher, **{name: value})


WRONG_TYPES = [
    ("epochs", True),
    ("epochs", 2.0),
    ("epochs", "2"),
    ("lr", True),
    ("lr", "1e-3"),
    ("lr", None),
    ("lr", torch.tensor(1e-3)),
    ("weight_decay", np.bool_(True)),
    ("min_lr", False),
    ("checkpoint_every", 1.5),
    ("checkpoint_every", True),
    ("grad_clip", "1"),
    ("label_smoothing", [0.1]),
    ("distill_weight", False),
    ("distill_temperature", "2"),
    ("keep_rate_warmup", None),
    ("lr_warmup", True),
    ("resume", "yes"),
    ("progress", None),
    ("amp", "bf16"),
    ("find_unused_parameters", 1),
    ("callback", 5),
    ("device", 3),
    ("checkpoint_dir", 5),
]


@pytest.mark.parametrize(("name", "value"), WRONG_TYPES, ids=[f"{n}={v!r}" for n, v in WRONG_TYPES])
def test_wrong_types_are_refused_with_a_type_error(name: str, value: object) -> None:
    assert_refused(tiny(), TypeError, name, **{name: value})


OUT_OF_RANGE = [
    ("epochs", np.int64(0)),
    ("epochs", -1),
    ("lr", -1e-3),
    ("weight_decay", -0.1),
    ("min_lr", 1e-3),  # above lr (1e-4)
    ("min_lr", -1e-6),
    ("grad_clip", 0),
    ("checkpoint_every", np.int32(0)),
    ("label_smoothing", 1.5),
    ("distill_weight", -0.5),
    ("distill_temperature", 0.0),
    ("lr_warmup", 1.01),
    ("device", "not-a-device"),
]


@pytest.mark.parametrize(("name", "value"), OUT_OF_RANGE, ids=[f"{n}={v!r}" for n, v in OUT_OF_RANGE])
def test_out_of_range_numbers_are_refused(name: str, value: object) -> None:
    assert_refused(tiny(), ValueError, name, **{name: value})


def test_any_real_number_is_accepted_numpy_scalars_included(tmp_path: Path) -> None:
    """numpy scalars and other numbers.Real / numbers.Integral values train exactly as the Python numbers
    they equal, and write the same checkpoint fingerprint (numpy floats are not JSON-serialisable)."""
    from fractions import Fraction

    plain = dict(
        epochs=2, lr=2**-10, weight_decay=0.25, min_lr=2**-12, lr_warmup=0.25, keep_rate_warmup=0.5,
        grad_clip=1.0, checkpoint_every=3, label_smoothing=0.125, distill_weight=0.5, distill_temperature=2.0,
    )  # fmt: skip
    numeric = {key: np.int32(value) if isinstance(value, int) else np.float32(value) for key, value in plain.items()}
    numeric.update(epochs=np.int64(2), weight_decay=Fraction(1, 4), min_lr=np.float16(2**-12))
    results = {}
    for label, settings in (("plain", plain), ("numeric", numeric)):
        torch.manual_seed(1)
        teacher = VisionTransformer(**TINY).eval()
        model = tiny()
        history = finetune(
            model, loader(), teacher=teacher, checkpoint_dir=tmp_path / label, progress=False, **settings
        )
        results[label] = (model.state_dict(), [{**vars(h), "seconds": 0} for h in history])
    (plain_state, plain_history), (numeric_state, numeric_history) = results["plain"], results["numeric"]
    assert all(torch.equal(plain_state[k], numeric_state[k]) for k in plain_state)
    assert plain_history == numeric_history
    saved = [torch.load(tmp_path / label / CHECKPOINT_NAME, weights_only=True) for label in results]
    assert saved[0]["fingerprint"] == saved[1]["fingerprint"]
    # and a run with numpy settings resumes the plain run's (finished) checkpoint: nothing left to do
    torch.manual_seed(1)
    teacher = VisionTransformer(**TINY).eval()
    again = finetune(tiny(), loader(), teacher=teacher, checkpoint_dir=tmp_path / "plain", resume=True, **numeric)
    assert [{**vars(h), "seconds": 0} for h in again] == plain_history


# -- checkpoint_dir is checked before the first step ---------------------------------------------------


@pytest.mark.parametrize("where", ["below-a-file", "is-a-file"])
def test_unusable_checkpoint_dir_fails_before_the_first_step(tmp_path: Path, where: str) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    target = blocker / "checkpoints" if where == "below-a-file" else blocker
    assert_refused(tiny(), ValueError, "checkpoint_dir", checkpoint_dir=target)
    assert blocker.read_text() == "not a folder"


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root may write to read-only folders")
def test_read_only_checkpoint_dir_fails_before_the_first_step(tmp_path: Path) -> None:
    target = tmp_path / "read-only"
    target.mkdir()
    target.chmod(0o555)
    try:
        assert_refused(tiny(), ValueError, "checkpoint_dir", checkpoint_dir=target)
    finally:
        target.chmod(0o755)


def test_checkpoint_dir_is_created_and_probed_before_the_first_step(tmp_path: Path) -> None:
    target = tmp_path / "new" / "deeper"
    at_first_step: list[list[str]] = []

    def look(info: StepInfo) -> None:
        if info.step == 1:  # raises on a folder that does not exist yet
            at_first_step.append(sorted(path.name for path in target.iterdir()))

    finetune(tiny(), loader(), checkpoint_dir=target, callback=look, progress=False)
    assert at_first_step == [[]]  # created, and the probe file is gone
    assert sorted(path.name for path in target.iterdir()) == [CHECKPOINT_NAME]


# -- the batch forms a loader may yield ----------------------------------------------------------------


class Dicts(torch.utils.data.Dataset):
    """Hugging Face style samples: a dict of images, labels and something else."""

    def __init__(self, base: TensorDataset, image_key: str = "pixel_values", label_key: str | None = "labels"):
        self.base, self.image_key, self.label_key = base, image_key, label_key

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict:
        image, label = self.base[index]
        sample = {self.image_key: image, "index": index}
        if self.label_key is not None:
            sample[self.label_key] = label
        return sample


class Lists(torch.utils.data.Dataset):
    def __init__(self, base: TensorDataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> list:
        return list(self.base[index])


FORMS = {
    "pixel_values/labels dict": lambda data: Dicts(data),
    "image/label dict": lambda data: Dicts(data, "image", "label"),
    "images/labels dict": lambda data: Dicts(data, "images", "labels"),
    "3-tuple": lambda data: TensorDataset(*data.tensors, torch.arange(len(data))),
    "list": lambda data: Lists(data),
}


def form_loader(form, n: int = 40, seed: int = 0, shuffle: bool = True) -> DataLoader:
    generator = torch.Generator().manual_seed(0) if shuffle else None
    return DataLoader(form(synthetic(n, seed=seed)), batch_size=8, shuffle=shuffle, generator=generator)


def test_every_batch_form_trains_exactly_as_image_label_tuples() -> None:
    def run(form) -> tuple[dict, list]:
        model = tiny()
        history = finetune(
            model,
            form_loader(form),
            val_loader=form_loader(form, seed=1, shuffle=False),
            epochs=2,
            lr=1e-3,
            progress=False,
        )
        return model.state_dict(), [{**vars(h), "seconds": 0} for h in history]

    expected_state, expected_history = run(lambda data: data)
    assert expected_history[-1]["val_accuracy"] > 0  # validation ran on the tuples
    for name, form in FORMS.items():
        state, history = run(form)
        assert all(torch.equal(expected_state[k], state[k]) for k in state), name
        assert history == expected_history, name


@pytest.mark.parametrize("form", sorted(FORMS))
def test_evaluate_loader_and_evaluate_read_every_form(form: str) -> None:
    from tokenmerge_patch.evaluation import evaluate
    from tokenmerge_patch.finetune import evaluate_loader

    model, data = tiny(), synthetic(24, seed=3)
    with torch.no_grad():
        expected = (model(data.tensors[0]).argmax(-1) == data.tensors[1]).float().mean().item()
    wrapped = FORMS[form](data)
    assert evaluate_loader(model, DataLoader(wrapped, batch_size=5)) == pytest.approx(expected, abs=1e-9)
    assert evaluate(model, wrapped, batch_size=5, progress=False) == pytest.approx(expected, abs=1e-9)


IMAGES, LABELS = synthetic(8).tensors
BAD_BATCHES = {
    "strings": (["a.png", "b.png"], TypeError, "yielded a str; a batch must be"),
    "dict without images": ([{"x": IMAGES, "labels": LABELS}], TypeError, r"keys \['x', 'labels'\].*a batch must be"),
    "images not a tensor": ([(IMAGES.tolist(), LABELS)], TypeError, "images of type list.*a batch must be"),
    "empty tuple": ([()], TypeError, "empty tuple; a batch must be"),
    "float labels": ([(IMAGES, LABELS.float())], TypeError, "labels as a torch.float32 Tensor"),
    "labels as a list": ([(IMAGES, LABELS.tolist())], TypeError, "labels as a list"),
    "too few labels": ([(IMAGES, LABELS[:3])], ValueError, r"labels of shape \(3,\).*for 8 images"),
    "one-hot labels": ([(IMAGES, F.one_hot(LABELS, 5))], ValueError, "one per image"),
}


@pytest.mark.parametrize("case", sorted(BAD_BATCHES))
@pytest.mark.parametrize("which", ["train_loader", "val_loader"])
def test_bad_batches_are_refused_before_training(which: str, case: str) -> None:
    batches, error, match = BAD_BATCHES[case]
    kwargs = {"train_loader": batches} if which == "train_loader" else {"val_loader": batches}
    assert_refused(tiny(), error, rf"{which}.*{match}", **kwargs)


# -- label-free recovery: distillation from the teacher alone ------------------------------------------


def images_only(n: int = 40, seed: int = 0) -> DataLoader:
    return DataLoader(
        synthetic(n, seed).tensors[0], batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0)
    )


def kl_to_teacher(student: torch.nn.Module, teacher: torch.nn.Module, images: torch.Tensor) -> float:
    """KL(teacher || student) per image, written out: sum p_t (log p_t - log p_s)."""
    with torch.no_grad():
        log_t, log_s = teacher(images).log_softmax(-1), student.eval()(images).log_softmax(-1)
    return (log_t.exp() * (log_t - log_s)).sum(-1).mean().item()


def test_label_free_distillation_moves_the_student_toward_the_teacher() -> None:
    teacher = make_model("vit", seed=3)  # another network: far from the student at first
    student = tiny()
    held_out = synthetic(40, seed=1).tensors[0]
    before = kl_to_teacher(student, teacher, held_out)
    history = finetune(student, images_only(), teacher=teacher, epochs=6, lr=3e-3, progress=False)
    after = kl_to_teacher(student, teacher, held_out)
    assert before > 0.1 and after < 0.5 * before
    assert history[-1].train_loss < 0.5 * history[0].train_loss
    assert history[-1].train_accuracy > history[0].train_accuracy  # agreement with the teacher's top-1
    assert tm.patch_config(student).keep_rates == TARGETS


def manual_step(
    student: torch.nn.Module,
    teacher: torch.nn.Module | None,
    images: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    lr: float,
    weight: float,
    temperature: float,
) -> tuple[torch.nn.Module, float, int]:
    """One AdamW step on a copy of ``student`` with the documented objective, written out by hand."""
    model = copy.deepcopy(student).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    logits = model(images)
    loss = kl = ce = None
    if labels is not None:
        ce = -logits.log_softmax(-1).gather(1, labels[:, None]).mean()
    if teacher is not None:
        with torch.no_grad():
            log_t = (teacher(images) / temperature).log_softmax(-1)
        log_s = (logits / temperature).log_softmax(-1)
        kl = (log_t.exp() * (log_t - log_s)).sum(-1).mean() * temperature**2
    if kl is None:
        loss = ce
    elif ce is None:
        loss = kl
    else:
        loss = (1 - weight) * ce + weight * kl
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if labels is not None:
        reference = labels
    else:
        with torch.no_grad():
            reference = teacher(images).argmax(-1)
    return model, loss.item(), int((logits.argmax(-1) == reference).sum())


@pytest.mark.parametrize(
    ("labelled", "with_teacher"), [(True, False), (True, True), (False, True)], ids=["ce", "ce+kd", "label-free"]
)
@pytest.mark.parametrize("form", ["tensor-or-tuple", "dict"])
def test_one_step_matches_the_objective_written_by_hand(labelled: bool, with_teacher: bool, form: str) -> None:
    """The labelled paths (cross-entropy, and with a teacher) are what they always were; the label-free one
    is T² KL(teacher || student) alone, and its accuracy is agreement with the teacher's top-1."""
    images, labels = synthetic(8, seed=4).tensors
    teacher = make_model("vit", seed=3) if with_teacher else None
    student = tiny()
    lr, weight, temperature = 1e-3, 0.3, 2.0
    expected, expected_loss, expected_correct = manual_step(
        student, teacher, images, labels if labelled else None, lr=lr, weight=weight, temperature=temperature
    )
    if form == "dict":
        batch = {"pixel_values": images, **({"labels": labels} if labelled else {})}
    else:
        batch = (images, labels) if labelled else images
    losses: list[float] = []
    history = finetune(
        student, [batch], lr=lr, weight_decay=0.0, lr_warmup=0.0, teacher=teacher, distill_weight=weight,
        distill_temperature=temperature, progress=False, callback=lambda info: losses.append(info.loss),
    )  # fmt: skip
    assert losses == [pytest.approx(expected_loss, rel=1e-5)]
    assert history[0].train_accuracy == expected_correct / 8
    for (name, actual), wanted in zip(student.state_dict().items(), expected.state_dict().values(), strict=True):
        torch.testing.assert_close(actual, wanted, rtol=1e-4, atol=2e-6, msg=name)  # steps are ~1e-3


def test_label_free_distilled_deit_trains_both_heads_from_the_teacher() -> None:
    model = make_model("distilled")
    teacher = copy.deepcopy(model)
    model.set_distilled_training(True)
    tm.patch(model, layers=(1, 2), keep_rate=0.5)
    before = copy.deepcopy(model.state_dict())
    history = finetune(model, images_only(16), teacher=teacher, lr=1e-3, weight_decay=0.0, progress=False)
    assert math.isfinite(history[0].train_loss) and 0 <= history[0].train_accuracy <= 1
    for head in ("head.weight", "head_dist.weight"):
        assert not torch.equal(before[head], model.state_dict()[head]), head


@pytest.mark.parametrize(
    "batches",
    [[IMAGES], [(IMAGES,)], [{"pixel_values": IMAGES}], [{"image": IMAGES, "index": torch.arange(8)}]],
    ids=["tensor", "1-tuple", "dict", "dict-with-extras"],
)
def test_no_labels_and_no_teacher_is_refused_before_the_first_step(batches: list) -> None:
    assert_refused(tiny(), ValueError, "train_loader.*no labels.*teacher", train_loader=batches, progress=False)


def test_validation_without_labels_is_refused_before_the_first_step() -> None:
    teacher = VisionTransformer(**TINY).eval()
    assert_refused(tiny(), ValueError, "val_loader.*no labels", val_loader=[IMAGES], teacher=teacher, progress=False)
    from tokenmerge_patch.finetune import evaluate_loader

    with pytest.raises(ValueError, match="labels"):
        evaluate_loader(tiny(), [{"pixel_values": IMAGES}])


class OneShot:
    """A one-shot iterator with a length: finetune must not look ahead at it (it would lose a batch)."""

    def __init__(self, batches: list) -> None:
        self.length, self.batches = len(batches), iter(batches)

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> OneShot:
        return self

    def __next__(self) -> object:
        return next(self.batches)


def test_one_shot_iterators_are_checked_batch_by_batch() -> None:
    assert finetune(tiny(), OneShot(list(loader())), progress=False)[0].step == 5  # no batch lost
    steps: list[int] = []
    with pytest.raises(ValueError, match="without labels and there is no teacher"):
        finetune(tiny(), OneShot([(IMAGES, LABELS), IMAGES]), callback=lambda i: steps.append(i.step), progress=False)
    assert steps == [1]  # the unlabelled batch is refused before its step


def test_looking_at_the_first_batch_keeps_the_data_order() -> None:
    """The first-batch check draws a shuffle seed from the global RNG and puts it back: the run sees the
    batches an untouched loader would give."""
    data, model = synthetic(), tiny()
    torch.manual_seed(5)
    expected = [images for images, _ in DataLoader(data, batch_size=8, shuffle=True)]
    seen: list[torch.Tensor] = []
    model.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()) if m.training else None)
    torch.manual_seed(5)
    finetune(model, DataLoader(data, batch_size=8, shuffle=True), progress=False)
    assert len(seen) == 5 and all(torch.equal(a, b) for a, b in zip(seen, expected, strict=True))


def test_public_signature_is_unchanged() -> None:
    parameters = inspect.signature(finetune).parameters
    assert list(parameters)[:2] == ["model", "train_loader"]
    defaults = {name: p.default for name, p in parameters.items() if p.default is not inspect.Parameter.empty}
    assert defaults == dict(
        epochs=1, lr=1e-4, weight_decay=0.05, val_loader=None, keep_rate_warmup=0.0, teacher=None, device=None,
        amp=None, grad_clip=None, checkpoint_dir=None, resume=False, checkpoint_every=None, lr_warmup=0.05,
        min_lr=0.0, label_smoothing=0.0, distill_weight=0.5, distill_temperature=1.0, find_unused_parameters=False,
        progress=True, callback=None,
    )  # fmt: skip
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in list(parameters.values())[2:])


# -- the CLI ------------------------------------------------------------------------------------------


def write_tiny_mnist(folder: Path, n: int = 96) -> None:
    """A synthetic MNIST in idx format (what ``mnist:DIR`` reads): 10 classes of 28x28 templates + noise."""
    rng = np.random.default_rng(0)
    templates = rng.integers(0, 256, (10, 28, 28))
    labels = np.arange(n) % 10
    images = np.clip(templates[labels] + rng.normal(0, 40, (n, 28, 28)), 0, 255).astype(np.uint8)
    folder.mkdir(parents=True)
    (folder / "t10k-images-idx3-ubyte").write_bytes(
        bytes([0, 0, 8, 3]) + np.array([n, 28, 28], ">u4").tobytes() + images.tobytes()
    )
    (folder / "t10k-labels-idx1-ubyte").write_bytes(
        bytes([0, 0, 8, 1]) + np.array([n], ">u4").tobytes() + labels.astype(np.uint8).tobytes()
    )


def write_tiny_checkpoint(folder: Path) -> None:
    from tokenmerge_patch.checkpoint import build_model

    config = dict(
        img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=16, depth=2, num_heads=2,
        act_layer="relu", attn_head_dim=12, qkv_bias=False, mean=[0.5], std=[0.25],
    )  # fmt: skip
    # qkv_bias=False (as in vit_mnist_tiny): a key bias shifts every logit of a softmax row equally, so its
    # true gradient is 0 and Adam turns the float noise of it into lr-sized steps that depend on summation
    # order; it would make DDP and single-process weights differ by ~1e-4 for no real reason.
    torch.manual_seed(0)
    folder.mkdir(parents=True)
    save_file(build_model(config).state_dict(), folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(config))


def load_cli():
    spec = importlib.util.spec_from_file_location("benchmark_finetune", ROOT / "benchmarks" / "finetune.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cli_args(tmp_path: Path, out: str, batch_size: int) -> list[str]:
    return [
        "--checkpoint", str(tmp_path / "ckpt"), "--data", f"mnist:{tmp_path / 'mnist'}",
        "--train-range", "0:64", "--val-range", "64:96", "--keep-rate", "0.5", "--layers", "0,1",
        "--epochs", "2", "--lr", "1e-3", "--batch-size", str(batch_size), "--out", str(tmp_path / out),
        "--save", str(tmp_path / out / "weights"), "--no-progress",
    ]  # fmt: skip


@pytest.mark.skipif(not HAS_ATTN_HEAD_DIM, reason="the checkpoint format needs timm's attn_head_dim")
def test_torchrun_two_cpu_processes(tmp_path: Path) -> None:
    """Two gloo processes with batch 8 each: outputs written once, both ranks end with the same parameters,
    and those match one process with batch 16 (the same images per step, summed in another order)."""
    write_tiny_mnist(tmp_path / "mnist")
    write_tiny_checkpoint(tmp_path / "ckpt")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += [str(ROOT / "benchmarks" / "finetune.py"), *cli_args(tmp_path, "ddp", 8), "--threads", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ckpt = ["--checkpoint-dir", str(tmp_path / "ddp-checkpoints")]
    done = subprocess.run([*command, *ckpt], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    saved = torch.load(tmp_path / "ddp-checkpoints" / CHECKPOINT_NAME, weights_only=True)
    assert saved["step"] == 8 and len(saved["rng"]) == 2 and saved["fingerprint"]["world_size"] == 2
    assert sorted(p.name for p in (tmp_path / "ddp-checkpoints").iterdir()) == [CHECKPOINT_NAME]  # no probe left

    # an unusable checkpoint_dir: rank 0 finds it, every rank stops with the same error (no rank left waiting)
    (tmp_path / "a-file").write_text("")
    bad = ["--checkpoint-dir", str(tmp_path / "a-file" / "checkpoints")]
    failed = subprocess.run([*command, *bad], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert failed.returncode != 0 and failed.stderr.count("ValueError: checkpoint_dir") == 2, failed.stderr[-3000:]
    out = tmp_path / "ddp"
    # --train-range makes it a quick run: its own names, never the committed finetune.* (see test_benchmarks)
    names = ("finetune_quick.csv", "finetune_quick.md", "finetune_quick.png", "finetune_quick.json")
    for name in (*names, "weights/model.safetensors"):
        assert (out / name).is_file(), name
    assert not list(out.glob("finetune.*"))
    assert done.stdout.count("| stage |") == 1  # only rank 0 reports
    summary = json.loads((out / "finetune_quick.json").read_text())
    assert summary["world_size"] == 2 and len(set(summary["parameter_sha256"])) == 1
    assert [h["step"] for h in summary["history"]] == [4, 8]  # 32 images per rank, batch 8
    assert [row["stage"] for row in summary["rows"]][-1] == "after epoch 2"

    (tmp_path / "single").mkdir()
    committed = {}
    for path in (ROOT / "benchmarks" / "results").glob("finetune.*"):  # a copy of the committed results
        committed[path.name] = path.read_bytes()
        (tmp_path / "single" / path.name).write_bytes(committed[path.name])
    rows = load_cli().main([*cli_args(tmp_path, "single", 16), "--threads", str(torch.get_num_threads())])
    assert len(committed) == 4 and all((tmp_path / "single" / n).read_bytes() == b for n, b in committed.items())
    single, ddp = load_file(tmp_path / "single/weights/model.safetensors"), load_file(out / "weights/model.safetensors")
    start = load_file(tmp_path / "ckpt" / "model.safetensors")
    assert any(not torch.equal(start[k], ddp[k]) for k in start)  # it trained
    for key in single:
        torch.testing.assert_close(ddp[key], single[key], rtol=1e-4, atol=1e-6)  # updates are ~4e-3
    assert rows[0]["top-1 %"] == summary["rows"][0]["top-1 %"]  # sharded validation counts every image once


@needs_shared
@pytest.mark.slow
@pytest.mark.skipif(not HAS_ATTN_HEAD_DIM, reason="the ../shared model needs timm's attn_head_dim")
def test_cli_on_the_real_checkpoint(tmp_path: Path) -> None:
    rows = load_cli().main(
        [
            "--checkpoint", str(MNIST_MODEL), "--data", f"mnist:{MNIST_DIR}", "--keep-rate", "0.3",
            "--layers", "1,3,5", "--train-range", "0:1024", "--val-range", "8000:9000", "--out", str(tmp_path),
            "--no-progress", "--threads", str(torch.get_num_threads()),
        ]
    )  # fmt: skip
    unpatched, before, after = (row["top-1 %"] for row in rows)
    assert unpatched > 95 and before < unpatched and after >= before - 0.5  # 16 steps: it must not break it
    assert rows[-1]["train top-1 %"] > 90 and rows[-1]["seconds"] > 0
    assert "| after epoch 1 | 1 | 0.30 | 1,3,5 |" in (tmp_path / "finetune_quick.md").read_text()
