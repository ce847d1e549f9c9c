"""Where the off-the-shelf loss comes from: the real ImageNet DeiT-T of ../shared against its own predictions.

    python benchmarks/sensitivity.py            # 500 images, about 8 minutes on 2 CPU cores
    python benchmarks/sensitivity.py --quick    # 24 images, a few rows: writes sensitivity_quick.*

Every row is the mean KL divergence of the patched model's class probabilities from the unpatched model's (and the
share of images whose top-1 class stays the same) on the **calibration half** of ../shared's ImageNet images (the
even class indices; no labels are read, the evaluation half of ``accuracy.py --imagenet`` is never touched), with
patch()'s default options. Three questions, one table each:

1. **Which blocks hurt**: only block ``j`` reduces, at keep 0.73 (the ``flops=`` rule's share at 50 %) and 0.5.
2. **Which schedules**: the rule's family — every block from a start block on keeps the same share of its tokens
   (``slope`` 0), or a share falling (``slope`` > 0) or rising (< 0) with depth, and the last block keeps one patch
   token — solved to 0.65 and 0.5 of the FLOPs (``tokenmerge_patch.calibration.shaped_rates``).
3. **Is the choice of crucial tokens the bottleneck**: the first reducing block picks its crucial tokens by the
   class attention of a *deeper* block of the unpatched model (an oracle no real forward has: it needs the whole
   unpatched model first), everything else unchanged. ``own`` replays the block's own unpatched scores through the
   same path, a check that the replay is exact (it must equal the plain row).

Writes ``sensitivity.{csv,md,png}`` to ``--out``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

import tokenmerge_patch as tm
from tokenmerge_patch.budget import FlopModel, flop_model, rule_start, token_counts_for
from tokenmerge_patch.calibration import shaped_rates, solve_scalar
from tokenmerge_patch.data import evenly_spaced, load_imagenet, split_by_class, to_tensor_dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    IMAGENET_DIR,
    IMAGENET_MODEL,
    RESULTS,
    load_imagenet_model,
    markdown_table,
    output_stem,
    pick_device,
    set_threads,
    write_outputs,
)

FULL = dict(
    images=None,
    blocks=list(range(1, 11)),
    rates=[0.73, 0.5],
    budgets=[0.65, 0.5],
    starts=[1, 2, 3, 4],
    slopes=[-0.5, 0.0, 1.0],
    sources=[5, 7, 11],
)
QUICK = dict(images=24, blocks=[3, 6], rates=[0.5], budgets=[0.5], starts=[3], slopes=[0.0], sources=[7])
COLUMNS = ["table", "plan", "layers", "keep rates", "scores", "FLOPs", "KL", "agree %"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="24 images and a few rows (writes sensitivity_quick.*)")
    parser.add_argument("--images", type=int, default=None, help="calibration-half images, evenly spaced (all 500)")
    parser.add_argument("--model-dir", type=Path, default=IMAGENET_MODEL)
    parser.add_argument("--data", type=Path, default=IMAGENET_DIR)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--device", default="cpu", help="cpu (measured here) or cuda (unmeasured: no GPU here)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--stem", default=None)
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    for key, value in settings.items():
        if key != "images" or args.images is None:
            setattr(args, key, value)
    # only the default run on the CPU writes the committed names (other images, data or devices give other numbers)
    defaults = (args.model_dir, args.data, args.device) == (IMAGENET_MODEL, IMAGENET_DIR, "cpu")
    args.full = not args.quick and args.images is None and defaults
    args.stem = output_stem(args.stem, "sensitivity", full=args.full)
    return args


class ClassRows:
    """The unpatched model's class-attention rows (``tokenmerge_patch.reduce.class_attention``) at some blocks,
    per image, captured from the queries and keys its attention computes."""

    def __init__(self, model: nn.Module, images: Tensor, blocks: Sequence[int], batch_size: int) -> None:
        from tokenmerge_patch.backends.capture import CaptureOutputs
        from tokenmerge_patch.reduce import class_attention

        tm.unpatch(model)
        self.rows: dict[int, list[Tensor]] = {block: [] for block in blocks}
        attentions = [model.blocks[block].attn for block in blocks]
        modules = [m for attn in attentions for m in (attn.q_norm, attn.k_norm)]
        with torch.inference_mode():
            for chunk in images.split(batch_size):
                with CaptureOutputs(*modules) as captured:
                    model(chunk)
                outputs = captured.require("queries and keys")
                for i, (block, attn) in enumerate(zip(blocks, attentions, strict=True)):
                    q, k = outputs[2 * i], outputs[2 * i + 1]
                    self.rows[block].append(class_attention(q, k, attn.scale))

    @contextmanager
    def replayed(self, block: int) -> Iterator[None]:
        """While open, the first reduction of every forward (the one that sees all the tokens) scores by ``block``'s
        rows, batch after batch in the order they were captured; later reductions score as usual. The forwards
        must be exactly the captured batches, in order: a batch of another size, or fewer or more of them, is an
        error rather than a misaligned replay."""
        reduce = sys.modules["tokenmerge_patch.reduce"]
        original, rows = reduce.class_attention, self.rows[block]
        full, used = rows[0].shape[1], 0

        def replay(q: Tensor, k: Tensor, scale: float, attn_bias: Tensor | None = None) -> Tensor:
            nonlocal used
            if k.shape[2] != full:
                return original(q, k, scale, attn_bias)
            if used == len(rows) or rows[used].shape[0] != k.shape[0]:
                raise RuntimeError(f"replay of block {block}'s scores: forward {used + 1} does not match the capture")
            used += 1
            return rows[used - 1].to(k.device)

        reduce.class_attention = replay
        try:
            yield
        finally:
            reduce.class_attention = original
        if used != len(rows):
            raise RuntimeError(f"replay of block {block}'s scores: {used} of {len(rows)} captured batches were used")


class Runner:
    """KL divergence and agreement of the model as patched now, against its unpatched predictions."""

    def __init__(self, model: nn.Module, images: Tensor, batch_size: int, device: torch.device) -> None:
        self.model, self.images, self.batch_size, self.device = model, images, batch_size, device
        tm.unpatch(model)
        self.input_size = (3, *model.patch_embed.img_size)
        self.flops: FlopModel = flop_model(tm.describe(model.cpu(), self.input_size))
        self.full = self.flops.total
        self.reference = self._log_probs()

    def _log_probs(self) -> Tensor:
        self.model.to(self.device)
        with torch.inference_mode():
            out = [self.model(chunk.to(self.device)).float().cpu() for chunk in self.images.split(self.batch_size)]
        return torch.cat(out).log_softmax(-1)

    def fraction(self) -> float:
        return tm.count_flops(self.model.cpu(), self.input_size).total / self.full

    def measure(self, fraction: float | None = None) -> dict:
        """KL, agreement and the FLOPs fraction (``fraction`` if given: counted before, outside a replay)."""
        fraction = self.fraction() if fraction is None else fraction
        out = self._log_probs()
        kl = (self.reference.exp() * (self.reference - out)).sum(-1).mean()
        agree = (out.argmax(-1) == self.reference.argmax(-1)).float().mean() * 100
        return {"FLOPs": fraction, "KL": float(kl), "agree %": float(agree)}

    def estimate(self, rates: Sequence[float]) -> float:
        """The FLOPs fraction a per-block rate list (1.0: no reduction) gives, by the fitted FLOPs model."""
        layers = tuple(i for i, rate in enumerate(rates) if rate < 1.0)
        depth, prefix = len(rates), self.flops.num_prefix
        counts = token_counts_for(self.flops.num_tokens, prefix, depth, layers, [rates[i] for i in layers], "merge")
        return self.flops(counts) / self.full


def _rates_text(rates: Sequence[float]) -> str:
    return f"{rates[0]:.2f}" if len(set(rates)) == 1 else f"{min(rates):.2f}–{max(rates):.2f}"


def _layers_text(layers: Sequence[int]) -> str:
    layers = list(layers)
    return f"{layers[0]}–{layers[-1]}" if len(layers) > 3 else ",".join(map(str, layers))


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if not (args.model_dir / "model.safetensors").is_file():
        raise SystemExit(f"no ImageNet model at {args.model_dir} (../shared/models/deit_tiny_in1k)")
    started = time.perf_counter()
    threads = set_threads(args.threads)
    device = pick_device(args.device)
    model = load_imagenet_model(args.model_dir)
    dataset = load_imagenet(args.data, image_size=tuple(model.patch_embed.img_size))
    chosen = evenly_spaced(split_by_class(dataset.targets).calibration, args.images)
    images = to_tensor_dataset(dataset, chosen, desc=f"decode {len(chosen)} calibration-half images").tensors[0]
    runner = Runner(model, images, args.batch_size, device)
    depth = len(model.blocks)
    rows: list[dict] = []

    def run(table: str, plan: str, layers: Sequence[int], rates: Sequence[float], scores: str = "own") -> dict:
        tm.unpatch(model)
        tm.patch(model, layers=list(layers), keep_rate=list(rates))
        row = {"table": table, "plan": plan, "layers": _layers_text(layers), "keep rates": _rates_text(rates)}
        row.update(scores=scores, **runner.measure())
        rows.append(row)
        tqdm.write(
            f"{table:<10} {plan:<34} {scores:<10} FLOPs {row['FLOPs']:.3f}  KL {row['KL']:.4f}  "
            f"agree {row['agree %']:.1f} %"
        )
        return row

    # 1. one block at a time
    for rate in args.rates:
        for block in tqdm(args.blocks, desc=f"one block at keep {rate}", leave=False):
            run("one block", f"block {block} at keep {rate}", [block], [rate])

    # 2. schedules
    plans: dict[str, tuple[list[int], list[float]]] = {}
    for budget in args.budgets:
        aim = budget - 0.005
        for start in args.starts:
            for slope in args.slopes:
                shape = partial(shaped_rates, depth, start, slope=slope, last_one=True)
                rates = solve_scalar(shape, runner.estimate, aim, 0.0, 1.0)
                if rates is None:
                    tqdm.write(f"schedule   {budget:g}: from block {start}, slope {slope:g}: cannot reach the budget")
                    continue
                layers = [i for i, rate in enumerate(rates) if rate < 1.0]
                plan = f"{budget:g}: from block {start}, slope {slope:g}"
                row = run("schedule", plan, layers, [rates[i] for i in layers])
                row.update(budget=budget, start=start, slope=slope)
        tm.unpatch(model)
        config = tm.patch_config(tm.patch(model.cpu(), flops=budget))
        plans[f"flops={budget:g} rule"] = (list(config.layers), list(config.keep_rates))

    # 3. selection headroom, at the rule's first reducing block
    first = rule_start(depth)
    assert all(layers[0] == first for layers, _ in plans.values()), "the rule starts at rule_start(depth)"
    rules = {f"block {first} at keep {rate}": ([first], [rate]) for rate in args.rates} | plans
    replay = ClassRows(model.cpu(), images, [first, *args.sources], args.batch_size)
    for name, (layers, rates) in rules.items():
        run("headroom", name, layers, rates, "own")
        for source in [first, *args.sources]:
            tm.unpatch(model)
            tm.patch(model, layers=layers, keep_rate=rates)
            fraction = runner.fraction()  # counted before the replay: a traced forward would consume a batch
            with replay.replayed(source):
                measured = runner.measure(fraction)
            label = "own, replayed" if source == first else f"block {source}"
            row = {"table": "headroom", "plan": name, "layers": _layers_text(layers), "keep rates": _rates_text(rates)}
            rows.append({**row, "scores": label, **measured})
            tqdm.write(f"headroom   {name:<34} {label:<10} KL {measured['KL']:.4f}  agree {measured['agree %']:.1f} %")
    tm.unpatch(model)

    seconds = time.perf_counter() - started
    markdown = "\n".join(
        [
            "## Where the off-the-shelf loss comes from: real ImageNet DeiT-T, against its own predictions",
            "",
            f"`python benchmarks/sensitivity.py{' --quick' if args.quick else ''}`: {len(chosen)} images of the "
            "calibration half of ../shared's ImageNet images (even class indices; labels unused); KL: mean "
            "KL(unpatched || patched) of the class probabilities; agree %: images whose top-1 class is the unpatched "
            "model's; FLOPs: count_flops fraction. patch()'s defaults (proportional attention, keep_norm).",
            "- **one block**: only that block reduces. **schedule**: every block from the start on, the last keeping "
            "one patch token, shares solved to the budget (slope 0: one share; > 0: falling with depth). "
            f"**headroom**: the first reducing block (block {first}) picks its crucial tokens by the unpatched "
            "model's class attention at a deeper block (an oracle); 'own, replayed' replays its own scores through "
            "the same path (must equal 'own').",
            "",
            markdown_table(rows, COLUMNS, {"FLOPs": "{:.3f}", "KL": "{:.4f}", "agree %": "{:.1f}"}),
            "",
            f"device {device.type}, {threads} threads; whole run {seconds:.0f} s ({seconds / 60:.1f} min).",
        ]
    )
    write_outputs(args.out, args.stem, rows, COLUMNS, markdown)
    plot(rows, args.out / f"{args.stem}.png")
    print(markdown)
    return rows


def plot(rows: list[dict], path: Path) -> None:
    """Left: KL when one block reduces, by block. Right: KL of each schedule, by start block, per budget and slope."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    single = [r for r in rows if r["table"] == "one block"]
    for i, rate in enumerate(dict.fromkeys(r["keep rates"] for r in single)):
        points = [(int(r["layers"]), r["KL"]) for r in single if r["keep rates"] == rate]
        axes[0].plot(*zip(*points, strict=True), marker="o", color=f"C{i}", label=f"keep {rate}")
    axes[0].set(xlabel="the only reducing block", ylabel="KL to the unpatched model", yscale="log")
    axes[0].set_title("one block at a time: early blocks cost most", fontsize=10)
    schedules = [r for r in rows if r["table"] == "schedule"]
    for i, (budget, slope) in enumerate(dict.fromkeys((r["budget"], r["slope"]) for r in schedules)):
        points = [(r["start"], r["KL"]) for r in schedules if (r["budget"], r["slope"]) == (budget, slope)]
        label = f"{budget:g} FLOPs, slope {slope:g}"
        axes[1].plot(*zip(*points, strict=True), marker="os"[i % 2], color=f"C{i}", label=label)
    axes[0].set_xticks(sorted({int(r["layers"]) for r in single}))
    axes[1].set_xticks(sorted({r["start"] for r in schedules}))
    axes[1].set(xlabel="first reducing block", ylabel="KL to the unpatched model", yscale="log")
    axes[1].set_title("schedules solved to the budget", fontsize=10)
    for axis in axes:
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
