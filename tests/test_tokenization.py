"""Tokenizers: byte-fallback round trips, fixed special ids, save/reload through AutoTokenizer."""


import pytest
from transformers import AutoTokenizer

from tformer.tokenization import (
    BYTE_TOKENS,
    SPECIAL_TOKENS,
    load_tokenizer,
    save_tokenizer,
    train_tokenizer,
)

from .synthetic import captions

# Text that NFKC leaves unchanged (asserted below), none of it in the training data.
ROUND_TRIP = [
    "中文的句子、机器翻译。",
    "Viele Grüße aus der Straße",
    "emoji 🙂👍🏽 and 🦜",
    "def f(x):\n    return x**2  # {}[]",
    "  leading, trailing and  double spaces  ",
    "\ttabs\tand\n\nblank lines\n",
    "a literal <0x41> is not a byte token",
    "",
]


def _training_texts() -> list[str]:
    """Both sides of 2,000 synthetic English -> German captions and of 1,000 examples of the
    embedded docstring corpus, standard library only (code, punctuation, mixed case)."""
    from tformer.data import docstring_corpus, installed_roots

    pairs = captions(2000)
    # the standard library only: seconds, where the whole environment takes a minute
    train = docstring_corpus(roots=installed_roots()[:1], max_examples=1000)["train"]
    return [r[k] for r in pairs for k in ("source", "target")] + list(train["source"]) + list(
        train["target"])


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return _training_texts()


@pytest.fixture(scope="module", params=["unigram", "bpe"])
def tokenizer(request, texts):
    return train_tokenizer(texts, vocab_size=2000, kind=request.param)


def test_test_strings_are_unseen_and_nfkc_stable(texts):
    import unicodedata

    corpus = "\n".join(texts)
    for text in ROUND_TRIP:
        assert unicodedata.normalize("NFKC", text) == text
        if text:
            assert text not in corpus
    assert "🙂" not in corpus and "🦜" not in corpus  # so byte fallback is exercised


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip_without_unknown_tokens(tokenizer, text):
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.unk_token_id not in ids
    assert ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_unseen_characters_fall_back_to_bytes(tokenizer):
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("🦜")["input_ids"])
    assert [t for t in tokens if t.startswith("<0x")] == ["<0xF0>", "<0x9F>", "<0xA6>", "<0x9C>"]


def test_special_and_byte_tokens_have_fixed_ids(tokenizer):
    assert [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert (tokenizer.pad_token_id, tokenizer.unk_token_id) == (0, 1)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (2, 3)
    assert tokenizer.convert_tokens_to_ids(list(BYTE_TOKENS)) == list(range(4, 260))
    assert tokenizer.padding_side == "right"
    assert len(tokenizer) <= 2000


def test_padding_and_batch_encoding(tokenizer):
    batch = tokenizer(["a", "a longer sentence"], padding=True)
    short, long = batch["input_ids"]
    assert len(short) == len(long) and short[-1] == tokenizer.pad_token_id
    assert batch["attention_mask"][0][-1] == 0


def test_nfkc_is_applied(tokenizer):
    # Documented behaviour: compatibility forms (here full-width letters) are folded.
    ids = tokenizer("ＡＢＣ")["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "ABC"


def test_save_and_reload_with_auto_tokenizer(tokenizer, tmp_path):
    save_tokenizer(tokenizer, tmp_path)
    for reloaded in (AutoTokenizer.from_pretrained(tmp_path), load_tokenizer(tmp_path)):
        assert reloaded.is_fast
        assert (reloaded.pad_token_id, reloaded.bos_token_id, reloaded.eos_token_id) == (0, 2, 3)
        for text in ROUND_TRIP:
            ids = reloaded(text)["input_ids"]
            assert ids == tokenizer(text)["input_ids"]
            assert reloaded.decode(ids, skip_special_tokens=True) == text


def test_load_tokenizer_reports_a_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "nowhere")


def test_rejects_bad_arguments(texts):
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(texts[:10], vocab_size=100)
    with pytest.raises(ValueError, match="kind"):
        train_tokenizer(texts[:10], kind="wordpiece")
