"""The encoder-decoder Transformer (Vaswani et al. 2017, figure 1) and the decoder-only
Transformer (GPT: its decoder without cross-attention, Radford et al. 2018), built from the same
blocks by one factory.

Dimension names: B batch, S source length, T target length, H heads, D d_model, V vocabulary.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from tformer.model.attention import MultiHeadAttention
from tformer.model.config import TransformerConfig
from tformer.model.copy import CopyGenerator
from tformer.model.layers import (
    DecoderLayer,
    Embeddings,
    EncoderLayer,
    FeedForward,
    RMSNorm,
    make_norm,
)
from tformer.model.masks import decoder_self_mask, padding_mask
from tformer.model.rotary import rotary_cos_sin


class EncoderOutput(NamedTuple):
    hidden: Tensor  # (B, S, D)
    attentions: tuple[Tensor, ...] | None  # per layer (B, H, S, S)
    # the embedding output, then each layer's (the last after the final norm, if any): N + 1
    # tensors (B, S, D), as Hugging Face's ``output_hidden_states``
    hidden_states: tuple[Tensor, ...] | None = None


class DecoderOutput(NamedTuple):
    hidden: Tensor  # (B, T, D)
    self_attentions: tuple[Tensor, ...] | None  # per layer (B, H, T, T_past + T)
    cross_attentions: tuple[Tensor, ...] | None  # per layer (B, H, T, S)
    hidden_states: tuple[Tensor, ...] | None = None  # N + 1 tensors (B, T, D), as the encoder's


class Seq2SeqOutput(NamedTuple):
    logits: Tensor  # (B, T, V)
    encoder_hidden: Tensor  # (B, S, D)
    encoder_attentions: tuple[Tensor, ...] | None
    decoder_attentions: tuple[Tensor, ...] | None
    cross_attentions: tuple[Tensor, ...] | None


class DecoderOnlyOutput(NamedTuple):
    logits: Tensor  # (B, T, V); (B, K, V) for the last K positions with logits_to_keep=K
    hidden: Tensor  # (B, T, D), after the final norm
    attentions: tuple[Tensor, ...] | None  # per layer (B, H, T, T_past + T)
    hidden_states: tuple[Tensor, ...] | None  # N + 1 tensors (B, T, D), as the encoder's


class KVCache:
    """Plain-torch :class:`~tformer.model.attention.DecoderCache` for incremental decoding."""

    def __init__(self) -> None:
        self.self_kv: dict[int, tuple[Tensor, Tensor]] = {}
        self.cross_kv: dict[int, tuple[Tensor, Tensor]] = {}

    def seq_length(self) -> int:
        return self.self_kv[0][0].size(2) if self.self_kv else 0

    def update_self(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if layer in self.self_kv:
            pk, pv = self.self_kv[layer]
            k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)  # (B, H, past + T, Dh)
        self.self_kv[layer] = (k, v)
        return k, v

    def get_cross(self, layer: int) -> tuple[Tensor, Tensor] | None:
        return self.cross_kv.get(layer)

    def set_cross(self, layer: int, k: Tensor, v: Tensor) -> None:
        self.cross_kv[layer] = (k, v)

    def reorder(self, index: Tensor) -> None:
        """Keep batch rows ``index`` (beam search picks which hypotheses survive)."""
        for store in (self.self_kv, self.cross_kv):
            for layer, (k, v) in store.items():
                store[layer] = (k.index_select(0, index), v.index_select(0, index))


def _checkpoint(function, *args):
    """``function(*args)`` under ``torch.utils.checkpoint`` (non-reentrant, as Hugging Face's)."""
    return checkpoint(function, *args, use_reentrant=False)


class _Stack(nn.Module):
    """N identical layers; pre-norm stacks end with a norm, post-norm ones already do.

    Gradient checkpointing (``gradient_checkpointing = True``, what Hugging Face's
    ``gradient_checkpointing_enable()`` sets, with its own ``_gradient_checkpointing_func``) keeps
    only each layer's input for the backward pass and runs the layer again there: activation
    memory of one layer instead of N, for about one more forward pass. Dropout draws the same
    mask again (the checkpoint restores the random state), so the gradients are unchanged.
    """

    gradient_checkpointing = False

    def __init__(self, layers: list[nn.Module], final_norm: nn.Module | None) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.norm = final_norm
        self._gradient_checkpointing_func = _checkpoint

    def run(self, layer: nn.Module, *args):
        """``layer(*args)``, checkpointed when enabled and a backward pass will follow."""
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return self._gradient_checkpointing_func(layer.__call__, *args)
        return layer(*args)


class Encoder(_Stack):
    def forward(
        self, x: Tensor, mask: Tensor | None, need_weights: bool = False,
        need_hidden: bool = False, rotary: tuple[Tensor, Tensor] | None = None,
    ) -> EncoderOutput:
        weights, states = [], [x]
        for layer in self.layers:
            x, w = self.run(layer, x, mask, need_weights, rotary)
            weights.append(w)
            states.append(x)
        if self.norm is not None:
            x = self.norm(x)
            states[-1] = x
        return EncoderOutput(x, tuple(weights) if need_weights else None,
                             tuple(states) if need_hidden else None)


class Decoder(_Stack):
    def forward(
        self, x: Tensor, memory: Tensor | None, memory_mask: Tensor | None, cache=None,
        need_weights: bool = False, self_mask: Tensor | None = None, need_hidden: bool = False,
        rotary: tuple[Tensor, Tensor] | None = None,
    ) -> DecoderOutput:
        """``memory`` None: a decoder-only stack (its layers have no cross-attention)."""
        self_w, cross_w, states = [], [], [x]
        for layer in self.layers:
            if cache is None:
                x, ws, wc = self.run(layer, x, memory, memory_mask, None, need_weights, self_mask,
                                     rotary)
            else:  # never checkpointed: running the layer again would write the cache twice
                x, ws, wc = layer(x, memory, memory_mask, cache, need_weights, self_mask, rotary)
            self_w.append(ws)
            cross_w.append(wc)
            states.append(x)
        if self.norm is not None:
            x = self.norm(x)
            states[-1] = x
        hidden_states = tuple(states) if need_hidden else None
        if not need_weights:
            return DecoderOutput(x, None, None, hidden_states)
        return DecoderOutput(x, tuple(self_w), tuple(cross_w), hidden_states)


class Transformer(nn.Module):
    """Embeddings, encoder, decoder and output projection. Build it with :func:`build_transformer`.

    Masks are boolean, True = may attend; ``source_mask`` is (B, S) with True at real tokens
    (a Hugging Face ``attention_mask.bool()``). The decoder is always causal.
    """

    def __init__(
        self, config: TransformerConfig, src_embed: Embeddings, tgt_embed: Embeddings,
        encoder: Encoder, decoder: Decoder, lm_head: nn.Linear | None,
        copy: CopyGenerator | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.src_embed, self.tgt_embed = src_embed, tgt_embed
        self.encoder, self.decoder = encoder, decoder
        self.lm_head = lm_head  # None: the output projection is the shared embedding (tied)
        self.copy = copy  # None: no copy attention (the paper's model)

    def encode(
        self, input_ids: Tensor, source_mask: Tensor | None = None, need_weights: bool = False,
        need_hidden: bool = False,
    ) -> EncoderOutput:
        """``need_hidden``: also return the embedding output and every layer's (``hidden_states``)."""
        mask = None if source_mask is None else padding_mask(source_mask)  # (B, 1, 1, S)
        positions = Embeddings.positions(input_ids)  # (1, S)
        return self.encoder(self.src_embed(input_ids, positions=positions), mask, need_weights,
                            need_hidden, rotary(self.config, positions))

    def decode(
        self, decoder_input_ids: Tensor, memory: Tensor, source_mask: Tensor | None = None,
        cache=None, need_weights: bool = False, *, positions: Tensor | None = None,
        target_mask: Tensor | None = None, need_hidden: bool = False,
    ) -> DecoderOutput:
        """Decode target prefixes against the encoder output ``memory`` (B, S, D).

        With a :class:`~tformer.model.attention.DecoderCache`, ``decoder_input_ids`` holds only
        the new positions; earlier ones are read from the cache.

        Rows whose histories differ in length (continuous batching: `tformer.serving.
        continuous`) share one cache with unused columns and pass ``positions`` (B,), the
        position of each row's first new token, and ``target_mask`` (B, T_past + T), True at
        the keys a row may see. With one new position per row the unused columns may sit
        anywhere (the mask alone decides); with several, the causal mask applies as well, so
        the padding must come before the history. Without them every row is at the cache's
        length.
        """
        offset = positions if positions is not None else (
            cache.seq_length() if cache is not None else 0)
        positions = Embeddings.positions(decoder_input_ids, offset)  # (1 or B, T)
        x = self.tgt_embed(decoder_input_ids, positions=positions)  # (B, T, D)
        mask = None if source_mask is None else padding_mask(source_mask)
        self_mask = None if target_mask is None else padding_mask(target_mask)
        return self.decoder(x, memory, mask, cache, need_weights, self_mask, need_hidden,
                            rotary(self.config, positions))

    def project(self, hidden: Tensor) -> Tensor:  # (..., D) -> (..., V)
        if self.lm_head is not None:
            return self.lm_head(hidden)
        return F.linear(hidden, self.tgt_embed.token.weight)

    def output(self, hidden: Tensor, memory: Tensor, source_ids: Tensor | None,
               source_mask: Tensor | None) -> Tensor:
        """The decoder output (B, T, D) as next-token logits (B, T, V): the projection, or
        with copy attention the log of its mixture with copying from the source
        (`tformer.model.copy`), which needs the source ids (B, S)."""
        logits = self.project(hidden)
        if self.copy is None:
            return logits
        if source_ids is None:
            raise ValueError("this model has copy attention: its output needs the source ids")
        return self.copy(hidden, logits, memory, source_ids, source_mask)

    def forward(
        self, input_ids: Tensor, decoder_input_ids: Tensor, source_mask: Tensor | None = None,
        need_weights: bool = False,
    ) -> Seq2SeqOutput:
        enc = self.encode(input_ids, source_mask, need_weights)
        dec = self.decode(decoder_input_ids, enc.hidden, source_mask, None, need_weights)
        return Seq2SeqOutput(
            self.output(dec.hidden, enc.hidden, input_ids, source_mask), enc.hidden,
            enc.attentions, dec.self_attentions, dec.cross_attentions,
        )


def rotary(config: TransformerConfig, positions: Tensor) -> tuple[Tensor, Tensor] | None:
    """The (cos, sin) of rotary positions for ``positions`` (B or 1, T), or None when the model
    adds its positions to the embeddings instead."""
    if config.positional != "rope":
        return None
    return rotary_cos_sin(positions, config.head_dim, config.rope_theta)


def default_positions(ids: Tensor, attention_mask: Tensor | None = None,
                      document_ids: Tensor | None = None, past: int = 0) -> Tensor:
    """The positions of ``ids`` (B, T) when none are given: restarting at 0 with each packed
    document (``document_ids`` (B, T)); else counting real tokens only (``attention_mask``
    (B, past + T), so a left-padded row starts at 0, as Hugging Face's models); else
    ``past … past + T − 1``."""
    t = ids.size(1)
    steps = torch.arange(t, device=ids.device)
    if document_ids is not None:
        starts = torch.ones_like(document_ids, dtype=torch.bool)
        starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
        return steps - (steps * starts).cummax(dim=-1).values  # (B, T)
    if attention_mask is not None:
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -t:]  # (B, T)
    return (past + steps)[None]  # (1, T)


class DecoderOnlyTransformer(nn.Module):
    """Embeddings, a decoder whose layers have no cross-attention, and the output projection:
    the GPT family. Build it with :func:`build_transformer` from a config with
    ``n_encoder_layers=0``.

    Each position predicts the next token from itself and the tokens before it (causal
    self-attention). Masks are Hugging Face's at this edge: ``attention_mask`` 1 = token,
    0 = padding.
    """

    def __init__(self, config: TransformerConfig, embed: Embeddings, decoder: Decoder,
                 lm_head: nn.Linear | None) -> None:
        super().__init__()
        self.config = config
        self.embed, self.decoder = embed, decoder
        self.lm_head = lm_head  # None: the output projection is the token embedding (tied)

    def project(self, hidden: Tensor) -> Tensor:  # (..., D) -> (..., V)
        if self.lm_head is not None:
            return self.lm_head(hidden)
        return F.linear(hidden, self.embed.token.weight)

    def forward(
        self, ids: Tensor, attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None, document_ids: Tensor | None = None, cache=None,
        need_weights: bool = False, need_hidden: bool = False, logits_to_keep: int = 0,
    ) -> DecoderOnlyOutput:
        """Next-token logits (B, T, V) for ``ids`` (B, T).

        ``attention_mask`` (B, T_past + T): 1 at tokens, 0 at padding (left or right), past
        keys included when a ``cache`` (a :class:`~tformer.model.attention.DecoderCache`) holds
        them; then ``ids`` holds only the new positions. ``position_ids`` (B, T): by default
        :func:`default_positions`. ``document_ids`` (B, T), packed training (no cache): a token
        attends only to earlier tokens of its own document. ``need_weights`` /
        ``need_hidden``: also return the attention maps / the embedding output and each
        layer's. ``logits_to_keep`` K > 0: project only the last K positions (B, K, V), as
        Hugging Face's models do in ``generate()``, which reads the last position's logits
        alone: a prompt's other T - 1 rows of (T, V) logits would cost T × D × V
        multiply-adds (with GPT-2's V = 50,257, more than the whole stack for a 300-token prompt
        of a 6-layer, D 384 model).
        """
        past = cache.seq_length() if cache is not None else 0
        t = ids.size(1)
        if document_ids is not None and cache is not None:
            raise ValueError("document_ids are for packed training rows, not cached decoding")
        if attention_mask is not None and attention_mask.shape != (ids.size(0), past + t):
            raise ValueError(f"attention_mask must be (B, past + T) = {(ids.size(0), past + t)}, "
                             f"got {tuple(attention_mask.shape)}")
        if position_ids is None:
            position_ids = default_positions(ids, attention_mask, document_ids, past)
        x = self.embed(ids, positions=position_ids)  # (B, T, D)
        # all ones is no mask: the kernel's causal flag then applies
        keep = (None if attention_mask is None or bool(attention_mask.all())
                else attention_mask.bool())
        mask = decoder_self_mask(keep, document_ids, t, past + t)  # (B, 1, T, past + T) or None
        dec = self.decoder(x, None, None, cache, need_weights, mask, need_hidden,
                           rotary(self.config, position_ids))
        kept = dec.hidden[:, -logits_to_keep:] if logits_to_keep > 0 else dec.hidden
        return DecoderOnlyOutput(self.project(kept), dec.hidden, dec.self_attentions,
                                 dec.hidden_states)


def build_transformer(config: TransformerConfig) -> Transformer | DecoderOnlyTransformer:
    """The one factory: every module is built here and handed to the block that uses it. With
    ``n_encoder_layers == 0`` the decoder-only model, else the encoder-decoder."""
    c = config

    def attn(layer: int = 0) -> MultiHeadAttention:
        return MultiHeadAttention(c.d_model, c.n_heads, c.attention_dropout, c.bias, layer,
                                  c.n_kv_heads)

    def ffn() -> FeedForward:
        return FeedForward(c.d_model, c.d_ff, c.activation, c.gated_ffn, c.bias)

    def final_norm() -> nn.Module | None:
        return make_norm(c.norm, c.d_model, c.layer_norm_eps) if c.norm_first else None

    def embeddings(token: nn.Embedding) -> Embeddings:
        return Embeddings(token, c.positional, c.max_positions, c.scale_embeddings, c.dropout)

    def decoder_layer(i: int, cross: bool) -> DecoderLayer:
        return DecoderLayer(attn(i), attn(i) if cross else None, ffn(), c.d_model, c.dropout,
                            c.norm_first, c.layer_norm_eps, c.norm)

    def lm_head() -> nn.Linear | None:
        return None if c.tie_embeddings else nn.Linear(c.d_model, c.vocab_size, bias=False)

    if c.decoder_only:
        # No padding_idx: a decoder-only model often pads with its end-of-text token, whose
        # embedding must keep learning; padding is masked out of attention and the loss instead.
        token = nn.Embedding(c.vocab_size, c.d_model)
        decoder = Decoder([decoder_layer(i, cross=False) for i in range(c.n_decoder_layers)],
                          final_norm())
        model = DecoderOnlyTransformer(c, embeddings(token), decoder, lm_head())
        init_weights(model)
        return model

    src_token = nn.Embedding(c.vocab_size, c.d_model, padding_idx=c.pad_token_id)
    tgt_token = (
        src_token if c.tie_embeddings
        else nn.Embedding(c.vocab_size, c.d_model, padding_idx=c.pad_token_id)
    )
    encoder = Encoder(
        [
            EncoderLayer(attn(), ffn(), c.d_model, c.dropout, c.norm_first, c.layer_norm_eps,
                         c.norm)
            for _ in range(c.n_encoder_layers)
        ],
        final_norm(),
    )
    decoder = Decoder([decoder_layer(i, cross=True) for i in range(c.n_decoder_layers)],
                      final_norm())
    copy = CopyGenerator(c.d_model) if c.copy_attention else None
    model = Transformer(c, embeddings(src_token), embeddings(tgt_token), encoder, decoder,
                        lm_head(), copy)
    init_weights(model)
    return model


def init_weights(model: nn.Module) -> None:
    """Xavier-uniform matrices (as ``torch.nn.Transformer``) and zero biases; embeddings
    N(0, D^-1/2) with a zero padding row, so that √D-scaled token vectors have unit scale."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=module.embedding_dim**-0.5)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)
