"""Merge-group pictures (Fig. 6)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import make_model

import tokenmerge_patch as tm
from tokenmerge_patch.vis import group_map, merge_sources, show_merges


def test_show_merges_writes_a_png_with_a_panel_per_reducing_block(tmp_path: Path) -> None:
    model = make_model("vit")
    tm.patch(model, layers=(0, 2), keep_rate=0.5)
    path = tmp_path / "groups.png"
    figure = show_merges(model, torch.randn(3, 32, 32), path=path, title="tiny")
    assert path.stat().st_size > 5_000
    assert [axis.get_title() for axis in figure.axes] == [
        "image",
        "after block 0: 32 tokens",
        "after block 2: 16 tokens",
    ]
    # source tracing was only switched on for that forward
    assert tm.patch_config(model).trace_source is False


def test_merge_sources_partition_the_grid() -> None:
    model = make_model("registers_dinov2")
    tm.patch(model, layers=(1, 3), keep_rate=(0.5, 0.25), method="merge")
    sources = merge_sources(model, torch.randn(3, 32, 32))
    assert list(sources) == [1, 3]
    groups = group_map(sources[3], (8, 8))
    assert groups.shape == (8, 8)
    assert set(np.unique(groups)) == set(range(5, 5 + 8))  # 64 -> 32 -> 8 tokens after the 5 prefix tokens


def test_dropped_patches_are_marked() -> None:
    model = make_model("vit")
    tm.patch(model, layers=(1,), keep_rate=0.25, method="drop")
    source = merge_sources(model, torch.randn(3, 32, 32))[1]
    assert (source == -1).sum() == 48


def test_unpatched_model_is_refused() -> None:
    with pytest.raises(ValueError, match="not patched"):
        merge_sources(make_model("vit"), torch.randn(3, 32, 32))
