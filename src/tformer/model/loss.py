"""The one loss used by training and evaluation."""

from __future__ import annotations

from torch import Tensor

from tformer.model import kernels

IGNORE_INDEX = -100  # label value of padding; the Hugging Face and PyTorch convention


def compute_loss(logits: Tensor, labels: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Mean token cross-entropy over positions whose label is not ``IGNORE_INDEX``.

    logits: (B, T, V) or (N, V); labels: (B, T) or (N,). The softmax runs in float32 whatever
    the autocast dtype: bf16 log-probabilities over a large vocabulary lose too many bits.
    ``label_smoothing`` ε spreads ε of the target mass uniformly over the vocabulary (section 5.4
    of the paper uses ε = 0.1). ``kernels.cross_entropy`` is ``F.cross_entropy``, computed
    faster on CPU.
    """
    logits = logits.reshape(-1, logits.size(-1)).float()  # (N, V)
    labels = labels.reshape(-1)  # (N,)
    return kernels.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX,
                                 label_smoothing=label_smoothing)
