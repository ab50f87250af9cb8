"""tformer's own Transformer as a CTranslate2 model specification.

Written by hand because CTranslate2 has no converter for this model (its converters read
fairseq, OpenNMT, Marian and Hugging Face models, and only the architectures registered in
``ctranslate2.converters.transformers``). The encoder-decoder is mapped onto
``ctranslate2.specs.TransformerSpec`` (what the fairseq and OpenNMT converters fill), the
decoder-only family (``n_encoder_layers=0``: the ``gpt2`` and ``llama`` presets) onto
``TransformerDecoderModelSpec``, which CTranslate2's ``Generator`` runs (what its GPT-2 and Llama
loaders fill). Both are built from the same layer specifications, with the same options:

==============================  ===============================================================
tformer                         CTranslate2 specification
==============================  ===============================================================
src/tgt_embed.token, embed      encoder.embeddings[0] / decoder.embeddings
scale_embeddings                encoder/decoder.scale_embeddings (True = × √D)
positions (sinusoidal/learned)  encoder/decoder.position_encodings.encodings: the table itself
positional: rope, rope_theta    rotary_dim=0 (every dimension), rotary_interleave=False (i
                                paired with i + Dh/2, as rotate_half), rotary_base
self_attn.in_proj (D+2Hkv·Dh,D) self_attention.linear[0] (fused [Q; K; V]: the same layout)
n_kv_heads                      num_heads_kv (grouped-query attention)
cross_attn.in_proj              attention.linear[0] = rows [0, D) (Q), linear[1] = the rest (K, V)
*.out_proj                      *.linear[-1]
bias: false                     no bias on any linear layer (biases are optional there)
norm1 / norm2 (/ norm3)         self_attention / (attention /) ffn .layer_norm
norm: layernorm / rmsnorm       LayerNorm (gamma, beta) / rms_norm (gamma only)
activation                      relu, gelu (erf), gelu_tanh (GELUTanh), silu (SWISH)
ffn.w1, w3 (gated), w2          ffn.linear_0, linear_0_noact, linear_1
final norms (pre-norm only)     encoder/decoder.layer_norm
lm_head or tied embedding       decoder.projection (CTranslate2 stores shared arrays once)
layer_norm_eps                  config.layer_norm_epsilon
==============================  ===============================================================

The position table is written out, never left to CTranslate2's built-in sinusoids: those
concatenate [sin, cos] (tensor2tensor's layout) where the paper, and tformer, interleave them.
A sinusoidal table covers ``max_positions`` positions; the engine keeps sources and outputs
within it. Post-norm and pre-norm are both native to the specification (``pre_norm``).

Every field of :class:`tformer.model.TransformerConfig` is checked against what the
specification can express in :func:`check_exportable`; every option exports but copy
attention (the specification has no pointer-generator output). A field added later fails
there, naming itself, until it is mapped here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from ctranslate2.specs import common_spec, transformer_spec
from torch import nn

from tformer.model import TransformerConfig
from tformer.model.layers import sinusoidal_positions

_ACTIVATIONS = {
    "relu": common_spec.Activation.RELU,
    "gelu": common_spec.Activation.GELU,  # erf GELU, as torch.nn.functional.gelu
    "gelu_tanh": common_spec.Activation.GELUTanh,  # GPT-2's tanh approximation
    "silu": common_spec.Activation.SWISH,  # x σ(x); with gated_ffn, SwiGLU
}

# Fields that only matter in training (dropout), or that every value of exports.
_EXPORTABLE = {
    "vocab_size", "d_model", "n_heads", "n_encoder_layers", "n_decoder_layers", "d_ff",
    "dropout", "attention_dropout", "activation", "gated_ffn", "norm_first", "positional",
    "max_positions", "scale_embeddings", "tie_embeddings", "layer_norm_eps", "pad_token_id",
    "norm", "bias", "n_kv_heads", "rope_theta",
    "copy_attention",  # exported only when false (checked below)
}


class NotExportableError(ValueError):
    """The checkpoint uses an option that CTranslate2's specification cannot express."""


def check_exportable(config: TransformerConfig) -> None:
    """Raise :class:`NotExportableError` naming every option the export cannot map."""
    problems = []
    for field in dataclasses.fields(config):
        if field.name not in _EXPORTABLE:
            problems.append(f"TransformerConfig.{field.name}={getattr(config, field.name)!r} "
                            "has no CTranslate2 mapping in tformer.ct2.own_spec")
    if config.activation not in _ACTIVATIONS:
        problems.append(f"TransformerConfig.activation={config.activation!r} is not one of "
                        f"{sorted(_ACTIVATIONS)}")
    if config.copy_attention:
        problems.append("TransformerConfig.copy_attention=True: CTranslate2's Transformer has "
                        "no pointer-generator output (serve or evaluate with --engine torch)")
    if problems:
        raise NotExportableError("cannot export to CTranslate2: " + "; ".join(problems))


def _layer_options(config: TransformerConfig) -> dict[str, Any]:
    """The arguments of ``TransformerEncoderSpec`` / ``TransformerDecoderSpec`` that say how
    ``config``'s layers compute (the same for every stack of the model)."""
    options: dict[str, Any] = dict(
        pre_norm=config.norm_first, activation=_ACTIVATIONS[config.activation],
        ffn_glu=config.gated_ffn, rms_norm=config.norm == "rmsnorm",
        num_heads_kv=config.kv_heads if config.kv_heads != config.n_heads else None,
    )
    if config.positional == "rope":
        # every dimension of a head, dimension i paired with i + Dh/2 (tformer.model.rotary)
        options.update(rotary_dim=0, rotary_interleave=False, rotary_base=config.rope_theta)
    return options


def _tensor(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float32).contiguous().clone()


def _linear(spec, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    spec.weight = _tensor(weight)
    if bias is not None:
        spec.bias = _tensor(bias)


def _layer_norm(spec, norm: nn.Module) -> None:
    """A LayerNorm (gamma, beta) or an RMSNorm (gamma alone, a spec built with rms_norm)."""
    spec.gamma = _tensor(norm.weight)
    if isinstance(norm, nn.LayerNorm):
        spec.beta = _tensor(norm.bias)


def _self_attention(spec, attn, norm: nn.Module) -> None:
    _linear(spec.linear[0], attn.in_proj.weight, attn.in_proj.bias)  # (D + 2 Hkv Dh, D): [Q; K; V]
    _linear(spec.linear[1], attn.out_proj.weight, attn.out_proj.bias)
    _layer_norm(spec.layer_norm, norm)


def _cross_attention(spec, attn, norm: nn.Module) -> None:
    d = attn.out_proj.weight.size(0)
    w, b = attn.in_proj.weight, attn.in_proj.bias
    _linear(spec.linear[0], w[:d], None if b is None else b[:d])  # queries, from the decoder
    _linear(spec.linear[1], w[d:], None if b is None else b[d:])  # keys and values (2 Hkv Dh, D)
    _linear(spec.linear[2], attn.out_proj.weight, attn.out_proj.bias)
    _layer_norm(spec.layer_norm, norm)


def _ffn(spec, ffn, norm: nn.Module) -> None:
    _linear(spec.linear_0, ffn.w1.weight, ffn.w1.bias)
    if ffn.w3 is not None:  # gated: act(x W1) * (x W3); CTranslate2 multiplies linear_0_noact
        _linear(spec.linear_0_noact, ffn.w3.weight, ffn.w3.bias)
    _linear(spec.linear_1, ffn.w2.weight, ffn.w2.bias)
    _layer_norm(spec.layer_norm, norm)


def _embeddings(spec, embed, config: TransformerConfig) -> None:
    token = spec.embeddings[0] if isinstance(spec.embeddings, list) else spec.embeddings
    token.weight = _tensor(embed.token.weight)
    spec.scale_embeddings = bool(config.scale_embeddings)  # True: × √D, as tformer
    if config.positional == "rope":
        return  # nothing added: the attention rotates queries and keys
    if embed.learned is not None:
        table = embed.learned.weight
    else:
        positions = torch.arange(config.max_positions)
        table = sinusoidal_positions(positions, config.d_model)  # (P, D), interleaved sin/cos
    spec.position_encodings.encodings = _tensor(table)


def _decoder(spec, embed, decoder, config: TransformerConfig) -> None:
    """The decoder stack, its layers with cross-attention (encoder-decoder) or without."""
    _embeddings(spec, embed, config)
    for layer_spec, layer in zip(spec.layer, decoder.layers, strict=True):
        _self_attention(layer_spec.self_attention, layer.self_attn, layer.norm1)
        if layer.cross_attn is not None:
            _cross_attention(layer_spec.attention, layer.cross_attn, layer.norm2)
        _ffn(layer_spec.ffn, layer.ffn, layer.norm3)
    if decoder.norm is not None:  # pre-norm; post-norm stacks have none, nor does the spec then
        _layer_norm(spec.layer_norm, decoder.norm)


def _check(model, vocabulary: list[str]) -> TransformerConfig:
    config: TransformerConfig = model.config
    check_exportable(config)
    if len(vocabulary) != config.vocab_size:
        raise ValueError(f"vocabulary has {len(vocabulary)} tokens but the model's vocab_size is "
                         f"{config.vocab_size}")
    return config


def _finish(spec, config: TransformerConfig, head: torch.Tensor, *, bos: str, eos: str,
            unk: str) -> None:
    """The output projection and the model-wide configuration."""
    spec.decoder.projection.weight = _tensor(head)
    spec.config.layer_norm_epsilon = float(config.layer_norm_eps)
    spec.config.bos_token, spec.config.eos_token, spec.config.unk_token = bos, eos, unk


def build_spec(model, vocabulary: list[str], *, bos: str, eos: str, unk: str,
               decoder_start: str) -> transformer_spec.TransformerSpec:
    """The ``TransformerSpec`` of a :class:`tformer.model.Transformer` (``model``) with its
    token strings in id order (``vocabulary``) and its special tokens."""
    config = _check(model, vocabulary)
    options = _layer_options(config)
    spec = transformer_spec.TransformerSpec(
        transformer_spec.TransformerEncoderSpec(config.n_encoder_layers, config.n_heads,
                                                **options),
        transformer_spec.TransformerDecoderSpec(config.n_decoder_layers, config.n_heads,
                                                **options),
    )
    _embeddings(spec.encoder, model.src_embed, config)
    for layer_spec, layer in zip(spec.encoder.layer, model.encoder.layers, strict=True):
        _self_attention(layer_spec.self_attention, layer.self_attn, layer.norm1)
        _ffn(layer_spec.ffn, layer.ffn, layer.norm2)
    if model.encoder.norm is not None:
        _layer_norm(spec.encoder.layer_norm, model.encoder.norm)
    _decoder(spec.decoder, model.tgt_embed, model.decoder, config)
    head = model.lm_head.weight if model.lm_head is not None else model.tgt_embed.token.weight
    _finish(spec, config, head, bos=bos, eos=eos, unk=unk)
    spec.config.decoder_start_token = decoder_start
    # The tokenizer already appends </s> to every source: CTranslate2 adds nothing.
    spec.config.add_source_bos = False
    spec.config.add_source_eos = False
    spec.register_source_vocabulary(vocabulary)
    spec.register_target_vocabulary(vocabulary)
    return spec


def build_decoder_only_spec(model, vocabulary: list[str], *, bos: str, eos: str,
                            unk: str) -> transformer_spec.TransformerDecoderModelSpec:
    """The ``TransformerDecoderModelSpec`` (CTranslate2's ``Generator``) of a
    :class:`tformer.model.DecoderOnlyTransformer` (``model``)."""
    config = _check(model, vocabulary)
    spec = transformer_spec.TransformerDecoderModelSpec(transformer_spec.TransformerDecoderSpec(
        config.n_decoder_layers, config.n_heads, with_encoder_attention=False,
        **_layer_options(config)))
    _decoder(spec.decoder, model.embed, model.decoder, config)
    head = model.lm_head.weight if model.lm_head is not None else model.embed.token.weight
    _finish(spec, config, head, bos=bos, eos=eos, unk=unk)
    spec.register_vocabulary(vocabulary)
    return spec
