"""Text-generation metrics through the libraries the field trusts: ``rouge-score`` and
``sacrebleu``. Pure functions of (predictions, references)."""

from __future__ import annotations

from collections.abc import Sequence

import sacrebleu
from rouge_score import rouge_scorer, tokenizers


class _CharTokenizer(tokenizers.Tokenizer):
    """ROUGE on characters (whitespace dropped) for languages written without spaces.
    rouge-score's default tokenizer keeps only [a-z0-9], so Chinese would always score 0."""

    def tokenize(self, text: str) -> list[str]:
        return [c for c in text if not c.isspace()]


def rouge(
    predictions: Sequence[str], references: Sequence[str], chars: bool = False
) -> dict[str, float]:
    """Mean F1 of ROUGE-1/2/L/Lsum ×100 (Porter stemming for Latin text; characters if
    ``chars``). ROUGE-Lsum splits summaries into sentences at newlines."""
    _check(predictions, references)
    types = ["rouge1", "rouge2", "rougeL", "rougeLsum"]
    scorer = rouge_scorer.RougeScorer(
        types, use_stemmer=not chars, tokenizer=_CharTokenizer() if chars else None
    )
    totals = dict.fromkeys(types, 0.0)
    for pred, ref in zip(predictions, references):
        scores = scorer.score(ref, pred)
        for t in types:
            totals[t] += scores[t].fmeasure
    n = max(len(predictions), 1)
    return {t: 100 * v / n for t, v in totals.items()}


def bleu(
    predictions: Sequence[str], references: Sequence[str], tokenize: str = "13a"
) -> dict[str, float | str]:
    """Corpus sacreBLEU, with the signature that makes the number comparable."""
    _check(predictions, references)
    metric = sacrebleu.BLEU(tokenize=tokenize)
    score = metric.corpus_score(list(predictions), [list(references)])
    return {"bleu": score.score, "bleu_signature": str(metric.get_signature())}


def chrf(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float | str]:
    _check(predictions, references)
    metric = sacrebleu.CHRF()
    score = metric.corpus_score(list(predictions), [list(references)])
    return {"chrf": score.score, "chrf_signature": str(metric.get_signature())}


def score(name: str, predictions: Sequence[str], references: Sequence[str]) -> float:
    """One number by name: rouge1, rouge2, rougeL, rougeLsum, bleu or chrf."""
    if name.startswith("rouge"):
        return rouge(predictions, references)[name]
    if name == "bleu":
        return float(bleu(predictions, references)["bleu"])
    if name == "chrf":
        return float(chrf(predictions, references)["chrf"])
    raise ValueError(f"unknown metric {name!r}")


def _check(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(
            f"{len(predictions)} predictions but {len(references)} references: counts must match"
        )
