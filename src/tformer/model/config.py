"""The model's configuration: one frozen dataclass, validated on construction, plus named sizes.

Defaults follow "Attention Is All You Need" (Vaswani et al., 2017): post-norm, sinusoidal
positions, ReLU feed-forward, embeddings scaled by sqrt(d_model), one embedding matrix shared by
the source, the target and the output projection (section 3.4).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any, Literal

Activation = Literal["relu", "gelu"]
Positional = Literal["sinusoidal", "learned"]


@dataclass(frozen=True)
class TransformerConfig:
    """Sizes and options of the encoder-decoder Transformer.

    Every field is checked in ``__post_init__``; a bad value raises ``ValueError`` naming it.
    This is the one declaration of the architecture: the Hugging Face config
    (``tformer.hf.TformerConfig``) and the recipe's ``model`` section
    (``tformer.training.config.ModelSection``) take their fields from it
    (:func:`architecture_fields`), so a field added here can be saved and set from a recipe.
    """

    vocab_size: int
    d_model: int = 512
    n_heads: int = 8
    n_encoder_layers: int = 6
    n_decoder_layers: int = 6
    d_ff: int = 2048
    dropout: float = 0.1  # on sublayer outputs and embeddings (P_drop, section 5.4)
    attention_dropout: float = 0.0  # on the attention weights; the paper does not use it
    activation: Activation = "relu"
    gated_ffn: bool = False  # GLU-style FFN (Shazeer 2020): act(x W1) * (x W3), then W2
    norm_first: bool = False  # pre-norm (Xiong et al. 2020); the paper is post-norm
    positional: Positional = "sinusoidal"
    max_positions: int = 1024  # table size for learned positions and the sinusoid cache
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
        for name in ("n_encoder_layers", "n_decoder_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"TransformerConfig.{name} must be an int >= 1, got {value!r}")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"TransformerConfig.d_model ({self.d_model}) must be divisible by "
                f"n_heads ({self.n_heads})"
            )
        for name in ("dropout", "attention_dropout"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(f"TransformerConfig.{name} must be in [0, 1), got {value!r}")
        if self.activation not in ("relu", "gelu"):
            raise ValueError(
                f"TransformerConfig.activation must be 'relu' or 'gelu', got {self.activation!r}"
            )
        if self.positional not in ("sinusoidal", "learned"):
            raise ValueError(
                "TransformerConfig.positional must be 'sinusoidal' or 'learned', "
                f"got {self.positional!r}"
            )
        for name in ("gated_ffn", "norm_first", "scale_embeddings", "tie_embeddings",
                     "copy_attention"):
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


# Named sizes. `base` is the paper's base model (Table 3, 65M parameters with a 37k vocabulary);
# `small` is a width that trains usefully on a 2-core CPU; `tiny` is for tests.
SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(d_model=32, n_heads=4, n_encoder_layers=2, n_decoder_layers=2, d_ff=64),
    "small": dict(d_model=256, n_heads=4, n_encoder_layers=4, n_decoder_layers=4, d_ff=1024),
    "base": dict(d_model=512, n_heads=8, n_encoder_layers=6, n_decoder_layers=6, d_ff=2048),
}


def config_for(size: str, vocab_size: int, **overrides: Any) -> TransformerConfig:
    """A named size (``tiny``, ``small``, ``base``) with any field overridden."""
    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}; choose one of {sorted(SIZES)}")
    return TransformerConfig.from_dict({**SIZES[size], "vocab_size": vocab_size, **overrides})
