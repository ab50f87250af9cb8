"""CPU-speed kernels: the three places where PyTorch's own CPU path is slow at a small model's
sizes, each behind one call from the paper's code.

- :func:`dropout` stands for ``F.dropout`` (residual and embedding dropout, ``layers.py``);
- :func:`written_out_attention_is_faster` chooses between the formula written out and
  ``F.scaled_dot_product_attention`` (``MultiHeadAttention``, ``attention.py``);
- :func:`cross_entropy` stands for ``F.cross_entropy`` (``compute_loss``, ``loss.py``).

Each computes what it stands for (``tests/test_kernels.py``) and takes its own path only on
CPU tensors in eager mode (:func:`applies`): on other devices PyTorch's kernels are the fast
ones, and under ``torch.compile`` inductor generates fused code of its own (random numbers
included) that a hand-written path would only get in the way of. Each reason below is a
figure measured side by side by a committed script (``docs/benchmarks.md`` has the tables):

- ``bench/cpu_kernels.py``: dropout 3.2× faster alone, short attention 1.3-2.9×, and both
  together 1.27× on a training step of the Multi30k recipe's model;
- ``bench/loss.py``: the loss 1.5× faster at V = 8,000 and 2.5× at V = 32,000, 1.11× on a
  training step.

``enabled = False`` turns all three off: PyTorch's path everywhere, e.g. to compare draw for
draw with ``F.dropout``. (``bench/cpu_kernels.py``'s baseline replaces only ``dropout`` and
``written_out_max_keys``, keeping the loss, which ``bench/loss.py`` measures.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

#: False: every kernel here calls PyTorch's own path.
enabled = True


def applies(x: Tensor) -> bool:
    """Whether the hand-written paths are used for ``x``: a CPU tensor, in eager mode."""
    return enabled and x.device.type == "cpu" and not torch.compiler.is_compiling()


# -- Dropout ---------------------------------------------------------------------------------


def dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """``F.dropout(x, p, training)``: zero each element with probability p, scale the rest by
    1 / (1 - p); on CPU with a faster mask.

    Why: PyTorch's CPU dropout draws one Bernoulli sample per element. For the (256, 16, 128)
    sublayer outputs of the Multi30k recipe it took 6.1 ms forward and backward, about 13% of
    a training step over the step's 22 dropouts; the mask here, 16-bit slices of 64-bit random
    words compared with a threshold (4 elements per draw of the generator), takes 1.9 ms
    (3.2×, ``bench/cpu_kernels.py``). The probability is rounded to a multiple of 1/65536 and
    the scale is exact for it, so the expected output still equals the input. Seeded by
    ``torch.manual_seed`` like every CPU draw, but the masks differ from ``F.dropout``'s.
    """
    if not training:
        return x  # what F.dropout returns then, without its call (a decoding step makes 13)
    if p in (0, 1) or not applies(x):
        return F.dropout(x, p, training)
    threshold = min(round(p * 65536), 65535)  # drop where the 16 bits, unsigned, are below it
    n = x.numel()
    # random_ over the whole int64 range gives 64 uniform bits per word (its default range
    # leaves the top bit 0); each word is read as four int16 values.
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_(-2**63, None)
    bits = words.view(torch.int16)[:n].view(x.shape)
    keep = bits >= threshold - 32768  # int16 is signed: unsigned value = bits + 32768
    return (x * keep).mul_(65536 / (65536 - threshold))  # autograd keeps the bool mask only


# -- Attention for short sequences ---------------------------------------------------------

#: Longest key sequence for which :func:`written_out_attention_is_faster` holds; 0 = never.
written_out_max_keys = 64


def written_out_attention_is_faster(q: Tensor, k: Tensor) -> bool:
    """Whether the formula written out (``attention.attention_math``) beats
    ``F.scaled_dot_product_attention`` for queries q (B, H, Tq, Dh) over keys k (B, H, Tk, Dh).

    Why: PyTorch's CPU flash kernel pays a fixed cost per (batch, head) block that dominates
    for short sequences. With 4,096 query positions, 4 heads of 32, forward and backward, the
    written-out formula was 2.9× faster at 16 keys, 1.3-1.4× at 32 and 64, 0.77× at 128 and
    slower beyond (``bench/cpu_kernels.py``). It stores the (B, H, Tq, Tk) weights for the
    backward, small at these lengths. In float32 only, and for more than one query: a cached
    decoding step (one query) is faster in the kernel.
    """
    return (q.dtype == torch.float32 and q.size(2) > 1 and k.size(2) <= written_out_max_keys
            and applies(q))


# -- Cross-entropy -----------------------------------------------------------------------------

# Elements of the (N, V) logits handled at once by _SmoothedCrossEntropy: 2^21 float32 are 8 MB
# (256 rows of an 8,000-piece vocabulary), about what stays in cache between its passes.
_CHUNK_ELEMENTS = 1 << 21


def cross_entropy(logits: Tensor, labels: Tensor, *, ignore_index: int = -100,
                  label_smoothing: float = 0.0) -> Tensor:
    """``F.cross_entropy(logits, labels, ignore_index=..., label_smoothing=...)``, the mean
    over the rows not ignored, for logits (N, V) and labels (N,); on CPU with gradients, by
    :class:`_SmoothedCrossEntropy` (1.5× faster at V = 8,000, 2.5× at V = 32,000:
    ``bench/loss.py``). Without gradients (validation) ``F.cross_entropy`` is as fast."""
    if logits.requires_grad and logits.numel() and applies(logits):
        return _SmoothedCrossEntropy.apply(logits, labels, ignore_index, label_smoothing)
    return F.cross_entropy(logits, labels, ignore_index=ignore_index,
                           label_smoothing=label_smoothing)


def _chunks(n_rows: int, vocab: int) -> list[slice]:
    rows = max(1, _CHUNK_ELEMENTS // vocab)
    return [slice(i, i + rows) for i in range(0, n_rows, rows)]


class _SmoothedCrossEntropy(torch.autograd.Function):
    """``F.cross_entropy(logits, labels, ignore_index, label_smoothing=ε)``, written out.

    Why: PyTorch's CPU path is slow where it matters most: log_softmax writes an (N, V) tensor
    of log-probabilities, and its backward plus the smoothing term make several more full
    passes (at N = 4,096 and V = 8,000: 184 ms against 121 ms here, of a 0.7-0.8 s training
    step on two cores; ``bench/loss.py``). Per row, with z = logsumexp(x):

        loss = (1 - ε)(z - x_y) + ε(z - mean(x))       d loss / dx = softmax(x) - (1 - ε)·1_y - ε/V

    so the forward needs one logsumexp and one mean, and the backward writes the gradient in
    one pass per chunk of rows (8 MB), while the chunk is in cache. Rows labelled
    ``ignore_index`` count for nothing; the mean is over the others, as in ``F.cross_entropy``.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, ignore_index: int,
                eps: float) -> Tensor:  # (N, V), (N,)
        keep = labels != ignore_index  # (N,)
        target = labels.masked_fill(~keep, 0)  # ignored rows read column 0, count for nothing
        lse = torch.cat([torch.logsumexp(logits[rows], dim=-1)
                         for rows in _chunks(*logits.shape)])  # (N,)
        x_y = logits.gather(1, target[:, None]).squeeze(1)  # (N,)
        per_row = lse - (1 - eps) * x_y
        if eps:
            per_row = per_row - eps * logits.mean(dim=-1)
        count = keep.sum()
        ctx.save_for_backward(logits, target, keep, lse, count)
        ctx.eps = eps
        # 0/0 = nan when every label is ignored, as F.cross_entropy gives
        return per_row.masked_fill(~keep, 0.0).sum() / count

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        logits, target, keep, lse, count = ctx.saved_tensors
        eps, vocab = ctx.eps, logits.size(1)
        row_scale = (keep.to(logits.dtype) * (grad_output / count))[:, None]  # (N, 1)
        grad = torch.empty_like(logits)  # (N, V)
        chunks = _chunks(*logits.shape)
        on_target = torch.full((chunks[0].stop - chunks[0].start, 1), -(1 - eps),
                               dtype=logits.dtype)
        for rows in chunks:
            g = grad[rows]
            torch.sub(logits[rows], lse[rows, None], out=g)
            g.exp_()  # softmax
            if eps:
                g.sub_(eps / vocab)
            g.scatter_add_(1, target[rows, None], on_target[: g.size(0)])
            g.mul_(row_scale[rows])
        return grad, None, None, None
