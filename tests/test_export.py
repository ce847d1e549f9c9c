"""Deployment of patched models: ONNX (run in onnxruntime) and torch.export with a dynamic batch, for every method,
and torch.jit.script refused clearly. Tiny timm and Hugging Face ViTs; one exported file serves batch 1 and 4."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import make_model, perturb
from torch import Tensor, nn

import tokenmerge_patch as tm
from tokenmerge_patch.reduce import _descending_order_by_rank, descending_order, exporting, group_sum, split_crucial

HAS_ONNX = all(importlib.util.find_spec(name) for name in ("onnx", "onnxscript", "onnxruntime"))
NO_ONNX = "onnx, onnxscript and onnxruntime are not all installed: pip install 'tokenmerge_patch[export]' (or [test])"
needs_onnx = pytest.mark.skipif(not HAS_ONNX, reason=NO_ONNX)

# every method with both settings of the flags that apply to it: size_weighted, keep_norm and prop_attn for merge
# (all on, and all off: the paper's literal method), prop_attn for bipartite; drop ignores them and fuse takes none
# (EViT's fused token is a sum, not a mean). Repeats (a default equal to a listed setting) are skipped.
PLANS = [
    ("merge", dict(size_weighted=True, keep_norm=True, prop_attn=True)),
    ("merge", dict(size_weighted=False, prop_attn=False)),
    ("drop", {}),
    ("fuse", {}),
    ("bipartite", dict(prop_attn=True)),
    ("bipartite", dict(prop_attn=False)),
    ("merge", dict(dense=True)),  # the full-resolution residual stream: merge, compute, spread per block
    ("bipartite", dict(dense=True)),
]
LAYERS = (1, 2)  # the second reduction gets merged sizes, block 3 attends proportionally


def timm_model(method: str = "merge", **options: object) -> nn.Module:
    return tm.patch(make_model("vit"), layers=LAYERS, keep_rate=0.5, method=method, **options)


def hf_model(method: str = "merge", **options: object) -> nn.Module:
    transformers = pytest.importorskip("transformers", minversion="5")
    config = transformers.ViTConfig(
        image_size=32, patch_size=4, hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64
    )
    torch.manual_seed(0)
    model = perturb(transformers.ViTForImageClassification(config), 0)  # scores far from uniform: no near-ties
    return tm.patch(model, layers=LAYERS, keep_rate=0.5, method=method, **options)


class Plans(nn.Module):
    """Several patched models side by side, so one export covers them all (an export costs per call and per node)."""

    def __init__(self, models: list[nn.Module]) -> None:
        super().__init__()
        self.models = nn.ModuleList(models)

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        return tuple(_logits(model(x)) for model in self.models)


def _logits(out: object) -> Tensor:
    return out if isinstance(out, Tensor) else out.logits


def distinct_plans(build: Callable[..., nn.Module]) -> tuple[Plans, list[str]]:
    """Every entry of PLANS, built, without repeats (a default may equal the paper's setting, e.g. for drop)."""
    models, configs, names = [], [], []
    for method, options in PLANS:
        model = build(method, **options)
        if tm.patch_config(model) not in configs:
            models.append(model)
            configs.append(tm.patch_config(model))
            names.append(f"{method} {options}")
    return Plans(models).eval(), names


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models


@pytest.fixture(scope="module")
def images() -> Tensor:
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def onnx_outputs(path: Path, x: Tensor, threads: int = 2) -> list:
    """The file run in onnxruntime on ``threads`` intra-op threads (2: what a user's multi-core machine does)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3  # no warnings about CastLike nodes it cannot constant-fold
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})


def standard_export(model: nn.Module | torch.export.ExportedProgram, x: Tensor, path: Path, **options: object) -> None:
    """The plain dynamo call, quietly; an ExportedProgram brings its own dynamic shapes."""
    if isinstance(model, nn.Module):
        options["dynamic_shapes"] = ({0: "batch"},)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), path, dynamo=True, **options)


def assert_matches(outputs: list, expected: tuple[Tensor, ...], names: list[str], tolerance: float, what: str) -> None:
    assert len(outputs) == len(expected) == len(names)
    for name, got, want in zip(names, outputs, expected, strict=True):
        got = torch.as_tensor(got)
        error = float(abs(got - want).max())
        assert got.shape == want.shape and error < tolerance, f"{what}, {name}: max error {error:.2e}"


@pytest.mark.parametrize("family", ["timm", "hf"])
def test_every_method_exports_with_a_dynamic_batch(family: str, images: Tensor, tmp_path: Path) -> None:
    """torch.export.export with a dynamic batch, run at batch 1 and 4; then that program to ONNX: one file that
    onnxruntime runs at batch 1 and 4 to PyTorch's logits within 1e-4. Every plan sits in one graph, exported once."""
    model, names = distinct_plans(timm_model if family == "timm" else hf_model)
    # a batch of 2: torch.export fixes a dimension that is 1 in the example (torch.onnx.export works around it, below)
    exported = torch.export.export(model, (images[:2],), dynamic_shapes=({0: torch.export.Dim("batch")},))
    with torch.no_grad():
        expected = {batch: model(images[:batch]) for batch in (1, 4)}
        for batch in (1, 4):
            assert_matches(exported.module()(images[:batch]), expected[batch], names, 1e-5, f"torch.export, {batch}")
    if not HAS_ONNX:
        pytest.skip(f"torch.export part passed; {NO_ONNX}")
    path = tmp_path / "plans.onnx"
    standard_export(exported, images[:2], path, optimize=False)  # the optimiser runs in the two tests below
    assert racy_scatters(path) == []
    for batch in (1, 4):
        outputs = onnx_outputs(path, images[:batch])
        assert_matches(outputs, expected[batch], names, 1e-4, f"onnx, batch {batch}")
        repeat = onnx_outputs(path, images[:batch])
        assert all(np.array_equal(a, b) for a, b in zip(outputs, repeat, strict=True)), "2 threads: not repeatable"


def racy_scatters(path: Path) -> list[str]:
    """ScatterND nodes with a reduction: ONNX Runtime's CPU kernel runs their rows on several threads with
    unsynchronised updates, so members that share a row race (onnxruntime issues 18048, 23396)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return [
        node.name
        for node in graph.node
        if node.op_type == "ScatterND"
        and any(a.name == "reduction" and a.s not in (b"", b"none") for a in node.attribute)
    ]


def test_group_sum_under_export_equals_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under export the group sums of [B, M, C] tokens are a scatter_add (ONNX ScatterElements, serial in ONNX
    Runtime) instead of index_add_ (ScatterND, raced over threads there): the same sums, bit for bit in eager."""
    generator = torch.Generator().manual_seed(5)
    values, group = torch.randn(3, 40, 6, generator=generator), torch.randint(0, 7, (3, 40), generator=generator)
    eager = group_sum(values, group, 7)
    by_hand = torch.zeros(3, 7, 6)
    for b in range(3):
        for member in range(40):
            by_hand[b, group[b, member]] += values[b, member]
    monkeypatch.setattr(sys.modules["tokenmerge_patch.reduce"], "_IS_EXPORTING", lambda: True)
    assert exporting()
    under_export = group_sum(values, group, 7)
    assert torch.equal(under_export, eager) and torch.equal(eager, by_hand)


@needs_onnx
def test_standard_onnx_call(images: Tensor, tmp_path: Path) -> None:
    """The plain torch.onnx.export(model, (x,), path, dynamo=True, dynamic_shapes=({0: "batch"},)) of a Hugging Face
    model from a batch-1 example (transformers builds an attention mask under export: a patched layer drops it)."""
    model = hf_model().eval()
    standard_export(model, images[:1], tmp_path / "vit.onnx")
    with torch.no_grad():
        for batch in (1, 4):
            (got,) = onnx_outputs(tmp_path / "vit.onnx", images[:batch])
            torch.testing.assert_close(torch.from_numpy(got), model(images[:batch]).logits, atol=1e-4, rtol=0)


@needs_onnx
def test_export_onnx_helper(images: Tensor, tmp_path: Path) -> None:
    """tm.export_onnx with its defaults: an example of the model's input size, batch 1."""
    model = timm_model("drop").eval()
    with torch.no_grad():
        model(images[:3])
    program = tm.export_onnx(model, tmp_path / "vit.onnx")
    assert isinstance(program, torch.onnx.ONNXProgram) and (tmp_path / "vit.onnx").is_file()
    assert not list(tmp_path.glob("*.data"))  # small weights stay in the one file
    # tracing left the last eager forward's trace, not placeholder tensors of symbolic size
    assert [tuple(record.sizes.shape) for record in tm.reduction_trace(model).values()] == [(3, 33), (3, 17)]
    with torch.no_grad():
        for batch in (1, 4):
            (got,) = onnx_outputs(tmp_path / "vit.onnx", images[:batch])
            torch.testing.assert_close(torch.from_numpy(got), model(images[:batch]), atol=1e-4, rtol=0)


def test_export_refuses_random_similarity(tmp_path: Path) -> None:
    model = timm_model(similarity="random").eval()
    if HAS_ONNX:
        with pytest.raises(ValueError, match="similarity='random' cannot be exported"):
            tm.export_onnx(model, tmp_path / "random.onnx")
    with pytest.raises(NotImplementedError, match="similarity='random' cannot be exported"):
        torch.export.export(model, (torch.randn(2, 3, 32, 32),))


@needs_onnx
def test_export_onnx_bad_arguments(tmp_path: Path) -> None:
    model = timm_model().eval()
    with pytest.raises(TypeError, match="example must be a tensor"):
        tm.export_onnx(model, tmp_path / "m.onnx", example=[1, 2])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tm.export_onnx(model, tmp_path / "missing" / "m.onnx")
    with pytest.raises(ValueError, match="opset"):
        tm.export_onnx(model, tmp_path / "m.onnx", opset=0)
    with pytest.raises(TypeError, match="pass example="):
        tm.export_onnx(nn.Linear(2, 2), tmp_path / "m.onnx")


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_jit_script_refused_clearly() -> None:
    model = timm_model()
    for target in (model, model.blocks[1]):
        with pytest.raises(RuntimeError, match=r"torch\.jit\.script cannot compile .*torch\.compile"):
            torch.jit.script(target)
    tm.unpatch(model)
    assert "__prepare_scriptable__" not in model.__dict__ and "__prepare_scriptable__" not in model.blocks[1].__dict__


@needs_onnx
def test_torchscript_onnx_exporter_refused_clearly(tmp_path: Path) -> None:
    model = timm_model().eval()
    with warnings.catch_warnings(), pytest.raises(RuntimeError, match=r"dynamo=False.*cannot export.*dynamo=True"):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(2, 3, 32, 32),), tmp_path / "legacy.onnx", dynamo=False)


def test_export_order_is_the_stable_sort() -> None:
    """Under export the stable argsort is replaced by ranks from comparisons: the same order, ties included."""
    assert not exporting()
    generator = torch.Generator().manual_seed(0)
    for values in (torch.randint(0, 4, (3, 50), generator=generator).float(), torch.rand(3, 197, generator=generator)):
        torch.testing.assert_close(_descending_order_by_rank(values), descending_order(values), rtol=0, atol=0)
    keep, rest = split_crucial(torch.tensor([[0.2, 0.4, 0.2, 0.4, 0.1]]), 3)
    assert keep.tolist() == [[0, 1, 3]] and rest.tolist() == [[2, 4]]  # equal scores: the lower index first
