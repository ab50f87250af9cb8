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

DeepSpeed also takes over a part of the step (:func:`setup_deepspeed`): the loop's
``accelerator.backward`` runs the engine's backward and step, which accumulates, averages,
clips and updates; the optimizer's ``step``/``zero_grad`` are then no-ops. tformer's own AdamW
and learning-rate schedule stay in charge (a DeepSpeed config may not bring its own).

Everything here that gathers is a collective: call it on every process.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import PartialState
from accelerate.utils import DeepSpeedPlugin, DistributedType
from torch.distributed.fsdp import FSDPModule
from transformers.integrations import unset_hf_deepspeed_config

from tformer.lora import is_lora
from tformer.training.config import ConfigError
from tformer.weights import CheckpointError

log = logging.getLogger(__name__)

#: The subdirectory of a checkpoint holding accelerate's state (FSDP / DeepSpeed runs only).
ACCELERATE_DIR = "accelerate"


def deepspeed_requested() -> bool:
    """True when the launcher asks for DeepSpeed: ``accelerate launch`` with a config whose
    ``distributed_type`` is ``DEEPSPEED`` sets ``ACCELERATE_USE_DEEPSPEED=true`` and the
    ``ACCELERATE_DEEPSPEED_*`` variables (the config file, ZeRO-3 init) in every process."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def setup_deepspeed(accelerator: Accelerator, mixed_precision: str, grad_accum: int,
                    clip_grad_norm: float | None) -> None:
    """Under DeepSpeed (:func:`deepspeed_requested`), before ``accelerator.prepare``: enter it
    on a CPU too, and make its config say what the recipe says. Nothing otherwise.

    - **On a CPU** accelerate 1.16 does not enter DeepSpeed: with ``Accelerator(cpu=True)``
      (which the loop needs on a CPU, or every process of a torchrun trains alone) it ignores
      ``ACCELERATE_USE_DEEPSPEED`` (``state.py``); without it, it reports DEEPSPEED but with
      ``num_processes`` 1 on every process (measured: both of 2 processes were "process 0 of
      1" and the main one). So the run starts as accelerate's CPU DDP (gloo, the right ranks)
      and this switches the state to DeepSpeed with the plugin built from the launcher's
      variables, as ``AcceleratorState`` does off a CPU; DeepSpeed's engine then runs on that
      gloo group (its CPU accelerator). fp32 only there: bf16 under DeepSpeed on a CPU has not
      run.
    - **The recipe's values** go into the DeepSpeed config, where it says "auto", and a
      config that says otherwise is refused (a silent disagreement would train something the
      recipe does not say): ``gradient_accumulation_steps`` = ``train.grad_accum`` (the loop
      counts its micro-batches by it), ``gradient_clipping`` = ``train.clip_grad_norm`` (0 = no
      clipping; DeepSpeed clips inside its step, and ``accelerator.clip_grad_norm_`` only reads
      back the norm), the fp16/bf16 switches = ``train.precision``. No ``optimizer`` or
      ``scheduler`` section: tformer's AdamW and schedule are the run's.
    - **train_micro_batch_size_per_gpu** is 1 where the config says "auto". DeepSpeed requires
      an integer, and accelerate infers it only from a prepared DataLoader, which the loop does
      not have: it batches by a token budget (``train.max_tokens``), so batches vary in size
      and the engine is fed them as they come. The number only enters DeepSpeed's bookkeeping
      (``train_batch_size`` = micro x accumulation x processes, its throughput figures); the
      loop's data order and batches do not depend on it.
    - **Transformers' ZeRO-3 switch is turned off** (``unset_hf_deepspeed_config``):
      accelerate leaves a global that makes every later ``from_pretrained`` build the model
      under ``deepspeed.zero.Init`` (partitioned, a collective) and every ``generate()`` run
      with ``synced_gpus`` (an all-reduce per token). The loop builds the whole model on every
      process (DeepSpeed partitions it when the engine is made) and evaluates and generates on
      the main process alone, on a plain copy (:func:`full_model`): with the switch on, a
      ZeRO-3 run hung at its first evaluation (measured; the other processes wait in a
      broadcast while the main one waits for them in ``generate()``).
    """
    if not deepspeed_requested():
        return
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        _enter_deepspeed_on_cpu(accelerator, mixed_precision)
    plugin = accelerator.state.deepspeed_plugin
    config = plugin.deepspeed_config
    for section in ("optimizer", "scheduler"):
        if section in config:
            raise ConfigError(
                f"the DeepSpeed config has a {section!r} section: tformer trains with its own "
                "AdamW and learning-rate schedule (train.lr, train.schedule, ...); remove it")
    _from_recipe(config, "gradient_accumulation_steps", grad_accum, "train.grad_accum")
    _from_recipe(config, "gradient_clipping", float(clip_grad_norm or 0.0), "train.clip_grad_norm")
    if config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        config["train_micro_batch_size_per_gpu"] = 1
    enabled = [dtype for dtype in ("fp16", "bf16") if config.get(dtype, {}).get("enabled") is True]
    if enabled != ([mixed_precision] if mixed_precision != "no" else []):
        raise ConfigError(
            f"train.precision resolves to {mixed_precision!r} but the DeepSpeed config enables "
            f"{enabled or 'neither fp16 nor bf16'}: set their 'enabled' to \"auto\"")
    if plugin.zero3_init_flag:
        log.info("DeepSpeed zero3_init_flag is ignored: the model is built whole on every "
                 "process and partitioned when the engine is made")
    unset_hf_deepspeed_config()


def _from_recipe(config: dict, key: str, value, field: str) -> None:
    """``config[key]`` = the recipe's ``value`` where it is "auto" (or missing); ConfigError
    where it says something else."""
    if config.get(key, "auto") == "auto":
        config[key] = value
    elif config[key] != value:
        raise ConfigError(f"{field} is {value} but the DeepSpeed config's {key} is "
                          f"{config[key]}: set it to \"auto\" (the recipe's value) or to {value}")


def _enter_deepspeed_on_cpu(accelerator: Accelerator, mixed_precision: str) -> None:
    """Switch a CPU run's accelerate state from MULTI_CPU (gloo, every process's rank) to
    DEEPSPEED, as ``AcceleratorState.__init__`` does when not on a CPU: the plugin from the
    launcher's variables, its precision set and selected (which also records its config
    for transformers; :func:`setup_deepspeed` clears that again)."""
    if accelerator.distributed_type != DistributedType.MULTI_CPU:
        raise ConfigError(
            "DeepSpeed was asked for (ACCELERATE_USE_DEEPSPEED=true) but this process was not "
            "started by a launcher: start it with `accelerate launch --config_file "
            "configs/accelerate/deepspeed_zero2.yaml -m tformer.cli train ...` "
            f"(here: {accelerator.distributed_type})")
    if mixed_precision != "no":
        raise ConfigError(f"train.precision resolves to {mixed_precision!r}: DeepSpeed on a CPU "
                          "has run in fp32 only (train.precision=fp32)")
    plugin = DeepSpeedPlugin()  # ACCELERATE_DEEPSPEED_CONFIG_FILE etc., as accelerate does
    plugin.set_mixed_precision(mixed_precision)
    plugin.select(_from_accelerator_state=True)
    PartialState._shared_state["distributed_type"] = DistributedType.DEEPSPEED
    accelerator.state.distributed_type = DistributedType.DEEPSPEED
    accelerator.state.deepspeed_plugins = plugin
    accelerator.deepspeed_engine_wrapped = None  # set by Accelerator() when it sees DeepSpeed


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


__all__ = ["ACCELERATE_DIR", "after_prepare", "check_same_sharding", "deepspeed_requested",
           "full_model", "load_sharded_state", "save_sharded_state", "setup_deepspeed",
           "shards_parameters", "shards_state"]
