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

import torch
from torch import Tensor, nn

from .model_info import ModelInfo, check_input_size, describe
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
    size = check_input_size(input_size)
    param = next(model.parameters())
    generator = torch.Generator().manual_seed(0)
    return torch.randn(1, *size, generator=generator).to(param.device, param.dtype)


@torch.no_grad()
def count_flops(model: nn.Module, input_size: Sequence[int] | Tensor | None = None) -> FlopReport:
    """Flops of one forward (fvcore convention: one multiply-add = one flop), per image.

    Counting runs one traced forward; it does not change what :func:`~tokenmerge_patch.reduction_trace` reports.

    Args:
        model: a supported ViT, patched or not (fused attention may stay on).
        input_size: ``(C, H, W)`` for a batch of one (``numbers.Integral`` values, numpy integers included),
            or an example input (its flops are divided by its batch size); ``None``: the size the model is built
            for (:func:`~tokenmerge_patch.describe`), the size ``patch(model, flops=...)`` budgets at.

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
    info = describe(model)
    model, backend = info.model, info.backend
    example = _example(model, info.input_size if input_size is None else input_size)
    batch = example.shape[0]
    wrapper = _TensorOutput(info.images)  # a CLIPModel: its image features
    blocks = list(backend.blocks(model))
    tokens: dict[int, tuple[int, int]] = {}

    def recorder(index: int):
        def hook(_module: nn.Module, args: tuple, output: object) -> None:
            tokens[index] = (int(backend.tokens_of(args[0])), int(backend.tokens_of(output)))

        return hook

    handles = [block.register_forward_hook(recorder(i)) for i, block in enumerate(blocks)]
    try:
        with eval_mode(model):
            total, by_module, unsupported = _fvcore(wrapper, example)
    finally:
        for handle in handles:
            handle.remove()
    names = {module: name for name, module in wrapper.named_modules()}
    per_block = [BlockFlops(i, *tokens[i], by_module.get(names[block], 0) // batch) for i, block in enumerate(blocks)]
    analytic = analytic_flops(info, [(b.tokens_in, b.tokens_out) for b in per_block], example)
    return FlopReport(total // batch, per_block, analytic, unsupported)


def _fvcore(module: nn.Module, example: Tensor) -> tuple[int, dict[str, int], dict[str, int]]:
    """fvcore's count of ``module(example)`` with the handles for fused attention: total, per module, skipped ops."""
    with warnings.catch_warnings():  # fvcore's import touches deprecated torch.jit APIs
        warnings.simplefilter("ignore")
        from fvcore.nn import FlopCountAnalysis

        analysis = FlopCountAnalysis(module, (example,))
        analysis.set_op_handle("aten::scaled_dot_product_attention", sdpa_flop_jit)
        analysis.set_op_handle("aten::_native_multi_head_attention", native_mha_flop_jit)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
        return analysis.total(), analysis.by_module(), dict(analysis.unsupported_ops())


@torch.no_grad()
def count_module_flops(module: nn.Module, example: Tensor) -> int:
    """fvcore's count of ``module(example)`` (one multiply-add = one flop, fused attention counted), for the whole
    batch: any module with a tensor input, e.g. a language model over input embeddings."""
    with eval_mode(module):
        return _fvcore(_TensorOutput(module), example)[0]


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


def analytic_flops(info: ModelInfo, block_tokens: Sequence[tuple[int, int]], example: Tensor) -> int:
    """``12 N D^2 + 2 N^2 D`` per block, written with the real widths: the attention's projections and
    its ``2 N^2 A`` run on the tokens entering a block, the MLP on those leaving it; plus the patch
    embedding (the first convolution) and every linear layer outside the blocks (head, pooler), once per
    image. Norms, element-wise ops and the reduction's own O(N D) work are left out. Of a multimodal model only the
    image side counts (``info.images``).
    """
    model, backend = info.model, info.backend
    blocks = list(backend.blocks(model))
    total = 0
    for (n_in, n_out), block in zip(block_tokens, blocks, strict=True):
        attention, mlp, width = backend.block_parts(block)
        total += n_in * _linear_macs(attention) + 2 * n_in * n_in * width + n_out * _linear_macs(mlp)
    if has_multiscale(model):  # blocks are uniform in a timm ViT: read the widths off the first
        attention, mlp, width = backend.block_parts(blocks[0])
        total += analytic_extra_flops(model, example, _linear_macs(attention), width, _linear_macs(mlp))
    inside = {id(m) for block in blocks for m in block.modules()}
    outside = [m for m in info.images.modules() if id(m) not in inside]
    total += sum(m.in_features * m.out_features for m in outside if isinstance(m, nn.Linear))
    conv = next((m for m in outside if isinstance(m, nn.Conv2d)), None)
    if conv is not None:
        height, width = example.shape[-2] // conv.stride[0], example.shape[-1] // conv.stride[1]
        kernel = conv.in_channels // conv.groups * conv.kernel_size[0] * conv.kernel_size[1]
        total += height * width * kernel * conv.out_channels
    return total
