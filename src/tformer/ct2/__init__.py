"""CTranslate2: export a checkpoint to a CTranslate2 model directory, and generate from one.

`CTranslate2 <https://opennmt.net/CTranslate2/>`_ is a C++ inference engine for Transformer
models (int8 / float16 weights, fused kernels, its own beam search). tformer uses it as a
second generation engine behind the same ``generate(texts, **options)`` interface as
:class:`tformer.generation.Seq2Seq`:

- :func:`export` writes an exported directory: CTranslate2's ``model.bin``, ``config.json`` and
  vocabulary, the tokenizer under ``tokenizer/``, and ``tformer_ct2.json`` (the marker by which
  ``tformer.load`` recognises the directory, with what generation needs to match Hugging Face
  ``generate()``).
- :func:`load_ct2` returns a :class:`~tformer.ct2.engine.CT2Seq2Seq` (encoder-decoder) or a
  :class:`~tformer.ct2.engine.CT2Generator` (decoder-only) for an exported directory, or
  converts a checkpoint in memory first.

``ctranslate2`` is an optional dependency (``pip install tformer[ct2]``); it is imported only
when one of these functions runs, so the rest of tformer works without it.
"""

from tformer.ct2.convert import export
from tformer.ct2.engine import CT2Generator, CT2Seq2Seq, load_ct2
from tformer.ct2.marker import (
    MARKER,
    QUANTIZATIONS,
    TOKENIZER_DIR,
    is_exported,
    read_marker,
    require_ctranslate2,
)

__all__ = ["MARKER", "QUANTIZATIONS", "TOKENIZER_DIR", "CT2Generator", "CT2Seq2Seq", "export",
           "is_exported", "load_ct2", "read_marker", "require_ctranslate2"]
