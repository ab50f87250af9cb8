"""A run directory belongs to one run.

- :class:`RunLock`: an exclusive ``fcntl.flock`` on ``RUN_DIR/.lock``, held for the whole run
  by the main process. The kernel releases it when the process ends, however it ends (kill -9
  included), so a crashed run never leaves a stale lock; a second run into the directory fails
  at once, naming the directory and the PID of the run holding it.
- :func:`prepare_fresh`: a run without ``--resume`` refuses a directory that holds another
  run's checkpoints, tokenizer or metrics (pass ``--resume``, ``--overwrite`` or a new
  ``train.output_dir``); ``--overwrite`` deletes them first.
- :func:`compare_configs`: ``--resume`` names every difference between the recipe and the run's
  saved ``config.yaml``; those that change results are refused.
- :func:`record_data_files` / :func:`check_data_files`: the size and sha256 of the run's local
  data and tokenizer files, recorded when it starts; ``--resume`` refuses files that changed
  under the same name.
- :func:`drop_metrics_after`: on resume, ``metrics.jsonl`` lines past the checkpoint's step are
  dropped, so each step is logged once.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from tformer.training.checkpoint import latest_checkpoint
from tformer.training.config import Config, load_config
from tformer.weights import sha256_file

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
DATA_FILES = "data_files.json"

#: What a run writes into its directory; ``--overwrite`` removes these and nothing else.
RUN_FILES = ("checkpoints", "tokenizer", "metrics.jsonl", "tensorboard", "summary.json",
             "data_stats.json", DATA_FILES, "config.yaml", "loss.png", "report.html",
             "test_metrics.json", "test_predictions.jsonl")

#: Settings a resumed run may change: they decide when to stop, what to log and how to
#: evaluate, not what the optimizer does with the data. Every other difference is refused.
RESUMABLE = frozenset({
    "train.output_dir", "train.max_steps", "train.max_minutes", "train.log_every",
    "train.eval_every", "train.eval_max_examples", "train.metric",
    "train.early_stopping_patience", "train.keep_last", "train.save_every", "train.num_beams",
    "train.max_new_tokens", "train.no_repeat_ngram_size", "train.repetition_penalty",
    "train.merge_lora", "train.compile",
})


class RunDirError(RuntimeError):
    """A run directory that this run may not use (locked, or another run's); the message names
    the directory and what to do."""


class RunLock:
    """An exclusive, non-blocking ``flock`` on ``run_dir/.lock``; the file holds the PID."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> RunLock:
        import fcntl  # optional: POSIX only (imported where the lock is taken)

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(fd)
            if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = self.path.read_text(encoding="utf-8", errors="replace").strip() or "unknown"
            raise RunDirError(
                f"{self.path.parent} is in use by another run (PID {holder} holds {self.path}); "
                "wait for it to finish, or choose another train.output_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the flock
            self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def previous_run(run_dir: Path) -> list[str]:
    """What another run left in ``run_dir``: its checkpoints, tokenizer, metrics."""
    found = []
    ckpts = run_dir / "checkpoints"
    steps = sorted(p.name for p in ckpts.iterdir() if p.name.startswith("step-")) \
        if ckpts.is_dir() else []
    if steps:
        found.append(f"{len(steps)} checkpoint(s) ({steps[0]} .. {steps[-1]})")
    if (run_dir / "tokenizer").exists():
        found.append("a tokenizer (tokenizer/)")
    if (run_dir / "metrics.jsonl").exists():
        found.append("metrics.jsonl")
    return found


def prepare_fresh(run_dir: Path, overwrite: bool) -> None:
    """Before a run without ``--resume``: refuse a directory holding another run's work, or with
    ``overwrite`` delete that work (`RUN_FILES`; other files stay)."""
    found = previous_run(run_dir)
    if not found:
        return
    if not overwrite:
        raise RunDirError(
            f"{run_dir} already holds a run: {', '.join(found)}. Pass --resume to continue it, "
            "--overwrite to delete it and start afresh, or choose a new train.output_dir"
        )
    log.warning("--overwrite: deleting the previous run in %s (%s)", run_dir, ", ".join(found))
    for name in RUN_FILES:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _flatten(config) -> dict[str, Any]:
    return {f"{section}.{key}": value for section, values in dataclasses.asdict(config).items()
            for key, value in values.items()}


def compare_configs(saved, current, saved_path: Path) -> list[str]:
    """Every difference between the run's saved config and this one, as ``key: old -> new``.
    Raises RunDirError listing them all when one changes results (model, data, tokenizer,
    optimizer, schedule, seed); returns the allowed ones (`RESUMABLE`) otherwise."""
    old, new = _flatten(saved), _flatten(current)
    changed = [key for key in new if old.get(key) != new[key]]
    lines = {key: f"{key}: {old.get(key)!r} -> {new[key]!r}" for key in changed}
    refused = [lines[key] for key in changed if key not in RESUMABLE]
    allowed = [lines[key] for key in changed if key in RESUMABLE]
    if refused:
        also = f"; also changed (allowed): {'; '.join(allowed)}" if allowed else ""
        raise RunDirError(
            f"--resume: the recipe differs from the run's {saved_path} in settings that change "
            f"results: {'; '.join(refused)}{also}. Resume with the run's settings, or start a "
            "new run (--overwrite or a new train.output_dir)"
        )
    return allowed


def _data_files(config) -> dict[str, dict[str, Any]]:
    """{setting: {path, size, sha256}} of the local files among data.train, data.validation,
    data.test and data.tokenizer (a tokenizer directory: its tokenizer.json). Hub names and
    the embedded corpus have no file and are compared by name only, in config.yaml."""
    found = {}
    for key in ("train", "validation", "test", "tokenizer"):
        value = getattr(config.data, key)
        path = Path(value) if value is not None else None
        if path is not None and path.is_dir() and (path / "tokenizer.json").is_file():
            path = path / "tokenizer.json"
        if path is not None and path.is_file():
            found[f"data.{key}"] = {"path": str(path), "size": path.stat().st_size,
                                    "sha256": sha256_file(path)}
    return found


def record_data_files(run_dir: Path, config) -> None:
    """Write ``RUN_DIR/data_files.json`` (see :func:`check_data_files`)."""
    (run_dir / DATA_FILES).write_text(json.dumps(_data_files(config), indent=2))


def check_data_files(run_dir: Path, config) -> None:
    """On ``--resume``: RunDirError naming every local data or tokenizer file whose content
    differs from what the run started with (same name, other data)."""
    saved = run_dir / DATA_FILES
    if not saved.is_file():
        return
    try:
        before = json.loads(saved.read_text())
    except json.JSONDecodeError:
        log.warning("%s is damaged; the data files cannot be compared", saved)
        return
    now = _data_files(config)
    changed = [f"{key}: {now[key]['path']} (sha256 {before[key]['sha256'][:12]} when the run "
               f"started, {now[key]['sha256'][:12]} now)"
               for key in sorted(set(before) & set(now))
               if before[key]["sha256"] != now[key]["sha256"]]
    if changed:
        raise RunDirError(f"--resume: data files changed since the run started: "
                          f"{'; '.join(changed)}. Resume with the same data, or start a new run "
                          "(--overwrite or a new train.output_dir)")


def drop_metrics_after(path: Path, step: int) -> int:
    """Remove the lines of ``metrics.jsonl`` logged after ``step`` (by a run that went on past
    the checkpoint it is resumed from, then died), and a torn last line; returns how many.
    The file is rewritten through a temporary file and a rename."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    with path.open(encoding="utf-8", errors="replace") as fh:
        for line in fh:
            try:
                record = json.loads(line)
                late = int(record.get("step", 0)) > step
            except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
                late = True  # a line cut by the crash
            if late:
                dropped += 1
            else:
                kept.append(line if line.endswith("\n") else line + "\n")
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, path)
        log.info("resume: dropped %d line(s) of %s logged after step %d", dropped, path, step)
    return dropped


def claim_run_dir(run_dir: Path, resume: bool, overwrite: bool,
                   accelerator: Accelerator) -> RunLock | None:
    """The main process locks the run directory and, for a fresh run, checks it is free (or
    clears it with ``overwrite``); every process gets the same verdict."""
    lock, error = None, None
    if accelerator.is_main_process:
        try:
            lock = RunLock(run_dir).acquire()
            if not resume:
                prepare_fresh(run_dir, overwrite)
        except RunDirError as e:
            error = str(e)
    if accelerator.num_processes > 1:
        error = broadcast_object_list([error])[0]
    if error is not None:
        if lock is not None:
            lock.release()
        raise RunDirError(error)
    return lock


def resume_point(run_dir: Path, ckpt_dir: Path, config: Config) -> Path | None:
    """The newest checkpoint whose files have their recorded checksums (damaged newer ones are
    named and skipped), after checking the recipe against the run's saved config."""
    saved = run_dir / "config.yaml"
    if saved.is_file():
        changed = compare_configs(load_config(saved), config, saved)
        if changed:
            log.info("--resume with changed settings: %s", "; ".join(changed))
    check_data_files(run_dir, config)
    path = latest_checkpoint(ckpt_dir, checksums=True)
    if path is None:
        log.warning("--resume: no complete checkpoint in %s; starting from scratch", ckpt_dir)
    return path
