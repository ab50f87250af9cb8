"""Language models on raw text (``data.task: lm``): tokenizers, packing, random windows, the
configuration, and the loop end to end: training, exact resume, DDP, generation, evaluation."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import tformer  # noqa: F401  (registers the own models with the Auto classes)
from tformer.cli import main as cli
from tformer.data import CausalLMCollator, DataError, load_documents, sources
from tformer.data.packing import (
    RandomWindows,
    eval_windows,
    hold_out_tail,
    pack_documents,
    windows,
)
from tformer.tokenization import EOS_ID, SPECIAL_TOKENS, train_tokenizer
from tformer.training import ConfigError, load_config, train
from tformer.training.checkpoint import TrainState
from tformer.training.setup import LMTrainSplit, load_texts, micro_batches

from .conftest import MIRROR, needs_mirror
from .synthetic import text_lines, write_jsonl
from .test_training import DDP_WORKER
from .weights_check import assert_same_weights

ROOT = Path(__file__).resolve().parents[1]
MIXED = "ROMEO:\nBut soft!  What light\tthrough yonder window?\n\n床前明月光，疑是地上霜。\n"


@pytest.fixture(scope="module")
def char_tokenizer():
    return train_tokenizer([MIXED], kind="char", append_eos=False)


@pytest.fixture(scope="module")
def text_files(tmp_path_factory) -> dict[str, Path]:
    """400 lines of synthetic English to train on, 60 others to validate on."""
    root = tmp_path_factory.mktemp("text")
    lines = text_lines(460).splitlines(keepends=True)
    (root / "train.txt").write_text("".join(lines[:400]), encoding="utf-8")
    (root / "validation.txt").write_text("".join(lines[400:]), encoding="utf-8")
    return {"train": root / "train.txt", "validation": root / "validation.txt"}


def lm_overrides(files: dict[str, Path], out: Path, **extra) -> list[str]:
    """A tiny GPT (2 layers, d_model 32) on characters, 12 steps of 8 windows of 32: seconds."""
    values = {
        "data.task": "lm", "data.train": files["train"], "data.validation": files["validation"],
        "data.tokenizer_kind": "char", "data.block_size": 32, "model.preset": "gpt2",
        "model.size": "tiny", "model.dropout": 0.1, "model.max_positions": 32,
        "train.max_tokens": 256, "train.max_steps": 12, "train.eval_every": 4,
        "train.log_every": 1, "train.warmup_steps": 2, "train.lr": 3e-3,
        # a schedule without a horizon: a run stopped by max_steps, then resumed, is the same
        "train.schedule": "inverse_sqrt", "train.label_smoothing": 0.0,
        "train.max_new_tokens": 40,
        "train.output_dir": out, "train.keep_last": 5,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def records(run: Path, split: str) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def last_weights(run: Path) -> dict[str, torch.Tensor]:
    summary = json.loads((run / "summary.json").read_text())
    return load_file(Path(summary["last_checkpoint"]) / "model.safetensors")


# --- tokenizers -----------------------------------------------------------------------------


def test_char_tokenizer_round_trips_chinese_newlines_and_spaces(char_tokenizer, tmp_path):
    ids = char_tokenizer(MIXED)["input_ids"]
    assert len(ids) == len(MIXED)  # one token per character, none added
    assert char_tokenizer.decode(ids) == MIXED
    assert char_tokenizer.convert_ids_to_tokens(ids[:3]) == ["R", "O", "M"]
    # ids: the special tokens first (fixed), then the characters in code-point order
    vocab = char_tokenizer.get_vocab()
    assert [vocab[t] for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert len(vocab) == len(SPECIAL_TOKENS) + len(set(MIXED))
    assert sorted(set(MIXED), key=vocab.get) == sorted(set(MIXED))
    char_tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded(MIXED)["input_ids"] == ids and reloaded.decode(ids) == MIXED
    unknown = char_tokenizer("月X光")["input_ids"]  # X is not in the corpus
    assert unknown[1] == char_tokenizer.unk_token_id


def test_char_vocabulary_keeps_the_most_frequent_characters_when_capped():
    tokenizer = train_tokenizer(["aaaa bbb cc d"], vocab_size=len(SPECIAL_TOKENS) + 3, kind="char")
    assert set(tokenizer.get_vocab()) == {*SPECIAL_TOKENS, "a", "b", " "}
    assert tokenizer("ab")["input_ids"][-1] == EOS_ID  # append_eos (the default): </s> added


def test_bytelevel_tokenizer_round_trips_any_text():
    tokenizer = train_tokenizer([text_lines(200)], vocab_size=400, kind="bytelevel",
                                append_eos=False)
    for text in (MIXED, "emoji 🙂 and café", "  two  spaces\n"):
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.decode(ids) == text and tokenizer.unk_token_id not in ids
    assert len(tokenizer("A man is holding a red ball")["input_ids"]) < 20  # merges learned


# --- packing and windows ----------------------------------------------------------------------


def test_documents_are_joined_by_the_end_of_text_token(char_tokenizer):
    documents = ["ROMEO:", "床前明月光", "soft!"]
    stream = pack_documents(char_tokenizer, documents, EOS_ID)
    expected = []
    for document in documents:
        expected += char_tokenizer(document)["input_ids"] + [EOS_ID]
    assert stream.tolist() == expected and stream.dtype == np.int32
    assert (stream == EOS_ID).sum() == len(documents)


def test_eval_windows_predict_every_token_once_from_its_context():
    stream = np.arange(100, dtype=np.int32)  # token i is i: targets are easy to follow
    inputs, labels = eval_windows(stream, 16)
    assert all(len(x) == len(y) == 16 for x, y in zip(inputs, labels))
    for x, y in zip(inputs, labels):
        assert (y[y != -100] == x[y != -100] + 1).all()  # each target is the next token
    scored = np.concatenate([y[y != -100] for y in labels])
    assert sorted(scored.tolist()) == list(range(1, 100))  # each token after the first, once
    # 99 targets: 6 whole blocks, then one ending at the stream's end (its first 13 context)
    assert len(inputs) == 7 and (labels[-1][:13] == -100).all() and labels[-1][-1] == 99
    short_inputs, short_labels = eval_windows(stream[:5], 16)
    assert [x.tolist() for x in short_inputs] == [[0, 1, 2, 3]]
    assert [y.tolist() for y in short_labels] == [[1, 2, 3, 4]]
    with pytest.raises(DataError, match="fewer than 2 tokens"):
        eval_windows(stream[:1], 16)


def test_random_windows_depend_on_seed_and_batch_index_only():
    sampler = RandomWindows(n_tokens=1000, block_size=64, batch_size=12, seed=7)
    again = RandomWindows(n_tokens=1000, block_size=64, batch_size=12, seed=7)
    assert [sampler.batch(i) for i in range(5)] == [again.batch(i) for i in range(5)]
    assert sampler.batch(0) != sampler.batch(1)
    assert RandomWindows(1000, 64, 12, seed=8).batch(0) != sampler.batch(0)
    starts = [s for i in range(200) for s in sampler.batch(i)]
    assert min(starts) == 0 and max(starts) == 1000 - 64 - 1  # every window fits, ends included
    assert sampler.per_epoch == math.ceil(999 / (12 * 64))
    epoch = sampler.batches(3)
    assert len(epoch) == sampler.per_epoch and epoch[1] == sampler.batch(3 * sampler.per_epoch + 1)
    with pytest.raises(DataError, match="needs data.block_size \\+ 1 = 65"):
        RandomWindows(64, 64, 12, seed=0)


def test_windows_collate_into_inputs_and_next_token_targets():
    stream = np.arange(50, dtype=np.int32)
    inputs, targets = windows(stream, 8)
    batch = CausalLMCollator()([{"input_ids": inputs[s], "labels": targets[s]} for s in (0, 5)])
    assert batch["input_ids"].tolist() == [list(range(0, 8)), list(range(5, 13))]
    assert batch["labels"].tolist() == [list(range(1, 9)), list(range(6, 14))]
    assert batch["input_ids"].dtype == torch.long


def test_processes_share_one_batch_order_and_resume_mid_epoch(text_files, tmp_path):
    """The loop's `micro_batches` over an lm split: rank r takes every world-th batch of the one
    order, and a state saved mid-epoch continues with the next batch."""
    config = load_config(None, lm_overrides(text_files, tmp_path / "run"))
    split = LMTrainSplit(config, np.zeros(5000, dtype=np.int32))

    def take(n, world=1, rank=0, state=None):
        batches = micro_batches(split, state or TrainState(), world, rank)
        return [next(batches) for _ in range(n)]

    one = take(40)
    rank0, rank1 = take(20, 2, 0), take(20, 2, 1)
    assert one[0::2] == rank0 and one[1::2] == rank1  # the ranks' windows partition the order
    assert split.sampler.per_epoch < 40  # the 40 batches cross into the next epoch
    state = TrainState(epoch=0, batches_in_epoch=6)
    assert take(10, state=state) == one[6:16]
    assert state.epoch == 0 and one[split.sampler.per_epoch] == split.sampler.batch(
        split.sampler.per_epoch)


def test_hold_out_tail_is_nanogpts_split():
    text = "".join(chr(ord("a") + i % 26) for i in range(1003))
    train_part, validation = hold_out_tail([text], 0.1)
    assert train_part == [text[: int(1003 * 0.9)]] and validation == [text[int(1003 * 0.9):]]
    train_part, validation = hold_out_tail(["aaaa", "bbbb", "cc"], 0.2)  # cut inside "cc"? no:
    assert train_part == ["aaaa", "bbbb"] and validation == ["cc"]  # 8 of 10 characters train
    train_part, validation = hold_out_tail(["aaaaaa", "bbbb"], 0.3)
    assert train_part == ["aaaaaa", "b"] and validation == ["bbb"]


# --- raw text -----------------------------------------------------------------------------


def test_documents_from_a_file_a_folder_and_text_columns(tmp_path):
    (tmp_path / "one.txt").write_text("First.\n", encoding="utf-8")
    (tmp_path / "folder" / "sub").mkdir(parents=True)
    (tmp_path / "folder" / "b.txt").write_text("B", encoding="utf-8")
    (tmp_path / "folder" / "sub" / "a.txt").write_text("A\n", encoding="utf-8")
    (tmp_path / "folder" / "notes.md").write_text("not text data", encoding="utf-8")
    assert load_documents(tmp_path / "one.txt")[0]["text"] == ["First.\n"]
    assert load_documents(tmp_path / "folder")[0]["text"] == ["B", "A\n"]  # path order
    poems = write_jsonl(tmp_path / "poems.jsonl", [
        {"title": "靜夜思", "text": "床前明月光，\n疑是地上霜。"},
        {"title": "", "text": "無題"},
        {"title": " ", "text": None},
    ])
    documents, report = load_documents(poems, columns=("title", "text"))
    assert documents["text"] == ["靜夜思\n床前明月光，\n疑是地上霜。", "無題"]
    assert (report.records, report.kept) == (3, 2)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="a folder without .txt files"):
        load_documents(tmp_path / "empty")
    with pytest.raises(DataError, match="no field 'body'"):
        load_documents(poems, columns=("body",))
    with pytest.raises(DataError, match="missing.txt: no such file"):
        load_documents(tmp_path / "missing.txt")


def test_without_a_validation_split_the_last_tenth_is_held_out(text_files, tmp_path):
    config = load_config(None, [*lm_overrides(text_files, tmp_path / "r"), "data.validation=null"])
    texts, stats = load_texts(config)
    whole = text_files["train"].read_text(encoding="utf-8")
    cut = int(len(whole) * 0.9)
    assert texts["train"]["text"] == [whole[:cut]] and texts["validation"]["text"] == [whole[cut:]]


def test_the_registry_names_the_language_model_datasets(monkeypatch):
    monkeypatch.delenv(sources.DATA_DIR_ENV, raising=False)
    shakespeare = sources.locate("tinyshakespeare")
    assert set(shakespeare) == {"train", "validation"}
    assert shakespeare["validation"].split == "validation+test"
    assert shakespeare["train"].path_or_name == "karpathy/tiny_shakespeare"
    assert sources.DATASETS["tang_poems"].is_text and not sources.DATASETS["multi30k"].is_text
    asked = []

    def load_dataset(name, *config, split):
        from datasets import Dataset

        asked.append((name, split))
        return Dataset.from_dict({"title": ["靜夜思"], "paragraphs": ["床前明月光"],
                                  "author": ["李白"]})

    monkeypatch.setattr("tformer.data.loading.hub_reachable", lambda *a, **k: True)
    monkeypatch.setattr("datasets.load_dataset", load_dataset)
    texts, _ = load_texts(load_config(None, [
        "data.task=lm", "data.dataset=tang_poems", "model.preset=gpt2"]))
    assert texts["test"]["text"] == ["靜夜思\n床前明月光"]
    assert asked == [("xmj2002/tang_poems", s) for s in ("train", "test[:50%]", "test[50%:]")]


# --- configuration ------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, message", [
    (["data.task=pretrain"], r"data\.task expects"),
    (["data.task=lm", "data.train=a.txt"], r"data\.task: lm trains a decoder-only model"),
    (["data.task=lm", "data.train=a.txt", "model.preset=gpt2", "data.block_size=0"],
     r"data\.block_size must be >= 1"),
    (["data.task=lm", "data.train=a.txt", "model.preset=gpt2", "model.max_positions=64",
      "data.block_size=128", "train.max_tokens=1280"],
     r"data\.block_size \(128\) exceeds .* model\.max_positions \(64\)"),
    (["data.task=lm", "data.train=a.txt", "model.preset=gpt2", "data.block_size=64",
      "train.max_tokens=1000"], r"train\.max_tokens \(1000\) must be a multiple of "
                                r"data\.block_size \(64\)"),
    (["data.task=lm", "model.preset=gpt2"], r"data\.task: lm needs text"),
    (["data.task=lm", "data.train=a.txt", "model.preset=gpt2", "data.bpe_dropout=0.1"],
     r"data\.bpe_dropout applies to data\.task: seq2seq"),
    (["model.preset=gpt2"], r"model\.n_encoder_layers: 0 is a decoder-only model"),
    (["data.dataset=tinyshakespeare"], r"tinyshakespeare is a lm dataset; set data\.task: lm"),
    (["data.task=lm", "data.dataset=multi30k", "model.preset=gpt2"],
     r"multi30k is a seq2seq dataset"),
    (["data.tokenizer_kind=words"], r"data\.tokenizer_kind expects"),
])
def test_language_model_settings_are_checked_naming_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_every_tokenizer_kind_and_the_lm_task_are_accepted():
    config = load_config(None, ["data.task=lm", "data.train=a.txt", "model.preset=gpt2",
                                "data.tokenizer_kind=bytelevel", "data.block_size=128",
                                "train.max_tokens=1536"])
    assert (config.data.task, config.data.block_size, config.data.text_column) == (
        "lm", 128, "text")


# --- training end to end -----------------------------------------------------------------


@pytest.fixture(scope="module")
def lm_run(text_files, tmp_path_factory) -> Path:
    """An uninterrupted tiny lm run (the reference of the resume test; a model for the rest),
    run as ``tformer train`` runs it."""
    out = tmp_path_factory.mktemp("lm") / "run"
    assert cli(["train", *lm_overrides(text_files, out)]) == 0
    return out


def test_tiny_language_model_trains_evaluates_and_reloads(lm_run, text_files, capsys):
    train_losses = [r["loss"] for r in records(lm_run, "train")]
    assert len(train_losses) == 12 and train_losses[-1] < train_losses[0] - 0.5
    validation = records(lm_run, "validation")
    assert [r["step"] for r in validation] == [4, 8, 12]
    assert validation[-1]["loss"] < validation[0]["loss"]
    for record in validation:
        assert record["perplexity"] == pytest.approx(math.exp(record["loss"]))
        assert [s["source"] for s in record["samples"]][0] == ""  # from the start of a document
    assert records(lm_run, "train")[0]["tokens_seen"] == 256  # 8 windows of 32 targets
    summary = json.loads((lm_run / "summary.json").read_text())
    assert summary["state"]["best_metric"] == min(r["loss"] for r in validation)
    stats = json.loads((lm_run / "data_stats.json").read_text())
    assert stats["blocks_per_batch"] == 8 and stats["tokens"]["validation"] == len(
        text_files["validation"].read_text(encoding="utf-8")) + 1  # + the end-of-text token

    checkpoint = Path(summary["last_checkpoint"])
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    assert tokenizer.model_max_length == 32 and not model.config.is_encoder_decoder
    prompt = tokenizer("A man", return_tensors="pt")
    assert prompt["input_ids"].shape[1] == 5  # characters only: no token added
    out = model.generate(**prompt, max_new_tokens=10, do_sample=False)
    assert out.shape[1] == 15

    # tformer evaluate: the validation file scores what the last validation did
    capsys.readouterr()
    assert cli(["evaluate", str(checkpoint), "--data", str(text_files["validation"])]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["loss"] == pytest.approx(validation[-1]["loss"], rel=1e-5)
    assert metrics["tokens"] == validation[-1]["tokens"] and metrics["block_size"] == 32


def test_generate_continues_a_prompt_past_the_context_and_streams(lm_run, capsys):
    checkpoint = Path(json.loads((lm_run / "summary.json").read_text())["last_checkpoint"])
    engine = tformer.load(checkpoint, device="cpu")
    pieces: list[str] = []
    torch.manual_seed(0)
    streamed = engine.generate("A man", max_new_tokens=100, do_sample=True, top_k=5,
                               on_text=pieces.append)
    assert "".join(pieces) == streamed and len(pieces) > 10  # 100 tokens past a 32 context
    torch.manual_seed(0)
    assert engine.generate("A man", max_new_tokens=100, do_sample=True, top_k=5) == streamed
    greedy = engine.generate(["A man", "", "A woman is"], max_new_tokens=12)
    alone = [engine.generate(p, max_new_tokens=12) for p in ("A man", "", "A woman is")]
    assert greedy == alone  # batched (left padding) equals one at a time
    capsys.readouterr()
    assert cli(["generate", str(checkpoint), "--prompt", "A man", "--stream",
                "--max-new-tokens", "30"]) == 0
    assert capsys.readouterr().out == "A man" + engine.generate("A man", max_new_tokens=30) + "\n"


def test_interrupted_then_resumed_equals_uninterrupted(lm_run, text_files, tmp_path):
    """Stopped at step 6 (its checkpoint) and resumed to 12: the same weights as the run that
    never stopped (the windows come from (seed, batch index), dropout from the saved RNG)."""
    out = tmp_path / "run"
    first = train(load_config(None, lm_overrides(text_files, out, **{
        "train.max_steps": 6, "train.eval_every": 6})))
    assert first.state.step == 6
    resumed = train(load_config(None, lm_overrides(text_files, out, **{"train.eval_every": 6})),
                    resume=True)
    assert resumed.state.step == 12 and resumed.state.batches_in_epoch == 12
    assert_same_weights(last_weights(out), last_weights(lm_run))


@pytest.mark.slow
def test_two_processes_read_different_windows_and_equal_gradient_accumulation(text_files,
                                                                            tmp_path):
    """DDP over 2 processes: the replicas stay equal, each takes every other batch of the one
    order (different windows), and without dropout the run equals one process accumulating the
    same two batches a step."""
    script = tmp_path / "worker.py"
    script.write_text(DDP_WORKER)
    common = {"train.max_steps": 6, "train.eval_every": 6, "model.dropout": 0.0}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", "29531", str(script), str(tmp_path),
         *lm_overrides(text_files, tmp_path / "ddp", **common)],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert_same_weights(*(torch.load(tmp_path / f"weights-{r}.pt") for r in (0, 1)))
    b0, b1 = (json.loads((tmp_path / f"batches-{r}.json").read_text()) for r in (0, 1))
    assert len(b0) == len(b1) == 6 and b0 != b1
    config = load_config(None, lm_overrides(text_files, tmp_path / "one", **common))
    tokens = len(text_files["train"].read_text(encoding="utf-8")) + 1  # characters and </s>
    split = LMTrainSplit(config, np.zeros(tokens, dtype=np.int32))
    assert b0 == [split.sampler.batch(i) for i in range(0, 12, 2)]
    assert b1 == [split.sampler.batch(i) for i in range(1, 12, 2)]
    train(load_config(None, lm_overrides(text_files, tmp_path / "one", **common,
                                         **{"train.grad_accum": 2})))
    # steps x lr bounds the attentions' key biases (tests/weights_check.py says why)
    assert_same_weights(last_weights(tmp_path / "ddp"), last_weights(tmp_path / "one"),
                        atol=1e-5, key_bias_atol=6 * 3e-3)


# --- the real data (TFORMER_DATA_DIR) ------------------------------------------------------


@needs_mirror("tinyshakespeare/train.txt", "tinyshakespeare/validation.txt")
def test_the_shakespeare_recipe_trains_on_the_mirror(tmp_path):
    config = load_config(ROOT / "recipes" / "shakespeare_char.yaml", [
        "train.max_steps=3", "train.eval_every=3", "train.max_new_tokens=8",
        f"train.output_dir={tmp_path / 'run'}"])
    texts, _ = load_texts(config)
    expected = {role: (MIRROR / "tinyshakespeare" / f"{role}.txt").read_text(encoding="utf-8")
                for role in ("train", "validation")}
    assert {role: texts[role]["text"] for role in expected} == {
        role: [text] for role, text in expected.items()}
    result = train(config)
    assert result.state.step == 3 and len(result.tokenizer) == 65 + len(SPECIAL_TOKENS)
    validation = records(tmp_path / "run", "validation")[0]
    assert validation["tokens"] == len(expected["validation"])  # every character, and </s>
    assert 3.0 < validation["loss"] < 6.0  # near ln 69 = 4.2 after 3 steps of the warm-up
