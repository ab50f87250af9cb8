"""The training loss on CPU: ``tformer.model.compute_loss`` against ``F.cross_entropy``.

    .venv/bin/python bench/loss.py                 # loss alone, then whole training steps (~1.5 min)
    .venv/bin/python bench/loss.py --repeats 11    # more repetitions, steadier medians

Two measurements, each side by side in one process, the two sides alternating at every
repetition so that the machine's drifting load falls on both alike:

1. **The loss alone**: forward and backward of label-smoothed (ε 0.1) cross-entropy over
   (N, V) float32 logits with a tenth of the labels ignored (padding), at N = 4,096 target
   positions (a 4,096-token Multi30k batch) and V = 8,000 and 32,000.
2. **A whole training step** (forward, loss, backward, AdamW step; eager fp32) of the Multi30k
   recipe's model (``recipes/multi30k_moses.yaml``: d_model 128, 4+4 layers, 4 heads, d_ff 256,
   V 8,000, dropout 0.3), on a batch of 256 random pairs of 16 + 16 tokens, with either loss.

Both losses give the same value (printed) and gradient (``tests/test_transformer.py``).
Prints the median milliseconds of each side and the ratio torch / tformer.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from tformer.model import build_transformer, compute_loss
from tformer.model.config import TransformerConfig


def torch_loss(logits: torch.Tensor, labels: torch.Tensor, eps: float) -> torch.Tensor:
    # PyTorch's own, as compute_loss called it before (float32 softmax, -100 ignored)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1),
                           ignore_index=-100, label_smoothing=eps)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000


def side_by_side(name: str, sides: dict, repeats: int) -> None:
    for fn in sides.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in sides}
    for r in range(repeats):
        order = list(sides) if r % 2 == 0 else list(reversed(sides))
        for k in order:
            times[k].append(timed(sides[k]))
    med = {k: statistics.median(v) for k, v in times.items()}
    ours, theirs = med["tformer"], med["torch"]
    print(f"{name}: tformer {ours:.1f} ms, F.cross_entropy {theirs:.1f} ms, "
          f"ratio {theirs / ours:.2f}x  (medians of {repeats})", flush=True)


def loss_alone(n: int, vocab: int, repeats: int) -> None:
    torch.manual_seed(0)
    logits = torch.randn(n, vocab, requires_grad=True)
    labels = torch.randint(0, vocab, (n,))
    labels[::10] = -100

    def run(loss_fn):
        def step():
            loss_fn(logits, labels, 0.1).backward()
            logits.grad = None
        return step

    a, b = compute_loss(logits, labels, 0.1).item(), torch_loss(logits, labels, 0.1).item()
    print(f"loss N={n} V={vocab}: values {a:.6f} (tformer) {b:.6f} (torch)")
    side_by_side(f"loss alone, N={n} V={vocab}", {"tformer": run(compute_loss),
                                                   "torch": run(torch_loss)}, repeats)


def training_step(repeats: int) -> None:
    torch.manual_seed(0)
    vocab, batch, length = 8000, 256, 16
    config = TransformerConfig(vocab_size=vocab, d_model=128, n_heads=4, n_encoder_layers=4,
                               n_decoder_layers=4, d_ff=256, dropout=0.3)
    model = build_transformer(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    src = torch.randint(4, vocab, (batch, length))  # (B, S)
    tgt = torch.randint(4, vocab, (batch, length))  # (B, T)
    labels = torch.randint(4, vocab, (batch, length))  # (B, T)
    mask = torch.ones(batch, length, dtype=torch.bool)

    def run(loss_fn):
        def step():
            loss_fn(model(src, tgt, mask).logits, labels, 0.1).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return step

    side_by_side("training step, Multi30k recipe model, B=256 S=T=16",
                 {"tformer": run(compute_loss), "torch": run(torch_loss)}, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads")
    for vocab in (8000, 32000):
        loss_alone(4096, vocab, args.repeats)
    training_step(args.repeats)


if __name__ == "__main__":
    main()
