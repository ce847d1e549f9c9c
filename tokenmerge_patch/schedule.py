"""Keep-rate specifications: which blocks reduce, and how much each keeps.

>>> default_layers(12)
(3, 6, 9)
>>> resolve_plan(12, None, 0.7)
((3, 0.7), (6, 0.7), (9, 0.7))
>>> resolve_plan(12, (9, 3), (0.5, 0.8))
((3, 0.8), (9, 0.5))
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Integral, Real

LayerSpec = int | Sequence[int] | None
KeepRateSpec = float | Sequence[float]


def default_layers(depth: int) -> tuple[int, ...]:
    """The paper's placement (blocks 4, 7, 10 of 12): ``(d//4, d//2, 3d//4)``, deduplicated."""
    return tuple(sorted({depth // 4, depth // 2, (3 * depth) // 4}))


def _check_keep_rate(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a float in (0, 1], got {type(value).__name__} {value!r}")
    rate = float(value)
    if not (0.0 < rate <= 1.0) or math.isnan(rate):
        raise ValueError(f"{name} must be in (0, 1], got {value!r}")
    return rate


def _check_layer(value: object, depth: int) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"layers must hold block indices (int), got {type(value).__name__} {value!r}")
    index = int(value)
    if not 0 <= index < depth:
        raise ValueError(f"layers: block index {index} is out of range; the model has blocks 0..{depth - 1}")
    return index


def resolve_plan(depth: int, layers: LayerSpec, keep_rate: KeepRateSpec) -> tuple[tuple[int, float], ...]:
    """Validate ``layers`` and ``keep_rate`` and pair them, sorted by block index.

    Args:
        depth: number of blocks in the model.
        layers: block indices (0-based) that reduce tokens; ``None`` for :func:`default_layers`.
        keep_rate: one rate for every chosen block, or one per entry of ``layers`` (same order).

    Raises:
        TypeError: a layer is not an int, or a rate is not a number.
        ValueError: a layer out of range or repeated, a rate outside (0, 1], or a rate sequence whose
            length differs from the number of layers.
    """
    if layers is None:
        chosen = default_layers(depth)
    elif isinstance(layers, Integral) and not isinstance(layers, bool):
        chosen = (_check_layer(layers, depth),)
    elif isinstance(layers, Sequence) and not isinstance(layers, str):
        chosen = tuple(_check_layer(layer, depth) for layer in layers)
        if not chosen:
            raise ValueError("layers must name at least one block (or be None for the paper's placement)")
        repeated = sorted({layer for layer in chosen if chosen.count(layer) > 1})
        if repeated:
            raise ValueError(f"layers must not repeat a block; repeated: {repeated}")
    else:
        raise TypeError(f"layers must be None, an int or a sequence of ints, got {type(layers).__name__}")

    if isinstance(keep_rate, Sequence) and not isinstance(keep_rate, str):
        rates = tuple(_check_keep_rate(rate, "keep_rate") for rate in keep_rate)
        if len(rates) != len(chosen):
            raise ValueError(
                f"keep_rate has {len(rates)} rates but {len(chosen)} layers are chosen {chosen}; "
                "give one rate per layer or a single float"
            )
    else:
        rates = (_check_keep_rate(keep_rate, "keep_rate"),) * len(chosen)
    return tuple(sorted(zip(chosen, rates, strict=True)))


def warmup_keep_rates(targets: Sequence[float], step: int, warmup_steps: int) -> tuple[float, ...]:
    """Per-layer keep rates at training ``step`` (0-based): a cosine from 1 down to each target over the
    first ``warmup_steps`` steps, then the targets (EViT's ``adjust_keep_rate``, per step).

    Starting at 1 lets a pretrained model see all its tokens first and lose them gradually.

    >>> warmup_keep_rates((0.5, 0.25), 0, 4)
    (1.0, 1.0)
    >>> [round(rate, 4) for rate in warmup_keep_rates((0.5, 0.25), 2, 4)]  # half way: (1 + target) / 2
    [0.75, 0.625]
    >>> warmup_keep_rates((0.5, 0.25), 4, 4), warmup_keep_rates((0.5,), 0, 0)
    ((0.5, 0.25), (0.5,))
    """
    rates = tuple(_check_keep_rate(target, "target keep rate") for target in targets)
    if isinstance(step, bool) or not isinstance(step, Integral) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, Integral) or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be an int >= 0, got {warmup_steps!r}")
    if step >= warmup_steps:
        return rates
    factor = 0.5 * (1.0 + math.cos(math.pi * step / warmup_steps))  # 1 at step 0, -> 0 at warmup_steps
    return tuple(rate + (1.0 - rate) * factor for rate in rates)
