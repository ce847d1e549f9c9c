"""Throughput measured side by side: variants run in interleaved rounds, so the drifts of a noisy
machine hit every variant alike, and the median of the rounds is reported."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm


@dataclass
class Variant:
    """``setup`` puts the model in this variant's state (e.g. patch it); only ``run`` is timed."""

    setup: Callable[[], object]
    run: Callable[[], object]


def interleaved_timings(
    variants: Mapping[str, Variant],
    *,
    rounds: int = 5,
    warmup: int = 1,
    progress: bool = True,
    desc: str = "timing",
) -> dict[str, list[float]]:
    """Seconds per ``run`` of each variant, one sample per round, variants taking turns within a round.

    >>> calls = []
    >>> out = interleaved_timings({"a": Variant(lambda: None, lambda: calls.append("a")),
    ...                            "b": Variant(lambda: None, lambda: calls.append("b"))},
    ...                           rounds=2, warmup=0, progress=False)
    >>> calls, sorted(out), len(out["a"])
    (['a', 'b', 'a', 'b'], ['a', 'b'], 2)
    """
    samples: dict[str, list[float]] = {name: [] for name in variants}
    steps = tqdm(total=(rounds + warmup) * len(variants), desc=desc, disable=not progress, leave=False)
    with torch.inference_mode():
        for round_index in range(warmup + rounds):
            for name, variant in variants.items():
                variant.setup()
                synchronize()
                start = time.perf_counter()
                variant.run()
                synchronize()
                if round_index >= warmup:
                    samples[name].append(time.perf_counter() - start)
                steps.update()
    steps.close()
    return samples


def median(values: list[float]) -> float:
    return statistics.median(values)


def synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
