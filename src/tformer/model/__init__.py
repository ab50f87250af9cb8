"""The Transformer of "Attention Is All You Need", in plain PyTorch (this package imports only torch).

Read in this order: ``masks`` -> ``attention`` -> ``layers`` -> ``transformer``; ``config`` holds
the sizes and ``loss`` the training objective; ``copy`` is an optional output layer that is not
in the paper (copy attention). ``kernels`` holds the CPU-speed paths the others call (dropout,
short-sequence attention, cross-entropy), each equal to PyTorch's and with its measured reason.
The math is in ``docs/model.md``.
"""

from tformer.model.attention import (
    AttentionOutput,
    DecoderCache,
    MultiHeadAttention,
    attention_fast,
    attention_math,
)
from tformer.model.config import SIZES, TransformerConfig, architecture_fields, config_for
from tformer.model.copy import CopyGenerator
from tformer.model.layers import (
    DecoderLayer,
    Embeddings,
    EncoderLayer,
    FeedForward,
    sinusoidal_positions,
)
from tformer.model.loss import IGNORE_INDEX, compute_loss
from tformer.model.masks import causal_mask, combine, padding_mask
from tformer.model.transformer import (
    Decoder,
    Encoder,
    KVCache,
    Seq2SeqOutput,
    Transformer,
    build_transformer,
)

__all__ = [
    "AttentionOutput", "DecoderCache", "MultiHeadAttention", "attention_fast", "attention_math",
    "SIZES", "TransformerConfig", "architecture_fields", "config_for", "CopyGenerator",
    "DecoderLayer", "Embeddings", "EncoderLayer",
    "FeedForward", "sinusoidal_positions", "IGNORE_INDEX", "compute_loss", "causal_mask",
    "combine", "padding_mask", "Decoder", "Encoder", "KVCache", "Seq2SeqOutput", "Transformer",
    "build_transformer",
]
