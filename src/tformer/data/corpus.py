"""The embedded demo corpus: the docstrings of every package installed in the running Python
(its standard library and its site-packages), summarised by their first line.

Nothing is downloaded: the examples come from the source files of the running interpreter, read
with `ast` (never imported, so no module runs any code). Each function, method or class whose
docstring has a summary paragraph and a body gives one example:

- source: the signature, its parameters without annotations and defaults
  (``def split(self, sep, maxsplit) -> list``), a newline, the body;
- target: the summary: the docstring's first paragraph joined into one line, or only its
  first line when that line is a sentence (ends with ".") followed directly by more text.

Skipped: summaries under 3 words or over 200 characters, and docstrings with no body. A body
over 1,000 characters is cut at its last line break before that. Files left out: tests and
test helpers (directories ``test``, ``tests``, ``testing``; ``test_*.py``, ``*_test.py``,
``conftest.py``), vendored copies (``_vendor``, ``vendor``, ``third_party``...), examples and
benchmarks, generated code (``*_pb2.py``, and files whose leading comments say "generated" or
"do not edit", e.g. transformers' modeling files generated from its modular ones), and files
over 1 MB (data tables, not code).

The corpus depends on what is installed, so a run records its size and a hash
(`corpus_fingerprint`). This project's environment (Python 3.11, torch, transformers and the
rest of ``make install``) gives 39,871 examples from 12,910 files.

Parsing them, ~190 MB of source, is the dominant cost of building the corpus: 62-84 s in one
process (site-packages alone; load average 2-3 on the 2-core machine), 70-165 s in two at a
load average of 4-8. So files are parsed by up to 2 processes and each file's examples are
cached by its path, size and modification time (`default_cache_dir`): a second run reads the
corpus back in 2-4 s, and installing a package re-parses only that package's files.
"""

from __future__ import annotations

import ast
import functools
import gc
import gzip
import hashlib
import json
import logging
import multiprocessing
import os
import re
import sys
import sysconfig
import time
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from datasets import Dataset, DatasetDict

from tformer.data.loading import FEATURES

logger = logging.getLogger(__name__)

# Not library code (tests, demos, packaged wheels, generated data), or jokes. Modules with
# effects on import (idlelib, tkinter, turtle) are kept: they are parsed, never imported.
_SKIPPED_TOP_LEVEL = frozenset(
    {"test", "turtledemo", "pydoc_data", "ensurepip", "antigravity", "this", "__hello__",
     "__phello__", "site-packages", "dist-packages"}
)
# Directories of tests and test helpers, vendored copies of other packages, examples.
_SKIPPED_DIRECTORIES = frozenset(
    {"test", "tests", "testing", "idle_test", "__pycache__", "_vendor", "vendor", "_vendored",
     "vendored", "third_party", "extern", "examples", "benchmarks"}
)
_TEST_FILE = re.compile(r"(test_.*|.*_tests?|conftest|.*_pb2(_grpc)?)\.py")
# A "generated, do not edit" note in a file's leading comment block.
_GENERATED = re.compile(rb"(?i)auto-?generated|automatically generated|do not edit|@generated")
MAX_FILE_BYTES = 1_000_000
MIN_SUMMARY_WORDS = 3
MAX_SUMMARY_CHARS = 200
#: Longer bodies are cut at the last line break before this many characters.
MAX_BODY_CHARS = 1000
#: Parsing processes at most (the test machine has 2 cores).
MAX_WORKERS = 2
_SPLIT_FRACTIONS = (("train", 0.96), ("validation", 0.02), ("test", 0.02))


@dataclass(frozen=True)
class _Docstring:
    signature: str
    body: str
    summary: str

    @property
    def source(self) -> str:
        return f"{self.signature}\n{self.body}"


def installed_roots() -> tuple[Path, ...]:
    """Where the corpus's files come from: the standard library, then the site-packages
    directories of the running interpreter (a virtual environment's own when run in one)."""
    paths = sysconfig.get_paths()
    roots: list[Path] = []
    for key in ("stdlib", "purelib", "platlib"):
        path = Path(paths[key]).resolve()
        if path.is_dir() and path not in roots:
            roots.append(path)
    return tuple(roots)


def default_cache_dir() -> Path:
    """``$TFORMER_CACHE_DIR``, else ``$XDG_CACHE_HOME/tformer``, else ``~/.cache/tformer``."""
    if os.environ.get("TFORMER_CACHE_DIR"):
        return Path(os.environ["TFORMER_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tformer"


def docstring_corpus(
    seed: int = 0,
    max_examples: int | None = None,
    roots: Sequence[str | Path] | None = None,
    cache_dir: str | Path | None = None,
) -> DatasetDict:
    """Build the demo corpus: train, validation and test splits (about 96/2/2 %).

    Examples with the same source or the same body are kept once (the first in file order:
    the standard library first). A split is chosen by a seeded hash of the target, so examples
    sharing a summary (``"Return a copy."``) all land in the same split and no test summary is
    seen in training; the order inside a split is a seeded hash of the source. The same files
    and seed always give the same corpus (`corpus_fingerprint` tells two apart).

    Args:
        seed: changes the split assignment and the order.
        max_examples: keep only this many examples (a seeded sample) before splitting.
        roots: directories to read, each holding top-level modules and packages;
            default `installed_roots()`.
        cache_dir: where to keep each file's parsed examples between runs; None: no cache.
    """
    resolved = tuple(Path(root).resolve() for root in (roots or installed_roots()))
    examples = _docstrings_of(resolved, Path(cache_dir) if cache_dir is not None else None)
    ranked = sorted(examples, key=lambda example: _hash(seed, example.source))
    if max_examples is not None:
        ranked = ranked[:max_examples]
    splits: dict[str, dict[str, list[str]]] = {
        name: {"source": [], "target": []} for name, _ in _SPLIT_FRACTIONS
    }
    for example in ranked:
        columns = splits[_split_of(_hash(seed, example.summary))]
        columns["source"].append(example.source)
        columns["target"].append(example.summary)
    corpus = DatasetDict(
        {name: Dataset.from_dict(columns, features=FEATURES) for name, columns in splits.items()}
    )
    logger.info(
        "docstring corpus (Python %s, %d roots, seed %d): %s",
        sys.version.split()[0],
        len(resolved),
        seed,
        ", ".join(f"{name} {len(split)}" for name, split in corpus.items()),
    )
    return corpus


def corpus_fingerprint(corpus: DatasetDict) -> str:
    """SHA-256 of every split's name, sources and targets, in order: equal on two machines
    only when they built the same corpus (installed packages differ between machines)."""
    digest = hashlib.sha256()
    for name, split in corpus.items():
        digest.update(f"{name}\0{len(split)}\0".encode())
        for source, target in zip(split["source"], split["target"]):
            digest.update(f"{source}\0{target}\0".encode())
    return digest.hexdigest()


def first_sentence_baseline(source: str) -> str:
    """The first sentence of the body of a corpus source: the baseline summary to beat."""
    _, _, body = source.partition("\n")
    paragraph = " ".join(body.strip().split("\n\n", 1)[0].split())
    match = re.match(r"(.+?[.!?])(\s|$)", paragraph)
    return match.group(1) if match else paragraph


@functools.cache
def _docstrings_of(roots: tuple[Path, ...], cache_dir: Path | None) -> tuple[_Docstring, ...]:
    """Every usable, de-duplicated docstring under ``roots``, in file order (once per
    process)."""
    start = time.perf_counter()
    files = list(_source_files(roots))
    cache = _Cache(cache_dir, roots)
    found = cache.lookup(files)
    missing = [path for path, _, _ in files if str(path) not in found]
    for path, triples in zip(missing, _parse_all(missing)):
        found[str(path)] = triples
    if missing:
        cache.store(files, found)
    seen_sources: set[str] = set()
    seen_bodies: set[str] = set()
    kept: list[_Docstring] = []
    total = 0
    for path, _, _ in files:
        for triple in found[str(path)]:
            total += 1
            example = _Docstring(*triple)
            if example.source in seen_sources or example.body in seen_bodies:
                continue
            seen_sources.add(example.source)
            seen_bodies.add(example.body)
            kept.append(example)
    logger.info(
        "read %d files in %.1f s (%d parsed, %d cached): %d docstrings with a summary and a "
        "body, %d after de-duplication",
        len(files), time.perf_counter() - start, len(missing), len(files) - len(missing), total,
        len(kept),
    )
    return tuple(kept)


def _source_files(roots: tuple[Path, ...]) -> Iterator[tuple[Path, int, int]]:
    """(path, size, mtime in ns) of every file to read, root by root, each in sorted order."""
    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    for root in roots:
        for entry in sorted(root.iterdir()):
            name = entry.name.removesuffix(".py")
            # Not an importable name: dist-info, lib-dynload, config-*, *.libs, stray files.
            if not name.isidentifier() or name in _SKIPPED_TOP_LEVEL:
                continue
            # The standard library's directory also holds site-packages (outside a venv).
            if root == stdlib and name not in sys.stdlib_module_names:
                continue
            if entry.is_file():
                candidates = [entry] if entry.suffix == ".py" else []
            else:
                candidates = (
                    path for path in sorted(entry.rglob("*.py"))
                    if _SKIPPED_DIRECTORIES.isdisjoint(path.relative_to(entry).parts[:-1])
                )
            for path in candidates:
                if _TEST_FILE.fullmatch(path.name):
                    continue
                stat = path.stat()
                if stat.st_size <= MAX_FILE_BYTES:
                    yield path, stat.st_size, stat.st_mtime_ns


def _parse_all(paths: list[Path]) -> list[list[tuple[str, str, str]]]:
    """`_file_docstrings` of each path, in order; in up to `MAX_WORKERS` processes."""
    workers = min(MAX_WORKERS, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                  else os.cpu_count() or 1)
    # fork: the workers need nothing but this function; spawn would re-import tformer.
    if workers < 2 or len(paths) < 200 or "fork" not in multiprocessing.get_all_start_methods():
        return [_file_docstrings(path) for path in paths]
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        return list(pool.map(_file_docstrings, paths, chunksize=32))


def _file_docstrings(path: Path) -> list[tuple[str, str, str]]:
    """(signature, body, summary) of each usable docstring in one file; none for a generated
    file or one that does not parse (e.g. deliberately broken files, Python 2 code)."""
    try:
        text = path.read_bytes()
    except OSError:
        return []
    if _is_generated(text):
        return []
    # An AST holds no reference cycles: the cyclic collector, triggered again and again by
    # the allocation of its nodes, only costs time (site-packages in one process: 84 s with
    # it, 62 s without; one measurement each, load average 1.7-3.3).
    enabled = gc.isenabled()
    gc.disable()
    try:
        with warnings.catch_warnings():  # invalid escape sequences in old code
            warnings.simplefilter("ignore")
            tree = ast.parse(text, filename=str(path))
    except (SyntaxError, ValueError) as error:
        logger.debug("skipped %s: %s", path, error)
        return []
    finally:
        if enabled:
            gc.enable()
    return [(e.signature, e.body, e.summary) for e in _docstrings(tree)]


def _is_generated(text: bytes) -> bool:
    """Whether the comments heading the file say it is generated."""
    head = []
    for line in text[:4000].splitlines()[:40]:
        stripped = line.strip()
        if stripped and not stripped.startswith(b"#"):
            break
        head.append(stripped)
    return bool(_GENERATED.search(b"\n".join(head)))


class _Cache:
    """Each file's parsed examples, by path, size and mtime, in one gzipped JSON file per set
    of roots. It is keyed by this module's own source and the Python version too (both change
    what a file gives), and written through a temporary file and a rename, so concurrent runs
    never read half a file."""

    def __init__(self, directory: Path | None, roots: tuple[Path, ...]) -> None:
        self.path = None
        if directory is not None:
            name = hashlib.sha256("\0".join(map(str, roots)).encode()).hexdigest()[:16]
            self.path = directory / f"docstrings-{name}.json.gz"
        self.key = hashlib.sha256(
            Path(__file__).read_bytes() + sys.version.encode()
        ).hexdigest()

    def lookup(self, files: list[tuple[Path, int, int]]) -> dict[str, list]:
        if self.path is None or not self.path.is_file():
            return {}
        try:
            with gzip.open(self.path, "rt", encoding="utf-8") as fh:
                saved = json.load(fh)
        except (OSError, ValueError, EOFError) as error:
            logger.warning("ignored the unreadable corpus cache %s: %s", self.path, error)
            return {}
        if saved.get("key") != self.key:
            return {}
        entries = saved["files"]
        found = {}
        for path, size, mtime in files:
            entry = entries.get(str(path))
            if entry is not None and entry[0] == size and entry[1] == mtime:
                found[str(path)] = [tuple(triple) for triple in entry[2]]
        return found

    def store(self, files: list[tuple[Path, int, int]], found: dict[str, list]) -> None:
        if self.path is None:
            return
        entries = {str(path): [size, mtime, found[str(path)]] for path, size, mtime in files}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temporary = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
            with gzip.open(temporary, "wt", encoding="utf-8", compresslevel=1) as fh:
                json.dump({"key": self.key, "files": entries}, fh)
            os.replace(temporary, self.path)
        except OSError as error:  # a read-only home: no cache, same corpus
            logger.warning("could not write the corpus cache %s: %s", self.path, error)


_Definition = ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef


def _docstrings(tree: ast.Module) -> Iterator[_Docstring]:
    for node in _definitions(tree.body):
        docstring = ast.get_docstring(node, clean=True)
        if docstring:
            example = _example(node, docstring)
            if example is not None:
                yield example


def _definitions(statements: list[ast.stmt]) -> Iterator[_Definition]:
    """Every def and class among ``statements``, at any depth of nested blocks.

    Only statement lists are searched, not expressions: twice as fast as `ast.walk`, and a
    def can only appear as a statement.
    """
    for statement in statements:
        if isinstance(statement, _Definition):
            yield statement
        for field in ("body", "orelse", "finalbody", "handlers", "cases"):
            block = getattr(statement, field, None)
            if isinstance(block, list):
                yield from _definitions(block)


def _signature(node: _Definition) -> str:
    if isinstance(node, ast.ClassDef):
        bases = [ast.unparse(base) for base in node.bases]
        bases += [ast.unparse(keyword) for keyword in node.keywords]
        return f"class {node.name}({', '.join(bases)})" if bases else f"class {node.name}"
    keyword = "async def" if isinstance(node, ast.AsyncFunctionDef) else "def"
    returns = f" -> {ast.unparse(node.returns)}" if node.returns else ""
    return f"{keyword} {node.name}({_parameter_names(node.args)}){returns}"


def _parameter_names(args: ast.arguments) -> str:
    """The parameters without their annotations and defaults: a quarter of a signature's tokens
    (the demo's tokenizer: mean 22 tokens, 17 without; 90th percentile 40, 28), which a short
    source (the demo's first 32 tokens) can spend on the body instead."""
    def name(arg: ast.arg | None) -> ast.arg | None:
        return None if arg is None else ast.arg(arg=arg.arg)

    return ast.unparse(ast.arguments(
        posonlyargs=[name(a) for a in args.posonlyargs], args=[name(a) for a in args.args],
        vararg=name(args.vararg), kwonlyargs=[name(a) for a in args.kwonlyargs],
        kw_defaults=[None] * len(args.kwonlyargs), kwarg=name(args.kwarg), defaults=[],
    ))


def _example(node: _Definition, docstring: str) -> _Docstring | None:
    """Split a cleaned docstring into summary and body; None when either is unusable."""
    summary_lines, _, body = docstring.strip().partition("\n\n")
    first, _, rest = summary_lines.partition("\n")
    if rest and first.rstrip().endswith("."):
        # No blank line after a one-line summary sentence (PEP 257 asks for one): the lines
        # after it already are the body.
        summary_lines, body = first, f"{rest}\n\n{body}"
    summary = " ".join(summary_lines.split())
    body = body.strip()
    if len(summary.split()) < MIN_SUMMARY_WORDS or len(summary) > MAX_SUMMARY_CHARS or not body:
        return None
    if len(body) > MAX_BODY_CHARS:
        cut = body.rfind("\n", 0, MAX_BODY_CHARS)
        body = body[: cut if cut > 0 else MAX_BODY_CHARS].rstrip()
    return _Docstring(_signature(node), body, summary)


def _hash(seed: int, text: str) -> str:
    return hashlib.sha256(f"{seed}\0{text}".encode()).hexdigest()


def _split_of(digest: str) -> str:
    position = int(digest[:8], 16) / 0x1_0000_0000  # uniform in [0, 1)
    total = 0.0
    for name, fraction in _SPLIT_FRACTIONS:
        total += fraction
        if position < total:
            return name
    return _SPLIT_FRACTIONS[-1][0]
