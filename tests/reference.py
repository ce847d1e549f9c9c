"""An independent, deliberately plain reference of the patched forward: eager attention built from the
weights, and the three steps (score, select, merge) as Python loops over images and tokens.

It shares no code with ``tokenmerge_patch``; it runs on an *unpatched* timm VisionTransformer.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def eager_attention(attn, x: Tensor) -> tuple[Tensor, Tensor]:
    """timm Attention on one image ``x`` [N, C], computed eagerly; returns (output, probabilities [H, N, N])."""
    n = x.shape[0]
    qkv = F.linear(x, attn.qkv.weight, attn.qkv.bias).reshape(n, 3, attn.num_heads, attn.head_dim)
    q, k, v = qkv.permute(1, 2, 0, 3)  # each [H, N, d]
    q, k = attn.q_norm(q), attn.k_norm(k)
    probs = torch.softmax((q * attn.scale) @ k.transpose(-1, -2), dim=-1)
    out = (probs @ v).transpose(0, 1).reshape(n, attn.num_heads * attn.head_dim)
    out = attn.norm(out)
    if getattr(attn, "gate", None) is not None:
        out = out * torch.sigmoid(attn.gate(x))
    return attn.proj(out), probs


def reference_reduce(
    x: Tensor, sizes: list[float], scores: Tensor, num_prefix: int, keep_rate: float, method: str, merge_into_cls: bool
) -> tuple[Tensor, list[float]]:
    """One image: keep the top-k patches by class score, merge (eq. 4) or drop the rest."""
    n = x.shape[0] - num_prefix
    k = max(1, math.ceil(round(keep_rate * n, 6)))
    if k >= n:
        return x, sizes
    patch_scores = scores[num_prefix:]
    keep = sorted(torch.topk(patch_scores, k).indices.tolist())
    rest = [i for i in range(n) if i not in keep]
    targets = [num_prefix + j for j in keep]
    if method == "drop":
        rows = list(range(num_prefix)) + targets
        return x[rows], [sizes[r] for r in rows]
    candidates = ([0] if merge_into_cls else []) + targets
    members: dict[int, list[int]] = {t: [] for t in candidates}
    for i in rest:
        token = x[num_prefix + i]
        sims = [float(F.cosine_similarity(token, x[t], dim=0)) for t in candidates]
        members[candidates[max(range(len(sims)), key=sims.__getitem__)]].append(num_prefix + i)
    new_x, new_sizes = x.clone(), list(sizes)
    for t, group in members.items():
        weight = scores[t] + sum(scores[u] for u in group)
        new_x[t] = (scores[t] * x[t] + sum(scores[u] * x[u] for u in group)) / weight
        new_sizes[t] = sizes[t] + sum(sizes[u] for u in group)
    rows = list(range(num_prefix)) + targets
    return new_x[rows], [new_sizes[r] for r in rows]


@torch.no_grad()
def reference_logits(
    model, images: Tensor, plan: dict[int, float], method: str = "merge", merge_into_cls: bool = False
) -> tuple[Tensor, list[list[int]]]:
    """Logits of the patched model computed from an unpatched timm VisionTransformer, plus the token
    count after every block."""
    tokens = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
    prefix = model.num_prefix_tokens
    outputs, counts = [], []
    for x in tokens:
        sizes = [1.0] * x.shape[0]
        count = []
        for index, block in enumerate(model.blocks):
            y, probs = eager_attention(block.attn, block.norm1(x))
            x = x + block.ls1(y)
            if index in plan:
                scores = probs[:, 0, :].mean(dim=0)
                x, sizes = reference_reduce(x, sizes, scores, prefix, plan[index], method, merge_into_cls)
            x = x + block.ls2(block.mlp(block.norm2(x)))
            count.append(x.shape[0])
        x = model.norm(x)
        if model.global_pool == "avg":
            weights = torch.tensor(sizes[prefix:]).unsqueeze(-1)
            pooled = (x[prefix:] * weights).sum(0) / weights.sum()
            outputs.append(model.head(model.fc_norm(pooled)))
        else:
            outputs.append(model.forward_head(x[None])[0])
        counts.append(count)
    return torch.stack(outputs), counts
