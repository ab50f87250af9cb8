"""The model's configuration: one frozen dataclass, validated on construction, plus named sizes
and presets.

Defaults follow "Attention Is All You Need" (Vaswani et al., 2017): post-norm, sinusoidal
positions, ReLU feed-forward, embeddings scaled by sqrt(d_model), one embedding matrix shared by
the source, the target and the output projection (section 3.4). ``n_encoder_layers=0`` gives the
decoder-only family (GPT); the presets ``gpt2`` and ``llama`` name its two best-known sets of
departures from the paper.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any, Literal

Activation = Literal["relu", "gelu", "gelu_tanh", "silu"]
Positional = Literal["sinusoidal", "learned", "rope"]
Norm = Literal["layernorm", "rmsnorm"]


@dataclass(frozen=True)
class TransformerConfig:
    """Sizes and options of the Transformer: encoder-decoder, or decoder-only when
    ``n_encoder_layers == 0`` (no encoder, no cross-attention).

    Every field is checked in ``__post_init__``; a bad value raises ``ValueError`` naming it.
    This is the one declaration of the architecture: the Hugging Face config
    (``tformer.hf.TformerConfig``) and the recipe's ``model`` section
    (``tformer.training.config.ModelSection``) take their fields from it
    (:func:`architecture_fields`), so a field added here can be saved and set from a recipe.
    """

    vocab_size: int
    d_model: int = 512
    n_heads: int = 8
    n_encoder_layers: int = 6  # 0: decoder-only (GPT), no encoder and no cross-attention
    n_decoder_layers: int = 6
    d_ff: int = 2048
    dropout: float = 0.1  # on sublayer outputs and embeddings (P_drop, section 5.4)
    attention_dropout: float = 0.0  # on the attention weights; the paper does not use it
    # relu (the paper), gelu (erf), gelu_tanh (GPT-2's tanh approximation), silu (with
    # gated_ffn: SwiGLU, Llama's)
    activation: Activation = "relu"
    gated_ffn: bool = False  # GLU-style FFN (Shazeer 2020): act(x W1) * (x W3), then W2
    norm_first: bool = False  # pre-norm (Xiong et al. 2020); the paper is post-norm
    norm: Norm = "layernorm"  # or rmsnorm (Zhang and Sennrich 2019), Llama's
    bias: bool = True  # biases of the attention and feed-forward Linear layers (Llama: none)
    # Grouped-query attention (Ainslie et al. 2023): n_kv_heads key/value heads, each shared by
    # n_heads / n_kv_heads query heads; None = n_heads (the paper's multi-head attention).
    n_kv_heads: int | None = None
    # sinusoidal (the paper), learned (GPT-2), rope: rotary positions (Su et al. 2021, Llama)
    positional: Positional = "sinusoidal"
    rope_theta: float = 10000.0  # the base of the rotary frequencies
    max_positions: int = 1024  # table size for learned positions
    scale_embeddings: bool = True  # multiply embeddings by sqrt(d_model) (section 3.4)
    tie_embeddings: bool = True  # one matrix for source, target and output (section 3.4)
    # Pointer-generator output (See et al. 2017; tformer.model.copy): each position mixes
    # generating from the vocabulary with copying a source token. Not in the paper; off.
    copy_attention: bool = False
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 0

    def __post_init__(self) -> None:
        positive = ("vocab_size", "d_model", "n_heads", "d_ff", "max_positions")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"TransformerConfig.{name} must be a positive int, got {value!r}")
        for name, least in (("n_encoder_layers", 0), ("n_decoder_layers", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(f"TransformerConfig.{name} must be an int >= {least}, "
                                 f"got {value!r}")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"TransformerConfig.d_model ({self.d_model}) must be divisible by "
                f"n_heads ({self.n_heads})"
            )
        for name in ("dropout", "attention_dropout"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(f"TransformerConfig.{name} must be in [0, 1), got {value!r}")
        for name, hint in (("activation", Activation), ("positional", Positional),
                           ("norm", Norm)):
            choices = typing.get_args(hint)
            if getattr(self, name) not in choices:
                raise ValueError(f"TransformerConfig.{name} must be one of {list(choices)}, "
                                 f"got {getattr(self, name)!r}")
        if self.n_kv_heads is not None and (
                not isinstance(self.n_kv_heads, int) or isinstance(self.n_kv_heads, bool)
                or self.n_kv_heads < 1 or self.n_heads % self.n_kv_heads):
            raise ValueError(
                "TransformerConfig.n_kv_heads must be None or a positive int dividing "
                f"n_heads ({self.n_heads}), got {self.n_kv_heads!r}"
            )
        if self.positional == "rope" and self.head_dim % 2:
            raise ValueError(
                "TransformerConfig.positional 'rope' needs an even head width d_model / n_heads, "
                f"got {self.head_dim}"
            )
        if not (isinstance(self.rope_theta, (int, float)) and self.rope_theta > 0
                and math.isfinite(self.rope_theta)):
            raise ValueError(
                f"TransformerConfig.rope_theta must be finite and > 0, got {self.rope_theta!r}"
            )
        if self.copy_attention and self.n_encoder_layers == 0:
            raise ValueError(
                "TransformerConfig.copy_attention must be false in a decoder-only model "
                "(n_encoder_layers=0): it copies from a source there is not"
            )
        for name in ("gated_ffn", "norm_first", "scale_embeddings", "tie_embeddings",
                     "copy_attention", "bias"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"TransformerConfig.{name} must be true or false, "
                                 f"got {getattr(self, name)!r}")
        if not (self.layer_norm_eps > 0 and math.isfinite(self.layer_norm_eps)):
            raise ValueError(
                f"TransformerConfig.layer_norm_eps must be finite and > 0, got {self.layer_norm_eps!r}"
            )
        if not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(
                f"TransformerConfig.pad_token_id must be in [0, vocab_size={self.vocab_size}), "
                f"got {self.pad_token_id!r}"
            )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def decoder_only(self) -> bool:
        return self.n_encoder_layers == 0

    @property
    def kv_heads(self) -> int:
        """Key/value heads: ``n_kv_heads``, or ``n_heads`` when it is None."""
        return self.n_kv_heads or self.n_heads

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TransformerConfig:
        """Build from a mapping; an unknown key is an error, never silently dropped."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"unknown TransformerConfig field(s) {unknown}; known fields: {sorted(known)}"
            )
        return cls(**values)


def architecture_fields() -> dict[str, tuple[Any, Any]]:
    """Every field of :class:`TransformerConfig`: name -> (type, default), in declaration order
    (``dataclasses.MISSING`` where there is no default). The Hugging Face config and the recipe's
    model section are built from this, not written out again."""
    hints = typing.get_type_hints(TransformerConfig)
    return {f.name: (hints[f.name], f.default) for f in dataclasses.fields(TransformerConfig)}


# Named sizes; each applies to both families (a decoder-only preset sets n_encoder_layers to 0
# and keeps n_decoder_layers). `base` is the paper's base model (Table 3, 65M parameters with a
# 37k vocabulary); `small` is a width that trains usefully on a 2-core CPU; `tiny` is for tests;
# `124m` is GPT-2's smallest shape (124M parameters as the `gpt2` preset with V = 50,257).
SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(d_model=32, n_heads=4, n_encoder_layers=2, n_decoder_layers=2, d_ff=64),
    "small": dict(d_model=256, n_heads=4, n_encoder_layers=4, n_decoder_layers=4, d_ff=1024),
    "base": dict(d_model=512, n_heads=8, n_encoder_layers=6, n_decoder_layers=6, d_ff=2048),
    "124m": dict(d_model=768, n_heads=12, n_encoder_layers=12, n_decoder_layers=12, d_ff=3072),
}


def _half_the_heads(sized: dict[str, Any]) -> int:
    """GQA with two query heads per key/value head (one, MHA, if n_heads is odd)."""
    return sized["n_heads"] // 2 if sized["n_heads"] % 2 == 0 else sized["n_heads"]


def _two_thirds_of_d_ff(sized: dict[str, Any]) -> int:
    """A gated FFN has three matrices: 2/3 of the size's d_ff (rounded up to a multiple of 8)
    keeps its parameters those of the size's plain FFN, as Llama does (Shazeer 2020)."""
    return -(-2 * sized["d_ff"] // 3 // 8) * 8


# Named sets of departures from the paper, applied over a size. A value may be a function of the
# sized fields (size and overrides merged), for what depends on the width.
PRESETS: dict[str, dict[str, Any]] = {
    # GPT-2 (Radford et al. 2019): pre-norm LayerNorm, learned positions, GELU (tanh) MLP with
    # biases, the output projection tied to the token embedding, no sqrt(D) scale.
    "gpt2": dict(
        n_encoder_layers=0, norm_first=True, norm="layernorm", positional="learned",
        activation="gelu_tanh", gated_ffn=False, bias=True, tie_embeddings=True,
        scale_embeddings=False,
    ),
    # Llama (Touvron et al. 2023): pre-norm RMSNorm, rotary positions, SwiGLU, no biases,
    # grouped-query attention (Llama 2 70B, Llama 3), an untied output projection (as Llama's
    # own checkpoints but the smallest), no sqrt(D) scale.
    "llama": dict(
        n_encoder_layers=0, norm_first=True, norm="rmsnorm", positional="rope",
        activation="silu", gated_ffn=True, bias=False, tie_embeddings=False,
        scale_embeddings=False, layer_norm_eps=1e-6, n_kv_heads=_half_the_heads,
        d_ff=_two_thirds_of_d_ff,
    ),
}


def config_for(size: str, vocab_size: int, preset: str | None = None,
               **overrides: Any) -> TransformerConfig:
    """A named size (``tiny``, ``small``, ``base``, ``124m``), then a named preset (``gpt2``,
    ``llama``; None = the paper's model), then any field overridden."""
    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}; choose one of {sorted(SIZES)}")
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose one of {sorted(PRESETS)}")
    sized = {**SIZES[size], "vocab_size": vocab_size, **overrides}
    chosen = {name: value(sized) if callable(value) else value
              for name, value in PRESETS.get(preset, {}).items()}
    return TransformerConfig.from_dict({**sized, **chosen, **overrides})
