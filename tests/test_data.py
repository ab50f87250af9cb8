"""The data layer: loading and its errors, tokenising, length-bucketed batches, collating, and
the embedded corpus."""

import ast
import csv
import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset

from tformer.data import (
    DataError,
    Seq2SeqCollator,
    TokenBudgetBatchSampler,
    corpus_fingerprint,
    docstring_corpus,
    first_sentence_baseline,
    load_examples,
    load_splits,
    loading,
    padding_fraction,
    sequence_lengths,
    tokenize_examples,
)
from tformer.data import corpus as corpus_module
from tformer.tokenization import train_tokenizer
from tformer.training import load_config
from tformer.training.setup import load_texts

from .conftest import MIRROR, needs_mirror

needs_multi30k = needs_mirror("multi30k/train.jsonl", "multi30k/val.jsonl")
ROWS = [
    {"id": "1", "source": "Ein Hund läuft.", "target": "A dog runs."},
    {"id": "2", "source": "中文", "target": "Chinese"},
]


def write(path: Path, rows: list[dict], fmt: str) -> Path:
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    elif fmt == "json":
        path.write_text(json.dumps(rows), "utf-8")
    elif fmt in ("csv", "tsv"):
        with path.open("w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, list(rows[0]), delimiter="," if fmt == "csv" else "\t")
            writer.writeheader()
            writer.writerows(rows)
    else:
        Dataset.from_list(rows).to_parquet(str(path))
    return path


# --- loading ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "tsv", "parquet"])
def test_loads_every_format(tmp_path, fmt):
    path = write(tmp_path / f"data.{fmt}", ROWS, fmt)
    dataset, report = load_examples(path)
    assert dataset.column_names == ["source", "target"]
    assert dataset.to_list() == [{"source": r["source"], "target": r["target"]} for r in ROWS]
    assert (report.records, report.kept, report.skipped) == (2, 2, 0)


def test_csv_quoted_fields_with_commas_and_newlines(tmp_path):
    rows = [{"source": 'a, "quoted"\ntwo lines', "target": "t1"}, {"source": "b", "target": "t2"}]
    dataset, _ = load_examples(write(tmp_path / "d.csv", rows, "csv"))
    assert dataset["source"] == [rows[0]["source"], "b"]


def test_column_mapping_prefix_and_max_examples(tmp_path):
    rows = [{"document": f"text {i}", "summary": f"sum {i}"} for i in range(5)]
    path = write(tmp_path / "d.jsonl", rows, "jsonl")
    dataset, report = load_examples(
        path, source_column="document", target_column="summary", prefix="summarize: ",
        max_examples=3,
    )
    assert dataset["source"] == ["summarize: text 0", "summarize: text 1", "summarize: text 2"]
    assert dataset["target"] == ["sum 0", "sum 1", "sum 2"]
    assert report.kept == 3


def test_empty_and_null_texts_are_skipped_and_counted(tmp_path, caplog):
    rows = [
        {"source": "ok", "target": "fine"},
        {"source": "", "target": "no source"},
        {"source": "no target", "target": None},
        {"source": "   ", "target": "\n"},
        {"source": "also ok", "target": "fine"},
    ]
    with caplog.at_level(logging.WARNING):
        dataset, report = load_examples(write(tmp_path / "d.jsonl", rows, "jsonl"))
    assert dataset["source"] == ["ok", "also ok"]
    assert (report.records, report.kept, report.skipped) == (5, 2, 3)
    assert (report.empty_source, report.empty_target) == (2, 2)
    assert "skipped 3" in caplog.text


def test_missing_file():
    with pytest.raises(DataError, match=r"nowhere/train\.jsonl: no such file"):
        load_examples("/tmp/nowhere/train.jsonl")


@pytest.mark.parametrize("fmt", ["csv", "tsv", "parquet"])
def test_missing_column_lists_the_columns(tmp_path, fmt):
    path = write(tmp_path / f"d.{fmt}", [{"src": "a", "tgt": "b"}], fmt)
    message = rf"d\.{fmt}: no column 'source'; the columns are: src, tgt"
    with pytest.raises(DataError, match=message):
        load_examples(path)


def test_missing_field_names_the_line(tmp_path):
    path = write(tmp_path / "d.jsonl", [ROWS[0], {"source": "a", "text": "b"}], "jsonl")
    message = r"d\.jsonl, line 2: no field 'target' \(fields: source, text\)"
    with pytest.raises(DataError, match=message):
        load_examples(path)


def test_invalid_json_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + '{"source": "a", "target": }\n', "utf-8")
    with pytest.raises(DataError, match=r"d\.jsonl, line 3: not valid JSON \(.* column 27\)"):
        load_examples(path)


def test_json_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + '["a", "b"]\n', "utf-8")
    with pytest.raises(DataError, match=r"line 2: expected a JSON object, got list"):
        load_examples(path)


@pytest.mark.parametrize("suffix", ["jsonl", "csv"])
def test_non_utf8_bytes_name_line_and_offset(tmp_path, suffix):
    path = tmp_path / f"d.{suffix}"
    first = b"source,target\n" if suffix == "csv" else b'{"source": "a", "target": "b"}\n'
    second = b"caf\xe9,coffee\n" if suffix == "csv" else b'{"source": "caf\xe9", "target": "c"}\n'
    path.write_bytes(first + second)
    offset = second.index(b"\xe9")
    with pytest.raises(
        DataError,
        match=rf"d\.{suffix}, line 2: not UTF-8: byte 0xe9 at byte {offset} of the line "
        rf"\(byte {len(first) + offset} of the file\)",
    ):
        load_examples(path)


@pytest.mark.parametrize(
    ("value", "shown"), [(42, "int 42"), (["a", "b"], r"list \['a', 'b'\]"), (True, "bool True")]
)
def test_text_that_is_not_a_string(tmp_path, value, shown):
    rows = [ROWS[0], ROWS[1], {"source": "a", "target": value}]
    with pytest.raises(
        DataError, match=rf"d\.jsonl, line 3, field 'target': expected a string, got {shown}"
    ):
        load_examples(write(tmp_path / "d.jsonl", rows, "jsonl"))


def test_parquet_non_string_column_names_the_row(tmp_path):
    rows = [{"source": "a", "target": 1}, {"source": "b", "target": 2}]
    path = write(tmp_path / "d.parquet", rows, "parquet")
    with pytest.raises(DataError, match=r"row 1, field 'target': expected a string, got int 1"):
        load_examples(path)


def test_csv_row_with_wrong_field_count(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("source,target\na,b\nc,d,e\n", "utf-8")
    with pytest.raises(DataError, match=r"d\.csv, line 3: 3 fields, but the header has 2"):
        load_examples(path)


def test_no_usable_examples(tmp_path):
    rows = [{"source": "", "target": "x"}, {"source": "y", "target": None}]
    with pytest.raises(DataError, match=r"d\.jsonl: no usable examples .*kept 0 of 2"):
        load_examples(write(tmp_path / "d.jsonl", rows, "jsonl"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", "utf-8")
    with pytest.raises(DataError, match="no usable examples"):
        load_examples(empty)


def test_directory_and_unsupported_suffix(tmp_path):
    write(tmp_path / "train.jsonl", ROWS, "jsonl")
    with pytest.raises(DataError, match=r"is a directory; .*found: train\.jsonl"):
        load_examples(tmp_path)
    (tmp_path / "notes.txt").write_text("x", "utf-8")
    with pytest.raises(DataError, match=r"notes\.txt: unsupported file type '\.txt'"):
        load_examples(tmp_path / "notes.txt")


def test_hub_failure_is_one_clear_line(monkeypatch):
    def offline(name, split):
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub (LocalEntryNotFoundError)\n...")

    monkeypatch.setattr(loading, "hub_reachable", lambda *a, **k: True)  # the Hub answers...
    monkeypatch.setattr(loading.datasets, "load_dataset", offline)  # ...but not for this name
    with pytest.raises(DataError) as caught:
        load_examples("someone/summaries", split="validation")
    message = str(caught.value)
    assert "\n" not in message
    assert "'someone/summaries' is not a local file" in message
    assert "split 'validation'" in message and "ConnectionError: Couldn't reach" in message


def test_an_unreachable_hub_is_one_quick_error_without_retries(monkeypatch):
    def load_dataset(*args, **kwargs):  # `datasets` would retry with back-off for 24 s
        raise AssertionError("load_dataset called although the probe failed")

    monkeypatch.setattr(loading, "hub_reachable", lambda *a, **k: False)
    monkeypatch.setattr(loading.datasets, "load_dataset", load_dataset)
    with pytest.raises(DataError, match=r"'someone/summaries' is not a local file and the "
                       r"Hugging Face Hub cannot be reached \(split 'test'\); set HF_HUB_OFFLINE"):
        load_examples("someone/summaries", split="test")


def test_hub_dataset_goes_through_the_same_checks(monkeypatch):
    hub = Dataset.from_dict({"document": ["d1", "", "d3"], "summary": ["s1", "s2", "s3"]})
    monkeypatch.setattr(loading, "hub_reachable", lambda *a, **k: True)
    monkeypatch.setattr(loading.datasets, "load_dataset", lambda name, split: hub)
    dataset, report = load_examples("org/name", source_column="document", target_column="summary")
    assert dataset["source"] == ["d1", "d3"] and report.empty_source == 1
    with pytest.raises(DataError, match=r"org/name \[train\]: no column 'source'"):
        load_examples("org/name")


@needs_multi30k
def test_loads_a_slice_of_multi30k():
    multi30k = MIRROR / "multi30k"
    dataset, report = load_examples(multi30k / "train.jsonl", max_examples=200)
    assert len(dataset) == 200 and report.kept == 200
    assert dataset[0]["source"].startswith("Two young, White males")
    splits, reports = load_splits(
        {"train": multi30k / "train.jsonl", "validation": multi30k / "val.jsonl"},
        max_examples=50,
    )
    assert {name: len(split) for name, split in splits.items()} == {"train": 50, "validation": 50}
    assert set(reports) == {"train", "validation"}


# --- tokenising ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    texts = [f"{word} number {i} with some text" for i in range(200) for word in ("a", "b")]
    return train_tokenizer(texts, vocab_size=400, kind="bpe")


def test_tokenize_truncates_keeps_eos_and_counts(tokenizer):
    dataset = Dataset.from_dict(
        {"source": ["short", "a much longer source sentence " * 5],
         "target": ["a long long long target text here", "ok"]}
    )
    encoded, report = tokenize_examples(dataset, tokenizer, max_source_length=8,
                                        max_target_length=6)
    assert encoded.column_names == ["input_ids", "labels"]
    assert (report.examples, report.truncated_sources, report.truncated_targets) == (2, 1, 1)
    eos = tokenizer.eos_token_id
    for row in encoded:
        assert row["input_ids"][-1] == eos and row["labels"][-1] == eos
        assert len(row["input_ids"]) <= 8 and len(row["labels"]) <= 6
        assert eos not in row["input_ids"][:-1]
    full = tokenizer(dataset[0]["source"])["input_ids"]
    assert encoded[0]["input_ids"] == full  # untouched when it fits
    long = tokenizer(dataset[1]["source"])["input_ids"]
    assert encoded[1]["input_ids"] == long[:7] + [eos]
    assert sequence_lengths(encoded, "labels") == [6, len(tokenizer("ok")["input_ids"])]
    assert sequence_lengths(encoded.select([1, 0]), "input_ids") == [8, len(full)]


# --- batching --------------------------------------------------------------------------------


def lengths(count=3000, seed=0):
    rng = np.random.default_rng(seed)
    source = rng.integers(3, 120, count)
    target = np.clip(source + rng.integers(-10, 10, count), 2, None)
    return source.tolist(), target.tolist()


def cost(batch, source, target):
    return len(batch) * max(max(source[i], target[i]) for i in batch)


def test_every_index_once_and_every_batch_within_budget():
    source, target = lengths()
    sampler = TokenBudgetBatchSampler(source, target, max_tokens=1000, seed=1)
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        assert sorted(i for b in batches for i in b) == list(range(len(source)))
        assert all(cost(b, source, target) <= 1000 for b in batches)


def test_order_depends_on_seed_and_epoch_only():
    source, target = lengths()
    a = TokenBudgetBatchSampler(source, target, max_tokens=1000, seed=1)
    b = TokenBudgetBatchSampler(source, target, max_tokens=1000, seed=1)
    c = TokenBudgetBatchSampler(source, target, max_tokens=1000, seed=2)
    assert list(a) == list(b)
    assert list(a) != list(c)
    epoch0 = list(a)
    a.set_epoch(1)
    assert list(a) != epoch0
    assert list(a) == b.batches(1)


def test_length_grouping_pads_far_less_than_random_batches():
    source, target = lengths()
    batches = TokenBudgetBatchSampler(source, target, max_tokens=2000, seed=0).batches()
    sizes = [len(b) for b in batches]
    shuffled = np.random.default_rng(0).permutation(len(source)).tolist()
    random_batches = [shuffled[sum(sizes[:k]):sum(sizes[: k + 1])] for k in range(len(sizes))]
    grouped = padding_fraction(batches, source, target)
    random = padding_fraction(random_batches, source, target)
    assert grouped < 0.5 * random, (grouped, random)
    assert grouped < 0.1


def test_resume_yields_exactly_the_remaining_batches_without_touching_skipped_data():
    source, target = lengths(500)
    sampler = TokenBudgetBatchSampler(source, target, max_tokens=800, seed=3)
    sampler.set_epoch(2)
    full = sampler.batches()
    iterator = iter(sampler)
    consumed = [next(iterator) for _ in range(5)]
    assert consumed == full[:5]
    state = sampler.state_dict()
    assert state == {"epoch": 2, "batches_consumed": 5}

    resumed = TokenBudgetBatchSampler(source, target, max_tokens=800, seed=3)
    resumed.load_state_dict(state)
    touched: list[int] = []

    class Recording(torch.utils.data.Dataset):
        def __len__(self):
            return len(source)

        def __getitem__(self, index):
            touched.append(index)
            return index

    loader = torch.utils.data.DataLoader(Recording(), batch_sampler=resumed, collate_fn=list)
    assert list(loader) == full[5:]
    assert sorted(touched) == sorted(i for b in full[5:] for i in b)
    assert list(resumed) == full  # the next pass starts the epoch again


def test_shards_across_processes_with_accelerate():
    from accelerate.data_loader import BatchSamplerShard

    source, target = lengths(500)
    sampler = TokenBudgetBatchSampler(source, target, max_tokens=800, seed=0)
    shards = [list(BatchSamplerShard(sampler, 2, rank, even_batches=False)) for rank in (0, 1)]
    assert shards[0] + shards[1] != [] and shards[0][0] != shards[1][0]
    assert sorted(shards[0] + shards[1]) == sorted(sampler.batches())


def test_overlong_example_forms_its_own_batch(caplog):
    source, target = [5, 6, 500, 7], [5, 6, 8, 700]
    with caplog.at_level(logging.WARNING):
        sampler = TokenBudgetBatchSampler(source, target, max_tokens=100, seed=0)
    assert "2 examples are longer than max_tokens=100" in caplog.text
    batches = list(sampler)
    assert [2] in batches and [3] in batches
    assert sorted(i for b in batches for i in b) == [0, 1, 2, 3]


def test_max_batch_size_and_unshuffled_order():
    source, target = lengths(300)
    sampler = TokenBudgetBatchSampler(source, target, max_tokens=10**6, seed=0, shuffle=False,
                                      max_batch_size=16)
    batches = list(sampler)
    assert all(len(b) <= 16 for b in batches) and len(batches) == -(-300 // 16)
    longest = [max(max(source[i], target[i]) for i in b) for b in batches]
    assert longest == sorted(longest)
    sampler.set_epoch(5)
    assert list(sampler) == batches


def test_rejects_bad_state():
    sampler = TokenBudgetBatchSampler([3, 4], [3, 4], max_tokens=100, seed=0)
    with pytest.raises(ValueError, match="batches_consumed=5"):
        sampler.load_state_dict({"epoch": 0, "batches_consumed": 5})
    with pytest.raises(ValueError, match="source lengths"):
        TokenBudgetBatchSampler([3], [3, 4], max_tokens=100, seed=0)


# --- collating -------------------------------------------------------------------------------


FEATURES = [
    {"input_ids": [5, 6, 7, 3], "labels": [8, 9, 3]},
    {"input_ids": [5, 3], "labels": [10, 11, 12, 13, 3]},
]


def test_collator_pads_masks_and_shifts():
    batch = Seq2SeqCollator(pad_token_id=0, decoder_start_token_id=2)(FEATURES)
    assert {k: tuple(v.shape) for k, v in batch.items()} == {
        "input_ids": (2, 4), "attention_mask": (2, 4), "labels": (2, 5),
        "decoder_input_ids": (2, 5),
    }
    assert all(v.dtype == torch.long for v in batch.values())
    assert batch["input_ids"].tolist() == [[5, 6, 7, 3], [5, 3, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[8, 9, 3, -100, -100], [10, 11, 12, 13, 3]]
    assert batch["decoder_input_ids"].tolist() == [[2, 8, 9, 0, 0], [2, 10, 11, 12, 13]]


def test_collator_matches_hugging_face(tokenizer):
    """Padding as DataCollatorForSeq2Seq; decoder inputs as BART's shift_tokens_right."""
    from transformers import DataCollatorForSeq2Seq
    from transformers.models.bart.modeling_bart import shift_tokens_right

    ours = Seq2SeqCollator(tokenizer.pad_token_id, decoder_start_token_id=2)(FEATURES)
    theirs = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)(
        [dict(f) for f in FEATURES]
    )
    for key in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(ours[key], theirs[key]), key
    reference = shift_tokens_right(theirs["labels"], tokenizer.pad_token_id, 2)
    kept = ours["labels"] != -100  # positions after the labels end are never scored
    assert torch.equal(ours["decoder_input_ids"][kept], reference[kept])


def test_collator_pad_to_multiple_and_generation_batches():
    collate = Seq2SeqCollator(pad_token_id=0, decoder_start_token_id=2, pad_to_multiple_of=8)
    batch = collate([dict(f, extra="ignored") for f in FEATURES])
    assert batch["input_ids"].shape == (2, 8) and batch["labels"].shape == (2, 8)
    only_inputs = collate([{"input_ids": torch.tensor([4, 3])}])
    assert set(only_inputs) == {"input_ids", "attention_mask"}


def test_dataloader_end_to_end(tokenizer):
    dataset = Dataset.from_dict({"source": [f"a number {i}" for i in range(40)],
                                 "target": [f"b {i}" for i in range(40)]})
    encoded, _ = tokenize_examples(dataset, tokenizer, 16, 16)
    sampler = TokenBudgetBatchSampler(sequence_lengths(encoded, "input_ids"),
                                      sequence_lengths(encoded, "labels"), max_tokens=64, seed=0)
    loader = torch.utils.data.DataLoader(encoded, batch_sampler=sampler,
                                         collate_fn=Seq2SeqCollator(0, 2))
    batches = list(loader)
    assert sum(len(b["input_ids"]) for b in batches) == 40
    assert all(b["input_ids"].numel() <= 64 for b in batches)


# --- the embedded corpus ---------------------------------------------------------------------
# A site-packages directory of our own: the corpus logic without parsing the whole environment.

TOOL = '''
def helper(x, y=1):
    """Add two numbers together carefully.

    Both arguments are converted to floats first.
    """


def helper_again(a, b=2):
    """Add two numbers in a different way.

    Both arguments are converted to floats first.
    """


class Widget(Base, metaclass=Meta):
    """A widget that holds parts.

    Parts are kept in insertion order.
    """

    async def fetch(self, key: str) -> bytes:
        """Fetch one part by its key.
        The key must exist, or KeyError is raised.
        """
'''
SOLO = '''
def solo_helper(x, y=1):
    """Multiply two numbers in the solo module.

    Both arguments are converted to floats first.
    """


def solo_unique(x):
    """Divide a number by itself safely.

    Zero gives zero.
    """
'''
SKIPPED = '''
def hidden_{n}(q):
    """This docstring must never be read.

    It lives in a file the corpus leaves out.
    """
'''


def fake_site_packages(root: Path, functions: int = 400) -> Path:
    """``functions`` examples in a package (each summary shared by 4 of them), one module at
    the top level, and files the corpus must leave out."""
    site = root / "site-packages"
    package = site / "fancylib"
    for directory in ("sub", "tests", "_vendor", "../fancylib-1.0.dist-info"):
        (package / directory).mkdir(parents=True)
    (package / "__init__.py").write_text(TOOL)
    many = [
        f'def compute_{i}(value, scale={i}):\n'
        f'    """Return entry {i % (functions // 4)} of the lookup table.\n\n'
        f'    The table is indexed from zero; entry {i} scales by {i}.\n    """\n'
        for i in range(functions)
    ]
    (package / "sub" / "many.py").write_text("\n\n".join(many))
    (site / "solo.py").write_text(SOLO)
    skipped = {
        package / "tests" / "helpers.py": 0,
        package / "_vendor" / "six.py": 1,
        package / "sub" / "test_many.py": 2,
        package / "sub" / "conftest.py": 3,
        package / "sub" / "messages_pb2.py": 4,
        site / "fancylib-1.0.dist-info" / "meta.py": 5,
    }
    for path, n in skipped.items():
        path.write_text(SKIPPED.format(n=n))
    (package / "generated.py").write_text(
        "# This file was automatically generated from spec.yaml. Do NOT edit it.\n"
        + SKIPPED.format(n=6))
    (package / "broken.py").write_text("def broken(:\n    pass\n")  # does not parse
    (package / "py2.py").write_text('print "hello"\n')
    return site


@pytest.fixture
def site(tmp_path):
    return fake_site_packages(tmp_path)


def _rows(corpus) -> list[dict]:
    return [row for split in corpus.values() for row in split]


def test_corpus_reads_every_package_and_skips_tests_vendored_and_generated_code(site):
    rows = _rows(docstring_corpus(roots=[site]))
    sources = "\n".join(row["source"] for row in rows)
    # parameters without annotations or defaults (the return annotation is kept)
    assert "def compute_0(value, scale)\n" in sources and "def solo_unique(x)" in sources
    assert "hidden_" not in sources and "broken" not in sources
    widget = [row for row in rows if row["source"].startswith("class Widget")]
    assert widget == [{"source": "class Widget(Base, metaclass=Meta)\n"
                                 "Parts are kept in insertion order.",
                       "target": "A widget that holds parts."}]
    fetch = [row for row in rows if row["source"].startswith("async def fetch")]
    assert fetch[0]["source"] == ("async def fetch(self, key) -> bytes\n"
                                  "The key must exist, or KeyError is raised.")
    assert fetch[0]["target"] == "Fetch one part by its key."
    pattern = re.compile(r"(async def|def|class) \w+")
    assert all(pattern.match(row["source"]) and "\n" in row["source"] for row in rows)
    assert all("\n" not in row["target"] and len(row["target"].split()) >= 3 for row in rows)


def test_corpus_signatures_keep_parameter_names_and_the_return_annotation():
    source = "def f(a: int = 1, /, b: str = 'x', *args: int, c: float = 2.0, d, **kw: dict) -> bool:"
    node = ast.parse(source + "\n    pass").body[0]
    assert corpus_module._signature(node) == "def f(a, /, b, *args, c, d, **kw) -> bool"
    node = ast.parse("async def g(*, key=None):\n    pass").body[0]
    assert corpus_module._signature(node) == "async def g(*, key)"


def test_corpus_roots_are_the_stdlib_and_site_packages():
    """The default corpus reads the running interpreter's site-packages (here: torch), not
    only the standard library; listing the files is cheap, so it is checked on the real
    environment (parsing it all is not: a minute)."""
    roots = corpus_module.installed_roots()
    assert roots[0] == Path(corpus_module.sysconfig.get_paths()["stdlib"]).resolve()
    assert Path(torch.__file__).resolve().parents[1] in roots
    files = [path for path, _, _ in corpus_module._source_files(roots)]
    torch_files = [path for path in files if "torch" in path.parts]
    assert any(path.name == "functional.py" and path.parent.name == "nn" for path in torch_files)
    assert not any("testing" in path.parts or "tests" in path.parts for path in files)
    assert any(path.name == "textwrap.py" for path in files)  # the standard library too
    assert all(path.stat().st_size <= corpus_module.MAX_FILE_BYTES for path in files)


def test_corpus_is_deduplicated(site):
    rows = _rows(docstring_corpus(roots=[site]))
    sources = [row["source"] for row in rows]
    assert len(sources) == len(set(sources))
    # helper, helper_again and solo_helper share a body: only the first in file order (the
    # package's files, then solo.py) is kept
    bodies = [source.partition("\n")[2] for source in sources]
    assert bodies.count("Both arguments are converted to floats first.") == 1
    assert any(source.startswith("def helper(x, y)\n") for source in sources)
    assert len(rows) == 400 + 4  # compute_*, helper, Widget, fetch, solo_unique


def test_corpus_split_is_fixed_seeded_and_shares_no_summary(site):
    corpus = docstring_corpus(roots=[site], seed=0)
    sizes = {name: len(split) for name, split in corpus.items()}
    assert list(sizes) == ["train", "validation", "test"]
    assert sizes["train"] > 0.85 * sum(sizes.values()) and min(sizes.values()) > 0
    targets = [set(split["target"]) for split in corpus.values()]
    sources = [set(split["source"]) for split in corpus.values()]
    for a in range(3):
        for b in range(a + 1, 3):
            assert not targets[a] & targets[b] and not sources[a] & sources[b]
    # each "Return entry k" summary has 4 examples, all in one split
    test_entries = [t for t in corpus["test"]["target"] if t.startswith("Return entry")]
    assert test_entries and all(corpus["test"]["target"].count(t) == 4 for t in test_entries)
    again = docstring_corpus(roots=[site], seed=0)
    assert all(again[name].to_dict() == corpus[name].to_dict() for name in corpus)
    other = docstring_corpus(roots=[site], seed=1)
    assert other["test"]["target"] != corpus["test"]["target"]
    small = docstring_corpus(roots=[site], seed=0, max_examples=100)
    assert sum(len(split) for split in small.values()) == 100


def test_corpus_fingerprint_and_cache(site, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    corpus = docstring_corpus(roots=[site], cache_dir=cache)
    digest = corpus_fingerprint(corpus)
    assert re.fullmatch(r"[0-9a-f]{64}", digest)
    assert list(cache.glob("docstrings-*.json.gz"))
    # a second process reads every file's examples from the cache: nothing is parsed
    corpus_module._docstrings_of.cache_clear()
    parsed = []
    monkeypatch.setattr(corpus_module, "_file_docstrings", parsed.append)
    assert corpus_fingerprint(docstring_corpus(roots=[site], cache_dir=cache)) == digest
    assert parsed == []
    monkeypatch.undo()
    # a changed file is parsed again, and the corpus and its fingerprint change with it
    with (site / "solo.py").open("a") as fh:
        fh.write('\n\ndef added(z):\n    """A function added later on.\n\n    New body.\n    """\n')
    corpus_module._docstrings_of.cache_clear()
    changed = docstring_corpus(roots=[site], cache_dir=cache)
    assert sum(map(len, changed.values())) == sum(map(len, corpus.values())) + 1
    assert corpus_fingerprint(changed) != digest
    assert corpus_fingerprint(docstring_corpus(roots=[site])) == corpus_fingerprint(changed)


def test_run_stats_record_the_corpus_size_and_hash(site, tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_module, "installed_roots", lambda: (site,))
    monkeypatch.setenv("TFORMER_CACHE_DIR", str(tmp_path / "cache"))
    texts, stats = load_texts(load_config(None, []))
    expected = docstring_corpus(roots=[site])
    assert stats["corpus_examples"] == sum(map(len, expected.values())) == 404
    assert stats["corpus_sha256"] == corpus_fingerprint(expected)
    assert f"404 examples, sha256 {stats['corpus_sha256'][:16]}" in stats["corpus"]
    assert texts["test"]["target"] == expected["test"]["target"]


def test_first_sentence_baseline():
    source = "def f(x)\nCompute things. Then more.\nSecond line.\n\nOther paragraph."
    assert first_sentence_baseline(source) == "Compute things."
    assert first_sentence_baseline("def g()\nNo full stop here\n\nLater.") == "No full stop here"
    assert first_sentence_baseline("def h()") == ""
