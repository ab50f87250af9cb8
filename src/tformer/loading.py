"""The one checkpoint loader: a checkpoint directory (own model, any Hugging Face seq2seq or
causal language model, a LoRA checkpoint) or a Hub name → model and tokenizer. Generation,
CTranslate2 export, evaluation, training (a pretrained base, LoRA merges), visualization and
serving all read checkpoints through here; the engine that generates from them is chosen by
`tformer.engines.load` (``tformer.load``)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

import tformer.hf  # noqa: F401  (registers model_type "tformer" with the Auto classes)
from tformer import lora
from tformer.hub import from_pretrained
from tformer.tokenization import load_tokenizer
from tformer.weights import CheckpointError, check_weights

log = logging.getLogger(__name__)


def load_model(path_or_name: str | Path, dtype: torch.dtype | str = "auto"):
    """The one loader of models: a checkpoint directory (own model, any Hugging Face seq2seq
    model or decoder-only language model, or a LoRA checkpoint whose adapter is not merged yet)
    or a Hub name, offline first (see `tformer.hub`). The config's ``is_encoder_decoder``
    decides the ``Auto`` class: ``AutoModelForSeq2SeqLM`` or ``AutoModelForCausalLM``. Remote
    code never runs. ``dtype`` "auto" keeps the checkpoint's dtype; training asks for float32.

    Weights are read from safetensors where the checkpoint has them (tformer's always do); an
    older Hub checkpoint that only has ``pytorch_model.bin`` is read with
    ``torch.load(weights_only=True)``, which refuses anything but tensors.

    A local directory's weight files are checked first (`tformer.weights.check_weights`): a
    truncated or damaged file, or for tformer's own model weights that do not fit it, is a
    `tformer.weights.CheckpointError` naming the file.
    """
    local = Path(str(path_or_name)).expanduser()
    if local.is_dir() and not (local / "config.json").is_file():
        adapter = local / lora.ADAPTER_DIR
        if (adapter / "adapter_config.json").is_file():  # a LoRA checkpoint, not merged
            check_weights(local)
            base = load_model(lora.adapter_base(adapter), dtype)
            log.info("merging the LoRA adapter of %s into %s", local, lora.adapter_base(adapter))
            return lora.merge_adapter(base, adapter)
        raise FileNotFoundError(f"{path_or_name}: not a model directory (no config.json)")
    auto = _auto_class(path_or_name)
    if not local.is_dir():
        return from_pretrained(auto, path_or_name, "model", trust_remote_code=False, dtype=dtype)
    check_weights(local)
    try:
        model, info = from_pretrained(auto, path_or_name, "model",
                                      trust_remote_code=False, dtype=dtype,
                                      output_loading_info=True)
    except RuntimeError as error:  # e.g. a tensor of the wrong shape
        raise CheckpointError(f"{local}: its weights do not fit its config.json "
                              f"({str(error).strip().splitlines()[0][:300]})") from error
    missing, mismatched = info.get("missing_keys") or [], info.get("mismatched_keys") or []
    if missing or mismatched:
        what = f"{local}: weights missing {sorted(missing)[:10]}, of the wrong shape " \
               f"{sorted(str(k) for k in mismatched)[:10]}"
        if getattr(model.config, "model_type", None) == "tformer":
            raise CheckpointError(f"{what}: the weight file does not belong to this model")
        log.warning("%s (newly initialised)", what)  # a Hub model may load its own way
    return model


def _auto_class(path_or_name: str | Path):
    """``AutoModelForSeq2SeqLM`` for an encoder-decoder config, else ``AutoModelForCausalLM``."""
    config = from_pretrained(AutoConfig, path_or_name, "model", trust_remote_code=False)
    return AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM


def load_checkpoint(path_or_name: str | Path, dtype: torch.dtype | str = "auto"):
    """``(model, tokenizer)`` of a checkpoint directory or Hub name (see :func:`load_model`)."""
    return load_model(path_or_name, dtype), load_tokenizer(path_or_name)
