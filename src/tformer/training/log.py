"""What a run logs while it trains: ``metrics.jsonl`` (one JSON line per record, mirrored to
TensorBoard) and the running figures of a log line (loss, learning rate, tokens/s, gradient
norms). The report (`tformer.visualization.report`) reads ``metrics.jsonl`` back.

(Named ``log``, not ``logging``: the standard library's module keeps its name.)
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from tformer.training.checkpoint import TrainState

log = logging.getLogger(__name__)


class MetricsLogger:
    """Appends one JSON line per record to ``metrics.jsonl`` and mirrors scalars to
    TensorBoard."""

    def __init__(self, run_dir: Path, active: bool) -> None:
        self.active = active
        self.path = run_dir / "metrics.jsonl"
        self.writer = None
        if active:
            try:
                from torch.utils.tensorboard import SummaryWriter  # optional at run time

                self.writer = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                log.info("tensorboard not installed: metrics.jsonl only")

    def log(self, split: str, step: int, record: dict[str, Any]) -> None:
        if not self.active:
            return
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps({"split": split, "step": step, **record}, ensure_ascii=False) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{split}/{key}", value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class Window:
    """Running figures between two log lines.

    With ``train.clip_grad_norm`` set, a record also carries ``grad_norm`` (the mean over the
    window of the gradient norm before clipping) and ``clipped`` (the share of those steps whose
    norm was above the limit, so were scaled down). The norms stay tensors until the log line:
    one host sync per line, not per step. Under DeepSpeed, which clips inside its own step,
    ``accelerator.clip_grad_norm_`` clips nothing and hands back the engine's recorded norm:
    this step's, before clipping, since ``accelerator.backward`` has already run the engine's
    step (ZeRO-2 and ZeRO-3 on 2 CPU processes: equal to DDP's within 1.2e-7,
    tests/test_distributed.py).
    """

    def __init__(self, state: TrainState, clip: float | None) -> None:
        self.state, self.losses, self.tokens, self.start = state, [], 0, time.perf_counter()
        self.clip, self.grad_norms = clip, []

    def add(self, loss: float) -> None:
        self.losses.append(loss)

    def add_grad_norm(self, norm: torch.Tensor | float | None) -> None:
        if norm is not None:
            self.grad_norms.append(torch.as_tensor(norm, dtype=torch.float32))

    def flush(self, accelerator: Accelerator, lr: float) -> dict[str, float]:
        now = time.perf_counter()
        elapsed = now - self.start
        tokens = self.tokens
        if accelerator.num_processes > 1:
            tokens = int(accelerator.reduce(torch.tensor(tokens, device=accelerator.device),
                                            "sum"))
        self.state.tokens_seen += tokens
        record = {"loss": sum(self.losses) / max(len(self.losses), 1), "lr": lr,
                  "tokens_per_s": tokens / max(elapsed, 1e-9), "tokens_seen": self.state.tokens_seen}
        if self.grad_norms:
            norms = torch.stack(self.grad_norms)
            record["grad_norm"] = float(norms.mean())
            record["clipped"] = (norms > self.clip).sum().item() / len(norms)  # 0.88, not 0.8799...
        self.losses, self.tokens, self.start, self.grad_norms = [], 0, now, []
        return record
