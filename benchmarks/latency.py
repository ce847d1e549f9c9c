"""Speed at the limit: latency of a patched ViT against the token-count oracle, at batch 1 and 16, under eager
PyTorch, ``torch.compile`` and ONNX Runtime.

    python benchmarks/latency.py              # DeiT-S, merge 0.7 in blocks 3, 6, 9 (about 11 min on 2 cores)
    python benchmarks/latency.py --quick      # DeiT-T, eager and ONNX Runtime, few rounds: latency_quick.*
    python benchmarks/latency.py --device cuda --dtype bf16   # a GPU (autocast; ONNX Runtime needs onnxruntime-gpu)

The **token-count oracle** is the limit of any token reduction: the same network cut to the same per-block token
counts by free slicing (a reducing block runs its attention at its incoming count and its MLP at its outgoing
count; no scoring, no merging). Every variant of one runtime and batch size runs in interleaved rounds, so the
speedups (medians of per-round ratios) are measured side by side. A ToMe-style schedule (``method="bipartite"``, a
constant ``r`` tokens merged in every block, ``r`` matched to the patched model's FLOPs) is timed beside them.

Writes ``latency.csv`` / ``latency.md`` / ``latency.png`` to ``--out`` for the full run only (its result is committed);
``--quick`` or any other setting writes ``latency_quick.*`` unless ``--stem`` names the files.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import timm
import torch
from torch import Tensor, nn

import tokenmerge_patch as tm
from tokenmerge_patch.backends import find_backend
from tokenmerge_patch.budget import flop_model, token_counts_for, tome_keep_rates
from tokenmerge_patch.flops import sdpa_flop_jit
from tokenmerge_patch.timing import Variant, interleaved_timings, median

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, markdown_table, output_stem, parse_ints, pick_device, set_threads, write_outputs

RUNTIMES = ["eager", "compile", "onnxruntime"]
FULL = {
    "model": "deit_small_patch16_224",
    "keep_rate": 0.7,
    "layers": (3, 6, 9),
    "batch_sizes": [1, 16],
    "runtimes": RUNTIMES,
    "rounds": 15,
    "dtype": "fp32",
}
QUICK = {"model": "deit_tiny_patch16_224", "runtimes": ["eager", "onnxruntime"], "rounds": 5}
GOAL_OF_ORACLE = 0.97  # patched speedup / oracle speedup, every runtime and batch size
GOAL_COMPILED_BATCH_1 = 1.39  # what ToMe reaches compiled at batch 1 for the same FLOPs (issue 14)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class TokenCountOracle(nn.Module):
    """A timm ``VisionTransformer`` run at given per-block token counts by slicing, nothing else: a block whose
    output count is smaller runs its attention on all incoming tokens, keeps the first ``count`` and runs its MLP on
    those. What any token reduction with these counts must at least pay.

    >>> model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=3).eval()
    >>> oracle = TokenCountOracle(model, [17, 9, 9])
    >>> oracle(torch.randn(2, 3, 32, 32)).shape
    torch.Size([2, 1000])
    """

    def __init__(self, model: nn.Module, counts: list[int]) -> None:
        super().__init__()
        if len(counts) != len(model.blocks):
            raise ValueError(f"counts needs one entry per block ({len(model.blocks)}), got {len(counts)}")
        self.model = model
        self.counts = [int(c) for c in counts]

    def forward(self, x: Tensor) -> Tensor:
        model = self.model
        x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
        incoming = x.shape[1]
        for block, count in zip(model.blocks, self.counts, strict=True):
            if count == incoming:
                x = block(x)
                continue
            x = x + block.drop_path1(block.ls1(block.attn(block.norm1(x))))
            x = x[:, :count]
            x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
            incoming = count
        return model.forward_head(model.norm(x))


def oracle_flops(oracle: TokenCountOracle, example: Tensor) -> int:
    """fvcore's count of the oracle, with the library's SDPA handler: the patched model's count without the
    reduction's own matmuls (class row, similarities)."""
    from fvcore.nn import FlopCountAnalysis

    analysis = FlopCountAnalysis(oracle, (example,))
    analysis.set_op_handle("aten::scaled_dot_product_attention", sdpa_flop_jit)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
    return int(analysis.total())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help=f"a timm ViT name (default {FULL['model']})")
    parser.add_argument("--keep-rate", type=float, default=FULL["keep_rate"])
    parser.add_argument("--layers", type=parse_ints, default=FULL["layers"], help="reducing blocks, e.g. 3,6,9")
    parser.add_argument("--batch-sizes", type=parse_ints, default=FULL["batch_sizes"])
    parser.add_argument("--runtimes", default=None, help=f"comma-separated subset of {','.join(RUNTIMES)}")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default="fp32", help="bf16/fp16: autocast (eager, compile; CUDA)"
    )
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="DeiT-T, eager and ONNX Runtime, 5 rounds")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--stem", default=None, help="output file stem (default latency, or latency_quick)")
    args = parser.parse_args(argv)
    preset = QUICK if args.quick else FULL
    args.model = args.model or preset["model"]
    args.rounds = args.rounds or preset["rounds"]
    args.runtimes = args.runtimes.split(",") if args.runtimes else list(preset.get("runtimes", RUNTIMES))
    unknown = [r for r in args.runtimes if r not in RUNTIMES]
    if unknown:
        parser.error(f"--runtimes: unknown {unknown}; choose from {RUNTIMES}")
    args.layers = tuple(args.layers)
    chosen = {key: getattr(args, key) for key in FULL}
    full = not args.quick and {**chosen, "batch_sizes": list(args.batch_sizes)} == FULL
    args.full = full and args.device in (None, "cpu") and not torch.cuda.is_available()
    args.stem = output_stem(args.stem, "latency", full=args.full)
    return args


def build_variants(args: argparse.Namespace) -> tuple[dict[str, nn.Module], dict[str, float], dict[str, list[int]]]:
    """The unpatched model, the patched one, its token-count oracle and a ToMe-style schedule at matched FLOPs
    (four copies of one set of random weights), with their FLOPs and per-block token counts."""
    base = timm.create_model(args.model).eval()
    example = torch.randn(1, *find_backend(base).input_size(base))
    patched = tm.patch(copy.deepcopy(base), layers=args.layers, keep_rate=args.keep_rate)
    counts = tm.token_counts(patched, example)
    oracle = TokenCountOracle(copy.deepcopy(base), counts).eval()
    flops = {"unpatched": tm.count_flops(base).total, "patched": tm.count_flops(patched).total}
    flops["oracle"] = oracle_flops(oracle, example)
    # ToMe-style: the smallest constant r whose FLOPs (fitted estimate, then counted) are at most the patched model's
    prefix, tokens, depth = base.num_prefix_tokens, counts[0], len(base.blocks)
    estimate = flop_model(tm.describe(base, tuple(example.shape[1:])))

    def tome_rates(r: int) -> tuple[float, ...]:
        return tome_keep_rates(tokens, prefix, range(depth), r)

    def estimated(r: int) -> float:
        return estimate(token_counts_for(tokens, prefix, depth, range(depth), tome_rates(r), "bipartite"), "bipartite")

    largest = (tokens - prefix - 1) // depth
    tome_r = next((r for r in range(1, largest + 1) if estimated(r) <= flops["patched"]), largest)
    tome = copy.deepcopy(base)
    while True:
        tm.patch(tome, layers=list(range(depth)), keep_rate=list(tome_rates(tome_r)), method="bipartite")
        if tome_r >= largest or tm.count_flops(tome).total <= flops["patched"]:
            break
        tome_r += 1
    name = f"ToMe-style r={tome_r}"
    flops[name] = tm.count_flops(tome).total
    models = {"unpatched": base, "oracle": oracle, "patched": patched, name: tome}
    all_counts = {key: tm.token_counts(model, example) for key, model in models.items() if key != "oracle"}
    all_counts["oracle"] = counts
    return models, flops, all_counts


def runner(runtime: str, model: nn.Module, images: Tensor, args: argparse.Namespace, workdir: Path) -> Callable:
    """A zero-argument callable that runs one forward of ``images`` in ``runtime``."""
    device_type = images.device.type
    dtype = DTYPES[args.dtype]
    autocast = (
        (lambda: torch.autocast(device_type, dtype=dtype))
        if dtype != torch.float32
        else (lambda: contextlib.nullcontext())
    )
    if runtime == "eager":

        def run() -> object:
            with autocast():
                return model(images)

        return run
    if runtime == "compile":
        compiled = torch.compile(model, dynamic=False)

        def run() -> object:
            with autocast():
                return compiled(images)

        with torch.inference_mode():
            run()  # compile now, outside the timed rounds
        return run
    import onnxruntime

    path = workdir / f"{id(model)}.onnx"
    if not path.exists():  # exported from a float32 CPU copy; the CUDA provider moves it to the GPU itself
        source = model if device_type == "cpu" else copy.deepcopy(model).cpu().float()
        tm.export_onnx(source, path, images[:1].float().cpu())
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    providers = ["CUDAExecutionProvider"] if device_type == "cuda" else ["CPUExecutionProvider"]
    session = onnxruntime.InferenceSession(str(path), options, providers=providers)
    feed = {session.get_inputs()[0].name: images.float().cpu().numpy()}
    return lambda: session.run(None, feed)


def measure(args: argparse.Namespace, device: torch.device) -> tuple[list[dict], dict]:
    models, flops, counts = build_variants(args)
    for model in models.values():
        model.to(device)
    rows = []
    input_size = find_backend(models["unpatched"]).input_size(models["unpatched"])
    with tempfile.TemporaryDirectory() as folder:
        for runtime in args.runtimes:
            if runtime == "onnxruntime" and device.type == "cuda":
                import onnxruntime

                if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
                    print("skipping onnxruntime on cuda: install onnxruntime-gpu for its CUDAExecutionProvider")
                    continue
            for batch in args.batch_sizes:
                images = torch.randn(batch, *input_size, device=device)
                repeat = max(1, 16 // batch)  # a timed run is ~16 images, so batch 1 is not lost in timer noise
                runs = {name: runner(runtime, model, images, args, Path(folder)) for name, model in models.items()}
                variants = {
                    name: Variant(lambda: None, lambda run=run, repeat=repeat: [run() for _ in range(repeat)])
                    for name, run in runs.items()
                }
                samples = interleaved_timings(variants, rounds=args.rounds, desc=f"{runtime}, batch {batch}")
                base = samples["unpatched"]
                for name, times in samples.items():
                    speedup = median([b / t for b, t in zip(base, times, strict=True)])
                    rows.append(
                        {
                            "runtime": runtime,
                            "batch": batch,
                            "variant": name,
                            "GFLOPs": flops[name] / 1e9,
                            "ms / forward": 1e3 * median(times) / repeat,
                            "speedup": speedup,
                            "FLOPs ratio": flops["unpatched"] / flops[name],
                        }
                    )
                oracle = median([o / p for o, p in zip(samples["oracle"], samples["patched"], strict=True)])
                next(r for r in rows[-len(samples) :] if r["variant"] == "patched")["of oracle"] = oracle
    return rows, counts


def goal_lines(rows: list[dict]) -> list[str]:
    lines = []
    for row in rows:
        if row["variant"] != "patched":
            continue
        met = row["of oracle"] >= GOAL_OF_ORACLE
        lines.append(
            f"{row['runtime']}, batch {row['batch']}: patched {row['speedup']:.2f}x, "
            f"{row['of oracle']:.3f} of the oracle's speedup (goal >= {GOAL_OF_ORACLE}: {'met' if met else 'NOT met'})"
        )
        if row["runtime"] == "compile" and row["batch"] == 1:
            met = row["speedup"] >= GOAL_COMPILED_BATCH_1
            lines.append(
                f"compile, batch 1: {row['speedup']:.2f}x over unpatched "
                f"(goal >= {GOAL_COMPILED_BATCH_1}: {'met' if met else 'NOT met'})"
            )
    return lines


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys((r["runtime"], r["batch"]) for r in rows))
    variants = [v for v in dict.fromkeys(r["variant"] for r in rows) if v != "unpatched"]
    fig, axis = plt.subplots(figsize=(max(6, 1.6 * len(groups)), 4))
    width = 0.8 / len(variants)
    for index, variant in enumerate(variants):
        values = [
            next((r["speedup"] for r in rows if (r["runtime"], r["batch"]) == g and r["variant"] == variant), 0)
            for g in groups
        ]
        positions = [g + (index - (len(variants) - 1) / 2) * width for g in range(len(groups))]
        axis.bar(positions, values, width, label=variant, color=f"C{index}")
    ratio = next(r["FLOPs ratio"] for r in rows if r["variant"] == "patched")
    axis.axhline(ratio, color="k", ls=":", lw=1, label=f"FLOPs ratio {ratio:.2f}")
    axis.axhline(1.0, color="grey", lw=0.8)
    axis.set_xticks(range(len(groups)), [f"{rt}\nbatch {b}" for rt, b in groups])
    axis.set(ylabel="speedup over unpatched", title="latency speedup, measured side by side")
    axis.legend(fontsize=8)
    axis.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


COLUMNS = ["runtime", "batch", "variant", "GFLOPs", "ms / forward", "speedup", "FLOPs ratio", "of oracle"]


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    device = pick_device(args.device)
    if args.dtype != "fp32" and device.type != "cuda":
        raise SystemExit("--dtype bf16/fp16 (autocast) is for --device cuda")
    threads = set_threads(args.threads)
    started = time.perf_counter()
    rows, counts = measure(args, device)
    setup = (
        f"{args.model}, merge keep {args.keep_rate} in blocks {args.layers}; device {device.type}, {threads} threads, "
        f"{args.dtype}; {args.rounds} interleaved rounds per runtime and batch (a timed run is max(1, 16 / batch) "
        f"forwards); speedup = median of per-round unpatched / variant times; 'of oracle' = patched speedup / oracle "
        f"speedup (median per round); torch {torch.__version__}, timm {timm.__version__}"
    )
    count_lines = [f"- {name}: {values}" for name, values in counts.items()]
    text = "\n\n".join(
        [
            markdown_table(rows, COLUMNS, {"of oracle": "{:.3f}", "ms / forward": "{:.2f}", "speedup": "{:.3f}"}),
            setup,
            "\n".join(goal_lines(rows)),
            "Tokens leaving each block:\n" + "\n".join(count_lines),
        ]
    )
    print(text)
    write_outputs(args.out, args.stem, rows, COLUMNS, text)
    if not args.no_plot:
        plot(rows, args.out / f"{args.stem}.png")
    files = ".csv, .md" + ("" if args.no_plot else ", .png")
    print(f"\nwrote {args.out}/{args.stem}{files} in {time.perf_counter() - started:.0f} s")
    return rows


if __name__ == "__main__":
    main()
