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

import timm
import torch

import tokenmerge_patch as tm
from tokenmerge_patch.checkpoint import load_checkpoint
from tokenmerge_patch.data import dataset_from_spec
from tokenmerge_patch.evaluation import evaluate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, markdown_table, parse_floats, parse_ints, pick_device, set_threads, write_outputs

SHARED = Path(__file__).resolve().parents[2] / "shared"
DEFAULT_CHECKPOINT = SHARED / "models" / "vit_mnist_tiny"
DEFAULT_DATA = f"mnist:{SHARED / 'data' / 'mnist'}"
COLUMNS = ["method", "keep rate", "layers", "top-1 %", "Δ top-1", "GFLOPs", "images"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", type=Path, default=None, help="folder with model.safetensors + config.json")
    source.add_argument("--model", default=None, help="timm model name")
    parser.add_argument("--pretrained", action="store_true", help="with --model: load timm's weights")
    parser.add_argument("--data", default=None, help="mnist:DIR | cifar10:FILE.npz | imagefolder:DIR")
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N images only")
    parser.add_argument("--layers", default=None, help="reducing blocks (default: the paper's d//4, d//2, 3d//4)")
    parser.add_argument("--keep-rates", default="0.9,0.7,0.5,0.3")
    parser.add_argument("--methods", default="merge,drop")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--stem", default="accuracy", help="output file names (default accuracy.*)")
    args = parser.parse_args(argv)
    if args.checkpoint is None and args.model is None:
        if not DEFAULT_CHECKPOINT.is_dir():
            parser.error(f"give --checkpoint or --model (the default {DEFAULT_CHECKPOINT} is not there)")
        args.checkpoint = DEFAULT_CHECKPOINT
        args.data = args.data or DEFAULT_DATA
    if args.data is None:
        parser.error("--data is needed with --model / --checkpoint")
    args.keep_rates = parse_floats(args.keep_rates)
    args.methods = [m for m in args.methods.split(",") if m]
    args.layers = tuple(parse_ints(args.layers)) if args.layers else None
    return args


def load_model(args: argparse.Namespace) -> tuple[torch.nn.Module, tuple, tuple, str]:
    if args.checkpoint is not None:
        checkpoint = load_checkpoint(args.checkpoint)
        return checkpoint.model, checkpoint.mean, checkpoint.std, args.checkpoint.name
    model = timm.create_model(args.model, pretrained=args.pretrained).eval()
    config = model.pretrained_cfg
    return model, tuple(config["mean"]), tuple(config["std"]), args.model


def plot(rows: list[dict], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(6, 4.2))
    base = next(r for r in rows if r["method"] == "unpatched")
    axis.axhline(base["top-1 %"], color="k", linestyle=":", label=f"unpatched {base['top-1 %']:.2f} %")
    for method in dict.fromkeys(r["method"] for r in rows if r["method"] != "unpatched"):
        points = sorted((r["keep rate"], r["top-1 %"]) for r in rows if r["method"] == method)
        axis.plot(*zip(*points, strict=True), "-o", label=method)
    axis.set(xlabel="keep rate", ylabel="top-1 %", title=title)
    axis.invert_xaxis()
    axis.grid(alpha=0.3)
    axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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

    def measure(label: str, method: str, keep_rate: float, layers: object) -> dict:
        accuracy = 100 * evaluate(model, dataset, batch_size=args.batch_size, device=device, desc=label)
        flops = tm.count_flops(model.cpu(), input_size).gflops
        model.to(device)
        return {
            "method": method,
            "keep rate": keep_rate,
            "layers": layers,
            "top-1 %": accuracy,
            "GFLOPs": flops,
            "images": len(dataset),
        }

    tm.unpatch(model)
    rows = [measure("unpatched", "unpatched", 1.0, "")]
    for method in args.methods:
        for rate in args.keep_rates:
            tm.patch(model, layers=args.layers, keep_rate=rate, method=method)
            layers = ",".join(map(str, tm.patch_config(model).layers))
            rows.append(measure(f"{method} {rate}", method, rate, layers))
    tm.unpatch(model)
    for row in rows:
        row["Δ top-1"] = row["top-1 %"] - rows[0]["top-1 %"]
    setup = (
        f"{name} on {args.data.split(':')[0]} ({len(dataset)} images), device {device.type}, {threads} threads; "
        f"GFLOPs per image (fvcore); {time.perf_counter() - started:.0f} s"
    )
    text = markdown_table(rows, COLUMNS, {"top-1 %": "{:.2f}", "Δ top-1": "{:+.2f}", "GFLOPs": "{:.4f}"})
    text += "\n\n" + setup
    print(text)
    write_outputs(args.out, args.stem, rows, COLUMNS, text)
    plot(rows, f"{name}: top-1 against keep rate", args.out / f"{args.stem}.png")
    return rows


if __name__ == "__main__":
    main()
