"""Calibration: search a plan that keeps a pretrained model's own predictions, on a few unlabelled images.

``calibrate(model, images, flops=0.65)`` returns a :class:`~tokenmerge_patch.PatchConfig` whose FLOPs (as
:func:`~tokenmerge_patch.count_flops` counts them at the model's input size) land in ``[f - 0.01, f]`` of the
unpatched model's and whose outputs stay closest to the unpatched model's: the mean KL divergence of the patched
logits from the unpatched ones (no labels; for a model without a classifier, one minus the cosine similarity of
its output embedding). Apply it with ``patch(model, config=plan)``; it is data (``plan.to_dict()``).

The search (deterministic; a fixed number of block evaluations, no clock):

1. *Family scan*: for start blocks around ``depth // 4`` and two depth profiles, the schedule "every block from the
   start keeps the same share of its tokens (or a share falling with depth)" solved to the budget, with the last
   block keeping one token when the model has a class-token head (its patch tokens feed nothing after it); the one
   with the lowest divergence is the starting point. The data-free rule of ``patch(flops=...)`` is one of them.
2. *Budget moves*: for each block, the divergence of keeping a little more and of keeping a little less; the
   blocks where more tokens buy most and where fewer cost least trade FLOPs (the cheaper block re-solved to
   stay inside the budget) while the divergence falls; the step halves when no trade helps.
3. Every fourth calibration image is held out of steps 1-2: whichever of the search's start and its end diverges
   less on those images is kept, so budget moves that only fit the search images are dropped. Then whether the
   size-weighted merge and the norm-keeping merge (``keep_norm``, unless given) help (each off or on) is decided on
   all the images (four times the held-out ones; the rates were fitted on most of them with the options as they
   were, which can only favour keeping those).
   Should the data-free rule still diverge less on all the images, the rule's plan is returned.

Every evaluation reruns only the blocks a candidate changes: the unpatched model's block inputs are cached once,
and so are the current best plan's (their merge records travel with them), so a candidate that first differs from
it at block ``j`` runs blocks ``j`` onwards (DeiT-T, 256 images: 55-121 s at 0.5-0.8 of the FLOPs on 2 CPU
cores, ``python benchmarks/accuracy.py --imagenet``).

>>> import timm, torch, tokenmerge_patch as tm
>>> model = timm.create_model("vit_tiny_patch16_224", img_size=64, depth=6).eval()
>>> plan = tm.calibrate(model, torch.randn(8, 3, 64, 64), flops=0.7, progress=False, max_block_runs=40)
>>> full = tm.count_flops(model, (3, 64, 64)).total  # calibrate left the model unpatched
>>> 0.69 <= tm.count_flops(tm.patch(model, config=plan), (3, 64, 64)).total / full <= 0.7
True
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from numbers import Integral
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from .budget import TOLERANCE, FlopModel, budget_plan, flop_model, rule_keep_rates, token_counts_for
from .evaluation import collect_images
from .flops import count_flops
from .model_info import ModelInfo, describe
from .plan import PatchConfig, check_fraction
from .utils import eval_mode

TINY = 1e-3  # a keep rate that leaves one patch token


class Score(NamedTuple):
    """Mean divergence from the unpatched model on the images the search decides by, on the held-out ones, and on
    all of them."""

    search: float
    held: float
    overall: float


@dataclass(frozen=True)
class Candidate:
    """A plan in the search's own terms: one keep rate per block (1.0: the block does not reduce)."""

    rates: tuple[float, ...]
    size_weighted: bool
    keep_norm: bool = False

    @property
    def first(self) -> int:
        return next((i for i, rate in enumerate(self.rates) if rate < 1.0), len(self.rates))

    def config(self, base: PatchConfig) -> PatchConfig:
        layers = tuple(i for i, rate in enumerate(self.rates) if rate < 1.0)
        merge = base.method == "merge"
        return replace(
            base,
            layers=layers,
            keep_rates=tuple(self.rates[i] for i in layers),
            size_weighted=self.size_weighted and merge,
            keep_norm=self.keep_norm and merge,
        )

    def options(self) -> tuple[bool, bool]:
        return self.size_weighted, self.keep_norm


def shaped_rates(depth: int, start: int, cut: float, slope: float = 0.0, last_one: bool = True) -> tuple[float, ...]:
    """Keep rate ``1 - cut * w(t)`` in the blocks from ``start`` on, with ``w(t) = (1 + slope t) / (1 + slope / 2)``
    and ``t`` going from 0 to 1 over them (``slope = 0``: one rate for all); with ``last_one`` the last block keeps
    one token instead (free with a class-token head).

    >>> shaped_rates(5, 2, 0.2)
    (1.0, 1.0, 0.8, 0.8, 0.001)
    >>> shaped_rates(5, 2, 0.2, last_one=False)
    (1.0, 1.0, 0.8, 0.8, 0.8)
    """
    rates = [1.0] * depth
    end = depth - 1 if last_one else depth
    span = end - start
    for block in range(start, end):
        t = (block - start) / max(span - 1, 1)
        rates[block] = min(1.0, max(TINY, 1.0 - cut * (1.0 + slope * t) / (1.0 + slope / 2.0)))
    if last_one:
        rates[depth - 1] = TINY
    return tuple(rates)


def solve_scalar(make: Callable[[float], tuple[float, ...]], fraction: Callable, aim: float, low: float, high: float):
    """Bisection on the scalar of ``make`` (FLOPs fall as it grows): the smallest value whose plan's FLOPs fraction
    is at most ``aim``; ``None`` if even ``make(high)`` is above it."""
    if fraction(make(low)) <= aim:
        return make(low)
    if fraction(make(high)) > aim:
        return None
    for _ in range(40):
        middle = (low + high) / 2
        low, high = (low, middle) if fraction(make(middle)) <= aim else (middle, high)
    return make(high)


class _Runner:
    """Evaluates candidates on the calibration images, rerunning only the blocks a candidate changes."""

    def __init__(self, info: ModelInfo, images: Tensor, batch_size: int, base: PatchConfig, progress: bool) -> None:
        from .patch import _install, unpatch

        model = info.model
        self.model, self.base = model, base
        self.backend = info.backend
        self.blocks = list(self.backend.blocks(model))
        self.run_images = info.images  # a CLIPModel: its image features
        self._install, self._unpatch = _install, unpatch
        self.chunks = list(images.split(batch_size))
        # every 4th image is held out of the search: it only decides whether the search's moves beat its start
        self.held_out = torch.arange(len(images)) % 4 == 3 if len(images) >= 8 else torch.zeros(len(images), dtype=bool)
        self.block_runs = 0.0
        unpatch(model)
        self.targets: list[Tensor] = []
        self.base_inputs: list[list[Tensor]] = []  # [chunk][block]
        for chunk in tqdm(self.chunks, desc="calibrate: unpatched model", disable=not progress, leave=False):
            inputs, output = self._run_capturing(chunk)
            self.base_inputs.append(inputs)
            self.targets.append(output)
        self.anchor: Candidate | None = None
        self.anchor_inputs: list[list[Tensor]] = []

    # -- running ------------------------------------------------------------------------------------
    def _target(self, output: object) -> Tensor:
        """What is compared: log-probabilities of the logits, or the unit-norm output embedding."""
        vector = _output_vector(output).float()
        return vector.log_softmax(-1) if self.has_logits else F.normalize(vector.flatten(1), dim=-1)

    def _run_capturing(self, images: Tensor) -> tuple[list[Tensor], Tensor]:
        inputs: list[Tensor] = []
        handles = [b.register_forward_pre_hook(lambda _m, args: inputs.append(args[0])) for b in self.blocks]
        try:
            output = self.run_images(images)
        finally:
            for handle in handles:
                handle.remove()
        self.has_logits = _has_logits(output)
        return inputs, self._target(output)

    def _run_from(self, start: int, images: Tensor, entering: Tensor) -> Tensor:
        """The model's output with blocks ``< start`` skipped: block ``start`` gets ``entering`` (cached)."""
        saved = [block.__dict__.get("forward") for block in self.blocks[:start]]
        for block in self.blocks[:start]:
            block.__dict__["forward"] = lambda *args, **kwargs: entering
        try:
            return self._target(self.run_images(images))
        finally:
            for block, forward in zip(self.blocks[:start], saved, strict=True):
                if forward is None:
                    del block.__dict__["forward"]
                else:
                    block.__dict__["forward"] = forward

    def _apply(self, candidate: Candidate) -> None:
        config = candidate.config(self.base)
        if config.layers:
            self._install(self.model, self.backend, config, self.backend.check(self.model, config))
        else:
            self._unpatch(self.model)

    def _divergence(self, chunk: int, output: Tensor) -> Tensor:
        """Per image of the chunk: KL(unpatched || patched), or 1 - cosine of the embeddings."""
        target = self.targets[chunk]
        if self.has_logits:
            return (target.exp() * (target - output)).sum(-1)
        return 1 - (target * output).sum(-1)

    def _score(self, per_image: list[Tensor]) -> Score:
        divergence = torch.cat(per_image).double()
        held = self.held_out
        overall = float(divergence.mean())
        if not held.any():
            return Score(overall, overall, overall)
        return Score(float(divergence[~held].mean()), float(divergence[held].mean()), overall)

    def evaluate(self, candidate: Candidate) -> Score:
        """Mean divergence of ``candidate`` from the unpatched model, on the search and the held-out images."""
        start, inputs = candidate.first, None
        anchor = self.anchor
        if anchor is not None and anchor.options() == candidate.options():
            pairs = enumerate(zip(anchor.rates, candidate.rates, strict=True))
            differs = next((i for i, (a, b) in pairs if a != b), None)
            if differs is None:
                differs = len(candidate.rates) - 1
            if differs > anchor.first:
                start, inputs = differs, self.anchor_inputs
        inputs = inputs or self.base_inputs
        self._apply(candidate)
        per_image = [
            self._divergence(index, self._run_from(start, chunk, inputs[index][start]))
            for index, chunk in enumerate(self.chunks)
        ]
        self.block_runs += len(self.blocks) - start
        return self._score(per_image)

    def set_anchor(self, candidate: Candidate) -> Score:
        """Run ``candidate`` fully, caching every block's input (with the records they carry)."""
        self._apply(candidate)
        per_image, self.anchor_inputs = [], []
        for index, chunk in enumerate(self.chunks):
            inputs, output = self._run_capturing(chunk)
            self.anchor_inputs.append(inputs)
            per_image.append(self._divergence(index, output))
        self.anchor = candidate
        self.block_runs += len(self.blocks)
        return self._score(per_image)


def _output_vector(output: object) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        if output[0].dim() != 2:  # feature maps (features_only), not a head: nothing to compare predictions by
            raise TypeError(
                f"cannot calibrate a model returning a {type(output).__name__} of {output[0].dim()}-d tensors (feature "
                "maps of a dense backbone, e.g. features_only=True): calibrate keeps a classifier's or an embedding "
                "model's outputs; calibrate the model with its head, or use patch(backbone, flops=...)"
            )
        return output[0] if len(output) == 1 or not isinstance(output[1], Tensor) else (output[0] + output[1]) / 2
    for key in ("logits", "image_embeds", "pooler_output"):
        value = getattr(output, key, None)
        if isinstance(value, Tensor):
            return value
    hidden = getattr(output, "last_hidden_state", None)
    if isinstance(hidden, Tensor):
        return hidden[:, 0]
    raise TypeError(f"cannot calibrate a model returning {type(output).__name__}: expected logits or an embedding")


def _has_logits(output: object) -> bool:
    return isinstance(output, (Tensor, tuple, list)) or isinstance(getattr(output, "logits", None), Tensor)


@torch.inference_mode()
def calibrate(
    model: nn.Module,
    data: Tensor | Iterable,
    *,
    flops: float,
    images: int = 256,
    batch_size: int = 64,
    method: str = "merge",
    prop_attn: bool | None = None,
    keep_norm: bool | None = None,
    max_block_runs: int | None = None,
    progress: bool = True,
    score: str | None = None,
) -> PatchConfig:
    """Search the blocks and keep rates that preserve ``model``'s own predictions within a FLOPs budget.

    Args:
        model: a supported timm or Hugging Face ViT (patched or not; it is left exactly as it was).
        data: unlabelled images, normalised as the model expects: a float tensor ``[N, C, H, W]``, or an iterable
            of such batches, of ``(images, labels)`` or of ``{"pixel_values": ...}`` dicts (labels are ignored).
        flops: the budget, a fraction in (0, 1) of the unpatched model's FLOPs (``count_flops`` at the size of the
            calibration images, which may differ from the size the model is built for when the model takes them);
            the plan's count lands in ``[flops - 0.01, flops]``, and wherever the ``flops=`` rule of
            :func:`~tokenmerge_patch.patch` lands, so does calibrate (returning the rule's plan if its own misses).
        images: how many images of ``data`` to use (the first ones).
        batch_size: images per forward.
        method: the reduction (``"merge"``, the default, is what the search is tuned for).
        prop_attn: proportional attention after merges (``None``: as :func:`~tokenmerge_patch.patch` defaults it).
        keep_norm: the norm-keeping merge: ``True`` / ``False`` fix it; ``None`` starts from ``patch``'s default and
            lets the search decide (it also decides ``size_weighted``).
        score: what picks the crucial tokens (``None``: as :func:`~tokenmerge_patch.patch` defaults it).
        max_block_runs: the search's budget, in block evaluations of all the calibration images (default: 30
            full forwards' worth); the result depends on it but on nothing else (no clock).
        progress: show progress bars.

    Returns:
        The plan: ``patch(model, config=plan)`` applies it.

    Raises:
        TypeError / ValueError: bad ``model``, ``data`` (empty, wrong shape or dtype, non-finite values, a size the
            model does not take), ``flops`` or options; an unreachable budget. The model is left as it was.
    """
    from .patch import _validated_config, _with_previous_patch_restored

    info = describe(model)
    model, backend, depth = info.model, info.backend, info.depth
    if backend.name == "hf-vlm":
        raise TypeError(
            f"calibrate keeps a classifier's or an embedding model's outputs; {type(model).__name__} answers with its "
            "language model, which a search on images alone cannot judge: patch it with visual_tokens=K (or flops=)"
        )
    fraction = check_fraction(flops, "flops")
    for name, value in (("images", images), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if max_block_runs is not None and (
        isinstance(max_block_runs, bool) or not isinstance(max_block_runs, Integral) or max_block_runs < 1
    ):
        raise ValueError(f"max_block_runs must be an int >= 1 or None, got {max_block_runs!r}")
    base = _validated_config(info, None, 0.7, method=method, prop_attn=prop_attn, keep_norm=keep_norm, score=score)
    backend.check(model, replace(base, layers=tuple(range(depth)), keep_rates=(1.0,) * depth))
    if depth < 3:
        raise ValueError(f"calibrate needs a model with at least 3 blocks, this one has {depth}")
    calibration = collect_images(data, int(images), channels=info.input_size[0])
    param = next(model.parameters(), None)
    if param is not None:
        calibration = calibration.to(param.device, param.dtype)
    budget = int(max_block_runs) if max_block_runs is not None else 30 * depth

    def search() -> PatchConfig:
        sized = info.taking(tuple(calibration.shape[1:]), "data images")
        with eval_mode(model):
            return _search(sized, calibration, int(batch_size), base, fraction, budget, progress, keep_norm is None)

    return _with_previous_patch_restored(info, search)


def _search(
    info: ModelInfo,
    images: Tensor,
    batch_size: int,
    base: PatchConfig,
    fraction: float,
    budget: int,
    progress: bool,
    free_keep_norm: bool = True,
) -> PatchConfig:
    from .patch import unpatch

    model, depth, num_prefix = info.model, info.depth, info.num_prefix
    unpatch(model)
    flops_of = flop_model(info)
    aim = fraction - TOLERANCE / 2

    def share(rates: Sequence[float]) -> float:
        return _fraction(flops_of, depth, num_prefix, rates, base.method, base.score)

    runner = _Runner(info, images, batch_size, base, progress)
    bar = tqdm(total=budget, desc=f"calibrate to {fraction:.0%} of the FLOPs", disable=not progress, leave=False)

    def spent() -> bool:
        bar.n = min(budget, round(runner.block_runs))
        bar.refresh()
        return runner.block_runs >= budget

    # 1. family scan (keeping one token in the last block only where the budget can still be reached that way)
    head = info.class_token_head
    quarter = max(1, depth // 4)
    best: tuple[float, Candidate] | None = None
    for last_one in (True, False) if head else (False,):
        for start in sorted({max(1, quarter - 1), quarter, min(depth - 2, quarter + 1)}):
            for slope in (0.0, 1.5):
                shape = partial(shaped_rates, depth, start, slope=slope, last_one=last_one)  # shape(cut)
                rates = solve_scalar(shape, share, aim, 0.0, 1.0)
                if rates is None or share(rates) < fraction - TOLERANCE:
                    continue  # over the budget even at its cheapest, or under it even at its dearest
                candidate = Candidate(rates, base.size_weighted, base.keep_norm)
                divergence = runner.evaluate(candidate).search
                if best is None or divergence < best[0]:
                    best = (divergence, candidate)
        if best is not None:
            break
    rule: tuple[Candidate, Score] | None = None
    try:  # the data-free rule of patch(flops=...) competes too, and is the fallback (step 3)
        layers, keep_rates = rule_keep_rates(flops_of, depth, base.method, head, aim, base.score)
        rates = dict(zip(layers, keep_rates, strict=True))
        candidate = Candidate(tuple(rates.get(i, 1.0) for i in range(depth)), base.size_weighted, base.keep_norm)
        rule = (candidate, runner.evaluate(candidate))
        if best is None or rule[1].search < best[0]:
            best = (rule[1].search, candidate)
    except ValueError:
        pass
    if best is None:
        raise ValueError(f"flops={fraction}: below what reducing every block can reach for this model")
    _, plan = best
    start, start_score = plan, runner.set_anchor(plan)
    plan_score = start_score  # the current plan's (it is the anchor)
    score = start_score.search
    spent()

    # 2. budget moves
    step, min_step = 0.04, 0.01
    while step >= min_step and not spent():
        rates = list(plan.rates)
        now = share(rates)
        gain: dict[int, float] = {}  # divergence saved per FLOP spent, by keeping more in a block
        cost: dict[int, float] = {}  # divergence added per FLOP saved, by keeping less
        for block in range(max(0, plan.first - 1), depth - (head and rates[-1] <= TINY)):
            if rates[block] < 1.0:
                looser = _with_rate(rates, block, rates[block] + step)
                extra = share(looser) - now
                if extra > 0:
                    gain[block] = (score - runner.evaluate(replace(plan, rates=looser)).search) / extra
            if rates[block] - step > TINY:
                tighter = _with_rate(rates, block, rates[block] - step)
                saved = now - share(tighter)
                if saved > 0:
                    cost[block] = (runner.evaluate(replace(plan, rates=tighter)).search - score) / saved
            if spent():
                break
        loosen = sorted(gain, key=lambda b: -gain[b])[:3]
        tighten = sorted(cost, key=lambda b: cost[b])[:3]
        pairs = sorted(((a, b) for a in loosen for b in tighten if a != b), key=lambda p: cost[p[1]] - gain[p[0]])
        accepted = False
        for a, b in pairs[:4]:
            if cost[b] >= gain[a] or spent():
                break
            looser = _with_rate(rates, a, rates[a] + step)
            tightened = partial(_tightened, looser, b, rates[b])  # tightened(c): block b keeps rates[b] - c
            moved = solve_scalar(tightened, share, aim, 0.0, rates[b] - TINY)
            if moved is None:
                continue
            candidate = replace(plan, rates=moved)
            if runner.evaluate(candidate).search < score:
                plan, accepted = candidate, True
                plan_score = runner.set_anchor(plan)
                score = plan_score.search
                break
        if not accepted:
            step /= 2

    # 3. the held-out images decide between the search's start and its end (the end is fitted to the others); then
    # all the images decide whether size weighting and norm keeping help there. The rates were fitted on most of
    # them with the options as they are, which favours keeping those: a conservative bias, for four times the
    # images of the held-out quarter.
    plan, score = min(((start, start_score), (plan, plan_score)), key=lambda pair: pair[1].held)
    if base.method == "merge":
        twins = [(plan, score)]
        flips = ((True, False), (False, True), (True, True)) if free_keep_norm else ((True, False),)
        for size_weighted, keep_norm in flips:
            other = replace(
                plan, size_weighted=plan.size_weighted != size_weighted, keep_norm=plan.keep_norm != keep_norm
            )
            twins.append((other, runner.evaluate(other)))
        plan, score = min(twins, key=lambda pair: pair[1].overall)
    # the plan's divergence on all the images flatters it (the search fitted part of them); if even so the rule,
    # which saw no data, diverges less, the rule it is: calibrating never does worse than patch(flops=) there
    if rule is not None and rule[1].overall < score.overall:
        plan = rule[0]
    bar.close()
    try:
        return _fit_budget(info, plan.config(base), fraction, flops_of.total)
    except ValueError:  # its rates move too coarsely here (bipartite clamps them): the rule lands wherever it can
        return budget_plan(info, fraction, base)


def _tightened(rates: Sequence[float], block: int, rate: float, cut: float) -> tuple[float, ...]:
    return _with_rate(rates, block, rate - cut)


def _with_rate(rates: Sequence[float], block: int, rate: float) -> tuple[float, ...]:
    out = list(rates)
    out[block] = min(1.0, max(TINY, rate))
    return tuple(out)


def _fraction(
    flops_of: FlopModel, depth: int, num_prefix: int, rates: Sequence[float], method: str, score: str = "cls"
) -> float:
    layers = tuple(i for i, rate in enumerate(rates) if rate < 1.0)
    counts = token_counts_for(flops_of.num_tokens, num_prefix, depth, layers, [rates[i] for i in layers], method)
    return flops_of(counts, method, score) / flops_of.total


def _fit_budget(info: ModelInfo, plan: PatchConfig, fraction: float, total: int):
    """Check the plan with ``count_flops``; if the estimate missed the window, move the deepest reducing block
    before the last (the cheapest to change) until it lands."""
    from .patch import _install

    model, backend = info.model, info.backend
    for _ in range(8):
        _install(model, backend, plan, backend.check(model, plan))
        measured = count_flops(model, info.input_size).total / total
        if fraction - TOLERANCE <= measured <= fraction:
            return plan
        if len(plan.layers) < 2:
            break
        index = len(plan.layers) - 2
        rates = list(plan.keep_rates)
        error = measured - (fraction - TOLERANCE / 2)
        rates[index] = min(1.0, max(TINY, rates[index] * (1 - 4 * error)))
        plan = replace(plan, keep_rates=tuple(rates))
    raise ValueError(f"calibrate could not land the plan in [{fraction - TOLERANCE:.3f}, {fraction:.3f}] of the FLOPs")
