"""The public datasets the recipes use: where each comes from, and the local mirror that serves it
offline.

A recipe names a dataset (``data.dataset: multi30k``) instead of files. The examples then come
from one of two places:

- a **local mirror**, when ``TFORMER_DATA_DIR`` is set: ``$TFORMER_DATA_DIR/<dataset>/<split>.jsonl``,
  one ``{"id", "source", "target"}`` object per line (`tformer data write` makes one); for the
  raw text of a language model (``data.task: lm``), a ``.txt`` file per split or JSONL records
  holding the text columns;
- otherwise the **Hugging Face Hub**: the dataset id, configuration, split and columns recorded
  here, loaded through `datasets` (network, or its cache).

`verify_mirror` checks a mirror against the row counts and sha256 checksums of the reference
mirror on which tformer's published figures were measured (``docs/results.md``). The reference
mirror was built from each dataset's upstream release; where its splits differ from the Hub's,
``note`` says how, and a mirror written from the Hub will not verify (its figures are then not
comparable with the published ones).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from tformer.data.loading import TEXT_SUFFIX, DataError, load_examples, read_hub

logger = logging.getLogger(__name__)

#: The environment variable naming the local mirror directory.
DATA_DIR_ENV = "TFORMER_DATA_DIR"
#: The roles a recipe's splits play, in order.
ROLES = ("train", "validation", "test")


@dataclass(frozen=True)
class Split:
    """One split: its file in the mirror, the Hub split it is loaded from (the `datasets` split
    syntax, slices included), and the reference mirror's row count and sha256."""

    file: str  # e.g. "val.jsonl", relative to the dataset's mirror folder
    hub_split: str  # e.g. "validation" or "test[:50%]"
    rows: int  # records; non-blank lines of a .txt file
    sha256: str


@dataclass(frozen=True)
class DatasetSource:
    """A public dataset: its Hub id, configuration and columns, and its splits by role.

    A text-to-text dataset names the Hub columns that become ``source`` and ``target``; a
    language model's (raw text: `is_text`) the columns whose texts, joined by a newline, make
    one document, on the Hub and in the mirror (a ``.txt`` mirror file is one document)."""

    name: str  # also the mirror folder: $TFORMER_DATA_DIR/<name>/
    task: str
    hub_id: str
    hub_config: str | None
    source_column: str | None  # the Hub columns that become "source" and "target"
    target_column: str | None
    splits: Mapping[str, Split]  # role ("train", "validation", "test") -> split
    license: str
    note: str = ""  # how the reference mirror's splits relate to the Hub's
    text_columns: tuple[str, ...] = ()  # raw text: the Hub columns of a document
    mirror_text_columns: tuple[str, ...] = ()  # raw text: the same columns in a JSONL mirror

    @property
    def is_text(self) -> bool:
        """Raw text for a language model (``data.task: lm``), not {source, target} pairs."""
        return bool(self.text_columns)

    def mirror_files(self, root: Path) -> dict[str, Path]:
        """The mirror file of every role under ``root``."""
        return {role: root / self.name / split.file for role, split in self.splits.items()}


DATASETS: dict[str, DatasetSource] = {
    source.name: source
    for source in (
        DatasetSource(
            name="multi30k", task="translation en -> de (image captions)",
            hub_id="bentrevett/multi30k", hub_config=None, source_column="en", target_column="de",
            splits={
                "train": Split("train.jsonl", "train", 29000,
                               "c4197ca678ea392aea888f4f5a209e4b37a6a52329750f0c36228a5338ec0baf"),
                "validation": Split("val.jsonl", "validation", 1014,
                                    "b6fc16f2bfbe1363f7949fc157eaf0d1c56b1fe88c9c6c1af5302dab7f78a8ac"),
                "test": Split("test2016.jsonl", "test", 1000,
                              "11e87a971d2f9e8fe5b159be01b41a62fd6e1b3e1736e8154a931a9ec4cfac19"),
            },
            license="non-commercial research and education (Flickr30K terms)",
            note="the official task-1 splits train, val and test_2016_flickr, as on the Hub",
        ),
        DatasetSource(
            name="dialogsum", task="dialogue summarization (en)",
            hub_id="knkarthick/dialogsum", hub_config=None,
            source_column="dialogue", target_column="summary",
            splits={
                "train": Split("train.jsonl", "train", 11960,
                               "83a336cd836aefac64e5f6ca49fa442ebecac8a6f678558678bd5425b5ea7eda"),
                "validation": Split("validation.jsonl", "validation", 500,
                                    "63c5aab12b59e316fa894fdc120e61973e4ad1645500345992f6425f3f88a0e1"),
                "test": Split("test.jsonl", "test", 500,
                              "fcbc1640b362710e0607b4cde3d001e8d3c0f5e6e0182bc9b63cedf4b66b3763"),
            },
            license="CC BY-NC-SA 4.0",
            note="reference test = 500 dialogues sampled from the official train split (the "
                 "official test split, 3 references each, left out); the Hub's test is the "
                 "official one",
        ),
        DatasetSource(
            name="aeslc", task="email -> subject line (en)",
            hub_id="Yale-LILY/aeslc", hub_config=None,
            source_column="email_body", target_column="subject_line",
            splits={
                "train": Split("train.jsonl", "train", 13436,
                               "37d9fe2592ba569aec59fbfb4a6531d18a70a28825a8efda33a508c4cb8c5455"),
                "validation": Split("validation.jsonl", "validation", 1751,
                                    "b7e957520d2e176f63ae840c082b399e7f85b50363754cb8691d8fb4fb30233d"),
                "test": Split("test.jsonl", "test", 1000,
                              "e3e33f8f3939ac815663f22da84f8267494862899c49466429f12814088010c9"),
            },
            license="CC BY-NC-SA 4.0",
            note="reference test = 1,000 emails sampled from the official train split, validation "
                 "= the official dev split less 209 bodies that also occur in the official test",
        ),
        DatasetSource(
            name="tatoeba_cmn_eng", task="translation en -> zh (short sentences)",
            hub_id="Helsinki-NLP/tatoeba_mt", hub_config="eng-zho",
            source_column="sourceString", target_column="targetString",
            splits={
                "train": Split("train.jsonl", "validation", 25155,
                               "206816c5ad9a6a690d106fb70909f6f8246feef705be0b97ef27ae90cebfaaa6"),
                "validation": Split("validation.jsonl", "test[:50%]", 1000,
                                    "401ba21488608da027cbba38f1221252f1d120dd1ad196d93efd4b886ca686f5"),
                "test": Split("test.jsonl", "test[50%:]", 1000,
                              "7c954bbdfa345773d226e6cd7297b53adfab30921a77907c9cf8dbdde2777695"),
            },
            license="CC-BY 2.0 FR",
            note="the reference mirror is manythings.org's cmn-eng release split 25,155 / 1,000 / "
                 "1,000 by English sentence; the Hub's Tatoeba MT benchmark has only dev and test "
                 "splits, so there it trains on dev and halves test",
        ),
        DatasetSource(
            name="csl_title", task="abstract -> title (zh)",
            hub_id="neuclir/csl", hub_config=None, source_column="abstract", target_column="title",
            splits={
                "train": Split("train.jsonl", "csl[200:]", 800,
                               "7235cdc3e70b582035a9eade1e626b74143e9cd008f7cc2b63fc7baa949ebaad"),
                "validation": Split("validation.jsonl", "csl[:100]", 100,
                                    "fe8dcb595c880c87ae40808c1e0ce7c15c623223c1b22cd11ce2854b8b3380c9"),
                "test": Split("test.jsonl", "csl[100:200]", 100,
                              "53bb5580c7f461d2756617ad86b7999838691697276391677fabb7d7ece53a72"),
            },
            license="Apache-2.0",
            note="the reference mirror re-splits CSL's 1,000-example title-generation dev set "
                 "800 / 100 / 100; the Hub holds the whole corpus (396k papers)",
        ),
        DatasetSource(
            name="tinyshakespeare", task="character-level language modelling (en)",
            hub_id="karpathy/tiny_shakespeare", hub_config=None,
            source_column=None, target_column=None, text_columns=("text",),
            splits={
                "train": Split("train.txt", "train", 29242,
                               "a9e24e23a1ec77744dad26844bfd5a09b6e041954e1eef0000e7f24cba6db735"),
                "validation": Split("validation.txt", "validation+test", 3536,
                                    "c54f3753a4e6e3c3d1759212815a7caf826e68a33021b25312984400bed40a1f"),
            },
            license="public domain (Shakespeare's text)",
            note="the reference mirror is karpathy/char-rnn's input.txt split as nanoGPT's "
                 "shakespeare_char: the first 90% of the characters to train, the last 10% to "
                 "validation. The Hub's copy cuts the same train split and halves the rest "
                 "into validation and test, read here as one (a mirror written from it joins "
                 "the two, which should give the same file; not checked, no network here); "
                 "the Hub id is a loading script, which recent `datasets` may refuse",
        ),
        DatasetSource(
            name="tang_poems", task="character-level language modelling (zh, Tang poems)",
            hub_id="xmj2002/tang_poems", hub_config=None,
            source_column=None, target_column=None,
            text_columns=("title", "paragraphs"), mirror_text_columns=("title", "text"),
            splits={
                "train": Split("train.jsonl", "train", 55571,
                               "1ac28764c9407953f5f751c9eded71b81506ac8fa67116da105f82c33cb3a4a9"),
                "validation": Split("validation.jsonl", "test[:50%]", 534,
                                    "8904698905d585faf85d1cfc713f66c9b0171304f478dd3069e31e6824b43c10"),
                "test": Split("test.jsonl", "test[50%:]", 546,
                              "bd2047d95e29313e1bea1ed335b26ca846715c3f83aea95fd29b0a5da12a3753"),
            },
            license="MIT (the chinese-poetry collection); the poems are in the public domain",
            note="a document is a poem's title, a newline, then its lines (one per line). The "
                 "reference mirror is chinese-poetry/chinese-poetry's 全唐诗 (57,603 poems, exact "
                 "duplicates dropped), split by a hash of the poem id 98 / 1 / 1; it is not on "
                 "the Hub. The Hub id is another, smaller Tang collection (41,274 poems, train and "
                 "test only, test halved here): its figures are not comparable",
        ),
    )
}


def get_source(name: str) -> DatasetSource:
    """The dataset called ``name``; an error listing the known names otherwise."""
    try:
        return DATASETS[name]
    except KeyError:
        raise DataError(
            f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)} (tformer data list)"
        ) from None


def data_dir() -> Path | None:
    """The mirror directory named by ``TFORMER_DATA_DIR``, or None when it is unset or empty."""
    value = os.environ.get(DATA_DIR_ENV, "").strip()
    return Path(value).expanduser() if value else None


@dataclass(frozen=True)
class Location:
    """Where one split of a dataset is read: a mirror file, or a Hub split with its columns."""

    path_or_name: str
    split: str | None  # the Hub split; None for a file
    hub_config: str | None
    source_column: str | None
    target_column: str | None
    text_columns: tuple[str, ...] = ()  # raw text: the columns of a document

    @property
    def is_file(self) -> bool:
        return self.split is None


def locate(name: str, roles: tuple[str, ...] | None = None) -> dict[str, Location]:
    """Where each role of dataset ``name`` (default: every split it has) is read: the mirror
    when ``TFORMER_DATA_DIR`` is set (every file must be there: a mirror that lacks one is an
    error naming it), else the Hub."""
    source = get_source(name)
    roles = tuple(source.splits) if roles is None else roles
    root = data_dir()
    if root is None:
        return {
            role: Location(source.hub_id, source.splits[role].hub_split, source.hub_config,
                           source.source_column, source.target_column, source.text_columns)
            for role in roles
        }
    files = source.mirror_files(root)
    missing = [str(files[role]) for role in roles if not files[role].is_file()]
    if missing:
        raise DataError(
            f"dataset {name!r}: {DATA_DIR_ENV}={root} but the mirror has no "
            f"{', '.join(missing)}; write it with `tformer data write {name}` (needs a network), "
            f"or unset {DATA_DIR_ENV} to load {source.hub_id} from the Hugging Face Hub"
        )
    if source.is_text:
        columns = source.mirror_text_columns or ("text",)
        return {role: Location(str(files[role]), None, None, None, None, columns) for role in roles}
    return {role: Location(str(files[role]), None, None, "source", "target") for role in roles}


def unavailable(name: str, error: Exception) -> DataError:
    """The error for a dataset neither mirrored nor reachable on the Hub: it names both ways and
    the exact files a mirror must hold."""
    source = get_source(name)
    expected = ", ".join(f"<dir>/{name}/{s.file}" for s in source.splits.values())
    return DataError(
        f"dataset {name!r} could not be loaded from the Hugging Face Hub ({source.hub_id}): "
        f"{error}\nEither connect to the network (the Hub or its local cache), or set "
        f"{DATA_DIR_ENV}=<dir> to a mirror holding {expected} "
        f"(`tformer data write {name} --to <dir>` makes one where there is a network)"
    )


# --- the mirror: write and verify --------------------------------------------------------------


def write_mirror(name: str, root: Path) -> dict[str, int]:
    """Load every split of ``name`` from the Hub and write it to ``root/<name>/<file>``: JSON
    Lines of ``{"id", "source", "target"}`` (records with an empty side are skipped, as in
    training), or for raw text ``{"id", <mirror text columns>}``, or a ``.txt`` file holding
    the split's texts one after the other. Each file is written whole under a temporary name,
    then renamed, so an interrupted download never leaves a partial file. Returns the rows
    written per file."""
    source = get_source(name)
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    written: dict[str, int] = {}
    for role, split in source.splits.items():
        try:
            records = _hub_records(source, split)
        except DataError as error:
            raise unavailable(name, error) from error
        target = folder / split.file
        partial = target.with_name(target.name + ".partial")
        with partial.open("w", encoding="utf-8") as out:
            if target.suffix == TEXT_SUFFIX:  # one document: the split's texts in order
                out.write("".join(record["text"] for record in records))
            else:
                for i, record in enumerate(records):
                    out.write(json.dumps({"id": f"{name}-{role}-{i}", **record},
                                         ensure_ascii=False) + "\n")
        partial.replace(target)
        written[str(target)] = len(records)
        logger.info("%s: %d rows from %s [%s]", target, len(records), source.hub_id,
                    split.hub_split)
    return written


def _hub_records(source: DatasetSource, split: Split) -> list[dict[str, str]]:
    """A split's records from the Hub, with the mirror's column names: source and target, or
    the text columns."""
    if not source.is_text:
        rows, _ = load_examples(source.hub_id, split=split.hub_split, hub_config=source.hub_config,
                                source_column=source.source_column,
                                target_column=source.target_column)
        return rows.to_list()
    names = source.mirror_text_columns or ("text",)
    return [{new: record[old] for old, new in zip(source.text_columns, names)}
            for _, record in read_hub(source.hub_id, split.hub_split, source.text_columns,
                                      source.hub_config)]


@dataclass(frozen=True)
class FileCheck:
    """One mirror file against the reference: ``status`` is "ok", "missing", "rows" (count
    differs) or "checksum" (same count, other bytes)."""

    path: Path
    status: str
    rows: int | None
    expected_rows: int

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def __str__(self) -> str:
        if self.status == "ok":
            return f"ok        {self.path} ({self.rows} rows)"
        if self.status == "missing":
            return f"MISSING   {self.path}"
        if self.status == "rows":
            return f"ROWS      {self.path}: {self.rows} rows, the reference has {self.expected_rows}"
        return f"CHECKSUM  {self.path}: {self.rows} rows as the reference, but other bytes"


def verify_mirror(root: Path, names: list[str] | None = None) -> Iterator[FileCheck]:
    """Check each file of each dataset (all by default) under ``root`` against the reference
    mirror's row count (non-blank lines) and sha256."""
    for name in names or list(DATASETS):
        source = get_source(name)
        for role, path in source.mirror_files(root).items():
            split = source.splits[role]
            if not path.is_file():
                yield FileCheck(path, "missing", None, split.rows)
                continue
            digest = hashlib.sha256()
            rows = 0
            with path.open("rb") as data:
                for line in data:
                    digest.update(line)
                    rows += bool(line.strip())
            status = ("ok" if digest.hexdigest() == split.sha256
                      else "rows" if rows != split.rows else "checksum")
            yield FileCheck(path, status, rows, split.rows)
