"""Reading what a training run wrote (`tformer.training` writes, visualization reads)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)


class RunFileError(ValueError):
    """A run file is damaged beyond a torn last line."""


def read_metrics(path: Path) -> list[dict]:
    """The records of a JSON-lines file a run appends to (``metrics.jsonl``,
    ``test_predictions.jsonl``); [] if there is none.

    Tolerant only where a crash leaves its mark: a last line that is not JSON (the run was
    killed mid-write) is skipped with a warning. Anything else that is not one JSON object per
    line (a bad line before the last, a line holding a list) is damage, not a crash: a
    `RunFileError` naming the line."""
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            if i == last and not text.endswith("\n"):
                log.warning("%s, line %d: cut short (the run stopped mid-write); skipped",
                            path, i + 1)
                continue
            raise RunFileError(f"{path}, line {i + 1}: not JSON ({error})") from error
        if not isinstance(record, dict):
            raise RunFileError(f"{path}, line {i + 1}: a JSON {type(record).__name__}, "
                               "expected an object")
        records.append(record)
    return records
