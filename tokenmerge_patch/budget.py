"""Patch to a FLOPs budget: ``patch(model, flops=f)`` picks the blocks and keep rates by a fixed rule (no data).

The rule (measured on the real ImageNet DeiT-T of ../shared; README):

- every block from ``start = max(1, depth // 4)`` on reduces (the paper's first reducing block: 3 of 12), each
  keeping about the same share ``r`` of its patch tokens (``N * r**j`` tokens after the ``j``-th);
- with a class-token head (timm ``global_pool="token"``, Hugging Face classifiers), the last block keeps one patch
  token: its patch tokens feed nothing after it, so that is free accuracy-wise (4.6 % of DeiT-T's FLOPs);
- ``r`` is solved so that :func:`~tokenmerge_patch.count_flops` of the patched model at its input size lands in
  ``[f - 0.01, f]`` of the unpatched count.

Many gentle cuts beat a few hard ones (real ImageNet DeiT-T at 65 % of the FLOPs, patch()'s default options:
79.6 % top-1 and 96.2 % agreement with the unpatched predictions, against 79.6 % and 93.8 % for blocks 3, 6, 9 at
one keep rate, and 78.6 % and 92.8 % for ToMe; at 50 %: 77.4 / 89.8 against 75.6 / 88.6 and 77.0 / 88.8;
``python benchmarks/accuracy.py --imagenet``). Block 1's class attention is a poor
score, and later starts leave too few blocks at low budgets; one share for all beats shares falling with depth,
which starve the deep blocks at 50 %.

Token counts are computed exactly (the same ``ceil`` as the reduction); FLOPs are estimated per block as
``a * n_in + b * n_in**2 + c * n_out`` with the block's real widths, scaled to what fvcore counts for an unreduced
block, then checked with ``count_flops`` and corrected (at most a few passes).

>>> import timm, torch, tokenmerge_patch as tm
>>> model = tm.patch(timm.create_model("deit_small_patch16_224"), flops=0.5)
>>> tm.patch_config(model).layers  # blocks 3-11
(3, 4, 5, 6, 7, 8, 9, 10, 11)
>>> tm.token_counts(model, torch.randn(1, 3, 224, 224))[-1]  # the class token and one patch token
2
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from torch import nn

from .flops import _linear_macs, count_flops
from .plan import PatchConfig
from .reduce import reduced_patch_count

if TYPE_CHECKING:
    from .model_info import ModelInfo

TOLERANCE = 0.01  # the patched count must land in [f - TOLERANCE, f]


def rule_start(depth: int) -> int:
    """First reducing block of the rule: ``max(1, depth // 4)``, the paper's first (block 3 of 12, 6 of 24)."""
    return min(depth - 1, max(1, depth // 4))


def token_counts_for(
    num_tokens: int, num_prefix: int, depth: int, layers: Sequence[int], keep_rates: Sequence[float], method: str
) -> list[tuple[int, int]]:
    """``(tokens in, tokens out)`` of every block for a plan, as the reduction will produce them."""
    rates = dict(zip(layers, keep_rates, strict=True))
    counts, tokens = [], num_tokens
    for index in range(depth):
        out = tokens
        if index in rates:
            out = num_prefix + reduced_patch_count(tokens - num_prefix, rates[index], method)
        counts.append((tokens, out))
        tokens = out
    return counts


@dataclass
class FlopModel:
    """FLOPs of a model as a function of its per-block token counts, fitted to fvcore's count of the unpatched
    model: per block ``scale * (attention_linear * n_in + 2 * width * n_in**2 + mlp_linear * n_out)``."""

    total: int  # fvcore's count of the unpatched model
    outside: int  # embedding, head, norms outside the blocks
    blocks: list[tuple[int, int, int, int, float]]  # per block: attention MACs, width, MLP MACs, channels, scale
    num_tokens: int
    num_prefix: int

    def __call__(self, counts: Sequence[tuple[int, int]], method: str = "merge", score: str = "cls") -> float:
        total = float(self.outside)
        for (n_in, n_out), (attention, width, mlp, channels, scale) in zip(counts, self.blocks, strict=True):
            total += scale * (attention * n_in + 2 * width * n_in * n_in + mlp * n_out)
            if n_out < n_in:  # the reduction's own matmuls: the score (the class row, or the whole attention matrix
                # for the received score) and the merge's similarities (the rest is checked by count_flops)
                patches, kept = n_in - self.num_prefix, n_out - self.num_prefix
                scoring = 0 if method == "bipartite" else n_in * width * (1 if score == "cls" else n_in)
                total += scoring + (method == "merge") * (patches - kept) * kept * channels
        return total


def flop_model(info: ModelInfo) -> FlopModel:
    """Fit :class:`FlopModel` to one ``count_flops`` of the (unpatched) model ``info`` describes, at its input size."""
    report = count_flops(info.model, info.input_size)
    blocks = []
    for block, counted in zip(info.backend.blocks(info.model), report.blocks, strict=True):
        attention, mlp, width = info.backend.block_parts(block)
        attention_macs, mlp_macs = _linear_macs(attention), _linear_macs(mlp)
        channels = [m for m in mlp.modules() if isinstance(m, nn.Linear)][-1].out_features
        n = counted.tokens_in
        analytic = attention_macs * n + 2 * width * n * n + mlp_macs * counted.tokens_out
        blocks.append((attention_macs, width, mlp_macs, channels, counted.flops / analytic if analytic else 1.0))
    return FlopModel(report.total, report.outside_blocks, blocks, report.blocks[0].tokens_in, info.num_prefix)


def geometric_counts(num_patches: int, steps: int, rate: float) -> list[int]:
    """Patch tokens after each of ``steps`` reducing blocks in a row: ``ceil(num_patches * rate**j)`` (rounded per
    block, not compounded, so the total moves by a token of one block at a time as ``rate`` changes).

    >>> geometric_counts(196, 3, 0.7)
    [138, 97, 68]
    """
    counts = [num_patches]
    for step in range(1, steps + 1):
        counts.append(min(counts[-1], max(1, math.ceil(num_patches * rate**step - 1e-9))))
    return counts[1:]


def keep_rates_for_counts(num_patches: int, counts: Sequence[int]) -> tuple[float, ...]:
    """Keep rates that make consecutive reducing blocks leave exactly ``counts`` patch tokens (exact ratios, which
    :func:`~tokenmerge_patch.reduce.kept_count` reproduces).

    >>> keep_rates_for_counts(196, [138, 97])
    (0.7040816326530612, 0.7028985507246377)
    """
    before = [num_patches, *counts[:-1]]
    return tuple(after / previous for previous, after in zip(before, counts, strict=True))


def fill_to(counts: list[int], estimate: Callable[[list[int]], float], aim: float, limit: int) -> list[int]:
    """Add tokens one block at a time, deepest first (the cheapest and least harmful), while the estimate stays at
    or below ``aim``: closes the gap a geometric schedule's rounding leaves. No block keeps more than the block
    before it, nor the first more than ``limit`` (the patch tokens it gets), so this ends.

    >>> fill_to([3, 2], lambda counts: sum(counts), aim=9, limit=4)
    [4, 4]
    """
    counts = list(counts)
    changed = True
    while changed:
        changed = False
        for index in reversed(range(len(counts))):
            if counts[index] >= (counts[index - 1] if index > 0 else limit):
                continue  # counts never grow along the blocks
            counts[index] += 1
            if estimate(counts) <= aim:
                changed = True
                break
            counts[index] -= 1
    return counts


def solve_rate(estimate: Callable[[float], float], target: float) -> float | None:
    """The largest keep rate whose estimated FLOPs fraction is at most ``target`` (bisection; FLOPs grow with
    the rate); ``None`` if even the smallest rate stays above ``target``."""
    low, high = 1e-3, 1.0
    if estimate(low) > target:
        return None
    if estimate(high) <= target:
        return high
    for _ in range(40):
        middle = (low + high) / 2
        low, high = (middle, high) if estimate(middle) <= target else (low, middle)
    return low


class Rule:
    """The rule's plans for one model, as patch-token counts of its reducing blocks (``rates`` turns them into keep
    rates): every block from :func:`rule_start` on keeps the same share of its patch tokens; with a class-token head
    the last block keeps one (its patch tokens feed nothing), unless the budget is so close to 1 that even keeping
    every other token would not reach it."""

    def __init__(self, flops: FlopModel, depth: int, method: str, last_one: bool, score: str = "cls") -> None:
        self.flops, self.depth, self.method, self.last_one, self.score = flops, depth, method, last_one, score
        self.layers = tuple(range(rule_start(depth), depth))
        self.patches = flops.num_tokens - flops.num_prefix

    def rates(self, counts: Sequence[int]) -> tuple[float, ...]:
        return keep_rates_for_counts(self.patches, counts)

    def estimate(self, counts: Sequence[int]) -> float:
        blocks = token_counts_for(
            self.flops.num_tokens, self.flops.num_prefix, self.depth, self.layers, self.rates(counts), self.method
        )
        return self.flops(blocks, self.method, self.score) / self.flops.total

    def smallest(self) -> list[int]:
        """The cheapest plan: one patch token left by the first reducing block."""
        return [1] * len(self.layers)

    def plan(self, aim: float) -> list[int] | None:
        """Counts whose estimated FLOPs fraction is at most, and close to, ``aim``; ``None`` if even the smallest plan
        is above it."""
        for last_one in (True, False) if self.last_one else (False,):
            steps = len(self.layers) - last_one

            def estimate(counts: Sequence[int], last_one: bool = last_one) -> float:
                return self.estimate([*counts, 1] if last_one else counts)

            if last_one and estimate([self.patches] * steps) < aim - TOLERANCE / 2:
                continue  # the budget is above what keeping one token in the last block allows
            rate = solve_rate(lambda r, steps=steps, e=estimate: e(geometric_counts(self.patches, steps, r)), aim)
            if rate is None:
                return None
            counts = fill_to(geometric_counts(self.patches, steps, rate), estimate, aim, self.patches)
            return [*counts, 1] if last_one else counts
        return None

    def neighbours(self, counts: Sequence[int]) -> list[list[int]]:
        """Plans one token away in one block, or one token more in one block and one fewer in another: the finest
        moves there are (an exchange between two blocks costs the difference of their per-token FLOPs)."""

        def valid(c: list[int]) -> bool:
            return all(1 <= after <= before for before, after in zip([self.patches, *c[:-1]], c, strict=True))

        moves = [[0] * len(counts)]
        for i in range(len(counts)):
            for step in (1, -1):
                moves.append([step * (k == i) for k in range(len(counts))])
                for j in range(len(counts)):
                    if j != i:
                        moves.append([step * (k == i) - step * (k == j) for k in range(len(counts))])
        out = [[c + m for c, m in zip(counts, move, strict=True)] for move in moves[1:]]
        return [c for c in out if valid(c)]


TINY_RATE = 1e-3  # a keep rate that leaves one patch token


def rule_keep_rates(
    flops: FlopModel, depth: int, method: str, last_one: bool, aim: float, score: str = "cls"
) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """The rule's reducing blocks and keep rates whose estimated FLOPs fraction is at most (and close to) ``aim``;
    ``ValueError`` if even one token per block stays above it."""
    rule = Rule(flops, depth, method, last_one, score)
    counts = rule.plan(aim)
    if counts is None:
        raise ValueError(f"the budget is below what the rule can reach by reducing blocks {rule.layers[0]}-{depth - 1}")
    return rule.layers, rule.rates(counts)


def budget_plan(info: ModelInfo, fraction: float, base: PatchConfig) -> PatchConfig:
    """The plan the rule gives the model ``info`` describes for a FLOPs ``fraction`` (counted at ``info.input_size``)
    with ``base``'s method and options.

    The model is patched with trial plans while this runs (``patch`` restores what it had); the caller installs the
    plan returned. ``ValueError`` naming the budgets that can be reached if ``fraction`` cannot be met.
    """
    from .patch import _install, unpatch  # patch imports this module lazily

    model, backend = info.model, info.backend
    unpatch(model)
    flops = flop_model(info)
    rule = Rule(flops, info.depth, base.method, info.class_token_head, base.score)

    def measure(counts: Sequence[int]) -> tuple[PatchConfig, float]:
        plan = replace(base, layers=rule.layers, keep_rates=rule.rates(counts), depth=info.depth)
        _install(model, backend, plan, backend.check(model, plan))
        return plan, count_flops(model, info.input_size).total / flops.total

    low, centre = fraction - TOLERANCE, fraction - TOLERANCE / 2
    aim, tried = centre, {}
    counts = rule.plan(aim)
    for attempt in range(10):
        if counts is None or tuple(counts) in tried:
            break
        plan, measured = measure(counts)
        if low <= measured <= fraction:
            return plan
        tried[tuple(counts)] = measured
        if attempt < 3:  # correct the estimate by what it missed and solve again
            aim -= measured - centre
            counts = rule.plan(aim)
            continue
        # then the finest moves around the nearest plan, by the estimate corrected by what it missed there
        nearest = min(tried, key=lambda c: abs(tried[c] - centre))
        offset = tried[nearest] - rule.estimate(nearest)
        options = [c for c in rule.neighbours(nearest) if tuple(c) not in tried]
        counts = min(options, key=lambda c: abs(rule.estimate(c) + offset - centre), default=None)
    _, smallest = measure(rule.smallest())
    where = f"for this model at input size {info.input_size}"
    if low < smallest or not tried:
        raise ValueError(
            f"flops={fraction} is below the smallest budget the rule reaches {where} ({smallest:.3f} of the FLOPs: "
            f"blocks {rule.layers[0]}-{info.depth - 1} keeping one patch token); choose flops >= {smallest + 0.01:.2f}"
        )
    below = max((m for m in tried.values() if m < low), default=None)
    above = min((m for m in tried.values() if m > fraction), default=None)
    near = " and ".join(f"{m:.4f}" for m in (below, above) if m is not None)
    raise ValueError(
        f"flops={fraction}: the rule could not land in [{low:.3f}, {fraction:.3f}] of the FLOPs {where} (its token "
        f"counts are too coarse here; the nearest plans count {near}); budgets from {smallest:.3f} up are reachable "
        "where the counts allow: try a budget a little larger or smaller"
    )


def tome_keep_rates(num_tokens: int, num_prefix: int, layers: Sequence[int], merged: int) -> tuple[float, ...]:
    """Per-layer keep rates that remove exactly ``merged`` tokens in each of ``layers`` (ToMe's constant-``r``
    schedule), for ``method="bipartite"`` or any other method; a block stops reducing once one patch is left.

    >>> tome_keep_rates(197, 1, (0, 1), 11)
    (0.9438775510204082, 0.9405405405405406)
    """
    rates, patches = [], num_tokens - num_prefix
    for _ in layers:
        keep = max(1, patches - merged)
        rates.append(keep / patches)
        patches = keep
    return tuple(rates)
