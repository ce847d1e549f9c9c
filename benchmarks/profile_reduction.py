"""Where a reducing block's time goes: the block unpatched vs reducing (merge, drop), and the reduction
alone, measured side by side; then torch.profiler's top operators of the merge.

    python benchmarks/profile_reduction.py                    # DeiT-S block 3, batch 16, 2 threads
    python benchmarks/profile_reduction.py --model deit_tiny_patch16_224 --batch-size 64

Writes ``profile_reduction.md`` to ``--out`` for the full run (the defaults, whose result is committed); any
other model, block, keep rate, batch size or number of rounds writes ``profile_reduction_quick.md`` instead
(``--stem`` names the file explicitly).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import timm
import torch

import tokenmerge_patch as tm
from tokenmerge_patch.reduce import reduce_tokens
from tokenmerge_patch.timing import Variant, interleaved_timings, median

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import full_run_stem, markdown_table, reduction_inputs, set_threads, timing_parser, write_markdown

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
            lambda: reduce_tokens(x, q, k, attn.scale, num_prefix=1, keep_rate=args.keep_rate, method=method),
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
            reduce_tokens(x, q, k, attn.scale, num_prefix=1, keep_rate=args.keep_rate)
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
    write_markdown(args.out, args.stem, text)
    return text


if __name__ == "__main__":
    main()
