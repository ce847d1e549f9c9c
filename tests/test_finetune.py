"""finetune(): learning, the keep-rate schedule the model sees, exact resume, checkpoints, distillation,
bad input, and the CLI under torchrun with two CPU processes."""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
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
        finetune(model, kwargs.pop("train_loader"), progress=False, **kwargs)
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
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "ddp"
    for name in ("finetune.csv", "finetune.md", "finetune.png", "finetune.json", "weights/model.safetensors"):
        assert (out / name).is_file(), name
    assert done.stdout.count("| stage |") == 1  # only rank 0 reports
    summary = json.loads((out / "finetune.json").read_text())
    assert summary["world_size"] == 2 and len(set(summary["parameter_sha256"])) == 1
    assert [h["step"] for h in summary["history"]] == [4, 8]  # 32 images per rank, batch 8
    assert [row["stage"] for row in summary["rows"]][-1] == "after epoch 2"

    rows = load_cli().main([*cli_args(tmp_path, "single", 16), "--threads", str(torch.get_num_threads())])
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
    assert "| after epoch 1 | 1 | 0.30 | 1,3,5 |" in (tmp_path / "finetune.md").read_text()
