"""Heal: label-free recovery of a patched model in minutes — the real ImageNet DeiT-T of ../shared.

    python benchmarks/heal.py                  # fold 1: heal on the even classes, evaluate on the odd (heal.*)
    python benchmarks/heal.py --swap-halves    # fold 2: the other way round (heal_swapped.*)
    python benchmarks/heal.py --tune           # how the defaults were chosen, calibration half only (heal_tuning.*)
    python benchmarks/heal.py --time-only      # the default heal alone (teacher=None) at 0.5 of the FLOPs (heal_time.*)
    python benchmarks/heal.py --quick          # a few images and steps, one budget (heal_quick.*, not committed)
    python benchmarks/heal.py --budgets 0.8,0.4 --stem heal_ends  # fold 1 at the two other budgets (heal_ends.*)

The 1000 ImageNet images of ../shared are split by class index (``tokenmerge_patch.data.split_by_class``). On the
**calibration half** (500 images, even classes): ``tm.calibrate`` picks the plan at each FLOPs budget from 256 of
them (as ``benchmarks/accuracy.py --imagenet`` does), and ``tm.heal`` trains on all 500 without their labels (it
holds every 8th out to choose the state it keeps). Every top-1 and agreement below is on the **evaluation half**
(500 images, odd classes), which neither calibration nor healing sees. At each budget: the calibrated plan off the
shelf and healed with each ``trainable`` setting, and ToMe (``method="bipartite"`` with ToMe's constant-r schedule,
as in ``accuracy.py``) off the shelf and healed with the defaults. ``heal s`` is the wall time of one ``heal`` call.

``--tune`` touches the calibration half only: its classes ``≡ 0 (mod 4)`` heal (250 images; calibration on them too)
and its classes ``≡ 2 (mod 4)`` score (250 images), for each recipe tried at 0.5 of the FLOPs. The defaults
of ``tm.heal`` come from this table; the evaluation half never decided anything.

``--time-only`` measures what a user's call costs: ``tm.heal(model, images)`` with every default (the teacher built
by heal itself) on the 500 calibration-half images, nothing else in the run. Every heal row records the machine's
1-minute load average before and after it: on a shared machine a heal's seconds are only a heal's on a quiet one.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

import tokenmerge_patch as tm
from tokenmerge_patch.budget import tome_keep_rates
from tokenmerge_patch.data import Split, evenly_spaced, load_imagenet, split_by_class, to_tensor_dataset
from tokenmerge_patch.evaluation import logits_of
from tokenmerge_patch.training.heal import DEFAULT_BATCH_SIZE, DEFAULT_LR, DEFAULT_STEPS

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import BudgetFit
from common import (
    IMAGENET_ARCH,
    IMAGENET_DIR,
    IMAGENET_MODEL,
    RESULTS,
    SHARED,
    load_imagenet_model,
    markdown_table,
    output_stem,
    parse_floats,
    pick_device,
    set_threads,
    write_outputs,
)

# what every healed row of the full run does, by name; tm.heal's defaults unless said
RECIPES: dict[str, dict] = {
    "norms": {},  # the default
    "all": {"trainable": "all"},
}
# the recipes --tune compares, each spelled out in full (tm.heal's keyword arguments), so that the table still says
# what was run when the defaults move; the first records the teacher's outputs for the others with the same views
TUNING: dict[str, dict] = {
    "norms, lr 2e-3, 120 steps": {"lr": 2e-3, "steps": 120},
    "norms, lr 1e-3, 120 steps": {"lr": 1e-3, "steps": 120},
    "norms, lr 5e-3, 120 steps": {"lr": 5e-3, "steps": 120},
    "norms, lr 2e-3, 60 steps": {"lr": 2e-3, "steps": 60},
    "norms, lr 2e-3, 120 steps, no augmentation": {"lr": 2e-3, "steps": 120, "augment": False},
    "norms+bias, lr 2e-3, 120 steps": {"trainable": "norms+bias", "lr": 2e-3, "steps": 120},
    "all, lr 3e-5, 120 steps": {"trainable": "all", "lr": 3e-5, "steps": 120},
}
TUNING = {name: {"trainable": "norms", "batch_size": 32, **recipe} for name, recipe in TUNING.items()}
# the two budgets whose goals the heal issue names (a heal and a ToMe heal per budget cost ~15 min on 2 cores);
# --budgets 0.8,0.4 --stem heal_ends adds the ends of the curve (committed); other --budgets write heal_quick.*
FULL = {"budgets": [0.65, 0.5], "eval_images": 500, "heal_images": 500, "calib_images": 256, "steps": None}
QUICK = {"budgets": [0.5], "eval_images": 50, "heal_images": 48, "calib_images": 32, "steps": 4}
TUNE = {"budgets": [0.5]}
TIME = {"budgets": [0.5]}
COLUMNS = ["budget", "plan", "healed", "FLOPs", "GFLOPs", "top-1 %", "Δ top-1", "agree %", "KL", "heal s",
           "s/step", "heal CPU s", "load", "steps", "kept step", "held-out agree before → after"]  # fmt: skip
CSV_COLUMNS = [*COLUMNS[:-1], "teacher cached", "held-out agree before", "held-out agree after",
               "held-out KL before", "held-out KL after", "trained", "calib s", "plan json"]  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few images and steps at one budget: heal_quick.*")
    parser.add_argument("--tune", action="store_true", help="compare recipes on the calibration half: heal_tuning.*")
    parser.add_argument("--time-only", action="store_true", help="the default heal alone, timed: heal_time.*")
    parser.add_argument("--swap-halves", action="store_true", help="heal on the odd classes, evaluate on the even")
    parser.add_argument("--budgets", default=None, help="FLOPs fractions (default 0.65,0.5; --tune: 0.5)")
    parser.add_argument("--eval-images", type=int, default=None, help="evaluation-half images (default 500)")
    parser.add_argument("--heal-images", type=int, default=None, help="calibration-half images heal sees (500)")
    parser.add_argument("--calib-images", type=int, default=None, help="of those, how many calibrate sees (256)")
    parser.add_argument("--steps", type=int, default=None, help="heal steps (default: heal's own default)")
    parser.add_argument("--recipes", default=None, help=f"for --tune: a subset of {', '.join(TUNING)}")
    parser.add_argument("--calib-block-runs", type=int, default=None, help="calibrate's max_block_runs")
    parser.add_argument("--model-dir", type=Path, default=IMAGENET_MODEL)
    parser.add_argument("--images", type=Path, default=IMAGENET_DIR)
    parser.add_argument("--batch-size", type=int, default=100, help="evaluation batch size")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default=None, help="cpu (measured here) or cuda (unmeasured: no GPU here)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--stem", default=None)
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    args = parser.parse_args(argv)
    if args.tune and args.time_only:
        parser.error("--tune and --time-only are two different runs")
    full_preset = dict(FULL, **TUNE) if args.tune else (dict(FULL, **TIME) if args.time_only else FULL)
    preset = QUICK if args.quick else full_preset
    args.budgets = parse_floats(args.budgets) if args.budgets else list(preset["budgets"])
    for key in ("eval_images", "heal_images", "calib_images", "steps"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    if args.recipes is not None:
        args.recipes = [name.strip() for name in args.recipes.split(";") if name.strip()]
        unknown = [name for name in args.recipes if name not in TUNING]
        if unknown:
            parser.error(f"unknown --recipes {unknown}; separate names with ';', choose from {list(TUNING)}")
    full = args.calib_block_runs is None and args.recipes is None
    full = full and all(getattr(args, key) == value for key, value in full_preset.items())
    name = "heal_tuning" if args.tune else ("heal_time" if args.time_only else "heal")
    name += "_swapped" if args.swap_halves else ""
    args.stem = output_stem(args.stem, name, full=full and not args.quick)
    return args


class CachedTeacher(nn.Module):
    """The unpatched model (what ``teacher=None`` builds), remembering its output for each view it saw. Every heal of
    a run draws the same views (same seed, images and batch size), so a heal that may ``reuse`` them pays for the
    student only; its accuracy is exactly an uncached heal's, its ``heal s`` is not a heal's time (the rows say
    which). A recording heal computes every output, as ``teacher=None`` would."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.cache, self.reuse = model.eval(), {}, False

    def forward(self, images: Tensor) -> Tensor:
        key = (tuple(images.shape), *(float(part.double().sum()) for part in (images, images[..., ::7, ::5] ** 2)))
        if not self.reuse or key not in self.cache:
            self.cache[key] = self.model(images)
        return self.cache[key]


class Bench:
    """The model, the images and the measurements every row shares."""

    def __init__(self, args: argparse.Namespace, heal_idx: list[int], score_idx: list[int], calib_idx: list[int]):
        self.args = args
        self.device = pick_device(args.device)
        self.base = load_imagenet_model(args.model_dir)
        dataset = load_imagenet(args.images, image_size=tuple(self.base.patch_embed.img_size))
        decode = dict(workers=args.workers, progress=args.progress)
        self.dataset = dataset
        self.heal_images = to_tensor_dataset(dataset, heal_idx, desc="decode heal images", **decode).tensors[0]
        position = {index: i for i, index in enumerate(heal_idx)}
        self.calib_images = self.heal_images[[position[i] for i in calib_idx]]
        self.images, self.labels = to_tensor_dataset(dataset, score_idx, desc="decode scored images", **decode).tensors
        self.input_size = (3, *self.base.patch_embed.img_size)
        self.fit = BudgetFit(copy.deepcopy(self.base), self.input_size)
        self.reference = self.logits(self.base, "unpatched")
        self.rows: list[dict] = []
        self.notes: list[str] = []  # what the table leaves out, and why
        self.teacher = CachedTeacher(copy.deepcopy(self.base))

    @torch.inference_mode()
    def logits(self, model: nn.Module, desc: str) -> Tensor:
        model.to(self.device).eval()
        chunks = self.images.split(self.args.batch_size)
        bar = tqdm(chunks, desc=desc, leave=False, disable=not self.args.progress)
        return torch.cat([logits_of(model(chunk.to(self.device))).float().cpu() for chunk in bar])

    def plan(self, budget: float) -> tuple[tm.PatchConfig, float]:
        model = copy.deepcopy(self.base).to(self.device)
        tick = time.perf_counter()
        plan = tm.calibrate(model, self.calib_images, flops=budget, images=len(self.calib_images),
                            max_block_runs=self.args.calib_block_runs, progress=self.args.progress)  # fmt: skip
        return plan, time.perf_counter() - tick

    def tome(self, budget: float) -> tuple[tm.PatchConfig, int, float]:
        """ToMe's plan for ``budget``: its config, its ``r`` and the FLOPs fraction it lands at (above ``budget`` when
        the largest ``r`` this model allows cannot reach it)."""
        fit = self.fit

        def apply(r: int) -> None:
            rates = tome_keep_rates(fit.num_tokens, fit.prefix, range(fit.depth), r)
            tm.patch(fit.model, range(fit.depth), rates, method="bipartite", prop_attn=True)

        r, _, fraction = fit.tome_r(budget, apply)
        return tm.patch_config(fit.model), r, fraction

    def row(self, budget: float, plan_name: str, config: tm.PatchConfig, healed: str, *, reuse: bool = False,
            own_teacher: bool = False, **heal_kwargs) -> dict:  # fmt: skip
        """Patch a fresh copy with ``config``, heal it (unless ``healed`` is ``"off the shelf"``; with ``reuse`` the
        teacher's outputs recorded by an earlier heal of the run are reused; with ``own_teacher`` heal builds its
        teacher itself, as a user's ``tm.heal(model, images)`` does), score it."""
        model = tm.patch(copy.deepcopy(self.base), config=config)
        flops = tm.count_flops(model, self.input_size).total
        report = None
        if healed != "off the shelf":
            model.to(self.device)
            self.teacher.reuse = reuse
            load = os.getloadavg()[0]
            cpu = time.process_time()
            report = tm.heal(model, self.heal_images, teacher=None if own_teacher else self.teacher,
                             device=self.device, progress=self.args.progress, **heal_kwargs)  # fmt: skip
            cpu = time.process_time() - cpu  # all threads of this process: on 2 free cores, wall time ~ cpu / 2
            load = f"{load:.1f} → {os.getloadavg()[0]:.1f}"
            after = tm.count_flops(model.cpu(), self.input_size).total
            assert tm.patch_config(model) == config and after == flops, "heal changed the plan or the FLOPs"
        logits = self.logits(model, f"{plan_name} {healed} @ {budget}")
        predictions = logits.argmax(-1)
        top1 = 100 * float((predictions == self.labels).float().mean())
        row = {
            "budget": budget,
            "plan": plan_name,
            "healed": healed,
            "FLOPs": flops / self.fit.flops.total,
            "GFLOPs": flops / 1e9,
            "top-1 %": top1,
            "Δ top-1": top1 - self.unpatched_top1,
            "agree %": 100 * float((predictions == self.reference.argmax(-1)).float().mean()),
            "KL": kl_divergence(self.reference, logits),
            "plan json": config.to_dict(),
        }
        if report is not None:
            row.update({
                "heal s": report.seconds, "heal CPU s": cpu, "steps": report.steps, "kept step": report.kept_step,
                "s/step": report.seconds / max(1, report.steps), "load": load, "teacher cached": reuse,
                "held-out agree before": 100 * report.agreement_before,
                "held-out agree after": 100 * report.agreement_after,
                "held-out KL before": report.divergence_before, "held-out KL after": report.divergence_after,
                "held-out agree before → after": f"{100 * report.agreement_before:.1f} → "
                f"{100 * report.agreement_after:.1f}",
                "trained": f"{report.trainable}: {len(report.trained)} tensors, {report.trained_parameters} numbers",
            })  # fmt: skip
            if reuse:  # not a heal's time: the teacher's outputs were reused
                row["heal s"] = row["heal CPU s"] = row["s/step"] = None
        self.rows.append(row)
        print(
            f"{budget:<5} {plan_name:<11} {healed:<28} FLOPs {row['FLOPs']:.3f} top-1 {top1:6.2f} % agree "
            f"{row['agree %']:6.2f} % KL {row['KL']:.4f}" + ("" if report is None else f"  | {report}"),
            flush=True,
        )
        return row

    @property
    def unpatched_top1(self) -> float:
        return 100 * float((self.reference.argmax(-1) == self.labels).float().mean())


def kl_divergence(reference: Tensor, logits: Tensor) -> float:
    """Mean KL(reference || model) per image, of the class probabilities."""
    log_p, log_q = reference.log_softmax(-1), logits.log_softmax(-1)
    return float((log_p.exp() * (log_p - log_q)).sum(-1).mean())


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if not (args.model_dir / "model.safetensors").is_file() or not args.images.is_dir():
        raise SystemExit(f"the ImageNet model or images are not there ({SHARED}): benchmarks/heal.py needs ../shared")
    started = time.perf_counter()
    threads = set_threads(args.threads)
    targets = load_imagenet(args.images).targets
    split = split_by_class(targets)
    if args.swap_halves:
        split = Split(calibration=split.evaluation, evaluation=split.calibration)
    if args.tune:  # the calibration half only: one quarter of the classes heals, the other scores
        heal_idx = [i for i in split.calibration if targets[i] % 4 == (1 if args.swap_halves else 0)]
        score_idx = [i for i in split.calibration if i not in set(heal_idx)]
        calib_idx = evenly_spaced(heal_idx, args.calib_images)
    else:
        heal_idx = evenly_spaced(split.calibration, args.heal_images)
        score_idx = evenly_spaced(split.evaluation, args.eval_images)
        calib_idx = evenly_spaced(heal_idx, args.calib_images)
    bench = Bench(args, heal_idx, score_idx, calib_idx)
    bench.rows.append({"budget": None, "plan": "unpatched", "healed": "", "FLOPs": 1.0,
                       "GFLOPs": bench.fit.flops.total / 1e9, "top-1 %": bench.unpatched_top1, "Δ top-1": 0.0,
                       "agree %": 100.0, "KL": 0.0})  # fmt: skip
    steps = {} if args.steps is None else {"steps": args.steps}
    for budget in args.budgets:
        plan, calib_s = bench.plan(budget)
        bench.row(budget, "calibrated", plan, "off the shelf")["calib s"] = calib_s
        if args.time_only:  # a user's call: every default, the teacher built by heal
            bench.row(budget, "calibrated", plan, "norms", own_teacher=True, **steps)
            continue
        if args.tune:  # the first recipe records the teacher's outputs, the others reuse them (same views)
            for index, name in enumerate(args.recipes or TUNING):
                bench.row(budget, "calibrated", plan, name, reuse=index > 0, **{**TUNING[name], **steps})
            continue
        # the default heal (its time is a heal's) records the teacher's outputs; the other rows reuse them
        for name, recipe in RECIPES.items():
            bench.row(budget, "calibrated", plan, name, reuse=name != "norms", **steps, **recipe)
            if args.quick:
                break
        tome, r, fraction = bench.tome(budget)
        if fraction > budget + 0.01:  # a constant r merges at most (patches - 1) / depth tokens a block
            bench.notes.append(
                f"ToMe's constant-r schedule cannot reach {budget:g} of the FLOPs on this model (r = {r} is the "
                f"largest, {fraction:.3f}): no ToMe rows at {budget:g}."
            )
            continue
        bench.row(budget, f"ToMe r={r}", tome, "off the shelf")
        bench.row(budget, f"ToMe r={r}", tome, "norms", reuse=not args.quick, **steps)
    total = time.perf_counter() - started
    write(args, bench, threads, total)
    return bench.rows


def write(args: argparse.Namespace, bench: Bench, threads: int, total: float) -> None:
    rows = bench.rows
    fold = "odd classes heal, even classes evaluate" if args.swap_halves else "even classes heal, odd classes evaluate"
    if args.tune:
        what = (f"Tuning on the calibration half only ({'odd' if args.swap_halves else 'even'} classes): classes "
                f"≡ {'1' if args.swap_halves else '0'} (mod 4) heal and calibrate ({len(bench.heal_images)} images), "
                f"the other {len(bench.images)} score; the evaluation half is not read.")  # fmt: skip
    else:
        what = (
            f"{fold}: heal sees {len(bench.heal_images)} images without labels (calibrate "
            f"{len(bench.calib_images)} of them), every top-1 and agreement is on {len(bench.images)} images "
            "neither saw."
        )
    lines = [
        f"## Heal on the real ImageNet {IMAGENET_ARCH}",
        "",
        f"{what} tm.heal's defaults (trainable='norms', lr {DEFAULT_LR['norms']:g} (all: {DEFAULT_LR['all']:g}), "
        f"function matching on crops, flips, mixup/cutmix, batch {DEFAULT_BATCH_SIZE}, {DEFAULT_STEPS} steps) unless "
        f"the row says otherwise{'' if args.steps is None else f'; {args.steps} steps'}. **agree %**: images whose "
        "top-1 is "
        "the unpatched model's; **KL**: mean KL divergence of the class probabilities from the unpatched model's; "
        "**held-out agree**: heal's own check on its held-out images (every 8th, which also chose the state it kept). "
        "**heal s**: wall time of the heal call (**s/step**: divided by its steps, checks and teacher included); "
        "**heal CPU s**: CPU time of this process during it (all threads); **load**: the machine's 1-minute load "
        "average before → after the heal (other jobs included; about the thread count when the machine is quiet). "
        "Times are empty where the heal reused the teacher's outputs recorded by the first heal of the same run "
        "(same views: its accuracy is exactly an uncached heal's, its time is not a heal's).",
        "",
        markdown_table(
            rows,
            COLUMNS,
            {
                "KL": "{:.4f}",
                "budget": "{:.2f}",
                "FLOPs": "{:.3f}",
                "GFLOPs": "{:.3f}",
                "top-1 %": "{:.2f}",
                "Δ top-1": "{:+.2f}",
                "agree %": "{:.2f}",
                "heal s": "{:.0f}",
                "s/step": "{:.2f}",
                "heal CPU s": "{:.0f}",
            },
        ),
        "",
        *[f"{note}\n" for note in bench.notes],
        f"Device {bench.device.type}, {threads} threads (a shared machine: other jobs ran beside this one); whole run "
        f"{total:.0f} s ({total / 60:.1f} min).",
    ]
    text = "\n".join(lines)
    print(text)
    write_outputs(args.out, args.stem, rows, CSV_COLUMNS, text)
    plot(rows, args.out / f"{args.stem}.png", tune=args.tune)


def plot(rows: Sequence[dict], path: Path, *, tune: bool) -> None:
    """Top-1 (left) and agreement with the unpatched model (right) against GFLOPs, one line per plan x healing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    base = rows[0]
    curves: dict[str, list[tuple[float, float, float]]] = {}
    for row in rows[1:]:
        label = f"{'ToMe' if row['plan'].startswith('ToMe') else 'calibrated'}, {row['healed']}"
        curves.setdefault(label, []).append((row["GFLOPs"], row["top-1 %"], row["agree %"]))
    for axis, index, title in ((axes[0], 1, "top-1 %"), (axes[1], 2, "agreement with unpatched %")):
        axis.axhline(base["top-1 %" if index == 1 else "agree %"], color="k", linestyle=":", label="unpatched")
        for i, (label, points) in enumerate(curves.items()):
            points = sorted(points)
            style = "--" if label.startswith("ToMe") else "-"
            axis.plot([p[0] for p in points], [p[index] for p in points], style, marker="os^vD<>*"[i % 8],
                      color=f"C{i}", label=label)  # fmt: skip
        axis.set(xlabel="GFLOPs per image (fvcore)", ylabel=title)
        axis.grid(alpha=0.3)
    axes[0].set_title(f"{IMAGENET_ARCH}: healed {'(tuning, calibration half)' if tune else ''}", fontsize=10)
    axes[0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
