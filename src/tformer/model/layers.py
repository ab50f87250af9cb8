"""The pieces of a Transformer layer: feed-forward network, normalization, positions,
embeddings, and the encoder and decoder layers (Vaswani et al. 2017, sections 3.1, 3.3-3.5).
A decoder layer without cross-attention is the layer of the decoder-only family (GPT).

Dimension names: B batch, S source length, T target length, D d_model, F d_ff, V vocabulary.
Dropout (section 5.4) is ``kernels.dropout(x, P_drop, training)``: ``F.dropout``, with a faster
mask on CPU (``tformer.model.kernels``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tformer.model import kernels
from tformer.model.attention import DecoderCache, MultiHeadAttention


def gelu_tanh(x: Tensor) -> Tensor:
    """GELU's tanh approximation, GPT-2's (Hugging Face's ``gelu_new``):
    0.5 x (1 + tanh(√(2/π) (x + 0.044715 x³)))."""
    return F.gelu(x, approximate="tanh")


# silu(x) = x σ(x) (Ramachandran et al. 2017); gated, it makes SwiGLU (Shazeer 2020).
_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "gelu_tanh": gelu_tanh, "silu": F.silu}


class FeedForward(nn.Module):
    """FFN(x) = max(0, x W1 + b1) W2 + b2, applied at every position alone (section 3.3).

    ``gated=True`` gives the GLU variant (Shazeer 2020): (act(x W1) * x W3) W2; with
    ``activation="silu"`` it is SwiGLU, Llama's: (silu(x W1) ⊙ x W3) W2.
    No dropout inside, as in the paper (section 5.4 drops only sublayer outputs and embeddings);
    ``nn.TransformerEncoderLayer`` adds one on the (B, T, F) hidden activation, the widest
    tensor of the layer, which measured as the costliest dropout on CPU.
    """

    def __init__(
        self, d_model: int, d_ff: int, activation: str = "relu", gated: bool = False,
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.act = _ACTIVATIONS[activation]
        self.w1 = nn.Linear(d_model, d_ff, bias=bias)
        self.w3 = nn.Linear(d_model, d_ff, bias=bias) if gated else None
        self.w2 = nn.Linear(d_ff, d_model, bias=bias)

    def forward(self, x: Tensor) -> Tensor:  # (B, T, D) -> (B, T, D)
        h = self.act(self.w1(x))  # (B, T, F)
        if self.w3 is not None:
            h = h * self.w3(x)
        return self.w2(h)


class RMSNorm(nn.Module):
    """RMSNorm(x) = g ⊙ x / √(mean(x²) + ε) (Zhang and Sennrich 2019), over the D features.

    LayerNorm without the mean: it rescales but does not re-centre, and has no bias. Computed in
    float32 whatever the input's type (as Llama), since mean(x²) of a wide bf16 vector loses
    the bits the division needs.
    """

    def __init__(self, d_model: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d_model))  # g
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:  # (..., D) -> (..., D)
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def make_norm(kind: str, d_model: int, eps: float) -> nn.Module:
    """The normalization a config names: ``layernorm`` (the paper) or ``rmsnorm``."""
    return RMSNorm(d_model, eps) if kind == "rmsnorm" else nn.LayerNorm(d_model, eps=eps)


def sinusoidal_positions(positions: Tensor, d_model: int) -> Tensor:
    """PE(pos, 2i) = sin(pos / 10000^(2i/D)), PE(pos, 2i+1) = cos(pos / 10000^(2i/D)) (section 3.5).

    positions: integer positions of any shape, e.g. (T,) -> (T, D) or (B, T) -> (B, T, D). Each
    pair of dimensions is a rotation at its own frequency, so PE(pos + k) is a linear function of
    PE(pos): relative offsets are easy to read. Computed on demand (T × D sines are cheap) so any
    length works.
    """
    inv_freq = torch.exp(
        torch.arange(0, d_model, 2, device=positions.device, dtype=torch.float32)
        * (-math.log(10000.0) / d_model)
    )  # (D/2,)
    angles = positions.float()[..., None] * inv_freq  # (..., D/2)
    pe = torch.zeros(*positions.shape, d_model, device=positions.device)
    pe[..., 0::2] = torch.sin(angles)
    pe[..., 1::2] = torch.cos(angles[..., : d_model // 2])
    return pe


class Embeddings(nn.Module):
    """Token embedding × √D plus positions, then dropout (sections 3.4, 3.5, 5.4).

    The scale matters with tied weights: the embedding matrix is initialised with std D^-1/2
    (right for the output projection), and √D brings the token vectors back to unit scale so
    the positions do not drown them. With rotary positions (``positional="rope"``) nothing is
    added here: the attention rotates queries and keys instead (``tformer.model.rotary``).
    """

    def __init__(
        self, token: nn.Embedding, positional: str, max_positions: int, scale: bool,
        dropout: float,
    ) -> None:
        super().__init__()
        self.token = token
        d_model = token.embedding_dim
        self.learned = nn.Embedding(max_positions, d_model) if positional == "learned" else None
        self.additive = positional != "rope"  # sinusoidal or learned vectors are added
        self.max_positions = max_positions
        self.scale = math.sqrt(d_model) if scale else 1.0
        self.p_drop = dropout  # P_drop, section 5.4

    @staticmethod
    def positions(ids: Tensor, offset: int | Tensor = 0) -> Tensor:
        """The positions of ``ids`` (B, T) that start at ``offset``: (1, T) for an int, (B, T)
        for a (B,) tensor, one start per row (rows whose histories differ in length, as in
        continuous batching)."""
        steps = torch.arange(ids.size(1), device=ids.device)
        if isinstance(offset, Tensor):
            return offset.to(ids.device)[:, None] + steps  # (B, T)
        return (offset + steps)[None]  # (1, T)

    def forward(self, ids: Tensor, offset: int | Tensor = 0,
                positions: Tensor | None = None) -> Tensor:  # (B, T) -> (B, T, D)
        """``offset``: position of ``ids[:, 0]`` (see :meth:`positions`); or the ``positions``
        (B, T) themselves (left padding, packed documents)."""
        given = positions is not None
        if positions is None:
            positions = self.positions(ids, offset)
        x = self.token(ids) * self.scale
        if not self.additive:
            return kernels.dropout(x, self.p_drop, self.training)
        if self.learned is not None:
            if not given and not isinstance(offset, Tensor):  # known without reading back
                last = offset + ids.size(1) - 1
            elif torch.compiler.is_compiling() or not positions.numel():
                # reading a tensor back would break the graph: the table lookup itself still
                # refuses an index past its end
                last = 0
            else:  # (on a GPU, .max() of a tensor waits for the device)
                last = int(positions.max())
            if last >= self.max_positions:
                raise ValueError(
                    f"sequence of length {last + 1} exceeds max_positions="
                    f"{self.max_positions} of the learned position table"
                )
            pos = self.learned(positions)
        else:
            pos = sinusoidal_positions(positions, x.size(-1)).to(x.dtype)
        return kernels.dropout(x + pos, self.p_drop, self.training)


class EncoderLayerOutput(NamedTuple):
    hidden: Tensor  # (B, S, D)
    self_weights: Tensor | None  # (B, H, S, S)


class DecoderLayerOutput(NamedTuple):
    hidden: Tensor  # (B, T, D)
    self_weights: Tensor | None  # (B, H, T, T_past + T)
    cross_weights: Tensor | None  # (B, H, T, S)


class EncoderLayer(nn.Module):
    """Self-attention then FFN, each wrapped in dropout, a residual connection and a norm.

    Post-norm (the paper, section 3.1): x = Norm(x + Sublayer(x)).
    Pre-norm (``norm_first``):           x = x + Sublayer(Norm(x)): trains deep stacks
    without warmup tricks (Xiong et al. 2020) but needs a final norm after the stack.
    Norm is LayerNorm, or RMSNorm with ``norm="rmsnorm"``.
    """

    def __init__(
        self, self_attn: MultiHeadAttention, ffn: FeedForward, d_model: int, dropout: float,
        norm_first: bool, eps: float, norm: str = "layernorm",
    ) -> None:
        super().__init__()
        self.self_attn, self.ffn = self_attn, ffn
        self.norm1 = make_norm(norm, d_model, eps)
        self.norm2 = make_norm(norm, d_model, eps)
        self.p_drop = dropout  # P_drop, section 5.4
        self.norm_first = norm_first

    def forward(self, x: Tensor, mask: Tensor | None, need_weights: bool = False,
                rotary: tuple[Tensor, Tensor] | None = None) -> EncoderLayerOutput:
        """``rotary``: the (cos, sin) of rotary positions, or None."""
        def attend(h: Tensor) -> tuple[Tensor, Tensor | None]:
            return self.self_attn(h, mask=mask, need_weights=need_weights, rotary=rotary)

        if self.norm_first:
            a, w = attend(self.norm1(x))
            x = x + kernels.dropout(a, self.p_drop, self.training)
            x = x + kernels.dropout(self.ffn(self.norm2(x)), self.p_drop, self.training)
        else:
            a, w = attend(x)
            x = self.norm1(x + kernels.dropout(a, self.p_drop, self.training))
            x = self.norm2(x + kernels.dropout(self.ffn(x), self.p_drop, self.training))
        return EncoderLayerOutput(x, w)


class DecoderLayer(nn.Module):
    """Causal self-attention, cross-attention over the encoder output, then FFN (section 3.1).

    Without cross-attention (``cross_attn=None``, and then no ``norm2``) it is the layer of a
    decoder-only model: causal self-attention, then FFN, as GPT's and Llama's.
    """

    def __init__(
        self, self_attn: MultiHeadAttention, cross_attn: MultiHeadAttention | None,
        ffn: FeedForward, d_model: int, dropout: float, norm_first: bool, eps: float,
        norm: str = "layernorm",
    ) -> None:
        super().__init__()
        self.self_attn, self.cross_attn, self.ffn = self_attn, cross_attn, ffn
        self.norm1 = make_norm(norm, d_model, eps)
        self.norm2 = make_norm(norm, d_model, eps) if cross_attn is not None else None
        self.norm3 = make_norm(norm, d_model, eps)
        self.p_drop = dropout  # P_drop, section 5.4
        self.norm_first = norm_first

    def forward(
        self, x: Tensor, memory: Tensor | None, memory_mask: Tensor | None,
        cache: DecoderCache | None = None, need_weights: bool = False,
        self_mask: Tensor | None = None, rotary: tuple[Tensor, Tensor] | None = None,
    ) -> DecoderLayerOutput:
        """``self_mask`` (B, 1, 1 or T, T_past + T), True at the keys a row may see: rows whose
        cached histories differ in length (continuous batching; see `Transformer.decode`), or
        padding and packed documents in a decoder-only model. ``rotary``: the (cos, sin) of
        rotary positions, or None."""

        def self_block(h: Tensor) -> tuple[Tensor, Tensor | None]:
            return self.self_attn(h, mask=self_mask, is_causal=True, cache=cache,
                                  need_weights=need_weights, rotary=rotary)

        def cross_block(h: Tensor) -> tuple[Tensor, Tensor | None]:
            return self.cross_attn(
                h, memory, mask=memory_mask, cache=cache, need_weights=need_weights
            )

        wc = None
        if self.norm_first:
            a, ws = self_block(self.norm1(x))
            x = x + kernels.dropout(a, self.p_drop, self.training)
            if self.cross_attn is not None:
                c, wc = cross_block(self.norm2(x))
                x = x + kernels.dropout(c, self.p_drop, self.training)
            x = x + kernels.dropout(self.ffn(self.norm3(x)), self.p_drop, self.training)
        else:
            a, ws = self_block(x)
            x = self.norm1(x + kernels.dropout(a, self.p_drop, self.training))
            if self.cross_attn is not None:
                c, wc = cross_block(x)
                x = self.norm2(x + kernels.dropout(c, self.p_drop, self.training))
            x = self.norm3(x + kernels.dropout(self.ffn(x), self.p_drop, self.training))
        return DecoderLayerOutput(x, ws, wc)
