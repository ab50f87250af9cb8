"""The embedded demo corpus: Python standard-library docstrings, summarised by their first line.

Nothing is downloaded: the examples come from the source files of the running Python, read
with `ast` (never imported, so no module runs any code). Each function, method or class whose
docstring has a summary paragraph and a body gives one example:

- source: the signature (``def split(self, sep=None, maxsplit=-1)``), a newline, the body;
- target: the summary: the docstring's first paragraph joined into one line, or only its
  first line when that line is a sentence (ends with ".") followed directly by more text.

Skipped: summaries under 3 words or over 200 characters, and docstrings with no body. A body
over 1,000 characters is cut at its last line break before that. Tests, demos and bundled
wheels are left out. The corpus depends on the Python version (its standard library), not on
the machine; Python 3.11 gives about 3,100 examples. Parsing takes a few seconds, once per
process.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import logging
import re
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from datasets import Dataset, DatasetDict

from tformer.data.loading import FEATURES

logger = logging.getLogger(__name__)

# Not library code (tests, demos, packaged wheels, generated data), or jokes. Modules with
# effects on import (idlelib, tkinter, turtle) are kept: they are parsed, never imported.
_SKIPPED_TOP_LEVEL = frozenset(
    {"test", "turtledemo", "pydoc_data", "ensurepip", "antigravity", "this", "__hello__",
     "__phello__"}
)
_SKIPPED_DIRECTORIES = frozenset({"test", "tests", "idle_test", "__pycache__"})
MIN_SUMMARY_WORDS = 3
MAX_SUMMARY_CHARS = 200
#: Longer bodies are cut at the last line break before this many characters.
MAX_BODY_CHARS = 1000
_SPLIT_FRACTIONS = (("train", 0.90), ("validation", 0.05), ("test", 0.05))


@dataclass(frozen=True)
class _Docstring:
    signature: str
    body: str
    summary: str

    @property
    def source(self) -> str:
        return f"{self.signature}\n{self.body}"


def stdlib_docstring_corpus(seed: int = 0, max_examples: int | None = None) -> DatasetDict:
    """Build the demo corpus: train, validation and test splits (about 90/5/5 %).

    Examples with the same source or the same body are kept once. A split is chosen by a
    seeded hash of the target, so examples sharing a summary (``"Return a copy."``) all land in
    the same split and no test summary is seen in training; the order inside a split is a
    seeded hash of the source. The same Python and seed always give the same corpus.

    Args:
        seed: changes the split assignment and the order.
        max_examples: keep only this many examples (a seeded sample) before splitting.
    """
    examples = _stdlib_docstrings()
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
        "stdlib docstring corpus (Python %s, seed %d): %s",
        sys.version.split()[0],
        seed,
        ", ".join(f"{name} {len(split)}" for name, split in corpus.items()),
    )
    return corpus


def first_sentence_baseline(source: str) -> str:
    """The first sentence of the body of a corpus source: the baseline summary to beat."""
    _, _, body = source.partition("\n")
    paragraph = " ".join(body.strip().split("\n\n", 1)[0].split())
    match = re.match(r"(.+?[.!?])(\s|$)", paragraph)
    return match.group(1) if match else paragraph


@functools.cache
def _stdlib_docstrings() -> tuple[_Docstring, ...]:
    """Every usable, de-duplicated docstring of the standard library, in file order."""
    seen_sources: set[str] = set()
    seen_bodies: set[str] = set()
    kept: list[_Docstring] = []
    files = found = 0
    for path in _stdlib_files():
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError, OSError) as error:  # e.g. deliberately broken files
            logger.debug("skipped %s: %s", path, error)
            continue
        files += 1
        for example in _docstrings(tree):
            found += 1
            if example.source in seen_sources or example.body in seen_bodies:
                continue
            seen_sources.add(example.source)
            seen_bodies.add(example.body)
            kept.append(example)
    logger.info(
        "read %d stdlib files: %d docstrings with a summary and a body, %d after de-duplication",
        files,
        found,
        len(kept),
    )
    return tuple(kept)


def _stdlib_files() -> Iterator[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    for entry in sorted(root.iterdir()):
        name = entry.name.removesuffix(".py")
        # stdlib_module_names leaves out site-packages, config-*, lib-dynload and stray files.
        if name not in sys.stdlib_module_names or name in _SKIPPED_TOP_LEVEL:
            continue
        if entry.is_file() and entry.suffix == ".py":
            yield entry
        elif entry.is_dir():
            for path in sorted(entry.rglob("*.py")):
                relative = path.relative_to(entry).parts
                if _SKIPPED_DIRECTORIES.isdisjoint(relative[:-1]) and not path.name.startswith(
                    "test_"
                ):
                    yield path


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
    return f"{keyword} {node.name}({ast.unparse(node.args)}){returns}"


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
