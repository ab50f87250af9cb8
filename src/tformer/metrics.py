"""Text-generation metrics through the libraries the field trusts: ``rouge-score`` and
``sacrebleu``. Pure functions of (predictions, references).

References: one string per example, or a list of strings per example (several references).
Combination rule for several references:
- ROUGE: per example, the reference giving the highest F1 for each ROUGE type
  (``rouge_score.RougeScorer.score_multi``), then the mean over examples.
- BLEU and chrF: sacreBLEU's multi-reference corpus statistics (n-gram counts clipped by the
  maximum count in any reference; BLEU's brevity penalty uses the closest reference length).
  Examples with fewer references are padded with None, which sacreBLEU ignores.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import sacrebleu
from rouge_score import rouge_scorer, tokenizers

References = Sequence[str] | Sequence[Sequence[str]]
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")

# CJK ideographs, kana and hangul: scripts written without spaces between words.
_NO_SPACE_SCRIPTS = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]")


class _CharTokenizer(tokenizers.Tokenizer):
    """ROUGE on characters (whitespace dropped) for languages written without spaces.
    rouge-score's default tokenizer keeps only [a-z0-9], so Chinese would always score 0."""

    def tokenize(self, text: str) -> list[str]:
        return [c for c in text if not c.isspace()]


def is_unsegmented(texts: Sequence[str], threshold: float = 0.3) -> bool:
    """True when the texts are mostly in a script written without spaces (Chinese, Japanese,
    Korean hangul counted too): character-level ROUGE and sacreBLEU's ``zh`` tokenizer apply."""
    sample = "".join(texts[:200])
    letters = [c for c in sample if c.isalpha()]
    if not letters:
        return False
    return sum(bool(_NO_SPACE_SCRIPTS.match(c)) for c in letters) / len(letters) >= threshold


def _as_lists(references: References) -> list[list[str]]:
    return [[r] if isinstance(r, str) else list(r) for r in references]


def rouge(predictions: Sequence[str], references: References, chars: bool = False) -> dict[str, float]:
    """Mean F1 ×100 of ROUGE-1/2/L/Lsum. Latin text: rouge-score's tokenizer with Porter
    stemming (the setup of most summarization papers). ``chars``: ROUGE on characters.
    ROUGE-Lsum splits texts into sentences at newlines."""
    refs = _as_lists(references)
    _check(predictions, refs)
    scorer = rouge_scorer.RougeScorer(
        list(ROUGE_TYPES), use_stemmer=not chars, tokenizer=_CharTokenizer() if chars else None
    )
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for prediction, targets in zip(predictions, refs):
        scores = scorer.score_multi(targets, prediction)
        for t in ROUGE_TYPES:
            totals[t] += scores[t].fmeasure
    n = max(len(predictions), 1)
    return {t: 100 * v / n for t, v in totals.items()}


def _streams(references: References) -> list[list[str | None]]:
    refs = _as_lists(references)
    width = max((len(r) for r in refs), default=1)
    return [[r[i] if i < len(r) else None for r in refs] for i in range(width)]


def bleu(predictions: Sequence[str], references: References, tokenize: str = "13a") -> dict:
    """Corpus sacreBLEU, with the signature that makes the number comparable."""
    _check(predictions, _as_lists(references))
    metric = sacrebleu.BLEU(tokenize=tokenize)
    result = metric.corpus_score(list(predictions), _streams(references))
    return {"bleu": result.score, "bleu_signature": str(metric.get_signature())}


def chrf(predictions: Sequence[str], references: References) -> dict:
    """Corpus chrF (character n-gram F-score, β = 2), with its signature."""
    _check(predictions, _as_lists(references))
    metric = sacrebleu.CHRF()
    result = metric.corpus_score(list(predictions), _streams(references))
    return {"chrf": result.score, "chrf_signature": str(metric.get_signature())}


def moses_lowercase(texts: Sequence[str], lang: str) -> list[str]:
    """Lowercase, Moses punctuation normalisation, Moses tokenisation (``sacremoses``, which
    reproduces the Moses perl scripts): how older MT papers prepared text before BLEU."""
    # import time: measured 1.5 s for sacremoses; only Moses-tokenised BLEU needs it
    from sacremoses import MosesPunctNormalizer, MosesTokenizer

    normalizer, tokenizer = MosesPunctNormalizer(lang=lang), MosesTokenizer(lang=lang)
    return [
        tokenizer.tokenize(normalizer.normalize(t.lower()), escape=False, return_str=True)
        for t in texts
    ]


def moses_bleu(predictions: Sequence[str], references: References, lang: str) -> dict:
    """BLEU on lowercased, punctuation-normalised, Moses-tokenised text: the measure of the
    published small-Transformer Multi30k figures (fairseq's scorer and ``multi-bleu.perl`` on
    tokenised text). Not comparable with detokenised sacreBLEU; reported beside it. The text
    is prepared by :func:`moses_lowercase`, then scored by sacreBLEU with ``tokenize=none``."""
    refs = _as_lists(references)
    _check(predictions, refs)
    prepared = [moses_lowercase(r, lang) for r in refs]
    metric = sacrebleu.BLEU(tokenize="none")
    result = metric.corpus_score(moses_lowercase(predictions, lang), _streams(prepared))
    return {
        "bleu_moses_lc": result.score,
        "bleu_moses_lc_signature": f"lowercase+moses-normalize+moses-tokenize({lang})|"
                                   f"{metric.get_signature()}",
    }


def all_metrics(predictions: Sequence[str], references: References, language: str = "auto",
                moses_lang: str | None = None) -> dict:
    """ROUGE-1/2/L/Lsum, BLEU and chrF. ``language``: ``zh`` (character ROUGE, sacreBLEU's
    ``zh`` tokenizer), ``latin`` (word ROUGE with stemming, ``13a``), or ``auto`` (decided
    from the references' script). ``moses_lang`` (e.g. "de"): also :func:`moses_bleu`."""
    refs = _as_lists(references)
    if language == "auto":
        language = "zh" if is_unsegmented([r[0] for r in refs]) else "latin"
    if language not in ("zh", "latin"):
        raise ValueError(f"language must be 'zh', 'latin' or 'auto', got {language!r}")
    zh = language == "zh"
    return {
        "language": language,
        "rouge_tokenization": "characters" if zh else "rouge-score default + Porter stemmer",
        **rouge(predictions, refs, chars=zh),
        **bleu(predictions, refs, tokenize="zh" if zh else "13a"),
        **chrf(predictions, refs),
        **(moses_bleu(predictions, refs, moses_lang) if moses_lang else {}),
    }


def score(name: str, predictions: Sequence[str], references: References) -> float:
    """One number by name (rouge1, rouge2, rougeL, rougeLsum, bleu, chrf), with the script
    of the references chosen automatically: the validation metric of training."""
    zh = is_unsegmented([r[0] for r in _as_lists(references)])
    if name in ROUGE_TYPES:
        return rouge(predictions, references, chars=zh)[name]
    if name == "bleu":
        return float(bleu(predictions, references, tokenize="zh" if zh else "13a")["bleu"])
    if name == "chrf":
        return float(chrf(predictions, references)["chrf"])
    raise ValueError(f"unknown metric {name!r}; choose one of {[*ROUGE_TYPES, 'bleu', 'chrf']}")


def _check(predictions: Sequence[str], references: list[list[str]]) -> None:
    if len(predictions) != len(references):
        raise ValueError(
            f"{len(predictions)} predictions but {len(references)} references: counts must match"
        )
    for i, refs in enumerate(references):
        if not refs or not any(r and r.strip() for r in refs):
            raise ValueError(f"reference {i + 1} is empty")
