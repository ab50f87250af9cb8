"""What a run trains and saves: every weight of the model, or (``model.lora_r``) a LoRA adapter
on a frozen pretrained model. The loop holds one of these and never asks which it is.

- `wrap`: the model to train (the LoRA adapter added, the rest frozen);
- `to_save`: what ``save_checkpoint`` writes (a LoRA run: the adapter only, in ``adapter/``);
- `restore`: the trained weights back from a checkpoint, for ``--resume``;
- `merge_into`: after the run, rewrite a checkpoint as a plain model (LoRA: the adapter merged
  in; nothing to do otherwise). The callers do it (`tformer.training.finish`), not the loop.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors.torch import load_file

from tformer import lora
from tformer.loading import load_model
from tformer.training.checkpoint import load_trainer_state, save_checkpoint
from tformer.training.config import Config, ConfigError
from tformer.training.stopping import TrainingError

log = logging.getLogger(__name__)


class FullModel:
    """Every weight trains and is saved (the own model, or full fine-tuning)."""

    def wrap(self, model):
        return model

    def to_save(self, model):
        return model

    def restore(self, model, path: Path) -> None:
        weights = load_file(path / "model.safetensors")
        missing, unexpected = model.load_state_dict(weights, strict=False)
        # save_pretrained writes one copy of tied weights; the model's own table names the
        # others (own model: tgt_embed; T5: encoder/decoder.embed_tokens and lm_head).
        tied = set(getattr(model, "all_tied_weights_keys", None) or {})
        if set(missing) - tied or unexpected:
            raise TrainingError(f"{path}: weights do not match the model "
                               f"(missing {sorted(set(missing) - tied)}, unexpected {unexpected})")

    def merge_into(self, checkpoint: Path, tokenizer) -> None:
        pass


class LoraAdapter(FullModel):
    """A LoRA adapter on the frozen pretrained model ``base`` (see `tformer.lora`)."""

    def __init__(self, base: str, r: int, alpha: float, dropout: float,
                 target_modules: tuple[str, ...] | None) -> None:
        local = Path(base).expanduser()
        self.base = base
        self.recorded_base = str(local.resolve()) if local.is_dir() else base
        self.r, self.alpha, self.dropout, self.target_modules = r, alpha, dropout, target_modules

    def wrap(self, model):
        try:
            return lora.add_lora(model, r=self.r, alpha=self.alpha, dropout=self.dropout,
                                 target_modules=self.target_modules, base=self.recorded_base)
        except ValueError as error:
            raise ConfigError(f"model.lora_target_modules: {error}") from error

    def to_save(self, model):
        return lora.LoraCheckpoint(model)

    def restore(self, model, path: Path) -> None:
        try:
            lora.load_adapter_state(
                model, load_file(path / lora.ADAPTER_DIR / "adapter_model.safetensors"))
        except (ValueError, FileNotFoundError) as error:
            raise TrainingError(f"{path}: {error}") from error

    def merge_into(self, checkpoint: Path, tokenizer) -> None:
        """Rewrite ``checkpoint`` with the adapter merged into a plain model directory at its
        top (the adapter and training state stay, so the run can still be resumed from it)."""
        trainer_state, state = load_trainer_state(checkpoint)
        adapter = checkpoint / lora.ADAPTER_DIR
        merged = lora.merge_adapter(load_model(self.base, dtype=torch.float32), adapter)
        save_checkpoint(checkpoint, lora.LoraCheckpoint(adapter, merged), tokenizer,
                        trainer_state, state)
        log.info("merged the LoRA adapter into %s", checkpoint)


def trained_weights(config: Config) -> FullModel:
    """What ``config`` trains: `LoraAdapter` with ``model.lora_r``, else `FullModel`."""
    m = config.model
    if m.lora_r is None:
        return FullModel()
    return LoraAdapter(m.pretrained, m.lora_r, m.lora_alpha, m.lora_dropout,
                       m.lora_target_modules)
