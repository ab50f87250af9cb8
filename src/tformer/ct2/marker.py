"""What identifies an exported directory, and the optional import of ``ctranslate2``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

#: The file that marks a directory written by :func:`export`.
MARKER = "tformer_ct2.json"
#: Where the tokenizer is saved inside an exported directory (CTranslate2 owns config.json).
TOKENIZER_DIR = "tokenizer"
#: Weight types ``tformer export --quantization`` accepts (CTranslate2's names). float16,
#: bfloat16 and the int8_float16/int8_bfloat16 mixes are meant for GPUs; on a CPU CTranslate2
#: computes float16 weights in float32.
QUANTIZATIONS = ("float32", "int8", "int8_float32", "int8_float16", "int8_bfloat16", "float16",
                 "bfloat16")


def require_ctranslate2() -> Any:
    """Import ``ctranslate2`` or raise an ImportError that says how to install it."""
    try:
        import ctranslate2  # here, not at the top: an optional dependency
    except ImportError as error:
        raise ImportError(
            "the CTranslate2 engine needs the ctranslate2 package: pip install 'tformer[ct2]'"
        ) from error
    return ctranslate2


def is_exported(path: str | Path) -> bool:
    """True when ``path`` is a directory written by :func:`export` (model.bin + the marker)."""
    p = Path(str(path)).expanduser()
    return (p / "model.bin").is_file() and (p / MARKER).is_file()


def read_marker(path: str | Path) -> dict[str, Any]:
    """The marker of an exported directory, as written by :func:`export`."""
    return json.loads((Path(str(path)).expanduser() / MARKER).read_text(encoding="utf-8"))
