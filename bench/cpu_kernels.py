"""Dropout and attention on CPU: tformer's own paths against PyTorch's kernels, side by side.

    .venv/bin/python bench/cpu_kernels.py                # all three parts (~20 s, quiet machine)
    .venv/bin/python bench/cpu_kernels.py --repeats 9    # steadier medians

tformer's model takes two hand-written paths on CPU (float32, eager), because PyTorch's are slow
at the sizes of a small model:

- ``tformer.model.kernels.dropout`` builds its mask from 16-bit slices of 64-bit random words,
  where ``F.dropout`` draws one Bernoulli sample per element;
- ``MultiHeadAttention`` uses the formula written out (``attention_math``) instead of
  ``F.scaled_dot_product_attention`` when the keys are at most
  ``tformer.model.kernels.written_out_max_keys`` long and there is more than one query
  (``kernels.written_out_attention_is_faster``).

Three measurements, each side by side in one process, the sides alternating at every repetition
so that the machine's drifting load falls on both alike (medians printed, ratio torch / tformer):

1. **Dropout alone**, forward and backward, p 0.3, on a (256, 16, 128) tensor (a sublayer output
   of the Multi30k recipe's model on a 4,096-token batch).
2. **Attention alone**, forward and backward, 4 heads of 32, padding mask, 4,096 query positions
   split into sequences of 16 to 512 (where the written-out path is used up to 64 keys).
3. **A whole training step** (forward, loss, backward, AdamW step) of the Multi30k recipe's model
   (``recipes/multi30k_moses.yaml`` for runs six to ten: d_model 128, 4+4 layers, d_ff 256,
   V 8,000, dropout 0.3; the recipe has V 5,000 since the eleventh run)
   on 256 random pairs of 16 + 16 tokens: the model as it is, against the same model with
   ``kernels.dropout = F.dropout`` and ``kernels.written_out_max_keys = 0`` (PyTorch's kernels
   for both; the loss is ``compute_loss`` on both sides, ``bench/loss.py`` measures it).

The two attention paths give the same outputs and gradients (``tests/test_attention.py``); the
dropout mask draws other random numbers than ``F.dropout`` and is tested against the definition
of dropout (``tests/test_kernels.py``).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from side_by_side import RECIPE_MODEL, parse_args, recipe_step, side_by_side  # noqa: E402

from tformer.model import build_transformer, compute_loss, kernels  # noqa: E402
from tformer.model.attention import attention_math  # noqa: E402


def forward_backward(fn, *inputs: torch.Tensor):
    grad = None

    def step():
        nonlocal grad
        out = fn()
        grad = torch.randn_like(out) if grad is None else grad
        out.backward(grad)
        for x in inputs:
            x.grad = None
    return step


def dropout_alone(repeats: int) -> None:
    x = torch.randn(256, 16, 128, requires_grad=True)
    side_by_side("dropout alone, (256, 16, 128), p 0.3, forward + backward",
                 {"tformer": forward_backward(lambda: kernels.dropout(x, 0.3, True), x),
                  "torch": forward_backward(lambda: F.dropout(x, 0.3, True), x)}, repeats)


def attention_alone(repeats: int) -> None:
    heads, head_dim, positions = 4, 32, 4096
    for length in (16, 32, 64, 128, 256, 512):
        batch = positions // length
        q, k, v = (torch.randn(batch, heads, length, head_dim, requires_grad=True)
                   for _ in range(3))
        mask = torch.ones(batch, 1, 1, length, dtype=torch.bool)
        mask[::3, ..., length * 3 // 4:] = False  # a third of the sequences padded by a quarter

        def ours(q=q, k=k, v=v, mask=mask):
            return attention_math(q, k, v, mask).output

        def theirs(q=q, k=k, v=v, mask=mask):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

        side_by_side(f"attention alone, {batch} x {length} positions, forward + backward",
                     {"tformer": forward_backward(ours, q, k, v),
                      "torch": forward_backward(theirs, q, k, v)}, repeats)


@contextmanager
def torch_dropout_and_attention() -> Iterator[None]:
    """The model on PyTorch's kernels: F.dropout, no written-out attention."""
    saved = kernels.dropout, kernels.written_out_max_keys
    kernels.dropout, kernels.written_out_max_keys = F.dropout, 0
    try:
        yield
    finally:
        kernels.dropout, kernels.written_out_max_keys = saved


def training_step(repeats: int) -> None:
    torch.manual_seed(0)
    ours = build_transformer(RECIPE_MODEL).train()
    torch.manual_seed(0)
    theirs = build_transformer(RECIPE_MODEL).train()
    theirs_step = recipe_step(theirs, compute_loss)

    def torch_step() -> None:
        with torch_dropout_and_attention():
            theirs_step()

    side_by_side("training step, Multi30k recipe model, B=256 S=T=16",
                 {"tformer": recipe_step(ours, compute_loss), "torch": torch_step}, repeats)


def main() -> None:
    args = parse_args(__doc__)
    print(f"written_out_max_keys {kernels.written_out_max_keys}")
    dropout_alone(args.repeats)
    attention_alone(args.repeats)
    training_step(args.repeats)


if __name__ == "__main__":
    main()
