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

from torch import nn

from .backends import find_backend
from .flops import _linear_macs, count_flops
from .plan import PatchConfig
from .reduce import reduced_patch_count

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

    def __call__(self, counts: Sequence[tuple[int, int]], method: str = "merge") -> float:
        total = float(self.outside)
        for (n_in, n_out), (attention, width, mlp, channels, scale) in zip(counts, self.blocks, strict=True):
            total += scale * (attention * n_in + 2 * width * n_in * n_in + mlp * n_out)
            if n_out < n_in:  # the reduction's own matmuls: the class row and the merge's similarities (the rest
                # is checked by count_flops and corrected)
                patches, kept = n_in - self.num_prefix, n_out - self.num_prefix
                total += n_in * width + (method == "merge") * (patches - kept) * kept * channels
        return total


def flop_model(model: nn.Module, input_size: Sequence[int], num_prefix: int) -> FlopModel:
    """Fit :class:`FlopModel` to one ``count_flops`` of the (unpatched) ``model``."""
    backend = find_backend(model)
    report = count_flops(model, input_size)
    blocks = []
    for block, counted in zip(backend.blocks(model), report.blocks, strict=True):
        attention, mlp, width = backend.block_parts(block)
        attention_macs, mlp_macs = _linear_macs(attention), _linear_macs(mlp)
        channels = [m for m in mlp.modules() if isinstance(m, nn.Linear)][-1].out_features
        n = counted.tokens_in
        analytic = attention_macs * n + 2 * width * n * n + mlp_macs * counted.tokens_out
        blocks.append((attention_macs, width, mlp_macs, channels, counted.flops / analytic if analytic else 1.0))
    return FlopModel(report.total, report.outside_blocks, blocks, report.blocks[0].tokens_in, num_prefix)


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


def fill_to(counts: list[int], estimate: Callable[[list[int]], float], aim: float) -> list[int]:
    """Add tokens one block at a time, deepest first (the cheapest and least harmful), while the estimate stays at
    or below ``aim``: closes the gap a geometric schedule's rounding leaves."""
    counts = list(counts)
    changed = True
    while changed:
        changed = False
        for index in reversed(range(len(counts))):
            if index > 0 and counts[index] >= counts[index - 1]:
                continue  # counts never grow along the blocks
            counts[index] += 1
            if estimate(counts) <= aim:
                changed = True
                break
            counts[index] -= 1
    return counts


def solve_rate(estimate: Callable[[float], float], target: float) -> float:
    """The largest keep rate whose estimated FLOPs fraction is at most ``target`` (bisection; FLOPs grow with
    the rate). ``ValueError`` if even the smallest rate stays above ``target``."""
    low, high = 1e-3, 1.0
    if estimate(low) > target:
        raise ValueError(f"the budget is below what this rule can reach ({estimate(low):.3f} of the FLOPs)")
    for _ in range(40):
        middle = (low + high) / 2
        low, high = (middle, high) if estimate(middle) <= target else (low, middle)
    return low


def rule_keep_rates(
    flops: FlopModel, depth: int, method: str, last_one: bool, aim: float
) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """The rule's reducing blocks and keep rates whose estimated FLOPs fraction is at most (and close to) ``aim``;
    ``ValueError`` if even one token per block stays above it."""
    layers = tuple(range(rule_start(depth), depth))
    patches, steps = flops.num_tokens - flops.num_prefix, len(layers) - last_one

    def rates_for(counts: list[int]) -> tuple[float, ...]:
        return keep_rates_for_counts(patches, [*counts, 1] if last_one else counts)

    def estimate(counts: list[int]) -> float:
        blocks = token_counts_for(flops.num_tokens, flops.num_prefix, depth, layers, rates_for(counts), method)
        return flops(blocks, method) / flops.total

    try:
        rate = solve_rate(lambda r: estimate(geometric_counts(patches, steps, r)), aim)
    except ValueError:
        raise ValueError(
            f"flops={aim:.3f} is below what method={method!r} can reach by reducing blocks {layers[0]}-{layers[-1]} "
            "of this model; choose a larger budget"
        ) from None
    return layers, rates_for(fill_to(geometric_counts(patches, steps, rate), estimate, aim))


def budget_plan(model: nn.Module, fraction: float, base: PatchConfig) -> PatchConfig:
    """The plan the rule gives ``model`` for a FLOPs ``fraction`` with ``base``'s method and options.

    ``model`` is patched with trial plans while this runs (``patch`` restores what it had); the caller installs
    the plan returned. ``ValueError`` if the budget cannot be met.
    """
    from .patch import _install, unpatch  # patch imports this module lazily

    backend = find_backend(model)
    depth = len(backend.blocks(model))
    unpatch(model)
    num_prefix = backend.check(model, replace(base, layers=(0,), keep_rates=(1.0,)))
    input_size = backend.input_size(model)
    flops = flop_model(model, input_size, num_prefix)
    last_one = backend.class_token_head(model)  # the last block keeps one token (free with a class-token head)
    aim = fraction - TOLERANCE / 2
    measured = 1.0
    for _ in range(4):
        layers, rates = rule_keep_rates(flops, depth, base.method, last_one, aim)
        plan = replace(base, layers=layers, keep_rates=rates, depth=depth)
        _install(model, backend, plan, backend.check(model, plan))
        measured = count_flops(model, input_size).total / flops.total
        if fraction - TOLERANCE <= measured <= fraction:
            return plan
        aim -= measured - (fraction - TOLERANCE / 2)  # correct the estimate by what it missed
    raise ValueError(
        f"flops={fraction}: could not land in [{fraction - TOLERANCE:.3f}, {fraction:.3f}] of the FLOPs "
        f"(last plan: {measured:.3f}); try another budget"
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
