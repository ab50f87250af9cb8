"""What bench/loss.py and bench/cpu_kernels.py share: timing two sides in one process, and a
training step of the Multi30k recipe's model on a fixed random batch."""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from tformer.model.config import TransformerConfig  # noqa: E402

Loss = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]


def side_by_side(name: str, sides: dict[str, Callable[[], object]], repeats: int,
                 peer: str = "torch") -> None:
    """Time ``sides["tformer"]`` and ``sides["torch"]`` alternately, ``repeats`` times each after
    one warm-up, so that the machine's drifting load falls on both alike; print the medians and
    the ratio torch / tformer (``peer`` names the torch side in the output)."""
    for fn in sides.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in sides}
    for r in range(repeats):
        for k in (list(sides) if r % 2 == 0 else list(reversed(sides))):
            start = time.perf_counter()
            sides[k]()
            times[k].append((time.perf_counter() - start) * 1000)
    ours, theirs = (statistics.median(times[k]) for k in ("tformer", "torch"))
    print(f"{name}: tformer {ours:.2f} ms, {peer} {theirs:.2f} ms, ratio {theirs / ours:.2f}x "
          f"(medians of {repeats})", flush=True)


# The Multi30k recipe's model (recipes/multi30k_moses.yaml, as it was for runs six to ten: V
# 8,000; since the eleventh run V 5,000 and 2,048-token batches) and a batch of 256 random pairs
# of 16 + 16 tokens, about those runs' 4,096-token batches. Kept so figures stay comparable.
RECIPE_MODEL = TransformerConfig(vocab_size=8000, d_model=128, n_heads=4, n_encoder_layers=4,
                                 n_decoder_layers=4, d_ff=256, dropout=0.3)


def recipe_step(model: nn.Module, loss: Loss, batch: int = 256, length: int = 16):
    """A function doing one eager training step (forward, ``loss``, backward, AdamW step) of
    ``model`` on a fixed random batch drawn from the current seed."""
    vocab = model.config.vocab_size
    src, tgt, labels = (torch.randint(4, vocab, (batch, length)) for _ in range(3))
    mask = torch.ones(batch, length, dtype=torch.bool)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        loss(model(src, tgt, mask).logits, labels, 0.1).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def parse_args(doc: str) -> argparse.Namespace:
    """--repeats and --threads; sets torch's threads and seed and prints the set-up."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {args.threads} threads")
    return args
