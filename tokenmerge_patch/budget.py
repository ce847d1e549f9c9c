"""Patch to a FLOPs budget: ``patch(model, flops=f)`` picks the blocks and keep rates by a fixed rule (no data).

The rule: reduce in every block from ``start = max(1, round(depth / 6))`` on (block 2 of 12), the patch tokens
falling geometrically (``N * r**j`` after the ``j``-th reducing block, i.e. each keeps about the same fraction ``r``),
with ``r`` solved so that :func:`~tokenmerge_patch.count_flops` of the patched
model at its input size lands in ``[f - 0.01, f]`` of the unpatched count. Many gentle cuts beat a few hard ones
off the shelf (real ImageNet DeiT-T at 65 % of the FLOPs: -0.5 points against -1.2 for three blocks at 0.7; see
the README), and block 0-1 are left alone because the class token's attention there does not yet say which
tokens matter.

Token counts are computed exactly (the same ``ceil`` as the reduction); FLOPs are estimated per block as
``a * n_in + b * n_in**2 + c * n_out`` with the block's real widths, scaled to what fvcore counts for an unreduced
block, then checked with ``count_flops`` and corrected (at most a few passes).

>>> import timm, tokenmerge_patch as tm
>>> model = tm.patch(timm.create_model("deit_small_patch16_224"), flops=0.5)
>>> plan = tm.patch_config(model)
>>> plan.layers[0], len(plan.layers)
(2, 10)
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
    """First reducing block of the rule: ``max(1, round(depth / 6))`` (2 for 12 blocks, 4 for 24)."""
    return min(depth - 1, max(1, round(depth / 6)))


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
    layers = tuple(range(rule_start(depth), depth))

    patches = flops.num_tokens - num_prefix

    def plan_for(counts: list[int]) -> PatchConfig:
        return replace(base, layers=layers, keep_rates=keep_rates_for_counts(patches, counts), depth=depth)

    def estimate(counts: list[int]) -> float:
        blocks = token_counts_for(flops.num_tokens, num_prefix, depth, layers, plan_for(counts).keep_rates, base.method)
        return flops(blocks, base.method) / flops.total

    aim = fraction - TOLERANCE / 2
    for _ in range(4):
        rate = solve_rate(lambda r: estimate(geometric_counts(patches, len(layers), r)), aim)
        plan = plan_for(fill_to(geometric_counts(patches, len(layers), rate), estimate, aim))
        _install(model, backend, plan, backend.check(model, plan))
        measured = count_flops(model, input_size).total / flops.total
        if fraction - TOLERANCE <= measured <= fraction:
            return plan
        aim -= measured - (fraction - TOLERANCE / 2)  # correct the estimate by what it missed
    raise ValueError(
        f"flops={fraction}: could not land in [{fraction - TOLERANCE:.3f}, {fraction:.3f}] of the FLOPs "
        f"(last plan: {measured:.3f}); try another budget"
    )


def plan_flops(model: nn.Module, plan: PatchConfig) -> float:
    """The FLOPs fraction ``plan`` gives ``model`` by the fitted estimate (no trace): for searches."""
    backend = find_backend(model)
    num_prefix = int(getattr(model, "num_prefix_tokens", 1))
    flops = flop_model(model, backend.input_size(model), num_prefix)
    depth = len(backend.blocks(model))
    counts = token_counts_for(flops.num_tokens, num_prefix, depth, plan.layers, plan.keep_rates, plan.method)
    return flops(counts, plan.method) / flops.total


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
