"""Gradient checkpointing: activation memory and time of a training step, with and without.

    .venv/bin/python bench/gradient_checkpointing.py              # small model, 32 x 128 tokens (~1 min)
    .venv/bin/python bench/gradient_checkpointing.py --size base --batch 8

One training step (forward with ``labels``, backward) of the own model through the Hugging Face
adapter, as a user of ``gradient_checkpointing_enable()`` runs it, on a random batch of
``--batch`` pairs of ``--length`` + ``--length`` tokens, vocabulary 8,000, dropout 0.1. Each side
runs in a fresh process (one thread), after one warm-up step:

- **peak memory of the step**: the process's peak resident memory during the step (``VmHWM``,
  reset before it through ``/proc/self/clear_refs``) less its resident memory before it (model,
  gradients and batch already there; glibc's free memory given back by ``malloc_trim``): what
  the step's activations add;
- **saved for backward**: bytes of the tensors autograd keeps outside the checkpoints, weights
  excepted (a ``saved_tensors_hooks`` count; with checkpointing the layers' inputs are kept
  besides);
- **time**: median of 3 steps; checkpointing runs each layer's forward a second time.

Linux and glibc only. The figures are in ``docs/model.md`` (section 13).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _status(field: str) -> int:
    """A ``/proc/self/status`` field in bytes (``VmRSS``, ``VmHWM``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def one_side(size: str, batch: int, length: int, checkpointed: bool) -> dict:
    import warnings

    import torch

    from tformer.hf import TformerConfig, TformerForConditionalGeneration
    from tformer.model import SIZES

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = TformerForConditionalGeneration(
        TformerConfig(vocab_size=8000, dropout=0.1, **SIZES[size])).train()
    if checkpointed:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # the v5 name is activation_...
            model.gradient_checkpointing_enable()
    ids, labels = (torch.randint(4, 8000, (batch, length)) for _ in range(2))

    saved: dict[int, int] = {}
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:  # weights are resident anyway
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    def step(count: bool = False) -> None:
        model.zero_grad(set_to_none=False)
        if count:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = model(input_ids=ids, labels=labels).loss
        else:
            loss = model(input_ids=ids, labels=labels).loss
        loss.backward()

    step()  # warm-up: gradients allocated, allocator settled
    # give the heap's free memory back to the system, else the step could reuse it unseen
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # peak resident memory := current
    step(count=True)
    peak = _status("VmHWM") - before
    times = []
    for _ in range(3):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"peak_mib": peak / 2**20, "saved_mib": sum(saved.values()) / 2**20,
            "step_s": statistics.median(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="small", choices=["tiny", "small", "base"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--side", choices=["plain", "checkpointed"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        print(json.dumps(one_side(args.size, args.batch, args.length,
                                  args.side == "checkpointed")))
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}
    print(f"model {args.size}, V 8000, batch {args.batch} x {args.length} + {args.length} tokens")
    results = {}
    for side in ("plain", "checkpointed"):
        out = subprocess.run([sys.executable, __file__, "--size", args.size, "--batch",
                              str(args.batch), "--length", str(args.length), "--side", side],
                             env=env, check=True, capture_output=True, text=True).stdout
        results[side] = r = json.loads(out.strip().splitlines()[-1])
        print(f"{side:>13}: peak memory of the step {r['peak_mib']:7.1f} MiB, saved for "
              f"backward {r['saved_mib']:7.1f} MiB, step {r['step_s']:.2f} s", flush=True)
    plain, ckpt = results["plain"], results["checkpointed"]
    print(f"checkpointing: {plain['peak_mib'] / ckpt['peak_mib']:.1f}x less peak step memory, "
          f"{ckpt['step_s'] / plain['step_s']:.2f}x the step time")


if __name__ == "__main__":
    main()
