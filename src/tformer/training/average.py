"""Checkpoint averaging (Vaswani et al. 2017, section 6.1: "averaging the last 5
checkpoints"): the element-wise mean of the weights of several checkpoints of one run.

Written here because neither transformers nor accelerate offers it; fairseq's
``average_checkpoints.py`` does the same on its own checkpoint format. The output is a plain
model directory (config, safetensors weights, tokenizer), not a resumable checkpoint.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tformer.training.checkpoint import CheckpointError, step_dirs, verify_checkpoint
from tformer.weights import check_weights

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
# What a model directory needs beside its weights (the trainer state is left behind).
_COPIED = ("config.json", "generation_config.json", "modeling_tformer.py", "tokenizer.json",
           "tokenizer_config.json", "special_tokens_map.json", "spiece.model", "vocab.json",
           "merges.txt")


def last_checkpoints(run_dir: str | Path, n: int) -> list[Path]:
    """The newest ``n`` checkpoints of a run directory (RUN_DIR/checkpoints/step-*)."""
    if n < 1:
        raise ValueError(f"--last must be >= 1, got {n}")
    found = step_dirs(Path(run_dir) / "checkpoints")
    if not found:
        raise CheckpointError(f"{run_dir}: no checkpoints under {Path(run_dir) / 'checkpoints'}")
    if len(found) < n:
        log.warning("%s has %d checkpoints, fewer than the %d asked for: averaging all",
                    run_dir, len(found), n)
    return found[-n:]


def average_checkpoints(checkpoints: Sequence[str | Path], output: str | Path) -> Path:
    """Write the mean of the checkpoints' weights to ``output`` (atomically: a temporary
    directory renamed when complete). Floating-point tensors are averaged in float64 and
    stored in their own dtype; integer buffers must agree and are copied. The config and
    tokenizer come from the last checkpoint. Raises CheckpointError naming the checkpoint
    whose tensors do not match."""
    paths = [Path(c) for c in checkpoints]
    if not paths:
        raise ValueError("average_checkpoints needs at least one checkpoint")
    for path in paths:
        if (path / "checkpoint.json").is_file():
            verify_checkpoint(path)  # sizes match: no truncated copy slips into the mean
        if not (path / WEIGHTS).is_file():
            raise CheckpointError(f"{path}: no {WEIGHTS} (not a model checkpoint)")
        check_weights(path)  # a damaged header or a truncated file, named
    first = load_file(paths[0] / WEIGHTS)
    sums = {k: v.to(torch.float64) if v.is_floating_point() else v for k, v in first.items()}
    for path in paths[1:]:
        weights = load_file(path / WEIGHTS)
        if weights.keys() != sums.keys():
            diff = sorted(weights.keys() ^ sums.keys())[:3]
            raise CheckpointError(f"{path}: its tensors differ from {paths[0]}'s (e.g. {diff})")
        for name, tensor in weights.items():
            if tensor.shape != sums[name].shape:
                raise CheckpointError(f"{path}: {name} has shape {tuple(tensor.shape)}, "
                                      f"{paths[0]} has {tuple(sums[name].shape)}")
            if tensor.is_floating_point():
                sums[name] += tensor.to(torch.float64)
            elif not torch.equal(tensor, sums[name]):
                raise CheckpointError(f"{path}: integer tensor {name} differs from {paths[0]}'s")
    mean = {
        k: (v / len(paths)).to(first[k].dtype) if first[k].is_floating_point() else v
        for k, v in sums.items()
    }
    output = Path(output)
    tmp = output.parent / f".tmp-{output.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in mean.items()}, tmp / WEIGHTS, metadata={"format": "pt"})
    for name in _COPIED:
        if (paths[-1] / name).is_file():
            shutil.copy2(paths[-1] / name, tmp / name)
    (tmp / "averaged_from.txt").write_text("".join(f"{p.resolve()}\n" for p in paths))
    if output.exists():
        shutil.rmtree(output)
    os.replace(tmp, output)
    log.info("averaged %d checkpoints into %s", len(paths), output)
    return output
