"""Checkpoint → engine: what ``tformer.load`` returns. The torch engine is
`tformer.generation.Seq2Seq` (Hugging Face ``generate()``), the CTranslate2 engine
`tformer.ct2.engine.CT2Seq2Seq` (encoder-decoder) or `tformer.ct2.engine.CT2Generator`
(decoder-only: continues prompts); all have the same ``generate``. It sits above both engines
(and so above `tformer.ct2`, which reads checkpoints through `tformer.loading`)."""

from __future__ import annotations

from pathlib import Path

import torch

from tformer import ct2
from tformer.ct2.engine import CT2Generator, CT2Seq2Seq
from tformer.generation import Seq2Seq
from tformer.loading import load_checkpoint

#: Generation engines of :func:`load`: "auto" = CTranslate2 for a directory written by
#: ``tformer export``, PyTorch for anything else.
ENGINES = ("auto", "torch", "ctranslate2")


def load(path: str | Path, device: str | None = None, engine: str = "auto",
         **engine_options) -> Seq2Seq | CT2Seq2Seq | CT2Generator:
    """Load a checkpoint directory (own model, any Hugging Face seq2seq model or causal
    language model) or a Hub name, with its tokenizer (see `tformer.loading.load_model`).
    For a decoder-only model, ``generate`` continues prompts.

    ``engine="ctranslate2"`` returns a `tformer.ct2.engine.CT2Seq2Seq` or, decoder-only, a
    `tformer.ct2.engine.CT2Generator` (same ``generate``) for an exported directory, or for a
    checkpoint converted in memory; ``engine_options`` go to `tformer.ct2.load_ct2`
    (``compute_type``, ``intra_threads``, ...)."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}; got {engine!r}")
    exported = ct2.is_exported(path)
    if engine == "ctranslate2" or (engine == "auto" and exported):
        return ct2.load_ct2(path, device, **engine_options)
    if exported:
        raise ValueError(f"{path} is a CTranslate2 export (no PyTorch weights): use engine "
                         f"'ctranslate2' or the checkpoint it came from, "
                         f"{ct2.read_marker(path).get('source')}")
    if engine_options:
        raise ValueError(f"options {sorted(engine_options)} are for engine 'ctranslate2' only")
    path = str(path)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_checkpoint(path)
    model.to(device).eval()
    return Seq2Seq(model, tokenizer, path)
