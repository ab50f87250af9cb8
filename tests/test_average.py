"""`tformer average`: the element-wise mean of checkpoints' weights, as a loadable model."""

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tformer.training.average import average_checkpoints, last_checkpoints
from tformer.training.checkpoint import CheckpointError


def test_average_is_the_elementwise_mean_and_loads(reference_run, tmp_path):
    import tformer

    ckpts = last_checkpoints(reference_run, 3)
    assert len(ckpts) == 3 and ckpts == sorted(ckpts)
    out = average_checkpoints(ckpts, tmp_path / "avg")
    mean = load_file(out / "model.safetensors")
    parts = [load_file(c / "model.safetensors") for c in ckpts]
    for name, tensor in mean.items():
        expected = torch.stack([p[name].double() for p in parts]).mean(0).to(tensor.dtype)
        torch.testing.assert_close(tensor, expected, rtol=0, atol=1e-7)
    assert any(not torch.equal(mean[k], parts[-1][k]) for k in mean)  # really a new model
    assert not (out / "trainer_state.pt").exists()
    model = tformer.load(out)
    assert isinstance(model.generate("A man rides a bike.", max_new_tokens=5), str)
    # one checkpoint averaged with itself is that checkpoint, bit for bit
    same = load_file(average_checkpoints([ckpts[0], ckpts[0]], tmp_path / "same") / "model.safetensors")
    assert all(torch.equal(same[k], parts[0][k]) for k in same)


def test_average_cli_with_a_run_dir_and_clear_errors(reference_run, tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "tformer.cli", "average", str(reference_run), "--last", "2",
         "-o", str(tmp_path / "avg")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert len((tmp_path / "avg" / "averaged_from.txt").read_text().splitlines()) == 2
    bad = subprocess.run(
        [sys.executable, "-m", "tformer.cli", "average", str(tmp_path), "-o", str(tmp_path / "x")],
        capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "no model.safetensors" in bad.stderr
    with pytest.raises(ValueError, match="--last must be >= 1"):
        last_checkpoints(reference_run, 0)


def test_average_refuses_mismatched_checkpoints(reference_run, tmp_path):
    from safetensors.torch import save_file

    good = last_checkpoints(reference_run, 1)[0]
    other = tmp_path / "other"
    other.mkdir()
    weights = load_file(good / "model.safetensors")
    name = next(iter(weights))
    weights[name] = torch.zeros(3, 3)
    save_file(weights, other / "model.safetensors")
    with pytest.raises(CheckpointError, match=f"{name} has shape"):
        average_checkpoints([good, other], tmp_path / "avg")
    assert not (tmp_path / "avg").exists()  # nothing half-written
