"""Top-1 accuracy and GFLOPs of a model unpatched and patched with each method x keep rate.

    python benchmarks/accuracy.py     # the real MNIST ViT of ../shared on the 10k MNIST test digits
    python benchmarks/accuracy.py --model deit_small_patch16_224 --pretrained --data imagefolder:/data/imagenet/val
    python benchmarks/accuracy.py --imagenet [--quick]   # the real ImageNet DeiT-T of ../shared at FLOPs budgets

ImageNet mode (``--imagenet``, see ``imagenet_main``): the real DeiT-Tiny of ../shared/models/deit_tiny_in1k on the
1000 ImageNet images of ../shared/data/imagenet_samples, split by class index: the odd classes (500 images) are
the evaluation set of every row, 256 images of the even classes calibrate ``tm.calibrate``. At 0.8 / 0.65 / 0.5 of
the FLOPs: the paper's plain merge in blocks 3, 6, 9, the library's default merge, drop, fuse, a ToMe schedule,
the ``flops=`` rule and calibrated plans. Writes ``accuracy_imagenet.{csv,md,png}`` and
``accuracy_imagenet_plans.json``; ``--quick`` (100 / 64 images, one budget) writes ``*_quick.*`` instead.
``--swap-halves`` runs the other fold (calibrate on the odd classes, evaluate on the even ones) into
``accuracy_imagenet_swapped.*``: a second held-out check of whatever was chosen looking at the first.

Model sources: ``--checkpoint DIR`` (``model.safetensors`` + ``config.json``, the format of
../shared/models/vit_mnist_tiny) or ``--model NAME`` (timm; ``--pretrained`` needs the network).
Datasets: ``mnist:DIR``, ``cifar10:FILE.npz``, ``imagefolder:DIR``. Writes ``accuracy.csv``, ``accuracy.md``
and ``accuracy.png`` (accuracy against keep rate, one line per method) to ``--out``; a limited run (``--limit``,
or other keep rates, methods or similarities than the defaults) writes ``accuracy_quick.*`` instead, so it
never overwrites the committed full results (``--stem`` names the files explicitly).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

import tokenmerge_patch as tm
from tokenmerge_patch import PatchConfig
from tokenmerge_patch.budget import flop_model, token_counts_for, tome_keep_rates
from tokenmerge_patch.data import (
    Split,
    dataset_from_spec,
    evenly_spaced,
    load_imagenet,
    split_by_class,
    to_tensor_dataset,
)
from tokenmerge_patch.evaluation import evaluate, logits_of

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    IMAGENET_ARCH,
    IMAGENET_DIR,
    IMAGENET_MODEL,
    RESULTS,
    SHARED,
    add_model_arguments,
    load_imagenet_model,
    load_model,
    markdown_table,
    output_stem,
    parse_floats,
    parse_ints,
    pick_device,
    resolve_model_arguments,
    set_threads,
    write_outputs,
)

# the rows of the full run, whose results are committed (with --limit or other rows: accuracy_quick.*)
FULL = {
    "keep_rates": [0.9, 0.7, 0.5, 0.3],
    "methods": ["merge", "drop", "fuse", "bipartite"],
    "similarities": ["l1", "l2", "attention", "random"],
}
COLUMNS = ["method", "similarity", "keep rate", "layers", "tokens", "top-1 %", "Δ top-1", "GFLOPs", "note"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser, "mnist:DIR | cifar10:FILE.npz | imagefolder:DIR")
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N images only")
    parser.add_argument("--layers", default=None, help="reducing blocks (default: the paper's d//4, d//2, 3d//4)")
    parser.add_argument("--keep-rates", default=",".join(map(str, FULL["keep_rates"])))
    parser.add_argument("--methods", default=",".join(FULL["methods"]), help="merge, drop, fuse, bipartite")
    parser.add_argument(
        "--similarities",
        default=",".join(FULL["similarities"]),
        help="for merge at --similarity-keep-rate, next to cosine (the paper's Table 4)",
    )
    parser.add_argument("--similarity-keep-rate", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--stem", default=None, help="output file names (default: accuracy.*, accuracy_quick.* for a limited run)"
    )
    args = parser.parse_args(argv)
    resolve_model_arguments(parser, args)
    args.keep_rates = parse_floats(args.keep_rates)
    args.methods = [m for m in args.methods.split(",") if m]
    args.similarities = [m for m in args.similarities.split(",") if m]
    full = args.limit is None and all(getattr(args, key) == value for key, value in FULL.items())
    args.stem = output_stem(args.stem, "accuracy", full=full)
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
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--imagenet" in argv:
        return imagenet_main(argv)
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


# -- ImageNet mode: the real DeiT-Tiny of ../shared at FLOPs budgets -------------------------------------------------

IMAGENET_METHODS = [
    *("paper", "nonorm", "default", "drop", "fuse", "tome"),
    *("rule_nonorm", "rule", "rule_received", "rule_received_same", "calibrated", "keep0.7"),
]
METHOD_LABELS = {
    "unpatched": "unpatched",
    "paper": "merge, paper's (plain eq. 4)",
    "default": "merge, library defaults",
    "nonorm": "merge, prop. attn only (keep_norm=False)",
    "drop": "drop",
    "fuse": "fuse (EViT)",
    "tome": "ToMe schedule (bipartite, constant r)",
    "rule": "flops= rule",
    "rule_nonorm": "flops= rule, keep_norm=False",
    "rule_received": "flops= rule, score='received'",
    "rule_received_same": "flops= rule's plan, score='received'",
    "calibrated": "calibrate(flops=)",
    "keep0.7": "patch(model, keep_rate=0.7)",
}
# the committed full run; anything else (--quick, other counts, budgets or methods) writes *_quick.*
IMAGENET_FULL = {"eval_images": 500, "calib_images": 256, "budgets": [0.8, 0.65, 0.5], "methods": IMAGENET_METHODS}
IMAGENET_QUICK = {"eval_images": 100, "calib_images": 64, "budgets": [0.65]}
FIT_TOLERANCE = 0.01  # keep rates are fitted so the counted FLOPs land in [budget - 0.01, budget]
# what a row measured, in both the markdown table and the CSV (which also keeps the raw counts and options)
_IMAGENET_MEASURED = ["layers", "keep rates", "tokens", "GFLOPs", "FLOPs", "top-1 %", "Δ top-1", "agree %"]
IMAGENET_COLUMNS = ["budget", "method", "flags", *_IMAGENET_MEASURED, "calib s"]
IMAGENET_CSV_COLUMNS = [
    "budget",
    "key",
    "method",
    "size_weighted",
    "keep_norm",
    "prop_attn",
    *_IMAGENET_MEASURED,
    "correct",
    "agree",
    "images",
    "calib s",
    "eval s",
]


def parse_imagenet_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="accuracy.py --imagenet",
        description="Top-1 of the real ImageNet DeiT-Tiny of ../shared, unpatched and patched at FLOPs budgets "
        "(see the module docstring).",
    )
    parser.add_argument("--imagenet", action="store_true", required=True)
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"{IMAGENET_QUICK['eval_images']} evaluation / {IMAGENET_QUICK['calib_images']} calibration images, "
        f"budget {IMAGENET_QUICK['budgets'][0]} only; writes accuracy_imagenet_quick.*",
    )
    parser.add_argument(
        "--eval-images", type=int, default=None, help="how many of the evaluation half, evenly spaced (default: 500)"
    )
    parser.add_argument(
        "--calib-images", type=int, default=None, help="how many of the calibration half calibrate (default: 256)"
    )
    parser.add_argument("--budgets", default=None, help="FLOPs fractions (default: 0.8,0.65,0.5)")
    parser.add_argument(
        "--swap-halves",
        action="store_true",
        help="the other fold: calibrate on the odd classes and evaluate on the even ones (writes "
        "accuracy_imagenet_swapped.*), a second held-out check of everything chosen on the first",
    )
    parser.add_argument("--methods", default=",".join(IMAGENET_METHODS), help=", ".join(IMAGENET_METHODS))
    parser.add_argument("--model-dir", type=Path, default=IMAGENET_MODEL, help="folder with model.safetensors")
    parser.add_argument("--images", type=Path, default=IMAGENET_DIR, help="ImageNet folder (<wnid>/ or val/<wnid>/)")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--calib-batch-size", type=int, default=64)
    parser.add_argument(
        "--calib-block-runs",
        type=int,
        default=None,
        help="calibrate's max_block_runs: its search budget (default: calibrate's own, 30 forwards' worth)",
    )
    parser.add_argument("--workers", type=int, default=2, help="processes decoding the JPEGs (0: in this one)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--stem", default=None, help="output names (default accuracy_imagenet[_quick])")
    args = parser.parse_args(argv)
    preset = IMAGENET_QUICK if args.quick else IMAGENET_FULL
    args.eval_images = preset["eval_images"] if args.eval_images is None else args.eval_images
    args.calib_images = preset["calib_images"] if args.calib_images is None else args.calib_images
    args.budgets = parse_floats(args.budgets) if args.budgets else list(preset["budgets"])
    args.methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in args.methods if m not in IMAGENET_METHODS]
    if unknown:
        parser.error(f"unknown --methods {unknown}; choose from {', '.join(IMAGENET_METHODS)}")
    if any(not 0 < b < 1 for b in args.budgets):
        parser.error(f"--budgets are fractions of the FLOPs in (0, 1), got {args.budgets}")
    if min(args.eval_images, args.calib_images) < 1:
        parser.error("--eval-images and --calib-images must be at least 1")
    if "calibrated" in args.methods and not hasattr(tm, "calibrate"):
        parser.error("this tokenmerge_patch has no calibrate(): leave 'calibrated' out of --methods")
    if not (args.model_dir / "model.safetensors").is_file() or not args.images.is_dir():
        where = SHARED if args.model_dir == IMAGENET_MODEL else args.model_dir
        parser.error(f"the ImageNet model or images are not there ({where}): --imagenet needs ../shared")
    full = args.calib_block_runs is None and all(getattr(args, key) == value for key, value in IMAGENET_FULL.items())
    name = "accuracy_imagenet_swapped" if args.swap_halves else "accuracy_imagenet"
    args.plans_stem = output_stem(None if args.stem is None else f"{args.stem}_plans", f"{name}_plans", full=full)
    args.stem = output_stem(args.stem, name, full=full)
    return args


@torch.inference_mode()
def predict(
    model: nn.Module, images: torch.Tensor, *, batch_size: int, device: torch.device, desc: str
) -> torch.Tensor:
    """The top-1 class of every image (``[N]``), with a progress bar."""
    model.eval()
    predictions = []
    for start in tqdm(range(0, len(images), batch_size), desc=desc, leave=False):
        logits = logits_of(model(images[start : start + batch_size].to(device)))
        predictions.append(logits.argmax(-1).cpu())
    return torch.cat(predictions)


class BudgetFit:
    """Keep rates (or ToMe's ``r``) matched to a FLOPs budget: estimated with the fitted FLOPs model of
    :mod:`tokenmerge_patch.budget` (no trace), then counted with ``count_flops`` on the patched model and
    corrected, as the ``flops=`` rule does."""

    def __init__(self, model: nn.Module, input_size: tuple[int, ...]) -> None:
        tm.unpatch(model)
        self.model, self.input_size = model, input_size
        self.depth = len(model.blocks)
        self.prefix = model.num_prefix_tokens
        self.flops = flop_model(tm.describe(model, input_size))
        self.num_tokens = self.flops.num_tokens

    def estimate(self, layers: Sequence[int], rates: Sequence[float], method: str) -> float:
        counts = token_counts_for(self.num_tokens, self.prefix, self.depth, tuple(layers), tuple(rates), method)
        return self.flops(counts, method) / self.flops.total

    def count(self):
        """``(count_flops report, FLOPs fraction)`` of the model as it is patched now."""
        report = tm.count_flops(self.model, self.input_size)
        return report, report.total / self.flops.total

    def keep_rate(self, budget: float, layers: Sequence[int], method: str, apply: Callable[[float], object]):
        """One keep rate for ``layers`` whose counted FLOPs land in ``[budget - 0.01, budget]``; ``apply(rate)``
        patches the model. Returns ``(rate, report, fraction)``."""
        aim = budget - FIT_TOLERANCE / 2
        for _ in range(5):
            low, high = 1e-3, 1.0
            if self.estimate(layers, (low,) * len(layers), method) > aim:
                raise ValueError(f"{method} in blocks {list(layers)} cannot reach {budget} of the FLOPs")
            for _ in range(40):
                middle = (low + high) / 2
                if self.estimate(layers, (middle,) * len(layers), method) <= aim:
                    low = middle
                else:
                    high = middle
            rate = low
            apply(rate)
            report, fraction = self.count()
            if budget - FIT_TOLERANCE <= fraction <= budget:
                break
            aim -= fraction - (budget - FIT_TOLERANCE / 2)
        return rate, report, fraction

    def tome_r(self, budget: float, apply: Callable[[int], object]):
        """ToMe's constant ``r`` (tokens merged per block, every block from 0): the smallest whose counted FLOPs
        are within ``budget`` (``r`` is an integer, so the count lands up to one step of ``r`` below). Returns
        ``(r, report, fraction)``."""
        layers = range(self.depth)
        largest = max(1, (self.num_tokens - self.prefix - 1) // self.depth)

        def estimate(r: int) -> float:
            rates = tome_keep_rates(self.num_tokens, self.prefix, layers, r)
            return self.estimate(layers, rates, "bipartite")

        r = next((r for r in range(1, largest + 1) if estimate(r) <= budget), largest)
        while True:
            apply(r)
            report, fraction = self.count()
            if fraction <= budget or r >= largest:
                return r, report, fraction
            r += 1


def _shown(path: Path) -> str:
    """``path`` as ``../shared/...`` when it is in ../shared (the same on every machine), else as is."""
    try:
        return f"../shared/{Path(path).resolve().relative_to(SHARED.resolve())}"
    except ValueError:
        return str(path)


def _flags(config: PatchConfig | None) -> str:
    """The options that change a reduction's result, in words: ``size-weighted``, ``keep norm``, ``prop. attn`` or
    ``plain``."""
    if config is None:
        return ""
    named = (("size-weighted", config.size_weighted), ("keep norm", config.keep_norm), ("prop. attn", config.prop_attn))
    flags = [name for name, on in named if on]
    return " + ".join(flags) or "plain"


def _short_layers(layers: Sequence[int]) -> str:
    layers = list(layers)
    if len(layers) > 3 and layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}–{layers[-1]}"
    return ",".join(map(str, layers))


def _short_rates(rates: Sequence[float]) -> str:
    """One rate, three per-layer rates, or the range of many."""
    if len(set(rates)) == 1:
        return f"{rates[0]:.3f}"
    if len(rates) <= 3:
        return "/".join(f"{r:.2f}" for r in rates)
    return f"{min(rates):.2f}–{max(rates):.2f}"


def _short_tokens(tokens: Sequence[int]) -> str:
    return "→".join(map(str, tokens)) if len(tokens) <= 4 else f"{tokens[0]}→{tokens[1]}→…→{tokens[-1]}"


def _classes(labels: Sequence[int]) -> str:
    labels = list(labels)
    return ", ".join(map(str, labels)) if len(labels) <= 7 else ", ".join(map(str, labels[:4])) + f", …, {labels[-1]}"


def describe_images(
    split, eval_idx, calib_idx, targets, folder: Path, calibrating: bool, swapped: bool = False
) -> list[str]:
    """Which images did what, in words (for the printed table and the markdown)."""
    evaluates, calibrates = ("even", "odd") if swapped else ("odd", "even")
    eval_classes = [targets[i] for i in eval_idx]
    evaluation = (
        f"all {len(eval_idx)} images of the {evaluates} class indices {eval_classes[0]}, {eval_classes[1]}, …, "
        f"{eval_classes[-1]}"
        if len(eval_idx) == len(split.evaluation)
        else f"{len(eval_idx)} of the {len(split.evaluation)} images of the {evaluates} class indices, evenly spaced "
        f"over the class order: classes {_classes(eval_classes)}"
    )
    lines = [
        f"Images: {_shown(folder)} (ImageNet validation images, one per class; class index = line of "
        "synset_words.txt); resize 256 bicubic, centre crop 224, ImageNet mean/std. Split by class index "
        f"(tokenmerge_patch.data.split_by_class{', halves swapped' if swapped else ''}): {calibrates} classes "
        f"calibrate, {evaluates} classes evaluate, no class on both sides.",
        f"- **evaluation** (every top-1 and agreement below): {evaluation}.",
    ]
    if calibrating:
        calib_classes = [targets[i] for i in calib_idx]
        lines.append(
            f"- **calibration** (`tm.calibrate` only, never evaluated on): {len(calib_idx)} of the "
            f"{len(split.calibration)} images of the {calibrates} class indices, evenly spaced over the class order: "
            f"classes {_classes(calib_classes)} (every file: the plans JSON)."
        )
    return lines


def imagenet_plot(rows: list[dict], budgets: Sequence[float], title: str, path: Path) -> None:
    """Pareto view: top-1 (left) and agreement with the unpatched predictions (right) against GFLOPs; one line
    per method over the budgets, the unpatched model as a horizontal line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    base = rows[0]
    keys = [k for k in dict.fromkeys(r["key"] for r in rows) if k != "unpatched"]
    markers = "osD^v<>*"
    for axis, column, label in (
        (axes[0], "top-1 %", "top-1 % (evaluation images)"),
        (axes[1], "agree %", "top-1 agreement with unpatched %"),
    ):
        axis.axhline(base[column], color="k", linestyle=":", label=f"unpatched, {base['GFLOPs']:.3f} GFLOPs")
        for budget in budgets:
            axis.axvline(budget * base["GFLOPs"], color="grey", linestyle="--", alpha=0.6, linewidth=0.9)
        for i, key in enumerate(keys):
            points = sorted((r["GFLOPs"], r[column]) for r in rows if r["key"] == key)
            single = len(points) == 1
            axis.plot(
                *zip(*points, strict=True),
                marker=markers[i % len(markers)],
                linestyle="none" if single else "-",
                markersize=11 if single else 6,
                color=f"C{i}",
                label=METHOD_LABELS[key],
            )
        axis.set(xlabel="GFLOPs per image (fvcore)", ylabel=label)
        axis.grid(alpha=0.3)
    axes[0].set_title(title, fontsize=10)
    budgets_text = ", ".join(f"{b:g}" for b in budgets)
    axes[1].set_title(f"dashed: the FLOPs budgets ({budgets_text} of the unpatched model's)", fontsize=10)
    axes[0].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def imagenet_main(argv: list[str]) -> list[dict]:
    """The ImageNet benchmark (``--imagenet``): every row on the evaluation half, calibration on the other."""
    args = parse_imagenet_args(argv)
    started = time.perf_counter()
    device = pick_device(args.device)
    threads = set_threads(args.threads)
    model = load_imagenet_model(args.model_dir).to(device)
    input_size = (3, *model.patch_embed.img_size)
    dataset = load_imagenet(args.images, image_size=tuple(model.patch_embed.img_size))
    split = split_by_class(dataset.targets)
    if args.swap_halves:
        split = Split(calibration=split.evaluation, evaluation=split.calibration)
    eval_idx = evenly_spaced(split.evaluation, args.eval_images)
    calibrating = "calibrated" in args.methods
    calib_idx = evenly_spaced(split.calibration, args.calib_images) if calibrating else []
    decode = time.perf_counter()
    evaluation = to_tensor_dataset(
        dataset, eval_idx, workers=args.workers, desc=f"decode {len(eval_idx)} evaluation images"
    )
    calibration = None
    if calibrating:
        calibration = to_tensor_dataset(
            dataset, calib_idx, workers=args.workers, desc=f"decode {len(calib_idx)} calibration images"
        ).tensors[0]
    decode_s = time.perf_counter() - decode
    images, labels = evaluation.tensors
    root = Path(dataset.root)

    def files(indices: Sequence[int]) -> list[str]:
        return [str(Path(dataset.samples[i][0]).relative_to(root)) for i in indices]

    fit = BudgetFit(model.cpu(), input_size)
    model.to(device)
    base_predictions = None
    rows: list[dict] = []
    plans: list[dict] = []
    calibrated: dict[str, dict] = {}

    def measure(key: str, budget: float | None, report=None, fraction=None, **extra) -> dict:
        nonlocal base_predictions
        if report is None:
            report, fraction = fit.count() if device.type == "cpu" else _count_on_cpu(fit, model, device)
        tick = time.perf_counter()
        label = METHOD_LABELS[key] + ("" if budget is None else f" @ {budget}")
        predictions = predict(model, images, batch_size=args.batch_size, device=device, desc=label)
        eval_s = time.perf_counter() - tick
        if base_predictions is None:
            base_predictions = predictions
        config = tm.patch_config(model)
        blocks = report.blocks
        if config is None:
            layers, rates, tokens = (), (), [blocks[0].tokens_in]
        else:
            layers, rates = config.layers, config.keep_rates
            tokens = [blocks[layers[0]].tokens_in] + [blocks[layer].tokens_out for layer in layers]
        correct = int((predictions == labels).sum())
        agree = int((predictions == base_predictions).sum())
        row = {
            "budget": budget,
            "key": key,
            "method": METHOD_LABELS[key],
            "flags": _flags(config),
            "size_weighted": "" if config is None else config.size_weighted,
            "keep_norm": "" if config is None else config.keep_norm,
            "prop_attn": "" if config is None else config.prop_attn,
            "layers": _short_layers(layers),
            "keep rates": extra.get("rates_text") or "/".join(f"{r:.4f}" for r in rates),
            "rates_short": extra.pop("rates_text", None) or (_short_rates(rates) if rates else ""),
            "tokens": "→".join(map(str, tokens)),
            "tokens_short": _short_tokens(tokens),
            "GFLOPs": report.total / 1e9,
            "FLOPs": fraction,
            "top-1 %": 100 * correct / len(labels),
            "agree %": 100 * agree / len(labels),
            "correct": correct,
            "agree": agree,
            "images": len(labels),
            "calib s": extra.pop("calib_s", None),
            "eval s": eval_s,
            **extra,
        }
        row["Δ top-1"] = row["top-1 %"] - (rows[0]["top-1 %"] if rows else row["top-1 %"])
        rows.append(row)
        plans.append({"budget": budget, "key": key, "plan": None if config is None else config.to_dict()})
        tqdm.write(
            f"{row['method']:<44} budget {budget or '':<5} {row['GFLOPs']:.3f} GFLOPs ({fraction:.3f}) "
            f"top-1 {row['top-1 %']:6.2f} %  agree {row['agree %']:6.2f} %  tokens {row['tokens_short']}"
        )
        return row

    tm.unpatch(model)
    measure("unpatched", None)
    layers = tm.default_layers(fit.depth)
    for budget in args.budgets:
        paper_rate = None
        for key in [m for m in args.methods if m != "keep0.7"]:
            model.cpu()  # FLOPs are counted on the CPU
            if key in ("paper", "default", "nonorm") and paper_rate is not None:
                # the default flags (without keep_norm for nonorm) at the paper row's rate
                tm.patch(model, layers, paper_rate, keep_norm=None if key == "default" else False)
                report, fraction = fit.count()
                model.to(device)
                measure(key, budget, report, fraction)
                continue
            if key in ("paper", "default", "nonorm", "drop", "fuse"):
                method = "merge" if key in ("paper", "default", "nonorm") else key
                flags = {"size_weighted": False, "prop_attn": False} if key == "paper" else {}
                flags = {"keep_norm": False} if key == "nonorm" else flags

                def apply(rate: float, method=method, flags=flags) -> None:
                    tm.patch(model, layers, rate, method=method, **flags)

                rate, report, fraction = fit.keep_rate(budget, layers, method, apply)
                if key == "paper":
                    paper_rate = rate
            elif key == "tome":

                def apply_r(r: int) -> None:
                    rates = tome_keep_rates(fit.num_tokens, fit.prefix, range(fit.depth), r)
                    tm.patch(model, range(fit.depth), rates, method="bipartite", prop_attn=True)

                r, report, fraction = fit.tome_r(budget, apply_r)
                model.to(device)
                measure(key, budget, report, fraction, rates_text=f"r={r}")
                continue
            elif key in ("rule", "rule_nonorm", "rule_received"):
                score = "received" if key == "rule_received" else None  # received: solved with its own cost counted
                tm.patch(model, flops=budget, keep_norm=False if key == "rule_nonorm" else None, score=score)
                report, fraction = fit.count()
            elif key == "rule_received_same":  # the class-score rule's very plan, scored by received attention
                tm.patch(model, flops=budget)
                tm.patch(model, config=replace(tm.patch_config(model), score="received"))
                report, fraction = fit.count()
            else:  # calibrated
                tm.unpatch(model)
                model.to(device)
                tick = time.perf_counter()
                plan = tm.calibrate(
                    model,
                    calibration,
                    flops=budget,
                    images=len(calibration),
                    batch_size=args.calib_batch_size,
                    max_block_runs=args.calib_block_runs,
                    progress=True,
                )
                seconds = time.perf_counter() - tick
                tm.patch(model.cpu(), config=plan)
                report, fraction = fit.count()
                calibrated[str(budget)] = {"plan": plan.to_dict(), "seconds": seconds}
                model.to(device)
                measure(key, budget, report, fraction, calib_s=seconds)
                continue
            model.to(device)
            measure(key, budget, report, fraction)
    if "keep0.7" in args.methods:
        model.cpu()
        tm.patch(model, keep_rate=0.7)
        report, fraction = fit.count()
        model.to(device)
        measure("keep0.7", None, report, fraction)
    tm.unpatch(model)
    total_s = time.perf_counter() - started

    lines = [
        f"## {IMAGENET_ARCH}: off-the-shelf token reduction on ImageNet images",
        "",
        f"Model: timm `{IMAGENET_ARCH}` with the ImageNet-1k weights of {_shown(args.model_dir)}, no fine-tuning; "
        f"unpatched {rows[0]['GFLOPs']:.3f} GFLOPs per image (fvcore with the SDPA handle, one multiply-add = "
        "one flop).",
        *describe_images(split, eval_idx, calib_idx, dataset.targets, root, calibrating, args.swap_halves),
        "",
    ]
    table_rows = [{**row, "tokens": row["tokens_short"], "keep rates": row["rates_short"]} for row in rows]
    lines.append(
        markdown_table(
            table_rows,
            IMAGENET_COLUMNS,
            {
                "budget": "{:.2f}",
                "GFLOPs": "{:.3f}",
                "FLOPs": "{:.3f}",
                "top-1 %": "{:.2f}",
                "Δ top-1": "{:+.2f}",
                "agree %": "{:.2f}",
                "calib s": "{:.0f}",
            },
        )
    )
    calib_search = "its default search" + (
        "" if args.calib_block_runs is None else f" cut to max_block_runs={args.calib_block_runs}"
    )
    blocks = ",".join(map(str, layers))
    lines += [
        "",
        f"- **budget**: the target fraction of the unpatched FLOPs; **FLOPs**: the fraction counted; **agree %**: "
        f"evaluation images whose top-1 class is the unpatched model's. One image is {100 / len(labels):.2f} points.",
        f"- **merge, paper's / library defaults, drop, fuse**: blocks {blocks}, one keep rate fitted so the count "
        "lands in [budget - 0.01, budget]. The paper's merge is plain eq. 4 (size_weighted=False, prop_attn=False); "
        "the library-defaults merge has the same blocks and rate and patch()'s default options; drop and fuse fit "
        "their own rate, with patch()'s defaults; the **keep_norm=False** rows turn that default off (keep norm: each "
        "merged token gets its longest member's norm). **flags**: what was on (size-weighted: eq. 4 weighted by "
        "score x size; keep norm; prop. attn: proportional attention, log(size) added to the attention logits; "
        "plain: none).",
        "- **ToMe schedule**: method='bipartite', prop_attn, r tokens merged in every block from 0 (constant r), the "
        "smallest integer r within the budget, so it can land up to one step of r below.",
        "- **flops= rule**: patch(model, flops=budget) (a fixed rule, no data; also with keep_norm=False). "
        "**calibrate(flops=)**: "
        f"tm.calibrate(model, calibration images, flops=budget) with {calib_search}, applied with "
        "patch(model, config=plan); calib s is its wall time.",
        f"- **patch(model, keep_rate=0.7)**: patch()'s defaults (blocks {blocks}), no budget.",
        "- keep rates: one for all reducing blocks, one per block, or (many different ones) their range; tokens: "
        "entering the first reducing block, then after each (… elides the middle). Every rate and count is in the "
        f"CSV, every plan in {args.plans_stem}.json.",
        f"- device {device.type}, {threads} threads; decoding {len(eval_idx) + len(calib_idx)} JPEGs "
        f"{decode_s:.0f} s; whole run {total_s:.0f} s ({total_s / 60:.1f} min).",
    ]
    text = "\n".join(lines)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    write_outputs(args.out, args.stem, rows, IMAGENET_CSV_COLUMNS, text)
    imagenet_plot(
        rows,
        args.budgets,
        f"{IMAGENET_ARCH} (ImageNet weights), {len(labels)} evaluation images",
        args.out / f"{args.stem}.png",
    )
    record = {
        "model": f"{IMAGENET_ARCH} ({_shown(args.model_dir)})",
        "images": _shown(root),
        "split": "by class index: "
        + ("odd = calibration, even = evaluation" if args.swap_halves else "even = calibration, odd = evaluation")
        + " (tokenmerge_patch.data.split_by_class)",
        "evaluation_images": files(eval_idx),
        "calibration_images": files(calib_idx),
        "calibrated": calibrated,
        "rows": plans,
    }
    (args.out / f"{args.plans_stem}.json").write_text(json.dumps(record, indent=1) + "\n")
    return rows


def _count_on_cpu(fit: BudgetFit, model: nn.Module, device: torch.device):
    model.cpu()
    try:
        return fit.count()
    finally:
        model.to(device)


if __name__ == "__main__":
    main()
