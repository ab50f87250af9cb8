"""Scaled dot-product attention and multi-head attention (Vaswani et al. 2017, section 3.2).

    Attention(Q, K, V) = softmax(Q Kᵀ / √d_k) V

with two options of later models: grouped-query attention (fewer key/value heads, each shared
by a group of query heads) and rotary positions applied to queries and keys
(``tformer.model.rotary``).

Dimension names: B batch, H heads, Hkv key/value heads, Tq query length, Tk key length,
D d_model, Dh = D / H. Masks follow ``tformer.model.masks``: True = may attend.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Protocol

import torch.nn.functional as F
from torch import Tensor, nn

from tformer.model import kernels
from tformer.model.masks import additive, causal_mask
from tformer.model.rotary import apply_rotary


class AttentionOutput(NamedTuple):
    output: Tensor  # (B, Tq, D) for multi-head attention, (B, H, Tq, Dh) for the bare function
    weights: Tensor | None  # (B, H, Tq, Tk) when asked for, else None


def attention_math(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    dropout_p: float = 0.0,
) -> AttentionOutput:
    """The formula written out; returns the attention weights too.

    q: (B, H, Tq, Dh), k and v: (B, H, Tk, Dh), mask broadcastable to (B, H, Tq, Tk).
    Dividing by √Dh keeps the logits' variance near 1 when q and k have unit-variance
    components, so the softmax does not saturate into near one-hot rows with tiny gradients
    (section 3.2.1).
    """
    # (Q / √Dh) Kᵀ rather than (Q Kᵀ) / √Dh: the same numbers, but the division touches Tq × Dh
    # values instead of Tq × Tk, forward and backward (bench/attention.py, case "weights").
    scores = (q / math.sqrt(q.size(-1))) @ k.transpose(-2, -1)  # (B, H, Tq, Tk)
    if mask is not None:
        # -inf gives an exact 0 weight after the softmax at masked keys. It is added as a bias the
        # size of the mask ((B, 1, 1, Tk) for padding) rather than written with masked_fill: an
        # addition has no backward work, masked_fill one more pass over the (Tq, Tk) gradient.
        # In place, because the matmul's backward needs q and k, not the scores it produced.
        scores += additive(mask, scores.dtype)
    weights = scores.softmax(dim=-1)
    dropped = F.dropout(weights, p=dropout_p) if dropout_p > 0 else weights
    return AttentionOutput(dropped @ v, weights)  # (B, H, Tq, Dh)


def attention_fast(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
) -> Tensor:
    """Same result as :func:`attention_math` through PyTorch's fused kernels (flash or
    memory-efficient attention where the device has them): the (Tq, Tk) weight matrix is never
    materialised, so memory grows linearly with the length.

    ``is_causal=True`` (square, no cache) lets the kernel skip masked blocks instead of reading
    a mask tensor.
    """
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal
    )


def repeat_kv(x: Tensor, groups: int) -> Tensor:
    """(B, Hkv, T, Dh) -> (B, Hkv · groups, T, Dh): query head h reads key/value head
    h // groups (grouped-query attention, Ainslie et al. 2023; as Hugging Face's ``repeat_kv``)."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


class DecoderCache(Protocol):
    """Keys and values kept between decoding steps, per decoder layer.

    Self-attention keys/values grow by the new positions at each step; cross-attention
    keys/values are computed from the encoder output once, at the first step.
    ``tformer.model.KVCache`` implements it in plain torch; the Hugging Face adapter implements
    it over ``transformers.EncoderDecoderCache`` so that ``generate()`` manages one cache.
    """

    def seq_length(self) -> int: ...
    def update_self(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]: ...
    def get_cross(self, layer: int) -> tuple[Tensor, Tensor] | None: ...
    def set_cross(self, layer: int, k: Tensor, v: Tensor) -> None: ...


class MultiHeadAttention(nn.Module):
    """MultiHead(Q, K, V) = Concat(head_1, ..., head_H) Wᴼ, head_i = Attention(Q Wᵢᑫ, K Wᵢᴷ, V Wᵢⱽ).

    The H per-head projections are one (D -> D) matrix each for Q, K and V, stored stacked as
    ``in_proj`` (3D, D): self-attention projects all three in one matmul. This is also the layout
    of ``torch.nn.MultiheadAttention``, so weights copy across one to one.

    Grouped-query attention (``n_kv_heads`` < ``n_heads``, Ainslie et al. 2023): K and V have
    Hkv heads, each read by H / Hkv query heads, so ``in_proj`` is (D + 2 Hkv Dh, D) and the
    cache holds Hkv heads: H / Hkv times less memory per decoded token.
    """

    def __init__(
        self, d_model: int, n_heads: int, dropout: float = 0.0, bias: bool = True, layer: int = 0,
        n_kv_heads: int | None = None,
    ) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        n_kv_heads = n_kv_heads or n_heads
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads ({n_heads}) must be divisible by n_kv_heads ({n_kv_heads})")
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = d_model // n_heads
        self.dropout = dropout
        self.layer = layer  # index in the decoder stack, the key into a DecoderCache
        self.d_kv = n_kv_heads * self.head_dim  # width of K and of V: D without GQA
        self.in_proj = nn.Linear(d_model, d_model + 2 * self.d_kv, bias=bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)

    def _split_heads(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        return x.view(b, t, -1, self.head_dim).transpose(1, 2)  # (B, H or Hkv, T, Dh)

    def memory_kv(self, memory: Tensor) -> tuple[Tensor, Tensor]:
        """Cross-attention keys and values of ``memory`` (B, Tk, D) -> 2 × (B, Hkv, Tk, Dh): what
        a decoder computes once per source and then reads from its cache."""
        d = memory.size(-1)
        w_kv = self.in_proj.weight[d:]
        b_kv = None if self.in_proj.bias is None else self.in_proj.bias[d:]
        k, v = F.linear(memory, w_kv, b_kv).split(self.d_kv, dim=-1)  # 2 × (B, Tk, Hkv Dh)
        return self._split_heads(k), self._split_heads(v)

    def forward(
        self,
        x: Tensor,
        memory: Tensor | None = None,
        mask: Tensor | None = None,
        is_causal: bool = False,
        cache: DecoderCache | None = None,
        need_weights: bool = False,
        rotary: tuple[Tensor, Tensor] | None = None,
    ) -> AttentionOutput:
        """Self-attention when ``memory`` is None, else cross-attention of ``x`` over ``memory``.

        x: (B, Tq, D); memory: (B, Tk, D); mask broadcastable to (B, H, Tq, Tk);
        ``is_causal`` adds the causal mask (self-attention only). With ``cache`` the keys and
        values of earlier steps are reused instead of being recomputed. ``rotary``: the
        (cos, sin) of the queries' positions (``rotary.rotary_cos_sin``), which rotate queries
        and keys (self-attention only; the cache keeps keys rotated).
        """
        d = x.size(-1)
        if memory is None:
            q, k, v = self.in_proj(x).split([d, self.d_kv, self.d_kv], dim=-1)  # (B, Tq, ·)
            q, k, v = self._split_heads(q), self._split_heads(k), self._split_heads(v)
            if rotary is not None:
                q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
            if cache is not None:
                k, v = cache.update_self(self.layer, k, v)  # (B, Hkv, past + Tq, Dh)
        else:
            cached = cache.get_cross(self.layer) if cache is not None else None
            if cached is None:
                k, v = self.memory_kv(memory)
                if cache is not None:
                    cache.set_cross(self.layer, k, v)
            else:
                k, v = cached
            w_q = self.in_proj.weight[:d]
            q = F.linear(x, w_q, None if self.in_proj.bias is None else self.in_proj.bias[:d])
            q = self._split_heads(q)  # (B, H, Tq, Dh)
        groups = self.n_heads // self.n_kv_heads
        k, v = repeat_kv(k, groups), repeat_kv(v, groups)  # (B, H, Tk, Dh)

        tq, tk = q.size(2), k.size(2)
        if is_causal and tq == 1:
            # One query at the end of the sequence (a cached decoding step) sees every key:
            # no mask at all, so the kernel can take its fastest path.
            is_causal = False
        # The formula written out when the weights are wanted, or where it is the faster path
        # (short keys on CPU); PyTorch's kernel otherwise.
        written_out = need_weights or kernels.written_out_attention_is_faster(q, k)
        if is_causal and (mask is not None or tq != tk or written_out):
            # The kernel's own causal flag assumes Tq == Tk and no other mask: build it instead.
            causal = causal_mask(tq, tk, x.device)
            mask = causal if mask is None else mask & causal
            is_causal = False

        dropout_p = self.dropout if self.training else 0.0
        if written_out:
            out, weights = attention_math(q, k, v, mask, dropout_p)  # is_causal is a mask here
            weights = weights if need_weights else None
        else:
            out, weights = attention_fast(q, k, v, mask, dropout_p, is_causal), None
        b = out.size(0)
        out = out.transpose(1, 2).reshape(b, tq, d)  # (B, H, Tq, Dh) -> (B, Tq, D): concat heads
        return AttentionOutput(self.out_proj(out), weights)
