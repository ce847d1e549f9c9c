"""Top-1 accuracy and GFLOPs of a model unpatched and patched with each method x keep rate.

    python benchmarks/accuracy.py     # the real MNIST ViT of ../shared on the 10k MNIST test digits
    python benchmarks/accuracy.py --model deit_small_patch16_224 --pretrained --data imagefolder:/data/imagenet/val

Model sources: ``--checkpoint DIR`` (``model.safetensors`` + ``config.json``, the format of
../shared/models/vit_mnist_tiny) or ``--model NAME`` (timm; ``--pretrained`` needs the network).
Datasets: ``mnist:DIR``, ``cifar10:FILE.npz``, ``imagefolder:DIR``. Writes ``accuracy.csv``, ``accuracy.md``
and ``accuracy.png`` (accuracy against keep rate, one line per method) to ``--out``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import tokenmerge_patch as tm
from tokenmerge_patch.data import dataset_from_spec
from tokenmerge_patch.evaluation import evaluate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    RESULTS,
    add_model_arguments,
    load_model,
    markdown_table,
    parse_floats,
    parse_ints,
    pick_device,
    resolve_model_arguments,
    set_threads,
    write_outputs,
)

COLUMNS = ["method", "similarity", "keep rate", "layers", "tokens", "top-1 %", "Δ top-1", "GFLOPs", "note"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser, "mnist:DIR | cifar10:FILE.npz | imagefolder:DIR")
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N images only")
    parser.add_argument("--layers", default=None, help="reducing blocks (default: the paper's d//4, d//2, 3d//4)")
    parser.add_argument("--keep-rates", default="0.9,0.7,0.5,0.3")
    parser.add_argument("--methods", default="merge,drop,fuse,bipartite", help="merge, drop, fuse, bipartite")
    parser.add_argument(
        "--similarities",
        default="l1,l2,attention,random",
        help="for merge at --similarity-keep-rate, next to cosine (the paper's Table 4)",
    )
    parser.add_argument("--similarity-keep-rate", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--stem", default="accuracy", help="output file names (default accuracy.*)")
    args = parser.parse_args(argv)
    resolve_model_arguments(parser, args)
    args.keep_rates = parse_floats(args.keep_rates)
    args.methods = [m for m in args.methods.split(",") if m]
    args.similarities = [m for m in args.similarities.split(",") if m]
    args.layers = tuple(parse_ints(args.layers)) if args.layers else None
    return args


def plot(rows: list[dict], title: str, path: Path) -> None:
    """Fig. 5 style: top-1 against keep rate per method; and the similarities of merge side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    base = next(r for r in rows if r["method"] == "unpatched")
    left.axhline(base["top-1 %"], color="k", linestyle=":", label=f"unpatched {base['top-1 %']:.2f} %")
    curves = [r for r in rows if r["method"] != "unpatched" and r["similarity"] in ("", "cosine")]
    for method in dict.fromkeys(r["method"] for r in curves):
        points = sorted((r["keep rate"], r["top-1 %"]) for r in curves if r["method"] == method)
        left.plot(*zip(*points, strict=True), "-o", label=method)
    left.set(xlabel="keep rate", ylabel="top-1 %", title=title)
    left.invert_xaxis()
    left.grid(alpha=0.3)
    left.legend()
    ablation = [r for r in rows if r["method"] == "merge" and r["keep rate"] == _similarity_rate(rows)]
    if ablation:
        right.bar([r["similarity"] for r in ablation], [r["top-1 %"] for r in ablation], color="C0")
        low = min(r["top-1 %"] for r in ablation)
        right.set_ylim(low - 2, max(r["top-1 %"] for r in ablation) + 0.5)
        right.set(ylabel="top-1 %", title=f"merge similarity at keep {_similarity_rate(rows)}")
        right.grid(alpha=0.3, axis="y")
    else:
        right.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _similarity_rate(rows: list[dict]) -> float | None:
    rates = [r["keep rate"] for r in rows if r["method"] == "merge" and r["similarity"] not in ("", "cosine")]
    return rates[0] if rates else None


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    device = pick_device(args.device)
    threads = set_threads(args.threads)
    started = time.perf_counter()
    model, mean, std, name = load_model(args)
    model.to(device)
    image_size = tuple(model.patch_embed.img_size)
    in_chans = model.patch_embed.proj.in_channels
    indices = range(args.limit) if args.limit else None
    dataset = dataset_from_spec(
        args.data, mean=mean, std=std, image_size=image_size, in_chans=in_chans, indices=indices
    )
    input_size = (in_chans, *image_size)

    def measure(method: str, similarity: str, keep_rate: float) -> dict:
        label = f"{method} {similarity} {keep_rate}" if method != "unpatched" else method
        accuracy = 100 * evaluate(model, dataset, batch_size=args.batch_size, device=device, desc=label)
        row = {
            "method": method,
            "similarity": similarity,
            "keep rate": keep_rate,
            "top-1 %": accuracy,
            "images": len(dataset),
            "layers": "",
            "tokens": "",
            "note": "",
        }
        if tm.is_patched(model):
            trace = tm.reduction_trace(model)
            row["layers"] = ",".join(map(str, trace))
            records = list(trace.values())
            row["tokens"] = "→".join(str(n) for n in [records[0].tokens_in] + [r.tokens_out for r in records])
            wanted = records[0].tokens_in
            for _ in records:  # what the keep rate asks for, in patch tokens
                wanted = prefix + tm.kept_count(wanted - prefix, keep_rate)
            if method == "bipartite" and records[-1].tokens_out > wanted:
                row["note"] = "clamped: ToMe merges at most half the tokens per block"
        row["GFLOPs"] = tm.count_flops(model.cpu(), input_size).gflops
        model.to(device)
        return row

    prefix = model.num_prefix_tokens
    tm.unpatch(model)
    rows = [measure("unpatched", "", 1.0)]
    for method in args.methods:
        for rate in args.keep_rates:
            tm.patch(model, layers=args.layers, keep_rate=rate, method=method)
            rows.append(measure(method, "cosine" if method == "merge" else "", rate))
    for similarity in args.similarities:
        tm.patch(model, layers=args.layers, keep_rate=args.similarity_keep_rate, similarity=similarity)
        rows.append(measure("merge", similarity, args.similarity_keep_rate))
    tm.unpatch(model)
    for row in rows:
        row["Δ top-1"] = row["top-1 %"] - rows[0]["top-1 %"]
    setup = (
        f"{name} on {args.data.split(':')[0]} ({len(dataset)} images), device {device.type}, {threads} threads; "
        f"tokens entering the first reducing block, then after each; GFLOPs per image (fvcore); "
        f"{time.perf_counter() - started:.0f} s"
    )
    text = markdown_table(rows, COLUMNS, {"top-1 %": "{:.2f}", "Δ top-1": "{:+.2f}", "GFLOPs": "{:.4f}"})
    text += "\n\n" + setup
    print(text)
    write_outputs(args.out, args.stem, rows, COLUMNS, text)
    plot(rows, f"{name}: top-1 against keep rate", args.out / f"{args.stem}.png")
    return rows


if __name__ == "__main__":
    main()
