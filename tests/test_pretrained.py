"""Fine-tuning pretrained Hugging Face models through the same pipeline, with no network: a tiny
random T5 with a SentencePiece tokenizer and a tiny random BART with a byte-level BPE tokenizer
are built and saved here as local checkpoints, then trained, evaluated, generated from and
resumed through `tformer.training.train`; LoRA through `peft`; the offline failure of a Hub
name; `examples/t5_summarization.py`."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tformer
from tformer.data import Seq2SeqCollator
from tformer.evaluation import evaluate
from tformer.recipe import run_recipe
from tformer.training import load_config
from tformer.training.config import ConfigError

from .conftest import build_tiny_t5
from .synthetic import dialogues, tokenizer_corpus, write_jsonl

ROOT = Path(__file__).resolve().parents[1]


# --- fixtures: data, a tiny T5 and a tiny BART saved as local checkpoints ------------------


@pytest.fixture(scope="module")
def dialogs(tmp_path_factory) -> dict[str, Path]:
    """96 training and 16 validation synthetic dialogues (source = dialogue, target =
    summary; a DialogSum look-alike), plus a text file for the tokenizers."""
    root = tmp_path_factory.mktemp("dialogsum")
    records = dialogues(400)
    write_jsonl(root / "train.jsonl", records[:96])
    write_jsonl(root / "val.jsonl", records[96:112])
    return {"train": root / "train.jsonl", "validation": root / "val.jsonl",
            "corpus": tokenizer_corpus(root / "corpus.txt")}


@pytest.fixture(scope="module")
def t5_dir(dialogs, tmp_path_factory) -> Path:
    """A random 60k-parameter T5 and its SentencePiece tokenizer (``build_tiny_t5``)."""
    return build_tiny_t5(dialogs["corpus"], tmp_path_factory.mktemp("t5") / "tiny-t5")


@pytest.fixture(scope="module")
def bart_dir(dialogs, tmp_path_factory) -> Path:
    """A random tiny BART and a byte-level BPE tokenizer (ids as BART's: <s> 0, <pad> 1, </s> 2,
    <unk> 3, <mask> 4), saved as a Hugging Face directory."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import BartConfig, BartForConditionalGeneration, BartTokenizer

    root = tmp_path_factory.mktemp("bart")
    bpe = ByteLevelBPETokenizer()
    bpe.train(str(dialogs["corpus"]), vocab_size=500, min_frequency=2, show_progress=False,
              special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    bpe.save_model(str(root))  # vocab.json + merges.txt, as facebook/bart-base ships them
    # model_max_length = the position table, as facebook/bart-base's 1024
    tokenizer = BartTokenizer.from_pretrained(str(root), model_max_length=128)
    torch.manual_seed(0)
    config = BartConfig(
        vocab_size=len(tokenizer), d_model=32, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
        decoder_ffn_dim=64, max_position_embeddings=128, pad_token_id=1, bos_token_id=0,
        eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=2,
    )
    model_dir = root / "tiny-bart"
    BartForConditionalGeneration(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return model_dir


def overrides(dialogs, model_dir: Path, out: Path, **extra) -> list[str]:
    values = {
        "model.pretrained": model_dir, "data.train": dialogs["train"],
        "data.validation": dialogs["validation"], "data.max_source_length": 64,
        "data.max_target_length": 24, "train.max_steps": 8, "train.eval_every": 4,
        "train.log_every": 1, "train.max_tokens": 1024, "train.warmup_steps": 2,
        "train.lr": 3e-3, "train.max_new_tokens": 8, "train.eval_max_examples": 4,
        "train.output_dir": out, "train.keep_last": 5,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def run(dialogs, model_dir, out, resume=False, **extra):
    """A run as ``tformer train`` does it: train, then the LoRA merge and the test score."""
    return run_recipe(load_config(None, overrides(dialogs, model_dir, out, **extra)),
                      resume=resume)


def train_losses(run_dir: Path) -> list[float]:
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["split"] == "train"]


def last_weights(run_dir: Path, name: str = "model.safetensors") -> dict[str, torch.Tensor]:
    summary = json.loads((run_dir / "summary.json").read_text())
    return load_file(Path(summary["last_checkpoint"]) / name)


def assert_same_weights(a: dict, b: dict, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=k)


# --- labels, decoder inputs and special tokens as each model expects them ----------------


@pytest.mark.parametrize("kind", ["t5", "bart"])
def test_labels_and_decoder_inputs_follow_the_models_conventions(dialogs, t5_dir, bart_dir,
                                                                 tmp_path, kind):
    from tformer.training.setup import build_model, get_tokenizer, load_texts, tokenize_splits

    model_dir = t5_dir if kind == "t5" else bart_dir
    config = load_config(None, overrides(dialogs, model_dir, tmp_path, **{"data.prefix": "summarize: "}))
    texts, _ = load_texts(config)
    assert texts["train"][0]["source"].startswith("summarize: #Person1#")
    tokenizer = get_tokenizer(config, tmp_path, texts["train"])
    model = build_model(config, tokenizer)
    data = tokenize_splits(config, texts, tokenizer)
    ids, labels = data.tokens["train"]
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    # T5 appends </s>; BART wraps in <s> ... </s>; cut texts keep their final </s>
    assert all(x[-1] == eos for x in ids) and all(y[-1] == eos for y in labels)
    assert max(map(len, ids)) == 64 and max(map(len, labels)) <= 24
    if kind == "bart":
        assert all(y[0] == bos == 0 for y in labels)
    start = model.config.decoder_start_token_id
    assert start == (0 if kind == "t5" else 2)  # T5: <pad>; BART: </s>
    batch = Seq2SeqCollator(tokenizer.pad_token_id, start)(
        [{"input_ids": ids[i], "labels": labels[i]} for i in range(4)])
    assert (batch["decoder_input_ids"][:, 0] == start).all()
    # teacher forcing: inputs are each row's labels shifted right (its last label, </s>, is
    # never an input): compare where the next label is still part of the row
    kept = batch["labels"][:, 1:] != -100
    assert (batch["decoder_input_ids"][:, 1:][kept] == batch["labels"][:, :-1][kept]).all()


# --- full fine-tuning: train, evaluate, generate, resume ------------------------------------


@pytest.fixture(scope="module")
def t5_run(dialogs, t5_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("t5run") / "run"
    result = run(dialogs, t5_dir, out, **{"data.prefix": "summarize: "})
    return result


@pytest.fixture(scope="module")
def bart_run(dialogs, bart_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bartrun") / "run"
    return run(dialogs, bart_dir, out)


@pytest.mark.parametrize("kind", ["t5", "bart"])
def test_fine_tune_evaluate_and_generate(request, dialogs, kind):
    result = request.getfixturevalue(f"{kind}_run")
    assert result.stopped_by == "max_steps" and result.state.step == 8
    losses = train_losses(result.run_dir)
    assert len(losses) == 8 and sum(losses[-2:]) < sum(losses[:2])
    ckpt = result.last_checkpoint
    assert (ckpt / "config.json").is_file() and (ckpt / "tokenizer.json").is_file()
    generator = tformer.load(ckpt)
    assert generator.model.config.model_type == kind
    prefix = "summarize: " if kind == "t5" else ""
    out = generator.generate(prefix + "#Person1#: Hello, how are you?", max_new_tokens=6)
    assert isinstance(out, str)
    metrics = evaluate(generator, dialogs["validation"], prefix=prefix, max_new_tokens=6,
                       max_examples=4)
    assert metrics["examples"] == 4 and 0 <= metrics["rougeL"] <= 100


@pytest.mark.parametrize("kind", ["t5", "bart"])
def test_resumed_equals_uninterrupted(request, dialogs, tmp_path, kind):
    reference = request.getfixturevalue(f"{kind}_run")
    model_dir = request.getfixturevalue(f"{kind}_dir")
    extra = {"data.prefix": "summarize: "} if kind == "t5" else {}
    out = tmp_path / "run"
    first = run(dialogs, model_dir, out, **extra, **{"train.max_steps": 4})
    assert first.state.step == 4
    resumed = run(dialogs, model_dir, out, resume=True, **extra)
    assert resumed.state.step == 8
    assert_same_weights(last_weights(out), last_weights(reference.run_dir))


# --- LoRA -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_run(dialogs, t5_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("lorarun") / "run"
    return run(dialogs, t5_dir, out, **{"model.lora_r": 4, "train.lr": 1e-2,
                                        "train.max_steps": 6, "train.eval_every": 3})


def _base_names(peft_state: dict) -> dict[str, torch.Tensor]:
    """The base model's weights inside a PeftModel, under their plain names."""
    return {k.removeprefix("base_model.model.").replace(".base_layer", ""): v
            for k, v in peft_state.items() if "lora_" not in k}


def test_lora_trains_only_the_adapter_and_merges_to_a_plain_checkpoint(lora_run, t5_dir,
                                                                       dialogs, tmp_path):
    from transformers import AutoModelForSeq2SeqLM

    from tformer.loading import load_model

    original = load_file(t5_dir / "model.safetensors")
    peft_model = lora_run.model
    state = {k: v.detach().clone() for k, v in peft_model.state_dict().items()}
    base = _base_names(state)
    for name, tensor in original.items():  # every pretrained weight is unchanged
        torch.testing.assert_close(base[name], tensor, atol=0, rtol=0, msg=name)
    lora_b = [v for k, v in state.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # initialised to 0, trained
    assert {k.split(".")[-2] for k in state if "lora_" in k} == {"default"}
    targets = {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in state if "lora_A" in k}
    assert targets == {"q", "v"}

    ckpt = lora_run.last_checkpoint
    assert (ckpt / "adapter" / "adapter_model.safetensors").is_file()
    merged = AutoModelForSeq2SeqLM.from_pretrained(ckpt).eval()  # plain: no peft involved
    assert type(merged).__name__ == "T5ForConditionalGeneration"
    merged_weights = load_file(ckpt / "model.safetensors")
    changed = {k for k in original if not torch.equal(original[k], merged_weights[k])}
    assert changed and all(k.endswith(("SelfAttention.q.weight", "SelfAttention.v.weight",
                                       "EncDecAttention.q.weight", "EncDecAttention.v.weight"))
                           for k in changed)

    # the merged model computes what the adapter model computes
    peft_model.eval()
    torch.manual_seed(0)
    batch = {"input_ids": torch.randint(3, 400, (2, 9)),
             "decoder_input_ids": torch.randint(3, 400, (2, 5))}
    with torch.no_grad():
        expected = peft_model(**batch).logits
        torch.testing.assert_close(merged(**batch).logits, expected, atol=1e-5, rtol=0)
        # an adapter-only checkpoint (not merged yet) is merged on load
        unmerged = tmp_path / "unmerged"
        shutil.copytree(ckpt, unmerged)
        for name in ("config.json", "generation_config.json", "model.safetensors"):
            (unmerged / name).unlink()
        reloaded = load_model(unmerged).eval()
        torch.testing.assert_close(reloaded(**batch).logits, expected, atol=1e-5, rtol=0)
    # tformer.load gives the merged model's own greedy output (a plain HF generate() here)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    ids = merged.generate(**tokenizer(["summarize: Hello there."], return_tensors="pt"),
                          max_new_tokens=4, num_beams=1, do_sample=False)
    expected = tokenizer.decode(ids[0], skip_special_tokens=True)
    assert tformer.load(ckpt, device="cpu").generate("summarize: Hello there.",
                                                     max_new_tokens=4) == expected


def test_lora_resumed_equals_uninterrupted(lora_run, dialogs, t5_dir, tmp_path):
    out = tmp_path / "run"
    extra = {"model.lora_r": 4, "train.lr": 1e-2, "train.eval_every": 3}
    run(dialogs, t5_dir, out, **extra, **{"train.max_steps": 3})
    resumed = run(dialogs, t5_dir, out, resume=True, **extra, **{"train.max_steps": 6})
    assert resumed.state.step == 6
    name = "adapter/adapter_model.safetensors"
    assert_same_weights(last_weights(out, name), last_weights(lora_run.run_dir, name))


def test_lora_configuration_is_checked():
    with pytest.raises(ConfigError, match="model.lora_r needs model.pretrained"):
        load_config(None, ["model.lora_r=8"])
    with pytest.raises(ConfigError, match="model.d_model .*model.pretrained"):
        load_config(None, ["model.pretrained=some/model", "model.d_model=64"])
    config = load_config(None, ["model.pretrained=m", "model.lora_r=8",
                                "model.lora_target_modules=[q, k, v]"])
    assert config.model.lora_target_modules == ("q", "k", "v")
    with pytest.raises(ConfigError, match="lora_target_modules"):
        load_config(None, ["model.pretrained=m", "model.lora_target_modules=[1, 2]"])


def test_saved_config_with_lora_round_trips(tmp_path):
    config = load_config(None, ["model.pretrained=m", "model.lora_r=8",
                                "model.lora_target_modules=[q_proj, v_proj]",
                                "train.merge_lora=false"])
    config.save(tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config


def test_hub_dataset_configuration_reaches_datasets(monkeypatch):
    from datasets import Dataset

    from tformer.data import loading
    from tformer.training.setup import load_texts

    calls = []

    def fake_load_dataset(*args, split):
        calls.append((*args, split))
        return Dataset.from_dict({"article": ["An article.", "Another one."],
                                  "highlights": ["A summary.", "Another."]})

    monkeypatch.setattr(loading, "hub_reachable", lambda *a, **k: True)
    monkeypatch.setattr(loading.datasets, "load_dataset", fake_load_dataset)
    config = load_config(ROOT / "recipes" / "t5_small_cnn_dailymail.yaml")
    texts, _ = load_texts(config)
    assert calls == [("abisee/cnn_dailymail", "3.0.0", split)
                     for split in ("train", "validation", "test")]
    assert texts["train"][0] == {"source": "summarize: An article.", "target": "A summary."}


# --- precision and the offline Hub ---------------------------------------------------------


def test_fp16_is_never_chosen_for_t5_and_asking_for_it_warns(t5_dir, bart_dir, caplog, monkeypatch):
    from tformer.training import loop

    t5 = load_config(None, [f"model.pretrained={t5_dir}"])
    assert loop.resolve_precision("auto", t5) == "no"  # CPU
    with caplog.at_level("WARNING"):
        assert loop.resolve_precision("fp16", t5) == "fp16"
    assert "overflow" in caplog.text
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert loop.resolve_precision("auto", t5) == "no"
    assert loop.resolve_precision("auto", load_config(None, [f"model.pretrained={bart_dir}"])) == "fp16"


def test_uncached_hub_name_fails_at_once_with_a_one_line_message(dialogs, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env["HF_HOME"] = str(tmp_path / "hf-home")  # an empty cache
    # An unreachable Hub without leaving the machine: a closed port on loopback. The probe gets
    # "connection refused" at once, as it gets a DNS failure on a machine with no network.
    env["HF_ENDPOINT"] = "http://127.0.0.1:9"
    name = "tformer-tests/no-such-model-3f9c"
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "tformer.cli", "train", f"model.pretrained={name}",
         f"data.train={dialogs['train']}", f"data.validation={dialogs['validation']}",
         f"train.output_dir={tmp_path / 'run'}"],
        env=env, capture_output=True, text=True, timeout=120,
    )
    seconds = time.perf_counter() - start
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert name in errors[0] and "local directory" in errors[0]
    assert seconds < 30


def test_offline_mode_fails_without_touching_the_network(monkeypatch):
    import huggingface_hub.constants

    from tformer.tokenization import load_tokenizer

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr("tformer.hub.hub_reachable", lambda *a, **k: pytest.fail("probed"))
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE is set; pass a local directory"):
        load_tokenizer("tformer-tests/no-such-model-3f9c")
    with pytest.raises(FileNotFoundError, match="model directory ./nowhere does not exist"):
        tformer.load("./nowhere")
    assert time.perf_counter() - start < 5


# --- the tutorial, done right -----------------------------------------------------------------


def test_t5_summarization_example_runs(t5_dir, dialogs):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "t5_summarization.py"), "--model", str(t5_dir),
         "--data", str(dialogs["train"]), "--steps", "3", "--examples", "16", "--show", "2",
         "--batch-size", "4", "--max-source-length", "64", "--max-new-tokens", "8"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "step 3: loss" in proc.stdout and proc.stdout.count("model summary:") == 2
