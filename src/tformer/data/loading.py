"""Load text-to-text examples ({source, target} strings), or documents of raw text (a language
model's data, `load_documents`), from local files or the Hub.

Local JSON Lines, CSV and TSV files are parsed here, line by line, rather than by `datasets`:
that way every error names the file, the line and the field, and nothing is cached under
``~/.cache``. The examples are then held in an in-memory `datasets.Dataset` (the files tformer
uses are tens of MB at most). Parquet files and Hub datasets are read through pyarrow and
`datasets`, and located by row instead of line.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import pyarrow.parquet as pq  # a dependency of `datasets`
from datasets import Dataset, DatasetDict, Features, Value
from huggingface_hub import is_offline_mode

from tformer.hub import hub_reachable, looks_like_path

logger = logging.getLogger(__name__)

#: The only columns of a loaded dataset.
FEATURES = Features({"source": Value("string"), "target": Value("string")})
#: The only column of loaded documents.
TEXT_FEATURES = Features({"text": Value("string")})
TEXT_SUFFIX = ".txt"
_FORMATS = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet"}


class DataError(ValueError):
    """Input data that cannot be used; the message names the file, the line and the field."""


@dataclass(frozen=True)
class LoadReport:
    """What loading kept and skipped.

    ``records`` counts the records read (blank lines excluded); ``empty_source`` and
    ``empty_target`` count records whose text was missing, null or only whitespace (a record
    empty on both sides counts in both). Loading stops early once ``max_examples`` are kept.
    """

    origin: str
    records: int
    kept: int
    empty_source: int
    empty_target: int

    @property
    def skipped(self) -> int:
        """Records dropped because their source or target text was empty."""
        return self.records - self.kept

    def __str__(self) -> str:
        return (
            f"{self.origin}: kept {self.kept} of {self.records} records; skipped {self.skipped} "
            f"(empty source {self.empty_source}, empty target {self.empty_target})"
        )


# A record as read: where it is ("line 7", "row 3") and its fields.
_Located = tuple[str, Mapping[str, Any]]


def load_examples(
    path_or_name: str | os.PathLike[str],
    *,
    split: str | None = None,
    source_column: str = "source",
    target_column: str = "target",
    prefix: str = "",
    max_examples: int | None = None,
    hub_config: str | None = None,
) -> tuple[Dataset, LoadReport]:
    """Load examples as a dataset with exactly the string columns ``source`` and ``target``.

    Args:
        path_or_name: a ``.jsonl``, ``.json`` (JSON Lines or one JSON array), ``.csv``, ``.tsv``
            or ``.parquet`` file; any other string that is not an existing path is taken as a
            Hugging Face Hub dataset name.
        split: the split of a Hub dataset (default ``"train"``); ignored for files.
        source_column, target_column: the fields holding the source and target texts.
        prefix: text prepended to every source (a task prefix such as ``"summarize: "``).
        max_examples: keep at most this many examples, the first ones in file order.
        hub_config: the configuration of a Hub dataset that has several (e.g. ``"3.0.0"`` of
            ``abisee/cnn_dailymail``); ignored for files.

    Returns:
        The dataset and a `LoadReport`. Records whose source or target is missing, null or
        only whitespace are skipped, counted in the report and logged.

    Raises:
        DataError: missing file or column, malformed line, non-UTF-8 bytes, a text field that is
            not a string, no usable example, or a Hub dataset that cannot be loaded.
    """
    if max_examples is not None and max_examples < 1:
        raise ValueError(f"max_examples must be positive or None, got {max_examples}")
    text = str(path_or_name)
    path = Path(text).expanduser()
    if path.exists() or _looks_like_path(text):
        origin = str(path)
        located = _read_file(path, (source_column, target_column))
    else:
        origin = f"{text} [{split or 'train'}]"
        located = read_hub(text, split or "train", (source_column, target_column), hub_config)
    sources: list[str] = []
    targets: list[str] = []
    records = empty_source = empty_target = 0
    for where, record in located:
        if max_examples is not None and len(sources) >= max_examples:
            break
        records += 1
        source = _text_field(origin, where, record, source_column)
        target = _text_field(origin, where, record, target_column)
        empty_source += source is None
        empty_target += target is None
        if source is not None and target is not None:
            sources.append(prefix + source)
            targets.append(target)
    report = LoadReport(origin, records, len(sources), empty_source, empty_target)
    if not sources:
        raise DataError(f"{origin}: no usable examples ({report})")
    if report.skipped:
        logger.warning("%s", report)
    else:
        logger.info("%s", report)
    return Dataset.from_dict({"source": sources, "target": targets}, features=FEATURES), report


@dataclass(frozen=True)
class DocumentReport:
    """What `load_documents` kept: ``records`` read (files, lines or rows), ``kept`` documents,
    the others empty (missing, null or only whitespace)."""

    origin: str
    records: int
    kept: int

    def __str__(self) -> str:
        return (f"{self.origin}: kept {self.kept} of {self.records} documents; skipped "
                f"{self.records - self.kept} empty")


def load_documents(
    path_or_name: str | os.PathLike[str],
    *,
    split: str | None = None,
    columns: tuple[str, ...] = ("text",),
    max_documents: int | None = None,
    hub_config: str | None = None,
) -> tuple[Dataset, DocumentReport]:
    """Load raw text as a dataset with one string column, ``text``: one document per row.

    Args:
        path_or_name: a ``.txt`` file (one document: the whole file), a folder (every ``.txt``
            file below it, in path order, one document each), a JSONL/JSON/CSV/TSV/Parquet
            file, or a Hub dataset name (one document per record).
        split: the split of a Hub dataset (default ``"train"``).
        columns: the record fields whose texts make a document, joined with a newline (e.g.
            ``("title", "text")``: a poem under its title); a missing or blank field is left
            out, a record with none is skipped and counted.
        max_documents: keep at most this many documents, the first ones.
        hub_config: the configuration of a Hub dataset that has several.

    Raises:
        DataError: as `load_examples`; also a folder without ``.txt`` files.
    """
    text = str(path_or_name)
    path = Path(text).expanduser()
    if path.is_dir() or path.suffix.lower() == TEXT_SUFFIX:
        origin = str(path)
        files = _text_files(path)
        located: Iterator[_Located] = ((str(f), {"text": _decode(f)}) for f in files)
        columns = ("text",)
    elif path.exists() or _looks_like_path(text):
        origin = str(path)
        located = _read_file(path, columns)
    else:
        origin = f"{text} [{split or 'train'}]"
        located = read_hub(text, split or "train", columns, hub_config)
    documents: list[str] = []
    records = 0
    for where, record in located:
        if max_documents is not None and len(documents) >= max_documents:
            break
        records += 1
        parts = [_text_field(origin, where, record, column) for column in columns]
        if any(part is not None for part in parts):
            documents.append("\n".join(part for part in parts if part is not None))
    report = DocumentReport(origin, records, len(documents))
    if not documents:
        raise DataError(f"{origin}: no text ({report})")
    (logger.warning if report.kept < report.records else logger.info)("%s", report)
    return Dataset.from_dict({"text": documents}, features=TEXT_FEATURES), report


def _text_files(path: Path) -> list[Path]:
    """A ``.txt`` file, or every ``.txt`` file below a folder (sorted by path)."""
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob(f"*{TEXT_SUFFIX}") if p.is_file())
    if not files:
        raise DataError(f"{path}: a folder without {TEXT_SUFFIX} files")
    return files


def load_splits(
    files: Mapping[str, str | os.PathLike[str]],
    **options: Any,
) -> tuple[DatasetDict, dict[str, LoadReport]]:
    """Load several splits, e.g. ``{"train": "train.jsonl", "validation": "val.jsonl"}``.

    Each value is a file or a Hub name; for a Hub name the key is the split loaded. ``options``
    are passed to `load_examples` (``source_column``, ``target_column``, ``prefix``,
    ``max_examples``).
    """
    splits: dict[str, Dataset] = {}
    reports: dict[str, LoadReport] = {}
    for split, path_or_name in files.items():
        splits[split], reports[split] = load_examples(path_or_name, split=split, **options)
    return DatasetDict(splits), reports


def _looks_like_path(text: str) -> bool:
    # A data-file extension, or tformer.hub's rule for what is not a Hub name: a missing local
    # file deserves "file not found" rather than a Hub lookup.
    return Path(text).suffix.lower() in _FORMATS or looks_like_path(text)


def _text_field(origin: str, where: str, record: Mapping[str, Any], field: str) -> str | None:
    """The text of ``field``, or None when it is null or blank; an error for any other type."""
    if field not in record:
        fields = ", ".join(map(str, record)) or "none"
        raise DataError(f"{origin}, {where}: no field {field!r} (fields: {fields})")
    value = record[field]
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if not isinstance(value, str):
        shown = repr(value)
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        raise DataError(
            f"{origin}, {where}, field {field!r}: expected a string, "
            f"got {type(value).__name__} {shown}"
        )
    return value


def _read_file(path: Path, columns: tuple[str, ...]) -> Iterator[_Located]:
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if path.is_dir():
        found = ", ".join(sorted(p.name for p in path.iterdir() if p.suffix in _FORMATS))
        raise DataError(f"{path} is a directory; give one file per split (found: {found})")
    fmt = _FORMATS.get(path.suffix.lower())
    if fmt is None:
        raw = " (raw text is for data.task: lm)" if path.suffix.lower() == TEXT_SUFFIX else ""
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; expected one of "
                        f"{', '.join(_FORMATS)}{raw}")
    if fmt == "parquet":
        return _read_parquet(path, columns)
    text = _decode(path)
    if fmt == "csv" or fmt == "tsv":
        return _read_delimited(path, text, columns, delimiter="," if fmt == "csv" else "\t")
    if fmt == "json" and text.lstrip().startswith("["):
        return _read_json_array(path, text)
    return _read_json_lines(path, text)


def _decode(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        # utf-8-sig offsets count from after a BOM; the file offset includes it.
        start = error.start + (3 if data.startswith(b"\xef\xbb\xbf") else 0)
        line_start = data.rfind(b"\n", 0, start) + 1
        line = data.count(b"\n", 0, start) + 1
        raise DataError(
            f"{path}, line {line}: not UTF-8: byte 0x{data[start]:02x} at byte "
            f"{start - line_start} of the line (byte {start} of the file)"
        ) from None


def _read_json_lines(path: Path, text: str) -> Iterator[_Located]:
    # split("\n"), not splitlines(): U+2028 and friends may appear raw inside JSON strings.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(
                f"{path}, line {number}: not valid JSON ({error.msg} at column {error.colno})"
            ) from None
        if not isinstance(record, dict):
            raise DataError(
                f"{path}, line {number}: expected a JSON object, got {type(record).__name__}"
            )
        yield f"line {number}", record


def _read_json_array(path: Path, text: str) -> Iterator[_Located]:
    try:
        records = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(
            f"{path}, line {error.lineno}: not valid JSON ({error.msg} at column {error.colno})"
        ) from None
    for number, record in enumerate(records, start=1):
        if not isinstance(record, dict):
            raise DataError(
                f"{path}, record {number}: expected a JSON object, got {type(record).__name__}"
            )
        yield f"record {number}", record


def _read_delimited(
    path: Path, text: str, columns: tuple[str, ...], delimiter: str
) -> Iterator[_Located]:
    # TSV follows the usual convention of no quoting (a quote is an ordinary character); CSV
    # follows RFC 4180, where quoted fields may hold commas and newlines.
    quoting = csv.QUOTE_MINIMAL if delimiter == "," else csv.QUOTE_NONE
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting)
    header = next(reader, None)
    if header is None:
        raise DataError(f"{path}: empty file, expected a header line")
    _check_columns(path, header, columns)
    line = reader.line_num
    for row in reader:
        start, line = line + 1, reader.line_num  # a quoted field may span several lines
        if not row:
            continue
        if len(row) != len(header):
            raise DataError(
                f"{path}, line {start}: {len(row)} fields, but the header has {len(header)}"
            )
        yield f"line {start}", dict(zip(header, row, strict=True))


def _read_parquet(path: Path, columns: tuple[str, ...]) -> Iterator[_Located]:
    try:
        table = pq.read_table(path)
    except Exception as error:  # pyarrow raises several types for a corrupt file
        raise DataError(f"{path}: not a readable Parquet file ({error})") from None
    _check_columns(path, table.column_names, columns)
    yield from _rows(table.select(list(columns)).to_pylist())


def read_hub(name: str, split: str, columns: tuple[str, ...],
             config: str | None = None) -> Iterator[_Located]:
    """(where, record) of every row of a Hub dataset's split; a DataError naming the dataset
    when it cannot be loaded or lacks one of ``columns``."""
    if not is_offline_mode() and not hub_reachable():
        # One quick probe instead of `datasets`' retries with back-off (24 s measured offline).
        # With HF_HUB_OFFLINE=1, `datasets` reads its local cache at once.
        raise DataError(
            f"{name!r} is not a local file and the Hugging Face Hub cannot be reached "
            f"(split {split!r}); set HF_HUB_OFFLINE=1 to use the local `datasets` cache"
        )
    try:
        args = (name,) if config is None else (name, config)
        dataset = datasets.load_dataset(*args, split=split)
    except Exception as error:  # offline, unknown name, unknown split: all one answer
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise DataError(
            f"{name!r} is not a local file and could not be loaded from the Hugging Face Hub "
            f"(split {split!r}): {type(error).__name__}: {first_line}"
        ) from error
    _check_columns(f"{name} [{split}]", dataset.column_names, columns)
    yield from _rows(dataset.select_columns(list(columns)).to_list())


def _rows(rows: list[dict[str, Any]]) -> Iterator[_Located]:
    for number, row in enumerate(rows, start=1):
        yield f"row {number}", row


def _check_columns(origin: object, present: list[str], wanted: tuple[str, ...]) -> None:
    missing = [column for column in wanted if column not in present]
    if missing:
        raise DataError(
            f"{origin}: no column {missing[0]!r}; the columns are: {', '.join(present)}"
        )


@dataclass(frozen=True)
class EvalExamples:
    """Sources with one or more references each, as read for evaluation."""

    ids: list[str]
    sources: list[str]
    references: list[list[str]]  # per example, at least one non-empty reference


def load_eval_examples(
    path: str | os.PathLike[str],
    *,
    source_column: str = "source",
    target_column: str = "target",
    prefix: str = "",
    id_column: str = "id",
) -> EvalExamples:
    """Read an evaluation file: the target field holds one reference (a string) or several
    (a list of strings). Unlike training data, nothing is skipped: an empty source or an
    empty reference is an error naming the line, since dropping it would change the score."""
    path = Path(path).expanduser()
    origin = str(path)
    ids: list[str] = []
    sources: list[str] = []
    references: list[list[str]] = []
    for where, record in _read_file(path, (source_column, target_column)):
        source = _text_field(origin, where, record, source_column)
        if source is None:
            raise DataError(f"{origin}, {where}: empty {source_column!r}")
        if target_column not in record:
            _text_field(origin, where, record, target_column)  # raises, naming the fields
        value = record[target_column]
        refs = value if isinstance(value, list) else [value]
        if not refs:
            raise DataError(f"{origin}, {where}, field {target_column!r}: empty list of references")
        for i, ref in enumerate(refs):
            if not isinstance(ref, str):
                raise DataError(
                    f"{origin}, {where}, field {target_column!r}: reference {i + 1} is "
                    f"{type(ref).__name__}, expected a string"
                )
            if not ref.strip():
                raise DataError(
                    f"{origin}, {where}, field {target_column!r}: reference {i + 1} is empty"
                )
        ids.append(str(record.get(id_column, len(ids) + 1)))
        sources.append(prefix + source)
        references.append(list(refs))
    if not sources:
        raise DataError(f"{origin}: no examples")
    return EvalExamples(ids, sources, references)
