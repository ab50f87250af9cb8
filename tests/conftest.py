"""Shared test fixtures: data the tests write themselves, one tiny trained model, and the
optional mirror of real datasets (``TFORMER_DATA_DIR``) for the tests that need one."""

import os
from pathlib import Path

import pytest

from .synthetic import captions, write_jsonl

#: A local mirror of the recipes' datasets (`tformer data`), or None: the tests that need real
#: data run only when it is set, and skip with the reason otherwise.
MIRROR = Path(os.environ["TFORMER_DATA_DIR"]) if os.environ.get("TFORMER_DATA_DIR") else None


def needs_mirror(*files: str):
    """Mark a test ``mirror`` (`make test-data` runs those) and skip it unless the mirror holds
    every one of ``files`` (``"multi30k/train.jsonl"``)."""
    missing = [f for f in files if MIRROR is None or not (MIRROR / f).is_file()]
    reason = ("needs TFORMER_DATA_DIR (a mirror of real datasets, see `tformer data`)"
              if MIRROR is None else f"the mirror {MIRROR} has no {', '.join(missing)}")

    def mark(test):
        return pytest.mark.mirror(pytest.mark.skipif(bool(missing), reason=reason)(test))

    return mark


def tiny_overrides(data_files: dict[str, Path], out: Path, **extra) -> list[str]:
    """A tiny model trained for 12 steps on 300 synthetic caption pairs: seconds on a CPU."""
    values = {
        "data.train": data_files["train"], "data.validation": data_files["validation"],
        "data.vocab_size": 400, "model.size": "tiny", "model.dropout": 0.1,
        "train.max_steps": 12, "train.eval_every": 4, "train.log_every": 1,
        "train.max_tokens": 600, "train.warmup_steps": 4, "train.lr": 3e-3,
        "train.max_new_tokens": 8, "train.eval_max_examples": 8, "train.output_dir": out,
        "train.keep_last": 5,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def padded_batch(vocab: int, lengths: list[int]):
    """Seeded random source ids (ids 4..vocab-1) and their mask, one row per length, padded
    with 0 to the longest: (ids * mask, mask), both (len(lengths), max(lengths))."""
    import torch

    torch.manual_seed(1)
    ids = torch.randint(4, vocab, (len(lengths), max(lengths)))
    mask = torch.ones_like(ids)
    for row, length in enumerate(lengths):
        mask[row, length:] = 0
    return ids * mask, mask


@pytest.fixture(scope="session")
def data_files(tmp_path_factory) -> dict[str, Path]:
    """300 training and 40 validation pairs of the synthetic English -> German captions."""
    root = tmp_path_factory.mktemp("data")
    records = captions(340)
    return {"train": write_jsonl(root / "train.jsonl", records[:300]),
            "validation": write_jsonl(root / "val.jsonl", records[300:])}


@pytest.fixture(scope="session")
def reference_run(data_files, tmp_path_factory) -> Path:
    """An uninterrupted tiny run (the reference for resume tests; a model for the rest), run
    as ``tformer train`` runs it: with the loss plot and the report."""
    from tformer.recipe import run_recipe
    from tformer.training import load_config

    out = tmp_path_factory.mktemp("reference") / "run"
    result = run_recipe(load_config(None, tiny_overrides(data_files, out)))
    assert result.stopped_by == "max_steps" and result.state.step == 12
    return out


def save_scaled(model, tokenizer, directory: Path, scale: float = 1.5) -> Path:
    """Save a random own ``model`` with every weight × ``scale``, and ``tokenizer``, in
    ``directory``: at the init scale every output is one token repeated, a comparison of
    engines that proves little."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def build_tiny_t5(corpus: Path, out: Path, scale: float = 1.0) -> Path:
    """A random T5 (d_model 32, 2+2 layers, about 60k parameters) with a SentencePiece unigram
    tokenizer trained on ``corpus`` (ids as T5's: <pad> 0, </s> 1, <unk> 2), saved as a Hugging
    Face directory ``out``. ``scale`` multiplies every weight but the relative attention bias,
    so that outputs vary from input to input."""
    import sentencepiece
    import torch
    from transformers import T5Config, T5ForConditionalGeneration, T5Tokenizer

    spm = out.with_name(out.name + "-spm")
    spm.mkdir(parents=True)
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(spm / "spiece"), vocab_size=500,
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, num_threads=1,
        minloglevel=2,
    )
    # transformers converts spiece.model to a `tokenizers` Unigram (as for google-t5/t5-small)
    tokenizer = T5Tokenizer.from_pretrained(str(spm), extra_ids=0)
    torch.manual_seed(0)
    config = T5Config(vocab_size=len(tokenizer), d_model=32, d_ff=64, num_layers=2, num_heads=4,
                      d_kv=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    model = T5ForConditionalGeneration(config)
    if scale != 1.0:
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "relative_attention_bias" not in name:
                    parameter.mul_(scale)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
