"""An independent, deliberately plain reference of the patched forward: eager attention built from the
weights, and each reduction method as Python loops over images and tokens, written from the method's
definition.

It shares no code with ``tokenmerge_patch``; it runs on an *unpatched* timm VisionTransformer.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class Options:
    method: str = "merge"
    similarity: str = "cosine"
    merge_into_cls: bool = False
    size_weighted: bool = False
    keep_norm: bool | None = None  # None: the library's default, on for merge with proportional attention
    prop_attn: bool | None = None  # None: the library's default, on for merge and bipartite
    score: str = "cls"  # or "received": the attention each token receives, mean over heads and size-weighted queries

    def __post_init__(self) -> None:
        if self.prop_attn is None:
            self.prop_attn = self.method in ("merge", "bipartite")
        if self.keep_norm is None:
            self.keep_norm = self.method == "merge" and self.prop_attn


def eager_attention(attn, x: Tensor, bias: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """timm Attention on one image ``x`` [N, C], computed eagerly, with an optional additive bias over keys
    [N]; returns (output, probabilities [H, N, N], keys [H, N, d])."""
    n = x.shape[0]
    qkv = F.linear(x, attn.qkv.weight, attn.qkv.bias).reshape(n, 3, attn.num_heads, attn.head_dim)
    q, k, v = qkv.permute(1, 2, 0, 3)  # each [H, N, d]
    q, k = attn.q_norm(q), attn.k_norm(k)
    logits = (q * attn.scale) @ k.transpose(-1, -2)
    if bias is not None:
        logits = logits + bias
    probs = torch.softmax(logits, dim=-1)
    out = (probs @ v).transpose(0, 1).reshape(n, attn.num_heads * attn.head_dim)
    out = getattr(attn, "norm", torch.nn.Identity())(out)
    if getattr(attn, "gate", None) is not None:
        out = out * torch.sigmoid(attn.gate(x))
    return attn.proj(out), probs, k


def kept(n: int, keep_rate: float) -> int:
    return max(1, math.ceil(round(keep_rate * n, 6)))


def reference_reduce(
    x: Tensor, sizes: list[float], probs: Tensor, keys: Tensor, num_prefix: int, keep_rate: float, opt: Options
) -> tuple[Tensor, list[float]]:
    """One image: reduce the patch tokens of ``x`` [N, C] by ``opt.method``."""
    n = x.shape[0] - num_prefix
    if opt.method == "bipartite":
        return reference_bipartite(x, sizes, keys, num_prefix, min(n - kept(n, keep_rate), n // 2))
    k = kept(n, keep_rate)
    if k >= n:
        return x, sizes
    if opt.score == "cls":
        scores = probs[:, 0, :].mean(dim=0)  # the class token's row, averaged over heads
    else:  # every query's row, each query counted as the patches it holds, averaged over queries and heads
        weights = torch.tensor(sizes) / sum(sizes)
        scores = (probs * weights[None, :, None]).sum(dim=1).mean(dim=0)
    keep = sorted(torch.topk(scores[num_prefix:], k).indices.tolist())
    rest = [i for i in range(n) if i not in keep]
    targets = [num_prefix + j for j in keep]
    prefix_rows = list(range(num_prefix))
    if opt.method == "drop":
        rows = prefix_rows + targets
        return x[rows], [sizes[r] for r in rows]
    if opt.method == "fuse":  # EViT: one extra token, the score-weighted sum (not renormalised)
        fused = sum(scores[num_prefix + i] * x[num_prefix + i] for i in rest)
        rows = prefix_rows + targets
        return torch.cat([x[rows], fused[None]]), [sizes[r] for r in rows] + [sum(sizes[num_prefix + i] for i in rest)]
    candidates = ([0] if opt.merge_into_cls else []) + targets
    members: dict[int, list[int]] = {t: [] for t in candidates}
    for i in rest:
        u = num_prefix + i
        if opt.similarity == "cosine":
            values = [float(F.cosine_similarity(x[u], x[t], dim=0)) for t in candidates]
        elif opt.similarity == "l2":
            values = [-float((x[u] - x[t]).norm()) for t in candidates]
        elif opt.similarity == "l1":
            values = [-float((x[u] - x[t]).abs().sum()) for t in candidates]
        elif opt.similarity == "attention":
            values = [float(probs[:, u, t].mean()) for t in candidates]
        else:
            raise ValueError(opt.similarity)
        members[candidates[max(range(len(values)), key=values.__getitem__)]].append(u)
    weight = [float(scores[t]) * (sizes[t] if opt.size_weighted else 1.0) for t in range(x.shape[0])]
    new_x, new_sizes = x.clone(), list(sizes)
    for t, group in members.items():
        total = weight[t] + sum(weight[u] for u in group)
        new_x[t] = (weight[t] * x[t] + sum(weight[u] * x[u] for u in group)) / total
        if opt.keep_norm:  # the merged token gets the longest member's norm, eq. 4's direction
            longest = max(float(x[m].norm()) for m in [t, *group])
            new_x[t] = new_x[t] * (longest / float(new_x[t].norm()))
        new_sizes[t] = sizes[t] + sum(sizes[u] for u in group)
    rows = prefix_rows + targets
    return new_x[rows], [new_sizes[r] for r in rows]


def reference_bipartite(
    x: Tensor, sizes: list[float], keys: Tensor, num_prefix: int, r: int
) -> tuple[Tensor, list[float]]:
    """ToMe's bipartite soft matching: the whole sequence alternates between sets A (positions 0, 2, 4, ...) and
    B (1, 3, 5, ...); prefix tokens are never matched. Each A patch token matches its most cosine-similar B
    patch token by head-averaged keys; the r best-matched ones merge into their match (size-weighted mean).
    Output, ToMe's order: the prefix, the unmerged A patch tokens, then the B patch tokens (each in input order)."""
    if r <= 0:
        return x, sizes
    metric = keys.mean(dim=0)
    n = metric.shape[0]
    a_tokens = [t for t in range(num_prefix, n) if t % 2 == 0]
    b_tokens = [t for t in range(num_prefix, n) if t % 2 == 1]
    best = {}
    for a in a_tokens:
        sims = [float(F.cosine_similarity(metric[a], metric[b], dim=0)) for b in b_tokens]
        j = max(range(len(sims)), key=sims.__getitem__)
        best[a] = (sims[j], b_tokens[j])
    ranked = sorted(a_tokens, key=lambda a: -best[a][0])
    merged = set(ranked[:r])
    groups = {t: [t] for t in range(num_prefix, n) if t not in merged}
    for a in merged:
        groups[best[a][1]].append(a)
    rows, out_sizes = [x[i] for i in range(num_prefix)], sizes[:num_prefix]
    for t in [a for a in a_tokens if a not in merged] + b_tokens:
        weights = [sizes[m] for m in groups[t]]
        rows.append(sum(w * x[m] for w, m in zip(weights, groups[t], strict=True)) / sum(weights))
        out_sizes.append(sum(weights))
    return torch.stack(rows), out_sizes


# the methods and options every family's reference test runs
REFERENCE_METHODS = [
    ("merge", {}),
    ("merge", dict(prop_attn=False)),
    ("merge", dict(size_weighted=True)),
    ("merge", dict(keep_norm=False)),
    ("drop", {}),
    ("fuse", {}),
    ("bipartite", {}),
]


def reference_tokens(
    x: Tensor,
    blocks,
    plan: dict[int, float],
    opt: Options,
    prefix: int,
    attention: Callable[[object, Tensor, Tensor | None], tuple[Tensor, Tensor, Tensor]],
    mlp: Callable[[object, Tensor], Tensor],
) -> tuple[Tensor, list[float], list[int]]:
    """One image's tokens ``x`` [N, C] through ``blocks`` as a patched model runs them, from the unpatched weights:
    ``attention(block, x, bias)`` is a block's attention half before the residual (output, probs [H, N, N], keys
    [H, N, d]), ``mlp(block, x)`` its MLP half; a block in ``plan`` reduces between the two. Returns the tokens, the
    patches each holds and the token count after every block."""
    sizes, count = [1.0] * x.shape[0], []
    for index, block in enumerate(blocks):
        bias = torch.tensor(sizes).log() if opt.prop_attn and any(s != 1 for s in sizes) else None
        y, probs, keys = attention(block, x, bias)
        x = x + y
        if index in plan:
            x, sizes = reference_reduce(x, sizes, probs, keys, prefix, plan[index], opt)
        x = x + mlp(block, x)
        count.append(x.shape[0])
    return x, sizes, count


MARK = 1e-20  # a tiny indicator of the patches a token holds, carried through a reduction in extra channels


def reference_dense_tokens(
    x: Tensor,
    blocks,
    plan: dict[int, float],
    opt: Options,
    prefix: int,
    attention: Callable[[object, Tensor, Tensor | None], tuple[Tensor, Tensor, Tensor]],
    mlp: Callable[[object, Tensor], Tensor],
) -> tuple[Tensor, list[int]]:
    """One image's tokens ``x`` [N, C] through ``blocks`` as ``dense=True`` runs them, from the unpatched weights:
    every patch keeps its own row; in each block the patches are grouped (a list of patch indices per merged token),
    each group's mean is computed on, and each group's update is added to every patch of it. A block in ``plan``
    makes new groups from the reduction of its merged tokens after the attention (the reduction carries, in extra
    channels, a tiny indicator of the patches each token holds, so a reduced token names its patches). Returns the
    full-resolution tokens and how many tokens each block's MLP ran on."""
    x = x.clone()
    channels, groups, counts = x.shape[1], [[p] for p in range(x.shape[0] - prefix)], []

    def merged(groups: list[list[int]]) -> Tensor:
        return torch.stack([x[i] for i in range(prefix)] + [x[[prefix + p for p in g]].mean(0) for g in groups])

    def add(update: Tensor, groups: list[list[int]]) -> None:
        for i in range(prefix):
            x[i] += update[i]
        for j, group in enumerate(groups):
            for p in group:
                x[prefix + p] += update[prefix + j]

    for index, block in enumerate(blocks):
        tokens = merged(groups)
        sizes = [1.0] * prefix + [float(len(g)) for g in groups]
        bias = torch.tensor(sizes).log() if opt.prop_attn and any(s != 1 for s in sizes) else None
        y, probs, keys = attention(block, tokens, bias)
        new_groups = groups
        if index in plan:
            holds = torch.zeros(len(sizes), x.shape[0] - prefix)
            for j, group in enumerate(groups):
                holds[prefix + j, group] = 1.0
            marked, _ = reference_reduce(torch.cat([tokens + y, MARK * holds], dim=1), sizes, probs, keys, prefix,
                                         plan[index], opt)  # fmt: skip
            new_groups = [row[channels:].nonzero().flatten().tolist() for row in marked[prefix:]]
        add(y, groups)
        groups = new_groups
        tokens = merged(groups)
        add(mlp(block, tokens), groups)
        counts.append(tokens.shape[0])
    return x, counts


def timm_attention(block, x: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    y, probs, keys = eager_attention(block.attn, block.norm1(x), bias)
    return block.ls1(y), probs, keys


def timm_mlp(block, x: Tensor) -> Tensor:
    return block.ls2(block.mlp(block.norm2(x)))


@torch.no_grad()
def reference_logits(
    model,
    images: Tensor,
    plan: dict[int, float],
    method: str = "merge",
    merge_into_cls: bool = False,
    **options: object,
) -> tuple[Tensor, list[list[int]]]:
    """Logits of the patched model computed from an unpatched timm VisionTransformer, plus the token
    count after every block. Options default as ``patch``'s do (proportional attention for merge and bipartite);
    ``size_weighted=False, prop_attn=False`` is the paper's literal method (``keep_norm`` follows ``prop_attn``)."""
    opt = Options(method=method, merge_into_cls=merge_into_cls, **options)
    tokens = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
    prefix = model.num_prefix_tokens
    outputs, counts = [], []
    for x in tokens:
        x, sizes, count = reference_tokens(x, model.blocks, plan, opt, prefix, timm_attention, timm_mlp)
        x = model.norm(x)
        if model.global_pool == "avg":
            weights = torch.tensor(sizes[prefix:]).unsqueeze(-1)
            pooled = (x[prefix:] * weights).sum(0) / weights.sum()
            outputs.append(model.head(model.fc_norm(pooled)))
        elif model.attn_pool is not None:  # attention pooling over every patch: each token repeated as it holds
            counts_of = torch.tensor([round(s) for s in sizes[prefix:]])
            pooled = model.attn_pool(x[prefix:].repeat_interleave(counts_of, dim=0)[None])[0]
            outputs.append(model.head(model.fc_norm(pooled)))
        else:
            outputs.append(model.forward_head(x[None])[0])
        counts.append(count)
    return torch.stack(outputs), counts


def _hf_parts(layer) -> tuple[str, str, str]:
    """A Hugging Face layer's pre-attention norm, attention and pre-MLP norm (Dinov2, ViT, CLIP / SigLIP layouts)."""
    for names in (("norm1", "attention", "norm2"), ("layernorm_before", "attention", "layernorm_after")):
        if hasattr(layer, names[0]):
            return names
    return "layer_norm1", "self_attn", "layer_norm2"


def _hf_eager_attention(attention, x: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """One image ``x`` [N, C] through a Hugging Face attention, from its weights: (output, probs [H, N, N], keys
    [H, N, d])."""
    n = x.shape[0]
    heads = getattr(attention, "num_attention_heads", None) or attention.num_heads
    projections = (attention.q_proj, attention.k_proj, attention.v_proj)
    q, k, v = (F.linear(x, p.weight, p.bias).reshape(n, heads, -1).transpose(0, 1) for p in projections)
    logits = q @ k.transpose(-1, -2) * getattr(attention, "scaling", getattr(attention, "scale", None))
    if bias is not None:
        logits = logits + bias
    probs = logits.softmax(dim=-1)
    out = getattr(attention, "o_proj", None) or attention.out_proj
    return out((probs @ v).transpose(0, 1).reshape(n, -1)), probs, k


def hf_attention(layer, x: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """A Hugging Face layer's attention half, before the residual (LayerScale where the layer has it)."""
    norm, attention, _ = _hf_parts(layer)
    y, probs, keys = _hf_eager_attention(getattr(layer, attention), getattr(layer, norm)(x), bias)
    return getattr(layer, "layer_scale1", torch.nn.Identity())(y), probs, keys


def hf_mlp(layer, x: Tensor) -> Tensor:
    """A Hugging Face layer's MLP half, before the residual."""
    norm = getattr(layer, _hf_parts(layer)[2])
    return getattr(layer, "layer_scale2", torch.nn.Identity())(layer.mlp(norm(x)))
