"""The one adapter between tformer's own Transformer and Hugging Face ``transformers``.

It wraps :class:`tformer.model.Transformer` (encoder-decoder) and
:class:`tformer.model.DecoderOnlyTransformer` (the GPT family) as ``PreTrainedModel`` +
``GenerationMixin`` and registers them with the ``Auto*`` classes under
``model_type = "tformer"``: ``AutoModelForSeq2SeqLM`` and ``AutoModelForCausalLM``, one config
for both (``is_encoder_decoder`` is ``n_encoder_layers > 0``). Through it the own model gets
``save_pretrained`` / ``from_pretrained`` (safetensors), ``generate()`` (greedy, beam, sampling,
with the key/value cache) and the same code path as any pretrained checkpoint.
It behaves as Hugging Face's own models do: ``labels`` give the plain cross-entropy,
``output_hidden_states``, ``resize_token_embeddings`` and ``gradient_checkpointing_enable()`` work,
and a saved model's ``generation_config`` has a length.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
from torch import Tensor
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    GenerationConfig,
    GenerationMixin,
    PreTrainedConfig,
    PreTrainedModel,
)
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.modeling_outputs import (
    BaseModelOutput,
    CausalLMOutputWithPast,
    Seq2SeqLMOutput,
)

from tformer.model import (
    IGNORE_INDEX,
    TransformerConfig,
    architecture_fields,
    build_transformer,
    compute_loss,
)

MODEL_TYPE = "tformer"
_ARCHITECTURE = architecture_fields()

# Loading a checkpoint without ``import tformer``. Transformers knows no "tformer" model type
# until tformer registers it, and for an unknown type it says to update Transformers, a message
# no checkpoint can change. What a checkpoint can carry is Hugging Face's way to custom code: an
# ``auto_map`` in config.json naming a module in the directory. Transformers then says that the
# checkpoint "contains custom code" and asks for ``trust_remote_code=True``; given it, it runs
# that module, which only imports the installed tformer (or, where tformer is missing, says to
# install and import it). With ``import tformer`` first (tformer's own loaders) the registered
# classes are used and the module never runs.
SHIM_FILE = "modeling_tformer.py"
AUTO_MAP = {"AutoConfig": "modeling_tformer.TformerConfig",
            "AutoModelForSeq2SeqLM": "modeling_tformer.TformerForConditionalGeneration",
            "AutoModelForCausalLM": "modeling_tformer.TformerForCausalLM"}
_SHIM = '''"""This directory is a tformer checkpoint: tformer's own Transformer (encoder-decoder or
decoder-only).

Load it with `import tformer` first, then any `transformers` Auto class (no code of this
directory runs then), or with `trust_remote_code=True`, which runs this file: it only imports
the installed `tformer` package.
"""

try:
    from tformer import hf
except ImportError as error:
    raise ImportError(
        "This is a tformer checkpoint: install tformer (pip install tformer) and `import tformer` "
        "before loading it with transformers."
    ) from error


# Subclasses, so that what transformers records on the classes it loads from here stays off
# tformer's own.
class TformerConfig(hf.TformerConfig):
    pass


class TformerForConditionalGeneration(hf.TformerForConditionalGeneration):
    config_class = TformerConfig


class TformerForCausalLM(hf.TformerForCausalLM):
    config_class = TformerConfig
'''

#: ``max_new_tokens`` of a model whose generation config has no length: the CLI's default.
#: Without one, ``generate()`` stops every output at 20 tokens (``max_length``'s default).
DEFAULT_MAX_NEW_TOKENS = 128


class TformerConfig(PreTrainedConfig):
    """Hugging Face configuration of the own Transformer: the fields of
    :class:`tformer.model.TransformerConfig` plus the token ids ``generate()`` needs.
    ``is_encoder_decoder`` follows ``n_encoder_layers`` (0: decoder-only).

    ``num_hidden_layers``, ``num_attention_heads`` and ``hidden_size`` are exposed because the
    generation cache code reads them.
    """

    model_type = MODEL_TYPE
    attribute_map = {
        "hidden_size": "d_model",
        "num_attention_heads": "n_heads",
        "num_hidden_layers": "n_decoder_layers",
    }

    # The architecture: every field of TransformerConfig with its type and default, declared
    # there once (tformer.model.config.architecture_fields) and copied into this dataclass here.
    # Hugging Face needs a config that builds with no arguments: vocab_size gets a default.
    __annotations__.update({name: hint for name, (hint, _) in _ARCHITECTURE.items()})
    locals().update({name: default for name, (_, default) in _ARCHITECTURE.items()})
    vocab_size = 8000
    # Token ids as Hugging Face types them (generate() reads these; None = the model has none).
    pad_token_id: int | None = 0
    bos_token_id: int | None = 2
    eos_token_id: int | list[int] | None = 3
    decoder_start_token_id: int | None = 2
    is_encoder_decoder: bool = True
    use_cache: bool = True

    def __post_init__(self, **kwargs):
        # Checkpoints written before label smoothing became the trainer's alone (train.
        # label_smoothing) stored it here; forward(labels=...) is now plain cross-entropy.
        kwargs.pop("label_smoothing", None)
        self.tie_word_embeddings = self.tie_embeddings
        self.is_encoder_decoder = self.n_encoder_layers > 0
        super().__post_init__(**kwargs)
        self.transformer_config()  # validate now: a bad value fails here, naming the field
        self.auto_map = dict(AUTO_MAP)

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False,
                        **kwargs) -> None:
        """``PreTrainedConfig.save_pretrained``, plus the module ``auto_map`` names (see
        ``SHIM_FILE``), written first so that a push to the Hub includes it."""
        os.makedirs(save_directory, exist_ok=True)
        (Path(save_directory) / SHIM_FILE).write_text(_SHIM, encoding="utf-8")
        super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)

    def transformer_config(self) -> TransformerConfig:
        return TransformerConfig(**{name: getattr(self, name) for name in _ARCHITECTURE})

    @classmethod
    def from_transformer_config(cls, config: TransformerConfig, **kwargs) -> TformerConfig:
        return cls(**config.to_dict(), **kwargs)


class _HFCacheView:
    """:class:`tformer.model.DecoderCache` over a ``transformers.EncoderDecoderCache`` (or a
    ``DynamicCache``, decoder-only: self-attention alone), so that ``generate()`` owns one cache
    (and reorders it for beam search) while the model stays torch-only."""

    def __init__(self, cache: EncoderDecoderCache | DynamicCache) -> None:
        self.cache = cache
        self.own = (cache.self_attention_cache if isinstance(cache, EncoderDecoderCache)
                    else cache)  # the self-attention keys and values

    def seq_length(self) -> int:
        return self.own.get_seq_length()

    def update_self(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self.own.update(k, v, layer)

    def get_cross(self, layer: int) -> tuple[Tensor, Tensor] | None:
        if not self.cache.is_updated.get(layer):
            return None
        stored = self.cache.cross_attention_cache.layers[layer]
        return stored.keys, stored.values

    def set_cross(self, layer: int, k: Tensor, v: Tensor) -> None:
        self.cache.cross_attention_cache.update(k, v, layer)
        self.cache.is_updated[layer] = True


@dataclasses.dataclass
class TformerEncoderOutput(BaseModelOutput):
    """The encoder's output plus the source ids, which copy attention reads at every decoder
    step. ``generate()`` expands it for beams and samples like any encoder output."""

    source_ids: torch.LongTensor | None = None


class _Encoder:
    """What ``generate()`` calls through ``get_encoder()``: the source side alone."""

    def __init__(self, owner: TformerForConditionalGeneration) -> None:
        self.owner = owner

    def __call__(self, *args, **kwargs) -> BaseModelOutput:
        return self.forward(*args, **kwargs)

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None,
        output_attentions: bool | None = None, output_hidden_states: bool | None = None,
        return_dict: bool | None = None, **kwargs,
    ) -> BaseModelOutput:
        mask = None if attention_mask is None else attention_mask.bool()
        out = self.owner.model.encode(input_ids, mask, need_weights=bool(output_attentions),
                                      need_hidden=bool(output_hidden_states))
        return TformerEncoderOutput(last_hidden_state=out.hidden, attentions=out.attentions,
                                    hidden_states=out.hidden_states, source_ids=input_ids)


class TformerPreTrainedModel(PreTrainedModel):
    config_class = TformerConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _supports_sdpa = True
    _no_split_modules = ["EncoderLayer", "DecoderLayer"]  # FSDP auto-wrap / device maps
    # gradient_checkpointing_enable() sets gradient_checkpointing on the encoder and decoder
    # stacks (tformer.model.transformer._Stack), which then checkpoint each layer
    supports_gradient_checkpointing = True

    #: The family of the concrete class: decoder-only (n_encoder_layers == 0) or encoder-decoder.
    decoder_only: bool

    def __init__(self, config: TformerConfig) -> None:
        super().__init__(config)
        if (config.n_encoder_layers == 0) != self.decoder_only:
            wanted, other = (("decoder-only", "TformerForConditionalGeneration")
                             if self.decoder_only else ("encoder-decoder", "TformerForCausalLM"))
            raise ValueError(f"{type(self).__name__} is the {wanted} model: this config has "
                             f"n_encoder_layers={config.n_encoder_layers}; use {other}")
        self.model = build_transformer(config.transformer_config())
        self.post_init()

    def get_output_embeddings(self):
        return self.model.lm_head  # None when tied to the input embedding

    def set_output_embeddings(self, value: torch.nn.Linear) -> None:
        self.model.lm_head = value

    def _follow_vocabulary(self, embeddings: torch.nn.Embedding) -> None:
        """The torch model's config takes the new input embedding's vocabulary size."""
        self.model.config = dataclasses.replace(self.model.config,
                                                vocab_size=embeddings.num_embeddings)

    def _init_weights(self, module) -> None:
        # build_transformer() already initialised every weight (tformer.model.init_weights);
        # from_pretrained overwrites them with the checkpoint.
        pass

    def post_init(self) -> None:
        super().post_init()
        _give_length(self.generation_config)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """``PreTrainedModel.from_pretrained``; a checkpoint saved without a length in its
        ``generation_config.json`` (before tformer wrote one) gets ``DEFAULT_MAX_NEW_TOKENS``."""
        loaded = super().from_pretrained(*args, **kwargs)
        # (model, loading_info) with output_loading_info=True
        _give_length((loaded[0] if isinstance(loaded, tuple) else loaded).generation_config)
        return loaded

    def _prepare_generation_config(self, generation_config: GenerationConfig | None, **kwargs):
        """Hugging Face's (``GenerationMixin``, next in the concrete classes' order), except
        that a ``max_length`` asked for in the call (without ``max_new_tokens``) wins over the
        ``max_new_tokens`` this model's generation config carries: ``generate()`` would
        otherwise let the stored one take precedence."""
        prepared, model_kwargs = super()._prepare_generation_config(generation_config, **kwargs)
        asked = [kwargs, {} if generation_config is None else generation_config.to_dict()]
        if (any(a.get("max_length") is not None for a in asked)
                and all(a.get("max_new_tokens") is None for a in asked)):
            prepared.max_new_tokens = None
        return prepared, model_kwargs


class TformerForConditionalGeneration(TformerPreTrainedModel, GenerationMixin):
    """The own Transformer behind the Hugging Face seq2seq interface.

    ``forward`` returns a ``Seq2SeqLMOutput``; given ``labels`` (pad = -100) it builds the
    decoder inputs by shifting them right and returns the token-mean cross-entropy, without
    label smoothing, as every Hugging Face seq2seq model (training smooths through
    ``train.label_smoothing``). ``output_attentions=True`` returns encoder, decoder and cross
    attention per layer, each (B, H, Tq, Tk); ``output_hidden_states=True`` the embedding output
    and each layer's, N + 1 tensors (B, S or T, D) per side.
    """

    _tied_weights_keys = {"model.tgt_embed.token.weight": "model.src_embed.token.weight"}

    decoder_only = False

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.model.src_embed.token

    def set_input_embeddings(self, value: torch.nn.Embedding) -> None:
        self.model.src_embed.token = value
        if self.config.tie_embeddings:
            self.model.tgt_embed.token = value
        self._follow_vocabulary(value)

    def _resize_token_embeddings(self, new_num_tokens, pad_to_multiple_of=None,
                                 mean_resizing=True):
        """Hugging Face resizes the input embedding and ``lm_head``; an untied model has a third
        table, the target embedding, resized here the same way."""
        embeddings = super()._resize_token_embeddings(new_num_tokens, pad_to_multiple_of,
                                                      mean_resizing)
        target = self.model.tgt_embed.token
        if target is not embeddings:
            self.model.tgt_embed.token = self._get_resized_embeddings(
                target, embeddings.num_embeddings, mean_resizing=mean_resizing)
        return embeddings

    def get_encoder(self, modality: str | None = None) -> _Encoder:
        return _Encoder(self)

    def prepare_decoder_input_ids_from_labels(self, labels: Tensor) -> Tensor:
        """[decoder_start] + labels[:-1], with -100 replaced by pad (teacher forcing input)."""
        start = torch.full_like(labels[:, :1], self.config.decoder_start_token_id)
        shifted = torch.cat([start, labels[:, :-1]], dim=1)
        return shifted.masked_fill(shifted == IGNORE_INDEX, self.config.pad_token_id)

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        decoder_input_ids: Tensor | None = None,
        decoder_attention_mask: Tensor | None = None,  # accepted for API parity; causal is enough
        encoder_outputs: BaseModelOutput | tuple | None = None,
        cache: EncoderDecoderCache | None = None,
        labels: Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        past_key_values: EncoderDecoderCache | None = None,
        **kwargs,
    ) -> Seq2SeqLMOutput:
        need_weights, need_hidden = bool(output_attentions), bool(output_hidden_states)
        source_mask = None if attention_mask is None else attention_mask.bool()
        if encoder_outputs is None:
            encoder_outputs = self.get_encoder()(input_ids, attention_mask, need_weights,
                                                 need_hidden)
        elif isinstance(encoder_outputs, tuple):
            encoder_outputs = BaseModelOutput(*encoder_outputs)
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("forward() needs decoder_input_ids or labels")
            decoder_input_ids = self.prepare_decoder_input_ids_from_labels(labels)

        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None and not self.training:
            cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        view = _HFCacheView(cache) if (use_cache and cache is not None) else None

        dec = self.model.decode(
            decoder_input_ids, encoder_outputs.last_hidden_state, source_mask, view, need_weights,
            need_hidden=need_hidden,
        )
        source_ids = getattr(encoder_outputs, "source_ids", None)
        logits = self.model.output(  # (B, T, V)
            dec.hidden, encoder_outputs.last_hidden_state,
            source_ids if source_ids is not None else input_ids, source_mask)
        loss = None
        if labels is not None:
            loss = compute_loss(logits, labels)  # no label smoothing: comparable with T5, BART
        return Seq2SeqLMOutput(
            loss=loss,
            logits=logits,
            cache=cache if view is not None else None,
            decoder_hidden_states=dec.hidden_states,
            decoder_attentions=dec.self_attentions,
            cross_attentions=dec.cross_attentions,
            encoder_last_hidden_state=encoder_outputs.last_hidden_state,
            encoder_hidden_states=encoder_outputs.hidden_states if need_hidden else None,
            encoder_attentions=encoder_outputs.attentions,
        )


class TformerForCausalLM(TformerPreTrainedModel, GenerationMixin):
    """The own decoder-only Transformer (``n_encoder_layers=0``; the ``gpt2`` and ``llama``
    presets) behind the Hugging Face causal-LM interface, as ``GPT2LMHeadModel`` and
    ``LlamaForCausalLM``.

    ``forward`` returns a ``CausalLMOutputWithPast``. ``labels`` are Hugging Face's: the input
    ids themselves, −100 where no loss is wanted; position t's logits are scored against
    ``labels[:, t + 1]`` (the shift is done here, once), as the plain token-mean cross-entropy.
    ``document_ids`` (B, T): packed rows, each token attending only to its own document.
    """

    decoder_only = True

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.model.embed.token

    def set_input_embeddings(self, value: torch.nn.Embedding) -> None:
        self.model.embed.token = value
        self._follow_vocabulary(value)

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        past_key_values: DynamicCache | None = None,
        labels: Tensor | None = None,
        document_ids: Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cache: DynamicCache | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """``input_ids`` (B, T), only the new positions when a cache holds the earlier ones;
        ``attention_mask`` (B, T_past + T), 1 = token, 0 = padding (left padding works: the
        positions count real tokens); ``cache`` or ``past_key_values``: a ``DynamicCache``
        (``generate()`` passes it); ``logits_to_keep`` K > 0: logits of the last K positions
        only (``generate()`` passes 1, as to Hugging Face's own models, and then projects
        one position of the prompt instead of all of them: see
        ``DecoderOnlyTransformer.forward``)."""
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None and not self.training and document_ids is None:
            cache = DynamicCache()
        view = _HFCacheView(cache) if (use_cache and cache is not None) else None
        if labels is not None and logits_to_keep:
            raise ValueError("labels need the logits of every position: logits_to_keep=0")
        out = self.model(input_ids, attention_mask, position_ids, document_ids, view,
                         need_weights=bool(output_attentions),
                         need_hidden=bool(output_hidden_states), logits_to_keep=logits_to_keep)
        loss = None
        if labels is not None:  # position t predicts token t + 1
            loss = compute_loss(out.logits[:, :-1], labels[:, 1:])
        return CausalLMOutputWithPast(
            loss=loss, logits=out.logits, cache=cache if view is not None else None,
            hidden_states=out.hidden_states, attentions=out.attentions,
        )


def _give_length(generation: GenerationConfig) -> None:
    """Set ``max_new_tokens`` to ``DEFAULT_MAX_NEW_TOKENS`` where no length is set."""
    if generation.max_new_tokens is None and generation.max_length is None:
        generation.max_new_tokens = DEFAULT_MAX_NEW_TOKENS


AutoConfig.register(MODEL_TYPE, TformerConfig)
AutoModelForSeq2SeqLM.register(TformerConfig, TformerForConditionalGeneration)
AutoModelForCausalLM.register(TformerConfig, TformerForCausalLM)
