"""FLOPs and speed of a whole vision-language model when its language model reads fewer image tokens.

    python benchmarks/vlm.py          # LLaVA-shaped: CLIP ViT-B/14 at 336 px (576 tokens) + a Qwen2-0.5B-shaped LLM
    python benchmarks/vlm.py --quick  # small shapes, two rounds: vlm_quick.* (git-ignored)

Random weights at realistic shapes (FLOPs and speed do not depend on the weights; no accuracy is claimed). The
prefill of one image and a 64-token text prompt (tower, projector, and the language model over every prompt
token, logits of the last one: what ``generate`` runs before its first new token) is timed for the unpatched
model and for 288 / 144 / 64 image tokens with merge (this library's default: one reduction in the layer the LLM
reads), merge in steps from a quarter of the tower on (fewer tower FLOPs too), drop and ToMe-style bipartite
matching, all variants in interleaved rounds (speedups are medians of per-round ratios), next to their FLOPs
(``count_flops`` for the image side, the analytic count for the prefill, checked against fvcore in the run). Plus
the time to first token of ``generate``, the reduction's own time inside the tower (timed around the library's
reduction), and the FLOPs of a LLaVA-1.5-7B shape (ViT-L/14 at 336 px + a 7B Llama), counted only.

Each token count also has a ``limit`` row: the unpatched tower and projector, their first K features handed to the
language model as embeddings (no reduction at all). It is the fastest any reducer that keeps the tower whole can be
at K tokens on this machine: how far the measured speedups fall short of the FLOPs ratio because the language model
itself runs less efficiently on fewer tokens, and how much of the gap is the library's. Writes
``vlm.md``, ``vlm.csv`` and ``vlm.png``; only the default full run writes those names.

``--device cuda --dtype bf16`` runs on a GPU (unmeasured here: no GPU on the machine these results come from).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, markdown_table, output_stem, pick_device, set_threads, write_outputs

import tokenmerge_patch as tm
from tokenmerge_patch.patch import TokenMergeState
from tokenmerge_patch.timing import Variant, interleaved_timings, synchronize

IMAGE = 151_000  # the image placeholder id (inside the vocabulary)
METHODS = ("merge", "merge-early", "drop", "bipartite")
FULL = dict(size=336, patch=14, width=768, depth=12, heads=12, llm="qwen2-0.5b", text=64, rounds=7)
QUICK = dict(size=112, patch=14, width=192, depth=6, heads=3, llm="tiny", text=16, rounds=2)
LLMS = {
    # Qwen2-0.5B's shape (https://huggingface.co/Qwen/Qwen2-0.5B/blob/main/config.json)
    "qwen2-0.5b": dict(
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151_936,
    ),
    "tiny": dict(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=151_936,
    ),
}
# LLaVA-1.5-7B's language model (Vicuna-7B, a Llama-2-7B shape), counted analytically
LLAMA_7B = dict(
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=32_000,
)


def build(shape: dict) -> torch.nn.Module:
    """A LLaVA with random weights: a CLIP tower (LLaVA-1.5 reads its second-to-last layer, without the class token)
    and a Qwen2-shaped language model."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, Qwen2Config

    vision = CLIPVisionConfig(
        image_size=shape["size"],
        patch_size=shape["patch"],
        hidden_size=shape["width"],
        intermediate_size=4 * shape["width"],
        num_hidden_layers=shape["depth"],
        num_attention_heads=shape["heads"],
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=Qwen2Config(**LLMS[shape["llm"]]),
        image_token_id=IMAGE,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(config).eval()


def halvings(full: int, tokens: int) -> int:
    """Tower layers ToMe-style bipartite matching needs to go from ``full`` to ``tokens`` (at most half per layer)."""
    return max(1, math.ceil(math.log2(full / tokens) - 1e-9))


def configure(model: torch.nn.Module, method: str, tokens: int, full: int) -> None:
    """The variant: unpatched, or ``tokens`` image tokens by ``method`` (merge, drop: one reduction in the layer the
    LLM reads; merge-early: merge in geometric steps from a quarter of the tower to that layer; bipartite: the fewest
    layers that reach ``tokens``, ending there)."""
    tm.unpatch(model)
    if method in ("unpatched", "limit"):  # the limit runs the unpatched tower and cuts its features itself
        return
    depth = len(model.model.vision_tower.encoder.layers)
    read, layers = depth - 2, None  # LLaVA reads the second-to-last layer
    if method == "bipartite":
        steps = halvings(full, tokens)
        layers = tuple(range(read - steps + 1, read + 1))
    elif method == "merge-early":  # geometric steps from the first quarter of the tower on: tower FLOPs saved too
        layers, method = tuple(range(depth // 4, read + 1)), "merge"
    tm.patch(model, visual_tokens=tokens, method=method, layers=layers)


class ReductionClock:
    """Wall time spent inside the library's reduction (scores, selection, merge), summed over calls."""

    def __init__(self) -> None:
        self.seconds, self.calls = 0.0, 0
        self._reduce = TokenMergeState.reduce

    def __enter__(self) -> ReductionClock:
        clock, original = self, self._reduce

        def timed(state, *args, **kwargs):
            synchronize()
            start = time.perf_counter()
            out = original(state, *args, **kwargs)
            synchronize()
            clock.seconds += time.perf_counter() - start
            clock.calls += 1
            return out

        TokenMergeState.reduce = timed
        return self

    def __exit__(self, *_: object) -> None:
        TokenMergeState.reduce = self._reduce


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes, two rounds (writes vlm_quick.*)")
    parser.add_argument("--tokens", default=None, help="image tokens to compare (default 288,144,64; quick 32,16,8)")
    parser.add_argument("--methods", default=",".join(METHODS), help=", ".join(METHODS))
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--stem", default=None, help="output file name (default vlm, or vlm_quick for other runs)")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    full_run = not args.quick and args.tokens is None and args.methods == ",".join(METHODS)
    full_run = full_run and args.rounds is None and args.device == "cpu" and args.dtype == "fp32"
    args.stem = output_stem(args.stem, "vlm", full=full_run)
    args.tokens = [int(t) for t in (args.tokens or ("32,16,8" if args.quick else "288,144,64")).split(",")]
    args.methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown --methods {unknown}; choose from {', '.join(METHODS)}")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    shape = dict(QUICK if args.quick else FULL)
    rounds = args.rounds or shape["rounds"]
    threads = set_threads(args.threads)
    device = pick_device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    stem = args.stem
    progress = not args.no_progress

    model = build(shape).to(device, dtype)
    full = tm.visual_token_count(model)
    counts = [tokens for tokens in args.tokens if tokens < full]
    methods = args.methods
    text_config = model.config.text_config
    images = torch.randn(1, 3, shape["size"], shape["size"], generator=torch.Generator().manual_seed(0))
    images = images.to(device, dtype)

    def prompt(tokens: int) -> torch.Tensor:
        return torch.tensor([[IMAGE] * tokens + list(range(1, 1 + shape["text"]))], device=device)

    variants = [("unpatched", full)] + [(method, tokens) for tokens in counts for method in (*methods, "limit")]

    # FLOPs: the image side counted by fvcore, the prefill analytically (checked against fvcore once, unpatched)
    flops = {}
    for method, tokens in variants:
        configure(model, method, tokens, full)
        image_side = tm.count_flops(model).total
        prefill = tm.llm_prefill_flops(text_config, shape["text"] + tokens)
        flops[(method, tokens)] = (image_side, prefill)
    configure(model, "unpatched", full, full)
    counted = tm.count_vlm_flops(model, text_tokens=shape["text"])
    check = tm.llm_prefill_flops(text_config, shape["text"] + full) / counted.prefill
    print(f"prefill FLOPs, analytic / fvcore: {check:.4f}")

    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == torch.bfloat16 else None

    def prefill(tokens: int):
        ids = prompt(tokens)
        return lambda: model(input_ids=ids, pixel_values=images, logits_to_keep=1)

    def first_token(tokens: int):
        ids = prompt(tokens)
        return lambda: model.generate(input_ids=ids, pixel_values=images, max_new_tokens=1, do_sample=False)

    text_embeddings = model.get_input_embeddings()(prompt(0))

    def limit_embeddings(tokens: int) -> torch.Tensor:
        """The unpatched tower and projector, their first ``tokens`` features before the text's embeddings."""
        features = model.model.get_image_features(
            pixel_values=images,
            vision_feature_layer=model.config.vision_feature_layer,
            vision_feature_select_strategy=model.config.vision_feature_select_strategy,
        ).pooler_output
        features = torch.cat(list(features)) if isinstance(features, (list, tuple)) else features
        return torch.cat([features.reshape(1, -1, features.shape[-1])[:, :tokens], text_embeddings], dim=1)

    def limit_prefill(tokens: int):
        return lambda: model(inputs_embeds=limit_embeddings(tokens), logits_to_keep=1)

    def limit_first_token(tokens: int):
        return lambda: model.generate(inputs_embeds=limit_embeddings(tokens), max_new_tokens=1, do_sample=False)

    with torch.inference_mode():  # the limit at the full count is the unpatched prefill, exactly
        expected = prefill(full)().logits
        torch.testing.assert_close(limit_prefill(full)().logits, expected, rtol=1e-4, atol=1e-4)

    def timed(make, make_limit) -> dict[str, list[float]]:
        runs = {
            f"{method}/{tokens}": Variant(
                lambda m=method, t=tokens: configure(model, m, t, full),
                (make_limit if method == "limit" else make)(tokens),
            )
            for method, tokens in variants
        }
        if autocast is not None:
            with autocast:
                return interleaved_timings(runs, rounds=rounds, progress=progress, desc="vlm")
        return interleaved_timings(runs, rounds=rounds, progress=progress, desc="vlm")

    prefill_times = timed(prefill, limit_prefill)
    ttft_times = timed(first_token, limit_first_token)

    # the reduction's own time inside the tower, in a prefill of each patched variant
    reduction = {}
    for method, tokens in (v for v in variants[1:] if v[0] != "limit"):
        configure(model, method, tokens, full)
        run = prefill(tokens)
        with torch.inference_mode(), ReductionClock() as clock:
            for _ in range(rounds):
                run()
        reduction[(method, tokens)] = clock.seconds / rounds

    rows = []
    base = prefill_times["unpatched/" + str(full)]
    base_ttft = ttft_times["unpatched/" + str(full)]
    base_flops = sum(flops[("unpatched", full)])
    for method, tokens in variants:
        key = f"{method}/{tokens}"
        image_side, prefill_flops = flops[(method, tokens)]
        total = image_side + prefill_flops
        speedup = statistics.median(b / t for b, t in zip(base, prefill_times[key], strict=True))
        ttft = statistics.median(b / t for b, t in zip(base_ttft, ttft_times[key], strict=True))
        seconds = statistics.median(prefill_times[key])
        own = reduction.get((method, tokens))
        limit_speedup = (
            statistics.median(b / t for b, t in zip(base, prefill_times[f"limit/{tokens}"], strict=True))
            if method != "unpatched"
            else 1.0
        )
        rows.append(
            {
                "method": method,
                "image tokens": tokens,
                "tower GFLOPs": image_side / 1e9,
                "LLM prefill GFLOPs": prefill_flops / 1e9,
                "total GFLOPs": total / 1e9,
                "FLOPs ratio": base_flops / total,
                "prefill ms": 1000 * seconds,
                "prefill speedup": speedup,
                "speedup ÷ FLOPs ratio": speedup / (base_flops / total),
                "speedup ÷ limit's": speedup / limit_speedup,
                "TTFT ms": 1000 * statistics.median(ttft_times[key]),
                "TTFT speedup": ttft,
                "reduction ms": None if own is None else 1000 * own,
                "reduction % of prefill": None if own is None else 100 * own / seconds,
            }
        )

    # a LLaVA-1.5-7B shape, counted: ViT-L/14 at 336 px (fvcore) and a 7B Llama (analytic)
    seven_b = []
    if not args.quick:
        from transformers import LlamaConfig

        big = dict(FULL, width=1024, depth=24, heads=16)
        tower = build(dict(big, llm="tiny")).model.vision_tower
        tower_flops = tm.count_flops(tower).total
        llama = LlamaConfig(**LLAMA_7B)
        for tokens in [full, *counts]:
            llm = tm.llm_prefill_flops(llama, FULL["text"] + tokens)
            seven_b.append({"image tokens": tokens, "tower GFLOPs": tower_flops / 1e9, "LLM prefill GFLOPs": llm / 1e9})
        whole = seven_b[0]["tower GFLOPs"] + seven_b[0]["LLM prefill GFLOPs"]
        for row in seven_b:
            row["FLOPs ratio"] = whole / (row["tower GFLOPs"] + row["LLM prefill GFLOPs"])

    columns = list(rows[0])
    title = (
        f"LLaVA shape: CLIP ViT tower {shape['size']} px / patch {shape['patch']} (width {shape['width']}, "
        f"{shape['depth']} layers, {full} image tokens), {shape['llm']} language model, {shape['text']} text tokens, "
        f"batch 1, {args.dtype}, {device.type}, {threads} threads, {rounds} interleaved rounds; prefill FLOPs "
        f"analytic / fvcore {check:.4f}"
    )
    text = f"{title}\n\n" + markdown_table(rows, columns)
    if seven_b:
        text += "\n\nLLaVA-1.5-7B shape (ViT-L/14, 336 px; a 7B Llama), one reduction in the layer the LLM reads:\n\n"
        text += markdown_table(seven_b, list(seven_b[0]))
    write_outputs(args.out, stem, rows, columns, text)
    print(text)
    if not args.no_plot:
        plot(rows, args.out / f"{stem}.png")
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for method in dict.fromkeys(row["method"] for row in rows if row["method"] != "unpatched"):
        mine = [row for row in rows if row["method"] in (method, "unpatched")]
        style, label = ("s:", "limit (no reduction: K features cut)") if method == "limit" else ("o-", method)
        left.plot([r["image tokens"] for r in mine], [r["prefill speedup"] for r in mine], style, label=label)
    base = [row for row in rows if row["method"] in ("unpatched", "merge")]
    left.plot([r["image tokens"] for r in base], [r["FLOPs ratio"] for r in base], "k--", label="FLOPs ratio")
    left.set(xlabel="image tokens the LLM reads", ylabel="prefill speedup (×)", title="Prefill speedup")
    left.invert_xaxis()
    left.legend()
    tower = [r["tower GFLOPs"] for r in base]
    llm = [r["LLM prefill GFLOPs"] for r in base]
    labels = [str(r["image tokens"]) for r in base]
    right.bar(labels, tower, label="tower + projector")
    right.bar(labels, llm, bottom=tower, label="LLM prefill")
    right.set(xlabel="image tokens (merge)", ylabel="GFLOPs", title="Where the FLOPs go")
    right.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


if __name__ == "__main__":
    main()
