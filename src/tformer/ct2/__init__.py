"""CTranslate2: export a checkpoint to a CTranslate2 model directory, and generate from one.

`CTranslate2 <https://opennmt.net/CTranslate2/>`_ is a C++ inference engine for Transformer
models (int8 / float16 weights, fused kernels, its own beam search). tformer uses it as a
second generation engine behind the same ``generate(texts, **options)`` interface as
:class:`tformer.generation.Seq2Seq`:

- :func:`export` writes an exported directory: CTranslate2's ``model.bin``, ``config.json`` and
  vocabulary, the tokenizer under ``tokenizer/``, and ``tformer_ct2.json`` (the marker by which
  ``tformer.load`` recognises the directory, with what generation needs to match Hugging Face
  ``generate()``).
- :func:`load_ct2` returns a :class:`~tformer.ct2.engine.CT2Seq2Seq` for an exported directory,
  or converts a checkpoint in memory first.

``ctranslate2`` is an optional dependency (``pip install tformer[ct2]``); it is imported only
when one of these functions runs, so the rest of tformer works without it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tformer.ct2.engine import CT2Seq2Seq

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
        import ctranslate2
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


def export(checkpoint: str | Path, output: str | Path | None = None, *,
           quantization: str = "float32", force: bool = False) -> Path:
    """Write ``checkpoint`` as a CTranslate2 directory: :func:`tformer.ct2.convert.export`."""
    from tformer.ct2.convert import export as _export

    return _export(checkpoint, output, quantization=quantization, force=force)


def load_ct2(path: str | Path, device: str | None = None, **options: Any) -> CT2Seq2Seq:
    """The CTranslate2 engine for ``path``: :func:`tformer.ct2.engine.load_ct2` (options:
    ``compute_type``, ``intra_threads``, ``inter_threads``)."""
    from tformer.ct2.engine import load_ct2 as _load

    return _load(path, device, **options)


__all__ = ["MARKER", "QUANTIZATIONS", "TOKENIZER_DIR", "export", "is_exported", "load_ct2",
           "read_marker", "require_ctranslate2"]
