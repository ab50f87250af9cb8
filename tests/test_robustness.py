"""Faults and abuse, one test per finding of the outside fault pass (docs/usage.md, "Failure
modes"): a run directory that protects itself, checkpoints that fail with the file's name,
inputs bounded everywhere, validated configuration and API, metrics written once."""

from __future__ import annotations

import dataclasses
import http.client
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from safetensors.torch import load_file, save_file

import tformer
from tformer.cli import main as cli
from tformer.serving import ServerThread, ServeSettings, create_app
from tformer.training import ConfigError, RunDirError, load_config, train
from tformer.training.checkpoint import prune_checkpoints, verify_checkpoint
from tformer.training.config import _SECTIONS
from tformer.training.rundir import RunLock

from .conftest import tiny_overrides
from .serving_helpers import StubSeq2Seq, served_checkpoint

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def copy_run(reference_run: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(reference_run, run, ignore=shutil.ignore_patterns(".lock"))
    return run


def metric_steps(run: Path) -> list[tuple[str, int]]:
    lines = (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [(r["split"], r["step"]) for r in map(json.loads, lines)]


# -- 1. two runs into one output_dir at once ---------------------------------------------------


def _train_cli(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tformer.cli", "train", *args], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_lock_holder(lock: Path, proc: subprocess.Popen, timeout: float = 120) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the first run ended early:\n{proc.stdout.read()}")
        text = lock.read_text().strip() if lock.is_file() else ""
        if text == str(proc.pid) and (lock.parent / "metrics.jsonl").is_file():
            return proc.pid
        time.sleep(0.1)
    raise AssertionError("the first run did not start training in time")


def test_second_run_is_refused_while_the_first_holds_the_lock_and_allowed_after_kill9(
        data_files, tmp_path):
    """Fault injection: run A trains; run B into the same directory fails at once naming the
    directory and A's PID; A is killed with -9 (no clean-up); the kernel has released the
    lock, so B then runs (with --overwrite: A left its tokenizer and metrics)."""
    out = tmp_path / "run"
    first = _train_cli(tiny_overrides(data_files, out, **{
        "train.max_steps": 100_000, "train.eval_every": 100_000, "train.log_every": 1}))
    try:
        pid = _wait_for_lock_holder(out / ".lock", first)
        second = subprocess.run(
            [sys.executable, "-m", "tformer.cli", "train",
             *tiny_overrides(data_files, out, **{"train.max_steps": 2}), "--resume"],
            env=ENV, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr
        assert f"{out} is in use by another run (PID {pid}" in second.stderr
        assert first.poll() is None  # the first run goes on, untouched
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    third = subprocess.run(
        [sys.executable, "-m", "tformer.cli", "train", "--overwrite",
         *tiny_overrides(data_files, out, **{"train.max_steps": 2, "train.eval_every": 2})],
        env=ENV, capture_output=True, text=True, timeout=300)
    assert third.returncode == 0, third.stdout + third.stderr
    assert metric_steps(out)[:2] == [("train", 1), ("train", 2)]  # run A's lines are gone


def test_run_lock_in_process(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(RunDirError, match=rf"{tmp_path} is in use .*PID {os.getpid()}"):
            RunLock(tmp_path).acquire()
    RunLock(tmp_path).acquire().release()  # released with its holder


# -- 2. a fresh run into a used directory ------------------------------------------------------


def test_fresh_run_into_a_used_directory_is_refused_and_overwrite_starts_afresh(
        data_files, reference_run, tmp_path):
    run = copy_run(reference_run, tmp_path)
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    other = {"data.vocab_size": 500, "data.train": data_files["validation"],
             "train.max_steps": 2, "train.eval_every": 2}
    with pytest.raises(RunDirError, match=r"already holds a run: 3 checkpoint\(s\).*--resume.*"
                       r"--overwrite.*new train\.output_dir"):
        train(load_config(None, tiny_overrides(data_files, run, **other)))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before  # nothing lost
    result = train(load_config(None, tiny_overrides(data_files, run, **other)), overwrite=True)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000002"]
    assert load_config(run / "config.yaml").data.vocab_size == 500
    # the tokenizer was trained afresh for this run, not reused from the old one
    def vocab(directory: Path) -> dict:
        return json.loads((directory / "tokenizer.json").read_text())["model"]["vocab"]

    assert vocab(run / "tokenizer") == vocab(result.last_checkpoint)
    assert vocab(run / "tokenizer") != vocab(reference_run / "tokenizer")


def test_resume_names_every_difference_and_refuses_those_that_change_results(
        data_files, reference_run, tmp_path):
    run = copy_run(reference_run, tmp_path)
    changed = {"data.vocab_size": 900, "train.lr": 1e-3, "model.d_ff": 64,
               "train.max_steps": 13}
    with pytest.raises(RunDirError) as error:
        train(load_config(None, tiny_overrides(data_files, run, **changed)), resume=True)
    message = str(error.value)
    for text in ("data.vocab_size: 400 -> 900", "train.lr: 0.003 -> 0.001",
                 "model.d_ff: None -> 64", "train.max_steps: 12 -> 13"):
        assert text in message
    assert message.index("also changed (allowed)") < message.index("train.max_steps")
    result = train(load_config(None, tiny_overrides(data_files, run, **{"train.max_steps": 13})),
                   resume=True)
    assert result.state.step == 13


def test_resume_refuses_data_files_changed_under_the_same_name(data_files, tmp_path):
    files = {split: tmp_path / path.name for split, path in data_files.items()}
    for split, path in data_files.items():
        shutil.copy(path, files[split])
    run = tmp_path / "run"
    short = {"train.max_steps": 2, "train.eval_every": 2}
    train(load_config(None, tiny_overrides(files, run, **short)))
    lines = files["train"].read_text(encoding="utf-8").splitlines()
    files["train"].write_text("\n".join(lines[::-1]) + "\n", encoding="utf-8")  # same size
    with pytest.raises(RunDirError, match=rf"data files changed.*data\.train: {files['train']}"):
        train(load_config(None, tiny_overrides(files, run, **{"train.max_steps": 3})),
              resume=True)


def test_pruning_deletes_only_the_checkpoints_this_run_wrote(tmp_path):
    for step in (1, 2, 3, 4, 5):
        (tmp_path / f"step-{step:07d}").mkdir()
    owned = ["step-0000003", "step-0000004", "step-0000005"]  # 1 and 2: another run's
    prune_checkpoints(tmp_path, keep_last=1, keep=set(), owned=owned)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-0000001", "step-0000002",
                                                          "step-0000005"]


def test_checkpoints_record_which_run_wrote_them_and_their_checksums(reference_run):
    marker = verify_checkpoint(reference_run / "checkpoints" / "step-0000012", checksums=True)
    assert marker["train_state"]["checkpoints"][-1] == "step-0000012"
    assert set(marker["sha256"]) == set(marker["files"])


# -- 3. one 1 MB line through evaluate, generate and attention --------------------------------


@pytest.fixture(scope="module")
def big_line(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("big") / "big.jsonl"
    records = [{"source": "A man rides a bike down the street . " * 28_000, "target": "Ein Mann"},
               {"source": "A dog runs .", "target": "Ein Hund rennt ."}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    assert path.stat().st_size > 1_000_000
    return path


def test_evaluate_a_one_megabyte_line_in_seconds_with_bounded_memory(reference_run, big_line,
                                                                     tmp_path):
    checkpoint = reference_run / "checkpoints" / "step-0000012"
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "tformer.cli", "evaluate", str(checkpoint), "--data",
         str(big_line), "--max-new-tokens", "8", "--output-dir", str(tmp_path)],
        env=ENV, capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - start
    peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB on Linux
    assert done.returncode == 0, done.stderr
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["truncated_sources"] == 1 and metrics["max_source_length"] == 1024
    assert "1 of 2 source(s) were longer than 1024 tokens" in done.stderr
    assert peak_gb < 2.0, f"peak RSS {peak_gb:.2f} GB"
    assert seconds < 120, f"{seconds:.0f} s"  # 12 s when measured, most of it imports


def test_generate_and_attention_truncate_to_the_checkpoint_limit(reference_run, big_line):
    from tformer.visualization.attention import attention_maps

    seq2seq = tformer.load(reference_run / "checkpoints" / "step-0000012", device="cpu")
    text = json.loads(big_line.read_text().splitlines()[0])["source"]
    report: dict = {}
    seq2seq.generate([text, "A dog runs ."], max_new_tokens=4, report=report)
    assert report == {"truncated_sources": 1, "max_source_length": 1024}
    seq2seq.generate([text], max_new_tokens=4, max_source_length=16, report=report)
    assert report == {"truncated_sources": 1, "max_source_length": 16}  # --max-source-length
    maps = attention_maps(seq2seq, text, "Ein Mann", max_new_tokens=4)
    assert len(maps.source_tokens) == 1024


# -- 4. a recipe that is not a mapping ---------------------------------------------------------


@pytest.mark.parametrize(("text", "found"), [("- 1\n- 2\n", "list"), ("just words\n", "str"),
                                            ("42\n", "int"), ("train: [1, 2]\n", "list")])
def test_a_recipe_that_is_not_a_mapping_names_the_file_and_what_was_found(tmp_path, text, found):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    with pytest.raises(ConfigError, match=rf"recipe\.yaml.*mapping.*found a {found}"):
        load_config(recipe)


# -- 5. out-of-range numeric settings ----------------------------------------------------------


def _numeric_fields():
    for section, cls in _SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            options = set(typing.get_args(hints[f.name])) or {hints[f.name]}
            if options & {int, float} or typing.get_origin(hints[f.name]) is tuple and \
                    typing.get_args(hints[f.name])[0] is float:
                yield section, f.name, float in options or typing.get_origin(hints[f.name]) is tuple


@pytest.mark.parametrize(("section", "name", "is_float"), list(_numeric_fields()))
def test_every_numeric_setting_is_range_checked(section, name, is_float):
    """Walks the config schema: -1 is out of range for every numeric field; NaN and infinity
    for every float field."""
    bad = ["-1"] + (["nan", "inf"] if is_float else [])
    for value in bad:
        if name == "adam_betas":
            value = f"[{ {'nan': '.nan', 'inf': '.inf'}.get(value, value)}, 0.9]"  # YAML
        with pytest.raises(ConfigError, match=rf"{section}\.{name} must be"):
            load_config(None, [f"{section}.{name}={value}"])


@pytest.mark.parametrize("override", ["train.weight_decay=-1", "train.adam_betas=[0.9, 1.0]",
                                      "train.adam_eps=0", "train.label_smoothing=1",
                                      "model.dropout=1.5", "train.min_lr_ratio=2",
                                      "train.seed=4294967296"])
def test_upper_bounds_and_zero(override):
    with pytest.raises(ConfigError, match=rf"{override.split('=')[0]} must be"):
        load_config(None, [override])


# -- 6, 7. damaged checkpoints -----------------------------------------------------------------


def _overwrite(path: Path, offset: int, data: bytes) -> None:
    size = path.stat().st_size
    with path.open("r+b") as fh:
        fh.seek(offset)
        fh.write(data)
    assert path.stat().st_size == size


@pytest.mark.parametrize("where", ["header", "data"])
def test_resume_skips_a_same_size_damaged_checkpoint_and_says_why(data_files, reference_run,
                                                                  tmp_path, caplog, where):
    run = copy_run(reference_run, tmp_path)
    weights = run / "checkpoints" / "step-0000012" / "model.safetensors"
    size = weights.stat().st_size
    # "header": the first bytes (the header's length, then its JSON); "data": tensor bytes
    _overwrite(weights, 0 if where == "header" else size - 64, b"\xff" * 16)
    with caplog.at_level("WARNING"):
        result = train(load_config(None, tiny_overrides(data_files, run)), resume=True)
    skipped = [r.getMessage() for r in caplog.records if "skipping checkpoint" in r.getMessage()]
    assert skipped and "step-0000012" in skipped[0] and "model.safetensors" in skipped[0]
    assert ("header" in skipped[0]) if where == "header" else ("sha256" in skipped[0])
    assert result.state.step == 12  # resumed from step 8, trained 9-12 again
    verify_checkpoint(run / "checkpoints" / "step-0000012", checksums=True)  # rewritten whole


@pytest.fixture(scope="module")
def damaged(reference_run, tmp_path_factory) -> dict[str, Path]:
    """Copies of the last checkpoint: truncated, header overwritten, tensors of another model."""
    root = tmp_path_factory.mktemp("damaged")
    source = reference_run / "checkpoints" / "step-0000012"
    out = {}
    for kind in ("truncated", "header", "wrong"):
        path = root / kind
        shutil.copytree(source, path)
        weights = path / "model.safetensors"
        if kind == "truncated":
            weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        elif kind == "header":
            _overwrite(weights, 8, b"\x00" * 32)
        else:
            tensors = load_file(weights)
            tensors.pop(sorted(tensors)[0])
            save_file(tensors, weights)
        out[kind] = path
    return out


@pytest.mark.parametrize("kind", ["truncated", "header", "wrong"])
@pytest.mark.parametrize("verb", ["evaluate", "generate", "attention", "export", "average",
                                  "serve"])
def test_every_opener_names_the_damaged_file(damaged, data_files, tmp_path, capsys, verb, kind):
    checkpoint = str(damaged[kind])
    args = {
        "evaluate": ["evaluate", checkpoint, "--data", str(data_files["validation"])],
        "generate": ["generate", checkpoint, "--input", str(data_files["validation"])],
        "attention": ["attention", checkpoint, "A dog.", "-o", str(tmp_path / "a")],
        "export": ["export", checkpoint, "-o", str(tmp_path / "e")],
        "average": ["average", checkpoint, checkpoint, "-o", str(tmp_path / "avg")],
        "serve": ["serve", checkpoint, "--port", "1"],
    }[verb]
    if verb == "export":
        pytest.importorskip("ctranslate2")
    assert cli(args) == 2
    error = capsys.readouterr().err
    assert f"tformer {verb}: error: " in error and "Traceback" not in error
    expected = {"truncated": r"model\.safetensors (is damaged|has \d+ bytes, expected)",
                "header": r"model\.safetensors is damaged",
                # average checks the sizes checkpoint.json recorded first
                "wrong": r"weights missing|model\.safetensors has \d+ bytes, expected"}[kind]
    assert str(damaged[kind]) in error and re.search(expected, error), error


# -- 8, 9. the server: degenerate sampling, integral floats, no 500, connection kept ----------


@pytest.fixture(scope="module")
def served(reference_run, tmp_path_factory) -> tformer.Seq2Seq:
    return tformer.load(served_checkpoint(reference_run, tmp_path_factory.mktemp("served")),
                        device="cpu")


@pytest.mark.parametrize("route", ["/v1/generate", "/v1/attention"])
@pytest.mark.parametrize(("field", "value"), [("temperature", 1e-300), ("temperature", 0.0),
                                              ("top_p", 0.0)])
def test_degenerate_sampling_is_a_422_naming_the_field(served, route, field, value):
    body = {"do_sample": True, field: value, "max_new_tokens": 4}
    body.update({"inputs": ["A dog runs."]} if route == "/v1/generate" else {"input": "A dog."})
    with TestClient(create_app(served)) as client:
        response = client.post(route, json=body)
        assert response.status_code == 422, response.text
        assert response.json()["error"]["message"].startswith(field)
        body[field] = 1e-4 if field == "temperature" else 0.5  # the floor itself is fine
        assert client.post(route, json=body).status_code == 200


def test_integral_floats_are_accepted_for_integer_fields(served):
    with TestClient(create_app(served)) as client:
        body = {"inputs": ["A dog runs."], "max_new_tokens": 4.0, "no_repeat_ngram_size": 0.0,
                "num_beams": 1.0, "top_k": 0.0, "max_source_length": 32.0}
        assert client.post("/v1/generate", json=body).status_code == 200
        for bad in (2.5, True, "2", 1e300):
            response = client.post("/v1/generate", json={**body, "num_beams": bad})
            assert response.status_code == 422, (bad, response.text)


class FailingSeq2Seq(StubSeq2Seq):
    """Raises an unexpected error for the text "boom"."""

    def generate(self, texts, *, max_new_tokens: int, **options) -> list[str]:
        if "boom" in texts:
            raise RuntimeError("an unexpected failure")
        return super().generate(texts, max_new_tokens=max_new_tokens, **options)


def test_an_unexpected_error_answers_json_and_keeps_the_connection():
    app = create_app(FailingSeq2Seq(), settings=ServeSettings(batching="dynamic"))
    with ServerThread(app) as server:
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        answers = []
        for text in ("boom", "fine", "boom", "fine"):  # one keep-alive connection throughout
            connection.request("POST", "/v1/generate", json.dumps({"inputs": [text]}),
                               {"Content-Type": "application/json"})
            response = connection.getresponse()
            answers.append((response.status, json.loads(response.read())))
        connection.close()
    assert [status for status, _ in answers] == [500, 200, 500, 200]
    assert answers[0][1]["error"]["code"] == "internal_error"
    assert answers[1][1]["outputs"] == ["FINE"]


def test_the_server_truncates_to_the_model_limit_and_says_how_many(served):
    settings = ServeSettings(max_input_chars=100_000, max_input_tokens=4096)
    with TestClient(create_app(served, settings=settings)) as client:
        long = "A man rides a bike . " * 400  # 2,400+ tokens; the model reads at most 1024
        response = client.post("/v1/generate", json={"inputs": [long, "A dog."],
                                                     "max_new_tokens": 4})
        assert response.status_code == 200, response.text
        assert response.json()["truncated_inputs"] == 1
        assert response.json()["input_tokens"][0] == 1024
        maps = client.post("/v1/attention", json={"input": long, "target": "A man .",
                                                  "include": ["cross"]})
        assert maps.status_code == 200, maps.text
        assert maps.json()["truncated_inputs"] == 1 and len(maps.json()["source_tokens"]) <= 1024
        short = client.post("/v1/attention", json={"input": "A dog.", "target": "A dog ."})
        assert short.json()["truncated_inputs"] == 0


# -- 10. metrics written once after kill -9 and --resume ---------------------------------------


def test_resume_drops_metrics_logged_after_the_checkpoint(data_files, reference_run, tmp_path):
    """As after kill -9 between the log line of step 12 and its checkpoint: the newest
    checkpoint is step 8, metrics.jsonl already holds steps 9-12 and a torn line."""
    run = copy_run(reference_run, tmp_path)
    shutil.rmtree(run / "checkpoints" / "step-0000012")
    with (run / "metrics.jsonl").open("a") as fh:
        fh.write('{"split": "train", "step": 1')  # cut by the kill
    train(load_config(None, tiny_overrides(data_files, run)), resume=True)
    steps = metric_steps(run)
    assert len(steps) == len(set(steps))
    assert [s for split, s in steps if split == "train"] == list(range(1, 13))


def test_kill9_then_resume_logs_each_step_once(data_files, tmp_path):
    """The fault as found: log_every=5, kill -9 mid-run, --resume."""
    out = tmp_path / "run"
    args = tiny_overrides(data_files, out, **{"train.max_steps": 400, "train.log_every": 5,
                                              "train.eval_every": 10})
    proc = _train_cli(args)
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        text = (out / "metrics.jsonl").read_text() if (out / "metrics.jsonl").is_file() else ""
        if any(json.loads(x)["step"] >= 15 for x in text.splitlines() if x.endswith("}")):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    resumed = subprocess.run(
        [sys.executable, "-m", "tformer.cli", "train", "--resume",
         *tiny_overrides(data_files, out, **{"train.max_steps": 20, "train.log_every": 5,
                                             "train.eval_every": 10})],
        env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    steps = metric_steps(out)
    assert len(steps) == len(set(steps)), steps
    assert [s for split, s in steps if split == "train"] == [5, 10, 15, 20]


def test_resume_and_overwrite_exclude_each_other(tmp_path, capsys):
    assert cli(["train", "--resume", "--overwrite", f"train.output_dir={tmp_path}"]) == 2
    assert "give one of them" in capsys.readouterr().err
