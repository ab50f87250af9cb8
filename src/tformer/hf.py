"""The one adapter between tformer's own Transformer and Hugging Face ``transformers``.

It wraps :class:`tformer.model.Transformer` as a ``PreTrainedModel`` + ``GenerationMixin`` and
registers it with the ``Auto*`` classes under ``model_type = "tformer"``. Through it the own model
gets ``save_pretrained`` / ``from_pretrained`` (safetensors), ``generate()`` (greedy, beam,
sampling, with the key/value cache) and the same code path as any pretrained seq2seq checkpoint.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor
from transformers import (
    AutoConfig,
    AutoModelForSeq2SeqLM,
    GenerationMixin,
    PreTrainedConfig,
    PreTrainedModel,
)
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.modeling_outputs import BaseModelOutput, Seq2SeqLMOutput

from tformer.model import (
    IGNORE_INDEX,
    TransformerConfig,
    build_transformer,
    compute_loss,
)

MODEL_TYPE = "tformer"
_MODEL_FIELDS = [f.name for f in dataclasses.fields(TransformerConfig)]


class TformerConfig(PreTrainedConfig):
    """Hugging Face configuration of the own Transformer: the fields of
    :class:`tformer.model.TransformerConfig` plus the token ids ``generate()`` needs.

    ``num_hidden_layers``, ``num_attention_heads`` and ``hidden_size`` are exposed because the
    generation cache code reads them.
    """

    model_type = MODEL_TYPE
    attribute_map = {
        "hidden_size": "d_model",
        "num_attention_heads": "n_heads",
        "num_hidden_layers": "n_decoder_layers",
    }

    vocab_size: int = 8000
    d_model: int = 512
    n_heads: int = 8
    n_encoder_layers: int = 6
    n_decoder_layers: int = 6
    d_ff: int = 2048
    dropout: float = 0.1
    attention_dropout: float = 0.0
    activation: str = "relu"
    gated_ffn: bool = False
    norm_first: bool = False
    positional: str = "sinusoidal"
    max_positions: int = 1024
    scale_embeddings: bool = True
    tie_embeddings: bool = True
    copy_attention: bool = False
    layer_norm_eps: float = 1e-5
    label_smoothing: float = 0.0  # used by forward(labels=...); the trainer passes its own
    pad_token_id: int | None = 0
    bos_token_id: int | None = 2
    eos_token_id: int | list[int] | None = 3
    decoder_start_token_id: int | None = 2
    is_encoder_decoder: bool = True
    use_cache: bool = True

    def __post_init__(self, **kwargs):
        self.tie_word_embeddings = self.tie_embeddings
        super().__post_init__(**kwargs)
        self.transformer_config()  # validate now: a bad value fails here, naming the field

    def transformer_config(self) -> TransformerConfig:
        return TransformerConfig(**{name: getattr(self, name) for name in _MODEL_FIELDS})

    @classmethod
    def from_transformer_config(cls, config: TransformerConfig, **kwargs) -> TformerConfig:
        return cls(**config.to_dict(), **kwargs)


class _HFCacheView:
    """:class:`tformer.model.DecoderCache` over a ``transformers.EncoderDecoderCache``, so that
    ``generate()`` owns one cache (and reorders it for beam search) while the model stays
    torch-only."""

    def __init__(self, cache: EncoderDecoderCache) -> None:
        self.cache = cache

    def seq_length(self) -> int:
        return self.cache.self_attention_cache.get_seq_length()

    def update_self(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self.cache.self_attention_cache.update(k, v, layer)

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
        out = self.owner.model.encode(input_ids, mask, need_weights=bool(output_attentions))
        return TformerEncoderOutput(last_hidden_state=out.hidden, attentions=out.attentions,
                                    source_ids=input_ids)


class TformerPreTrainedModel(PreTrainedModel):
    config_class = TformerConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _supports_sdpa = True
    _no_split_modules = ["EncoderLayer", "DecoderLayer"]  # FSDP auto-wrap / device maps

    def _init_weights(self, module) -> None:
        # build_transformer() already initialised every weight (tformer.model.init_weights);
        # from_pretrained overwrites them with the checkpoint.
        pass


class TformerForConditionalGeneration(TformerPreTrainedModel, GenerationMixin):
    """The own Transformer behind the Hugging Face seq2seq interface.

    ``forward`` returns a ``Seq2SeqLMOutput``; given ``labels`` (pad = -100) it builds the
    decoder inputs by shifting them right and returns the token-mean cross-entropy, with
    ``config.label_smoothing``. ``output_attentions=True`` returns encoder, decoder and cross
    attention per layer, each (B, H, Tq, Tk).
    """

    _tied_weights_keys = {"model.tgt_embed.token.weight": "model.src_embed.token.weight"}

    def __init__(self, config: TformerConfig) -> None:
        super().__init__(config)
        self.model = build_transformer(config.transformer_config())
        self.post_init()

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.model.src_embed.token

    def get_output_embeddings(self):
        return self.model.lm_head  # None when tied to the input embedding

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
        need_weights = bool(output_attentions)
        source_mask = None if attention_mask is None else attention_mask.bool()
        if encoder_outputs is None:
            encoder_outputs = self.get_encoder()(input_ids, attention_mask, need_weights)
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
            decoder_input_ids, encoder_outputs.last_hidden_state, source_mask, view, need_weights
        )
        source_ids = getattr(encoder_outputs, "source_ids", None)
        logits = self.model.output(  # (B, T, V)
            dec.hidden, encoder_outputs.last_hidden_state,
            source_ids if source_ids is not None else input_ids, source_mask)
        loss = None
        if labels is not None:
            loss = compute_loss(logits, labels, self.config.label_smoothing)
        return Seq2SeqLMOutput(
            loss=loss,
            logits=logits,
            cache=cache if view is not None else None,
            decoder_attentions=dec.self_attentions,
            cross_attentions=dec.cross_attentions,
            encoder_last_hidden_state=encoder_outputs.last_hidden_state,
            encoder_attentions=encoder_outputs.attentions,
        )


AutoConfig.register(MODEL_TYPE, TformerConfig)
AutoModelForSeq2SeqLM.register(TformerConfig, TformerForConditionalGeneration)
