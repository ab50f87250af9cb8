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


def same_document(document_ids: Tensor) -> Tensor:
    """(B, T) document ids of a packed row -> (B, 1, T, T): query i may attend key j iff both
    belong to the same document (with the causal mask: only earlier tokens of its own)."""
    return (document_ids[:, :, None] == document_ids[:, None, :])[:, None]


def decoder_self_mask(keep: Tensor | None, document_ids: Tensor | None, tq: int,
                      tk: int) -> Tensor | None:
    """The self-attention mask of a decoder-only model: causal, AND the real keys of ``keep``
    (B, Tk) (Hugging Face's ``attention_mask``, past keys included), AND the same document
    (``document_ids`` (B, T), packed rows, no cache) -> (B, 1, Tq, Tk), or None when causal
    alone (then the kernel's own causal flag applies).

    Every query may attend itself even where ``keep`` is False: a left-padding query would
    otherwise see no key at all, and its softmax over nothing would be NaN, which a later
    layer's zero weight on it does not cancel (0 × NaN = NaN). Real queries never see it.
    """
    if keep is None and document_ids is None:
        return None
    device = (keep if keep is not None else document_ids).device
    mask = combine(causal_mask(tq, tk, device),
                   None if keep is None else padding_mask(keep),
                   None if document_ids is None else same_document(document_ids))
    q = torch.arange(tq, device=device)[:, None]
    itself = torch.arange(tk, device=device)[None, :] == q + (tk - tq)  # (Tq, Tk)
    return mask | itself
