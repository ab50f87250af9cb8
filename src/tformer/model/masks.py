"""Attention masks. One convention everywhere in tformer: **True = may attend**.

That is the convention of ``torch.nn.functional.scaled_dot_product_attention`` for boolean masks.
Other conventions are converted only at the edges: ``torch.nn.MultiheadAttention`` uses
True = ignore, Hugging Face uses 1 = keep (so ``attention_mask.bool()`` is already ours).

Masks are built broadcastable to the score shape (B, H, Tq, Tk), never expanded: the fast
attention kernels take them as they are.
"""

from __future__ import annotations

import torch
from torch import Tensor


def padding_mask(keep: Tensor) -> Tensor:
    """(B, Tk) with True at real tokens -> (B, 1, 1, Tk): every query may attend every real key."""
    return keep.bool()[:, None, None, :]


def causal_mask(tq: int, tk: int | None = None, device: torch.device | None = None) -> Tensor:
    """(1, 1, Tq, Tk): query i may attend key j iff j <= i + (Tk - Tq).

    With Tk > Tq the queries are the *last* Tq positions of the sequence (incremental decoding
    with Tk - Tq keys already cached), so the diagonal is aligned bottom-right.
    """
    tk = tq if tk is None else tk
    offset = tk - tq
    q = torch.arange(tq, device=device)[:, None]
    k = torch.arange(tk, device=device)[None, :]
    return (k <= q + offset)[None, None]


def combine(*masks: Tensor | None) -> Tensor | None:
    """Logical AND of broadcastable masks, skipping None; None if all are None."""
    out = None
    for mask in masks:
        if mask is not None:
            out = mask if out is None else out & mask
    return out


def additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """The mask as a bias to add to attention scores, same shape: 0 where True, -inf where
    False (an exact 0 weight after the softmax)."""
    return torch.zeros_like(mask, dtype=dtype).masked_fill_(~mask, float("-inf"))
