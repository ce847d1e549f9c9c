"""Helpers shared by the benchmark scripts: devices, threads, and writing tables (CSV + markdown)."""

from __future__ import annotations

import argparse
import csv
import os
from collections.abc import Sequence
from pathlib import Path

import timm
import torch

from tokenmerge_patch.checkpoint import hub_reachable, load_checkpoint

RESULTS = Path(__file__).resolve().parent / "results"
# Quick or partial runs write ``{stem}_quick.*`` (git-ignored) so they never overwrite the committed full
# results the README shows.
QUICK_SUFFIX = "_quick"
SHARED = Path(__file__).resolve().parents[2] / "shared"
DEFAULT_CHECKPOINT = SHARED / "models" / "vit_mnist_tiny"
DEFAULT_DATA = f"mnist:{SHARED / 'data' / 'mnist'}"
# a real ImageNet-1k DeiT-Tiny and 1000 ImageNet validation images (one per class) beside the checkout
IMAGENET_MODEL = SHARED / "models" / "deit_tiny_in1k"
IMAGENET_DIR = SHARED / "data" / "imagenet_samples"
IMAGENET_ARCH = "deit_tiny_patch16_224"


def add_model_arguments(parser: argparse.ArgumentParser, data_help: str) -> None:
    """``--checkpoint DIR | --model NAME [--pretrained]`` and ``--data SPEC``."""
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", type=Path, default=None, help="folder with model.safetensors + config.json")
    source.add_argument("--model", default=None, help="timm model name")
    parser.add_argument("--pretrained", action="store_true", help="with --model: load timm's weights")
    parser.add_argument("--data", default=None, help=data_help)


def resolve_model_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """With neither ``--checkpoint`` nor ``--model``: the real MNIST ViT of ../shared on its MNIST digits."""
    if args.checkpoint is None and args.model is None:
        if not DEFAULT_CHECKPOINT.is_dir():
            parser.error(f"give --checkpoint or --model (the default {DEFAULT_CHECKPOINT} is not there)")
        args.checkpoint = DEFAULT_CHECKPOINT
        args.data = args.data or DEFAULT_DATA
    if args.data is None:
        parser.error("--data is needed with --model / --checkpoint")
    if args.pretrained and not hub_reachable():
        parser.error("--pretrained needs the model hub, which is not reachable")


def load_model(args: argparse.Namespace) -> tuple[torch.nn.Module, tuple, tuple, str]:
    """(model in eval mode, input mean, input std, a display name) from the resolved arguments."""
    if args.checkpoint is not None:
        checkpoint = load_checkpoint(args.checkpoint)
        return checkpoint.model, checkpoint.mean, checkpoint.std, args.checkpoint.name
    model = timm.create_model(args.model, pretrained=args.pretrained).eval()
    config = model.pretrained_cfg
    return model, tuple(config["mean"]), tuple(config["std"]), args.model


def pick_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for but CUDA is not available")
    return device


def set_threads(threads: int | None) -> int:
    """Use ``threads`` intra-op threads (default: the cores this process may run on) and return the number."""
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(threads or available or 1)
    return torch.get_num_threads()


def output_stem(stem: str | None, default: str, *, full: bool) -> str:
    """The file stem a run writes: ``stem`` when given (``--stem``); else ``default``, the committed name, for
    the full run and ``default + "_quick"`` for any quick or partial one.

    >>> output_stem(None, "flops", full=True), output_stem(None, "flops", full=False), output_stem("x", "y", full=False)
    ('flops', 'flops_quick', 'x')
    """
    if stem is not None:
        return stem
    return default if full else default + QUICK_SUFFIX


def timing_parser(doc: str, full: dict, stem: str) -> argparse.ArgumentParser:
    """The arguments of a micro-benchmark of one model: ``--model --keep-rate --batch-size --threads --rounds --out
    --stem``, defaulting to the full run ``full`` (whose output, ``stem``, is committed)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=full["model"])
    parser.add_argument("--keep-rate", type=float, default=full["keep_rate"])
    parser.add_argument("--batch-size", type=int, default=full["batch_size"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=full["rounds"])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--stem", default=None, help=f"output file name (default: {stem}, else {stem}{QUICK_SUFFIX})")
    return parser


def full_run_stem(args: argparse.Namespace, full: dict, stem: str) -> str:
    """:func:`output_stem` for a run that is the full one when every setting in ``full`` is as there."""
    return output_stem(args.stem, stem, full=all(getattr(args, key) == value for key, value in full.items()))


def reduction_inputs(block: torch.nn.Module, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What a timm block hands the reduction for ``tokens``: the tokens after its attention residual, and the
    attention's queries and keys (read as they leave ``q_norm`` / ``k_norm``)."""
    from tokenmerge_patch.backends.capture import CaptureOutputs

    attn = block.attn
    with torch.inference_mode(), CaptureOutputs(attn.q_norm, attn.k_norm) as captured:
        x = tokens + block.ls1(attn(block.norm1(tokens)))
    q, k = captured.require("q/k")
    return x, q, k


def parse_floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def parse_ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def markdown_table(rows: Sequence[dict], columns: Sequence[str], formats: dict[str, str] | None = None) -> str:
    """A markdown table; ``formats`` maps a column to a format string such as ``"{:.2f}"``."""
    formats = {"keep rate": "{:.2f}", **(formats or {})}

    def cell(column: str, value: object) -> str:
        if value is not None and column in formats:
            return formats[column].format(value)
        if isinstance(value, float):
            if value != 0 and abs(value) < 1:
                return f"{value:.4g}"
            return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
        return "" if value is None else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(c, row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_outputs(out: Path, stem: str, rows: Sequence[dict], columns: Sequence[str], markdown: str) -> None:
    """``{stem}.csv`` (every column) and ``{stem}.md`` (the markdown text) in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{stem}.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    (out / f"{stem}.md").write_text(markdown + "\n")


def write_markdown(out: Path, stem: str, text: str) -> None:
    """Print ``text`` and write it to ``{stem}.md`` in ``out``."""
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.md").write_text(text + "\n")


def imagenet_available() -> bool:
    """Whether ../shared has the ImageNet DeiT-Tiny and its sample images."""
    return (IMAGENET_MODEL / "model.safetensors").is_file() and (IMAGENET_DIR / "val").is_dir()


def load_imagenet_model(folder: Path = IMAGENET_MODEL, arch: str = IMAGENET_ARCH) -> torch.nn.Module:
    """The real ImageNet DeiT-Tiny of ../shared: timm's architecture with ``folder/model.safetensors`` loaded
    strictly, in eval mode."""
    from safetensors.torch import load_file

    model = timm.create_model(arch, pretrained=False)
    model.load_state_dict(load_file(Path(folder) / "model.safetensors"))
    return model.eval()
