"""Checkpoints of a training run: ``checkpoint_dir/last.pt``, written atomically (write, then rename) with everything
an exact resume needs, and refused when another model or configuration wrote it.

What goes in is the trainer's business (:meth:`~tokenmerge_patch.training.loop.Trainer.save`); this module checks the
folder before the first step, fingerprints the run, writes rank 0's file with every rank's RNG states under DDP, and
reads it back.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ..plan import PatchConfig

CHECKPOINT_NAME = "last.pt"
CHECKPOINT_FORMAT = 1


def check_directory(checkpoint_dir: object, resume: bool) -> Path | None:
    if checkpoint_dir is None:
        if resume:
            raise ValueError("resume=True needs checkpoint_dir (the folder holding last.pt)")
        return None
    if not isinstance(checkpoint_dir, (str, os.PathLike)):
        raise TypeError(
            f"checkpoint_dir must be a path (str or os.PathLike) or None, got {type(checkpoint_dir).__name__}"
        )
    return Path(checkpoint_dir)


class Checkpoints:
    """``checkpoint_dir/last.pt`` of one run (a no-op without a folder): checked for writing before the
    first step, written by rank 0 with every rank's RNG states, read by every rank on resume, and refused
    when another model or configuration wrote it."""

    def __init__(self, directory: Path | None, fingerprint: dict) -> None:
        self.directory, self.fingerprint = directory, fingerprint
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world_size = dist.get_world_size() if self.distributed else 1

    @property
    def path(self) -> Path | None:
        return None if self.directory is None else self.directory / CHECKPOINT_NAME

    def check_writable(self) -> None:
        """Create the folder and write (then remove) a probe file in it, so an unusable ``checkpoint_dir``
        fails now rather than at the first save, an epoch later. Only rank 0 writes checkpoints, so only
        rank 0 probes; every rank raises if it failed."""
        if self.directory is None:
            return
        problem = None
        if self.rank == 0:
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
                handle, probe = tempfile.mkstemp(prefix=".write-test-", dir=self.directory)
                try:
                    os.write(handle, b"probe")
                finally:
                    os.close(handle)
                    os.remove(probe)
            except OSError as error:
                problem = f"{type(error).__name__}: {error}"
        if self.distributed:
            shared = [problem]
            dist.broadcast_object_list(shared, src=0)
            problem = shared[0]
        if problem is not None:
            raise ValueError(
                f"checkpoint_dir {str(self.directory)!r} cannot hold checkpoints: it must be a folder this process "
                f"can create and write in ({problem})"
            )

    def load(self) -> dict | None:
        """The saved run, ``None`` when there is none to resume."""
        path = self.path
        if path is None or not path.is_file():
            return None
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(saved, dict) or saved.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path} is not a tokenmerge_patch fine-tune checkpoint (format {CHECKPOINT_FORMAT})")
        theirs = saved["fingerprint"]
        differences = [
            f"{key}: checkpoint {theirs.get(key)!r}, this run {self.fingerprint.get(key)!r}"
            for key in sorted(set(theirs) | set(self.fingerprint))
            if theirs.get(key) != self.fingerprint.get(key)
        ]
        if differences:
            raise ValueError(
                f"{path} was written by a different model or configuration, so it cannot be resumed:\n  "
                + "\n  ".join(differences)
                + "\nuse another checkpoint_dir, resume=False, or the original settings"
            )
        return saved

    def save(self, payload: Callable[[], dict], rng: dict, epoch_rng: dict | None) -> None:
        """Write ``payload()`` (built on rank 0 only) with this rank's ``rng`` and epoch-start RNG states,
        and every other rank's under DDP."""
        if self.path is None:
            return
        rngs, starts = [rng], [epoch_rng]
        if self.distributed:  # every rank's RNG, so a resumed run continues each rank's stream
            rngs, starts = [None] * self.world_size, [None] * self.world_size
            dist.all_gather_object(rngs, rng)
            dist.all_gather_object(starts, epoch_rng)
        if self.rank == 0:
            content = {"format": CHECKPOINT_FORMAT, "fingerprint": self.fingerprint, **payload()}
            atomic_save({**content, "rng": rngs, "epoch_rng": starts}, self.path)
        if self.distributed:
            dist.barrier()  # nobody runs ahead of a checkpoint that is not on disk yet


def fingerprint(model: nn.Module, config: PatchConfig, **settings: object) -> dict:
    """What must match for a checkpoint to continue this run (JSON-normalised for comparison)."""
    shapes = [(name, list(param.shape)) for name, param in model.state_dict().items()]
    digest = hashlib.sha256(json.dumps(shapes).encode()).hexdigest()[:16]
    return json.loads(
        json.dumps(
            {
                "model": f"{type(model).__module__}.{type(model).__name__}",
                "parameters": f"{len(shapes)} tensors, names and shapes sha256 {digest}",
                "patch": asdict(config),
                **settings,
            }
        )
    )


def atomic_save(payload: dict, path: Path) -> None:
    """Write then rename, so a kill mid-write leaves the previous checkpoint intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    torch.save(payload, partial)
    os.replace(partial, path)
