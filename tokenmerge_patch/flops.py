"""FLOP counting that is right for fused attention: fvcore plus a handle for
``aten::scaled_dot_product_attention`` (fvcore has none, so a fused DeiT-S counts 4.25 G instead of 4.61 G).

Counts follow fvcore's convention: one multiply-add is one flop; element-wise ops, softmax, sorting and
gathers count zero. :func:`count_flops` works on patched and unpatched models and reports every block's
tokens and flops, next to an analytic cross-check.

>>> import timm
>>> report = count_flops(timm.create_model("deit_small_patch16_224"))
>>> round(report.total / 1e9, 2), round(report.analytic / 1e9, 2)
(4.61, 4.6)
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from math import prod
from numbers import Integral

import numpy as np
import torch
from torch import Tensor, nn

from .backends import find_backend, image_model
from .multiscale import analytic_extra_flops, has_multiscale
from .utils import eval_mode


def sdpa_flop_jit(inputs: list, outputs: list) -> int:
    """fvcore handle for ``aten::scaled_dot_product_attention``: ``q @ k^T`` plus ``attn @ v``.

    q ``[..., L, d]``, k ``[..., S, d]``, v ``[..., S, d_v]``: ``prod(...) * L * S * (d + d_v)``.
    """
    from fvcore.nn.jit_handles import get_shape

    q_shape, k_shape, v_shape = (get_shape(value) for value in inputs[:3])
    *batch, length, depth = q_shape
    source = k_shape[-2]
    return prod(batch) * length * source * (depth + v_shape[-1])


def native_mha_flop_jit(inputs: list, outputs: list) -> int:
    """fvcore handle for ``aten::_native_multi_head_attention``, the fused kernel ``nn.MultiheadAttention`` runs in
    eval without grad (open_clip's blocks): query ``[B, L, E]``, key and value ``[B, S, E]``; the q, k, v and output
    projections plus ``q @ k^T`` and ``attn @ v``."""
    from fvcore.nn.jit_handles import get_shape

    *batch, length, embed = get_shape(inputs[0])
    source = get_shape(inputs[1])[-2]
    return prod(batch) * ((2 * length + 2 * source) * embed * embed + 2 * length * source * embed)


class _TensorOutput(nn.Module):
    """Traceable view of a model whose forward returns a dataclass / dict (Hugging Face) or a list of feature maps."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, ...]:
        out = self.model(x)
        if isinstance(out, Tensor):
            return out
        if isinstance(out, list):  # timm features_only: one feature map per taken block
            return tuple(out)
        if isinstance(out, tuple):
            return out[0]
        maps = getattr(out, "feature_maps", None)  # a Hugging Face backbone
        if isinstance(maps, tuple) and maps:
            return maps
        for key in ("logits", "image_embeds", "last_hidden_state"):
            value = getattr(out, key, None)
            if isinstance(value, Tensor):
                return value
        raise TypeError(f"cannot count flops of a model returning {type(out).__name__}")


@dataclass
class BlockFlops:
    """One transformer block: tokens entering and leaving it, and its flops for one image."""

    index: int
    tokens_in: int
    tokens_out: int
    flops: int


@dataclass
class FlopReport:
    """What :func:`count_flops` returns (counts for one image).

    Attributes:
        total: fvcore's count with the SDPA handle.
        blocks: per-block tokens and flops.
        analytic: ``12 N D^2 + 2 N^2 D`` per block (with the real attention / MLP widths and per-block
            token counts) plus patch embedding and head; a cross-check of ``total``.
        unsupported: ops fvcore skipped (element-wise ops; none of them multiply-adds), with counts.
    """

    total: int
    blocks: list[BlockFlops]
    analytic: int
    unsupported: dict[str, int] = field(default_factory=dict)

    @property
    def gflops(self) -> float:
        return self.total / 1e9

    @property
    def outside_blocks(self) -> int:
        """Patch embedding, final norm, head (and any reduction overhead outside blocks)."""
        return self.total - sum(block.flops for block in self.blocks)

    def __str__(self) -> str:
        lines = ["| block | tokens in | tokens out | GFLOPs |", "|---:|---:|---:|---:|"]
        lines += [f"| {b.index} | {b.tokens_in} | {b.tokens_out} | {b.flops / 1e9:.4f} |" for b in self.blocks]
        lines.append(f"| embed + head | | | {self.outside_blocks / 1e9:.4f} |")
        lines.append(f"| **total** | | | **{self.gflops:.3f}** |")
        drift = self.analytic / self.total - 1 if self.total else 0.0
        lines.append(f"\nanalytic cross-check: {self.analytic / 1e9:.3f} GFLOPs ({drift:+.2%})")
        return "\n".join(lines)


def _example(model: nn.Module, input_size: Sequence[int] | Tensor) -> Tensor:
    if isinstance(input_size, Tensor):
        return input_size
    allowed = "(channels, height, width), three integers (int or numpy integer, not bool), or an example tensor"
    if isinstance(input_size, np.ndarray) and input_size.ndim == 1:
        input_size = tuple(input_size.tolist())  # a numpy array of sizes: its elements as Python numbers
    if not isinstance(input_size, Sequence) or isinstance(input_size, str) or len(input_size) != 3:
        raise TypeError(f"input_size must be {allowed}, got {input_size!r}")
    for value in input_size:
        if isinstance(value, bool) or not isinstance(value, Integral):  # numpy integers are Integral
            raise TypeError(f"input_size must be {allowed}, got {input_size!r} (holding a {type(value).__name__})")
    if any(value < 1 for value in input_size):
        raise ValueError(f"input_size must be {allowed}, each >= 1, got {input_size!r}")
    param = next(model.parameters())
    generator = torch.Generator().manual_seed(0)
    return torch.randn(1, *(int(v) for v in input_size), generator=generator).to(param.device, param.dtype)


@torch.no_grad()
def count_flops(model: nn.Module, input_size: Sequence[int] | Tensor = (3, 224, 224)) -> FlopReport:
    """Flops of one forward (fvcore convention: one multiply-add = one flop), per image.

    Args:
        model: a supported ViT, patched or not (fused attention may stay on).
        input_size: ``(C, H, W)`` for a batch of one (``numbers.Integral`` values, numpy integers included),
            or an example input (its flops are divided by its batch size).

    Raises:
        TypeError: ``input_size`` neither three integers nor a Tensor.
        ValueError: a size below 1.

    Example:
        >>> import timm, tokenmerge_patch
        >>> model = tokenmerge_patch.patch(timm.create_model("deit_small_patch16_224"), keep_rate=0.7)
        >>> report = count_flops(model)
        >>> round(report.gflops, 2), [b.tokens_out for b in report.blocks][2:5]
        (3.01, [197, 139, 139])
    """
    with warnings.catch_warnings():  # fvcore's import touches deprecated torch.jit APIs
        warnings.simplefilter("ignore")
        from fvcore.nn import FlopCountAnalysis

    backend = find_backend(model)
    example = _example(model, input_size)
    batch = example.shape[0]
    wrapper = _TensorOutput(image_model(model))  # a CLIPModel: its image features
    blocks = list(backend.blocks(model))
    tokens: dict[int, tuple[int, int]] = {}

    def recorder(index: int):
        def hook(_module: nn.Module, args: tuple, output: object) -> None:
            tokens[index] = (int(backend.tokens_of(args[0])), int(backend.tokens_of(output)))

        return hook

    handles = [block.register_forward_hook(recorder(i)) for i, block in enumerate(blocks)]
    try:
        with eval_mode(model), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            analysis = FlopCountAnalysis(wrapper, (example,))
            analysis.set_op_handle("aten::scaled_dot_product_attention", sdpa_flop_jit)
            analysis.set_op_handle("aten::_native_multi_head_attention", native_mha_flop_jit)
            analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
            total = analysis.total()
            by_module = analysis.by_module()
            unsupported = dict(analysis.unsupported_ops())
    finally:
        for handle in handles:
            handle.remove()
    names = {module: name for name, module in wrapper.named_modules()}
    per_block = [BlockFlops(i, *tokens[i], by_module.get(names[block], 0) // batch) for i, block in enumerate(blocks)]
    analytic = analytic_flops(model, [(b.tokens_in, b.tokens_out) for b in per_block], example)
    return FlopReport(total // batch, per_block, analytic, unsupported)


def _linear_macs(module: nn.Module) -> int:
    """Multiply-adds per token of ``module``'s linear layers, packed q/k/v projections (``in_proj_weight`` of
    ``nn.MultiheadAttention`` and open_clip's ``Attention``) included."""
    total = 0
    for m in module.modules():
        if isinstance(m, nn.Linear):
            total += m.in_features * m.out_features
        packed = m._parameters.get("in_proj_weight")
        total += 0 if packed is None else packed.numel()
    return total


def analytic_flops(model: nn.Module, block_tokens: Sequence[tuple[int, int]], example: Tensor) -> int:
    """``12 N D^2 + 2 N^2 D`` per block, written with the real widths: the attention's projections and
    its ``2 N^2 A`` run on the tokens entering a block, the MLP on those leaving it; plus the patch
    embedding (the first convolution) and every linear layer outside the blocks (head, pooler), once per
    image. Norms, element-wise ops and the reduction's own O(N D) work are left out. Of a multimodal model only the
    image side counts (``backends.image_model``).
    """
    backend = find_backend(model)
    blocks = list(backend.blocks(model))
    total = 0
    for (n_in, n_out), block in zip(block_tokens, blocks, strict=True):
        attention, mlp, width = backend.block_parts(block)
        total += n_in * _linear_macs(attention) + 2 * n_in * n_in * width + n_out * _linear_macs(mlp)
    if has_multiscale(model):  # blocks are uniform in a timm ViT: read the widths off the first
        attention, mlp, width = backend.block_parts(blocks[0])
        total += analytic_extra_flops(model, example, _linear_macs(attention), width, _linear_macs(mlp))
    inside = {id(m) for block in blocks for m in block.modules()}
    outside = [m for m in image_model(model).modules() if id(m) not in inside]
    total += sum(m.in_features * m.out_features for m in outside if isinstance(m, nn.Linear))
    conv = next((m for m in outside if isinstance(m, nn.Conv2d)), None)
    if conv is not None:
        height, width = example.shape[-2] // conv.stride[0], example.shape[-1] // conv.stride[1]
        kernel = conv.in_channels // conv.groups * conv.kernel_size[0] * conv.kernel_size[1]
        total += height * width * kernel * conv.out_channels
    return total
