"""Where a reducing block's time goes: the block unpatched vs reducing (merge, drop), and the reduction
alone, measured side by side; then torch.profiler's top operators of the merge; then, for whole forwards at
batch 1 (where the patched model trails the token-count oracle most), how its time splits against the oracle:
the patched model (patch()'s defaults in blocks 3, 6, 9), the same with proportional attention off (keep_norm
still on), and the same with the reduction replaced by free slicing (a stand-in that keeps the first tokens and
does nothing else).

    python benchmarks/profile_reduction.py                    # DeiT-S block 3, batch 16, 2 threads
    python benchmarks/profile_reduction.py --model deit_tiny_patch16_224 --batch-size 64

Writes ``profile_reduction.md`` to ``--out`` for the full run (the defaults, whose result is committed); any
other model, block, keep rate, batch size or number of rounds writes ``profile_reduction_quick.md`` instead
(``--stem`` names the file explicitly).
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Callable
from pathlib import Path

import timm
import torch
from torch import Tensor

import tokenmerge_patch as tm
from tokenmerge_patch.backends import find_backend
from tokenmerge_patch.reduce import Reduced, kept_count, reduce_tokens
from tokenmerge_patch.timing import Variant, interleaved_timings, median

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import full_run_stem, markdown_table, reduction_inputs, set_threads, timing_parser, write_markdown
from latency import TokenCountOracle

PATCH_MODULE = sys.modules["tokenmerge_patch.patch"]  # where TokenMergeState.reduce looks reduce_tokens up

# the run whose result is committed: only it writes profile_reduction.md
FULL = {"model": "deit_small_patch16_224", "block": 3, "keep_rate": 0.7, "batch_size": 16, "rounds": 15}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = timing_parser(__doc__, FULL, "profile_reduction")
    parser.add_argument("--block", type=int, default=FULL["block"])
    args = parser.parse_args(argv)
    args.stem = full_run_stem(args, FULL, "profile_reduction")
    return args


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    threads = set_threads(args.threads)

    model = timm.create_model(args.model).eval()
    block = model.blocks[args.block]
    with torch.inference_mode():
        tokens = model._pos_embed(model.patch_embed(torch.randn(args.batch_size, 3, 224, 224)))
    x, q, k = reduction_inputs(block, tokens)
    attn = block.attn

    def reduction(method: str) -> Variant:
        return Variant(
            lambda: None,
            lambda: reduce_tokens(x, q, k, attn.scale, num_prefix=1, keep_rate=args.keep_rate, **defaults(method)),
        )

    def whole_block(method: str | None) -> Variant:
        def setup() -> None:
            if method is None:
                tm.unpatch(model)
            else:
                tm.patch(model, layers=(args.block,), keep_rate=args.keep_rate, method=method)

        return Variant(setup, lambda: block(tokens))

    variants = {
        "block, unpatched": whole_block(None),
        "block, reducing (merge)": whole_block("merge"),
        "block, reducing (drop)": whole_block("drop"),
        "reduction alone (merge)": reduction("merge"),
        "reduction alone (drop)": reduction("drop"),
    }
    samples = interleaved_timings(variants, rounds=args.rounds, warmup=2, desc="profile")
    base = median(samples["block, unpatched"])
    rows = [
        {"what": name, "ms": 1000 * median(times), "% of unpatched block": 100 * median(times) / base}
        for name, times in samples.items()
    ]
    with torch.inference_mode(), torch.profiler.profile() as profiler:
        for _ in range(10):
            reduce_tokens(x, q, k, attn.scale, num_prefix=1, keep_rate=args.keep_rate, **defaults("merge"))
    ops = profiler.key_averages()
    total = sum(op.self_cpu_time_total for op in ops)
    top = sorted(ops, key=lambda op: op.self_cpu_time_total, reverse=True)[:8]
    op_rows = [
        {
            "operator": op.key,
            "calls per merge": op.count // 10,
            "share of the merge": 100 * op.self_cpu_time_total / total,
        }
        for op in top
    ]
    text = "\n\n".join(
        [
            f"{args.model} block {args.block}, keep {args.keep_rate}, batch {args.batch_size}, {threads} threads, "
            f"{tokens.shape[1]} tokens in, median of {args.rounds} interleaved rounds:",
            markdown_table(rows, ["what", "ms", "% of unpatched block"]),
            "Top operators of the merge (torch.profiler, self CPU time):",
            markdown_table(op_rows, ["operator", "calls per merge", "share of the merge"]),
        ]
    )
    text += "\n\n" + batch_one_gap(model, args.rounds * 4)
    write_markdown(args.out, args.stem, text)
    return text


def defaults(method: str) -> dict:
    """The reduction options ``patch()`` uses for ``method`` by default (the merge keeps norms), so the reduction
    timed alone is the one the patched block runs."""
    return {"method": method, "keep_norm": method == "merge"}


def slicing_stand_in(
    x: Tensor, *scoring: object, num_prefix: int, keep_rate: float, sizes: Tensor | None = None, **options: object
) -> Reduced:
    """What the oracle does in a reducing block: keep the first tokens (as many as the merge keeps), nothing else
    (``reduce_tokens``'s call, whose queries, keys, scale and options it ignores)."""
    keep = num_prefix + kept_count(x.shape[1] - num_prefix, keep_rate)
    sizes = x.new_ones(x.shape[:2]) if sizes is None else sizes
    return Reduced(x[:, :keep], sizes[:, :keep], None, torch.arange(keep - num_prefix).expand(len(x), -1))


def batch_one_gap(model: torch.nn.Module, rounds: int) -> str:
    """Whole forwards at batch 1, interleaved: the oracle, the patched model, without proportional attention (the
    norm-keeping merge still on), and with the reduction replaced by :func:`slicing_stand_in`; each one's time over
    the oracle's (median per round)."""
    image = torch.randn(1, *find_backend(model).input_size(model))
    tm.unpatch(model)
    patched = tm.patch(copy.deepcopy(model), layers=(3, 6, 9))
    plain = tm.patch(copy.deepcopy(model), layers=(3, 6, 9), prop_attn=False, keep_norm=True)
    oracle = TokenCountOracle(model, tm.token_counts(patched, image)).eval()

    def forward(net: torch.nn.Module, reduction: Callable[..., Reduced]) -> Variant:
        return Variant(lambda: setattr(PATCH_MODULE, "reduce_tokens", reduction), lambda: net(image))

    variants = {
        "token-count oracle": forward(oracle, reduce_tokens),
        "patched (merge 0.7 in blocks 3, 6, 9)": forward(patched, reduce_tokens),
        "patched, prop_attn=False (keep_norm on)": forward(plain, reduce_tokens),
        "patched, reduction replaced by slicing": forward(patched, slicing_stand_in),
    }
    try:
        samples = interleaved_timings(variants, rounds=rounds, warmup=3, desc="batch-1 forwards")
    finally:
        PATCH_MODULE.reduce_tokens = reduce_tokens
    reference = samples["token-count oracle"]
    rows = [
        {
            "forward": name,
            "ms": 1000 * median(times),
            "time / oracle": median([mine / theirs for mine, theirs in zip(times, reference, strict=True)]),
        }
        for name, times in samples.items()
    ]
    return "\n\n".join(
        [
            f"Whole forwards at batch 1 against the token-count oracle (same model, median of {rounds} interleaved "
            "rounds of one forward):",
            markdown_table(rows, ["forward", "ms", "time / oracle"]),
        ]
    )


if __name__ == "__main__":
    main()
