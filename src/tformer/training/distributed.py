"""What FSDP and DeepSpeed change in the loop: where the model's weights and the optimizer's
state live, and so how a checkpoint is written and read and which model evaluation runs.

Under DDP (and one process) every process holds the whole model and optimizer: the main process
saves them alone, and evaluates its own replica. Under FSDP (parameters, gradients and optimizer
state sharded) and DeepSpeed (ZeRO-1/2: optimizer state and gradients sharded; ZeRO-3:
parameters too) no process holds everything, so:

- **checkpoints**: every process joins ``accelerator.save_state`` into ``CKPT/accelerate/``
  (model and optimizer state, written as the FSDP plugin's ``state_dict_type`` or DeepSpeed's
  ``save_checkpoint`` say) and ``accelerator.load_state`` reads it back on ``--resume``; the
  Hugging Face files at the top of the checkpoint are written from the full weights, gathered
  to the main process (:func:`full_model`), so the directory still loads with
  ``from_pretrained``;
- **evaluation and generation** run on the main process alone, on the unwrapped model where
  every process holds all parameters (DeepSpeed ZeRO-1/2), otherwise (FSDP, ZeRO-3) on that
  gathered full model, a plain (unsharded) copy. The simplest correct choice: an FSDP module's
  every forward is a collective (each layer all-gathers its parameters), so the main process
  cannot run the sharded module alone; running validation and ``generate()`` on every process
  in lockstep would need every process to take exactly the same number of forward passes, and
  HF ``generate()`` calls the encoder as a sub-module, outside the root FSDP unit's hooks. The
  copy costs one full set of weights on the main process during evaluation (inference only: no
  gradients, no optimizer state), which is what writing the HF checkpoint needs anyway.

Everything here that gathers is a collective: call it on every process.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch.distributed.fsdp import FSDPModule

from tformer.lora import is_lora
from tformer.weights import CheckpointError

#: The subdirectory of a checkpoint holding accelerate's state (FSDP / DeepSpeed runs only).
ACCELERATE_DIR = "accelerate"


def shards_state(accelerator: Accelerator) -> bool:
    """True when some of the model's or the optimizer's state is split over the processes
    (FSDP, DeepSpeed): checkpoints then go through accelerate's ``save_state``/``load_state``."""
    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def shards_parameters(accelerator: Accelerator) -> bool:
    """True when no process holds the whole model's parameters (FSDP, DeepSpeed ZeRO-3): the
    main process must gather them before it can evaluate or save the model alone."""
    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return accelerator.state.deepspeed_plugin.zero_stage == 3
    return False


def after_prepare(model, accelerator: Accelerator) -> None:
    """What FSDP2 needs once ``accelerator.prepare`` has sharded the model (nothing otherwise).

    - **The own model's tied projection.** It reads the embedding's weight
      (``F.linear(hidden, tgt_embed.token.weight)``, `tformer.model.transformer`) with no
      ``lm_head`` module, so ``get_output_embeddings()`` is None and accelerate 1.16 takes the
      embedding for an untied one: an FSDP unit of its own that reshards right after its
      forward, and the projection then meets a sharded weight (``aten.mm.default got mixed
      torch.Tensor and DTensor``, measured). That unit is kept gathered from its forward to the
      backward instead (``reshard_after_forward=False``), which is accelerate's own treatment
      of a tied table (it puts it in a unit with that setting); its gradient is
      reduce-scattered once, after the whole backward.
    - **The own model and ``FULL_STATE_DICT``.** Loading a full state dict with its tied
      embedding back into an FSDP2 model fails in torch 2.13 (``KeyError:
      'model.tgt_embed.token.weight'`` in ``torch.distributed._state_dict_utils.
      _broadcast_state_dict``, measured on --resume), so such a run is refused before its
      first step rather than at its first resume:
      ``SHARDED_STATE_DICT`` (configs/accelerate/fsdp.yaml) saves and resumes it.
    """
    if not getattr(accelerator, "is_fsdp2", False):
        return
    unwrapped = accelerator.unwrap_model(model)
    embedding = unwrapped.get_input_embeddings()
    # the own model with tie_embeddings (the default); T5 and other HF models have an lm_head
    tied = (getattr(unwrapped.config, "tie_word_embeddings", False)
            and unwrapped.get_output_embeddings() is None)
    if tied and str(accelerator.state.fsdp_plugin.state_dict_type).endswith("FULL_STATE_DICT"):
        raise ValueError(
            "FSDP with fsdp_state_dict_type FULL_STATE_DICT cannot resume this model (its tied "
            "embedding: torch 2.13 fails to load the full state dict back); use "
            "SHARDED_STATE_DICT, as configs/accelerate/fsdp.yaml does (docs/distributed.md)")
    if tied and isinstance(embedding, FSDPModule):
        embedding.set_reshard_after_forward(False)


def full_model(model, accelerator: Accelerator):
    """The whole model, as a plain module the main process can run and ``save_pretrained``
    alone: the unwrapped model where every process holds all parameters (one process, DDP,
    DeepSpeed ZeRO-1/2); otherwise a copy built from the model's config and loaded with the
    weights gathered to the main process (``accelerator.get_state_dict``), None on the other
    processes. Collective under FSDP and ZeRO-3: call it on every process."""
    unwrapped = accelerator.unwrap_model(model)
    if not shards_parameters(accelerator):
        return unwrapped
    if is_lora(unwrapped):
        raise NotImplementedError("LoRA under FSDP or DeepSpeed ZeRO-3 is not supported: LoRA "
                                  "trains few parameters, use DDP (docs/distributed.md)")
    weights = accelerator.get_state_dict(model)  # every process joins; the main one gets them
    if not accelerator.is_main_process:
        return None
    # built with its own random init, drawn from a forked generator: the main process's RNG
    # (dropout) must not depend on whether evaluations and checkpoints happened
    with torch.random.fork_rng(devices=[]):
        copy = type(unwrapped)(unwrapped.config)
    missing, unexpected = copy.load_state_dict(weights, strict=False)
    tied = set(getattr(copy, "all_tied_weights_keys", None) or {})
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"gathered weights do not match the model (missing "
                           f"{sorted(set(missing) - tied)}, unexpected {unexpected})")
    copy.generation_config = unwrapped.generation_config
    return copy.to(accelerator.device).train(unwrapped.training)


def save_sharded_state(accelerator: Accelerator, tmp: Path) -> None:
    """Every process: write accelerate's state (model and optimizer, sharded as the plugin
    says; each process's RNG) into ``tmp/accelerate``, ``tmp`` being the checkpoint's temporary
    directory, which the main process empties first. Collective."""
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp / ACCELERATE_DIR))
    accelerator.wait_for_everyone()


def load_sharded_state(accelerator: Accelerator, checkpoint: Path) -> None:
    """Every process: read back the model and optimizer state :func:`save_sharded_state`
    wrote. Collective."""
    accelerator.load_state(str(Path(checkpoint) / ACCELERATE_DIR))


def check_same_sharding(checkpoint: Path, trainer_state: dict, accelerator: Accelerator) -> None:
    """CheckpointError unless the checkpoint was written the way this run will read it: with
    accelerate's state (FSDP, DeepSpeed) or with the optimizer in ``trainer_state.pt`` (one
    process, DDP). A run's weights load anywhere (``model.safetensors``); its optimizer state
    only under the setup that wrote it."""
    written_sharded = "optimizer" not in trainer_state
    if written_sharded == shards_state(accelerator):
        return
    if written_sharded:
        raise CheckpointError(
            f"{checkpoint} was written by an FSDP or DeepSpeed run (its optimizer state is in "
            f"{ACCELERATE_DIR}/): resume it under the same setup, not {accelerator.distributed_type}")
    raise CheckpointError(
        f"{checkpoint} was written by a run that was not sharded (one process or DDP): resume it "
        f"the same way, not under {accelerator.distributed_type}, or start a new run from its "
        "weights (model.pretrained=CHECKPOINT)")


__all__ = ["ACCELERATE_DIR", "after_prepare", "check_same_sharding", "full_model",
           "load_sharded_state", "save_sharded_state", "shards_parameters", "shards_state"]
