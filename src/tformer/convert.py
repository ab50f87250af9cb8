"""Converters between tformer's decoder-only models and Hugging Face's own GPT-2 and Llama.

A model of the ``gpt2`` preset becomes a ``transformers.GPT2LMHeadModel`` and back, one of the
``llama`` preset a ``transformers.LlamaForCausalLM`` and back, with the same logits (tested to
1e-5, ``tests/test_convert.py``). A converted checkpoint loads with plain ``transformers``, no
``import tformer``: ``tformer export CKPT --format transformers``.

The weights map one to one but for two layouts:

- GPT-2 stores its linear layers as ``Conv1D``, weight (in, out): the transpose of
  ``nn.Linear``'s (out, in). Its ``c_attn`` is Q, K and V fused, as tformer's ``in_proj``.
- Llama keeps Q, K and V apart (``q_proj``, ``k_proj``, ``v_proj``); tformer's ``in_proj`` is
  the three stacked, rows [Q; K; V]. Both rotate queries and keys with ``rotate_half`` (dimension
  i paired with i + Dh/2), so no permutation of the heads is needed.
"""

from __future__ import annotations

import copy
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
)

from tformer.hf import DEFAULT_MAX_NEW_TOKENS, TformerConfig, TformerForCausalLM
from tformer.model import TransformerConfig

#: What each target family fixes in a TransformerConfig (the rest maps to its config).
_FAMILIES: dict[str, dict] = {
    "gpt2": dict(n_encoder_layers=0, norm_first=True, norm="layernorm", positional="learned",
                 gated_ffn=False, bias=True, scale_embeddings=False),
    "llama": dict(n_encoder_layers=0, norm_first=True, norm="rmsnorm", positional="rope",
                  activation="silu", gated_ffn=True, scale_embeddings=False),
}
#: GPT-2's ``activation_function`` names <-> tformer's ``activation``.
_GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                     "gelu": "gelu", "relu": "relu", "silu": "silu"}


@dataclass(frozen=True)
class _Tensor:
    """One tformer tensor and the Hugging Face tensors it is made of: stacked by rows in this
    order (Llama's Q, K, V), each transposed first where ``transposed`` (GPT-2's Conv1D)."""

    ours: str
    theirs: tuple[str, ...]
    transposed: bool = False


def family(config: TransformerConfig) -> str:
    """``gpt2`` or ``llama``: the Hugging Face family a tformer config converts to; a
    ValueError naming every field that keeps it from either."""
    problems = {}
    for name, fixed in _FAMILIES.items():
        problems[name] = [f"{field}={getattr(config, field)!r} (needs {value!r})"
                          for field, value in fixed.items() if getattr(config, field) != value]
    if config.activation not in ("gelu_tanh", "gelu", "relu"):
        problems["gpt2"].append(f"activation={config.activation!r}")
    if config.kv_heads != config.n_heads:
        problems["gpt2"].append(f"n_kv_heads={config.n_kv_heads!r} (needs n_heads)")
    for name in ("gpt2", "llama"):
        if not problems[name]:
            return name
    raise ValueError("this model converts neither to GPT-2 nor to Llama: its TransformerConfig "
                     "has " + "; ".join(f"for {name}: {', '.join(p)}"
                                        for name, p in problems.items()))


def _layout(config: TransformerConfig, name: str) -> list[_Tensor]:
    """Every tensor of a tformer model of family ``name`` and its Hugging Face source."""
    if name == "gpt2":
        tensors = [_Tensor("model.embed.token.weight", ("transformer.wte.weight",)),
                   _Tensor("model.embed.learned.weight", ("transformer.wpe.weight",)),
                   _Tensor("model.decoder.norm.weight", ("transformer.ln_f.weight",)),
                   _Tensor("model.decoder.norm.bias", ("transformer.ln_f.bias",))]
        pairs = [("norm1", "ln_1", False), ("self_attn.in_proj", "attn.c_attn", True),
                 ("self_attn.out_proj", "attn.c_proj", True), ("norm3", "ln_2", False),
                 ("ffn.w1", "mlp.c_fc", True), ("ffn.w2", "mlp.c_proj", True)]
        for i in range(config.n_decoder_layers):
            for ours, theirs, conv1d in pairs:
                for kind in ("weight", "bias"):
                    tensors.append(_Tensor(f"model.decoder.layers.{i}.{ours}.{kind}",
                                           (f"transformer.h.{i}.{theirs}.{kind}",),
                                           conv1d and kind == "weight"))
    else:
        tensors = [_Tensor("model.embed.token.weight", ("model.embed_tokens.weight",)),
                   _Tensor("model.decoder.norm.weight", ("model.norm.weight",))]
        kinds = ("weight", "bias") if config.bias else ("weight",)
        for i in range(config.n_decoder_layers):
            ours, theirs = f"model.decoder.layers.{i}.", f"model.layers.{i}."
            tensors += [_Tensor(ours + "norm1.weight", (theirs + "input_layernorm.weight",)),
                        _Tensor(ours + "norm3.weight", (theirs + "post_attention_layernorm.weight",))]
            for kind in kinds:
                parts = [("self_attn.in_proj", ("self_attn.q_proj", "self_attn.k_proj",
                                                "self_attn.v_proj")),
                         ("self_attn.out_proj", ("self_attn.o_proj",)),
                         ("ffn.w1", ("mlp.gate_proj",)), ("ffn.w3", ("mlp.up_proj",)),
                         ("ffn.w2", ("mlp.down_proj",))]
                tensors += [_Tensor(f"{ours}{a}.{kind}", tuple(f"{theirs}{b}.{kind}" for b in bs))
                            for a, bs in parts]
    if not config.tie_embeddings:
        tensors.append(_Tensor("model.lm_head.weight", ("lm_head.weight",)))
    return tensors


def _hf_config(config: TformerConfig, name: str):
    c = config.transformer_config()
    ids = dict(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
               pad_token_id=config.pad_token_id, tie_word_embeddings=c.tie_embeddings)
    if name == "gpt2":
        activation = {"gelu_tanh": "gelu_new"}.get(c.activation, c.activation)
        return GPT2Config(vocab_size=c.vocab_size, n_positions=c.max_positions, n_embd=c.d_model,
                          n_layer=c.n_decoder_layers, n_head=c.n_heads, n_inner=c.d_ff,
                          activation_function=activation, resid_pdrop=c.dropout,
                          embd_pdrop=c.dropout, attn_pdrop=c.attention_dropout,
                          layer_norm_epsilon=c.layer_norm_eps, **ids)
    return LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.d_ff,
                       num_hidden_layers=c.n_decoder_layers, num_attention_heads=c.n_heads,
                       num_key_value_heads=c.kv_heads, head_dim=c.head_dim, hidden_act="silu",
                       max_position_embeddings=c.max_positions, rms_norm_eps=c.layer_norm_eps,
                       rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
                       attention_bias=c.bias, mlp_bias=c.bias,
                       attention_dropout=c.attention_dropout, **ids)


def _tformer_config(hf_config) -> TformerConfig:
    ids = dict(bos_token_id=hf_config.bos_token_id, eos_token_id=hf_config.eos_token_id)
    # tformer's pad id must be a token: the end of text where the model has no pad (GPT-2)
    pad = hf_config.pad_token_id
    eos = hf_config.eos_token_id[0] if isinstance(hf_config.eos_token_id, list) else \
        hf_config.eos_token_id
    pad = pad if pad is not None else (eos if eos is not None else 0)
    if isinstance(hf_config, GPT2Config):
        c = hf_config
        unsupported = {"scale_attn_weights": (c.scale_attn_weights, True),
                       "scale_attn_by_inverse_layer_idx": (c.scale_attn_by_inverse_layer_idx,
                                                           False),
                       "add_cross_attention": (c.add_cross_attention, False),
                       "activation_function": (c.activation_function in _GPT2_ACTIVATIONS, True)}
        fields = dict(
            **_FAMILIES["gpt2"], vocab_size=c.vocab_size, d_model=c.n_embd, n_heads=c.n_head,
            n_decoder_layers=c.n_layer, d_ff=c.n_inner or 4 * c.n_embd,
            activation=_GPT2_ACTIVATIONS.get(c.activation_function, "relu"),
            dropout=c.resid_pdrop, attention_dropout=c.attn_pdrop, max_positions=c.n_positions,
            layer_norm_eps=c.layer_norm_epsilon, tie_embeddings=c.tie_word_embeddings)
    else:
        c = hf_config
        rope = c.rope_parameters or {}
        unsupported = {"rope_type": (rope.get("rope_type", "default"), "default"),
                       "hidden_act": (c.hidden_act, "silu"),
                       "mlp_bias": (c.mlp_bias, c.attention_bias),
                       "head_dim": (c.head_dim, c.hidden_size // c.num_attention_heads)}
        fields = dict(
            **_FAMILIES["llama"], vocab_size=c.vocab_size, d_model=c.hidden_size,
            n_heads=c.num_attention_heads, n_kv_heads=c.num_key_value_heads,
            n_decoder_layers=c.num_hidden_layers, d_ff=c.intermediate_size,
            bias=c.attention_bias, rope_theta=float(rope.get("rope_theta", 10000.0)),
            attention_dropout=float(c.attention_dropout), dropout=0.0,
            max_positions=c.max_position_embeddings, layer_norm_eps=c.rms_norm_eps,
            tie_embeddings=c.tie_word_embeddings)
    wrong = [f"{key}={got!r} (tformer has {want!r})" for key, (got, want) in unsupported.items()
             if got != want]
    if wrong:
        raise ValueError(f"cannot convert this {type(hf_config).__name__}: {'; '.join(wrong)}")
    return TformerConfig(**fields, pad_token_id=pad, **ids)


@torch.no_grad()
def to_transformers(model: TformerForCausalLM) -> GPT2LMHeadModel | LlamaForCausalLM:
    """The ``GPT2LMHeadModel`` or ``LlamaForCausalLM`` with this model's weights (float32 or
    the model's dtype), its generation config included."""
    name = family(model.config.transformer_config())
    hf_config = _hf_config(model.config, name)
    target = (GPT2LMHeadModel if name == "gpt2" else LlamaForCausalLM)(hf_config)
    ours = model.state_dict()
    theirs = {}
    for t in _layout(model.config.transformer_config(), name):
        sizes = [target.get_parameter(n).shape[1 if t.transposed else 0] for n in t.theirs]
        for n, piece in zip(t.theirs, ours[t.ours].split(sizes, dim=0), strict=True):
            theirs[n] = piece.t() if t.transposed else piece
    _load_exactly(target, theirs)
    target.generation_config = model.generation_config
    return target.to(model.dtype).eval()


@torch.no_grad()
def from_transformers(model: GPT2LMHeadModel | LlamaForCausalLM) -> TformerForCausalLM:
    """The tformer model (``gpt2`` or ``llama`` preset) with the weights of a Hugging Face
    ``GPT2LMHeadModel`` or ``LlamaForCausalLM``."""
    if not isinstance(model, (GPT2LMHeadModel, LlamaForCausalLM)):
        raise ValueError(f"converts GPT2LMHeadModel or LlamaForCausalLM, not {type(model).__name__}")
    config = _tformer_config(model.config)
    target = TformerForCausalLM(config)
    theirs = model.state_dict()
    ours = {t.ours: torch.cat([theirs[n].t() if t.transposed else theirs[n] for n in t.theirs])
            for t in _layout(config.transformer_config(), family(config.transformer_config()))}
    _load_exactly(target, ours)
    target.generation_config = copy.deepcopy(model.generation_config)
    generation = target.generation_config
    if generation.max_new_tokens is None and generation.max_length is None:
        generation.max_new_tokens = DEFAULT_MAX_NEW_TOKENS  # as every tformer model
    return target.to(model.dtype).eval()


def _load_exactly(model: PreTrainedModel, state: dict[str, torch.Tensor]) -> None:
    """Load ``state`` into ``model``; every parameter must be given (tied ones once)."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or {})
    missing = [m for m in missing if m not in tied and not (
        m == "lm_head.weight" and model.config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"conversion left out {missing} and added {unexpected}")
    if model.config.tie_word_embeddings:
        model.tie_weights()


def export_transformers(checkpoint: str | Path, output: str | Path | None = None,
                        force: bool = False) -> Path:
    """Write a decoder-only tformer checkpoint as a ``GPT2LMHeadModel`` or ``LlamaForCausalLM``
    directory (safetensors, config, generation config, the tokenizer) that plain
    ``transformers`` loads, with no ``import tformer``. ``output`` defaults to
    ``./NAME-transformers``; an existing one is replaced only with ``force``."""
    out = Path(output) if output is not None else Path(f"{Path(checkpoint).name}-transformers")
    if out.exists():
        if not force:
            raise ValueError(f"output directory {out} already exists (pass force=True / --force)")
        shutil.rmtree(out)
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    if not isinstance(model, TformerForCausalLM):
        raise ValueError(f"{checkpoint} is not a decoder-only tformer checkpoint")
    to_transformers(model).save_pretrained(out)
    if (Path(checkpoint) / "tokenizer_config.json").is_file():
        AutoTokenizer.from_pretrained(checkpoint).save_pretrained(out)
    return out
