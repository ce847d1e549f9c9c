"""The token reduction, written once: pure tensor functions on ``[B, N, C]`` with no model knowledge.

A reducing block hands over the tokens ``x`` (after its attention residual), the queries and keys of
its attention (after any q/k norm) and the softmax scale. Everything else happens here:

1. :func:`class_attention` — row 0 of the block's post-softmax attention, averaged over heads;
2. :func:`split_crucial` — the ``k = ceil(keep_rate * N_patch)`` patch tokens with the highest score;
3. :func:`reduce_tokens` — merge every other token into its most similar crucial token (eq. 4 of
   arXiv 2306.04897), or drop it.

Prefix tokens (class, distillation, register tokens) are the first ``num_prefix`` tokens; they are
never reduced. Bookkeeping travels with the tokens: ``sizes`` (how many original patches each token
holds) and, optionally, ``source`` (for each original patch, the index of the token that holds it).

Example:
    >>> import torch
    >>> x = torch.randn(2, 1 + 16, 8)                 # class token + 16 patches
    >>> q, k = torch.randn(2, 4, 17, 2), torch.randn(2, 4, 17, 2)
    >>> out = reduce_tokens(x, q, k, scale=2 ** -0.5, num_prefix=1, keep_rate=0.5)
    >>> out.x.shape, out.sizes.sum(dim=1)
    (torch.Size([2, 9, 8]), tensor([17., 17.]))
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

METHODS = ("merge", "drop")


def kept_count(num_patches: int, keep_rate: float) -> int:
    """Number of crucial tokens: ``ceil(keep_rate * num_patches)``, at least 1.

    The small epsilon keeps float noise from rounding up: ``0.7 * 140`` is ``98.00000000000001``.

    >>> kept_count(196, 0.7), kept_count(138, 0.7), kept_count(140, 0.7)
    (138, 97, 98)
    """
    return max(1, min(num_patches, math.ceil(keep_rate * num_patches - 1e-9)))


def class_attention(q: Tensor, k: Tensor, scale: float, attn_bias: Tensor | None = None) -> Tensor:
    """The class token's attention row, post-softmax over all N tokens, averaged over heads.

    Only the class query is multiplied with the keys, so this costs O(N * D) next to the block's
    O(N^2 * D) attention, and fused (SDPA) attention can stay on.

    Args:
        q: queries ``[B, H, N, d]`` (only ``q[:, :, 0]`` is read).
        k: keys ``[B, H, N, d]``.
        scale: the softmax scale (``head_dim ** -0.5`` for standard attention).
        attn_bias: optional additive float bias broadcastable to ``[B, H, 1, N]`` (row 0 of a mask).

    Returns:
        ``[B, N]`` float32 scores: ``mean_h softmax(q_cls * scale @ k^T)``; each row sums to 1.
    """
    # k @ q_cls^T rather than q_cls @ k^T: k is a strided view of the fused qkv projection, and only
    # this order lets the matmul read it in place instead of copying it (4x faster on CPU).
    logits = (k.float() @ (q[:, :, :1].float() * scale).transpose(-2, -1)).squeeze(-1)  # [B, H, N]
    if attn_bias is not None:
        logits = logits + attn_bias.float().squeeze(-2)
    return logits.softmax(dim=-1).mean(dim=1)


def split_crucial(patch_scores: Tensor, keep: int) -> tuple[Tensor, Tensor]:
    """Indices of the ``keep`` highest-scoring patch tokens (ascending, so spatial order survives)
    and of the others (in descending score order).

    >>> s = torch.tensor([[0.1, 0.4, 0.2, 0.3]])
    >>> split_crucial(s, 2)
    (tensor([[1, 3]]), tensor([[2, 0]]))
    """
    order = patch_scores.argsort(dim=1, descending=True, stable=True)
    return order[:, :keep].sort(dim=1).values, order[:, keep:]


def gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    """``x[b, index[b, j]]`` for ``x`` of shape ``[B, N, C]`` and ``index`` of shape ``[B, M]``.

    A row ``index_select`` on the flattened tokens: several times faster on CPU than ``torch.gather``
    with an expanded index, and its backward is an ``index_add``.
    """
    batch, num_tokens, channels = x.shape
    offsets = torch.arange(batch, device=x.device).unsqueeze(1) * num_tokens
    return (
        x.reshape(batch * num_tokens, channels).index_select(0, (index + offsets).reshape(-1)).view(batch, -1, channels)
    )


def cosine_assignment(tokens: Tensor, targets: Tensor) -> Tensor:
    """For each token, the index of the target with the highest cosine similarity: ``[B, M]``."""
    similarity = F.normalize(tokens, dim=-1) @ F.normalize(targets, dim=-1).transpose(1, 2)
    return similarity.argmax(dim=-1)


def group_sum(values: Tensor, group: Tensor, num_groups: int) -> Tensor:
    """``out[b, g] = sum_{i: group[b, i] = g} values[b, i]`` for ``values`` ``[B, M]`` or ``[B, M, C]``."""
    batch, members = group.shape
    flat_group = (group + torch.arange(batch, device=group.device).unsqueeze(1) * num_groups).reshape(-1)
    flat = values.reshape(batch * members, *values.shape[2:])
    out = flat.new_zeros(batch * num_groups, *values.shape[2:]).index_add_(0, flat_group, flat)
    return out.view(batch, num_groups, *values.shape[2:])


def group_weighted_mean(tokens: Tensor, weights: Tensor, group: Tensor, num_groups: int) -> Tensor:
    """Eq. 4 for every group at once: ``m_g = sum_{i in g} w_i x_i / sum_{i in g} w_i``.

    Args:
        tokens: ``[B, M, C]``; weights: ``[B, M]``; group: ``[B, M]`` group index in ``0..num_groups-1``
            (every group must hold at least one token of positive weight).
    """
    weights = weights.to(tokens.dtype)
    numerator = group_sum(tokens * weights.unsqueeze(-1), group, num_groups)
    return numerator / group_sum(weights, group, num_groups).unsqueeze(-1)


@dataclass
class Reduced:
    """What :func:`reduce_tokens` returns.

    Attributes:
        x: ``[B, P + K, C]`` prefix tokens, then the kept (merged) patch tokens in spatial order.
        sizes: ``[B, P + K]`` float: how many original tokens each output token holds.
        source: ``[B, N0]`` long or ``None``: for each original patch, the index into ``x`` of the token
            that holds it, ``-1`` if it was dropped.
        keep_index: ``[B, K]`` which input patch tokens were crucial (indices among the patch tokens).
    """

    x: Tensor
    sizes: Tensor
    source: Tensor | None
    keep_index: Tensor


def reduce_tokens(
    x: Tensor,
    q: Tensor,
    k: Tensor,
    scale: float,
    *,
    num_prefix: int,
    keep_rate: float,
    method: str = "merge",
    merge_into_cls: bool = False,
    sizes: Tensor | None = None,
    source: Tensor | None = None,
    trace_source: bool = False,
) -> Reduced:
    """Keep the crucial tokens and merge (or drop) the rest. Batched, differentiable in ``x``, ``q``, ``k``.

    Args:
        x: ``[B, N, C]`` tokens after the block's attention residual.
        q, k: ``[B, H, N, d]`` the block's queries and keys (after q/k norm).
        scale: the attention's softmax scale.
        num_prefix: number of leading prefix tokens (class first), never reduced.
        keep_rate: fraction of patch tokens kept as crucial, in (0, 1].
        method: ``"merge"`` (eq. 4, the paper) or ``"drop"`` (keep the crucial tokens only).
        merge_into_cls: let the class token absorb non-crucial tokens too (the paper's literal reading;
            its weight is its attention to itself). Off by default: prefix tokens stay untouched.
        sizes: ``[B, N]`` tokens' sizes so far, ``None`` for all ones.
        source: ``[B, N0]`` source map so far, ``None`` for the identity (with ``trace_source``).
        trace_source: compute the source map.

    >>> x = torch.randn(1, 5, 3); q = k = torch.randn(1, 1, 5, 3)
    >>> reduce_tokens(x, q, k, 1.0, num_prefix=1, keep_rate=0.5, method="drop").x.shape
    torch.Size([1, 3, 3])
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    batch, num_tokens, _ = x.shape
    num_patches = num_tokens - num_prefix
    if sizes is None:
        sizes = x.new_ones(batch, num_tokens, dtype=torch.float32)
    if trace_source and source is None:
        source = torch.arange(num_prefix, num_tokens, device=x.device).expand(batch, -1)
    keep = kept_count(num_patches, keep_rate)
    if keep == num_patches:  # nothing to reduce: the block behaves exactly as unpatched
        all_patches = torch.arange(num_patches, device=x.device).expand(batch, -1)
        return Reduced(x, sizes, source, all_patches)

    scores = class_attention(q, k, scale)  # [B, N]
    keep_index, rest_index = split_crucial(scores[:, num_prefix:], keep)
    if method == "drop":
        out = torch.cat([x[:, :num_prefix], gather_tokens(x, keep_index + num_prefix)], dim=1)
        out_sizes = torch.cat([sizes[:, :num_prefix], sizes[:, num_prefix:].gather(1, keep_index)], dim=1)
        survivors, landing = keep_index, num_prefix  # the kept patches, in order after the prefix
    else:
        # The merge set: the patch tokens, with the class token in front when it may absorb tokens.
        # Targets are the crucial tokens (and the class token); every member joins exactly one target.
        target_x, other_x = keep_index + num_prefix, rest_index + num_prefix  # indices into x
        if merge_into_cls:

            def pick(t: Tensor) -> Tensor:
                return torch.cat([t[:, :1], t[:, num_prefix:]], dim=1)

            members_x, weights, member_sizes = pick(x), pick(scores), pick(sizes)
            targets = torch.cat([keep_index.new_zeros(batch, 1), keep_index + 1], dim=1)
            others = rest_index + 1
            target_x = torch.cat([keep_index.new_zeros(batch, 1), target_x], dim=1)
        else:
            members_x, weights, member_sizes = x[:, num_prefix:], scores[:, num_prefix:], sizes[:, num_prefix:]
            targets, others = keep_index, rest_index
        num_targets = targets.shape[1]
        # argmax of cosine similarity: a token's own norm does not change its ranking of the targets
        unit_targets = F.normalize(gather_tokens(x, target_x), dim=-1)
        similarity = gather_tokens(x, other_x) @ unit_targets.transpose(1, 2)
        group = torch.empty_like(weights, dtype=torch.long)
        group.scatter_(1, targets, torch.arange(num_targets, device=x.device).expand(batch, -1))
        group.scatter_(1, others, similarity.argmax(dim=-1))
        merged = group_weighted_mean(members_x, weights, group, num_targets)
        merged_sizes = group_sum(member_sizes, group, num_targets)
        if merge_into_cls:  # group 0 is the class token
            out = torch.cat([merged[:, :1], x[:, 1:num_prefix], merged[:, 1:]], dim=1)
            out_sizes = torch.cat([merged_sizes[:, :1], sizes[:, 1:num_prefix], merged_sizes[:, 1:]], dim=1)
            patch_group = group[:, 1:]
            landing = torch.where(patch_group == 0, 0, patch_group - 1 + num_prefix)
        else:
            out = torch.cat([x[:, :num_prefix], merged], dim=1)
            out_sizes = torch.cat([sizes[:, :num_prefix], merged_sizes], dim=1)
            landing = group + num_prefix
        survivors = None  # every patch lands in some token

    if source is not None:
        source = move_source(source, num_prefix, num_tokens, survivors, landing)
    return Reduced(out, out_sizes, source, keep_index)


def move_source(
    source: Tensor, num_prefix: int, num_tokens: int, patches: Tensor | None, position: Tensor | int
) -> Tensor:
    """Follow each original patch to its new token. ``source[b, p]`` indexes the input tokens (or is -1);
    the result indexes the output tokens.

    Args:
        patches: which input patch tokens survive (``[B, K]``, the others are dropped), or ``None``: all
            patch tokens land somewhere.
        position: where they land: ``[B, K]`` (or ``[B, N_patch]`` with ``patches=None``), or an int
            offset added to ``arange(K)``.
    """
    batch = source.shape[0]
    new_position = torch.full((batch, num_tokens), -1, dtype=torch.long, device=source.device)
    new_position[:, :num_prefix] = torch.arange(num_prefix, device=source.device)
    if patches is None:
        new_position[:, num_prefix:] = position
    else:
        if isinstance(position, int):
            position = torch.arange(position, position + patches.shape[1], device=source.device).expand(batch, -1)
        new_position.scatter_(1, patches + num_prefix, position)
    return torch.where(source >= 0, new_position.gather(1, source.clamp(min=0)), source)


def size_weighted_mean(tokens: Tensor, sizes: Tensor) -> Tensor:
    """Mean over dim 1 with each token counted as often as the patches it holds: ``[B, N, C] -> [B, C]``.

    After a merge this equals the plain mean the unpatched model would take over its patches, when the
    merged token stands for its patches' average.
    """
    weights = sizes.to(tokens.dtype).unsqueeze(-1)
    return (tokens * weights).sum(dim=1) / weights.sum(dim=1)
