"""FSDP end to end on 2 CPU processes (gloo), against DDP and against itself resumed.

accelerate 1.16 never selects FSDP on a CPU: ``AcceleratorState`` enters FSDP only from a GPU
(or other accelerator) distributed type, and ``Accelerator(cpu=True)`` under torchrun is
``MULTI_CPU`` whatever the FSDP settings (read in ``accelerate/state.py``, checked: the FSDP
plugin is dropped). The worker below therefore sets the state's distributed type to FSDP right
after the loop creates its ``Accelerator``, with the plugin accelerate builds from the
``FSDP_*`` variables ``accelerate launch`` would set from ``configs/accelerate/fsdp.yaml``.
Everything after that is the real thing: ``accelerator.prepare`` applies torch's
``fully_shard`` (parameters are DTensors sharded over the 2 processes), gradients are
reduce-scattered over gloo, checkpoints go through ``save_state``/``load_state``.
"""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import load_file

from .conftest import tiny_overrides

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
           env: dict | None = None) -> None:
    """torchrun, 2 processes, the tiny run of ``steps`` steps; ``kind`` "fsdp" or "ddp"."""
    script = tmp_path / "worker.py"
    script.write_text(FSDP_WORKER)
    args = tiny_overrides(data_files, out, **{"train.max_steps": steps})
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


def _validation(run: Path) -> list[dict]:
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["split"] == "validation"]


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
