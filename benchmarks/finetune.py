"""Fine-tune a patched model at its target keep rate and measure what it wins back.

    python benchmarks/finetune.py --checkpoint ../shared/models/vit_mnist_tiny --data mnist:../shared/data/mnist \\
        --keep-rate 0.3 --layers 1,3,5 --epochs 2 --lr 1e-4 --batch-size 64
    torchrun --nproc_per_node 8 benchmarks/finetune.py --model deit_small_patch16_224 --pretrained \\
        --data imagefolder:/data/imagenet/train --val-data imagefolder:/data/imagenet/val --epochs 30 --lr 2e-5

Model sources: ``--checkpoint DIR`` (``model.safetensors`` + ``config.json``, the format of
../shared/models/vit_mnist_tiny) or ``--model NAME`` (timm; ``--pretrained`` needs the network); with neither,
the ../shared MNIST model and digits. Datasets: ``mnist:DIR``, ``cifar10:FILE.npz``, ``imagefolder:DIR``
(no augmentation: this is a short fine-tune, not a training recipe).

Split: with ``--val-data`` all of ``--data`` trains and all of ``--val-data`` validates. Without it (mnist and
cifar10 only) the first ``--split`` (80 %) of ``--data`` trains and the rest validates: for the 10,000 MNIST
test digits of ../shared, digits 0-7999 train and 8000-9999 validate. ``--train-range`` / ``--val-range A:B``
choose index ranges explicitly.

Writes to ``--out``: ``finetune.csv`` and ``finetune.md`` (unpatched / patched before fine-tuning / after each
epoch: top-1, keep rate, wall time), ``finetune.png`` (training curve) and ``finetune.json`` (rows, per-epoch
history, a checksum of the final parameters on every rank). A quick run on part of the data (``--train-range``
or ``--val-range``) writes ``finetune_quick.*`` instead, so it never overwrites the committed results
(``--stem`` names the files explicitly). ``--save DIR`` writes the fine-tuned weights
(``model.safetensors``, the checkpoint's ``config.json``, and ``patch.json`` with the patch to re-apply).
With ``--checkpoint-dir DIR``, checkpoints go to ``DIR/last.pt`` at every epoch end and every
``--checkpoint-every`` steps; ``--resume`` continues from there exactly (the same command plus ``--resume``).

Under ``torchrun --nproc_per_node N``: DistributedDataParallel (nccl on CUDA, gloo on CPU), a
``DistributedSampler`` (``--batch-size`` per process), validation sharded over the processes; only rank 0
writes. A single process uses the same seeded sampler, so N processes with batch b see the same batches per
step as one process with batch N x b.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset

import tokenmerge_patch as tm
from tokenmerge_patch.data import dataset_from_spec
from tokenmerge_patch.finetune import EpochStats, StepInfo, evaluate_loader, finetune
from tokenmerge_patch.multiscale import add_multiscale

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    RESULTS,
    add_model_arguments,
    load_model,
    markdown_table,
    output_stem,
    parse_ints,
    pick_device,
    resolve_model_arguments,
    set_threads,
    write_outputs,
)

COLUMNS = [
    "stage",
    "epoch",
    "keep rate",
    "layers",
    "top-1 %",
    "Δ vs unpatched",
    "Δ vs before",
    "train loss",
    "train top-1 %",
    "lr",
    "seconds",
]
FORMATS = {
    "top-1 %": "{:.2f}",
    "Δ vs unpatched": "{:+.2f}",
    "Δ vs before": "{:+.2f}",
    "train loss": "{:.4f}",
    "train top-1 %": "{:.2f}",
    "lr": "{:.2e}",
    "seconds": "{:.1f}",
}


def parse_range(text: str | None) -> range | None:
    if not text:
        return None
    start, _, stop = text.partition(":")
    return range(int(start or 0), int(stop))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser, "training data: mnist:DIR | cifar10:FILE.npz | imagefolder:DIR")
    parser.add_argument("--val-data", default=None, help="validation data (default: split --data)")
    parser.add_argument("--train-range", default=None, help="A:B, indices of --data to train on")
    parser.add_argument("--val-range", default=None, help="A:B, indices of the validation data")
    parser.add_argument("--split", type=float, default=0.8, help="without --val-data: fraction of --data to train on")
    parser.add_argument("--keep-rate", type=float, default=0.7, help="target keep rate of every reducing block")
    parser.add_argument("--layers", default=None, help="reducing blocks (default: the paper's d//4, d//2, 3d//4)")
    parser.add_argument("--method", default="merge", help="merge | drop | fuse | bipartite")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--lr-warmup", type=float, default=0.05, help="fraction of steps warming the lr up")
    parser.add_argument("--keep-rate-warmup", type=float, default=0.0, help="fraction of steps from keep 1 to target")
    parser.add_argument("--label-smoothing", type=float, default=0.0)
    parser.add_argument("--teacher", action="store_true", help="distil from the unpatched model's soft targets")
    parser.add_argument("--grad-clip", type=float, default=None)
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None, help="default: on for CUDA")
    parser.add_argument("--batch-size", type=int, default=64, help="per process")
    parser.add_argument("--eval-batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument("--seed", type=int, default=0, help="seeds the shuffle (and the global RNG)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--stem", default=None, help="output file names (default: finetune.*, finetune_quick.* with a --*-range)"
    )
    parser.add_argument("--checkpoint-dir", type=Path, default=None, help="resumable checkpoints (default: none)")
    parser.add_argument("--checkpoint-every", type=int, default=None, help="also checkpoint every N steps")
    parser.add_argument("--resume", action="store_true", help="continue from --checkpoint-dir")
    parser.add_argument("--save", type=Path, default=None, help="folder for the fine-tuned weights")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--multiscale", action="store_true", help="add the multi-scale module (trained with the rest)")
    parser.add_argument("--low-patch-size", type=int, default=None, help="multi-scale: low-scale patch (default 2x)")
    parser.add_argument("--downsample-blocks", type=int, default=0, help="multi-scale: blocks running eq. 6")
    args = parser.parse_args(argv)
    resolve_model_arguments(parser, args)
    args.train_range, args.val_range = parse_range(args.train_range), parse_range(args.val_range)
    args.stem = output_stem(args.stem, "finetune", full=args.train_range is None and args.val_range is None)
    if args.val_data is None and args.data.startswith("imagefolder:") and args.val_range is None:
        parser.error("an ImageFolder is sorted by class: give --val-data (or explicit --train-range/--val-range)")
    if not 0 < args.split < 1:
        parser.error(f"--split must be in (0, 1), got {args.split}")
    args.layers = tuple(parse_ints(args.layers)) if args.layers else None
    if (args.resume or args.checkpoint_every) and args.checkpoint_dir is None:
        parser.error("--resume and --checkpoint-every need --checkpoint-dir")
    return args


def init_distributed(args: argparse.Namespace) -> tuple[int, int, torch.device]:
    """(rank, world size, device); under torchrun, joins the process group (nccl on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = pick_device(args.device)
    if world <= 1:
        return 0, 1, device
    local_rank = int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world, device


class Shard(Sampler):
    """Every ``world``-th index from ``rank``, no padding: summed over ranks, each image counts once."""

    def __init__(self, length: int, rank: int, world: int) -> None:
        self.indices = range(rank, length, world)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def build_datasets(
    args: argparse.Namespace, model: torch.nn.Module, mean: tuple, std: tuple
) -> tuple[Dataset, Dataset]:
    kwargs = dict(
        mean=mean, std=std, image_size=tuple(model.patch_embed.img_size), in_chans=model.patch_embed.proj.in_channels
    )
    data = dataset_from_spec(args.data, **kwargs)
    if args.val_data is not None:
        val = dataset_from_spec(args.val_data, **kwargs)
        train_range = args.train_range or range(len(data))
        val_range = args.val_range or range(len(val))
    else:  # one file, split in order (MNIST and CIFAR-10 files are not sorted by class)
        val = data
        cut = round(args.split * len(data))
        train_range = args.train_range or range(cut)
        val_range = args.val_range or range(cut, len(data))
    for name, chosen, source in (("train", train_range, data), ("val", val_range, val)):
        if len(chosen) == 0 or chosen.start < 0 or chosen.stop > len(source):
            raise SystemExit(f"--{name}-range {chosen.start}:{chosen.stop} does not fit the {len(source)} images")
    return Subset(data, train_range), Subset(val, val_range)


def checksum(model: torch.nn.Module) -> str:
    """sha256 of the parameters' bytes: equal on every rank after a correct DDP run."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def plot(steps: list[StepInfo], rows: list[dict], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_axis, acc_axis) = plt.subplots(1, 2, figsize=(10, 4))
    if steps:
        x = [s.step for s in steps]
        losses = [s.loss for s in steps]
        window = max(1, len(losses) // 25)
        smooth = [
            sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1])
            for i in range(len(losses))
        ]
        loss_axis.plot(x, losses, color="tab:blue", alpha=0.3, linewidth=0.8, label="batch loss")
        loss_axis.plot(x, smooth, color="tab:blue", label=f"mean of {window}")
        keep_axis = loss_axis.twinx()
        keep_axis.plot(x, [sum(s.keep_rates) / len(s.keep_rates) for s in steps], color="tab:orange", label="keep rate")
        keep_axis.set_ylabel("keep rate", color="tab:orange")
        keep_axis.set_ylim(0, 1.05)
        handles = [*loss_axis.get_legend_handles_labels()[0], *keep_axis.get_legend_handles_labels()[0]]
        loss_axis.legend(handles=handles, loc="upper right")
    loss_axis.set(xlabel="step", ylabel="training loss (rank 0's batches)", title="training")
    loss_axis.grid(alpha=0.3)
    unpatched = next(r for r in rows if r["stage"] == "unpatched")
    curve = [(r["epoch"], r["top-1 %"]) for r in rows if r["stage"] != "unpatched"]
    acc_axis.axhline(unpatched["top-1 %"], color="k", linestyle=":", label=f"unpatched {unpatched['top-1 %']:.2f} %")
    acc_axis.plot(*zip(*curve, strict=True), "-o", label="patched")
    acc_axis.set_xticks([epoch for epoch, _ in curve])
    acc_axis.set(xlabel="epoch (0 = before fine-tuning)", ylabel="validation top-1 %", title="validation")
    acc_axis.grid(alpha=0.3)
    acc_axis.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_weights(args: argparse.Namespace, model: torch.nn.Module, name: str) -> None:
    from safetensors.torch import save_file

    args.save.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, args.save / "model.safetensors"
    )
    if args.checkpoint is not None:
        (args.save / "config.json").write_text((args.checkpoint / "config.json").read_text())
    config = tm.patch_config(model)
    patch = {
        "source": name,
        "layers": list(config.layers),
        "keep_rate": list(config.keep_rates),
        "method": config.method,
    }
    (args.save / "patch.json").write_text(json.dumps(patch, indent=2) + "\n")


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    started = time.perf_counter()
    rank, world, device = init_distributed(args)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    # Under torchrun each process gets its share of the cores, not all of them.
    threads = set_threads(args.threads or max(1, (os.cpu_count() or 1) // local_world))
    torch.manual_seed(args.seed)
    progress = rank == 0 and not args.no_progress
    try:
        model, mean, std, name = load_model(args)
        model.to(device)
        train, val = build_datasets(args, model, mean, std)
        sampler = DistributedSampler(train, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
        train_loader = DataLoader(train, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers)
        val_loader = DataLoader(val, batch_size=args.eval_batch_size, sampler=Shard(len(val), rank, world))

        def measure() -> tuple[float, float]:
            begin = time.perf_counter()
            return 100 * evaluate_loader(model, val_loader, device=device), time.perf_counter() - begin

        tm.unpatch(model)
        unpatched, unpatched_seconds = measure()
        teacher = copy.deepcopy(model).eval() if args.teacher else None
        tm.patch(model, layers=args.layers, keep_rate=args.keep_rate, method=args.method)
        layers = ",".join(map(str, tm.patch_config(model).layers))
        if args.multiscale:  # new parameters: added before the optimizer is built inside finetune()
            torch.manual_seed(args.seed)
            add_multiscale(model, low_patch_size=args.low_patch_size, downsample_blocks=args.downsample_blocks)
            model.to(device)
        before, before_seconds = measure()

        steps: list[StepInfo] = []
        tuning = time.perf_counter()
        history = finetune(
            model,
            train_loader,
            epochs=args.epochs,
            lr=args.lr,
            weight_decay=args.weight_decay,
            val_loader=val_loader,
            keep_rate_warmup=args.keep_rate_warmup,
            teacher=teacher,
            device=device,
            amp=args.amp,
            grad_clip=args.grad_clip,
            checkpoint_dir=args.checkpoint_dir,
            resume=args.resume,
            checkpoint_every=args.checkpoint_every,
            lr_warmup=args.lr_warmup,
            label_smoothing=args.label_smoothing,
            progress=progress,
            callback=steps.append,
        )
        tuning = time.perf_counter() - tuning
        sums = [checksum(model)]
        if world > 1:
            sums = [None] * world
            dist.all_gather_object(sums, checksum(model))
        if rank == 0:
            rows = make_rows(unpatched, unpatched_seconds, before, before_seconds, history, args.keep_rate, layers)
            module = ""
            if args.multiscale:
                fusion = model.multiscale
                module = (
                    f" + multi-scale ({fusion.low_patch_size}-px low-scale patches, {fusion.low_grid[0]}x"
                    f"{fusion.low_grid[1]} grid, fused before block {fusion.fuse_at}, eq. 6 on "
                    f"{fusion.downsample_blocks} block(s))"
                )
            setup = (
                f"{name}, {args.method} at keep rate {args.keep_rate} in blocks {layers}{module}; trained on "
                f"{len(train)} images of {args.data.split(':')[0]}, validated on {len(val)}; {args.epochs} epoch(s), "
                f"lr {args.lr:g}, batch {args.batch_size} x {world} process(es), device {device.type}, {threads} "
                f"thread(s) each; fine-tune wall time {tuning:.1f} s (training + validation), "
                f"whole run {time.perf_counter() - started:.0f} s"
            )
            text = markdown_table(rows, COLUMNS, FORMATS) + "\n\n" + setup
            print(text)
            write_outputs(args.out, args.stem, rows, COLUMNS, text)
            plot(steps, rows, f"{name}: fine-tune at keep rate {args.keep_rate}", args.out / f"{args.stem}.png")
            summary = {
                "rows": rows,
                "history": [asdict(h) for h in history],
                "world_size": world,
                "parameter_sha256": sums,
                "finetune_seconds": tuning,
                "setup": setup,
            }
            (args.out / f"{args.stem}.json").write_text(json.dumps(summary, indent=2) + "\n")
            if args.save is not None:
                save_weights(args, model, name)
        return rows if rank == 0 else []
    finally:
        if world > 1:
            dist.destroy_process_group()


def make_rows(
    unpatched: float,
    unpatched_seconds: float,
    before: float,
    before_seconds: float,
    history: list[EpochStats],
    keep_rate: float,
    layers: str,
) -> list[dict]:
    rows = [
        {
            "stage": "unpatched",
            "epoch": None,
            "keep rate": 1.0,
            "layers": "",
            "top-1 %": unpatched,
            "seconds": unpatched_seconds,
        },
        {
            "stage": "patched, before fine-tuning",
            "epoch": 0,
            "keep rate": keep_rate,
            "layers": layers,
            "top-1 %": before,
            "seconds": before_seconds,
        },
    ]
    for stats in history:
        rows.append(
            {
                "stage": f"after epoch {stats.epoch}",
                "epoch": stats.epoch,
                "keep rate": keep_rate,  # validation runs at the target rate
                "layers": layers,
                "top-1 %": 100 * stats.val_accuracy,
                "train loss": stats.train_loss,
                "train top-1 %": 100 * stats.train_accuracy,
                "lr": stats.lr,
                "seconds": stats.seconds,
            }
        )
    for row in rows:
        row["Δ vs unpatched"] = row["top-1 %"] - unpatched
        row["Δ vs before"] = None if row["stage"] == "unpatched" else row["top-1 %"] - before
    return rows


if __name__ == "__main__":
    main()
