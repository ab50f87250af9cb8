"""``tformer export --format ctranslate2``: write a checkpoint as a CTranslate2 model directory.

Two routes, one output layout:

- tformer's own Transformer (``model_type`` "tformer"): :mod:`tformer.ct2.own_spec` maps the
  weights onto CTranslate2's ``TransformerSpec`` (encoder-decoder, run by its ``Translator``)
  or ``TransformerDecoderModelSpec`` (decoder-only, run by its ``Generator``); CTranslate2 has
  no converter for it;
- Hugging Face T5 / mT5 / BART / mBART / Marian / Pegasus, GPT-2 / Llama (any architecture that
  ``ctranslate2.converters.TransformersConverter`` registers): that converter, unchanged.

Both are ``ctranslate2.converters.Converter`` subclasses, so validation, quantization, shared
weights stored once and the file layout are CTranslate2's own. tformer adds the tokenizer
(``tokenizer/``) and the marker ``tformer_ct2.json`` (see :mod:`tformer.ct2`).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from tformer.ct2.marker import MARKER, QUANTIZATIONS, TOKENIZER_DIR, is_exported, require_ctranslate2
from tformer.generation import max_source_length_of
from tformer.loading import load_model
from tformer.tokenization import UNK_TOKEN, load_tokenizer

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


def default_output(checkpoint: str | Path, quantization: str) -> Path:
    """``./<checkpoint name>-ct2-<quantization>`` in the working directory. Never beside the
    checkpoint: a ``step-*`` sibling in ``checkpoints/`` would be taken for a checkpoint."""
    return Path(f"{Path(str(checkpoint).rstrip('/')).name}-ct2-{quantization}")


def export(
    checkpoint: str | Path,
    output: str | Path | None = None,
    *,
    quantization: str = "float32",
    force: bool = False,
) -> Path:
    """Export ``checkpoint`` (an own model of either family, a Hugging Face seq2seq or causal
    language model directory, a LoRA checkpoint or a Hub name) to a CTranslate2 directory and
    return its path.

    ``quantization``: the stored weight type, one of :data:`tformer.ct2.QUANTIZATIONS`
    (``int8`` for CPUs, ``float16``/``int8_float16`` for GPUs). ``output`` defaults to
    :func:`default_output`; an existing ``output`` is replaced only with ``force``, and only
    when it is an earlier export (or empty).

    Raises:
        ValueError: an unknown ``quantization``, an existing ``output`` without ``force``, or a
            model CTranslate2 cannot represent (the message names the option or model type).
    """
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}; "
                         f"got {quantization!r}")
    out = Path(output) if output is not None else default_output(checkpoint, quantization)
    if out.exists() and not force:
        raise ValueError(f"output directory {out} already exists (pass force=True / --force)")
    if out.exists() and not is_exported(out) and any(out.iterdir()):
        # force replaces an earlier export, never a checkpoint or any other directory
        raise ValueError(f"output directory {out} exists and is not a CTranslate2 export; "
                         "refusing to replace it")
    require_ctranslate2()
    converter, tokenizer, generation = _converter_for(checkpoint)
    # CTranslate2 writes into a temporary sibling, renamed when complete, so a failed export
    # never leaves a half-written directory that looks like a model.
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        converter.convert(str(tmp / "model"), quantization=quantization, force=True)
        model_dir = tmp / "model"
        tokenizer.save_pretrained(str(model_dir / TOKENIZER_DIR))
        local = Path(str(checkpoint)).expanduser()
        source = str(local.resolve()) if local.exists() else str(checkpoint)  # or a Hub name
        marker = {"format": "ctranslate2", "version": FORMAT_VERSION, "source": source,
                  "quantization": quantization, **generation}
        (model_dir / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        model_dir.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("exported %s to %s (%s)", checkpoint, out, quantization)
    return out


def generation_settings(model_type: str, config: Any, generation_config: Any,
                        tokenizer: Any, max_positions: int | None) -> dict[str, Any]:
    """What the engine needs to generate the same tokens as Hugging Face ``generate()``:
    the start and end tokens, forced first/last tokens, minimum length and position limit;
    for a decoder-only model (``decoder_only``), the ``context`` its prompts are continued in
    (:func:`tformer.generation.max_source_length_of`, as the torch engine)."""
    def get(name: str) -> Any:
        value = getattr(generation_config, name, None)
        return value if value is not None else getattr(config, name, None)

    eos = get("eos_token_id")
    return {
        "model_type": model_type,
        "decoder_only": not config.is_encoder_decoder,
        "decoder_start_token_id": get("decoder_start_token_id"),
        "eos_token_id": eos if isinstance(eos, list) or eos is None else [eos],
        "forced_bos_token_id": get("forced_bos_token_id"),
        "forced_eos_token_id": get("forced_eos_token_id"),
        "min_length": get("min_length") or 0,
        "max_positions": max_positions,
        "tokenizer_class": type(tokenizer).__name__,
    }


def _converter_for(checkpoint: str | Path) -> tuple[Any, Any, dict[str, Any]]:
    """The CTranslate2 converter for ``checkpoint``, its tokenizer and generation settings."""
    model = load_model(checkpoint, dtype=torch.float32)
    model_type = model.config.model_type
    if model_type != "tformer":
        _check_hf_supported(model.config)  # before the tokenizer: fail fast, naming the type
    tokenizer = load_tokenizer(checkpoint)
    if model_type == "tformer":
        max_positions = model.config.max_positions
        converter = _OwnConverter(model, tokenizer)
    else:
        max_positions = getattr(model.config, "max_position_embeddings", None)
        if model_type in ("t5", "mt5", "umt5"):
            max_positions = None  # relative position buckets: no table, no limit
        converter = _hf_converter(model, tokenizer)
    generation = generation_settings(model_type, model.config, model.generation_config,
                                     tokenizer, max_positions)
    if generation["decoder_only"]:
        generation["context"] = max_source_length_of(model, tokenizer)
    return converter, tokenizer, generation


def _vocabulary(tokenizer: Any, size: int) -> list[str]:
    """The tokenizer's tokens in id order, padded to ``size`` with unused placeholders (ids
    the model has but the tokenizer never produces)."""
    tokens = tokenizer.convert_ids_to_tokens(list(range(min(size, len(tokenizer)))))
    tokens += [f"<tformer_unused_{i}>" for i in range(len(tokens), size)]
    if len(set(tokens)) != len(tokens):
        raise ValueError("the tokenizer maps two ids to the same token string; CTranslate2 "
                         "identifies tokens by their strings")
    return tokens


class _OwnConverter:
    """A ``ctranslate2.converters.Converter`` for a loaded own model (subclassed on first use,
    so that this module imports without ctranslate2)."""

    def __new__(cls, model: Any, tokenizer: Any):
        # ctranslate2 is an optional dependency (own_spec imports it at its top)
        from ctranslate2.converters.converter import Converter

        from tformer.ct2.own_spec import build_decoder_only_spec, build_spec

        class OwnConverter(Converter):
            def _load(self):
                hf = model.config
                vocabulary = _vocabulary(tokenizer, hf.vocab_size)
                eos = vocabulary[_first(hf.eos_token_id)]
                unk = tokenizer.unk_token or UNK_TOKEN
                if not hf.is_encoder_decoder:
                    return build_decoder_only_spec(model.model, vocabulary, eos=eos, unk=unk,
                                                   bos=tokenizer.bos_token or eos)
                start = vocabulary[hf.decoder_start_token_id]
                return build_spec(model.model, vocabulary, bos=tokenizer.bos_token or start,
                                  eos=eos, unk=unk, decoder_start=start)

        return OwnConverter()


def _first(value: int | list[int]) -> int:
    return value[0] if isinstance(value, list) else value


def _check_hf_supported(config: Any) -> None:
    """Raise ValueError naming the model type when CTranslate2 has no loader for it.
    (``_MODEL_LOADERS`` is the converter's registry; its public entry point would reload the
    model from a directory, which a Hub name or a LoRA checkpoint does not have.)"""
    from ctranslate2.converters.transformers import _MODEL_LOADERS  # optional dependency

    name = type(config).__name__
    if name not in _MODEL_LOADERS:
        raise ValueError(f"cannot export model_type {config.model_type!r} to CTranslate2: its "
                         f"converter has no loader for {name} (it has T5, mT5, BART, mBART, "
                         "Marian, Pegasus, M2M100, GPT-2, Llama and more)")


# CTranslate2's BART-family loaders read the fairseq-era keys ``normalize_before`` and
# ``normalize_embedding``, which Hub configs carry but a config built with transformers 5 lacks
# (an AttributeError). The transformers architecture fixes both, so they are set from it:
# BART is post-norm with a LayerNorm on the embeddings, mBART pre-norm with one, Pegasus
# pre-norm without. (Marian's loader sets its own.)
_LEGACY_NORMS = {"bart": (False, True), "mbart": (True, True), "pegasus": (True, False)}


def _hf_converter(model: Any, tokenizer: Any) -> Any:
    """``TransformersConverter`` over an already loaded model and tokenizer: loading goes
    through tformer's one loader (offline first, safetensors, LoRA merged, no remote code),
    and Hub names and LoRA checkpoints need no directory of their own."""
    # ctranslate2 is an optional dependency
    from ctranslate2.converters import TransformersConverter
    from ctranslate2.converters.transformers import _MODEL_LOADERS

    name = type(model.config).__name__

    class LoadedConverter(TransformersConverter):
        def _load(self):
            loader = _MODEL_LOADERS[name]
            norms = _LEGACY_NORMS.get(model.config.model_type)
            if norms is not None:
                model.config.normalize_before, model.config.normalize_embedding = norms
            with torch.no_grad():
                return loader(model, tokenizer)

    return LoadedConverter(str(model.name_or_path))
