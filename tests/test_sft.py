"""Instruction tuning (``data.task: sft``): the loss on responses only, packed examples kept
apart, the chat template saved with the tokenizer, and the loop end to end, from scratch and
from a language model's checkpoint."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import tformer  # noqa: F401  (registers the own models with the Auto classes)
from tformer.cli import main as cli
from tformer.data.sft import (
    DEFAULT_CHAT_TEMPLATE,
    PackedCollator,
    chat_prompts,
    encode_dialogues,
    pack_rows,
    set_chat_template,
)
from tformer.evaluation import causal_lm_loss
from tformer.hf import TformerConfig, TformerForCausalLM
from tformer.model import IGNORE_INDEX, config_for
from tformer.tokenization import train_tokenizer
from tformer.training import ConfigError, load_config, train

from .synthetic import dialogues, write_jsonl

PAIRS = [("Where is Anna going?", "To the market."), ("Hi", "Hello there, friend."),
         ("Say yes.", "Yes.")]


@pytest.fixture(scope="module")
def tokenizer():
    texts = [t for pair in PAIRS for t in pair] + ["User: Assistant: System:\n"]
    tok = train_tokenizer(texts, kind="char", append_eos=False)
    set_chat_template(tok, None)
    return tok


def tiny_model(vocab_size: int, preset: str = "gpt2") -> TformerForCausalLM:
    torch.manual_seed(0)
    core = config_for("tiny", vocab_size, preset, pad_token_id=0, dropout=0.0,
                      max_positions=128)
    return TformerForCausalLM(TformerConfig.from_transformer_config(core)).eval()


def test_prompt_positions_get_no_gradient_and_the_response_is_plain_cross_entropy(tokenizer):
    model = tiny_model(len(tokenizer))
    encoded = encode_dialogues(tokenizer, [PAIRS[0][0]], [PAIRS[0][1]], block_size=128)
    batch = PackedCollator(0)([{"input_ids": encoded.inputs, "labels": encoded.labels}])
    logits = model(input_ids=batch["input_ids"], document_ids=batch["document_ids"]).logits
    logits.retain_grad()
    labels = batch["labels"][0]
    scored = labels != IGNORE_INDEX
    # the response: "To the market." and the end token, all scored; the rest none
    answer = tokenizer(PAIRS[0][1], add_special_tokens=False)["input_ids"]
    assert labels[scored].tolist() == answer + [tokenizer.eos_token_id]
    prompt = chat_prompts(tokenizer, [PAIRS[0][0]])[0]
    assert int((~scored).sum()) == len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) - 1

    # by hand: the mean over response positions of -log p(next token)
    log_p = logits[0].double().log_softmax(-1)
    expected = -log_p[scored].gather(1, labels[scored, None]).mean()
    torch.nn.Module.zero_grad(model)
    logits = model(input_ids=batch["input_ids"], document_ids=batch["document_ids"]).logits
    logits.retain_grad()
    loss = F.cross_entropy(logits[0], labels, ignore_index=IGNORE_INDEX)
    loss.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert causal_lm_loss(model, batch).item() == pytest.approx(loss.item(), rel=1e-6)
    grad = logits.grad[0]
    assert torch.all(grad[~scored] == 0) and torch.all(grad[scored].abs().sum(-1) > 0)
    # and the Hugging Face way (labels = the ids, -100 on the prompt, shifted in the model)
    ids = encoded.inputs[0] + [encoded.labels[0][-1]]
    hf_labels = torch.tensor([[IGNORE_INDEX] + encoded.labels[0]])
    hf_labels[0, : int((~scored).sum()) + 1] = IGNORE_INDEX
    out = model(input_ids=torch.tensor([ids]), labels=hf_labels)
    assert out.loss.item() == pytest.approx(loss.item(), rel=1e-5)


@pytest.mark.parametrize("preset", ["gpt2", "llama"])
def test_packed_examples_do_not_attend_to_each_other(tokenizer, preset):
    model = tiny_model(len(tokenizer), preset)
    encoded = encode_dialogues(tokenizer, *zip(*PAIRS), block_size=128)
    features = [{"input_ids": encoded.inputs, "labels": encoded.labels}]
    packed = PackedCollator(0)(features)
    assert packed["input_ids"].shape[1] == sum(len(x) for x in encoded.inputs)
    with torch.no_grad():
        together = model(input_ids=packed["input_ids"],
                         document_ids=packed["document_ids"]).logits[0]
        start = 0
        for x in encoded.inputs:
            alone = model(input_ids=torch.tensor([x])).logits[0]
            torch.testing.assert_close(together[start : start + len(x)], alone,
                                       atol=1e-5, rtol=1e-5)
            start += len(x)


def test_rows_hold_every_example_once_within_the_block():
    lengths = [5, 9, 3, 7, 2, 8, 10, 1]
    rows = pack_rows(lengths, 10, range(len(lengths)))
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 10 for row in rows)
    assert len(rows) == 5  # first fit: [5, 3, 2], [9, 1], [7], [8], [10]


def test_long_examples_keep_the_end_of_the_prompt_and_the_response(tokenizer):
    encoded = encode_dialogues(tokenizer, ["Where is Anna going? " * 5], ["Yes."], block_size=24)
    assert encoded.truncated == 1 and len(encoded.inputs[0]) == 24
    assert tokenizer.decode(encoded.inputs[0]).endswith("going? \nAssistant: Yes.")


def test_the_chat_template_round_trips_with_the_tokenizer(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded.chat_template == DEFAULT_CHAT_TEMPLATE
    messages = [{"role": "user", "content": "Hi"}]
    text = reloaded.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<s>User: Hi\nAssistant: "
    ids = reloaded.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                       return_dict=False)
    assert ids == reloaded(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == reloaded.bos_token_id
    whole = messages + [{"role": "assistant", "content": "Hello"}]
    assert reloaded.apply_chat_template(whole, tokenize=False) == text + "Hello</s>"
    custom = "{% for m in messages %}{{ m['content'] }}|{% endfor %}"
    set_chat_template(reloaded, custom)
    assert reloaded.chat_template == custom


@pytest.mark.parametrize("overrides, message", [
    (["data.task=sft"], r"data\.task: sft trains a decoder-only model"),
    (["data.task=lm", "data.train=a.txt", "model.preset=gpt2", "data.chat_template=x"],
     r"data\.chat_template applies to data\.task: sft"),
    (["data.task=sft", "model.preset=gpt2", "data.block_size=100"],
     r"train\.max_tokens \(4096\) must be a multiple of data\.block_size"),
])
def test_sft_settings_are_checked_naming_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


# --- training end to end -----------------------------------------------------------------


@pytest.fixture(scope="module")
def dialogue_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dialogues")
    records = dialogues(220)
    return {"train": write_jsonl(root / "train.jsonl", records[:200]),
            "validation": write_jsonl(root / "validation.jsonl", records[200:])}


def sft_overrides(files: dict[str, Path], out: Path, **extra) -> list[str]:
    """A tiny GPT (2 layers, d_model 32), BPE of 1000 tokens, blocks of 256, 2 a batch."""
    values = {
        "data.task": "sft", "data.train": files["train"], "data.validation": files["validation"],
        "data.vocab_size": 1000, "data.block_size": 256, "model.preset": "gpt2",
        "model.size": "tiny", "model.max_positions": 256, "train.max_tokens": 512,
        "train.max_steps": 16, "train.eval_every": 8, "train.log_every": 1,
        "train.warmup_steps": 2, "train.lr": 3e-3, "train.label_smoothing": 0.0,
        "train.max_new_tokens": 24, "train.eval_max_examples": 4, "train.output_dir": out,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def records(run: Path, split: str) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def last_checkpoint(run: Path) -> Path:
    return Path(json.loads((run / "summary.json").read_text())["last_checkpoint"])


@pytest.fixture(scope="module")
def sft_run(dialogue_files, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sft") / "run"
    assert cli(["train", *sft_overrides(dialogue_files, out)]) == 0
    return out


def test_tiny_sft_run_trains_validates_reloads_and_answers(sft_run, capsys):
    losses = [r["loss"] for r in records(sft_run, "train")]
    assert len(losses) == 16 and losses[-1] < losses[0] - 0.5
    validation = records(sft_run, "validation")
    assert [r["step"] for r in validation] == [8, 16]
    assert validation[-1]["loss"] < validation[0]["loss"]
    for record in validation:
        assert "rougeL" in record and record["perplexity"] > 1
        assert record["samples"][0]["source"].startswith("#Person1#")
    stats = json.loads((sft_run / "data_stats.json").read_text())
    assert stats["rows_per_batch"] == 2 and stats["examples_per_row"] > 1

    checkpoint = last_checkpoint(sft_run)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    assert tokenizer.chat_template == DEFAULT_CHAT_TEMPLATE
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    assert not model.config.is_encoder_decoder
    capsys.readouterr()
    prompt = dialogues(1, seed=7)[0]["source"]
    assert cli(["generate", str(checkpoint), "--chat", "--prompt", prompt,
                "--max-new-tokens", "24"]) == 0
    answer = capsys.readouterr().out.strip()
    engine = tformer.load(checkpoint, device="cpu")
    expected = engine.generate(chat_prompts(engine.tokenizer, [prompt])[0], max_new_tokens=24)
    assert answer and answer == expected.replace("\n", " ").strip()


def test_interrupted_then_resumed_equals_uninterrupted(sft_run, dialogue_files, tmp_path):
    """Stopped at step 8 and resumed to 16: the weights of the run that never stopped (the
    rows are packed in an order drawn from (seed, epoch))."""
    out = tmp_path / "run"
    first = train(load_config(None, sft_overrides(dialogue_files, out, **{
        "train.max_steps": 8})))
    assert first.state.step == 8
    resumed = train(load_config(None, sft_overrides(dialogue_files, out)), resume=True)
    assert resumed.state.step == 16
    a, b = (load_file(last_checkpoint(run) / "model.safetensors") for run in (out, sft_run))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0, msg=key)


def test_sft_starts_from_a_language_models_checkpoint(dialogue_files, sft_run, tmp_path):
    text = tmp_path / "text.txt"
    lines = [r["source"] + "\n" + r["target"] + "\n"
             for r in map(json.loads, dialogue_files["train"].read_text().splitlines())]
    text.write_text("".join(lines), encoding="utf-8")
    lm = tmp_path / "lm"
    assert cli(["train", "data.task=lm", f"data.train={text}", "data.vocab_size=1000",
                "data.block_size=128", "model.preset=gpt2", "model.size=tiny",
                "model.max_positions=256", "train.max_tokens=512", "train.max_steps=24",
                "train.eval_every=24", "train.warmup_steps=2", "train.lr=3e-3",
                "train.max_new_tokens=8", f"train.output_dir={lm}"]) == 0
    lm_checkpoint = last_checkpoint(lm)
    out = tmp_path / "sft"
    assert cli(["train", *sft_overrides(dialogue_files, out, **{
        "model.preset": None, "model.size": "small", "model.max_positions": None,
        "model.pretrained": lm_checkpoint, "train.max_steps": 2, "train.eval_every": 2})]) == 0
    tokenizer = AutoTokenizer.from_pretrained(last_checkpoint(out))
    assert tokenizer.get_vocab() == AutoTokenizer.from_pretrained(lm_checkpoint).get_vocab()
    assert tokenizer.chat_template == DEFAULT_CHAT_TEMPLATE
    # the language model knows the text: its first sft step starts far below a fresh model's
    first = records(out, "train")[0]["loss"]
    assert first < records(sft_run, "train")[0]["loss"] - 1.0
