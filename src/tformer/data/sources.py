"""The public datasets the recipes use: where each comes from, and the local mirror that serves it
offline.

A recipe names a dataset (``data.dataset: multi30k``) instead of files. The examples then come
from one of two places:

- a **local mirror**, when ``TFORMER_DATA_DIR`` is set: ``$TFORMER_DATA_DIR/<dataset>/<split>.jsonl``,
  one ``{"id", "source", "target"}`` object per line (`tformer data write` makes one);
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

from tformer.data.loading import DataError, load_examples

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
    rows: int
    sha256: str


@dataclass(frozen=True)
class DatasetSource:
    """A public dataset: its Hub id, configuration and columns, and its splits by role."""

    name: str  # also the mirror folder: $TFORMER_DATA_DIR/<name>/
    task: str
    hub_id: str
    hub_config: str | None
    source_column: str  # the Hub columns that become "source" and "target"
    target_column: str
    splits: Mapping[str, Split]  # role ("train", "validation", "test") -> split
    license: str
    note: str = ""  # how the reference mirror's splits relate to the Hub's

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
    source_column: str
    target_column: str

    @property
    def is_file(self) -> bool:
        return self.split is None


def locate(name: str, roles: tuple[str, ...] = ROLES) -> dict[str, Location]:
    """Where each role of dataset ``name`` is read: the mirror when ``TFORMER_DATA_DIR`` is set
    (every file must be there: a mirror that lacks one is an error naming it), else the Hub."""
    source = get_source(name)
    root = data_dir()
    if root is None:
        return {
            role: Location(source.hub_id, source.splits[role].hub_split, source.hub_config,
                           source.source_column, source.target_column)
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
    """Load every split of ``name`` from the Hub and write it to ``root/<name>/<file>`` as
    ``{"id", "source", "target"}`` JSON Lines (records with an empty side are skipped, as in
    training). Each file is written whole under a temporary name, then renamed, so an interrupted
    download never leaves a partial file. Returns the rows written per file."""
    source = get_source(name)
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    written: dict[str, int] = {}
    for role, split in source.splits.items():
        try:
            rows, _ = load_examples(source.hub_id, split=split.hub_split,
                                    hub_config=source.hub_config,
                                    source_column=source.source_column,
                                    target_column=source.target_column)
        except DataError as error:
            raise unavailable(name, error) from error
        target = folder / split.file
        partial = target.with_name(target.name + ".partial")
        with partial.open("w", encoding="utf-8") as out:
            for i, row in enumerate(rows):
                record = {"id": f"{name}-{role}-{i}", **row}
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
        partial.replace(target)
        written[str(target)] = len(rows)
        logger.info("%s: %d rows from %s [%s]", target, len(rows), source.hub_id, split.hub_split)
    return written


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
