"""LoRA fine-tuning of pretrained Hugging Face seq2seq models, through `peft`.

A LoRA run trains only the low-rank adapter matrices; the pretrained weights stay frozen. Its
checkpoints keep the adapter in ``adapter/`` (``adapter_config.json``,
``adapter_model.safetensors``: what resume needs, and what ``PeftModel.from_pretrained(base,
CKPT/adapter)`` reads). At the end of the run the adapter is merged into the weights
(``merge_and_unload``) and written at the top of the checkpoint as a plain model directory, so
generation, evaluation and serving load it like any other checkpoint. The adapter lives in a
subdirectory because transformers applies an ``adapter_config.json`` found beside a
``config.json`` on top of that model: the merged weights would get the adapter twice.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# peft is imported in the functions that use it, for import time: measured, `import peft`
# after torch and transformers took 10.7 s on the (loaded) 2-core test host; only LoRA runs and
# LoRA checkpoints pay it.

ADAPTER_DIR = "adapter"

# peft needs the names of the Linear modules to adapt. The attention query and value
# projections, as in the LoRA paper (section 4.2); peft's own table lacks Marian and friends.
_T5_LIKE = ("t5", "mt5", "umt5", "longt5", "switch_transformers")
_BART_LIKE = ("bart", "mbart", "marian", "pegasus", "pegasus_x", "m2m_100", "nllb_moe",
              "blenderbot", "blenderbot-small", "plbart", "led", "bigbird_pegasus")
DEFAULT_TARGET_MODULES: dict[str, tuple[str, ...]] = {
    **{t: ("q", "v") for t in _T5_LIKE},
    **{t: ("q_proj", "v_proj") for t in _BART_LIKE},
}


def add_lora(model, *, r: int, alpha: float, dropout: float,
             target_modules: tuple[str, ...] | None, base: str) -> Any:
    """Wrap ``model`` in a `peft.PeftModel` with a fresh LoRA adapter; only the adapter trains.

    ``target_modules`` None = the query and value projections of the architecture (see
    ``DEFAULT_TARGET_MODULES``). ``base`` is recorded in ``adapter_config.json`` as the model
    to load the adapter onto (give an absolute path for a local directory).
    """
    from peft import LoraConfig, TaskType, get_peft_model  # import time (see the top)

    model_type = model.config.model_type
    targets = target_modules or DEFAULT_TARGET_MODULES.get(model_type)
    if targets is None:
        raise ValueError(
            f"no default LoRA target modules for model type {model_type!r}; set "
            "model.lora_target_modules to the names of its attention Linear layers"
        )
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                        target_modules=list(targets), task_type=TaskType.SEQ_2_SEQ_LM)
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as error:  # no module matched the names
        raise ValueError(f"LoRA target modules {list(targets)}: {error}") from error
    peft_model.peft_config["default"].base_model_name_or_path = base
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    log.info("LoRA r=%d alpha=%g on %s: %d of %d parameters train (%.2f%%)", r, alpha,
             list(targets), trainable, total, 100 * trainable / total)
    return peft_model


def is_lora(model) -> bool:
    """True for a model wrapped by `peft`."""
    try:
        from peft import PeftModel  # import time (see the top)
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def adapter_state(model) -> dict:
    """The adapter's weights only (what resume restores)."""
    from peft import get_peft_model_state_dict  # import time (see the top)

    # save_embedding_layers=False: "auto" asks the Hub whether the base's config exists.
    return get_peft_model_state_dict(model, save_embedding_layers=False)


def load_adapter_state(model, weights: dict) -> None:
    """Put adapter weights (from ``adapter_model.safetensors``) into the adapter of ``model``.
    Raises ValueError if they do not fit it."""
    from peft import set_peft_model_state_dict  # import time (see the top)

    result = set_peft_model_state_dict(model, weights)
    expected = set(adapter_state(model))
    missing = sorted(k for k in result.missing_keys if "lora_" in k)
    if result.unexpected_keys or missing or len(weights) != len(expected):
        raise ValueError(f"adapter weights do not fit the model (missing {missing}, "
                         f"unexpected {sorted(result.unexpected_keys)})")


def merge_adapter(base, adapter_dir: str | Path):
    """``base`` with the adapter in ``adapter_dir`` merged into its weights: a plain model."""
    from peft import PeftModel  # import time (see the top)

    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()


def adapter_base(adapter_dir: str | Path) -> str:
    """The base model an adapter was trained on, as recorded in its ``adapter_config.json``."""
    return json.loads((Path(adapter_dir) / "adapter_config.json").read_text())[
        "base_model_name_or_path"]


class LoraCheckpoint:
    """What a LoRA run hands to ``save_checkpoint`` as its model: ``save_pretrained`` writes the
    adapter into ``adapter/`` and, when ``merged`` is given, that plain model at the top.

    ``adapter`` is the `PeftModel` being trained, or the ``adapter/`` directory of an existing
    checkpoint (copied, when a finished checkpoint is rewritten with its merged model)."""

    def __init__(self, adapter, merged=None) -> None:
        self.adapter, self.merged = adapter, merged

    def save_pretrained(self, directory: str | Path) -> None:
        target = Path(directory) / ADAPTER_DIR
        if isinstance(self.adapter, (str, Path)):
            shutil.copytree(self.adapter, target)
        else:
            self.adapter.save_pretrained(str(target), save_embedding_layers=False)
        if self.merged is not None:
            self.merged.save_pretrained(directory)
