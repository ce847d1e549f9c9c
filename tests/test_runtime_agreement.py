"""ONNX Runtime against eager PyTorch on the real DeiT-T and real images of ../shared, with two intra-op threads (what a
user's machine runs), and the bookkeeping of benchmarks/runtime_agreement.py that traces a disagreement to the
decision where it starts."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import SHARED

import tokenmerge_patch as tm

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
IMAGENET_MODEL = SHARED / "models" / "deit_tiny_in1k"
IMAGENET_IMAGES = SHARED / "data" / "imagenet_samples"
HAS_IMAGENET = (IMAGENET_MODEL / "model.safetensors").is_file() and (IMAGENET_IMAGES / "val").is_dir()
HAS_ONNX = all(importlib.util.find_spec(name) for name in ("onnx", "onnxscript", "onnxruntime"))
IMAGES = 48  # evenly spaced over the 1000 shared images (classes 0, 20, 41, ...): three batches of 16
# A decision "near a tie": the score spread of the swapped tokens (relative) or the cosine gap between a token's two
# best targets, in the eager reference. The first differing decisions of the full benchmark run are all far below
# this; a typical decision's margin is 1e-2 (benchmarks/results/runtime_agreement.md).
NEAR_TIE = 1e-4


def load_agreement():
    spec = importlib.util.spec_from_file_location("benchmark_runtime_agreement", BENCHMARKS / "runtime_agreement.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def agreement():
    return load_agreement()


@pytest.mark.slow
@pytest.mark.skipif(not HAS_IMAGENET, reason=f"../shared ImageNet DeiT-Tiny and images not found at {SHARED}")
@pytest.mark.skipif(not HAS_ONNX, reason="onnx, onnxscript and onnxruntime are not all installed")
def test_onnxruntime_two_threads_on_real_images(agreement, tmp_path: Path) -> None:
    """The real DeiT-T patched with the defaults (keep_rate=0.7 in blocks 3, 6, 9), exported and run in ONNX Runtime
    on 2 intra-op threads, batches of 16, against eager PyTorch (1 thread, batch 16). What holds: the file gives the
    same outputs on every run (before, ScatterND's raced rows did not); nearly every image is within 1e-4 and keeps
    its top-1; an image further off had some reducing block decide otherwise, on a near tie of the reference."""
    from tokenmerge_patch.data import evenly_spaced, load_imagenet, to_tensor_dataset

    model = tm.patch(agreement.load_imagenet_model(IMAGENET_MODEL), keep_rate=0.7)
    dataset = load_imagenet(IMAGENET_IMAGES)
    images = to_tensor_dataset(dataset, evenly_spaced(range(len(dataset)), IMAGES), progress=False).tensors[0]
    path = tmp_path / "deit_tiny.onnx"
    # a fixed batch of 16 exports in half the time of a dynamic one; test_export.py covers the dynamic batch
    agreement.export_onnx_quietly(agreement.Decisions(model).eval(), path, images[:16], dynamic_batch=False)
    run = agreement.onnx_runner(path, threads=2)
    first = agreement.run_all(run, images, 16, "onnxruntime")
    again = agreement.run_all(run, images, 16, "onnxruntime, again")
    assert torch.equal(first.logits, again.logits), "ONNX Runtime on 2 threads gave other outputs on a second run"

    reference = agreement.reference_run(model, images)  # eager, 1 thread, batch 16, with every decision's margin
    difference = (first.logits - reference.logits).abs().amax(dim=1)
    found = agreement.divergence(reference, first, model.num_prefix_tokens, "merge")
    for i in torch.nonzero(difference > 1e-4).flatten().tolist():
        assert found[i] is not None, f"image {i} differs by {difference[i]:.1e} with every decision the reference's"
        block, kind, margin = found[i]
        assert margin < NEAR_TIE, f"image {i}: its {kind} at reducing block {block} differs, margin {margin:.1e}"
    assert (difference <= 1e-4).sum() >= IMAGES - 2  # 1000 images: 999 within 1e-4 (the benchmark)
    assert (first.logits.argmax(1) == reference.logits.argmax(1)).sum() >= IMAGES - 1


def _run(agreement, blocks: list[tuple[list, list]], margins: list[tuple[list, list, int]]):
    return agreement.Run(
        torch.zeros(len(blocks[0][0]), 3),
        [(torch.tensor(keep), torch.tensor(source)) for keep, source in blocks],
        [(torch.tensor(values), torch.tensor(gaps), cut) for values, gaps, cut in margins],
    )


def test_divergence_finds_the_first_differing_decision_and_its_margin(agreement) -> None:
    """Hand-made decisions of two reducing blocks (4 patches -> 3 -> 2, one prefix token) for three images: image 0
    merges patch 3 elsewhere at the first block, image 1 keeps other tokens at the second, image 2 merges the token
    holding patch 2 elsewhere at the second (found through the first block's source map)."""
    nan = math.nan
    reference = _run(
        agreement,
        [
            ([[0, 1, 2]] * 3, [[1, 2, 3, 1]] * 3),
            ([[0, 2], [0, 2], [0, 1]], [[1, 2, 2, 1], [1, 2, 2, 1], [1, 2, 2, 1]]),
        ],
        [
            ([[0.4, 0.3, 0.2, 0.1]] * 3, [[nan, nan, nan, 2e-6]] * 3, 3),
            ([[0.5, 0.25, 0.26]] * 3, [[nan, 7e-3, nan], [nan, 7e-3, nan], [nan, nan, 5e-6]], 2),
        ],
    )
    other = _run(
        agreement,
        [
            ([[0, 1, 2]] * 3, [[1, 2, 3, 2], [1, 2, 3, 1], [1, 2, 3, 1]]),
            ([[0, 2], [0, 1], [0, 1]], [[1, 2, 2, 1], [1, 2, 1, 1], [1, 2, 1, 1]]),
        ],
        [],
    )
    found = agreement.divergence(reference, other, 1, "merge")
    assert [f[:2] for f in found] == [(0, "assignment"), (1, "selection"), (1, "assignment")]
    assert found[0][2] == pytest.approx(2e-6)  # patch 3's gap between its two best targets
    assert found[1][2] == pytest.approx(0.01 / 0.26)  # tokens 1 and 2 swapped: their score spread
    assert found[2][2] == pytest.approx(5e-6)  # patch 2 sat in the first block's output token 3
    assert agreement.divergence(reference, reference, 1, "merge") == [None] * 3


def test_rounded_tie_rule_by_hand(agreement) -> None:
    """The rule the benchmark tries: scores rounded to a relative grid, equal ones ranked by index. A perturbation
    within a grid cell leaves the choice alone; one across a cell boundary, however small, flips it (the boundary
    moved to the grid, it did not go away)."""
    reduce = sys.modules["tokenmerge_patch.reduce"]
    assert agreement.rounded(torch.tensor([1.0, 1.2, 1.26, -0.3, 0.0]), 3).tolist() == [1.0, 1.25, 1.25, -0.3125, 0.0]

    def crucial(scores: list[float]) -> list[int]:
        return reduce.split_crucial(torch.tensor([scores]), 2)[0][0].tolist()

    assert crucial([0.30, 0.2001, 0.2002, 0.1]) == [0, 2]  # exact scores: token 2 is higher
    with agreement.tie_rule(4):  # 4 significant bits: 0.1953125 <= s < 0.2109375 all round to 0.203125
        assert crucial([0.30, 0.2001, 0.2002, 0.1]) == [0, 1]  # one cell: the lower index
        assert crucial([0.30, 0.2001, 0.2100, 0.1]) == [0, 1]  # token 2 moved within the cell: unchanged
        assert crucial([0.30, 0.19532, 0.2002, 0.1]) == [0, 1]
        assert crucial([0.30, 0.19530, 0.2002, 0.1]) == [0, 2]  # token 1 down by 2e-5, across the boundary
        # assignments alike: similarities 0.600 and 0.608 round to 0.625, the lower target wins
        token, targets = torch.tensor([[[0.60, 0.31]]]), torch.tensor([[[1.0, 0.0], [0.6, 0.8]]])
        assert reduce.cosine_assignment(token, targets).tolist() == [[0]]
    assert reduce.cosine_assignment(token, targets).tolist() == [[1]]  # exact: 0.608 > 0.600
    assert crucial([0.30, 0.2001, 0.2002, 0.1]) == [0, 2]  # the library's rule is back
