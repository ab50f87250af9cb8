"""The training loop: a tiny run end to end, exact resume after SIGINT and kill -9, damaged
checkpoints, non-finite loss, and two processes under DDP."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

import tformer  # noqa: F401
from tformer.training import CheckpointError, TrainingError, latest_checkpoint, load_config, train
from tformer.training.checkpoint import verify_checkpoint

from .conftest import tiny_overrides


def overrides(data_files, out: Path, **extra) -> list[str]:
    return tiny_overrides(data_files, out, **extra)


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    summary = json.loads((run_dir / "summary.json").read_text())
    return load_file(Path(summary["last_checkpoint"]) / "model.safetensors")


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0, msg=k)


def test_tiny_run_writes_a_usable_run_directory(reference_run):
    run = reference_run
    for name in ("config.yaml", "metrics.jsonl", "loss.png", "summary.json", "data_stats.json"):
        assert (run / name).is_file(), name
    assert list((run / "tensorboard").iterdir())
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train_losses = [r["loss"] for r in records if r["split"] == "train"]
    assert len(train_losses) == 12 and train_losses[-1] < train_losses[0]
    validation = [r for r in records if r["split"] == "validation"]
    assert [r["step"] for r in validation] == [4, 8, 12]
    assert all("rougeL" in r and "loss" in r for r in validation)
    assert all(r["tokens_per_s"] > 0 and r["lr"] > 0 for r in records if r["split"] == "train")
    ckpt = latest_checkpoint(run / "checkpoints")
    assert ckpt.name == "step-0000012"
    model = AutoModelForSeq2SeqLM.from_pretrained(ckpt)
    tok = AutoTokenizer.from_pretrained(ckpt)
    ids = tok(["A man rides a bike."], return_tensors="pt")
    assert model.generate(**ids, max_new_tokens=5).shape[1] >= 2
    resolved = load_config(run / "config.yaml")
    assert resolved.train.max_steps == 12 and resolved.model.size == "tiny"


def test_compiled_training_step_equals_the_eager_one(data_files, tmp_path, monkeypatch):
    """train.compile=true: torch.compile of the training forward and loss gives the eager run's
    losses and weights (inductor told to draw dropout masks from eager's generator, so that the
    two runs see the same masks), and validation still runs (uncompiled, in eval mode)."""
    import torch._inductor.config as inductor_config
    from torch._dynamo.utils import counters

    from tformer.model import kernels

    # Compiled, tformer's dropout is F.dropout (inductor's own fused random numbers); eager on
    # CPU it draws its mask another way (tests/test_kernels.py). Both runs here use F.dropout,
    # whose masks fallback_random reproduces.
    monkeypatch.setattr(kernels, "dropout", torch.nn.functional.dropout)
    monkeypatch.setattr(inductor_config, "fallback_random", True)
    reference_run = tmp_path / "eager"
    train(load_config(None, overrides(data_files, reference_run)))
    torch._dynamo.reset()
    counters.clear()  # reset() leaves the counters of earlier compilations
    out = tmp_path / "run"
    result = train(load_config(None, overrides(data_files, out, **{"train.compile": True})))
    assert result.state.step == 12
    # it did compile, the whole forward and loss in one graph (a graph break would leave
    # part of the model running eagerly)
    assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"], (
        dict(counters["stats"]), dict(counters["graph_break"]))

    def records(run, split):
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return [r for r in map(json.loads, lines) if r["split"] == split]

    assert ([r["loss"] for r in records(out, "train")]
            == pytest.approx([r["loss"] for r in records(reference_run, "train")], rel=1e-4))
    assert [r["step"] for r in records(out, "validation")] == [4, 8, 12]
    compiled, eager = final_weights(out), final_weights(reference_run)
    # Not element by element: Adam turns float-rounding differences in near-zero gradients
    # (a few bias entries) into steps of about lr. Over the whole model they are noise.
    diff = torch.cat([(compiled[k] - eager[k]).flatten() for k in eager]).norm()
    assert diff / torch.cat([v.flatten() for v in eager.values()]).norm() < 1e-3


def _run_cli(args: list[str], **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "tformer.cli", "train", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def _wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    metrics = run_dir / "metrics.jsonl"
    while time.time() < deadline:
        if metrics.is_file():
            steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines() if x]
            if steps and max(steps) >= step:
                return
        if proc.poll() is not None:
            raise AssertionError(f"training ended early:\n{proc.stdout.read()}")
        time.sleep(0.05)
    raise AssertionError("training did not reach the step in time")


@pytest.mark.parametrize("how", ["sigint", "kill9"])
def test_interrupted_then_resumed_equals_uninterrupted(data_files, reference_run, tmp_path, how):
    out = tmp_path / "run"
    # slow each step a little so the signal lands mid-run, whatever the machine's speed
    args = overrides(data_files, out, **{"train.max_steps": 400})
    proc = _run_cli(args)
    _wait_for_step(out, 6, proc)
    if how == "sigint":
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 130  # saved a checkpoint and stopped
        stopped = latest_checkpoint(out / "checkpoints")
        assert 6 <= int(stopped.name.split("-")[1]) < 400
    else:
        _wait_for_step(out, 9, proc)  # past the checkpoint of step 8
        proc.kill()
        proc.wait(timeout=60)
        # whatever the kill interrupted, the newest complete checkpoint is a real one
        assert int(latest_checkpoint(out / "checkpoints").name.split("-")[1]) >= 8
    # resume with the reference's length: the end state must equal the uninterrupted run
    resumed = _run_cli([*overrides(data_files, out), "--resume"])
    log = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, log
    assert "resumed from" in log
    assert_same_weights(final_weights(out), final_weights(reference_run))


def test_damaged_checkpoint_is_reported_and_the_previous_one_still_loads(reference_run, tmp_path):
    import shutil

    ckpts = tmp_path / "checkpoints"
    shutil.copytree(reference_run / "checkpoints", ckpts)
    newest = ckpts / "step-0000012"
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors has .* bytes, expected"):
        verify_checkpoint(newest)
    assert latest_checkpoint(ckpts) == ckpts / "step-0000008"
    AutoModelForSeq2SeqLM.from_pretrained(ckpts / "step-0000008")
    (ckpts / "step-0000008" / "checkpoint.json").unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        verify_checkpoint(ckpts / "step-0000008")


def test_non_finite_loss_stops_with_clear_message_and_keeps_checkpoint(data_files, tmp_path,
                                                                       monkeypatch):
    from tformer.training import loop

    real = loop.forward_loss
    calls = {"n": 0}

    def poisoned(model, batch, smoothing):
        calls["n"] += model.training  # validation calls it too; count training steps only
        loss = real(model, batch, smoothing)
        return loss * float("nan") if calls["n"] == 6 and model.training else loss

    monkeypatch.setattr(loop, "forward_loss", poisoned)
    out = tmp_path / "run"
    config = load_config(None, overrides(data_files, out, **{"train.eval_every": 5}))
    with pytest.raises(TrainingError, match="loss is nan at step 6.*step-0000005"):
        train(config)
    good = latest_checkpoint(out / "checkpoints")
    assert good.name == "step-0000005"
    assert all(torch.isfinite(t).all() for t in load_file(good / "model.safetensors").values())


DDP_WORKER = """
import json, os, sys
import torch
from tformer.training import load_config, loop, train

seen = []
real = loop.micro_batches
def recording(*args):
    for indices in real(*args):
        seen.append(list(indices))
        yield indices
loop.micro_batches = recording
result = train(load_config(None, sys.argv[2:]))
rank = int(os.environ["RANK"])
torch.save({k: v.detach().clone() for k, v in result.model.state_dict().items()},
           os.path.join(sys.argv[1], f"weights-{rank}.pt"))
json.dump(seen, open(os.path.join(sys.argv[1], f"batches-{rank}.json"), "w"))
"""


@pytest.mark.slow
@pytest.mark.parametrize("bpe_dropout", [0.0, 0.3])
def test_two_processes_ddp_replicas_identical_and_batches_differ(data_files, tmp_path,
                                                                 bpe_dropout):
    """With data.bpe_dropout each process would draw its own segmentation, and cut its own
    batches from it; the main process's ids are broadcast, so the batches still partition."""
    script = tmp_path / "worker.py"
    script.write_text(DDP_WORKER)
    args = overrides(data_files, tmp_path / "run", **{
        "train.max_steps": 6, "train.eval_every": 6, "data.bpe_dropout": bpe_dropout})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", "29517", str(script), str(tmp_path), *args],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    w0, w1 = (torch.load(tmp_path / f"weights-{r}.pt") for r in (0, 1))
    assert_same_weights(w0, w1)
    b0, b1 = (json.loads((tmp_path / f"batches-{r}.json").read_text()) for r in (0, 1))
    assert len(b0) == len(b1) == 6
    flat0, flat1 = {i for b in b0 for i in b}, {i for b in b1 for i in b}
    assert not flat0 & flat1  # the two replicas trained on different examples


def test_gradient_accumulation_steps_once_per_n_micro_batches(data_files, tmp_path, monkeypatch):
    from tformer.training import loop

    steps, micro = [], []
    real_step, real_batches = torch.optim.AdamW.step, loop.micro_batches

    def counting_step(self, *args, **kwargs):
        steps.append(1)
        return real_step(self, *args, **kwargs)

    def counting_batches(*args):
        for indices in real_batches(*args):
            micro.append(indices)
            yield indices

    monkeypatch.setattr(torch.optim.AdamW, "step", counting_step)
    monkeypatch.setattr(loop, "micro_batches", counting_batches)
    config = load_config(None, overrides(data_files, tmp_path / "run", **{
        "train.grad_accum": 3, "train.max_steps": 4, "train.eval_every": 4}))
    result = train(config)
    assert result.state.step == 4
    assert len(micro) == 12 and len(steps) == 4  # 12 micro-batches, 4 optimizer steps
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in records if r["split"] == "train"]
    # the schedule advances once per optimizer step: warmup 4 steps to 3e-3, then 1/sqrt
    assert lrs == pytest.approx([1.5e-3, 2.25e-3, 3e-3, 3e-3 * (4 / 5) ** 0.5])


def test_logged_gradient_norm_is_the_pre_clipping_norm_of_each_window(data_files, tmp_path,
                                                                      monkeypatch):
    from accelerate import Accelerator

    norms = []
    real_clip = Accelerator.clip_grad_norm_

    def measuring_clip(self, parameters, max_norm, *args, **kwargs):
        parameters = list(parameters)
        grads = [p.grad.flatten() for p in parameters if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.cat(grads))))  # before clipping
        return real_clip(self, parameters, max_norm, *args, **kwargs)

    monkeypatch.setattr(Accelerator, "clip_grad_norm_", measuring_clip)
    config = load_config(None, overrides(data_files, tmp_path / "run", **{
        "train.max_steps": 6, "train.log_every": 3, "train.eval_every": 6,
        "train.clip_grad_norm": 1.2}))  # this tiny run's norms: 1.3-1.6, then 1.0-1.1
    train(config)
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if r["split"] == "train"]
    assert len(norms) == 6 and [r["step"] for r in logged] == [3, 6]
    for record, window in zip(logged, (norms[:3], norms[3:])):
        assert record["grad_norm"] == pytest.approx(sum(window) / 3, rel=1e-5)
        assert record["clipped"] == pytest.approx(sum(n > 1.2 for n in window) / 3)

    off = load_config(None, overrides(data_files, tmp_path / "off", **{
        "train.max_steps": 2, "train.eval_every": 2, "train.clip_grad_norm": "null"}))
    train(off)
    records = [json.loads(x) for x in (tmp_path / "off" / "metrics.jsonl").read_text().splitlines()]
    assert not any("grad_norm" in r or "clipped" in r for r in records)


def test_window_clipped_share_counts_norms_above_the_limit():
    from accelerate import Accelerator

    from tformer.training.checkpoint import TrainState
    from tformer.training.log import Window

    window = Window(TrainState(), clip=0.5)
    for norm in (torch.tensor(0.4), torch.tensor(0.6), 2.0, None):  # None: DeepSpeed's first step
        window.add_grad_norm(norm)
    record = window.flush(Accelerator(cpu=True), lr=1e-3)
    assert record["grad_norm"] == pytest.approx(1.0) and record["clipped"] == pytest.approx(2 / 3)
    assert "grad_norm" not in window.flush(Accelerator(cpu=True), lr=1e-3)  # emptied per line


def test_early_stopping_after_patience_without_improvement(data_files, tmp_path, monkeypatch):
    from tformer.training import validation

    values = iter([30.0, 20.0, 10.0, 5.0, 1.0])
    monkeypatch.setattr(validation, "score", lambda name, p, r: next(values))
    config = load_config(None, overrides(data_files, tmp_path / "run", **{
        "train.max_steps": 40, "train.eval_every": 2, "train.early_stopping_patience": 2}))
    result = train(config)
    assert result.stopped_by == "early_stopping"
    assert result.state.step == 6  # best at step 2; no better at 4 and 6
    assert result.best_checkpoint.name == "step-0000002" and result.best_checkpoint.is_dir()


@pytest.mark.slow
def test_two_processes_resumed_equals_uninterrupted(data_files, tmp_path):
    """Each process resumes with its own RNG and its share of the data: exact under DDP too."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def launch(out: Path, steps: int, *extra: str) -> None:
        args = overrides(data_files, out, **{"train.max_steps": steps})
        done = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
             "--master_port", "29519", "-m", "tformer.cli", "train", *args, *extra],
            env=env, capture_output=True, text=True, timeout=600,
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    launch(tmp_path / "whole", 8)
    launch(tmp_path / "parts", 4)
    launch(tmp_path / "parts", 8, "--resume")
    assert_same_weights(final_weights(tmp_path / "parts"), final_weights(tmp_path / "whole"))


class _TrainingTime:
    """A clock for the training loop that moves only when it takes a training batch: 10 s per
    batch (``seconds``: the time of the n-th batch, 1-based), so time budgets and time-based
    schedules are exact, whatever the machine's speed."""

    def __init__(self, monkeypatch, seconds=lambda n: 10.0) -> None:
        from tformer.training import loop, stopping

        self.now = 0.0
        real = loop.micro_batches

        def batches(*args):
            for n, indices in enumerate(real(*args), 1):
                self.now += seconds(n)
                yield indices

        monkeypatch.setattr(loop, "micro_batches", batches)
        monkeypatch.setattr(stopping, "time", self)  # the run's clock (RunClock)

    def perf_counter(self) -> float:
        return self.now


def _train_lrs(run: Path) -> list[float]:
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["lr"] for r in records if r["split"] == "train"]


def _time_budget_run(data_files, run: Path, minutes: float):
    """A linear decay over ``minutes`` of `_TrainingTime`, 2 warm-up steps, a log line each
    step, no validation."""
    return load_config(None, overrides(data_files, run, **{
        "train.max_steps": 100000, "train.max_minutes": minutes, "train.schedule": "linear",
        "train.decay_over": "time", "train.warmup_steps": 2, "train.log_every": 1,
        "train.eval_every": 100000, "train.lr": 1e-3}))


def test_schedule_over_the_time_budget_ends_at_the_floor(data_files, tmp_path, monkeypatch):
    """``decay_over: time``: the step time is measured over the warm-up (10 s per step here),
    and the rest of the 60 s budget becomes the horizon of the step-driven decay
    (2 + 40 s / 10 s = 6 steps), kept in the train state; measured again as the run goes, the
    pace is the same and so is the horizon. The run stops on its budget at step 7, its rate at
    the floor from step 6 on."""
    from tformer.training.schedule import lr_factor

    _TrainingTime(monkeypatch)
    result = train(_time_budget_run(data_files, tmp_path / "run", 1.0))
    assert (result.stopped_by, result.state.step) == ("time_limit", 7)
    assert result.state.schedule_steps == 6
    expected = [1e-3 * lr_factor(k, 2, "linear", 6) for k in range(1, 8)]
    assert _train_lrs(tmp_path / "run") == pytest.approx(expected)
    assert expected[-3:] == [0.0] * 3 and expected[1] == pytest.approx(1e-3 * (1 - 1 / 4))


@pytest.mark.parametrize("pace, first, moved, last_step", [
    ((10.0, 20.0, 6), 18, 12, 13),  # slower from step 7: 7 + 100 s / 20 s
    ((20.0, 10.0, 3), 9, 15, 16),  # faster from step 4: 5 + 100 s / 10 s
], ids=["slower", "faster"])
def test_time_schedule_follows_a_change_of_pace(data_files, tmp_path, monkeypatch, pace, first,
                                                 moved, last_step):
    """The machine's pace changes mid-run (another job started, or ended): the horizon
    measured at the end of the warm-up (``first``) would leave the rate above its floor at the
    end of the 3-minute budget (slower), or at the floor long before it (faster). Measured
    again every tenth of the budget, the horizon moves (to ``moved``), the decay going on from
    where it was: the rate never rises, and it reaches its floor as the run stops."""
    before, after, until = pace
    _TrainingTime(monkeypatch, seconds=lambda n: before if n <= until else after)
    result = train(_time_budget_run(data_files, tmp_path / "run", 3.0))
    assert (result.stopped_by, result.state.step) == ("time_limit", last_step)
    assert result.state.schedule_steps == moved != first
    lrs = _train_lrs(tmp_path / "run")
    assert all(b <= a + 1e-12 for a, b in zip(lrs[1:], lrs[2:]))  # after the warm-up
    # the update at the new horizon is the first at the floor (the record of step k holds
    # update k + 1's rate): it is reached, and not before
    assert lrs[moved - 3] > 0.0 and lrs[moved - 2:] == [0.0] * (last_step - moved + 2)


def test_time_budget_resumed_equals_uninterrupted(data_files, tmp_path, monkeypatch):
    """``max_minutes`` and the time-based schedule count across resumes: a run stopped at step
    4 (of its 90 s budget, with an evaluation there) and resumed stops at the same step 10 as
    the uninterrupted one, with the same rates and the same weights."""
    clock = _TrainingTime(monkeypatch)
    budget = {"train.max_minutes": 1.5, "train.schedule": "linear", "train.decay_over": "time",
              "train.warmup_steps": 2, "train.log_every": 1, "train.eval_every": 100000,
              "train.save_every": 2}
    whole = train(load_config(None, overrides(data_files, tmp_path / "whole", **{
        "train.max_steps": 100000, **budget})))
    clock.now = 0.0
    parts_args = overrides(data_files, tmp_path / "parts", **{"train.max_steps": 4, **budget})
    assert train(load_config(None, parts_args)).stopped_by == "max_steps"
    clock.now = 1000.0  # time between the two processes does not count
    resumed_args = overrides(data_files, tmp_path / "parts", **{"train.max_steps": 100000,
                                                                 **budget})
    resumed = train(load_config(None, resumed_args), resume=True)
    assert (whole.stopped_by, whole.state.step) == ("time_limit", 10)
    assert (resumed.stopped_by, resumed.state.step) == ("time_limit", 10)
    assert resumed.state.elapsed_seconds == whole.state.elapsed_seconds == 100.0
    assert resumed.state.schedule_steps == whole.state.schedule_steps == 9  # 2 + 70 s / 10 s
    assert _train_lrs(tmp_path / "parts") == pytest.approx(_train_lrs(tmp_path / "whole"))
    assert_same_weights(final_weights(tmp_path / "parts"), final_weights(tmp_path / "whole"))


def test_bpe_dropout_splits_words_anew_each_epoch_and_only_in_training(data_files, tmp_path,
                                                                       monkeypatch):
    """data.bpe_dropout: the batches of each epoch carry a fresh segmentation of the same text
    (decoding gives the text back), the plain encoding is untouched for validation, and the
    tokenizer the run saves segments deterministically."""
    from tformer.training import loop

    train_size = len(data_files["train"].read_text().splitlines())
    seen: list[tuple[object, list[int]]] = []  # (the token lists collated from, row indices)
    real_collate = loop.collate_batch

    def recording(collate, tokens, indices, accelerator):
        if len(tokens[0]) == train_size:  # training batches (validation ones come here too)
            seen.append((tokens, list(indices)))  # holding the lists keeps their id() unique
        return real_collate(collate, tokens, indices, accelerator)

    monkeypatch.setattr(loop, "collate_batch", recording)
    out = tmp_path / "run"
    result = train(load_config(None, overrides(data_files, out, **{
        "data.bpe_dropout": 0.3, "train.max_tokens": 3000, "train.max_steps": 16,
        "train.eval_every": 16})))
    assert result.state.epoch >= 2  # the 16 steps span at least two epoch boundaries
    tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")
    assert tokenizer.backend_tokenizer.model.dropout is None
    sources = [json.loads(x)["source"] for x in data_files["train"].read_text().splitlines()]
    plain = {i: tokenizer(s)["input_ids"] for i, s in enumerate(sources)}
    assert all(tokenizer(s)["input_ids"] == plain[i] for i, s in enumerate(sources[:20]))

    by_epoch: dict[int, dict[int, list[int]]] = {}
    for tokens, indices in seen:
        by_epoch.setdefault(id(tokens), {}).update({i: tokens[0][i] for i in indices})
    # one encoding per epoch (not per batch): the epochs begun are state.epoch or one more
    assert len(by_epoch) in (result.state.epoch, result.state.epoch + 1)
    differ_from_plain = differ_between_epochs = 0
    first, second = list(by_epoch.values())[:2]
    for rows in by_epoch.values():
        for i, ids in rows.items():
            assert tokenizer.decode(ids, skip_special_tokens=True) == sources[i]
            differ_from_plain += ids != plain[i]
    for i in first.keys() & second.keys():
        differ_between_epochs += first[i] != second[i]
    total = sum(len(rows) for rows in by_epoch.values())
    assert differ_from_plain > total / 2
    assert differ_between_epochs > len(first.keys() & second.keys()) / 2


def test_bpe_dropout_needs_a_bpe_tokenizer_and_a_probability(data_files, tmp_path):
    from tformer.training import ConfigError

    with pytest.raises(ConfigError, match=r"data\.bpe_dropout must be in \[0, 1\), got 1\.0"):
        load_config(None, overrides(data_files, tmp_path / "a", **{"data.bpe_dropout": 1.0}))
    config = load_config(None, overrides(data_files, tmp_path / "b", **{
        "data.bpe_dropout": 0.1, "data.tokenizer_kind": "unigram"}))
    with pytest.raises(ConfigError, match="data.bpe_dropout=0.1 needs a fast BPE tokenizer.*Unigram"):
        train(config)


def _repeated_ngrams(row: list[int], n: int, stop: set[int]) -> int:
    """How many of ``row``'s token n-grams (up to its first end or pad token) occurred
    before in it."""
    for i, token in enumerate(row):
        if token in stop:
            row = row[:i]
            break
    grams = [tuple(row[i : i + n]) for i in range(len(row) - n + 1)]
    return len(grams) - len(set(grams))


@pytest.mark.parametrize("no_repeat", [0, 2])
def test_the_recipes_generation_settings_reach_validation_and_the_test_score(
        data_files, tmp_path, monkeypatch, no_repeat):
    """``train.no_repeat_ngram_size`` and ``train.repetition_penalty`` are what validation's
    metric and the test score generate with: with ``no_repeat_ngram_size=2`` no generated
    bigram repeats; the same run without it repeats some (a 4-step model stutters)."""
    from tformer.hf import TformerForConditionalGeneration
    from tformer.recipe import run_recipe

    calls = []
    original = TformerForConditionalGeneration.generate

    def recording(self, *args, **kwargs):
        ids = original(self, *args, **kwargs)
        calls.append((kwargs, ids.tolist(), {self.config.eos_token_id, self.config.pad_token_id}))
        return ids

    monkeypatch.setattr(TformerForConditionalGeneration, "generate", recording)
    config = load_config(None, overrides(
        data_files, tmp_path / "run", **{
            "data.test": data_files["validation"], "train.max_steps": 4, "train.eval_every": 4,
            "train.max_new_tokens": 16, "train.no_repeat_ngram_size": no_repeat,
            "train.repetition_penalty": 1.0 if no_repeat else 1.1}))
    result = run_recipe(config)
    test = json.loads((result.run_dir / "test_metrics.json").read_text())
    assert test["generation"]["no_repeat_ngram_size"] == no_repeat
    calls = [c for c in calls if c[0]["max_new_tokens"] == 16]  # not the report's attention map
    assert len(calls) >= 2  # validation at step 4, then the test split
    assert all(kwargs["no_repeat_ngram_size"] == no_repeat for kwargs, _, _ in calls)
    assert all(kwargs["repetition_penalty"] == (1.0 if no_repeat else 1.1)
               for kwargs, _, _ in calls)
    repeats = sum(_repeated_ngrams(row[1:], 2, stop) for _, ids, stop in calls for row in ids)
    assert (repeats == 0) if no_repeat else (repeats > 0)
