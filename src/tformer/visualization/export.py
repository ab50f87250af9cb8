"""``tformer attention``: every picture of one example's attention, written to a directory.

The directory gets ``{cross,encoder,decoder}_{heads,mean}.png`` (see
:mod:`tformer.visualization.plots`; a decoder-only model has ``decoder_*`` alone),
``attention.html`` (the interactive view) and ``attention.json``
(:meth:`AttentionMaps.to_json`: per kind, [layer][head][query][key], the Hugging Face layout
without the batch axis, for other tools).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from tformer.data.sft import chat_prompts
from tformer.engines import load
from tformer.visualization.attention import attention_maps
from tformer.visualization.plots import write_attention_pngs
from tformer.visualization.viewer import write_attention_html

log = logging.getLogger(__name__)


def write_attention(
    checkpoint: str | Path,
    source: str,
    target: str | None = None,
    output_dir: str | Path = "attention",
    *,
    device: str | None = None,
    chat: bool = False,
    max_new_tokens: int = 64,
    max_source_length: int | None = None,
    **generation_options,
) -> list[Path]:
    """Load ``checkpoint`` (own model or Hugging Face, seq2seq or decoder-only), compute the
    maps of ``source`` (and ``target``, generated when None) and write them to ``output_dir``.
    Returns the files written, the HTML view first.

    A decoder-only model reads ``source`` as its prompt ("" = the start of a document) and
    ``target`` as the continuation; ``chat``: ``source`` is a user message, rendered with the
    checkpoint's chat template (``data.task: sft``), and the continuation is the answer."""
    seq2seq = load(checkpoint, device=device, engine="torch")  # weights are read from torch
    causal = seq2seq.family == "causal"
    if not source.strip() and not causal:
        raise ValueError("text: the source text is empty")
    if chat:
        source = chat_prompts(seq2seq.tokenizer, [source])[0]
    maps = attention_maps(seq2seq, source, target, max_new_tokens=max_new_tokens,
                          max_source_length=max_source_length, **generation_options)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    page = write_attention_html(maps, out / "attention.html",
                                title=f"tformer attention: {Path(str(checkpoint)).name}")
    data = out / "attention.json"
    data.write_text(json.dumps(maps.to_json(), ensure_ascii=False), encoding="utf-8")
    pngs = write_attention_pngs(maps, out)
    if causal:
        log.info("attention maps of %d tokens (%d of the prompt) written to %s",
                 len(maps.target_tokens), maps.prompt_length, out)
    else:
        log.info("attention maps of %d source and %d target tokens written to %s",
                 len(maps.source_tokens), len(maps.target_tokens), out)
    return [page, data, *pngs]
