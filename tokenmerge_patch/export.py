"""Deploy a patched model: ONNX with a dynamic batch dimension.

The standard exporters work on a patched model as they are: ``torch.export.export`` and
``torch.onnx.export(model, (x,), path, dynamo=True, dynamic_shapes=({0: "batch"},))``. The reduction only uses
operators with ONNX translations under export (see :func:`tokenmerge_patch.reduce.exporting`), and the per-forward
bookkeeping that travels on the token tensors is plain Python, which the tracing runs like eager code.

:func:`export_onnx` wraps that call and makes its failure modes explicit: it traces at batch 2 when given a
batch-1 example (``torch.export`` would otherwise fix a batch of 1 into the graph) and raises if the batch
dimension does not stay dynamic, instead of the ONNX exporter's silent retry with a fixed batch.
``torch.jit.script`` and the TorchScript-based ``torch.onnx.export(..., dynamo=False)`` of a patched model are
refused with a clear message (use ``torch.compile``, or the exporters above).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from .backends import image_model
from .model_info import describe
from .patch import patch_config


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    example: Tensor | None = None,
    *,
    dynamic_batch: bool = True,
    opset: int | None = None,
) -> torch.onnx.ONNXProgram:
    """Export ``model`` (patched or not) to an ONNX file whose batch dimension is dynamic: one file serves every
    batch size. Needs the ``export`` extra (``pip install "tokenmerge_patch[export]"``: onnx, onnxscript; running the
    file needs onnxruntime).

    Every method exports (``"merge"`` with ``"cosine"``, ``"l1"``, ``"l2"`` or ``"attention"`` similarity,
    ``"drop"``, ``"fuse"``, ``"bipartite"``), with or without ``size_weighted`` / ``keep_norm`` / ``prop_attn`` /
    ``merge_into_cls``; ``similarity="random"`` is refused (it draws from a seeded generator at run time). The same
    holds for ``torch.export.export`` and ``torch.onnx.export(..., dynamo=True)`` called directly.

    Args:
        model: the model to export, in the mode it should run in (call ``model.eval()`` first for inference). For a
            CLIP model (Hugging Face ``CLIPModel``, open_clip ``CLIP``) its image side is exported: images in, image
            features out (``get_image_features`` / ``model.visual``).
        path: the ``.onnx`` file to write (its folder must exist); weights are stored inside it unless the model
            is over 2 GB, then next to it.
        example: an input batch ``[B, C, H, W]`` with the model's dtype and device; ``None``: zeros of the size the
            model is built for (timm and Hugging Face models that :func:`~tokenmerge_patch.patch` supports), batch 1.
        dynamic_batch: keep dim 0 of the input (and of every output) symbolic; ``False`` fixes the example's batch.
        opset: the ONNX opset (``None``: the exporter's default, 18; ``keep_norm``'s per-group maximum is a
            ``ScatterElements`` with ``reduction="max"``, which needs 18 or later).

    Returns:
        The ``torch.onnx.ONNXProgram`` (already saved to ``path``): ``program.model`` is the ONNX graph, and
        ``program(x)`` runs it in onnxruntime.

    Raises:
        ImportError: onnx or onnxscript is not installed.
        TypeError / ValueError: bad arguments, or a patch that cannot be exported (``similarity="random"``).
        RuntimeError: the batch dimension could not stay dynamic.

    Example (exporting DeiT-T takes under a minute on 2 CPU cores, too slow for a doctest)::

        import onnxruntime, timm, torch, tokenmerge_patch as tm

        model = tm.patch(timm.create_model("deit_tiny_patch16_224").eval(), keep_rate=0.7)
        tm.export_onnx(model, "deit_tiny_tm.onnx")
        session = onnxruntime.InferenceSession("deit_tiny_tm.onnx")  # the file alone, any batch size
        x = torch.randn(4, 3, 224, 224)
        logits = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        # within 1e-4 of PyTorch, unless float noise tips a near-tied selection (README: runtime agreement)
        assert abs(logits - model(x).detach().numpy()).max() < 1e-4
    """
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as error:
        raise ImportError(
            f"export_onnx needs onnx and onnxscript ({error.name} is missing): pip install 'tokenmerge_patch[export]'"
        ) from error
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    config = patch_config(model)
    if config is not None and config.similarity == "random":
        raise ValueError(
            "a model patched with similarity='random' cannot be exported: it draws from a seeded torch.Generator at "
            "run time, which torch.export and ONNX cannot capture. Patch it with another similarity ('cosine', 'l1', "
            "'l2' or 'attention') to export it."
        )
    if example is None:
        example = _default_example(model)
    if not isinstance(example, Tensor) or example.dim() < 1 or example.shape[0] < 1:
        raise TypeError(
            "example must be a tensor holding a batch of at least one input (e.g. torch.randn(1, 3, 224, 224)), got "
            f"{type(example).__name__ if not isinstance(example, Tensor) else tuple(example.shape)}"
        )
    if not isinstance(dynamic_batch, bool):
        raise TypeError(f"dynamic_batch must be a bool, got {type(dynamic_batch).__name__}")
    if opset is not None and (isinstance(opset, bool) or not isinstance(opset, int) or opset < 1):
        raise ValueError(f"opset must be a positive int or None, got {opset!r}")
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"the folder to write {path.name} into does not exist: {path.parent}")

    with contextlib.suppress(TypeError):  # a model tokenmerge_patch does not know is exported as it is
        model = image_model(model)  # CLIP: its image side (the forward wants text too)
    trace = example
    if dynamic_batch and example.shape[0] == 1:
        # torch.export specialises a dimension that is 1 in the example: trace a batch of 2 instead
        trace = example.expand(2, *example.shape[1:]).clone()
    dynamic_shapes = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
    try:
        exported = torch.export.export(model, (trace,), dynamic_shapes=dynamic_shapes, strict=False)
    except torch._dynamo.exc.UserError as error:
        raise RuntimeError(
            f"the batch dimension of {type(model).__name__} could not stay dynamic under torch.export (something in "
            f"its forward depends on the batch size); export with dynamic_batch=False to fix the batch. {error}"
        ) from error
    program = torch.onnx.export(exported, (trace,), dynamo=True, opset_version=opset, verbose=False)
    program.save(path)
    return program


def _default_example(model: nn.Module) -> Tensor:
    """Zeros of the input size the model is built for (batch 1), in its parameters' dtype and device."""
    try:
        size = describe(model).input_size
    except TypeError as error:
        raise TypeError(
            f"pass example=...: tokenmerge_patch knows the input size only of the models it can patch ({error})"
        ) from None
    parameter = next(model.parameters(), None)
    dtype = parameter.dtype if parameter is not None and parameter.is_floating_point() else torch.float32
    device = parameter.device if parameter is not None else torch.device("cpu")
    return torch.zeros(1, *size, dtype=dtype, device=device)
