"""What source tracking and dense outputs cost: a patched model's forward with its source maps tracked (the
default, what ``unmerge`` and dense outputs need) against the same forward with tracking switched off, and the
last blocks as NCHW feature maps (unmerged) against the same blocks as reduced NLC tokens; side by side.

    python benchmarks/source_overhead.py                 # DeiT-S, merge at keep 0.7 in blocks 3, 6, 9, batch 16
    python benchmarks/source_overhead.py --model deit_tiny_patch16_224 --batch-size 4 --rounds 3

Writes ``source_overhead.md`` to ``--out`` for the full run (the defaults, whose result is committed); any other
setting writes ``source_overhead_quick.md`` (``--stem`` names the file explicitly).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import timm
import torch

import tokenmerge_patch as tm
from tokenmerge_patch.backends import find_backend
from tokenmerge_patch.patch import _state
from tokenmerge_patch.reduce import reduce_tokens
from tokenmerge_patch.timing import Variant, interleaved_timings, median

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import full_run_stem, markdown_table, reduction_inputs, set_threads, timing_parser, write_markdown

FULL = {"model": "deit_small_patch16_224", "keep_rate": 0.7, "batch_size": 16, "rounds": 15}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    args = timing_parser(__doc__, FULL, "source_overhead").parse_args(argv)
    args.stem = full_run_stem(args, FULL, "source_overhead")
    return args


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    threads = set_threads(args.threads)
    model = tm.patch(timm.create_model(args.model).eval(), keep_rate=args.keep_rate)
    state = _state(model)
    images = torch.randn(args.batch_size, *find_backend(model).input_size(model))

    def tracking(on: bool) -> None:
        state.track_source = on  # an instance attribute over the class default: only this benchmark does this

    def intermediates(output_fmt: str) -> Variant:
        return Variant(
            lambda: tracking(True),
            lambda: model.forward_intermediates(images, indices=4, output_fmt=output_fmt, intermediates_only=True),
        )

    # the reduction of the first reducing block alone, with and without its source map (less noisy than a forward)
    block = model.blocks[state.config.layers[0]]
    with torch.inference_mode():
        tokens = model.norm_pre(model._pos_embed(model.patch_embed(images)))
        for earlier in model.blocks[: state.config.layers[0]]:
            tokens = earlier(tokens)
    x, q, k = reduction_inputs(block, tokens)
    attn = block.attn
    num_prefix = model.num_prefix_tokens

    def reduction(trace_source: bool) -> Variant:
        return Variant(
            lambda: None,
            lambda: reduce_tokens(
                x,
                q,
                k,
                attn.scale,
                num_prefix=num_prefix,
                keep_rate=args.keep_rate,
                keep_norm=state.config.keep_norm,  # the patched model's own options
                trace_source=trace_source,
            ),
        )

    variants = {
        f"reduction alone (block {state.config.layers[0]}), source map tracked": reduction(True),
        f"reduction alone (block {state.config.layers[0]}), no source map": reduction(False),
        "forward, source maps tracked (default)": Variant(lambda: tracking(True), lambda: model(images)),
        "forward, source tracking off": Variant(lambda: tracking(False), lambda: model(images)),
        "last 4 blocks as NLC tokens (reduced)": intermediates("NLC"),
        "last 4 blocks as NCHW maps (unmerged)": intermediates("NCHW"),
    }
    samples = interleaved_timings(variants, rounds=args.rounds, warmup=2, desc="source overhead")
    tracked, untracked = samples["forward, source maps tracked (default)"], samples["forward, source tracking off"]
    nlc, nchw = samples["last 4 blocks as NLC tokens (reduced)"], samples["last 4 blocks as NCHW maps (unmerged)"]
    rows = [{"what": name, "ms": 1000 * median(times)} for name, times in samples.items()]
    alone_on, alone_off = (median(times) for name, times in samples.items() if name.startswith("reduction alone"))
    extra = len(state.config.layers) * (alone_on - alone_off)  # one source map per reducing block
    share = f"{1000 * extra:.2f} ms per forward, {100 * extra / median(untracked):.2f} % of it"

    def ratio(numerator: list[float], denominator: list[float]) -> float:
        return median([a / b for a, b in zip(numerator, denominator, strict=True)])

    column = "median of per-round ratios"
    ratios = [
        {"comparison": "tracking on / off", column: ratio(tracked, untracked)},
        {"comparison": "NCHW (unmerged) / NLC", column: ratio(nchw, nlc)},
    ]
    text = "\n\n".join(
        [
            f"{args.model}, merge at keep {args.keep_rate} in blocks {', '.join(map(str, state.config.layers))}, "
            f"batch {args.batch_size}, {threads} threads, median of {args.rounds} interleaved rounds:",
            markdown_table(rows, ["what", "ms"]),
            markdown_table(ratios, ["comparison", column], {column: "{:.3f}"}),
            f"Source tracking, from the reduction alone times {len(state.config.layers)} reducing blocks: {share}.",
        ]
    )
    write_markdown(args.out, args.stem, text)
    return text


if __name__ == "__main__":
    main()
