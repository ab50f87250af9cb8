"""After a run: the work that reads its checkpoints rather than trains them. `train` does none
of it; `tformer.recipe.run_recipe` (``tformer train``, ``tformer demo``) calls
:func:`finish_run`, then draws the loss plot and writes the report.

- the LoRA merge (``train.merge_lora``): the best and last checkpoints rewritten with the
  adapter merged in (`tformer.training.adapter`);
- the test score: the best checkpoint on the whole test split, through
  `tformer.evaluation.evaluate_examples`: ``test_metrics.json`` and
  ``test_predictions.jsonl`` in the run directory (a language model: its loss and perplexity,
  `tformer.evaluation.evaluate_documents`, ``test_metrics.json``).
"""

from __future__ import annotations

import logging

from tformer.data.sft import chat_prompts
from tformer.engines import load
from tformer.evaluation import evaluate_documents, evaluate_examples
from tformer.training.adapter import trained_weights
from tformer.training.config import Config
from tformer.training.loop import TrainResult

log = logging.getLogger(__name__)


def finish_run(result: TrainResult, config: Config) -> dict | None:
    """Merge LoRA checkpoints and score the best one on the test split (main process; not
    after an interrupted run, whose checkpoints are for ``--resume``). Returns the test
    metrics, or None."""
    if not result.main_process or result.stopped_by == "interrupted":
        return None
    if config.train.merge_lora:
        weights = trained_weights(config)
        for path in {p for p in (result.best_checkpoint, result.last_checkpoint) if p}:
            weights.merge_into(path, result.tokenizer)
    if result.test is None or result.best_checkpoint is None:
        return None
    return evaluate_test(result, config)


def evaluate_test(result: TrainResult, config: Config) -> dict:
    """The best checkpoint on the whole test split (``test_metrics.json``,
    ``test_predictions.jsonl``)."""
    t, test = config.train, result.test
    seq2seq = load(result.best_checkpoint, device=result.device, engine="torch")
    if config.data.task == "lm":
        metrics = evaluate_documents(seq2seq, test["text"], data="test split",
                                     output_dir=result.run_dir, file_prefix="test_",
                                     block_size=config.data.block_size, max_tokens=t.max_tokens)
        log.info("test (%d tokens): loss %.4f, perplexity %.2f", metrics["tokens"],
                 metrics["loss"], metrics["perplexity"])
        return metrics
    sources, limit = test["source"], config.data.max_source_length
    if config.data.task == "sft":  # the responses to the rendered prompts
        sources, limit = chat_prompts(seq2seq.tokenizer, sources), config.data.block_size
    metrics = evaluate_examples(
        seq2seq, [str(i) for i in range(len(test))], sources,
        [[target] for target in test["target"]], data="test split", output_dir=result.run_dir,
        file_prefix="test_", max_source_length=limit, **t.generation_options(),
    )
    log.info("test (%d examples): ROUGE-L %.2f, BLEU %.2f", len(test), metrics["rougeL"],
             metrics["bleu"])
    return metrics
