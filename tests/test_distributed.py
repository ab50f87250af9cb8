"""FSDP and DeepSpeed end to end on 2 CPU processes (gloo), against DDP and against themselves
resumed.

accelerate 1.16 never selects FSDP on a CPU: ``AcceleratorState`` enters FSDP only from a GPU
(or other accelerator) distributed type, and ``Accelerator(cpu=True)`` under torchrun is
``MULTI_CPU`` whatever the FSDP settings (read in ``accelerate/state.py``, checked: the FSDP
plugin is dropped). The worker below therefore sets the state's distributed type to FSDP right
after the loop creates its ``Accelerator``, with the plugin accelerate builds from the
``FSDP_*`` variables ``accelerate launch`` would set from ``configs/accelerate/fsdp.yaml``.
Everything after that is the real thing: ``accelerator.prepare`` applies torch's
``fully_shard`` (parameters are DTensors sharded over the 2 processes), gradients are
reduce-scattered over gloo, checkpoints go through ``save_state``/``load_state``.

DeepSpeed needs no forcing in the test: ``accelerate launch`` with a DeepSpeed config starts 2
processes on a CPU, and the loop itself enters DeepSpeed there
(`tformer.training.distributed.setup_deepspeed`), so the DeepSpeed test runs the command a
user runs.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import load_file

from .conftest import tiny_overrides
from .weights_check import assert_same_weights

ROOT = Path(__file__).resolve().parents[1]

FSDP_WORKER = """
import sys
import accelerate
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from tformer.training import load_config, loop, train


class CpuFSDPAccelerator(accelerate.Accelerator):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* environment
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        self.state.distributed_type = DistributedType.FSDP
        self.state.fsdp_plugin = plugin


if sys.argv[1] == "fsdp":
    loop.Accelerator = CpuFSDPAccelerator
train(load_config(None, sys.argv[3:]), resume=sys.argv[2] == "resume")
"""


def fsdp_environment(**changes: str) -> dict[str, str]:
    """The variables ``accelerate launch --config_file configs/accelerate/fsdp.yaml`` sets
    (accelerate/utils/launch.py: ``fsdp_X`` -> ``FSDP_X``, the layer classes ->
    ``FSDP_TRANSFORMER_CLS_TO_WRAP``)."""
    config = yaml.safe_load((ROOT / "configs/accelerate/fsdp.yaml").read_text())["fsdp_config"]
    env = {"ACCELERATE_USE_FSDP": "true"}
    for key, value in config.items():
        name = "FSDP_TRANSFORMER_CLS_TO_WRAP" if key == "fsdp_transformer_layer_cls_to_wrap" \
            else key.upper()
        env[name] = str(value).lower() if isinstance(value, bool) else str(value)
    env.update(changes)
    return env


def launch(data_files, tmp_path: Path, kind: str, out: Path, steps: int, resume: bool = False,
           env: dict | None = None, **overrides) -> None:
    """torchrun, 2 processes, the tiny run of ``steps`` steps; ``kind`` "fsdp" or "ddp"."""
    script = tmp_path / "worker.py"
    script.write_text(FSDP_WORKER)
    args = tiny_overrides(data_files, out, **{"train.max_steps": steps, **overrides})
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", "29523", str(script), kind, "resume" if resume else "fresh", *args],
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    summary = json.loads((run / "summary.json").read_text())
    return load_file(Path(summary["last_checkpoint"]) / "model.safetensors")


def _records(run: Path, split: str) -> list[dict]:
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["split"] == split]


def _validation(run: Path) -> list[dict]:
    return _records(run, "validation")


@pytest.mark.slow
def test_fsdp_two_processes_equals_ddp_and_resumes_exactly(data_files, tmp_path):
    """FSDP2 (full shard, one unit per layer) on 2 CPU processes trains the same weights as DDP
    (the same data order, dropout and averaged gradients, sharded or not: identical here, max
    difference 0), evaluates the same (validation loss, metric and generated samples, on the
    gathered full model), writes Hugging Face checkpoints with accelerate's sharded state beside
    them, and a run stopped at step 4 and resumed to 8 equals the uninterrupted one."""
    from transformers import AutoModelForSeq2SeqLM

    import tformer.hf  # noqa: F401  (registers the own model with the Auto classes)

    fsdp = fsdp_environment()
    assert fsdp["FSDP_VERSION"] == "2" and fsdp["FSDP_STATE_DICT_TYPE"] == "SHARDED_STATE_DICT"
    launch(data_files, tmp_path, "ddp", tmp_path / "ddp", 8)
    launch(data_files, tmp_path, "fsdp", tmp_path / "whole", 8, env=fsdp)
    launch(data_files, tmp_path, "fsdp", tmp_path / "parts", 4, env=fsdp)
    launch(data_files, tmp_path, "fsdp", tmp_path / "parts", 8, resume=True, env=fsdp)

    whole = _weights(tmp_path / "whole")
    for other in (_weights(tmp_path / "ddp"), _weights(tmp_path / "parts")):
        assert whole.keys() == other.keys()
        for key in whole:
            torch.testing.assert_close(whole[key], other[key], atol=0, rtol=0, msg=key)
    assert _validation(tmp_path / "whole") == _validation(tmp_path / "ddp")
    assert [r["step"] for r in _validation(tmp_path / "parts")] == [4, 8]

    checkpoint = tmp_path / "parts" / "checkpoints" / "step-0000004"
    shards = sorted(p.name for p in (checkpoint / "accelerate").iterdir())
    assert shards == ["optimizer_0", "pytorch_model_fsdp_0", "random_states_0.pkl",
                      "random_states_1.pkl"]
    assert "optimizer" not in torch.load(checkpoint / "trainer_state.pt", weights_only=True)
    marker = json.loads((checkpoint / "checkpoint.json").read_text())
    assert any(name.startswith("accelerate/optimizer_0/") for name in marker["sha256"])
    model = AutoModelForSeq2SeqLM.from_pretrained(checkpoint)  # a plain HF directory
    assert sum(p.numel() for p in model.parameters()) > 0


#: The DeepSpeed runs and their DDP reference: 2 micro-batches per step, so that DeepSpeed's
#: gradient accumulation is exercised too.
DEEPSPEED_RUN = {"train.grad_accum": 2}


def deepspeed_launch(data_files, stage: int, out: Path, steps: int, resume: bool = False) -> None:
    """``accelerate launch --config_file configs/accelerate/deepspeed_zero{stage}.yaml -m
    tformer.cli train ...`` from the repository root (the YAML names its JSON relative to it):
    2 processes on a CPU, the tiny run of ``steps`` steps."""
    args = tiny_overrides(data_files, out, **{"train.max_steps": steps, **DEEPSPEED_RUN})
    done = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
         f"configs/accelerate/deepspeed_zero{stage}.yaml", "--main_process_port", "29524",
         "-m", "tformer.cli", "train", *args, *(["--resume"] if resume else [])],
        cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.fixture(scope="module")
def ddp_reference(data_files, tmp_path_factory) -> Path:
    """DDP (torchrun, 2 CPU processes), 8 steps of the DeepSpeed tests' run."""
    root = tmp_path_factory.mktemp("ddp")
    launch(data_files, root, "ddp", root / "run", 8, **DEEPSPEED_RUN)
    return root / "run"


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                    reason="deepspeed is not installed (pip install -e '.[deepspeed]')")
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_two_processes_equals_ddp_and_resumes_exactly(stage, ddp_reference, data_files,
                                                                tmp_path):
    """DeepSpeed ZeRO-2 and ZeRO-3 on 2 CPU processes, started as a user starts them (``accelerate
    launch`` with the repository's config, ``tformer train``), with 2 accumulated micro-batches
    per step: training, evaluation, checkpoints and ``--resume``.

    Against DDP the same data, dropout and averaged, clipped gradients give the same run, up to
    the order of floating-point sums (DeepSpeed reduces flat buckets of the gradients, and
    clips with its own norm): measured (ZeRO-2 / ZeRO-3), training losses within 4.8e-7 /
    2.4e-7, gradient norms within 1.2e-7, validation losses within 6.1e-8, the same generated
    samples, and every weight within 1.2e-7 -- except the attentions' key biases. Their
    gradient is zero in exact arithmetic (adding the same number to every score of a query
    leaves the softmax unchanged), so it is rounding noise of about 1e-10, which AdamW
    (``adam_eps`` 1e-9) turns into steps of the order of the learning rate: they differ from
    DDP's by up to 1.9e-3 / 1.5e-3 (FSDP, which sums in DDP's order, equals DDP exactly). They
    change no output, which the equal validation losses confirm; the test bounds them by lr x
    steps. The other tolerances are 1e-5, at least 20 times the measured differences.

    Resumed against uninterrupted: exact (max difference 0). The resumed run is a copy of the
    uninterrupted one's directory with its step-8 checkpoint deleted, resumed from step 4 (a
    checkpoint written mid-run), which saves a launch; resuming a separate 4-step run instead,
    as the FSDP test does, was exact too (checked by hand, both stages)."""
    from transformers import AutoModelForSeq2SeqLM

    import tformer.hf  # noqa: F401  (registers the own model with the Auto classes)

    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    deepspeed_launch(data_files, stage, whole, 8)
    shutil.copytree(whole, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-0000008")
    (resumed / "summary.json").unlink()
    deepspeed_launch(data_files, stage, resumed, 8, resume=True)

    # steps x train.lr bounds the key biases (tests/weights_check.py says why)
    assert_same_weights(_weights(whole), _weights(ddp_reference), atol=1e-5,
                        key_bias_atol=8 * 3e-3)
    again = _weights(resumed)
    for key, tensor in _weights(whole).items():
        torch.testing.assert_close(again[key], tensor, atol=0, rtol=0, msg=key)

    for split, keys in (("train", ("loss", "grad_norm")), ("validation", ("loss",))):
        ours, ddp = _records(whole, split), _records(ddp_reference, split)
        assert [r["step"] for r in ours] == [r["step"] for r in ddp]
        for mine, theirs in zip(ours, ddp):
            for key in keys:
                assert mine[key] == pytest.approx(theirs[key], abs=1e-5), (split, mine["step"], key)
    for mine, theirs in zip(_validation(whole), _validation(ddp_reference)):
        assert mine["rougeL"] == theirs["rougeL"] and mine["samples"] == theirs["samples"]
    assert _validation(resumed) == _validation(whole)

    checkpoint = whole / "checkpoints" / "step-0000004"
    parts = sorted(p.name for p in (checkpoint / "accelerate" / "pytorch_model").iterdir())
    ranks = ["zero_pp_rank_0_mp_rank_00", "zero_pp_rank_1_mp_rank_00"]
    if stage == 2:  # parameters whole on every process, optimizer state in 2 partitions
        assert parts == ["mp_rank_00_model_states.pt", *(f"{r}_optim_states.pt" for r in ranks)]
    else:  # parameters partitioned too: one model state per process
        assert parts == sorted(f"{r}_{kind}_states.pt" for r in ranks for kind in ("model", "optim"))
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= {
        p.name for p in (checkpoint / "accelerate").iterdir()}
    assert "optimizer" not in torch.load(checkpoint / "trainer_state.pt", weights_only=True)
    marker = json.loads((checkpoint / "checkpoint.json").read_text())
    assert f"accelerate/pytorch_model/{ranks[1]}_optim_states.pt" in marker["sha256"]
    model = AutoModelForSeq2SeqLM.from_pretrained(checkpoint)  # a plain HF directory
    assert sum(p.numel() for p in model.parameters()) > 0


def test_a_checkpoint_resumes_only_under_the_setup_that_wrote_it(tmp_path):
    """The optimizer state of a DDP run is in trainer_state.pt, an FSDP run's in accelerate/:
    resuming either under the other is refused, naming what to do."""
    from accelerate.utils import DistributedType

    from tformer.training.distributed import check_same_sharding
    from tformer.weights import CheckpointError

    ddp = SimpleNamespace(distributed_type=DistributedType.MULTI_CPU)
    fsdp = SimpleNamespace(distributed_type=DistributedType.FSDP)
    written_by_ddp, written_by_fsdp = {"optimizer": {}, "scheduler": {}}, {"scheduler": {}}
    check_same_sharding(tmp_path, written_by_ddp, ddp)
    check_same_sharding(tmp_path, written_by_fsdp, fsdp)
    with pytest.raises(CheckpointError, match="not sharded .* resume it the same way"):
        check_same_sharding(tmp_path, written_by_ddp, fsdp)
    with pytest.raises(CheckpointError, match="FSDP or DeepSpeed run .* accelerate/"):
        check_same_sharding(tmp_path, written_by_fsdp, ddp)


def test_full_model_is_the_unwrapped_model_when_nothing_is_sharded():
    """One process and DDP: evaluation and checkpoints use the model itself, no copy."""
    from accelerate import Accelerator

    from tformer.training.distributed import full_model, shards_parameters, shards_state

    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(torch.nn.Linear(2, 2))
    assert not shards_state(accelerator) and not shards_parameters(accelerator)
    assert full_model(model, accelerator) is accelerator.unwrap_model(model)


def test_deepspeed_config_takes_the_recipe_values_and_refuses_others(monkeypatch):
    """Under DeepSpeed the recipe fills the config's "auto" values (accumulation, clipping,
    a nominal micro-batch of 1) and a config that says otherwise, or brings its own optimizer
    or schedule, is refused naming the setting; a process no launcher started is refused."""
    from accelerate.utils import DistributedType

    from tformer.training.config import ConfigError
    from tformer.training.distributed import setup_deepspeed

    def accelerator(config: dict, kind=DistributedType.DEEPSPEED):
        plugin = SimpleNamespace(deepspeed_config=config, zero3_init_flag=False)
        return SimpleNamespace(distributed_type=kind,
                               state=SimpleNamespace(deepspeed_plugin=plugin))

    def auto(**changes) -> dict:
        return {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                "gradient_clipping": "auto", "zero_optimization": {"stage": 2},
                "bf16": {"enabled": False}, "fp16": {"enabled": False}, **changes}

    setup_deepspeed(accelerator(auto()), "no", 2, 1.0)  # not asked for: nothing happens
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    config = auto()
    setup_deepspeed(accelerator(config), "no", 2, 0.5)
    assert (config["gradient_accumulation_steps"], config["gradient_clipping"],
            config["train_micro_batch_size_per_gpu"]) == (2, 0.5, 1)
    setup_deepspeed(accelerator(auto(gradient_clipping=0.0)), "no", 1, None)  # None = 0: off
    with pytest.raises(ConfigError, match="train.clip_grad_norm is 1.0 .* gradient_clipping is 0.5"):
        setup_deepspeed(accelerator(auto(gradient_clipping=0.5)), "no", 1, 1.0)
    with pytest.raises(ConfigError, match="train.grad_accum is 4"):
        setup_deepspeed(accelerator(auto(gradient_accumulation_steps=1)), "no", 4, 1.0)
    with pytest.raises(ConfigError, match="'scheduler' section"):
        setup_deepspeed(accelerator(auto(scheduler={"type": "WarmupLR"})), "no", 1, 1.0)
    with pytest.raises(ConfigError, match="enables \\['bf16'\\]"):
        setup_deepspeed(accelerator(auto(bf16={"enabled": True})), "no", 1, 1.0)
    with pytest.raises(ConfigError, match="not started by a launcher"):
        setup_deepspeed(accelerator(auto(), DistributedType.NO), "no", 1, 1.0)
