"""The Transformer of "Attention Is All You Need", in plain PyTorch (this package imports only torch):
the encoder-decoder of the paper and the decoder-only family (GPT, with GPT-2 and Llama presets),
built from the same blocks.

Read in this order: ``masks`` -> ``attention`` (with ``rotary``, the rotary positions) ->
``layers`` -> ``transformer``; ``config`` holds the sizes and presets and ``loss`` the training
objective; ``copy`` is an optional output layer that is not in the paper (copy attention).
``kernels`` holds the CPU-speed paths the others call (dropout, short-sequence attention,
cross-entropy), each equal to PyTorch's and with its measured reason.
The math is in ``docs/model.md``.
"""

from tformer.model.attention import (
    AttentionOutput,
    DecoderCache,
    MultiHeadAttention,
    attention_fast,
    attention_math,
    repeat_kv,
)
from tformer.model.config import (
    PRESETS,
    SIZES,
    TransformerConfig,
    architecture_fields,
    config_for,
)
from tformer.model.copy import CopyGenerator
from tformer.model.layers import (
    DecoderLayer,
    Embeddings,
    EncoderLayer,
    FeedForward,
    RMSNorm,
    sinusoidal_positions,
)
from tformer.model.loss import IGNORE_INDEX, compute_loss
from tformer.model.masks import causal_mask, combine, decoder_self_mask, padding_mask
from tformer.model.rotary import apply_rotary, rotary_cos_sin
from tformer.model.transformer import (
    Decoder,
    DecoderOnlyOutput,
    DecoderOnlyTransformer,
    Encoder,
    KVCache,
    Seq2SeqOutput,
    Transformer,
    build_transformer,
    default_positions,
)

__all__ = [
    "AttentionOutput", "DecoderCache", "MultiHeadAttention", "attention_fast", "attention_math",
    "repeat_kv", "PRESETS", "SIZES", "TransformerConfig", "architecture_fields", "config_for",
    "CopyGenerator", "DecoderLayer", "Embeddings", "EncoderLayer", "FeedForward", "RMSNorm",
    "sinusoidal_positions", "IGNORE_INDEX", "compute_loss", "causal_mask", "combine",
    "decoder_self_mask", "padding_mask", "apply_rotary", "rotary_cos_sin", "Decoder",
    "DecoderOnlyOutput", "DecoderOnlyTransformer", "Encoder", "KVCache", "Seq2SeqOutput",
    "Transformer", "build_transformer", "default_positions",
]
