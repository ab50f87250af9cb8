"""``tformer evaluate``: generate for an evaluation file and score against its references."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from tformer.data import load_eval_examples
from tformer.generation import Seq2Seq
from tformer.metrics import all_metrics

if TYPE_CHECKING:
    from tformer.ct2.engine import CT2Seq2Seq

log = logging.getLogger(__name__)


def evaluate(
    generator: Seq2Seq | CT2Seq2Seq,
    data: str | Path,
    *,
    output_dir: str | Path | None = None,
    source_column: str = "source",
    target_column: str = "target",
    prefix: str = "",
    language: str = "auto",
    moses_lang: str | None = None,
    max_examples: int | None = None,
    **generation,
) -> dict:
    """Score ``generator`` on ``data`` (JSONL/CSV/TSV/Parquet; the target field holds a
    reference string or a list of them). Writes ``metrics.json`` and ``predictions.jsonl``
    into ``output_dir`` when given. ``moses_lang``: also BLEU on lowercased Moses-tokenised
    text (:func:`tformer.metrics.moses_bleu`). ``generation``: options of ``Seq2Seq.generate``."""
    examples = load_eval_examples(data, source_column=source_column,
                                  target_column=target_column, prefix=prefix)
    ids, sources, references = examples.ids, examples.sources, examples.references
    if max_examples is not None:
        ids, sources, references = ids[:max_examples], sources[:max_examples], references[:max_examples]
    start = time.perf_counter()
    truncation: dict = {}
    if getattr(generator, "engine", "torch") == "torch":  # generate_texts reports truncation
        predictions = generator.generate(sources, report=truncation, **generation)
    else:
        predictions = generator.generate(sources, **generation)
    seconds = time.perf_counter() - start
    metrics = {
        "model": generator.path,
        "engine": getattr(generator, "engine", "torch"),
        "data": str(data),
        "examples": len(sources),
        "references_per_example": max(len(r) for r in references),
        "generation": generation,
        "generation_seconds": round(seconds, 2),
        **truncation,  # truncated_sources, max_source_length
        **all_metrics(predictions, references, language, moses_lang),
    }
    if output_dir is not None:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2, ensure_ascii=False))
        with (out / "predictions.jsonl").open("w", encoding="utf-8") as fh:
            for i, s, r, p in zip(ids, sources, references, predictions):
                record = {"id": i, "source": s, "references": r, "prediction": p}
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")
    return metrics
