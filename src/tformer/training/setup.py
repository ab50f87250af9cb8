"""What a run needs before its first step: the splits, the tokenizer, the tokenised data and
the model. Kept apart from the loop so the loop reads as the loop."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from datasets import Dataset, DatasetDict
from tokenizers import models as tokenizer_models
from transformers import AutoConfig

from tformer.data import (
    CausalLMCollator,
    DataError,
    Seq2SeqCollator,
    TokenBudgetBatchSampler,
    corpus_fingerprint,
    default_cache_dir,
    docstring_corpus,
    load_documents,
    load_examples,
    padding_fraction,
    sequence_lengths,
    sources,
    tokenize_examples,
)
from tformer.data.encoding import encode_pairs, truncate_all
from tformer.data.packing import RandomWindows, hold_out_tail, pack_documents, windows
from tformer.data.sft import (
    PackedCollator,
    Rows,
    encode_dialogues,
    pack_rows,
    row_batches,
    set_chat_template,
)
from tformer.hf import TformerConfig, TformerForCausalLM, TformerForConditionalGeneration
from tformer.hub import from_pretrained
from tformer.loading import load_model
from tformer.tokenization import load_tokenizer, train_tokenizer
from tformer.training.checkpoint import TrainState
from tformer.training.config import DECODER_ONLY_TASKS, Config, ConfigError
from tformer.training.stopping import TrainingError

log = logging.getLogger(__name__)

VALIDATION_FRACTION = 0.02  # carved from train when no validation split is given
VALIDATION_MAX = 500
LM_VALIDATION_FRACTION = 0.1  # lm: the last 10% of the text, as nanoGPT's split


TokenLists = tuple[list[list[int]], list[list[int]]]  # (input_ids, labels) of a split


@dataclass
class RunData:
    """Texts and token ids of every split, plus the statistics the report shows."""

    texts: DatasetDict  # columns source, target (lm: text)
    # split -> (input_ids, labels); lm: the split's token stream (`tformer.data.packing`)
    tokens: dict[str, TokenLists | np.ndarray]
    stats: dict = field(default_factory=dict)


def load_texts(config: Config) -> tuple[DatasetDict, dict]:
    """The splits as text. ``data.train`` None = the embedded docstring corpus, whose size
    and SHA-256 go into the stats (it depends on the packages installed)."""
    d = config.data
    stats: dict = {}
    if d.task == "lm":
        return _load_documents(d, stats)
    if d.dataset is not None:
        splits = _load_dataset(d, stats)
    elif d.train is None:
        corpus = docstring_corpus(seed=config.train.seed, cache_dir=default_cache_dir())
        splits = dict(corpus)
        stats["corpus_examples"] = sum(len(split) for split in corpus.values())
        stats["corpus_sha256"] = corpus_fingerprint(corpus)
        stats["corpus"] = (f"docstrings of the installed packages (embedded): "
                           f"{stats['corpus_examples']:,} examples, "
                           f"sha256 {stats['corpus_sha256'][:16]}")
    else:
        options = dict(source_column=d.source_column, target_column=d.target_column,
                       prefix=d.prefix, hub_config=d.hub_config)
        splits = {}
        for split, path in (("train", d.train), ("validation", d.validation), ("test", d.test)):
            if path is None:
                continue
            cap = d.max_train_examples if split == "train" else None
            splits[split], report = load_examples(path, split=split, max_examples=cap, **options)
            stats[f"{split}_load"] = str(report)
    if d.train is None and d.dataset is None and d.max_train_examples:
        splits["train"] = splits["train"].select(range(min(d.max_train_examples,
                                                           len(splits["train"]))))
    if "validation" not in splits:
        n = min(max(int(len(splits["train"]) * VALIDATION_FRACTION), 1), VALIDATION_MAX)
        parts = splits["train"].train_test_split(test_size=n, seed=config.train.seed)
        splits["train"], splits["validation"] = parts["train"], parts["test"]
        log.info("no validation split given: held out %d training examples", n)
    stats["sizes"] = {k: len(v) for k, v in splits.items()}
    return DatasetDict(splits), stats


def _load_documents(d, stats: dict) -> tuple[DatasetDict, dict]:
    """``data.task: lm``: every split as documents (a column ``text``); without a validation
    split, the last 10% of the training text (`hold_out_tail`)."""
    if d.dataset is not None:
        where = {role: (w.path_or_name, w.split, w.hub_config, w.text_columns)
                 for role, w in sources.locate(d.dataset).items()}
        stats["dataset"] = d.dataset
    else:
        where = {role: (path, role, d.hub_config, (d.text_column,)) for role, path in
                 (("train", d.train), ("validation", d.validation), ("test", d.test)) if path}
    splits: dict[str, Dataset] = {}
    for role, (path, split, hub_config, columns) in where.items():
        try:
            splits[role], report = load_documents(
                path, split=split, columns=columns, hub_config=hub_config,
                max_documents=d.max_train_examples if role == "train" else None)
        except DataError as error:
            if d.dataset is None or Path(path).exists():
                raise
            raise sources.unavailable(d.dataset, error) from error
        stats[f"{role}_load"] = str(report)
    if "validation" not in splits:
        train, held_out = hold_out_tail(splits["train"]["text"], LM_VALIDATION_FRACTION)
        if not held_out or not train:
            raise DataError("the training text is too short to hold out a validation split; "
                            "give data.validation")
        splits["train"] = Dataset.from_dict({"text": train})
        splits["validation"] = Dataset.from_dict({"text": held_out})
        log.info("no validation split given: held out the last %d%% of the training text",
                 round(100 * LM_VALIDATION_FRACTION))
    stats["sizes"] = {k: len(v) for k, v in splits.items()}
    return DatasetDict(splits), stats


def _load_dataset(d, stats: dict) -> dict[str, Dataset]:
    """Every split of the named dataset, from the mirror or the Hub (`tformer.data.sources`)."""
    splits: dict[str, Dataset] = {}
    for role, where in sources.locate(d.dataset).items():
        cap = d.max_train_examples if role == "train" else None
        try:
            splits[role], report = load_examples(
                where.path_or_name, split=where.split, hub_config=where.hub_config,
                source_column=where.source_column, target_column=where.target_column,
                prefix=d.prefix, max_examples=cap)
        except DataError as error:
            if where.is_file:
                raise
            raise sources.unavailable(d.dataset, error) from error
        stats[f"{role}_load"] = str(report)
    stats["dataset"] = d.dataset
    return splits


def get_tokenizer(config: Config, run_dir: Path, train_texts: Dataset, is_main: bool = True):
    """The run's tokenizer: the pretrained model's, a given one, the one this run already
    trained (resume), or a new one trained on the training split (source and target). An sft
    run's has a chat template (`tformer.data.sft.set_chat_template`)."""
    tokenizer = _tokenizer(config, run_dir, train_texts, is_main)
    if config.data.task == "sft":
        set_chat_template(tokenizer, config.data.chat_template)
    return tokenizer


def _tokenizer(config: Config, run_dir: Path, train_texts: Dataset, is_main: bool):
    d = config.data
    saved = run_dir / "tokenizer"
    if config.model.pretrained is not None:
        return load_tokenizer(config.model.pretrained)
    if d.tokenizer is not None:
        return load_tokenizer(d.tokenizer)
    if (saved / "tokenizer.json").is_file():
        return load_tokenizer(saved)
    lm = d.task in DECODER_ONLY_TASKS
    columns = ("text",) if d.task == "lm" else ("source", "target")
    texts = (t for column in columns for t in train_texts[column])
    # a language model's tokenizer adds no token (the packing appends </s>, prompts are read
    # as they are), and its model_max_length is the context it is trained on
    tokenizer = train_tokenizer(texts, vocab_size=d.vocab_size, kind=d.tokenizer_kind,
                                append_eos=not lm)
    if lm:
        tokenizer.model_max_length = d.block_size
    if d.task == "sft":
        set_chat_template(tokenizer, d.chat_template)
    if is_main:  # every process trains the same (BPE is deterministic); one writes it
        tokenizer.save_pretrained(saved)
    return tokenizer


def tokenize_splits(config: Config, texts: DatasetDict, tokenizer) -> RunData:
    d = config.data
    data = RunData(texts=texts, tokens={})
    if d.task == "lm":
        if tokenizer.eos_token_id is None:
            raise ConfigError("data.task: lm joins documents with the tokenizer's end-of-text "
                              "(eos) token; data.tokenizer has none")
        for split, dataset in texts.items():
            data.tokens[split] = pack_documents(tokenizer, dataset["text"],
                                                tokenizer.eos_token_id)
        data.stats["tokens"] = {k: len(v) for k, v in data.tokens.items()}
        return data
    if d.task == "sft":
        for split, dataset in texts.items():
            encoded = encode_dialogues(tokenizer, dataset["source"], dataset["target"],
                                       d.block_size)
            data.tokens[split] = (encoded.inputs, encoded.labels)
            data.stats[f"{split}_truncation"] = {"examples": len(encoded.inputs),
                                                 "truncated": encoded.truncated}
        return data
    for split, dataset in texts.items():
        encoded, report = tokenize_examples(
            dataset, tokenizer, d.max_source_length, d.max_target_length
        )
        columns = encoded.to_dict()  # plain lists: collating indexes them every step
        data.tokens[split] = (columns["input_ids"], columns["labels"])
        data.stats[f"{split}_truncation"] = {
            "examples": report.examples,
            "truncated_sources": report.truncated_sources,
            "truncated_targets": report.truncated_targets,
        }
        if split == "train":
            data.stats["train_source_lengths"] = sequence_lengths(encoded, "input_ids")
            data.stats["train_target_lengths"] = sequence_lengths(encoded, "labels")
    return data


class TrainSplit:
    """The training split's token ids and token-budget batches, epoch by epoch.

    Without BPE-dropout both are the same every epoch (the batches shuffled by epoch). With
    ``data.bpe_dropout`` p > 0 (BPE-dropout, Provilkov et al. 2020) each epoch is encoded afresh
    by a copy of the tokenizer that skips each BPE merge with probability p, so a word reaches
    the model split in different ways from epoch to epoch, a regulariser for small corpora; the
    epoch's batches are then cut on its own lengths (cut on the plain ones, a batch's longest
    row grows and Multi30k batches were 31% padding instead of 5%). The main process encodes
    and ``share`` hands its ids to the others, so every process cuts the same batches.

    The `tokenizers` library draws the skips from its own unseeded generator: with p > 0 two
    runs, or a run and its resumption, see different splits (and batches) of the same text.
    """

    def __init__(self, config: Config, data: RunData, tokenizer,
                 share: Callable[[TokenLists | None], TokenLists], is_main: bool,
                 decoder_start_token_id: int) -> None:
        t, d = config.train, config.data
        self.collate = Seq2SeqCollator(tokenizer.pad_token_id, decoder_start_token_id)
        self._budget = {"max_tokens": t.max_tokens, "seed": t.seed}
        self._tokens = data.tokens["train"]
        self.sampler = TokenBudgetBatchSampler(*token_lengths(self._tokens), **self._budget)
        self._sampler = self.sampler  # this epoch's; self.sampler stays the plain encoding's
        self._epoch: int | None = None
        self._share, self._is_main = share, is_main
        self._limits = (d.max_source_length, d.max_target_length)
        self._dropping = None
        if d.bpe_dropout > 0:
            self._dropping = copy.deepcopy(tokenizer)
            backend = getattr(self._dropping, "backend_tokenizer", None)  # None: a slow one
            model = None if backend is None else backend.model
            if not isinstance(model, tokenizer_models.BPE):
                kind = type(tokenizer).__name__ if model is None else type(model).__name__
                raise ConfigError(
                    f"data.bpe_dropout={d.bpe_dropout} needs a fast BPE tokenizer; this run's "
                    f"tokenizer is {kind} (set data.tokenizer_kind: bpe)"
                )
            model.dropout = d.bpe_dropout
            self._texts = (list(data.texts["train"]["source"]),
                           list(data.texts["train"]["target"]))

    def stats(self) -> dict:
        """The padding fraction of the (plain encoding's) batches, for ``data_stats.json``."""
        return {"padding_fraction": padding_fraction(self.sampler.batches(0),
                                                     *token_lengths(self._tokens))}

    def tokens(self, epoch: int) -> TokenLists:
        """(input_ids, labels) of every training example in ``epoch``."""
        self._encode(epoch)
        return self._tokens

    def batches(self, epoch: int) -> list[list[int]]:
        """The batches (lists of example indices) of ``epoch``, in training order."""
        self._encode(epoch)
        return self._sampler.batches(epoch)

    def _encode(self, epoch: int) -> None:
        if self._dropping is None or epoch == self._epoch:
            return
        tokens = None
        if self._is_main:
            sources, targets = encode_pairs(self._dropping, *self._texts)
            tokens = (truncate_all(sources, self._limits[0], self._dropping),
                      truncate_all(targets, self._limits[1], self._dropping))
        self._tokens = self._share(tokens)
        self._sampler = TokenBudgetBatchSampler(*token_lengths(self._tokens), **self._budget)
        self._epoch = epoch


class LMTrainSplit:
    """A language model's training split (``data.task: lm``): its token stream, read in random
    windows of ``data.block_size`` (`tformer.data.packing.RandomWindows`),
    ``train.max_tokens / data.block_size`` windows a micro-batch. It has the shape of
    `TrainSplit` (``tokens``, ``batches``, ``collate``), so the loop and `micro_batches` take
    either: a batch is a list of window starts instead of example indices."""

    collate = CausalLMCollator()

    def __init__(self, config: Config, stream: np.ndarray) -> None:
        d, t = config.data, config.train
        self._tokens = windows(stream, d.block_size)
        self.sampler = RandomWindows(len(stream), d.block_size, t.max_tokens // d.block_size,
                                     t.seed)

    def stats(self) -> dict:
        return {"blocks_per_batch": self.sampler.batch_size,
                "batches_per_epoch": self.sampler.per_epoch}

    def tokens(self, epoch: int) -> tuple:
        return self._tokens

    def batches(self, epoch: int):
        return self.sampler.batches(epoch)


class SFTTrainSplit:
    """An sft training split (``data.task: sft``): each epoch, the examples in an order drawn
    from (seed, epoch), packed into rows of ``data.block_size`` tokens (`pack_rows`),
    ``train.max_tokens / data.block_size`` rows a micro-batch. A batch is a list of rows, a
    row a tuple of example indices; the shape of `TrainSplit` otherwise."""

    def __init__(self, config: Config, tokens: TokenLists, pad_token_id: int) -> None:
        d, t = config.data, config.train
        self.collate = PackedCollator(pad_token_id)
        self._tokens = (Rows(tokens[0]), Rows(tokens[1]))
        self._lengths = [len(x) for x in tokens[0]]
        self._block, self._rows, self._seed = d.block_size, t.max_tokens // d.block_size, t.seed
        self._epoch: tuple[int, list] | None = None

    def stats(self) -> dict:
        rows = [row for batch in self.batches(0) for row in batch]
        used = sum(self._lengths[i] for row in rows for i in row)
        return {"rows_per_batch": self._rows, "packed_rows": len(rows),
                "examples_per_row": len(self._lengths) / max(len(rows), 1),
                "packing_fill": used / max(len(rows) * self._block, 1)}

    def tokens(self, epoch: int) -> tuple[Rows, Rows]:
        return self._tokens

    def batches(self, epoch: int) -> list[list[tuple[int, ...]]]:
        if self._epoch is None or self._epoch[0] != epoch:
            order = np.random.default_rng([self._seed, epoch]).permutation(len(self._lengths))
            self._epoch = (epoch, row_batches(pack_rows(self._lengths, self._block, order),
                                              self._rows))
        return self._epoch[1]


def make_train_split(config: Config, data: RunData, tokenizer, model_config,
                     share: Callable, is_main: bool) -> TrainSplit | LMTrainSplit | SFTTrainSplit:
    """The training split of ``data.task``: its batches, token ids and collator."""
    if config.data.task == "lm":
        return LMTrainSplit(config, data.tokens["train"])
    if config.data.task == "sft":
        return SFTTrainSplit(config, data.tokens["train"], tokenizer.pad_token_id)
    return TrainSplit(config, data, tokenizer, share, is_main,
                      model_config.decoder_start_token_id)


def token_lengths(tokens: TokenLists) -> tuple[list[int], list[int]]:
    return [len(x) for x in tokens[0]], [len(y) for y in tokens[1]]


def build_model(config: Config, tokenizer):
    """The own Transformer sized by ``config.model`` (vocabulary from the tokenizer; for
    ``data.task: lm`` and ``sft`` the decoder-only model, `TformerForCausalLM`), or the
    pretrained checkpoint ``model.pretrained`` (a LoRA adapter, ``model.lora_r``, is added by
    `tformer.training.adapter`): for ``sft``, a causal checkpoint such as an lm run's.

    Pretrained weights are loaded in float32 whatever dtype they were saved in: the optimizer
    updates float32 master weights, and ``train.precision`` decides the compute dtype (bf16
    autocast). Training weights stored in bf16 or fp16 would lose most small updates.
    """
    m = config.model
    if m.pretrained is not None:
        model = load_model(m.pretrained, dtype=torch.float32)
        if model.config.is_encoder_decoder == (config.data.task in DECODER_ONLY_TASKS):
            family = "encoder-decoder" if model.config.is_encoder_decoder else "decoder-only"
            raise ConfigError(f"model.pretrained {m.pretrained!r} is a {family} model; "
                              f"data.task: {config.data.task} trains the other family")
        generation = model.generation_config
        if generation.max_new_tokens is None and generation.max_length is None:
            generation.max_new_tokens = config.train.max_new_tokens  # else generate() stops at 20
        if len(tokenizer) > model.get_input_embeddings().num_embeddings:
            raise ConfigError(
                f"model.pretrained {m.pretrained!r}: its tokenizer has {len(tokenizer)} tokens but "
                f"the model only {model.get_input_embeddings().num_embeddings} embeddings"
            )
        return model
    core = config.model.transformer_config(len(tokenizer), tokenizer.pad_token_id)
    if config.data.task in DECODER_ONLY_TASKS:
        # generation from nothing starts after an end of text, where every document starts
        hf_config = TformerConfig.from_transformer_config(
            core, bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
        model = TformerForCausalLM(hf_config)
        model.generation_config.max_new_tokens = config.train.max_new_tokens
        return model
    hf_config = TformerConfig.from_transformer_config(
        core,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.bos_token_id,
    )
    model = TformerForConditionalGeneration(hf_config)
    # checkpoints carry the recipe's output length: a bare generate() would stop at 20 tokens
    model.generation_config.max_new_tokens = config.train.max_new_tokens
    return model


def pretrained_model_type(config: Config) -> str | None:
    """``model_type`` of ``model.pretrained`` (e.g. "t5", "bart"), read from its config;
    None for the own model."""
    if config.model.pretrained is None:
        return None
    return from_pretrained(AutoConfig, config.model.pretrained, "model",
                           trust_remote_code=False).model_type


def resolve_precision(precision: str, config: Config) -> str:
    """"auto": bf16 on a GPU that has it (fp16 with loss scaling otherwise, but never for T5,
    whose activations overflow fp16: fp32 then); fp32 on CPU.

    On a CPU without bf16 units (this project's AVX2 host) bf16 is emulated: matmuls ran at
    1.2 GFLOP/s against 121-142 in fp32, and a training step of the ``small`` model was 4-5x
    slower under autocast. On a host with AVX512-BF16 the ``small`` model's step was only
    1.04x faster under autocast (Hugging Face T5: 1.3-1.4x), and the Multi30k recipe's
    d_model-128 model slower (docs/benchmarks.md, "Training throughput"). So CPU runs default
    to fp32; ``train.precision=bf16`` asks for autocast anyway."""
    if precision == "fp16" and _overflows_fp16(config):
        log.warning("train.precision=fp16 with a T5-family model: T5's activations overflow "
                    "fp16 (inf/NaN loss). Use train.precision=bf16 (or fp32).")
    if precision != "auto":
        return {"fp32": "no"}.get(precision, precision)
    if torch.cuda.is_available():
        if torch.cuda.is_bf16_supported():
            return "bf16"
        if _overflows_fp16(config):
            log.info("precision auto: no bf16 on this GPU, and T5 overflows fp16: fp32")
            return "no"
        return "fp16"
    return "no"


def _overflows_fp16(config: Config) -> bool:
    """T5-family checkpoints overflow fp16 (feed-forward activations beyond 65504)."""
    return pretrained_model_type(config) in ("t5", "mt5", "umt5", "longt5", "switch_transformers")


def build_optimizer(model: torch.nn.Module, config: Config) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases, norms and embeddings (decaying them only hurts)."""
    t = config.train
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "embed" in name or "shared" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": t.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=t.lr, betas=t.adam_betas, eps=t.adam_eps)


def micro_batches(sampler: TrainSplit | LMTrainSplit, state: TrainState, world: int,
                  rank: int):
    """This process's batches, forever, epoch after epoch, from ``state``'s position.

    Every process computes the same global batch order from (seed, epoch; with
    ``data.bpe_dropout``, also the main process's encoding of that epoch, which every process
    receives) and takes every ``world``-th batch: processes see different batches, and the
    position in the data is one number (global batches consumed) that survives a resume. The
    epoch's last ``len % world`` batches are dropped so all processes take the same number of
    steps.
    """
    while True:
        order = sampler.batches(state.epoch)
        usable = len(order) - len(order) % world
        if usable == 0:
            raise TrainingError(
                f"the training split gives {len(order)} batch(es) for {world} process(es); "
                "lower train.max_tokens or add data"
            )
        for position in range(state.batches_in_epoch + rank, usable, world):
            yield order[position]
        state.epoch += 1
        state.batches_in_epoch = 0


def sharer(accelerator: Accelerator):
    """The main process's object, on every process (``data.bpe_dropout``'s epoch encodings)."""
    if accelerator.num_processes == 1:
        return lambda obj: obj
    return lambda obj: broadcast_object_list([obj], from_process=0)[0]
