"""Do eager PyTorch, ``torch.compile`` and ONNX Runtime give the same outputs for a patched model? Per image, on
real images, and where a disagreement starts.

    python benchmarks/runtime_agreement.py           # 1000 images, 4 plans and unpatched (about 2 h on 2 cores)
    python benchmarks/runtime_agreement.py --quick   # 16 images, keep_rate=0.7, eager only: runtime_agreement_quick.*
    python benchmarks/runtime_agreement.py --resume  # a run that stopped: keep what its files hold, run the rest

(On a shared machine, ``OMP_WAIT_POLICY=PASSIVE`` keeps PyTorch's idle threads from spinning in the 2-thread runs; it
changes their speed, not their results.)

The real DeiT-T of ../shared/models/deit_tiny_in1k on the 1000 ImageNet images of ../shared (resize 256 bicubic,
centre crop 224, ImageNet mean/std), unpatched and patched with each plan, runs in every setting: eager PyTorch on 1
and 2 intra-op threads, ``torch.compile`` (2 threads), and ONNX Runtime on the file ``tm.export_onnx`` writes, on 1
and 2 intra-op threads; each at batch 1 and 16 (a last partial batch is padded, so every image runs in a batch of
that size). The reference is eager, 1 thread, batch 16. Per setting and image: the largest absolute logit
difference from the reference, whether it is over 1e-4, whether the top-1 class changes; and the same setting run
a second time (``repeat``: a runtime that is not deterministic shows here).

**Where a disagreement starts.** Every run also returns what each reducing block decided: which patch tokens it
kept (``keep_index``) and which token every original patch ended in (the source map). The first reducing block
whose decisions differ from the reference's is where the runs part; ``selection`` if the crucial set differs,
``assignment`` if only where a merged token went does. The reference's **margin** for that decision says how close
to a tie it was: for a selection, the relative spread of the class-attention scores of the tokens that swapped
(``(max - min) / max``; for ``bipartite``, of their best-match similarities); for an assignment, the cosine gap
between the token's best and second-best target (``bipartite``: best and second-best B token).

**Tie rules** (second table, eager only): would ranking by scores rounded to a relative grid (``bits`` significant
bits, a step of ``2**-bits`` to ``2**(1 - bits)`` of the value; ties to the lower index; similarities likewise, ties
to the lower target) keep decisions from changing under small perturbations? Each rule runs on clean images and on
perturbed ones: batch 1 instead of 16 (the kernels' own rounding), and Gaussian input noise of std ``sigma`` (in
normalised pixels). Counted: images whose decisions change, how far the logits move (median: the smooth response to
the perturbation; largest: where a decision changed), and the accuracy of the rule on clean images (top-1 on both
halves of the classes, agreement with the unpatched model; nothing is fitted, so both halves are held out).

Results are written after every plan. ``--resume`` reads the ``{stem}.csv`` and ``.md`` a stopped run of the same
settings wrote, keeps every plan (and tie-rule plan) they hold and measures only the others; the files then say so.

Writes ``runtime_agreement.{csv,md,png}`` for the full run; ``--quick`` or any other setting writes
``runtime_agreement_quick.*`` unless ``--stem`` names the files.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import io
import math
import re
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

import tokenmerge_patch as tm
from tokenmerge_patch.budget import tome_keep_rates
from tokenmerge_patch.data import evenly_spaced, load_imagenet, split_by_class, to_tensor_dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    IMAGENET_DIR,
    IMAGENET_MODEL,
    RESULTS,
    load_imagenet_model,
    markdown_table,
    output_stem,
    parse_floats,
    parse_ints,
    write_outputs,
)

PATCH_MODULE = sys.modules["tokenmerge_patch.patch"]  # where TokenMergeState.reduce looks reduce_tokens up
REDUCE_MODULE = sys.modules["tokenmerge_patch.reduce"]  # where reduce_tokens looks its parts up

PLANS: dict[str, dict | None] = {
    "unpatched": None,
    "flops=0.5": dict(flops=0.5),
    "flops=0.65": dict(flops=0.65),
    "keep_rate=0.7": dict(keep_rate=0.7),
    # ToMe's schedule at half the FLOPs (0.498; benchmarks/accuracy.py --imagenet): r=16 tokens merged in every block
    "ToMe r=16": dict(
        layers=list(range(12)), keep_rate=list(tome_keep_rates(197, 1, range(12), 16)), method="bipartite"
    ),
}
RUNTIMES = ("eager", "compile", "onnxruntime")
THREADS = {"eager": (1, 2), "compile": (2,), "onnxruntime": (1, 2)}
REFERENCE = ("eager", 1, 16)
TOLERANCE = 1e-4
FULL = dict(
    images=None,
    plans=list(PLANS),
    runtimes=list(RUNTIMES),
    batch_sizes=[1, 16],
    rule_plans=["flops=0.5", "flops=0.65"],
    rule_bits=[16, 10],
    sigmas=[1e-6, 1e-5, 1e-4],
)
QUICK = dict(
    images=16,
    plans=["keep_rate=0.7"],
    runtimes=["eager"],
    batch_sizes=[1, 16],
    rule_plans=["keep_rate=0.7"],
    rule_bits=[10],
    sigmas=[1e-4],
)
COLUMNS = [
    "plan",
    "runtime",
    "threads",
    "batch",
    "images",
    "median |Δ|",
    "max |Δ|",
    f"> {TOLERANCE:g}",
    f"> {TOLERANCE:g} %",
    "top-1 changed",
    "decisions differ",
    "selection",
    "assignment",
    "first blocks",
    "largest margin",
    "repeat |Δ|",
]
RULE_COLUMNS = [
    "plan",
    "rule",
    "perturbation",
    "images",
    "decisions differ",
    "differ %",
    "median |Δ|",
    "max |Δ|",
    "top-1",
]
ACCURACY_COLUMNS = ["plan", "rule", "top-1 % (odd classes)", "top-1 % (even classes)", "agree %"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="16 images, keep_rate=0.7, eager only")
    parser.add_argument("--images", type=int, default=None, help="evenly spaced over the 1000 (default: all)")
    parser.add_argument("--plans", default=None, help=f"comma-separated subset of {','.join(PLANS)}")
    parser.add_argument("--runtimes", default=None, help=f"comma-separated subset of {','.join(RUNTIMES)}")
    parser.add_argument("--batch-sizes", type=parse_ints, default=None)
    parser.add_argument("--rule-plans", default=None, help="plans of the tie-rule table ('' for none)")
    parser.add_argument("--rule-bits", type=parse_ints, default=None, help="significant bits of each rounded rule")
    parser.add_argument("--sigmas", type=parse_floats, default=None, help="input noise std of the tie-rule table")
    parser.add_argument("--model-dir", type=Path, default=IMAGENET_MODEL)
    parser.add_argument("--data", type=Path, default=IMAGENET_DIR)
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--stem", default=None, help="output file stem (default runtime_agreement, or *_quick)")
    parser.add_argument(
        "--resume", action="store_true", help="keep the plans a stopped run of these settings wrote, run the rest"
    )
    args = parser.parse_args(argv)
    preset = QUICK if args.quick else FULL
    args.images = args.images if args.images is not None else preset["images"]
    for key in ("plans", "runtimes", "rule_plans"):
        value = getattr(args, key)
        setattr(args, key, [v for v in value.split(",") if v] if value is not None else list(preset[key]))
    for key in ("batch_sizes", "rule_bits", "sigmas"):
        if getattr(args, key) is None:
            setattr(args, key, list(preset[key]))
    unknown = [p for p in args.plans + args.rule_plans if p not in PLANS] + [
        r for r in args.runtimes if r not in RUNTIMES
    ]
    if unknown:
        parser.error(f"unknown plans or runtimes {unknown}; plans: {list(PLANS)}, runtimes: {list(RUNTIMES)}")
    if [p for p in args.rule_plans if PLANS[p] is None or PLANS[p].get("method", "merge") != "merge"]:
        parser.error("--rule-plans: the tie rules replace merge's selection and assignment; give merge plans")
    chosen = {key: getattr(args, key) for key in FULL}
    defaults = (args.model_dir, args.data) == (IMAGENET_MODEL, IMAGENET_DIR)
    args.full = not args.quick and chosen == FULL and defaults
    args.stem = output_stem(args.stem, "runtime_agreement", full=args.full)
    return args


# -- what each reducing block decided ---------------------------------------------------------------------------
@dataclass
class Run:
    """One setting's pass over the images: logits, and per reducing block ``(keep_index, source)`` for every image;
    ``margins`` (reference only) per block ``(selection values, assignment gaps, cut)``: see
    :func:`decision_margins`."""

    logits: Tensor
    blocks: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    margins: list[tuple[Tensor, Tensor, int]] = field(default_factory=list)


@contextlib.contextmanager
def recording(log: list, margins: list | None = None) -> Iterator[None]:
    """While open, every reduction appends its ``(keep_index, source)`` to ``log`` (and, with ``margins``, what the
    reference's margins are computed from). Tensors traced under ``torch.export`` or ``torch.compile`` are recorded
    as they are: a wrapper returns them as extra outputs."""
    real = PATCH_MODULE.reduce_tokens

    def reduce_and_record(*args, **kwargs):
        out = real(*args, **kwargs)
        log.append((out.keep_index, out.source))
        if margins is not None:
            margins.append(decision_margins(out, *args, **kwargs))
        return out

    PATCH_MODULE.reduce_tokens = reduce_and_record
    try:
        yield
    finally:
        PATCH_MODULE.reduce_tokens = real


class Decisions(nn.Module):
    """``model`` returning its logits and then, per reducing block, ``keep_index`` and the source map: one graph to
    export or compile, whose extra outputs are the decisions the plain graph takes."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        log: list[tuple[Tensor, Tensor]] = []
        with recording(log):
            logits = self.model(x)
        return (logits, *[t for pair in log for t in pair])


def decision_margins(out, x: Tensor, q: Tensor, k: Tensor, scale: float, **options) -> tuple[Tensor, Tensor, int]:
    """What the margins of one reduction's decisions are computed from, in the reference: the value each
    selection ranks (merge, drop, fuse: class-attention scores ``[B, N_patch]``; bipartite: each A token's best
    similarity ``[B, |A|]``), each assignment's gap between its best and second-best target (merge with cosine
    similarity: ``[B, N_patch]``, NaN for crucial tokens; bipartite: ``[B, |A|]``; otherwise NaN), and how many of
    the highest values the selection takes (the crucial tokens; bipartite: the A tokens that merge)."""
    prefix, method = options["num_prefix"], options.get("method", "merge")
    batch, patches = x.shape[0], x.shape[1] - prefix
    keep = out.keep_index
    if method == "bipartite":
        metric = F.normalize(k.mean(dim=1)[:, prefix:].float(), dim=-1)
        first_a = prefix % 2
        similarity = metric[:, first_a::2] @ metric[:, 1 - first_a :: 2].transpose(1, 2)
        top = similarity.topk(2, dim=-1).values
        return top[..., 0], top[..., 0] - top[..., 1], patches - keep.shape[1]
    scores = REDUCE_MODULE.class_attention(q, k, scale, options.get("attn_bias"))[:, prefix:]
    gaps = torch.full((batch, patches), math.nan)
    if method == "merge" and options.get("similarity", "cosine") == "cosine" and keep.shape[1] < patches:
        crucial = torch.zeros(batch, patches, dtype=torch.bool).scatter(1, keep, True)
        rest = (~crucial).nonzero()[:, 1].view(batch, -1)
        tokens = REDUCE_MODULE.gather_tokens(x, rest + prefix).float()
        targets = F.normalize(REDUCE_MODULE.gather_tokens(x, keep + prefix).float(), dim=-1)
        cosine = (tokens @ targets.transpose(1, 2)) / tokens.norm(dim=-1, keepdim=True)
        if keep.shape[1] > 1:
            top = cosine.topk(2, dim=-1).values
            gaps.scatter_(1, rest, top[..., 0] - top[..., 1])
        else:
            gaps.scatter_(1, rest, math.inf)  # one target: nothing to choose
    return scores, gaps, keep.shape[1]


def divergence(reference: Run, other: Run, prefix: int, method: str) -> list[tuple[int, str, float] | None]:
    """Per image: ``None`` if every reducing block decided as in the reference, else ``(block position, kind,
    reference margin)`` of the first block that did not (see the module docstring)."""
    found: list[tuple[int, str, float] | None] = [None] * reference.logits.shape[0]
    previous_source = None
    for j, ((keep, source), (other_keep, other_source)) in enumerate(zip(reference.blocks, other.blocks, strict=True)):
        keep_differs = (keep != other_keep).any(dim=1)
        source_differs = (source != other_source).any(dim=1)
        for i in torch.nonzero(keep_differs | source_differs).flatten().tolist():
            if found[i] is not None:
                continue
            values, gaps, _ = reference.margins[j]
            if keep_differs[i]:
                swapped = set(keep[i].tolist()) ^ set(other_keep[i].tolist())
                if method == "bipartite":  # only A tokens (patch positions of A's parity) are chosen among
                    swapped = {(p - prefix % 2) // 2 for p in swapped if p % 2 == prefix % 2}
                chosen = values[i, sorted(swapped)]
                found[i] = (j, "selection", float((chosen.max() - chosen.min()) / chosen.abs().max()))
            else:
                moved = (source[i] != other_source[i]).nonzero().flatten()
                # the block's input token each moved patch sat in: the previous reducing block's output
                tokens = moved if previous_source is None else previous_source[i, moved] - prefix
                if method == "bipartite":
                    tokens = (tokens - prefix % 2) // 2
                found[i] = (j, "assignment", float(gaps[i, tokens.unique()].max()))
        previous_source = source
    return found


# -- runtimes ------------------------------------------------------------------------------------------------------
def batches(images: Tensor, batch: int) -> Iterator[tuple[Tensor, int]]:
    """``images`` in batches of exactly ``batch`` (the last one padded with its last image) and how many are real."""
    for start in range(0, images.shape[0], batch):
        chunk = images[start : start + batch]
        real = chunk.shape[0]
        if real < batch:
            chunk = torch.cat([chunk, chunk[-1:].expand(batch - real, *chunk.shape[1:])])
        yield chunk, real


def collect(outputs: list[tuple[Sequence, int]]) -> Run:
    """A Run from per-batch ``(logits, keep, source, keep, source, ...)`` outputs and their real image counts."""
    columns = [torch.cat([torch.as_tensor(o[c])[:real] for o, real in outputs]) for c in range(len(outputs[0][0]))]
    blocks = [(columns[c], columns[c + 1]) for c in range(1, len(columns), 2)]
    return Run(columns[0].float(), blocks)


def eager_runner(model: nn.Module, threads: int) -> Callable[[Tensor], Sequence]:
    wrapped = Decisions(model)

    def run(chunk: Tensor) -> Sequence:
        torch.set_num_threads(threads)
        with torch.inference_mode():
            return wrapped(chunk)

    return run


def compile_runner(model: nn.Module, threads: int, instrumented: bool = True) -> Callable[[Tensor], Sequence]:
    torch.set_num_threads(threads)
    torch._dynamo.reset()  # every plan and batch size compiles afresh, never past dynamo's recompile limit
    compiled = torch.compile(Decisions(model) if instrumented else _LogitsOnly(model), dynamic=False)

    def run(chunk: Tensor) -> Sequence:
        torch.set_num_threads(threads)
        with torch.inference_mode():
            return compiled(chunk)

    return run


class _LogitsOnly(nn.Module):
    """The plain model, returning a one-element tuple like :class:`Decisions` does."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> tuple[Tensor]:
        return (self.model(x),)


def export_onnx_quietly(model: nn.Module, path: Path, example: Tensor, **options) -> None:
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        tm.export_onnx(model, path, example, **options)


def onnx_runner(path: Path, threads: int) -> Callable[[Tensor], Sequence]:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # a shared machine: no busy waiting
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda chunk: session.run(None, {name: chunk.numpy()})


def run_all(run: Callable[[Tensor], Sequence], images: Tensor, batch: int, desc: str) -> Run:
    outputs = []
    for chunk, real in tqdm(list(batches(images, batch)), desc=desc, leave=False):
        outputs.append((run(chunk), real))
    return collect(outputs)


def reference_run(model: nn.Module, images: Tensor, batch: int = 16, threads: int = 1) -> Run:
    """Eager, with the margins of every decision."""
    torch.set_num_threads(threads)
    logits, blocks, margins = [], [], []
    with torch.inference_mode():
        for chunk, real in tqdm(list(batches(images, batch)), desc="reference", leave=False):
            log, margin = [], []
            with recording(log, margin):
                logits.append(model(chunk)[:real])
            blocks.append([(keep[:real], source[:real]) for keep, source in log])
            margins.append([(values[:real], gaps[:real], cut) for values, gaps, cut in margin])
    per_block = list(zip(*blocks, strict=True)) if blocks and blocks[0] else []
    margin_blocks = list(zip(*margins, strict=True)) if margins and margins[0] else []
    run = Run(torch.cat(logits).float())
    run.blocks = [(torch.cat([k for k, _ in b]), torch.cat([s for _, s in b])) for b in per_block]
    run.margins = [(torch.cat([v for v, _, _ in b]), torch.cat([g for _, g, _ in b]), b[0][2]) for b in margin_blocks]
    return run


# -- the comparison ----------------------------------------------------------------------------------------------
def compare(plan: str, setting: tuple, reference: Run, run: Run, repeat: Run | None, model: nn.Module) -> dict:
    runtime, threads, batch = setting
    difference = (run.logits - reference.logits).abs().amax(dim=1)
    over = int((difference > TOLERANCE).sum())
    row = {
        "plan": plan,
        "runtime": runtime,
        "threads": threads,
        "batch": batch,
        "images": len(difference),
        "median |Δ|": float(difference.median()),
        "max |Δ|": float(difference.max()),
        f"> {TOLERANCE:g}": over,
        f"> {TOLERANCE:g} %": 100 * over / len(difference),
        "top-1 changed": int((run.logits.argmax(1) != reference.logits.argmax(1)).sum()),
        "repeat |Δ|": None if repeat is None else float((repeat.logits - run.logits).abs().max()),
        "differences": difference,
        "top-1 flags": run.logits.argmax(1) != reference.logits.argmax(1),
    }
    config = tm.patch_config(model)
    if config is None:
        return row
    found = divergence(reference, run, model.num_prefix_tokens, config.method)
    differ = [f for f in found if f is not None]
    layers = list(config.layers)
    row.update(
        {
            "decisions differ": len(differ),
            "selection": sum(kind == "selection" for _, kind, _ in differ),
            "assignment": sum(kind == "assignment" for _, kind, _ in differ),
            "first blocks": ",".join(str(layers[j]) for j in sorted({j for j, _, _ in differ})),
            "largest margin": max((margin for _, _, margin in differ), default=None),
            # every image over the tolerance must be one whose decisions differ (checked in main)
            "unexplained": int(sum(1 for i, f in enumerate(found) if f is None and difference[i] > TOLERANCE)),
            "found": found,
            "layers": layers,
        }
    )
    return row


def margin_summary(plan: str, reference: Run) -> dict:
    """How close to ties the reference's decisions come, over every image and reducing block: the relative gap
    between the last value a selection takes and the first it leaves, and each assignment's gap between its best
    and second-best target."""
    cuts, gaps = [], []
    for values, gap, cut in reference.margins:
        ranked = values.sort(dim=1, descending=True).values
        if 0 < cut < ranked.shape[1]:
            cuts.append((ranked[:, cut - 1] - ranked[:, cut]) / ranked[:, cut - 1].abs())
        gaps.append(gap[torch.isfinite(gap)])
    cut, gap = torch.cat(cuts) if cuts else torch.empty(0), torch.cat(gaps) if gaps else torch.empty(0)
    return {
        "plan": plan,
        "selections": len(cut),
        "cut gap median": float(cut.median()) if len(cut) else None,
        "cut gap < 1e-5": int((cut < 1e-5).sum()),
        "smallest cut gap": float(cut.min()) if len(cut) else None,
        "assignments": len(gap),
        "assignment gap median": float(gap.median()) if len(gap) else None,
        "assignment gap < 1e-5": int((gap < 1e-5).sum()),
        "smallest assignment gap": float(gap.min()) if len(gap) else None,
    }


MARGIN_COLUMNS = [
    "plan",
    "selections",
    "cut gap median",
    "cut gap < 1e-5",
    "smallest cut gap",
    "assignments",
    "assignment gap median",
    "assignment gap < 1e-5",
    "smallest assignment gap",
]


# -- tie rules ------------------------------------------------------------------------------------------------------
def rounded(values: Tensor, bits: int) -> Tensor:
    """``values`` rounded to ``bits`` significant bits: a relative grid, its step ``2**-bits`` to ``2**(1 - bits)``
    of the value.

    >>> rounded(torch.tensor([1.0, 1.2, 1.26, -0.3]), 3)
    tensor([ 1.0000,  1.2500,  1.2500, -0.3125])
    """
    mantissa, exponent = torch.frexp(values)  # values = mantissa * 2**exponent, 0.5 <= |mantissa| < 1
    return torch.ldexp(torch.round(mantissa * 2**bits) / 2**bits, exponent)


@contextlib.contextmanager
def tie_rule(bits: int | None) -> Iterator[None]:
    """While open, merge ranks scores rounded to ``bits`` significant bits (equal ones: the lower index first, the
    library's stable order) and assigns by similarities rounded alike (equal ones: the lower target, ``argmax``'s
    first maximum). ``None``: the library's rule, exact values."""
    if bits is None:
        yield
        return
    split, assign = REDUCE_MODULE.split_crucial, REDUCE_MODULE.cosine_assignment

    def split_rounded(scores: Tensor, keep: int) -> tuple[Tensor, Tensor]:
        return split(rounded(scores, bits), keep)

    def assign_rounded(tokens: Tensor, targets: Tensor) -> Tensor:
        return rounded(tokens @ F.normalize(targets, dim=-1).transpose(1, 2), bits).argmax(dim=-1)

    REDUCE_MODULE.split_crucial, REDUCE_MODULE.cosine_assignment = split_rounded, assign_rounded
    try:
        yield
    finally:
        REDUCE_MODULE.split_crucial, REDUCE_MODULE.cosine_assignment = split, assign


def tie_rule_table(
    plan: str, model: nn.Module, images: Tensor, labels: Tensor, unpatched: Tensor, args: argparse.Namespace
) -> tuple[list[dict], list[dict]]:
    """The tie-rule table for one merge plan: per rule, decisions under each perturbation against clean images, and
    the rule's accuracy on clean images."""
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(images.shape, generator=generator)
    run = eager_runner(model, 1)
    halves = split_by_class(labels)
    rows, accuracy = [], []
    for bits in [None, *args.rule_bits]:
        name = "exact (the library)" if bits is None else f"rounded to 2^-{bits}"
        with tie_rule(bits):
            clean = run_all(run, images, 16, f"{plan}, {name}")
            perturbed = {"batch 1": run_all(run, images, 1, f"{plan}, {name}, batch 1")}
            for sigma in args.sigmas:
                perturbed[f"sigma={sigma:g}"] = run_all(run, images + sigma * noise, 16, f"{name}, sigma {sigma:g}")
        top1 = clean.logits.argmax(1)
        accuracy.append(
            {
                "plan": plan,
                "rule": name,
                "top-1 % (odd classes)": 100 * float((top1 == labels)[halves.evaluation].float().mean()),
                "top-1 % (even classes)": 100 * float((top1 == labels)[halves.calibration].float().mean()),
                "agree %": 100 * float((top1 == unpatched.argmax(1)).float().mean()),
            }
        )
        for perturbation, other in perturbed.items():
            differ = torch.zeros(len(images), dtype=torch.bool)
            for (keep, source), (other_keep, other_source) in zip(clean.blocks, other.blocks, strict=True):
                differ |= (keep != other_keep).any(dim=1) | (source != other_source).any(dim=1)
            difference = (other.logits - clean.logits).abs().amax(dim=1)
            rows.append(
                {
                    "plan": plan,
                    "rule": name,
                    "perturbation": perturbation,
                    "images": len(images),
                    "decisions differ": int(differ.sum()),
                    "differ %": 100 * float(differ.float().mean()),
                    "median |Δ|": float(difference.median()),
                    "max |Δ|": float(difference.max()),
                    "top-1": int((other.logits.argmax(1) != top1).sum()),
                }
            )
            tqdm.write(f"tie rule {plan}, {name}, {perturbation}: decisions differ on {int(differ.sum())} images")
    return rows, accuracy


# -- main ------------------------------------------------------------------------------------------------------------
def settings(args: argparse.Namespace) -> list[tuple[str, int, int]]:
    every = [(r, t, b) for r in args.runtimes for t in THREADS[r] for b in args.batch_sizes]
    return [s for s in every if s != REFERENCE]


def measure_plan(
    plan: str, base: nn.Module, images: Tensor, args: argparse.Namespace, folder: Path
) -> tuple[list[dict], dict | None, dict[str, float]]:
    """Every setting against the reference for one plan: its rows, the reference's margins, and per compiled or
    exported runtime the largest logit difference between the graph that returns the decisions and the plain one
    (2 threads, batch 16, the first 64 images)."""
    model = copy.deepcopy(base)
    if PLANS[plan] is not None:
        tm.patch(model, **PLANS[plan])
    reference = reference_run(model, images)
    rows, exported = [], None
    for setting in tqdm(settings(args), desc=plan, leave=False):
        runtime, threads, batch = setting
        if runtime == "eager":
            run = eager_runner(model, threads)
        elif runtime == "compile":
            run = compile_runner(model, threads)
        else:
            if exported is None:
                exported = folder / f"{plan.replace(' ', '_')}.onnx"
                export_onnx_quietly(Decisions(model).eval(), exported, images[:1])
            run = onnx_runner(exported, threads)
        desc = f"{plan}: {runtime}, {threads} threads, batch {batch}"
        first = run_all(run, images, batch, desc)
        repeat = run_all(run, images, batch, desc + ", again") if (threads, batch) == (2, 16) else None
        row = compare(plan, setting, reference, first, repeat, model)
        rows.append(row)
        tqdm.write(
            f"{desc}: median {row['median |Δ|']:.2e}, > {TOLERANCE:g} on {row[f'> {TOLERANCE:g}']}, top-1 changed "
            f"{row['top-1 changed']}, decisions differ on {row.get('decisions differ', '-')}"
        )
    # the decisions come from graphs that also return them: their logits must be the plain graphs'
    subset, checks = images[:64], {}
    if "compile" in args.runtimes:
        plain = run_all(compile_runner(model, 2, instrumented=False), subset, 16, "check").logits
        instrumented = run_all(compile_runner(model, 2), subset, 16, "check").logits
        checks["compile"] = float((plain - instrumented).abs().max())
    if exported is not None:
        plain = folder / "plain.onnx"
        export_onnx_quietly(model, plain, images[:1])
        outputs = [run_all(onnx_runner(path, 2), subset, 16, "check").logits for path in (plain, exported)]
        checks["onnxruntime"] = float((outputs[0] - outputs[1]).abs().max())
    return rows, None if tm.patch_config(model) is None else margin_summary(plan, reference), checks


def divergent_images(rows: list[dict], labels: Tensor, names: list[str], files: list[str]) -> list[dict]:
    """One line per (plan, image) whose decisions differ from the reference's in some setting; ``files``: each
    image's file name."""
    lines: dict[tuple[str, int], dict] = {}
    for row in rows:
        layers = row.get("layers", [])
        for i, found in enumerate(row.get("found", [])):
            if found is None:
                continue
            j, kind, margin = found
            first = {"plan": row["plan"], "image": files[i], "class": names[int(labels[i])], "max |Δ|": 0.0}
            line = lines.setdefault((row["plan"], i), {**first, "settings": []})
            line["settings"].append(f"{row['runtime']} {row['threads']}t b{row['batch']}")
            line.update({"first block": layers[j], "kind": kind, "margin": margin})
            line["max |Δ|"] = max(line["max |Δ|"], float(row["differences"][i]))
            line["top-1 changed"] = line.get("top-1 changed", False) or bool(row["top-1 flags"][i])
    for line in lines.values():
        line["settings"] = "; ".join(line["settings"])
    return list(lines.values())


DIVERGENT_COLUMNS = ["plan", "image", "class", "first block", "kind", "margin", "max |Δ|", "top-1 changed", "settings"]


def plot(rows: list[dict], rules: list[dict], path: Path) -> None:
    """Left: per-image logit differences of every setting for the first patched plan measured in this process (rows
    kept by ``--resume`` have only their summaries). Right: the tie rules."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    measured = [r for r in rows if "differences" in r]
    plan = next((r["plan"] for r in measured if r["plan"] != "unpatched"), measured[0]["plan"] if measured else "")
    for row in (r for r in measured if r["plan"] == plan):
        values = row["differences"].sort().values.clamp_min(1e-9)
        share = torch.arange(1, len(values) + 1) / len(values)
        label = f"{row['runtime']}, {row['threads']} thr, batch {row['batch']}"
        left.step(values.numpy(), share.numpy(), where="post", label=label)
    left.axvline(TOLERANCE, color="k", ls=":", lw=1, label=f"{TOLERANCE:g}")
    left.set(xscale="log", xlabel="max |logit difference| from eager, 1 thread, batch 16", ylabel="share of images")
    left.set_title(f"{plan}: per-image difference, every setting", fontsize=10)
    left.legend(fontsize=7)
    left.grid(alpha=0.3)
    for i, (rule_plan, rule) in enumerate(dict.fromkeys((r["plan"], r["rule"]) for r in rules)):
        points = sorted(
            (float(r["perturbation"].split("=")[1]), r["differ %"])
            for r in rules
            if (r["plan"], r["rule"]) == (rule_plan, rule) and r["perturbation"].startswith("sigma")
        )
        if points:
            xs, ys = zip(*points, strict=True)
            right.plot(xs, [max(y, 0.05) for y in ys], marker="os^v"[i % 4], label=f"{rule_plan}, {rule}")
    right.set(xscale="log", yscale="log", xlabel="input noise std (normalised pixels)")
    right.set(ylabel="images whose decisions change, %")
    right.set_title("tie rules under input noise (0 plotted at 0.05)", fontsize=10)
    right.legend(fontsize=7)
    right.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@dataclass
class Results:
    """What a run has measured so far (written after every plan, so a long run that stops keeps what it did)."""

    rows: list[dict] = field(default_factory=list)
    margins: list[dict] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)
    rules: list[dict] = field(default_factory=list)
    accuracy: list[dict] = field(default_factory=list)
    # kept from a stopped run by --resume: its per-image lines, images over the tolerance with every decision the
    # reference's, and how long it ran
    divergent: list[dict] = field(default_factory=list)
    unexplained: int = 0
    seconds_before: float | None = None


def _cell(text: str) -> object:
    for kind in (int, float):
        with contextlib.suppress(ValueError):
            return kind(text)
    return text


def resumed(args: argparse.Namespace, images: int) -> Results:
    """What the stopped run of these settings wrote to ``{stem}.csv`` / ``.md``: every plan whose settings are all
    there, every tie-rule plan with all its rules and perturbations."""
    csv_path, md_path = args.out / f"{args.stem}.csv", args.out / f"{args.stem}.md"
    if not (csv_path.is_file() and md_path.is_file()):
        raise SystemExit(f"--resume: {csv_path} and {md_path.name} are not both there")
    with open(csv_path, newline="") as handle:
        lines = [{k: _cell(v) for k, v in line.items() if v != ""} for line in csv.DictReader(handle)]
    text = md_path.read_text()
    if any(line.get("images", images) != images for line in lines):
        raise SystemExit(f"--resume: {csv_path} measured another number of images than {images}")
    tables: dict[str, list[dict]] = {}
    for line in lines:
        tables.setdefault(line.pop("table"), []).append(line)
    wanted = set(settings(args))
    done = [
        plan
        for plan in args.plans
        if {(r["runtime"], r["threads"], r["batch"]) for r in tables.get("runtimes", []) if r["plan"] == plan} == wanted
    ]
    rule_names = ["exact (the library)", *(f"rounded to 2^-{bits}" for bits in args.rule_bits)]
    perturbations = ["batch 1", *(f"sigma={sigma:g}" for sigma in args.sigmas)]
    rules_done = [
        plan
        for plan in args.rule_plans
        if sorted((r["rule"], r["perturbation"]) for r in tables.get("tie rules", []) if r["plan"] == plan)
        == sorted((rule, p) for rule in rule_names for p in perturbations)
    ]
    checks = re.search(r"first 64 images\), max \|Δ\|: (.*)\.$", text, re.MULTILINE)
    unexplained = re.search(r"whose decisions all matched the reference's: (\d+)\.", text)
    seconds = re.search(r"whole run (\d+) s", text)
    if checks is None or unexplained is None or seconds is None:
        raise SystemExit(f"--resume: {md_path} is not what this script writes")
    kept = set(done)
    return Results(
        rows=[r for r in tables.get("runtimes", []) if r["plan"] in kept],
        margins=[m for m in tables.get("margins", []) if m["plan"] in kept],
        checks=[c for c in checks.group(1).split("; ") if c.split(",")[0] in kept],
        rules=[r for r in tables.get("tie rules", []) if r["plan"] in rules_done],
        accuracy=[a for a in tables.get("tie-rule accuracy", []) if a["plan"] in rules_done],
        divergent=[d for d in tables.get("divergent", []) if d["plan"] in kept],
        unexplained=int(unexplained.group(1)),
        seconds_before=float(seconds.group(1)),
    )


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if not (args.model_dir / "model.safetensors").is_file():
        raise SystemExit(f"no ImageNet model at {args.model_dir} (../shared/models/deit_tiny_in1k)")
    started = time.perf_counter()
    threads_before = torch.get_num_threads()
    base = load_imagenet_model(args.model_dir)
    for plan in dict.fromkeys(args.plans + args.rule_plans):  # a plan the model cannot take fails now, not in an hour
        if PLANS[plan] is not None:
            tm.patch(copy.deepcopy(base), **PLANS[plan])
    dataset = load_imagenet(args.data, image_size=tuple(base.patch_embed.img_size))
    chosen = evenly_spaced(range(len(dataset)), args.images)
    images, labels = to_tensor_dataset(dataset, chosen, desc=f"decode {len(chosen)} images").tensors
    files = [Path(dataset.samples[index][0]).name for index in chosen]
    results = resumed(args, len(chosen)) if args.resume else Results()
    plans = [p for p in args.plans if p not in {r["plan"] for r in results.rows}]
    rule_plans = [p for p in args.rule_plans if p not in {r["plan"] for r in results.rules}]
    if args.resume:
        tqdm.write(
            f"--resume: kept plans {sorted({r['plan'] for r in results.rows})}, tie rules of "
            f"{sorted({r['plan'] for r in results.rules})}; measuring plans {plans}, tie rules of {rule_plans}"
        )

    def write(done: bool) -> str:
        return write_report(args, results, labels, dataset.class_names, files, time.perf_counter() - started, done)

    with tempfile.TemporaryDirectory() as folder:
        for plan in tqdm(plans, desc="plans"):
            plan_rows, plan_margins, plan_checks = measure_plan(plan, base, images, args, Path(folder))
            results.rows += plan_rows
            results.margins += [plan_margins] if plan_margins else []
            results.checks += [f"{plan}, {runtime}: {value:.1e}" for runtime, value in plan_checks.items()]
            write(done=False)
    if rule_plans:
        unpatched = reference_run(base, images).logits
        for plan in rule_plans:
            model = tm.patch(copy.deepcopy(base), **PLANS[plan])
            plan_rules, plan_accuracy = tie_rule_table(plan, model, images, labels, unpatched, args)
            results.rules += plan_rules
            results.accuracy += plan_accuracy
            write(done=False)
    torch.set_num_threads(threads_before)
    print(write(done=True))
    print(f"\nwrote {args.out}/{args.stem}.csv, .md{'' if args.no_plot else ', .png'}")
    return results.rows + results.rules + results.accuracy


def write_report(
    args: argparse.Namespace,
    results: Results,
    labels: Tensor,
    names: list[str],
    files: list[str],
    seconds: float,
    done: bool,
) -> str:
    """Write ``{stem}.md``, ``.csv`` and ``.png`` from what was measured so far; returns the markdown."""
    order = {plan: i for i, plan in enumerate(PLANS)}
    rows = sorted(results.rows, key=lambda r: order[r["plan"]])  # stable: kept plans and new ones in plan order
    rules = sorted(results.rules, key=lambda r: order[r["plan"]])
    accuracy = sorted(results.accuracy, key=lambda r: order[r["plan"]])
    unexplained = results.unexplained + sum(row.get("unexplained", 0) for row in rows)
    divergent = sorted(results.divergent + divergent_images(rows, labels, names, files), key=lambda d: order[d["plan"]])
    margins = sorted(results.margins, key=lambda m: order[m["plan"]])
    checks = sorted(results.checks, key=lambda c: order[c.split(",")[0]])
    if results.seconds_before is None:
        took = f"whole run {seconds:.0f} s ({seconds / 60:.1f} min)"
    else:
        total = results.seconds_before + seconds
        took = (
            f"whole run {total:.0f} s ({total / 60:.1f} min): {results.seconds_before:.0f} s in a run that stopped, "
            f"{seconds:.0f} s in the `--resume` run that measured what it had not"
        )
    formats = {"median |Δ|": "{:.1e}", "max |Δ|": "{:.1e}", f"> {TOLERANCE:g} %": "{:.1f}"}
    formats |= {"largest margin": "{:.1e}", "repeat |Δ|": "{:.1e}", "margin": "{:.1e}", "differ %": "{:.1f}"}
    margin_formats = {k: "{:.1e}" for k in MARGIN_COLUMNS if "median" in k or "small" in k}
    text = "\n\n".join(
        [
            f"## Runtime agreement: the real DeiT-T on {len(labels)} ImageNet images of ../shared",
            f"`python benchmarks/runtime_agreement.py{' --quick' if args.quick else ''}`. Reference: eager PyTorch, 1 "
            "thread, batch 16. |Δ|: per image, the largest absolute logit difference from the reference. 'decisions "
            "differ': images where some reducing block kept other tokens (selection) or merged a token elsewhere "
            "(assignment) than in the reference; 'first blocks': the blocks where that first happened; 'largest "
            "margin': the largest reference margin among those first differing decisions (selection: relative score "
            "spread of the swapped tokens; assignment: cosine gap between best and second-best target); 'repeat "
            "|Δ|': the same setting run a second time. compile: torch.compile(dynamic=False), 2 threads. ONNX "
            "Runtime: the file tm.export_onnx writes (dynamic batch), CPU provider."
            + ("" if done else " **Partial: the run has not finished.**"),
            markdown_table(rows, COLUMNS, formats),
            f"Images over {TOLERANCE:g} whose decisions all matched the reference's: {unexplained}. The decisions of "
            "compiled and exported runs come from graphs that also return them; their logits against the plain "
            "graphs' (2 threads, batch 16, first 64 images), max |Δ|: " + ("; ".join(checks) or "not run") + ".",
            "### Every image whose decisions differ somewhere",
            markdown_table(divergent, DIVERGENT_COLUMNS, formats) if divergent else "(none)",
            "### How close to ties the reference's decisions come (every image and reducing block)",
            markdown_table(margins, MARGIN_COLUMNS, margin_formats) if margins else "(no patched plan)",
            "### Tie rules: images whose decisions change under a perturbation (eager, 1 thread)",
            markdown_table(rules, RULE_COLUMNS, formats) if rules else "(not run)",
            markdown_table(accuracy, ACCURACY_COLUMNS, {k: "{:.1f}" for k in ACCURACY_COLUMNS[2:]}) if accuracy else "",
            f"torch {torch.__version__}, onnxruntime {_onnxruntime_version()}; {took}.",
        ]
    )
    table = [{"table": "runtimes", **row} for row in rows] + [{"table": "divergent", **d} for d in divergent]
    table += [{"table": "margins", **m} for m in margins] + [{"table": "tie rules", **r} for r in rules]
    table += [{"table": "tie-rule accuracy", **a} for a in accuracy]
    columns = ["table", *dict.fromkeys(COLUMNS + DIVERGENT_COLUMNS + MARGIN_COLUMNS + RULE_COLUMNS + ACCURACY_COLUMNS)]
    write_outputs(args.out, args.stem, table, columns, text)
    if not args.no_plot and rows:
        plot(rows, rules, args.out / f"{args.stem}.png")
    return text


def _onnxruntime_version() -> str:
    try:
        import onnxruntime
    except ImportError:
        return "not installed"
    return onnxruntime.__version__


if __name__ == "__main__":
    main()
