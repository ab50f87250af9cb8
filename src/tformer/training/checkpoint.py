"""Checkpoints: a Hugging Face model directory plus the state needed to resume exactly.

Layout of ``RUN_DIR/checkpoints/step-000200/``::

    config.json, generation_config.json, model.safetensors   (save_pretrained; loads with
    tokenizer.json, tokenizer_config.json, ...                 AutoModelForSeq2SeqLM/AutoTokenizer)
    trainer_state.pt      optimizer, scheduler, grad scaler, RNG states (tensors only, loaded
                          with torch.load(weights_only=True): no arbitrary pickle)
    checkpoint.json       TrainState + the size of every file, written last

A checkpoint is written into ``.tmp-step-...`` and renamed when complete, so a crash never
leaves a half-written directory under a real name; the sizes in ``checkpoint.json`` catch a
directory damaged later (truncated copy, full disk).
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

log = logging.getLogger(__name__)

MARKER = "checkpoint.json"
STATE_FILE = "trainer_state.pt"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or damaged; the message names the path."""


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


def save_checkpoint(
    directory: Path, model, tokenizer, trainer_state: dict[str, Any], state: TrainState
) -> Path:
    """Write a complete checkpoint atomically; returns its final path."""
    directory = Path(directory)
    tmp = directory.parent / f".tmp-{directory.name}"
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
    marker = {"train_state": dataclasses.asdict(state), "files": sizes}
    (tmp / MARKER).write_text(json.dumps(marker, indent=2))
    for p in [*files, tmp / MARKER]:  # data on disk before the rename makes it visible
        with open(p, "rb") as fh:
            os.fsync(fh.fileno())
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(tmp, directory)
    return directory


def verify_checkpoint(directory: Path) -> dict[str, Any]:
    """Check a checkpoint is complete; returns its marker. Raises CheckpointError naming what
    is wrong."""
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


def latest_checkpoint(checkpoints: Path) -> Path | None:
    """The newest complete checkpoint; damaged ones are reported and skipped."""
    for path in reversed(step_dirs(checkpoints)):
        try:
            verify_checkpoint(path)
        except CheckpointError as e:
            log.warning("skipping %s", e)
            continue
        return path
    return None


def prune_checkpoints(checkpoints: Path, keep_last: int, keep: set[Path]) -> None:
    """Delete all but the newest ``keep_last`` checkpoints and those in ``keep`` (the best)."""
    dirs = step_dirs(checkpoints)
    for path in dirs[: max(len(dirs) - keep_last, 0)]:
        if path not in keep:
            shutil.rmtree(path, ignore_errors=True)
