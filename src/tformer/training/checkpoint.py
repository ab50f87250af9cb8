"""Checkpoints: a Hugging Face model directory plus the state needed to resume exactly.

Layout of ``RUN_DIR/checkpoints/step-000200/``::

    config.json, generation_config.json, model.safetensors   (save_pretrained; loads with
    tokenizer.json, tokenizer_config.json, ...                 AutoModelForSeq2SeqLM/AutoTokenizer)
    trainer_state.pt      optimizer, scheduler, grad scaler, RNG states (tensors only, loaded
                          with torch.load(weights_only=True): no arbitrary pickle)
    accelerate/           FSDP and DeepSpeed runs only: accelerate's save_state (the sharded
                          model and optimizer state, per-process RNG); trainer_state.pt then has
                          no optimizer (`tformer.training.distributed`)
    checkpoint.json       TrainState + the size and sha256 of every file, written last

A checkpoint is written into ``.tmp-step-...`` and renamed when complete, so a crash never
leaves a half-written directory under a real name; the sizes in ``checkpoint.json`` catch a
directory damaged later (truncated copy, full disk), and its sha256 checksums, verified before
``--resume`` reads a checkpoint, catch damage that keeps the size (overwritten bytes).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tformer.weights import CheckpointError, check_weights, sha256_file

log = logging.getLogger(__name__)

MARKER = "checkpoint.json"
STATE_FILE = "trainer_state.pt"

__all__ = ["CheckpointError", "TrainState", "latest_checkpoint", "prune_checkpoints",
           "save_checkpoint", "verify_checkpoint"]


@dataclass
class TrainState:
    """Run state (not configuration): where the run is and what it has seen."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    batches_in_epoch: int = 0  # global micro-batches of this epoch already consumed
    tokens_seen: int = 0  # non-pad source + target tokens, all processes
    best_metric: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    elapsed_seconds: float = 0.0
    # decay_over: time (training.stopping): the decay's horizon in steps; where its current
    # line starts, (step, progress of the decay), None: at the end of the warm-up, progress 0;
    # and when the horizon was last measured, (step, clock seconds)
    schedule_steps: int | None = None
    schedule_from: tuple[int, float] | None = None
    schedule_planned_at: tuple[int, float] | None = None
    # names of the checkpoints this run wrote, oldest first: pruning deletes only these
    checkpoints: list[str] = dataclasses.field(default_factory=list)


def rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state()[1].tolist(),
        "numpy_pos": int(np.random.get_state()[2]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), state["numpy_pos"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def temporary_dir(directory: Path) -> Path:
    """Where a checkpoint is written before it is renamed to ``directory``."""
    directory = Path(directory)
    return directory.parent / f".tmp-{directory.name}"


def save_checkpoint(
    directory: Path, model, tokenizer, trainer_state: dict[str, Any], state: TrainState,
    started: bool = False,
) -> Path:
    """Write a complete checkpoint atomically; returns its final path. ``started``: the
    temporary directory already holds what every process wrote (FSDP / DeepSpeed: accelerate's
    state, `tformer.training.distributed`), to keep and checksum with the rest."""
    directory = Path(directory)
    tmp = temporary_dir(directory)
    if not started:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    torch.save(trainer_state, tmp / STATE_FILE)
    # every file, those in subdirectories too (a LoRA run's adapter/), by relative path
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    sizes = {p.relative_to(tmp).as_posix(): p.stat().st_size for p in files}
    sums = {p.relative_to(tmp).as_posix(): sha256_file(p) for p in files}
    marker = {"train_state": dataclasses.asdict(state), "files": sizes, "sha256": sums}
    (tmp / MARKER).write_text(json.dumps(marker, indent=2))
    for p in [*files, tmp / MARKER]:  # data on disk before the rename makes it visible
        with open(p, "rb") as fh:
            os.fsync(fh.fileno())
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(tmp, directory)
    return directory


def verify_checkpoint(directory: Path, checksums: bool = False) -> dict[str, Any]:
    """Check a checkpoint is complete (every file of its marker, at its size; readable
    safetensors headers) and, with ``checksums``, that every file has the sha256 recorded when
    it was written; returns its marker. Raises CheckpointError naming what is wrong."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint {directory} does not exist")
    marker_path = directory / MARKER
    if not marker_path.is_file():
        raise CheckpointError(f"checkpoint {directory} is incomplete: {MARKER} is missing")
    try:
        marker = json.loads(marker_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint {directory}: {MARKER} is damaged ({e})") from e
    for name, size in marker["files"].items():
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint {directory} is incomplete: {name} is missing")
        actual = path.stat().st_size
        if actual != size:
            raise CheckpointError(
                f"checkpoint {directory} is damaged: {name} has {actual} bytes, expected {size}"
            )
    check_weights(directory)
    if checksums:
        for name, expected in marker.get("sha256", {}).items():
            if sha256_file(directory / name) != expected:
                raise CheckpointError(f"checkpoint {directory} is damaged: {name} does not have "
                                      "the sha256 recorded when it was written")
    return marker


def load_trainer_state(directory: Path) -> tuple[dict[str, Any], TrainState]:
    marker = verify_checkpoint(directory)
    trainer_state = torch.load(Path(directory) / STATE_FILE, weights_only=True)
    return trainer_state, TrainState(**marker["train_state"])


def step_dirs(checkpoints: Path) -> list[Path]:
    """Checkpoint directories, oldest first (temporary ones excluded)."""
    if not checkpoints.is_dir():
        return []
    return sorted(p for p in checkpoints.iterdir() if p.is_dir() and p.name.startswith("step-"))


def latest_checkpoint(checkpoints: Path, checksums: bool = False) -> Path | None:
    """The newest complete checkpoint (``checksums``: whose files also have their recorded
    sha256); damaged ones are reported, with the reason, and skipped."""
    for path in reversed(step_dirs(checkpoints)):
        try:
            verify_checkpoint(path, checksums=checksums)
        except CheckpointError as e:
            log.warning("skipping checkpoint %s: %s", path.name, e)
            continue
        return path
    return None


def prune_checkpoints(checkpoints: Path, keep_last: int, keep: set[Path],
                      owned: list[str] | None = None) -> None:
    """Delete all but the newest ``keep_last`` checkpoints and those in ``keep`` (the best).
    With ``owned`` (the names of the checkpoints this run wrote, ``TrainState.checkpoints``),
    only those are candidates: a checkpoint some other run left is never deleted."""
    dirs = step_dirs(checkpoints)
    if owned is not None:
        dirs = [p for p in dirs if p.name in set(owned)]
    for path in dirs[: max(len(dirs) - keep_last, 0)]:
        if path not in keep:
            shutil.rmtree(path, ignore_errors=True)
