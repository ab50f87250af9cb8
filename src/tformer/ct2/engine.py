"""Generation through CTranslate2, behind the interface of :class:`tformer.generation.Seq2Seq`:
an encoder-decoder export runs on CTranslate2's ``Translator`` (:class:`CT2Seq2Seq`), a
decoder-only one on its ``Generator`` (:class:`CT2Generator`, which continues prompts).

The options mean what they mean for Hugging Face ``generate()`` (see
:func:`tformer.generation.generate_texts`), mapped onto ``Translator.translate_batch`` (and the
same names of ``Generator.generate_batch``):

==========================  =======================================================
generate()                  translate_batch
==========================  =======================================================
max_new_tokens              max_decoding_length (both count the end token)
(no minimum)                min_decoding_length=0 (CTranslate2's default is 1), or the
                            checkpoint's own ``min_length`` less the start token
num_beams                   beam_size
length_penalty              length_penalty (score / length ** penalty in both)
early_stopping              always True: the search ends when num_beams hypotheses are
                            finished (patience=1)
no_repeat_ngram_size        no_repeat_ngram_size
do_sample, top_k, top_p,    sampling_topk (1 = greedy; HF's top_k=0 = no limit = 0),
temperature                 sampling_topp, sampling_temperature
forced_bos_token_id         target_prefix = [that token]
forced_eos_token_id         max_decoding_length - 1: the forced last token is an end token,
                            which decoding removes anyway
batch_size, sorting         the same sorting by length, then one call per batch
==========================  =======================================================

Measured on tiny models (tests/test_ct2.py): greedy equals ``generate()`` token for token;
beam search equals ``generate(early_stopping=True)`` token for token. Two documented
differences remain. With the default ``early_stopping=False``, ``generate()`` keeps searching
while a running beam could still beat a finished one after length normalisation, so with
``length_penalty`` far from 0 it can return a longer hypothesis. And in beam search with
``no_repeat_ngram_size``, CTranslate2 renormalises the probabilities after banning n-grams
where ``generate()`` does not, so beam scores, and sometimes the winner, differ (greedy is
unaffected: banning does not change the arg max of the rest).

Inputs are tokenized by the checkpoint's own tokenizer (its ``</s>`` included), passed as token
strings, and outputs decoded with ``skip_special_tokens=True`` and stripped, as the torch path
does. CTranslate2 seeds its sampling generators once, when its worker threads start (a later
``ctranslate2.set_random_seed`` does not reach them): :func:`load_ct2` seeds them from torch's
seed, so ``torch.manual_seed(s)`` before ``tformer.load`` (the CLI's ``--seed``) makes a run
reproducible; successive calls on one engine continue the sequence, as torch's do.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from tformer.ct2.convert import export
from tformer.ct2.marker import TOKENIZER_DIR, is_exported, read_marker, require_ctranslate2
from tformer.generation import continue_prompts
from tformer.tokenization import load_tokenizer

log = logging.getLogger(__name__)


class _CT2Engine:
    """What both CTranslate2 engines share: the tokenizer, the export's settings (its marker)
    and ``generate``, which takes the options of ``Seq2Seq.generate``."""

    engine = "ctranslate2"

    def __init__(self, tokenizer: Any, settings: dict[str, Any], path: str = "") -> None:
        self.tokenizer = tokenizer
        self.settings = settings
        self.path = path

    def generate(self, texts: Sequence[str] | str, *, max_new_tokens: int = 128,
                 **options: Any) -> list[str] | str:
        """Generate for one text (returns a string) or many (returns a list, input order)."""
        single = isinstance(texts, str)
        out = self.generate_texts([texts] if single else list(texts),
                                  max_new_tokens=max_new_tokens, **options)
        return out[0] if single else out

    def end_tokens(self) -> dict[str, Any]:
        """``end_token``: the checkpoint's end-of-sequence tokens, where it names them."""
        eos = self.settings.get("eos_token_id")
        return {"end_token": self.tokenizer.convert_ids_to_tokens(list(eos))} if eos else {}


def search_options(*, num_beams: int = 1, length_penalty: float = 1.0,
                   no_repeat_ngram_size: int = 0, repetition_penalty: float = 1.0,
                   do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
                   top_p: float = 1.0) -> dict[str, Any]:
    """The keyword arguments of ``translate_batch`` and ``generate_batch`` (the same names in
    both) for the search options of ``generate()``: beam size, length penalty, n-gram ban,
    repetition penalty, sampling (the defaults are :func:`tformer.generation.generate_texts`').
    Both engines take these options as ``**search`` and pass them here, so that a misspelt one
    is a TypeError."""
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    options: dict[str, Any] = dict(beam_size=num_beams, length_penalty=length_penalty,
                                   no_repeat_ngram_size=no_repeat_ngram_size,
                                   repetition_penalty=repetition_penalty)
    if do_sample:
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        options.update(sampling_topk=top_k, sampling_topp=top_p,
                       sampling_temperature=temperature)
    return options


class CT2Seq2Seq(_CT2Engine):
    """A CTranslate2 ``Translator`` and its tokenizer: what ``tformer.load(...,
    engine="ctranslate2")`` returns for an encoder-decoder."""

    family = "seq2seq"

    def __init__(self, translator: Any, tokenizer: Any, settings: dict[str, Any],
                 path: str = "") -> None:
        super().__init__(tokenizer, settings, path)
        self.translator = translator

    def generate_texts(self, texts: Sequence[str], *, max_new_tokens: int, batch_size: int = 32,
                       max_source_length: int | None = None, early_stopping: bool | None = None,
                       progress: bool = False, **search: Any) -> list[str]:
        """One output per text, in input order: :func:`tformer.generation.generate_texts`
        through CTranslate2; ``search``: the beam and sampling options (:func:`search_options`).
        ``early_stopping`` is accepted for the same interface; CTranslate2's beam search always
        stops as ``generate(early_stopping=True)`` does."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        options = self.translate_options(max_new_tokens=max_new_tokens, **search)
        limit = self._source_limit(max_source_length)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]), reverse=True)
        outputs: list[str] = [""] * len(texts)
        prefix = self.settings.get("forced_bos_token_id")
        starts = range(0, len(order), batch_size)
        if progress:
            starts = tqdm(starts, desc="generate", unit="batch")
        for start in starts:
            chunk = order[start : start + batch_size]
            ids = self.tokenizer([texts[i] for i in chunk], truncation=limit is not None,
                                 max_length=limit)["input_ids"]
            source = [self.tokenizer.convert_ids_to_tokens(row) for row in ids]
            target_prefix = None
            if prefix is not None:
                target_prefix = [[self.tokenizer.convert_ids_to_tokens(prefix)]] * len(chunk)
            results = self.translator.translate_batch(source, target_prefix, **options)
            for i, result in zip(chunk, results):
                outputs[i] = self.decode(result.hypotheses[0])
        return outputs

    def translate_options(self, *, max_new_tokens: int, **search: Any) -> dict[str, Any]:
        """``translate_batch`` keyword arguments for these ``generate()`` options."""
        s = self.settings
        length = max_new_tokens
        if s.get("forced_eos_token_id") is not None:
            length = max(1, length - 1)
        if s.get("max_positions"):
            # The decoder's position table (start token included) bounds the output.
            length = min(length, s["max_positions"] - 1)
        # HF min_length counts the decoder start token; translate_batch counts outputs only.
        min_length = max(0, int(s.get("min_length") or 0) - 1)
        return dict(search_options(**search), max_decoding_length=length,
                    min_decoding_length=min(min_length, length), max_input_length=0,
                    **self.end_tokens())

    def decode(self, tokens: list[str]) -> str:
        """Output token strings to text, as ``batch_decode(skip_special_tokens=True)``."""
        ids = self.tokenizer.convert_tokens_to_ids(tokens)
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def _source_limit(self, max_source_length: int | None) -> int | None:
        """The truncation length of sources: ``max_source_length``, else the tokenizer's own
        limit (as the torch path), and never past the encoder's position table."""
        limit = max_source_length
        if limit is None:
            model_max = getattr(self.tokenizer, "model_max_length", None)
            limit = model_max if model_max and model_max < 1_000_000 else None
        table = self.settings.get("max_positions")
        if table:
            limit = table if limit is None else min(limit, table)
        return limit


class CT2Generator(_CT2Engine):
    """A CTranslate2 ``Generator`` (a decoder-only export) and its tokenizer: what
    ``tformer.load(..., engine="ctranslate2")`` returns for a decoder-only checkpoint.
    ``generate`` continues prompts as the torch engine does for such a model, through the same
    :func:`tformer.generation.continue_prompts` (encoding, context window, decoding): only the
    step that continues a batch of token ids is CTranslate2's ``generate_batch``."""

    family = "causal"

    def __init__(self, generator: Any, tokenizer: Any, settings: dict[str, Any],
                 path: str = "") -> None:
        super().__init__(tokenizer, settings, path)
        self.generator = generator

    def generate_texts(self, texts: Sequence[str], *, max_new_tokens: int, batch_size: int = 32,
                       max_source_length: int | None = None, early_stopping: bool | None = None,
                       progress: bool = False, report: dict | None = None,
                       on_text: Callable[[str], None] | None = None,
                       **search: Any) -> list[str]:
        """The continuation of each prompt, in input order: ``Seq2Seq.generate`` of a
        decoder-only model (:func:`tformer.generation.continue_texts`) through CTranslate2;
        ``search``: the beam and sampling options (:func:`search_options`).
        ``max_source_length`` is the context (default: the checkpoint's, as the torch
        engine's); ``early_stopping`` is accepted for the same interface (see CT2Seq2Seq)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        options = dict(search_options(**search), **self.end_tokens())

        def continue_ids(prompts: list[list[int]], count: int, streamer) -> list[list[int]]:
            return self.continue_ids(prompts, count, streamer, options)

        return continue_prompts(continue_ids, self.tokenizer, texts,
                                max_new_tokens=max_new_tokens, batch_size=batch_size,
                                context=max_source_length or self.settings["context"],
                                progress=progress, report=report, on_text=on_text)

    def continue_ids(self, prompts: list[list[int]], count: int, streamer: Any = None,
                     options: dict[str, Any] | None = None) -> list[list[int]]:
        """Up to ``count`` new token ids for each prompt (an end token included where it
        stopped), by ``generate_batch`` (`tformer.generation.ContinueIds`); ``options``: its
        keyword arguments (default: greedy, ending at the checkpoint's end tokens).

        Prompts of different lengths go in one call, unpadded: ``generate_batch`` feeds the
        first m - 1 tokens of every prompt at once (m the shortest prompt's length), forces the
        rest of each longer prompt in its decoding loop, and returns up to ``max_length`` new
        tokens per row. Where the shortest prompt has a single token (nothing fed at once) it
        returns the forced tokens as well and counts them in ``max_length``, so one-token
        prompts get a call of their own."""
        options = options if options is not None else dict(beam_size=1, **self.end_tokens())
        new: list[list[int]] = [[] for _ in prompts]
        for one_token in (True, False):
            rows = [i for i, p in enumerate(prompts) if (len(p) == 1) == one_token]
            if rows:
                calls = self._generate_batch([prompts[i] for i in rows], count, streamer, options)
                for i, ids in zip(rows, calls):
                    new[i] = ids
        return new

    def _generate_batch(self, prompts: list[list[int]], count: int, streamer: Any,
                        options: dict[str, Any]) -> list[list[int]]:
        """One ``generate_batch`` call (see :meth:`continue_ids`)."""
        callback = None
        if streamer is not None:  # one prompt (continue_prompts streams batches of one)
            streamer.put(torch.tensor(prompts[0]))  # the prompt: skipped, as generate() does

            def callback(step) -> bool:
                streamer.put(torch.tensor([step.token_id]))
                return False  # go on

        results = self.generator.generate_batch(
            [self.tokenizer.convert_ids_to_tokens(p) for p in prompts], max_length=count,
            include_prompt_in_result=False, return_end_token=True, callback=callback, **options)
        if streamer is not None:
            streamer.end()
        return [r.sequences_ids[0] for r in results]


def _device(device: str | None) -> tuple[str, int]:
    ctranslate2 = require_ctranslate2()
    if device is None:
        device = "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"
    kind, _, index = device.partition(":")
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda[:N]' for CTranslate2, got {device!r}")
    return kind, int(index or 0)


def load_ct2(path: str | Path, device: str | None = None, *, compute_type: str = "default",
             intra_threads: int = 0, inter_threads: int = 1) -> CT2Seq2Seq | CT2Generator:
    """A :class:`CT2Seq2Seq` (encoder-decoder) or :class:`CT2Generator` (decoder-only) for an
    exported directory (see :func:`tformer.ct2.export`), or for any checkpoint ``tformer
    export`` accepts, converted in memory (float32 weights; pass ``compute_type="int8"`` to
    quantize at load, as CTranslate2 does for any model).

    ``compute_type``: CTranslate2's, e.g. "default" (the stored type), "int8", "float16";
    ``intra_threads``: threads per translation (0 = CTranslate2's default).
    """
    ctranslate2 = require_ctranslate2()
    kind, index = _device(device)
    ctranslate2.set_random_seed(torch.initial_seed() % 2**32)  # see the module docstring
    args = dict(device=kind, device_index=index, compute_type=compute_type,
                intra_threads=intra_threads, inter_threads=inter_threads)

    def engine(exported: Path) -> CT2Seq2Seq | CT2Generator:
        # CTranslate2 reads model.bin into memory: the directory may go afterwards.
        settings = read_marker(exported)
        tokenizer = load_tokenizer(exported / TOKENIZER_DIR)
        if settings.get("decoder_only"):
            return CT2Generator(ctranslate2.Generator(str(exported), **args), tokenizer,
                                settings, str(path))
        return CT2Seq2Seq(ctranslate2.Translator(str(exported), **args), tokenizer, settings,
                          str(path))

    if is_exported(path):
        return engine(Path(str(path)).expanduser())
    log.info("converting %s to CTranslate2 in memory (`tformer export` saves the conversion)",
             path)
    with tempfile.TemporaryDirectory(prefix="tformer-ct2-") as tmp:
        return engine(export(path, Path(tmp) / "model", quantization="float32"))
