"""tformer's own Transformer as a CTranslate2 model specification.

Written by hand because CTranslate2 has no converter for this model (its converters read
fairseq, OpenNMT, Marian and Hugging Face models, and only the architectures registered in
``ctranslate2.converters.transformers``). The weights are mapped onto
``ctranslate2.specs.TransformerSpec``, the vanilla encoder-decoder that the fairseq and OpenNMT
converters fill, in the same way they do:

==============================  ===============================================================
tformer                         TransformerSpec
==============================  ===============================================================
src/tgt_embed.token             encoder.embeddings[0] / decoder.embeddings
scale_embeddings                encoder/decoder.scale_embeddings (True = × √D)
positions (sinusoidal/learned)  encoder/decoder.position_encodings.encodings: the table itself
self_attn.in_proj (3D, D)       self_attention.linear[0] (fused Q, K, V: the same layout)
cross_attn.in_proj (3D, D)      attention.linear[0] = rows [0, D) (Q), linear[1] = [D, 3D) (K, V)
*.out_proj                      *.linear[-1]
norm1 / norm2 (/ norm3)         self_attention / (attention /) ffn .layer_norm
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

import torch
from ctranslate2.specs import common_spec, transformer_spec
from torch import nn

from tformer.model import TransformerConfig
from tformer.model.layers import sinusoidal_positions

_ACTIVATIONS = {
    "relu": common_spec.Activation.RELU,
    "gelu": common_spec.Activation.GELU,  # erf GELU, as torch.nn.functional.gelu
}

# Fields that only matter in training (dropout), or that every value of exports.
_EXPORTABLE = {
    "vocab_size", "d_model", "n_heads", "n_encoder_layers", "n_decoder_layers", "d_ff",
    "dropout", "attention_dropout", "activation", "gated_ffn", "norm_first", "positional",
    "max_positions", "scale_embeddings", "tie_embeddings", "layer_norm_eps", "pad_token_id",
    "copy_attention",  # exported only when false (checked below)
    # exported only at the paper's values (checked below); rope_theta only matters with rope
    "norm", "bias", "n_kv_heads", "rope_theta",
}

#: The fields exported only at one value: CTranslate2's TransformerSpec (encoder-decoder,
#: LayerNorm with biases, multi-head attention, added positions) has no place for the others.
_ONLY = {"norm": ("layernorm",), "bias": (True,), "positional": ("sinusoidal", "learned")}


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
    for name, allowed in _ONLY.items():
        if getattr(config, name) not in allowed:
            problems.append(f"TransformerConfig.{name}={getattr(config, name)!r} is not "
                            f"exported (only {' or '.join(map(repr, allowed))})")
    if config.n_kv_heads not in (None, config.n_heads):
        problems.append(f"TransformerConfig.n_kv_heads={config.n_kv_heads!r}: grouped-query "
                        "attention is not exported")
    if config.decoder_only:
        problems.append("TransformerConfig.n_encoder_layers=0: the decoder-only model is not "
                        "exported to CTranslate2 (serve it with --engine torch)")
    if config.copy_attention:
        problems.append("TransformerConfig.copy_attention=True: CTranslate2's Transformer has "
                        "no pointer-generator output (serve or evaluate with --engine torch)")
    if problems:
        raise NotExportableError("cannot export to CTranslate2: " + "; ".join(problems))


def _tensor(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float32).contiguous().clone()


def _linear(spec, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    spec.weight = _tensor(weight)
    if bias is not None:
        spec.bias = _tensor(bias)


def _layer_norm(spec, norm: nn.LayerNorm) -> None:
    spec.gamma = _tensor(norm.weight)
    spec.beta = _tensor(norm.bias)


def _self_attention(spec, attn, norm: nn.LayerNorm) -> None:
    _linear(spec.linear[0], attn.in_proj.weight, attn.in_proj.bias)  # (3D, D): [Q; K; V]
    _linear(spec.linear[1], attn.out_proj.weight, attn.out_proj.bias)
    _layer_norm(spec.layer_norm, norm)


def _cross_attention(spec, attn, norm: nn.LayerNorm) -> None:
    d = attn.out_proj.weight.size(0)
    w, b = attn.in_proj.weight, attn.in_proj.bias
    _linear(spec.linear[0], w[:d], None if b is None else b[:d])  # queries, from the decoder
    _linear(spec.linear[1], w[d:], None if b is None else b[d:])  # keys and values, (2D, D)
    _linear(spec.linear[2], attn.out_proj.weight, attn.out_proj.bias)
    _layer_norm(spec.layer_norm, norm)


def _ffn(spec, ffn, norm: nn.LayerNorm) -> None:
    _linear(spec.linear_0, ffn.w1.weight, ffn.w1.bias)
    if ffn.w3 is not None:  # gated: act(x W1) * (x W3); CTranslate2 multiplies linear_0_noact
        _linear(spec.linear_0_noact, ffn.w3.weight, ffn.w3.bias)
    _linear(spec.linear_1, ffn.w2.weight, ffn.w2.bias)
    _layer_norm(spec.layer_norm, norm)


def _embeddings(spec, embed, config: TransformerConfig) -> None:
    token = spec.embeddings[0] if isinstance(spec.embeddings, list) else spec.embeddings
    token.weight = _tensor(embed.token.weight)
    spec.scale_embeddings = bool(config.scale_embeddings)  # True: × √D, as tformer
    if embed.learned is not None:
        table = embed.learned.weight
    else:
        positions = torch.arange(config.max_positions)
        table = sinusoidal_positions(positions, config.d_model)  # (P, D), interleaved sin/cos
    spec.position_encodings.encodings = _tensor(table)


def build_spec(model, vocabulary: list[str], *, bos: str, eos: str, unk: str,
               decoder_start: str) -> transformer_spec.TransformerSpec:
    """The ``TransformerSpec`` of a :class:`tformer.model.Transformer` (``model``) with its
    token strings in id order (``vocabulary``) and its special tokens."""
    config: TransformerConfig = model.config
    check_exportable(config)
    if len(vocabulary) != config.vocab_size:
        raise ValueError(f"vocabulary has {len(vocabulary)} tokens but the model's vocab_size is "
                         f"{config.vocab_size}")
    spec = transformer_spec.TransformerSpec.from_config(
        (config.n_encoder_layers, config.n_decoder_layers), config.n_heads,
        pre_norm=config.norm_first, activation=_ACTIVATIONS[config.activation],
        ffn_glu=config.gated_ffn,
    )
    _embeddings(spec.encoder, model.src_embed, config)
    for layer_spec, layer in zip(spec.encoder.layer, model.encoder.layers, strict=True):
        _self_attention(layer_spec.self_attention, layer.self_attn, layer.norm1)
        _ffn(layer_spec.ffn, layer.ffn, layer.norm2)
    _embeddings(spec.decoder, model.tgt_embed, config)
    for layer_spec, layer in zip(spec.decoder.layer, model.decoder.layers, strict=True):
        _self_attention(layer_spec.self_attention, layer.self_attn, layer.norm1)
        _cross_attention(layer_spec.attention, layer.cross_attn, layer.norm2)
        _ffn(layer_spec.ffn, layer.ffn, layer.norm3)
    if config.norm_first:  # post-norm stacks have no final LayerNorm, nor does the spec then
        _layer_norm(spec.encoder.layer_norm, model.encoder.norm)
        _layer_norm(spec.decoder.layer_norm, model.decoder.norm)
    head = model.lm_head.weight if model.lm_head is not None else model.tgt_embed.token.weight
    spec.decoder.projection.weight = _tensor(head)

    spec.config.layer_norm_epsilon = float(config.layer_norm_eps)
    spec.config.bos_token, spec.config.eos_token, spec.config.unk_token = bos, eos, unk
    spec.config.decoder_start_token = decoder_start
    # The tokenizer already appends </s> to every source: CTranslate2 adds nothing.
    spec.config.add_source_bos = False
    spec.config.add_source_eos = False
    spec.register_source_vocabulary(vocabulary)
    spec.register_target_vocabulary(vocabulary)
    return spec
