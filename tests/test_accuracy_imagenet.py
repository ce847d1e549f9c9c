"""The ImageNet mode of benchmarks/accuracy.py: which files a run writes, and a quick run on a tiny subset of the
real DeiT-Tiny and images of ../shared that writes only to a temporary folder."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import timm
from tiny_models import SHARED

import tokenmerge_patch as tm
from tokenmerge_patch.plan import PatchConfig

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
RESULTS = BENCHMARKS / "results"
IMAGENET_MODEL = SHARED / "models" / "deit_tiny_in1k" / "model.safetensors"
IMAGENET_IMAGES = SHARED / "data" / "imagenet_samples" / "val"
needs_imagenet = pytest.mark.skipif(
    not (IMAGENET_MODEL.is_file() and IMAGENET_IMAGES.is_dir()),
    reason=f"../shared ImageNet DeiT-Tiny (models/deit_tiny_in1k) and images (data/imagenet_samples) not found at "
    f"{SHARED}",
)


def load_benchmark(name: str):
    """The script ``benchmarks/{name}.py`` as a module."""
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}_imagenet", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def load_accuracy():
    return load_benchmark("accuracy")


def snapshot(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} if folder.is_dir() else {}


def test_output_names(tmp_path: Path) -> None:
    """Only the full run writes the committed names; --quick and any other setting write *_quick.*."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model.safetensors").write_bytes(b"")
    (tmp_path / "images").mkdir()
    where = ["--imagenet", "--model-dir", str(tmp_path / "model"), "--images", str(tmp_path / "images")]
    accuracy = load_accuracy()
    full = accuracy.parse_imagenet_args(where)
    assert (full.stem, full.plans_stem) == ("accuracy_imagenet", "accuracy_imagenet_plans")
    assert (full.eval_images, full.calib_images, full.budgets) == (500, 256, [0.8, 0.65, 0.5])
    quick = accuracy.parse_imagenet_args([*where, "--quick"])
    assert (quick.stem, quick.plans_stem) == ("accuracy_imagenet_quick", "accuracy_imagenet_plans_quick")
    assert (quick.eval_images, quick.calib_images, quick.budgets) == (100, 64, [0.65])
    for other in (["--eval-images", "50"], ["--budgets", "0.5"], ["--methods", "paper"], ["--calib-block-runs", "9"]):
        assert accuracy.parse_imagenet_args([*where, *other]).stem == "accuracy_imagenet_quick"
    assert accuracy.parse_imagenet_args([*where, "--stem", "mine"]).plans_stem == "mine_plans"
    swapped = accuracy.parse_imagenet_args([*where, "--swap-halves"])  # the other fold: its own committed names
    assert (swapped.stem, swapped.plans_stem) == ("accuracy_imagenet_swapped", "accuracy_imagenet_swapped_plans")
    assert accuracy.parse_imagenet_args([*where, "--swap-halves", "--quick"]).stem == "accuracy_imagenet_swapped_quick"
    with pytest.raises(SystemExit):
        accuracy.parse_imagenet_args([*where, "--methods", "paper,nonsense"])
    with pytest.raises(SystemExit):
        accuracy.parse_imagenet_args(["--imagenet", "--model-dir", str(tmp_path / "nowhere")])


@needs_imagenet
@pytest.mark.slow
def test_quick_run_on_a_tiny_subset(tmp_path: Path) -> None:
    before = snapshot(RESULTS)
    methods = "paper,nonorm,default,tome,rule_nonorm,rule" + (",calibrated" if hasattr(tm, "calibrate") else "")
    args = ["--imagenet", "--quick", "--eval-images", "6", "--calib-images", "4", "--budgets", "0.65"]
    args += ["--methods", methods, "--calib-block-runs", "24", "--workers", "0", "--batch-size", "6"]
    rows = load_accuracy().main([*args, "--out", str(tmp_path)])
    assert snapshot(RESULTS) == before  # the committed results are untouched

    keys = ["unpatched", *methods.split(",")]
    assert [row["key"] for row in rows] == keys
    base = rows[0]
    assert base["images"] == 6 and base["agree %"] == 100 and base["FLOPs"] == 1 and round(base["GFLOPs"], 2) == 1.26
    by_key = {row["key"]: row for row in rows}
    for key in ("paper", "rule", "rule_nonorm", "calibrated"):
        if key in by_key:
            assert 0.64 <= by_key[key]["FLOPs"] <= 0.65, key
    paper, default = by_key["paper"], by_key["default"]
    assert paper["layers"] == default["layers"] == "3,6,9" and paper["keep rates"] == default["keep rates"]
    assert (paper["size_weighted"], paper["keep_norm"], paper["prop_attn"], paper["flags"]) == (False,) * 3 + ("plain",)
    defaults = tm.patch_config(tm.patch(timm.create_model("vit_tiny_patch16_224", img_size=32)))
    options = ("size_weighted", "keep_norm", "prop_attn")
    assert [default[name] for name in options] == [getattr(defaults, name) for name in options]
    # the keep_norm=False rows: the default's blocks and rate (the rule's plan) with that one option off
    nonorm, rule, rule_nonorm = by_key["nonorm"], by_key["rule"], by_key["rule_nonorm"]
    assert (nonorm["keep rates"], nonorm["prop_attn"], nonorm["keep_norm"]) == (default["keep rates"], True, False)
    assert (rule["keep_norm"], rule_nonorm["keep_norm"]) == (True, False)
    assert rule_nonorm["keep rates"] == rule["keep rates"] and rule_nonorm["tokens"] == rule["tokens"]
    assert by_key["tome"]["FLOPs"] <= 0.65 and by_key["tome"]["keep rates"].startswith("r=")
    assert by_key["tome"]["layers"] == "0–11"

    names = {p.name for p in tmp_path.iterdir()}
    stem = "accuracy_imagenet_quick"
    assert names == {f"{stem}.csv", f"{stem}.md", f"{stem}.png", "accuracy_imagenet_plans_quick.json"}
    with open(tmp_path / f"{stem}.csv") as handle:
        assert [row["key"] for row in csv.DictReader(handle)] == keys
    text = (tmp_path / f"{stem}.md").read_text()
    assert "**evaluation** (every top-1 and agreement below): 6 of the 500 images of the odd class indices" in text
    assert "| 0.65 | merge, paper's (plain eq. 4) | plain | 3,6,9 |" in text
    assert (tmp_path / f"{stem}.png").stat().st_size > 10_000

    record = json.loads((tmp_path / "accuracy_imagenet_plans_quick.json").read_text())
    evaluation = record["evaluation_images"]
    assert len(evaluation) == 6 and [row["key"] for row in record["rows"]] == keys
    for row in record["rows"][1:]:
        PatchConfig.from_dict(row["plan"])  # every plan is data that round-trips
    if "calibrated" in by_key:
        calibration = record["calibration_images"]
        assert len(calibration) == 4 and not set(calibration) & set(evaluation)
        assert "**calibration** (`tm.calibrate` only, never evaluated on): 4 of the 500 images" in text
        plan = PatchConfig.from_dict(record["calibrated"]["0.65"]["plan"])
        assert record["rows"][-1]["plan"] == plan.to_dict()  # the plan the calibrated row was evaluated with
        assert record["calibrated"]["0.65"]["seconds"] > 0 and by_key["calibrated"]["calib s"] > 0


@needs_imagenet
def test_sensitivity_quick_run(tmp_path: Path) -> None:
    """benchmarks/sensitivity.py on 8 calibration-half images in two batches: replaying the first reducing block's
    own scores from a separate unpatched forward gives exactly the patched model's result (so the deeper blocks'
    rows change only the scores), and nothing committed is touched."""
    sensitivity = load_benchmark("sensitivity")
    assert sensitivity.parse_args([]).stem == "sensitivity"
    assert sensitivity.parse_args(["--images", "8"]).stem == sensitivity.parse_args(["--quick"]).stem
    before = snapshot(RESULTS)
    rows = sensitivity.main(["--quick", "--images", "8", "--batch-size", "4", "--out", str(tmp_path)])
    assert snapshot(RESULTS) == before
    assert {p.name for p in tmp_path.iterdir()} == {f"sensitivity_quick.{ext}" for ext in ("csv", "md", "png")}

    single = {row["layers"]: row for row in rows if row["table"] == "one block"}
    assert set(single) == {"3", "6"} and all(0.6 < row["FLOPs"] < 1 for row in single.values())
    (schedule,) = [row for row in rows if row["table"] == "schedule"]
    assert 0.48 <= schedule["FLOPs"] <= 0.5 and schedule["layers"] == "3–11"
    headroom = [row for row in rows if row["table"] == "headroom"]
    assert {row["plan"] for row in headroom} == {"block 3 at keep 0.5", "flops=0.5 rule"}
    for plan in ("block 3 at keep 0.5", "flops=0.5 rule"):
        by_scores = by_scores_of(headroom, plan)
        assert set(by_scores) == {"own", "own, replayed", "block 7"}
        own, replayed = by_scores["own"], by_scores["own, replayed"]
        assert (replayed["KL"], replayed["agree %"]) == pytest.approx((own["KL"], own["agree %"]), abs=1e-6)
        assert by_scores["block 7"]["KL"] != pytest.approx(own["KL"], abs=1e-6)
    assert single["3"]["KL"] == pytest.approx(by_scores_of(headroom, "block 3 at keep 0.5")["own"]["KL"])
    assert all(row["KL"] >= 0 for row in rows)


def by_scores_of(rows: list[dict], plan: str) -> dict[str, dict]:
    return {row["scores"]: row for row in rows if row["plan"] == plan}


@needs_imagenet
@pytest.mark.slow
def test_heal_quick_run(tmp_path: Path) -> None:
    """benchmarks/heal.py on a few images and two steps: the calibrated plan off the shelf and healed, ToMe off the
    shelf and healed, at 0.5 of the FLOPs; heal leaves the FLOPs as they were; only heal_quick.* is written."""
    heal = load_benchmark("heal")
    before = snapshot(RESULTS)
    argv = ["--quick", "--eval-images", "8", "--heal-images", "16", "--calib-images", "8", "--steps", "2"]
    rows = heal.main([*argv, "--calib-block-runs", "24", "--workers", "0", "--no-progress", "--out", str(tmp_path)])
    assert snapshot(RESULTS) == before
    assert {p.name for p in tmp_path.iterdir()} == {f"heal_quick.{ext}" for ext in ("csv", "md", "png")}
    assert [(row["plan"].split(" ")[0], row["healed"]) for row in rows] == [
        ("unpatched", ""),
        ("calibrated", "off the shelf"),
        ("calibrated", "norms"),
        ("ToMe", "off the shelf"),
        ("ToMe", "norms"),
    ]
    assert rows[0]["FLOPs"] == 1 and rows[0]["agree %"] == 100
    for off, healed in ((rows[1], rows[2]), (rows[3], rows[4])):
        assert (
            0.48 <= off["FLOPs"] <= 0.5 and healed["FLOPs"] == off["FLOPs"] and healed["plan json"] == off["plan json"]
        )
        assert healed["steps"] == 2 and healed["heal s"] > 0 and 0 <= healed["kept step"] <= 2
    assert rows[3]["plan json"]["method"] == "bipartite"
    assert "| 0.50 | calibrated | norms |" in (tmp_path / "heal_quick.md").read_text()


@needs_imagenet
@pytest.mark.slow
def test_heal_run_says_where_tome_cannot_reach(tmp_path: Path) -> None:
    """At 0.4 of the FLOPs ToMe's constant r runs out (r <= 196 // 12 on DeiT-T lands near 0.5): the run writes no
    ToMe rows at that budget, and its table says why, instead of showing a plan at another budget under 0.4."""
    heal = load_benchmark("heal")
    argv = ["--budgets", "0.4", "--eval-images", "8", "--heal-images", "16", "--calib-images", "8", "--steps", "1"]
    rows = heal.main([*argv, "--calib-block-runs", "24", "--workers", "0", "--no-progress", "--out", str(tmp_path)])
    assert [row["plan"] for row in rows] == ["unpatched", "calibrated", "calibrated", "calibrated"]
    assert all(row["FLOPs"] <= 0.4 for row in rows[1:])
    text = (tmp_path / "heal_quick.md").read_text()
    assert "ToMe's constant-r schedule cannot reach 0.4 of the FLOPs on this model (r = 16 is the largest" in text
