"""The benchmark scripts run end to end on small settings and write what they promise."""

from __future__ import annotations

import csv
import importlib.util
import sys
from pathlib import Path

import pytest
from tiny_models import MNIST_DIR, MNIST_MODEL, needs_shared

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_flops_main_job(tmp_path: Path) -> None:
    flops = load("flops")
    rows = flops.main(
        [
            "--models",
            "deit_tiny_patch16_224",
            "--keep-rates",
            "0.7",
            "--rounds",
            "1",
            "--batch-size",
            "2",
            "--out",
            str(tmp_path),
        ]
    )
    by_method = {row["method"]: row for row in rows}
    assert set(by_method) == {"unpatched", "merge", "drop"}
    assert round(by_method["unpatched"]["GFLOPs"], 2) == 1.26
    assert round(by_method["merge"]["GFLOPs"], 2) == 0.82
    assert by_method["merge"]["paper GFLOPs"] == 0.8
    merge = by_method["merge"]
    assert merge["speedup"] > 0 and "merge time vs drop %" in merge
    assert merge["speedup ÷ FLOPs ratio"] == pytest.approx(merge["speedup"] / merge["FLOPs ratio"])
    with open(tmp_path / "flops.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 3
    assert "| DeiT-T | merge | 0.70 | 5.717 | 0.818 | 0.8 |" in (tmp_path / "flops.md").read_text()
    assert (tmp_path / "flops.png").stat().st_size > 10_000


def test_profile_reduction(tmp_path: Path) -> None:
    text = load("profile_reduction").main(
        ["--model", "deit_tiny_patch16_224", "--batch-size", "2", "--rounds", "1", "--out", str(tmp_path)]
    )
    assert "reduction alone (merge)" in text and "aten::" in text
    assert (tmp_path / "profile_reduction.md").is_file()


@needs_shared
@pytest.mark.slow
def test_accuracy_on_real_checkpoint(tmp_path: Path) -> None:
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
    assert (tmp_path / "accuracy.png").stat().st_size > 10_000
