"""The main job: params, GFLOPs and measured throughput of patched vs unpatched ViTs (the paper's Table 1).

    python benchmarks/flops.py            # DeiT-T/S/B, keep 0.9/0.7/0.5/0.3, merge and drop (< 10 min, 2 cores)
    python benchmarks/flops.py --quick    # DeiT-T/S, keep 0.7/0.5, fewer rounds (< 2 min): flops_quick.*

Runs offline on random weights (FLOPs and speed do not depend on them); ``--pretrained`` loads timm's
weights where the network allows. Throughput of the unpatched and each patched variant is measured in
the same run, in interleaved rounds (median), so the speedup is a ratio measured side by side. Writes
``flops.csv``, ``flops.md`` and ``flops.png`` to ``--out``. Those are the committed results, so only the full
run (the default models, keep rates, methods, layers, batch size and rounds, no multi-scale) writes them;
``--quick`` and any other setting write ``flops_quick.*`` (git-ignored) unless ``--stem`` names the files.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import timm
import torch

import tokenmerge_patch as tm
from tokenmerge_patch.checkpoint import hub_reachable
from tokenmerge_patch.multiscale import add_multiscale, remove_multiscale
from tokenmerge_patch.timing import Variant, interleaved_timings, median

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    RESULTS,
    markdown_table,
    output_stem,
    parse_floats,
    parse_ints,
    pick_device,
    set_threads,
    write_outputs,
)

MODELS = ["deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224"]
# the full run, whose results are committed: only it writes flops.*
FULL = {
    "models": MODELS,
    "keep_rates": [0.9, 0.7, 0.5, 0.3],
    "methods": ["merge", "drop"],
    "layers": (3, 6, 9),
    "batch_size": 16,
    "rounds": 9,
    "multiscale": False,
}
SHORT = {"deit_tiny_patch16_224": "DeiT-T", "deit_small_patch16_224": "DeiT-S", "deit_base_patch16_224": "DeiT-B"}
# GFLOPs the paper reports for token mergence at layers (3, 6, 9): Table 1 (DeiT-T/B, and all unpatched),
# Table 3 "+TM" rows for DeiT-S (Table 1's 3.1 G for DeiT-S includes the multi-scale module).
# Keyed by (model, keep rate, with the multi-scale module and eq. 6).
PAPER_GFLOPS = {
    ("deit_tiny_patch16_224", 1.0, False): 1.3,
    ("deit_tiny_patch16_224", 0.7, False): 0.8,
    ("deit_small_patch16_224", 1.0, False): 4.6,
    ("deit_small_patch16_224", 0.7, False): 3.0,
    ("deit_small_patch16_224", 0.5, False): 2.3,
    ("deit_small_patch16_224", 0.7, True): 3.1,
    ("deit_base_patch16_224", 1.0, False): 17.5,
    ("deit_base_patch16_224", 0.7, False): 11.5,
}
COLUMNS = [
    "model",
    "method",
    "keep rate",
    "params (M)",
    "GFLOPs",
    "paper GFLOPs",
    "FLOPs ↓ %",
    "img/s unpatched",
    "img/s patched",
    "speedup",
    "FLOPs ratio",
    "speedup ÷ FLOPs ratio",
    "merge time vs drop %",
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=None, help=f"comma-separated timm names (default: {','.join(MODELS)})")
    parser.add_argument("--keep-rates", default=None, help="comma-separated (default 0.9,0.7,0.5,0.3)")
    parser.add_argument("--methods", default="merge,drop", help="comma-separated: merge, drop")
    parser.add_argument("--layers", default="3,6,9", help="reducing blocks (default: the paper's 3,6,9)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    parser.add_argument("--rounds", type=int, default=None, help="timing rounds per variant (default 9, quick 7)")
    parser.add_argument("--quick", action="store_true", help="DeiT-T/S, keep 0.7/0.5, 7 rounds")
    parser.add_argument("--pretrained", action="store_true", help="load timm weights (needs the network)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for flops.csv/.md/.png")
    parser.add_argument(
        "--stem", default=None, help="output file names (default: flops.* for the full run, else flops_quick.*)"
    )
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    parser.add_argument(
        "--multiscale",
        action="store_true",
        help="add merge @ 0.7 rows with the multi-scale module, without and with eq. 6",
    )
    args = parser.parse_args(argv)
    args.models = args.models.split(",") if args.models else (MODELS[:2] if args.quick else MODELS)
    args.keep_rates = (
        parse_floats(args.keep_rates) if args.keep_rates else ([0.7, 0.5] if args.quick else [0.9, 0.7, 0.5, 0.3])
    )
    args.methods = [m for m in args.methods.split(",") if m]
    args.layers = tuple(parse_ints(args.layers))
    args.rounds = args.rounds or (7 if args.quick else 9)
    full = not args.quick and all(getattr(args, key) == value for key, value in FULL.items())
    args.stem = output_stem(args.stem, "flops", full=full)
    return args


def create(name: str, pretrained: bool) -> torch.nn.Module:
    if pretrained and not hub_reachable():
        print(f"[{name}] the model hub is not reachable: using random weights (FLOPs and speed do not depend on them)")
    elif pretrained:
        return timm.create_model(name, pretrained=True)
    return timm.create_model(name)


@dataclass(frozen=True)
class Config:
    """One row: how to patch the model (``multiscale``: ``None`` for none, else its ``downsample_blocks``)."""

    method: str
    rate: float
    multiscale: int | None = None

    @property
    def label(self) -> str:
        if self.multiscale is None:
            return self.method
        return f"{self.method} + multi-scale" + (
            f" + eq. 6 (blocks 0-{self.multiscale - 1})" if self.multiscale else ""
        )


def configure(model: torch.nn.Module, config: Config, layers: tuple[int, ...]) -> None:
    remove_multiscale(model)
    if config.method == "unpatched":
        tm.unpatch(model)
        return
    tm.patch(model, layers=layers, keep_rate=config.rate, method=config.method)
    if config.multiscale is not None:
        add_multiscale(model, downsample_blocks=config.multiscale)


def benchmark_model(name: str, args: argparse.Namespace, device: torch.device) -> tuple[list[dict], str]:
    model = create(name, args.pretrained).eval()
    # methods at the same keep rate run back to back in each round, so their paired ratio is sharp
    configs = [Config("unpatched", 1.0)]
    configs += [Config(method, rate) for rate in args.keep_rates for method in args.methods]
    if args.multiscale:
        configs += [Config("merge", 0.7, 0), Config("merge", 0.7, min(args.layers))]
    flops, params = {}, {}
    for config in configs:
        configure(model, config, args.layers)
        flops[config] = tm.count_flops(model)
        params[config] = sum(p.numel() for p in model.parameters()) / 1e6
    model.to(device)
    images = torch.randn(args.batch_size, 3, 224, 224, device=device)

    def run() -> None:
        model(images)

    variants = {config: Variant(lambda c=config: configure(model, c, args.layers), run) for config in configs}
    samples = interleaved_timings(variants, rounds=args.rounds, desc=SHORT.get(name, name))
    configure(model, configs[0], args.layers)

    def paired_ratio(numerator: list[float], denominator: list[float]) -> float:
        """Median over rounds of numerator / denominator times: each round's runs were back to back."""
        return median([a / b for a, b in zip(numerator, denominator, strict=True)])

    base, base_flops = configs[0], flops[configs[0]].total
    rows = []
    for config in configs:
        total = flops[config].total
        speedup = paired_ratio(samples[base], samples[config])
        if config.multiscale is None:
            paper = PAPER_GFLOPS.get((name, config.rate, False)) if config.method in ("merge", "unpatched") else None
        else:  # the paper's full method: module and eq. 6
            paper = PAPER_GFLOPS.get((name, config.rate, True)) if config.multiscale else None
        row = {
            "model": SHORT.get(name, name),
            "method": config.label,
            "keep rate": config.rate,
            "params (M)": params[config],
            "GFLOPs": total / 1e9,
            "paper GFLOPs": paper,
            "FLOPs ↓ %": 100 * (1 - total / base_flops),
            "img/s unpatched": args.batch_size / median(samples[base]),
            "img/s patched": args.batch_size / median(samples[config]),
            "speedup": speedup,
            "FLOPs ratio": base_flops / total,
            "speedup ÷ FLOPs ratio": speedup * total / base_flops,
        }
        drop = Config("drop", config.rate)
        if config.method == "merge" and config.multiscale is None and drop in samples:
            # time(merge) / time(drop) - 1, per round: positive when merging costs more
            row["merge time vs drop %"] = 100 * (paired_ratio(samples[config], samples[drop]) - 1)
        rows.append(row)
    detail = next((c for c in configs if c == Config("merge", 0.7)), configs[min(1, len(configs) - 1)])
    text = f"Per-block tokens and GFLOPs, {SHORT.get(name, name)}, {detail.label} at keep {detail.rate}:\n\n"
    return rows, text + str(flops[detail])


def goal_lines(rows: list[dict]) -> list[str]:
    """The speed goals: throughput gain vs FLOPs ratio, and merge's cost over drop at the same keep rate."""
    lines = []
    for row in rows:
        if row["method"] != "merge":
            continue
        line = (
            f"{row['model']} merge @ {row['keep rate']}: {row['speedup']:.3f}x faster for a "
            f"{row['FLOPs ratio']:.3f}x FLOPs ratio ({row['speedup ÷ FLOPs ratio']:.3f} of it)"
        )
        if row.get("merge time vs drop %") is not None:
            line += f"; merge takes {row['merge time vs drop %']:+.1f}% time vs drop"
        lines.append(line)
    return lines


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    models = list(dict.fromkeys(r["model"] for r in rows))
    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m != "unpatched"]
    styles = {"merge": "-o", "drop": "--s"}
    for index, model in enumerate(models):
        color = f"C{index}"
        base = next(r for r in rows if r["model"] == model and r["method"] == "unpatched")
        for method in methods:
            points = sorted(
                [(1.0, base)] + [(r["keep rate"], r) for r in rows if r["model"] == model and r["method"] == method]
            )
            rates = [p[0] for p in points]
            style = styles.get(method, "-^")
            left.plot(rates, [p[1]["GFLOPs"] for p in points], style, color=color, label=f"{model} {method}")
            right.plot(rates, [p[1]["speedup"] for p in points], style, color=color, label=f"{model} {method}")
            if method == methods[0]:
                right.plot(rates, [p[1]["FLOPs ratio"] for p in points], ":", color=color, alpha=0.6)
        paper = [(r["keep rate"], r["paper GFLOPs"]) for r in rows if r["model"] == model and r["paper GFLOPs"]]
        if paper:
            left.plot(*zip(*paper, strict=True), "*", color=color, markersize=12, markeredgecolor="k")
    left.set(xlabel="keep rate", ylabel="GFLOPs per image", title="GFLOPs (stars: the paper)", yscale="log")
    left.legend(fontsize=7)
    right.set(xlabel="keep rate", ylabel="speedup over unpatched", title="measured speedup (dotted: FLOPs ratio)")
    for axis in (left, right):
        axis.invert_xaxis()
        axis.grid(alpha=0.3)
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    device = pick_device(args.device)
    threads = set_threads(args.threads)
    started = time.perf_counter()
    rows, details = [], []
    for name in args.models:
        model_rows, detail = benchmark_model(name, args, device)
        rows += model_rows
        details.append(detail)
    setup = (
        f"device {device.type}, {threads} threads, batch {args.batch_size}, fp32, layers {args.layers}, "
        f"{args.rounds} interleaved rounds; speedups are medians of per-round ratios; "
        f"torch {torch.__version__}, timm {timm.__version__}, "
        f"{'pretrained' if args.pretrained else 'random'} weights; GFLOPs per image (fvcore, 1 multiply-add = 1)"
    )
    formats = {"GFLOPs": "{:.3f}", "paper GFLOPs": "{:.1f}", "FLOPs ↓ %": "{:.1f}", "merge time vs drop %": "{:+.1f}"}
    text = "\n\n".join([markdown_table(rows, COLUMNS, formats), setup, "\n".join(goal_lines(rows)), *details])
    print(text)
    write_outputs(args.out, args.stem, rows, COLUMNS, text)
    if not args.no_plot:
        plot(rows, args.out / f"{args.stem}.png")
    print(
        f"\nwrote {args.out}/{args.stem}.csv, .md{'' if args.no_plot else ', .png'} "
        f"in {time.perf_counter() - started:.0f} s"
    )
    return rows


if __name__ == "__main__":
    main()
