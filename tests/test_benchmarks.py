"""The benchmark scripts run end to end on small settings and write what they promise; quick or partial runs
never overwrite the committed full results of ``benchmarks/results`` (the README shows them)."""

from __future__ import annotations

import csv
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import MNIST_DIR, MNIST_MODEL, SHARED, needs_shared

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
RESULTS = BENCHMARKS / "results"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def committed_copy(folder: Path) -> dict[str, bytes]:
    """Copy the committed results into ``folder`` (a run's --out) and return their bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    copies = {}
    for path in sorted(RESULTS.iterdir()):
        if path.is_file() and "_quick" not in path.stem:
            shutil.copy2(path, folder / path.name)
            copies[path.name] = path.read_bytes()
    assert {"flops.csv", "flops.md", "flops.png", "profile_reduction.md"} <= set(copies)
    return copies


def assert_untouched(folder: Path, copies: dict[str, bytes]) -> None:
    changed = [name for name, content in copies.items() if (folder / name).read_bytes() != content]
    assert changed == [], f"a quick run overwrote committed results: {changed}"


def test_flops_quick_run(tmp_path: Path) -> None:
    """A quick run next to (a copy of) the committed results: it writes flops_quick.* and leaves flops.* alone."""
    copies = committed_copy(tmp_path)
    flops = load("flops")
    quick = ["--quick", "--models", "deit_tiny_patch16_224", "--keep-rates", "0.7", "--rounds", "1"]
    rows = flops.main([*quick, "--batch-size", "2", "--out", str(tmp_path)])
    assert_untouched(tmp_path, copies)
    by_method = {row["method"]: row for row in rows}
    assert set(by_method) == {"unpatched", "merge", "drop"}
    assert round(by_method["unpatched"]["GFLOPs"], 2) == 1.26
    assert round(by_method["merge"]["GFLOPs"], 2) == 0.82
    assert by_method["merge"]["paper GFLOPs"] == 0.8
    merge = by_method["merge"]
    assert merge["speedup"] > 0 and "merge time vs drop %" in merge
    assert merge["speedup ÷ FLOPs ratio"] == pytest.approx(merge["speedup"] / merge["FLOPs ratio"])
    with open(tmp_path / "flops_quick.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 3
    assert "| DeiT-T | merge | 0.70 | 5.717 | 0.818 | 0.8 |" in (tmp_path / "flops_quick.md").read_text()
    assert (tmp_path / "flops_quick.png").stat().st_size > 10_000


def test_vlm_quick_run(tmp_path: Path) -> None:
    """The VLM benchmark's quick run: vlm_quick.* next to (a copy of) the committed results, FLOPs that fall with
    the image tokens, and the committed names left alone."""
    pytest.importorskip("transformers")
    vlm = load("vlm")
    copies = committed_copy(tmp_path)
    argv = ["--quick", "--rounds", "1", "--tokens", "16", "--methods", "merge,bipartite", "--no-progress"]
    rows = vlm.main([*argv, "--out", str(tmp_path)])
    assert [(row["method"], row["image tokens"]) for row in rows] == [
        ("unpatched", 64),
        ("merge", 16),
        ("bipartite", 16),
        ("limit", 16),
    ]
    assert rows[1]["LLM prefill GFLOPs"] < rows[0]["LLM prefill GFLOPs"] and rows[1]["FLOPs ratio"] > 1
    assert rows[1]["reduction ms"] is not None and rows[0]["reduction ms"] is None and rows[3]["reduction ms"] is None
    # the limit keeps the whole tower and hands the LLM as many tokens as merge: the same prefill, more tower FLOPs
    assert rows[3]["LLM prefill GFLOPs"] == rows[1]["LLM prefill GFLOPs"]
    assert rows[3]["tower GFLOPs"] == rows[0]["tower GFLOPs"] and rows[3]["speedup ÷ limit's"] == 1.0
    for suffix in ("csv", "md", "png"):
        assert (tmp_path / f"vlm_quick.{suffix}").is_file()
    assert_untouched(tmp_path, copies)


@pytest.mark.parametrize(
    ("script", "expected"),
    [
        ("profile_reduction", ["reduction alone (merge)", "aten::", "reduction replaced by slicing"]),
        ("source_overhead", ["tracking on / off", "NCHW (unmerged) / NLC"]),
    ],
)
def test_timing_quick_run(tmp_path: Path, script: str, expected: list[str]) -> None:
    """A small run next to (a copy of) the committed results: it writes {script}_quick.md and leaves them alone."""
    copies = committed_copy(tmp_path)
    argv = ["--model", "deit_tiny_patch16_224", "--batch-size", "1", "--rounds", "1", "--out", str(tmp_path)]
    text = load(script).main(argv)
    assert_untouched(tmp_path, copies)
    assert all(piece in text for piece in expected)
    assert (tmp_path / f"{script}_quick.md").read_text() == text + "\n"


MODEL = ["--model", "deit_tiny_patch16_224", "--data", "mnist:/nowhere"]  # parse_args loads neither
# (script, arguments, the stems it writes): the full runs write the committed names, everything else not
OUTPUTS = [
    ("flops", [], ["flops"]),
    ("flops", ["--quick"], ["flops_quick"]),
    ("flops", ["--models", "deit_tiny_patch16_224"], ["flops_quick"]),
    ("flops", ["--keep-rates", "0.5"], ["flops_quick"]),
    ("flops", ["--rounds", "2"], ["flops_quick"]),
    ("flops", ["--batch-size", "4"], ["flops_quick"]),
    ("flops", ["--multiscale"], ["flops_quick"]),
    ("flops", ["--quick", "--stem", "mine"], ["mine"]),
    (
        "flops",
        ["--models", "deit_small_patch16_224", "--keep-rates", "0.7", "--multiscale", "--stem", "flops_multiscale"],
        ["flops_multiscale"],
    ),  # the README's multi-scale command names its committed files
    ("accuracy", [*MODEL, "--layers", "1,3,5"], ["accuracy"]),
    ("accuracy", [*MODEL, "--limit", "300"], ["accuracy_quick"]),
    ("accuracy", [*MODEL, "--keep-rates", "0.5"], ["accuracy_quick"]),
    ("accuracy", [*MODEL, "--methods", "merge"], ["accuracy_quick"]),
    ("accuracy", [*MODEL, "--similarities", "l2"], ["accuracy_quick"]),
    ("finetune", [*MODEL, "--epochs", "2", "--keep-rate", "0.3"], ["finetune"]),
    ("finetune", [*MODEL, "--train-range", "0:1024"], ["finetune_quick"]),
    ("finetune", [*MODEL, "--val-range", "8000:9000"], ["finetune_quick"]),
    ("profile_reduction", [], ["profile_reduction"]),
    ("profile_reduction", ["--rounds", "3"], ["profile_reduction_quick"]),
    ("profile_reduction", ["--model", "deit_tiny_patch16_224"], ["profile_reduction_quick"]),
    ("latency", [], ["latency"]),
    ("latency", ["--quick"], ["latency_quick"]),
    ("latency", ["--rounds", "3"], ["latency_quick"]),
    ("latency", ["--batch-sizes", "1"], ["latency_quick"]),
    ("latency", ["--runtimes", "eager"], ["latency_quick"]),
    ("sensitivity", [], ["sensitivity"]),
    ("sensitivity", ["--quick"], ["sensitivity_quick"]),
    ("vlm", ["--quick"], ["vlm_quick"]),
    ("vlm", ["--tokens", "144"], ["vlm_quick"]),
    ("sensitivity", ["--images", "100"], ["sensitivity_quick"]),
    ("heal", [], ["heal"]),
    ("heal", ["--swap-halves"], ["heal_swapped"]),
    ("heal", ["--tune"], ["heal_tuning"]),
    ("heal", ["--quick"], ["heal_quick"]),
    ("heal", ["--swap-halves", "--quick"], ["heal_swapped_quick"]),
    ("heal", ["--steps", "10"], ["heal_quick"]),
    ("heal", ["--budgets", "0.5"], ["heal_quick"]),
    ("heal", ["--budgets", "0.8,0.4", "--stem", "heal_ends"], ["heal_ends"]),
    ("heal", ["--tune", "--recipes", "norms, lr 1e-3, 120 steps"], ["heal_tuning_quick"]),
    ("merge_pictures", [], ["merge_groups_mnist", "merge_groups_photos"]),
    ("merge_pictures", ["--keep-rate", "0.3"], ["merge_groups_mnist_quick", "merge_groups_photos_quick"]),
    ("merge_pictures", ["--digits", "5,6"], ["merge_groups_mnist_quick", "merge_groups_photos"]),
]


@pytest.mark.parametrize(("script", "argv", "stems"), OUTPUTS, ids=[f"{s} {' '.join(a)}" for s, a, _ in OUTPUTS])
def test_only_full_runs_write_the_committed_names(script: str, argv: list[str], stems: list[str]) -> None:
    args = load(script).parse_args(argv)
    assert args.out == RESULTS
    written = [args.mnist_path.stem, args.photos_path.stem] if script == "merge_pictures" else [args.stem]
    assert written == stems
    committed = {path.stem for path in RESULTS.iterdir() if path.is_file()}
    assert all(stem in committed for stem in written if not stem.endswith("_quick") and stem != "mine")
    assert not any(stem in committed for stem in written if stem.endswith("_quick"))


def test_quick_results_are_git_ignored() -> None:
    if shutil.which("git") is None or not (BENCHMARKS.parent / ".git").exists():
        pytest.skip("not a git checkout")
    names = ["flops_quick.csv", "accuracy_quick.png", "finetune_quick.json", "profile_reduction_quick.md"]
    names += ["merge_groups_mnist_quick.png", "latency_quick.md", "runtime_agreement_quick.csv"]
    names += ["dense_quick.csv", "dense_maps_quick.png"]
    done = subprocess.run(
        ["git", "check-ignore", *(f"benchmarks/results/{name}" for name in names)],
        cwd=BENCHMARKS.parent,
        capture_output=True,
        text=True,
    )
    assert done.stdout.split() == [f"benchmarks/results/{name}" for name in names]
    done = subprocess.run(["git", "check-ignore", "benchmarks/results/flops.csv"], cwd=BENCHMARKS.parent)
    assert done.returncode == 1  # the committed results are not


@needs_shared
@pytest.mark.slow
def test_accuracy_on_real_checkpoint(tmp_path: Path) -> None:
    copies = committed_copy(tmp_path)
    rows = load("accuracy").main(
        [
            "--checkpoint",
            str(MNIST_MODEL),
            "--data",
            f"mnist:{MNIST_DIR}",
            "--limit",
            "300",
            "--layers",
            "1,3,5",
            "--keep-rates",
            "0.5,0.2",
            "--methods",
            "merge,bipartite",
            "--similarities",
            "l2",
            "--out",
            str(tmp_path),
        ]
    )
    assert_untouched(tmp_path, copies)
    assert [(r["method"], r["similarity"], r["keep rate"]) for r in rows] == [
        ("unpatched", "", 1.0),
        ("merge", "cosine", 0.5),
        ("merge", "cosine", 0.2),
        ("bipartite", "", 0.5),
        ("bipartite", "", 0.2),
        ("merge", "l2", 0.5),
    ]
    assert rows[0]["top-1 %"] > 90 and rows[0]["images"] == 300
    assert rows[1]["GFLOPs"] < rows[0]["GFLOPs"]
    assert rows[1]["layers"] == "1,3,5" and rows[1]["tokens"] == "50→26→14→8"
    # 49 patches at 0.2 would be 10 -> 2 -> 1, but ToMe merges at most half per block: 25 -> 13 -> 7
    assert rows[4]["tokens"] == "50→26→14→8" and rows[4]["note"].startswith("clamped")
    assert rows[3]["note"] == "" and rows[2]["tokens"] == "50→11→3→2"
    assert (tmp_path / "accuracy_quick.png").stat().st_size > 10_000
    assert "| merge | l2 | 0.50 |" in (tmp_path / "accuracy_quick.md").read_text()


def _hand_attention(block, x):
    """Attention of a timm Block written out (eager softmax), independent of its forward."""
    attn = block.attn
    batch, tokens, channels = x.shape
    qkv = attn.qkv(x).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    weights = (q @ k.transpose(-2, -1) * attn.scale).softmax(dim=-1)
    return attn.proj((weights @ v).transpose(1, 2).reshape(batch, tokens, channels))


def test_token_count_oracle_slices_after_attention_and_before_the_mlp() -> None:
    import timm
    import torch

    latency = load("latency")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=3, num_classes=4).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        full = latency.TokenCountOracle(model, [17, 17, 17])(images)
        assert torch.equal(full, model(images))  # the full counts are the unpatched model
        counts = [17, 9, 5]
        got = latency.TokenCountOracle(model, counts)(images)
        x = model._pos_embed(model.patch_embed(images))
        for block, count in zip(model.blocks, counts, strict=True):
            x = (x + _hand_attention(block, block.norm1(x)))[:, :count]
            x = x + block.mlp(block.norm2(x))
        expected = model.head(model.norm(x)[:, 0])
    assert torch.allclose(got, expected, atol=1e-5)
    with pytest.raises(ValueError, match="one entry per block"):
        latency.TokenCountOracle(model, [17, 9])


def test_latency_oracle_runs_in_onnxruntime(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    import timm
    import torch

    latency = load("latency")
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=3, num_classes=4).eval()
    oracle = latency.TokenCountOracle(model, [17, 9, 5]).eval()
    args = latency.parse_args(["--quick"])
    images = torch.randn(3, 3, 32, 32)
    run = latency.runner("onnxruntime", oracle, images, args, tmp_path)
    with torch.no_grad():
        assert torch.allclose(torch.from_numpy(run()[0]), oracle(images), atol=1e-4)


def test_latency_quick_run(tmp_path: Path) -> None:
    """Eager only, one round: the table has every variant, the oracle's FLOPs are the patched model's minus the
    reduction's own, the ToMe-style schedule is within the patched model's FLOPs; quick names, results untouched."""
    copies = committed_copy(tmp_path)
    latency = load("latency")
    argv = ["--quick", "--runtimes", "eager", "--batch-sizes", "2", "--rounds", "1", "--out", str(tmp_path)]
    rows = latency.main(argv)
    assert [r["variant"] for r in rows] == ["unpatched", "oracle", "patched", "ToMe-style r=11"]
    flops = {r["variant"]: r["GFLOPs"] for r in rows}
    assert flops["oracle"] < flops["patched"] < 0.66 * flops["unpatched"]
    assert flops["patched"] - flops["oracle"] < 0.01 * flops["patched"]  # the reduction itself is cheap
    assert flops["ToMe-style r=11"] <= flops["patched"]
    assert rows[0]["speedup"] == 1.0 and rows[2]["of oracle"] > 0
    assert (tmp_path / "latency_quick.md").read_text().count("| eager | 2 |") == 4
    assert (tmp_path / "latency_quick.png").stat().st_size > 10_000
    assert_untouched(tmp_path, copies)


HAS_IMAGENET = (SHARED / "models" / "deit_tiny_in1k" / "model.safetensors").is_file() and (
    SHARED / "data" / "imagenet_samples" / "val"
).is_dir()


@pytest.mark.skipif(not HAS_IMAGENET, reason=f"../shared ImageNet DeiT-Tiny and images not found at {SHARED}")
def test_runtime_agreement_quick_run(tmp_path: Path) -> None:
    """Eager runs on 4 real images next to (a copy of) the committed results: every setting and tie rule is in the
    tables, an image over 1e-4 is always one whose decisions differ, and only *_quick.* files are written."""
    copies = committed_copy(tmp_path)
    agreement = load("runtime_agreement")
    argv = ["--quick", "--images", "4", "--batch-sizes", "2", "--out", str(tmp_path)]
    rows = agreement.main(argv)
    assert_untouched(tmp_path, copies)
    settings = [(r["runtime"], r["threads"], r["batch"]) for r in rows if "runtime" in r]
    assert settings == [("eager", 1, 2), ("eager", 2, 2)]
    for row in (r for r in rows if "runtime" in r):
        assert row["images"] == 4 and row["unexplained"] == 0 and row["max |Δ|"] < 1
        assert row["decisions differ"] == row["selection"] + row["assignment"]
    rules = [(r["rule"], r["perturbation"]) for r in rows if "perturbation" in r]
    assert rules == [
        (rule, p) for rule in ("exact (the library)", "rounded to 2^-10") for p in ("batch 1", "sigma=0.0001")
    ]
    assert [r["rule"] for r in rows if "agree %" in r] == ["exact (the library)", "rounded to 2^-10"]
    text = (tmp_path / "runtime_agreement_quick.md").read_text()
    assert "| keep_rate=0.7 | eager | 2 | 2 | 4 |" in text and "How close to ties" in text
    assert (tmp_path / "runtime_agreement_quick.png").stat().st_size > 10_000
    # --resume keeps every plan the files hold and measures nothing again: the same tables, the time of both runs
    again = agreement.main([*argv, "--resume", "--no-plot"])
    assert [r for r in again if "runtime" in r] == [
        {k: v for k, v in r.items() if k in agreement.COLUMNS and v not in ("", None)} for r in rows if "runtime" in r
    ]
    assert "in a run that stopped" in (tmp_path / "runtime_agreement_quick.md").read_text()


needs_saliency = pytest.mark.skipif(
    not (SHARED / "models" / "dinov2_small_saliency" / "decoder.safetensors").is_file(),
    reason=f"../shared (the real DINOv2-S saliency model and ImageNet images) not found at {SHARED}",
)


@needs_saliency
@pytest.mark.slow
def test_dense_quick_run(tmp_path: Path) -> None:
    """A small run of benchmarks/dense.py next to (a copy of) the committed results: it writes dense_quick.* and
    dense_maps_quick.png and leaves them alone; merge and dense=True land in the budget at 224 px."""
    copies = committed_copy(tmp_path)
    dense = load("dense")
    argv = ["--quick", "--eval-images", "2", "--methods", "merge,merge_dense", "--timing-rounds", "1"]
    rows = dense.main([*argv, "--out", str(tmp_path)])
    assert_untouched(tmp_path, copies)
    by_key = {row["key"]: row for row in rows}
    assert set(by_key) == {"unpatched", "merge", "merge_dense"} and by_key["unpatched"]["IoU"] == 1.0
    for key in ("merge", "merge_dense"):
        assert 0.49 <= by_key[key]["FLOPs"] <= 0.5 and 0 < by_key[key]["IoU"] <= 1
    assert by_key["merge_dense"]["tokens"] == by_key["merge"]["tokens"]  # the same plan, computed on the same tokens
    assert "Goals (issue 24)" in (tmp_path / "dense_quick.md").read_text()
    assert (tmp_path / "dense_quick.png").stat().st_size > 10_000
    assert (tmp_path / "dense_maps_quick.png").stat().st_size > 10_000
