"""The training loss on CPU: ``tformer.model.compute_loss`` against ``F.cross_entropy``.

    .venv/bin/python bench/loss.py                 # loss alone, then whole training steps (~1.5 min)
    .venv/bin/python bench/loss.py --repeats 11    # more repetitions, steadier medians

Two measurements, each side by side in one process, the two sides alternating at every
repetition so that the machine's drifting load falls on both alike:

1. **The loss alone**: forward and backward of label-smoothed (ε 0.1) cross-entropy over
   (N, V) float32 logits with a tenth of the labels ignored (padding), at N = 4,096 target
   positions (a 4,096-token Multi30k batch) and V = 8,000 and 32,000.
2. **A whole training step** (forward, loss, backward, AdamW step; eager fp32) of the Multi30k
   recipe's model (``recipes/multi30k_moses.yaml`` for runs six to ten: d_model 128, 4+4 layers,
   4 heads, d_ff 256, V 8,000, dropout 0.3; V 5,000 since the eleventh run), on a batch of
   256 random pairs of 16 + 16 tokens, with either loss.

Both losses give the same value (printed) and gradient (``tests/test_transformer.py``).
Prints the median milliseconds of each side and the ratio torch / tformer.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from side_by_side import RECIPE_MODEL, parse_args, recipe_step, side_by_side  # noqa: E402

from tformer.model import build_transformer, compute_loss  # noqa: E402


def torch_loss(logits: torch.Tensor, labels: torch.Tensor, eps: float) -> torch.Tensor:
    # PyTorch's own, as compute_loss called it before (float32 softmax, -100 ignored)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1),
                           ignore_index=-100, label_smoothing=eps)


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
                                                   "torch": run(torch_loss)}, repeats,
                 peer="F.cross_entropy")


def training_step(repeats: int) -> None:
    torch.manual_seed(0)
    model = build_transformer(RECIPE_MODEL).train()
    side_by_side("training step, Multi30k recipe model, B=256 S=T=16",
                 {"tformer": recipe_step(model, compute_loss),
                  "torch": recipe_step(model, torch_loss)}, repeats, peer="F.cross_entropy")


def main() -> None:
    args = parse_args(__doc__)
    for vocab in (8000, 32000):
        loss_alone(4096, vocab, args.repeats)
    training_step(args.repeats)


if __name__ == "__main__":
    main()
