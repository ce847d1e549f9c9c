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
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

METHODS = ("merge", "drop", "fuse", "bipartite")
SIMILARITIES = ("cosine", "l1", "l2", "attention", "random")
SCORES = ("cls", "received")
# received_attention builds the attention matrix a few heads at a time: at most this many float32 elements at once
_RECEIVED_CHUNK = 1 << 24


def kept_count(num_patches: int, keep_rate: float) -> int:
    """Number of crucial tokens: ``ceil(keep_rate * num_patches)``, at least 1.

    The small epsilon keeps float noise from rounding up: ``0.7 * 140`` is ``98.00000000000001``.

    >>> kept_count(196, 0.7), kept_count(138, 0.7), kept_count(140, 0.7)
    (138, 97, 98)
    """
    # int(): under torch.jit.trace (fvcore) a size is a 0-dim tensor, and float32 arithmetic would round
    # exact ratios such as 15/19 * 19 up to 16
    num_patches = int(num_patches)
    return max(1, min(num_patches, math.ceil(float(keep_rate) * num_patches - 1e-9)))


def reduced_patch_count(num_patches: int, keep_rate: float, method: str = "merge") -> int:
    """Patch tokens leaving a reducing block that gets ``num_patches``: the ``kept_count`` crucial tokens, plus
    the fused token for ``"fuse"``; ``"bipartite"`` merges at most half of them.

    >>> reduced_patch_count(196, 0.7), reduced_patch_count(196, 0.7, "fuse"), reduced_patch_count(196, 0.3, "bipartite")
    (138, 139, 98)
    """
    keep = kept_count(num_patches, keep_rate)
    if method == "bipartite":
        keep = max(keep, num_patches - num_patches // 2)
    return keep + 1 if method == "fuse" and keep < num_patches else keep


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


def received_attention(
    q: Tensor, k: Tensor, scale: float, attn_bias: Tensor | None = None, query_weights: Tensor | None = None
) -> Tensor:
    """How much attention each token receives: the post-softmax attention averaged over heads and over the queries
    (each query weighted by ``query_weights``, e.g. how many patches a merged token holds), exactly. The score for
    models without a class token (SigLIP), where no token's row says what the image is about.

    It needs the whole attention matrix, which fused (SDPA) attention never builds: it is recomputed from the
    block's own queries and keys, a few heads at a time, for ``N^2 * d`` multiply-adds per head (half of what the
    attention itself costs; :func:`~tokenmerge_patch.count_flops` counts it).

    Args:
        q, k: ``[B, H, N, d]``.
        scale: the softmax scale.
        attn_bias: optional additive bias broadcastable to ``[B, H, N, N]`` (proportional attention's ``[B, 1, 1, N]``).
        query_weights: ``[B, N]`` non-negative weights of the queries, ``None`` for equal weights.

    Returns:
        ``[B, N]`` float32; each row sums to 1.

    >>> q, k = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4)
    >>> full = ((q @ k.transpose(-2, -1)) * 0.5).softmax(-1)  # [B, H, N, N]
    >>> torch.allclose(received_attention(q, k, 0.5), full.mean(dim=(1, 2)), atol=1e-6)
    True
    """
    batch, heads, count, _ = q.shape
    weights = q.new_ones(batch, count, dtype=torch.float32) if query_weights is None else query_weights.float()
    weights = (weights / weights.sum(dim=1, keepdim=True)).unsqueeze(1).unsqueeze(2)  # [B, 1, 1, N]
    step = max(1, min(heads, _RECEIVED_CHUNK // max(1, batch * count * count)))
    received = q.new_zeros(batch, count, dtype=torch.float32)
    for start in range(0, heads, step):
        logits = (q[:, start : start + step].float() * scale) @ k[:, start : start + step].float().transpose(-2, -1)
        if attn_bias is not None:
            bias = attn_bias.float()
            logits = logits + (bias if bias.shape[1] == 1 else bias[:, start : start + step])
        probs = logits.softmax(dim=-1)
        # expanded over the heads (free) so that FLOP counters see the multiply-adds this does: one row per head
        received = received + (weights.expand(-1, probs.shape[1], -1, -1) @ probs).squeeze(2).sum(dim=1)  # [B, N]
    return received / heads


def token_scores(
    score: str, q: Tensor, k: Tensor, scale: float, attn_bias: Tensor | None, sizes: Tensor | None
) -> Tensor:
    """``[B, N]`` scores by ``score``: ``"cls"`` (the class token's attention row, :func:`class_attention`) or
    ``"received"`` (the attention each token receives, :func:`received_attention`)."""
    if score == "cls":
        return class_attention(q, k, scale, attn_bias)
    return received_attention(q, k, scale, attn_bias, sizes)


_IS_EXPORTING = getattr(torch.compiler, "is_exporting", lambda: False)  # older torch: no flag


def exporting() -> bool:
    """Whether this forward is being captured by ``torch.export.export`` (which ``torch.onnx.export(dynamo=True)``
    runs): then the reduction uses only operators that export. Not under ``torch.compile``, ``torch.jit.trace``
    (fvcore's count) or eager."""
    return _IS_EXPORTING()


def refuse_legacy_onnx_export() -> None:
    """The TorchScript-based ``torch.onnx.export(..., dynamo=False)`` records Python ints as constants where the
    reduction needs sizes (Hugging Face models then fail at other batch sizes) and turns ``index_add_`` into a
    scatter that drops repeated indices (merges would be wrong): refuse it."""
    onnx = sys.modules.get("torch.onnx")  # only a program that exports has imported it
    if onnx is not None and torch.jit.is_tracing() and not exporting() and onnx.is_in_onnx_export():
        raise RuntimeError(
            "torch.onnx.export(..., dynamo=False), the TorchScript-based exporter, cannot export a model patched by "
            "tokenmerge_patch. Use the default dynamo exporter: torch.onnx.export(model, (x,), path, dynamo=True, "
            "dynamic_shapes=({0: 'batch'},)), or tokenmerge_patch.export_onnx(model, path)."
        )


def descending_order(values: Tensor) -> Tensor:
    """``values.argsort(dim=1, descending=True, stable=True)`` for ``[B, n]`` values: ties keep the lower index first.

    Exporters have no stable sort (``aten.sort.stable`` has no ONNX translation), and a non-stable sort or ``topk``
    breaks ties differently in eager PyTorch, so under export the order is computed without sorting: each value's
    rank is how many values precede it (larger, or equal at a lower index), and a scatter inverts the ranks: exactly
    the eager order, for n^2 comparisons per image (the block's attention costs about n^2 * D multiply-adds). Eager
    keeps the stable sort, which is faster there.

    >>> v = torch.tensor([[0.1, 0.4, 0.1, 0.4]])
    >>> descending_order(v), _descending_order_by_rank(v)
    (tensor([[1, 3, 0, 2]]), tensor([[1, 3, 0, 2]]))
    """
    if exporting():
        return _descending_order_by_rank(values)
    return values.argsort(dim=1, descending=True, stable=True)


def _descending_order_by_rank(values: Tensor) -> Tensor:
    count = values.shape[1]
    position = torch.arange(count, device=values.device)
    mine, theirs = values.unsqueeze(2), values.unsqueeze(1)  # [B, n, 1] against [B, 1, n]
    lower_index = position.unsqueeze(0) < position.unsqueeze(1)  # [n, n]: j < i
    before = (theirs > mine) | ((theirs == mine) & lower_index)
    rank = before.sum(dim=2)  # [B, n]: a permutation of 0..n-1 (for values without NaN)
    return torch.zeros_like(rank).scatter(1, rank, position.expand_as(rank))


def split_crucial(patch_scores: Tensor, keep: int) -> tuple[Tensor, Tensor]:
    """Indices of the ``keep`` highest-scoring patch tokens (ascending, so spatial order survives)
    and of the others (in descending score order); equal scores rank the lower index first.

    >>> s = torch.tensor([[0.1, 0.4, 0.2, 0.3]])
    >>> split_crucial(s, 2)
    (tensor([[1, 3]]), tensor([[2, 0]]))
    """
    order = descending_order(patch_scores)
    # distinct integers: any sort gives the same (and aten.sort.default exports, as ONNX TopK)
    return order[:, :keep].sort(dim=1).values, order[:, keep:]


def gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    """``x[b, index[b, j]]`` for ``x`` of shape ``[B, N, C]`` and ``index`` of shape ``[B, M]``.

    A row ``index_select`` on the flattened tokens: several times faster on CPU than ``torch.gather``
    with an expanded index, and its backward is an ``index_add``.
    """
    batch, num_tokens, channels = x.shape
    offsets = torch.arange(batch, device=x.device).unsqueeze(1) * num_tokens
    flat = x.reshape(batch * num_tokens, channels).index_select(0, (index + offsets).reshape(-1))
    return flat.view(batch, index.shape[1], channels)  # explicit sizes: an empty batch has no -1 to infer


def cosine_assignment(tokens: Tensor, targets: Tensor) -> Tensor:
    """For each token, the index of the target with the highest cosine similarity: ``[B, M]``.

    A token's own norm does not change how it ranks the targets, so only the targets are normalised.
    """
    return (tokens @ F.normalize(targets, dim=-1).transpose(1, 2)).argmax(dim=-1)


def attention_assignment(
    q: Tensor, k: Tensor, scale: float, tokens: Tensor, targets: Tensor, attn_bias: Tensor | None = None
) -> Tensor:
    """For each token (an index into N), the target it attends to most: its post-softmax attention row over
    all N keys, averaged over heads, restricted to the ``targets`` columns. ``[B, M]``."""
    heads, depth = q.shape[1], q.shape[-1]
    rows = q.gather(2, tokens[:, None, :, None].expand(-1, heads, -1, depth))  # [B, H, M, d]
    logits = (rows.float() * scale) @ k.float().transpose(-2, -1)  # [B, H, M, N]
    if attn_bias is not None:
        logits = logits + attn_bias.float()
    probs = logits.softmax(dim=-1).mean(dim=1)  # [B, M, N]
    return probs.gather(2, targets.unsqueeze(1).expand(-1, probs.shape[1], -1)).argmax(dim=-1)


def assign_to_targets(
    similarity: str,
    x: Tensor,
    target_x: Tensor,
    other_x: Tensor,
    q: Tensor,
    k: Tensor,
    scale: float,
    attn_bias: Tensor | None,
    seed: int,
) -> Tensor:
    """Which target (index into ``target_x``) each token ``other_x`` joins, by ``similarity`` (Table 4)."""
    if similarity == "attention":
        return attention_assignment(q, k, scale, other_x, target_x, attn_bias)
    if similarity == "random":
        if exporting():
            raise NotImplementedError(
                "similarity='random' cannot be exported: it draws from a seeded torch.Generator at run time, which "
                "torch.export and ONNX cannot capture. Export a model patched with another similarity "
                "('cosine', 'l1', 'l2' or 'attention')."
            )
        generator = torch.Generator(device=x.device).manual_seed(seed)
        return torch.randint(target_x.shape[1], other_x.shape, generator=generator, device=x.device)
    tokens, targets = gather_tokens(x, other_x), gather_tokens(x, target_x)
    if similarity == "cosine":
        return cosine_assignment(tokens, targets)
    tokens, targets = tokens.float(), targets.float()
    if exporting():  # aten._cdist_forward has no ONNX translation: the distances written out ([B, M, K, C])
        difference = tokens.unsqueeze(2) - targets.unsqueeze(1)
        distance = difference.abs().sum(dim=-1) if similarity == "l1" else difference.square().sum(dim=-1)
        return distance.argmin(dim=-1)
    return torch.cdist(tokens, targets, p={"l1": 1.0, "l2": 2.0}[similarity]).argmin(dim=-1)


def group_sum(values: Tensor, group: Tensor, num_groups: int) -> Tensor:
    """``out[b, g] = sum_{i: group[b, i] = g} values[b, i]`` for ``values`` ``[B, M]`` or ``[B, M, C]``."""
    batch, members = group.shape
    if values.dim() == 2:  # one number per token: no flattening, which copies a sliced [B, M] (and guards B == 1)
        return values.new_zeros(batch, num_groups).scatter_add_(1, group, values)
    if exporting():
        # index_add_ exports as ScatterND(reduction="add"), which ONNX Runtime's CPU kernel splits over its intra-op
        # threads with unsynchronised += on rows that several members share: with 2+ threads a run can lose a
        # member's update (onnxruntime issues 18048, 23396). scatter_add is ScatterElements, a serial loop that adds
        # the members in order, as index_add_ does in eager.
        index = group.view(batch, members, *(1,) * (values.dim() - 2)).expand_as(values)
        return values.new_zeros(batch, num_groups, *values.shape[2:]).scatter_add(1, index, values)
    flat_group = (group + torch.arange(batch, device=group.device).unsqueeze(1) * num_groups).reshape(-1)
    flat = values.reshape(batch * members, *values.shape[2:])
    out = flat.new_zeros(batch * num_groups, *values.shape[2:]).index_add_(0, flat_group, flat)
    return out.view(batch, num_groups, *values.shape[2:])


def group_weighted_mean(
    tokens: Tensor, weights: Tensor, group: Tensor, num_groups: int, keep_norm: bool = False
) -> Tensor:
    """Eq. 4 for every group at once: ``m_g = sum_{i in g} w_i x_i / sum_{i in g} w_i``.

    The weights are normalised per group in float32 before touching the tokens: in fp16 a softmax score
    can flush to zero, and a group of zeros would divide 0 by 0. Weights are floored at 1e-30, so such a
    group becomes a plain mean.

    Args:
        tokens: ``[B, M, C]``; weights: ``[B, M]`` (>= 0); group: ``[B, M]`` group index in
            ``0..num_groups-1`` (every group must hold at least one token).
        keep_norm: rescale each ``m_g`` to the largest norm among its members (a norm-preserving merge, after
            ToFu's MLERP): the mean of dissimilar tokens is shorter than any of them, and the residual stream
            then carries a weakened token into every later block. Its direction is eq. 4's.

    >>> tokens = torch.tensor([[[3.0, 0.0], [0.0, 4.0], [1.0, 1.0]]])
    >>> group, weights = torch.tensor([[0, 0, 1]]), torch.ones(1, 3)
    >>> group_weighted_mean(tokens, weights, group, 2)
    tensor([[[1.5000, 2.0000],
             [1.0000, 1.0000]]])
    >>> group_weighted_mean(tokens, weights, group, 2, keep_norm=True)  # |(1.5, 2)| = 2.5 -> 4
    tensor([[[2.4000, 3.2000],
             [1.0000, 1.0000]]])
    """
    weights = weights.float().clamp_min(1e-30)
    share = weights / group_sum(weights, group, num_groups).gather(1, group)
    merged = group_sum(tokens * share.to(tokens.dtype).unsqueeze(-1), group, num_groups)
    if not keep_norm:
        return merged
    norms = tokens.float().norm(dim=-1)  # [B, M]
    largest = norms.new_zeros(group.shape[0], num_groups).scatter_reduce(1, group, norms, "amax", include_self=False)
    # in float32: a mean that (nearly) cancels out would overflow a half-precision scale (0 * inf = NaN)
    merged = merged.float()
    scale = largest / merged.norm(dim=-1).clamp_min(1e-12)
    return (merged * scale.unsqueeze(-1)).to(tokens.dtype)


@dataclass
class Reduced:
    """What :func:`reduce_tokens` returns.

    Attributes:
        x: ``[B, P + K, C]`` prefix tokens, then the kept (merged) patch tokens in input order (``"bipartite"``:
            ToMe's order, the surviving A tokens then the B tokens; see :func:`_bipartite`).
        sizes: ``[B, P + K]`` float: how many original tokens each output token holds.
        source: ``[B, N0]`` long or ``None``: for each original patch, the index into ``x`` of the token
            that holds it, ``-1`` if it was dropped.
        keep_index: ``[B, K]`` which input patch tokens survive (indices among the patch tokens), in output order
            (merge, drop: the crucial tokens; bipartite: the unmerged A tokens, then the B tokens).
        positions: ``[B, K]`` (``[B, K + 1]`` for ``"fuse"``) long or ``None``: each output patch token's row of
            the rotary position table (see :func:`move_positions`); ``None`` when nothing was reduced and no
            positions were given (every patch token still at its own row).
    """

    x: Tensor
    sizes: Tensor
    source: Tensor | None
    keep_index: Tensor
    positions: Tensor | None = None


def reduce_tokens(
    x: Tensor,
    q: Tensor,
    k: Tensor,
    scale: float,
    *,
    num_prefix: int,
    keep_rate: float,
    method: str = "merge",
    similarity: str = "cosine",
    merge_into_cls: bool = False,
    size_weighted: bool = False,
    keep_norm: bool = False,
    attn_bias: Tensor | None = None,
    sizes: Tensor | None = None,
    source: Tensor | None = None,
    trace_source: bool = False,
    seed: int = 0,
    positions: Tensor | None = None,
    score: str = "cls",
) -> Reduced:
    """Keep the crucial tokens and merge (or drop, or fuse) the rest. Batched, differentiable in ``x``,
    ``q`` and ``k``.

    Args:
        x: ``[B, N, C]`` tokens after the block's attention residual.
        q, k: ``[B, H, N, d]`` the block's queries and keys (after q/k norm).
        scale: the attention's softmax scale.
        num_prefix: number of leading prefix tokens (class first, if there is one), never reduced; 0 for a model
            without a class token (``score="received"`` or ``method="bipartite"``).
        keep_rate: fraction of patch tokens kept, in (0, 1].
        method: ``"merge"`` (eq. 4, the paper), ``"drop"`` (keep the crucial tokens only), ``"fuse"``
            (EViT: the rest become one extra token, their score-weighted sum, not renormalised) or
            ``"bipartite"`` (ToMe: bipartite soft matching on head-averaged keys, size-weighted, in ToMe's
            token order; at most half the patch tokens are merged, so the keep rate is clamped at
            ``ceil(N_patch / 2)``).
        similarity: for ``"merge"``, how a token picks its crucial token: ``"cosine"`` (the paper),
            ``"l1"`` / ``"l2"`` (nearest in that distance), ``"attention"`` (the crucial token it attends
            to most) or ``"random"`` (seeded).
        merge_into_cls: let the class token absorb non-crucial tokens too (the paper's literal reading;
            its weight is its attention to itself). Off by default: prefix tokens stay untouched.
        size_weighted: for ``"merge"``, weight eq. 4 by score x size instead of score.
        keep_norm: for ``"merge"``, give each merged token the largest norm among its members (eq. 4's direction;
            see :func:`group_weighted_mean`; with ``merge_into_cls`` the class token too, when it absorbs tokens).
            Off here; :func:`~tokenmerge_patch.patch` turns it on by default with proportional attention.
        attn_bias: the additive bias ``[B, 1, 1, N]`` the block's attention used (proportional
            attention), so scores match that attention.
        sizes: ``[B, N]`` tokens' sizes so far, ``None`` for all ones.
        source: ``[B, N0]`` source map so far, ``None`` for the identity (with ``trace_source``).
        trace_source: compute the source map.
        seed: seed of ``similarity="random"``.
        positions: ``[B, N - num_prefix]`` each patch token's row of a rotary position table so far (``-1``:
            none), ``None`` for ``arange``; followed to the output as :func:`move_positions` says.
        score: what picks the crucial tokens (and weighs eq. 4): ``"cls"``, the class token's attention (the paper;
            needs a class token first), or ``"received"``, the attention each token receives from all queries
            (:func:`received_attention`; any model). ``"bipartite"`` uses no score.

    >>> x = torch.randn(1, 5, 3); q = k = torch.randn(1, 1, 5, 3)
    >>> reduce_tokens(x, q, k, 1.0, num_prefix=1, keep_rate=0.5, method="drop").x.shape
    torch.Size([1, 3, 3])
    >>> reduce_tokens(x, q, k, 1.0, num_prefix=1, keep_rate=0.5, method="fuse").x.shape
    torch.Size([1, 4, 3])
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    refuse_legacy_onnx_export()
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
    if not 0.0 < keep_rate <= 1.0:
        raise ValueError(f"keep_rate must be in (0, 1], got {keep_rate!r}")
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    batch, num_tokens, _ = x.shape
    needs_class = (score == "cls" and method != "bipartite") or merge_into_cls
    if not int(needs_class) <= num_prefix < num_tokens:
        raise ValueError(
            f"num_prefix must leave patch tokens and, with score='cls' or merge_into_cls, count the class token "
            f"(>= 1); got {num_prefix} of {num_tokens} tokens"
        )
    num_patches = num_tokens - num_prefix
    if sizes is None:
        sizes = x.new_ones(batch, num_tokens, dtype=torch.float32)
    if trace_source and source is None:
        source = torch.arange(num_prefix, num_tokens, device=x.device).expand(batch, -1)
    keep = reduced_patch_count(num_patches, keep_rate, "bipartite" if method == "bipartite" else "merge")
    if keep == num_patches:  # nothing to reduce: the block behaves exactly as unpatched
        all_patches = torch.arange(num_patches, device=x.device).expand(batch, -1)
        return Reduced(x, sizes, source, all_patches, positions)
    if method == "bipartite":
        out = _bipartite(x, k, num_prefix, num_patches - keep, sizes, source)
        out.positions = move_positions(positions, out.keep_index, fused=False)
        return out

    scores = token_scores(score, q, k, scale, attn_bias, sizes)  # [B, N]; a merged query counts as its patches
    keep_index, rest_index = split_crucial(scores[:, num_prefix:], keep)
    prefix, prefix_sizes = x[:, :num_prefix], sizes[:, :num_prefix]
    if method in ("drop", "fuse"):
        kept = gather_tokens(x, keep_index + num_prefix)
        kept_sizes = sizes[:, num_prefix:].gather(1, keep_index)
    if method == "drop":
        out, out_sizes = torch.cat([prefix, kept], dim=1), torch.cat([prefix_sizes, kept_sizes], dim=1)
        survivors, landing = keep_index, num_prefix  # the kept patches, in order after the prefix
    elif method == "fuse":
        rest = gather_tokens(x, rest_index + num_prefix)
        rest_scores = scores[:, num_prefix:].gather(1, rest_index).to(x.dtype)
        fused = (rest * rest_scores.unsqueeze(-1)).sum(dim=1, keepdim=True)  # EViT: not renormalised
        fused_size = sizes[:, num_prefix:].gather(1, rest_index).sum(dim=1, keepdim=True)
        out = torch.cat([prefix, kept, fused], dim=1)
        out_sizes = torch.cat([prefix_sizes, kept_sizes, fused_size], dim=1)
        survivors = landing = None  # every patch lands in some token: computed below if traced
        if source is not None:
            landing = torch.full((batch, num_patches), num_prefix + keep, dtype=torch.long, device=x.device)
            kept_position = torch.arange(num_prefix, num_prefix + keep, device=x.device).expand(batch, -1)
            landing.scatter_(1, keep_index, kept_position)
    else:
        out, out_sizes, landing = _merge(
            x,
            q,
            k,
            scale,
            scores,
            sizes,
            keep_index,
            rest_index,
            num_prefix,
            similarity,
            merge_into_cls,
            size_weighted,
            keep_norm,
            attn_bias,
            seed,
        )
        survivors = None  # every patch lands in some token

    if source is not None:
        source = move_source(source, num_prefix, num_tokens, survivors, landing)
    return Reduced(out, out_sizes, source, keep_index, move_positions(positions, keep_index, method == "fuse"))


def move_positions(positions: Tensor | None, keep_index: Tensor, fused: bool) -> Tensor:
    """Where each output patch token sits, as a row of the rotary position table (RoPE models).

    Every output patch token of merge, drop and bipartite is one crucial (surviving) token, possibly holding others
    merged into it: it keeps that token's position (for bipartite, the destination token's), so rotary embeddings
    stay what they are for a single patch. EViT's fused token is a score-weighted sum of tokens from all over the
    image and has no position of its own: it gets ``-1``, no rotation (the identity row of :func:`rotary_rows`),
    as prefix tokens have none.

    Args:
        positions: ``[B, N_patch]`` the input patch tokens' rows (``-1``: none), ``None`` for ``arange``.
        keep_index: ``[B, K]`` which input patch tokens survive, in output order.
        fused: append the fused token's ``-1``.

    >>> move_positions(torch.tensor([[4, 7, 9, 2]]), torch.tensor([[1, 3]]), fused=True)
    tensor([[ 7,  2, -1]])
    """
    out = keep_index if positions is None else positions.gather(1, keep_index)
    if fused:
        out = torch.cat([out, torch.full_like(out[:, :1], -1)], dim=1)
    return out


def rotary_rows(table: Tensor, positions: Tensor, identity: Tensor) -> Tensor:
    """The rows of a rotary position table that the surviving patch tokens use.

    Args:
        table: one row per patch of the image along dim -2: ``[N, C]``, ``[h, N, C]`` (per head) or ``[B, h, N, C]``
            (per image, e.g. after timm's patch dropout).
        positions: ``[B, M]`` row of each patch token (:func:`move_positions`), ``-1`` for the ``identity`` row.
        identity: ``[C]`` the row that leaves a token unrotated (``sin = 0``, ``cos = 1``).

    Returns:
        ``[B, h, M, C]`` (``h = 1`` for tables without heads), which broadcasts against queries ``[B, H, M, d]``.

    >>> table = torch.arange(6.0).view(3, 2)
    >>> rotary_rows(table, torch.tensor([[2, -1, 0]]), torch.tensor([0.0, 1.0]))
    tensor([[[[4., 5.],
              [0., 1.],
              [0., 1.]]]])
    """
    while table.dim() < 4:
        table = table.unsqueeze(0)
    rows, channels = table.shape[-2], table.shape[-1]
    extra = identity.to(table.dtype).expand(*table.shape[:-2], 1, channels)
    table = torch.cat([table, extra], dim=-2)  # the identity as row N
    batch, count = positions.shape
    index = torch.where(positions < 0, rows, positions)
    table = table.expand(batch, -1, -1, -1)
    return table.gather(2, index[:, None, :, None].expand(batch, table.shape[1], count, channels))


def _merge(
    x: Tensor,
    q: Tensor,
    k: Tensor,
    scale: float,
    scores: Tensor,
    sizes: Tensor,
    keep_index: Tensor,
    rest_index: Tensor,
    num_prefix: int,
    similarity: str,
    merge_into_cls: bool,
    size_weighted: bool,
    keep_norm: bool,
    attn_bias: Tensor | None,
    seed: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Eq. 4: every non-crucial token joins a crucial token (or the class token); each group becomes its
    weighted mean. Returns the tokens, their sizes, and where each input patch token landed."""
    batch = x.shape[0]
    # The merge set: the patch tokens, with the class token in front when it may absorb tokens.
    # Targets are the crucial tokens (and the class token); every member joins exactly one target.
    target_x, other_x = keep_index + num_prefix, rest_index + num_prefix  # indices into x
    if merge_into_cls:

        def pick(t: Tensor) -> Tensor:
            return torch.cat([t[:, :1], t[:, num_prefix:]], dim=1)

        members, weights, member_sizes = pick(x), pick(scores), pick(sizes)
        targets = torch.cat([keep_index.new_zeros(batch, 1), keep_index + 1], dim=1)
        others = rest_index + 1
        target_x = torch.cat([keep_index.new_zeros(batch, 1), target_x], dim=1)
    else:
        members, weights, member_sizes = x[:, num_prefix:], scores[:, num_prefix:], sizes[:, num_prefix:]
        targets, others = keep_index, rest_index
    num_targets = targets.shape[1]
    assignment = assign_to_targets(similarity, x, target_x, other_x, q, k, scale, attn_bias, seed)
    group = torch.empty_like(weights, dtype=torch.long)
    group.scatter_(1, targets, torch.arange(num_targets, device=x.device).expand(batch, -1))
    group.scatter_(1, others, assignment)
    if size_weighted:
        weights = weights * member_sizes
    merged = group_weighted_mean(members, weights, group, num_targets, keep_norm)
    merged_sizes = group_sum(member_sizes, group, num_targets)
    if merge_into_cls:  # group 0 is the class token
        out = torch.cat([merged[:, :1], x[:, 1:num_prefix], merged[:, 1:]], dim=1)
        out_sizes = torch.cat([merged_sizes[:, :1], sizes[:, 1:num_prefix], merged_sizes[:, 1:]], dim=1)
        patch_group = group[:, 1:]
        return out, out_sizes, torch.where(patch_group == 0, 0, patch_group - 1 + num_prefix)
    out = torch.cat([x[:, :num_prefix], merged], dim=1)
    out_sizes = torch.cat([sizes[:, :num_prefix], merged_sizes], dim=1)
    return out, out_sizes, group + num_prefix


def _bipartite(x: Tensor, k: Tensor, num_prefix: int, merges: int, sizes: Tensor, source: Tensor | None) -> Reduced:
    """ToMe's bipartite soft matching over the patch tokens, in ToMe's token order.

    The sequence alternates between sets A and B (A holds the even positions of the whole sequence, the class
    token's, so with one prefix token the odd patch tokens); each A token's most cosine-similar B token (by keys
    averaged over heads) is its match, and the ``merges`` A tokens with the best matches join them, size-weighted.
    The output is ToMe's: the surviving A tokens, then the B tokens, each set in its input order. The order is
    what the next block's alternation sees, so it is part of the method (in spatial order every block would split
    the 14-wide patch grid into the same alternating columns).
    """
    batch, num_tokens, _ = x.shape
    num_patches = num_tokens - num_prefix
    device = x.device
    first_a = num_prefix % 2  # the patch position of the first A token
    a_pos = torch.arange(first_a, num_patches, 2, device=device)
    b_pos = torch.arange(1 - first_a, num_patches, 2, device=device)
    num_a, num_b = a_pos.shape[0], b_pos.shape[0]
    metric = F.normalize(k.mean(dim=1)[:, num_prefix:].float(), dim=-1)  # [B, n, d]
    similarity = metric.index_select(1, a_pos) @ metric.index_select(1, b_pos).transpose(1, 2)  # [B, |A|, |B|]
    best, match = similarity.max(dim=-1)
    order = descending_order(best)
    merged_a = order[:, :merges]  # indices into A
    survives = torch.ones(batch, num_a, dtype=torch.bool, device=device)
    survives = survives.scatter(1, merged_a, torch.zeros_like(merged_a, dtype=torch.bool))
    num_a_out = num_a - merges
    b_slot = torch.arange(num_a_out, num_a_out + num_b, device=device).expand(batch, -1)  # B after the A survivors
    a_slot = torch.where(survives, survives.long().cumsum(dim=1) - 1, b_slot.gather(1, match))
    group = torch.zeros(batch, num_patches, dtype=torch.long, device=device)
    group = group.scatter(1, a_pos.expand(batch, -1), a_slot).scatter(1, b_pos.expand(batch, -1), b_slot)
    patch_sizes = sizes[:, num_prefix:]
    num_out = num_patches - merges
    merged = group_weighted_mean(x[:, num_prefix:], patch_sizes, group, num_out)
    out = torch.cat([x[:, :num_prefix], merged], dim=1)
    out_sizes = torch.cat([sizes[:, :num_prefix], group_sum(patch_sizes, group, num_out)], dim=1)
    if source is not None:
        source = move_source(source, num_prefix, num_tokens, None, group + num_prefix)
    # the surviving A tokens in input order (distinct indices: any sort), then every B token
    a_kept = first_a + 2 * order[:, merges:].sort(dim=1).values
    keep_index = torch.cat([a_kept, b_pos.expand(batch, -1)], dim=1)
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
    batch, device = source.shape[0], source.device
    if patches is None:
        patch_position = position
    else:
        if isinstance(position, int):
            position = torch.arange(position, position + patches.shape[1], device=device).expand(batch, -1)
        patch_position = torch.full((batch, num_tokens - num_prefix), -1, dtype=torch.long, device=device)
        patch_position = patch_position.scatter(1, patches, position)
    # built with cat, not by assigning into slices: a broadcasting copy_ would make torch.export guard on B == 1
    new_position = torch.cat([torch.arange(num_prefix, device=device).expand(batch, -1), patch_position], dim=1)
    return torch.where(source >= 0, new_position.gather(1, source.clamp(min=0)), source)


def size_weighted_mean(tokens: Tensor, sizes: Tensor) -> Tensor:
    """Mean over dim 1 with each token counted as often as the patches it holds: ``[B, N, C] -> [B, C]``.

    After a merge this equals the plain mean the unpatched model would take over its patches, when the
    merged token stands for its patches' average.
    """
    weights = sizes.to(tokens.dtype).unsqueeze(-1)
    return (tokens * weights).sum(dim=1) / weights.sum(dim=1)
