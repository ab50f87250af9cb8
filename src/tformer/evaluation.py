"""``tformer evaluate``: generate for an evaluation file and score against its references."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

from tformer.ct2.engine import CT2Seq2Seq
from tformer.data import load_eval_examples
from tformer.generation import Seq2Seq
from tformer.metrics import all_metrics

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
    return evaluate_examples(generator, ids, sources, references, data=str(data),
                             output_dir=output_dir, language=language, moses_lang=moses_lang,
                             **generation)


def evaluate_examples(
    generator: Seq2Seq | CT2Seq2Seq,
    ids: Sequence[str],
    sources: Sequence[str],
    references: Sequence[Sequence[str]],
    *,
    data: str = "",
    output_dir: str | Path | None = None,
    file_prefix: str = "",
    language: str = "auto",
    moses_lang: str | None = None,
    **generation,
) -> dict:
    """Generate for ``sources`` and score against ``references`` (one list per source): the
    core of :func:`evaluate`, also used for a run's test split (`tformer.training.finish`).
    With ``output_dir``: ``{file_prefix}metrics.json`` and ``{file_prefix}predictions.jsonl``
    there."""
    start = time.perf_counter()
    truncation: dict = {}
    if getattr(generator, "engine", "torch") == "torch":  # generate_texts reports truncation
        predictions = generator.generate(list(sources), report=truncation, **generation)
    else:
        predictions = generator.generate(list(sources), **generation)
    seconds = time.perf_counter() - start
    metrics = {
        "model": generator.path,
        "engine": getattr(generator, "engine", "torch"),
        "data": data,
        "examples": len(sources),
        "references_per_example": max(len(r) for r in references),
        "generation": generation,
        "generation_seconds": round(seconds, 2),
        **truncation,  # truncated_sources, max_source_length
        **all_metrics(predictions, [list(r) for r in references], language, moses_lang),
    }
    if output_dir is not None:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{file_prefix}metrics.json").write_text(json.dumps(metrics, indent=2,
                                                              ensure_ascii=False))
        with (out / f"{file_prefix}predictions.jsonl").open("w", encoding="utf-8") as fh:
            for i, s, r, p in zip(ids, sources, references, predictions):
                record = {"id": i, "source": s, "references": list(r), "prediction": p}
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")
    return metrics
