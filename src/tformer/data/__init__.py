"""The data layer: load examples, tokenise them, batch them by length, pad them.

- `loading`: files or Hub datasets to a `datasets.Dataset` of ``{source, target}`` strings.
- `encoding`: texts to ``input_ids``/``labels``, with truncation counted.
- `batching`: length-bucketed, token-budget batches, resumable mid-epoch.
- `collate`: padding, attention mask, -100 labels and shifted decoder inputs; a language
  model's windows stacked.
- `packing`: a language model's documents packed into one token stream, and its windows.
- `corpus`: the embedded demo corpus (the docstrings of the installed packages), needing no
  download.
"""

from tformer.data.batching import TokenBudgetBatchSampler, padding_fraction
from tformer.data.collate import CausalLMCollator, Seq2SeqCollator
from tformer.data.corpus import (
    corpus_fingerprint,
    default_cache_dir,
    docstring_corpus,
    first_sentence_baseline,
    installed_roots,
)
from tformer.data.encoding import TruncationReport, sequence_lengths, tokenize_examples
from tformer.data.loading import (
    DataError,
    DocumentReport,
    EvalExamples,
    LoadReport,
    load_documents,
    load_eval_examples,
    load_examples,
    load_splits,
)

__all__ = [
    "CausalLMCollator",
    "DataError",
    "DocumentReport",
    "EvalExamples",
    "LoadReport",
    "Seq2SeqCollator",
    "TokenBudgetBatchSampler",
    "TruncationReport",
    "corpus_fingerprint",
    "default_cache_dir",
    "docstring_corpus",
    "first_sentence_baseline",
    "installed_roots",
    "load_documents",
    "load_eval_examples",
    "load_examples",
    "load_splits",
    "padding_fraction",
    "sequence_lengths",
    "tokenize_examples",
]
