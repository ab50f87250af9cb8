"""The layer order of DESIGN.md, as a test (``make lint`` runs it; so does ``make test``).

Every ``import`` in ``src/tformer`` is read with `ast` (top-level, function-local and
``TYPE_CHECKING`` ones alike) and mapped to the part of tformer it names. A part may import
only parts of lower layers; parts of one layer are independent of each other. So no import
circle can form between parts. A function-local import is allowed only with a comment saying
why: an optional dependency, or a measured import-time cost.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "tformer"

#: Highest first. A part imports only parts of the layers below its own.
LAYERS: list[tuple[str, ...]] = [
    ("cli",),
    ("demo",),
    ("recipe",),  # train, then the after-run work: tformer train
    ("serving",),
    ("visualization",),  # reads runs (and finds checkpoints the way training writes them)
    ("training",),
    ("evaluation",),
    ("tformer",),  # the package root, tformer/__init__.py: the public API (tformer.load, ...)
    ("engines",),  # checkpoint → engine (torch | CTranslate2): tformer.load
    # CTranslate2's engine continues a decoder-only model's prompts through generation's
    # continue_prompts (one windowing and decoding for both engines)
    ("ct2",),
    ("generation",),
    ("loading",),  # checkpoint → model, tokenizer: the one loader
    ("tokenization", "data"),
    ("lora", "hub", "weights", "metrics", "convert"),
    ("hf",),
    ("model",),
]
RANK = {part: len(LAYERS) - i for i, layer in enumerate(LAYERS) for part in layer}
#: Words one of which the comment of a function-local import must hold.
LOCAL_IMPORT_REASONS = ("optional", "import time", "import-time")


def _part(module: str) -> str | None:
    """``tformer.training.loop`` → ``training``; ``tformer`` for the package root (its
    ``__init__``); None outside tformer."""
    names = [n for n in module.split(".") if n != "__init__"]
    if names[0] != "tformer":
        return None
    return names[1] if len(names) > 1 else "tformer"


def _imports(path: Path):
    """(line, imported tformer module, function-local?) for every import in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    local_lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for inner in ast.walk(node):
                if isinstance(inner, (ast.Import, ast.ImportFrom)):
                    local_lines.add(inner.lineno)
    package = ".".join(("tformer", *path.relative_to(SRC).with_suffix("").parts))
    if path.name == "__init__.py":
        package = package.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package
                parent = package.split(".")
                parent = parent[: len(parent) - node.level + (path.name == "__init__.py")]
                base = ".".join([*parent, *([base] if base else [])])
            # `from tformer import lora` names the submodule tformer.lora
            modules = [f"{base}.{a.name}" if base == "tformer" else base for a in node.names]
        else:
            continue
        for module in modules:
            yield node.lineno, module, node.lineno in local_lines


def _sources() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


def layer_violations() -> list[str]:
    problems = []
    for path in _sources():
        own = _part(".".join(("tformer", *path.relative_to(SRC).with_suffix("").parts)))
        for line, module, _ in _imports(path):
            other = _part(module)
            if other is None or other == own:
                continue
            where = f"{path.relative_to(SRC.parent)}:{line}"
            if other not in RANK or own not in RANK:
                problems.append(f"{where}: {own} → {other}: a part missing from LAYERS")
            elif RANK[other] >= RANK[own]:
                problems.append(f"{where}: {own} (layer {RANK[own]}) imports {module} (layer "
                                f"{RANK[other]}): dependencies must point down (DESIGN.md)")
    return problems


def unexplained_local_imports() -> list[str]:
    problems = []
    for path in _sources():
        lines = path.read_text(encoding="utf-8").splitlines()
        for line, module, local in _imports_all(path):
            if not local:
                continue
            context = _comment_block(lines, line).lower()
            if not any(reason in context for reason in LOCAL_IMPORT_REASONS):
                problems.append(f"{path.relative_to(SRC.parent)}:{line}: local import of "
                                f"{module} without a comment giving its reason")
    return problems


def _comment_block(lines: list[str], line: int) -> str:
    """The import's line and the run of import, comment and blank lines right above it."""
    block, i = [lines[line - 1]], line - 2
    while i >= 0 and (not lines[i].strip() or lines[i].lstrip().startswith(("#", "import ", "from "))):
        block.append(lines[i])
        i -= 1
    return " ".join(block)


def _imports_all(path: Path):
    """Like `_imports`, but every module (not only tformer's)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in fn.body:
                for inner in ast.walk(node):
                    if isinstance(inner, ast.Import):
                        yield inner.lineno, inner.names[0].name, True
                    elif isinstance(inner, ast.ImportFrom):
                        yield inner.lineno, inner.module or ".", True


def test_every_part_has_a_layer():
    parts = {"tformer" if p.stem == "__init__" else p.stem if p.is_file() else p.name
             for p in SRC.iterdir() if p.suffix == ".py" or (p / "__init__.py").is_file()}
    assert parts == set(RANK), f"add to / remove from LAYERS: {parts ^ set(RANK)}"


def test_dependencies_point_down():
    assert layer_violations() == []


def test_function_local_imports_say_why():
    assert unexplained_local_imports() == []


def test_a_circle_fails_the_check(tmp_path, monkeypatch):
    """The check catches a new upward import (here: the model importing training, a circle)
    and one hidden in a function."""
    fake = tmp_path / "tformer"
    (fake / "model").mkdir(parents=True)
    (fake / "training").mkdir()
    (fake / "model" / "__init__.py").write_text("def f():\n    from tformer.training import x\n")
    (fake / "training" / "__init__.py").write_text("from tformer.model import f\n")
    monkeypatch.setitem(globals(), "SRC", fake)
    problems = layer_violations()
    assert len(problems) == 1 and "model (layer 1) imports tformer.training" in problems[0]
    assert "local import of tformer.training" in unexplained_local_imports()[0]
