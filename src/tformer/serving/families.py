"""What the continuous batcher (`tformer.serving.continuous`) does differently for tformer's
two model families, behind one small interface, so that its scheduling (admit, step, retire)
is one code path for both:

- `EncoderDecoder` (`tformer.hf.TformerForConditionalGeneration`): a newcomer's source is
  encoded, its cross-attention keys and values join the slot cache (`SourceSlots`), and its row
  starts from the decoder's start token with an empty history. Its output is stripped, as
  `tformer.generation.generate_texts` strips it.
- `DecoderOnly` (`tformer.hf.TformerForCausalLM`, the gpt2 and llama presets): a newcomer's
  prompt is *prefilled*: every token but its last runs through the model once, in one batched
  forward pass of the newcomers, and their keys and values fill the row's slot of a
  self-attention-only cache; the last prompt token is the row's first input, so its first new
  token comes from the next step shared by all rows, at the row's own position (learned
  positions and RoPE alike: positions are per row). Its output continues the prompt, not
  stripped.

A decoder-only row reads its context as `tformer.generation.continue_prompts` does, so that
its tokens equal ``generate()``'s: a prompt and continuation that fit the context are one
window; a longer one slides (`Window`): a quarter of the context at a time, each window the
last tokens that leave room for it, re-prefilled into the row's slot when the last one is
used up. So a prompt longer than the context keeps its end and still answers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from tformer.generation import max_source_length_of
from tformer.hf import TformerForCausalLM, TformerForConditionalGeneration
from tformer.model import KVCache
from tformer.serving.batching import Job
from tformer.serving.slot_cache import Encoded, History, SlotCache, SourceSlots, concat_encoded


@dataclass
class Entry:
    """What admitting ``k`` texts gives each new row."""

    first: Tensor  # (k,) its first input token
    rooms: list[int]  # steps it may take before its window (context) is used up
    windows: list[Window | None]  # how a decoder-only row slides (None: it never does)


@dataclass(frozen=True)
class Window:
    """How a decoder-only row reads its context, as `tformer.generation.continue_prompts`:
    its prompt ids, the context (the most tokens the model reads) and the step of a slide."""

    prompt: list[int]
    context: int
    step: int

    def next(self, new: list[int], max_new: int) -> tuple[list[int], int]:
        """The tokens the row reads after generating ``new`` (its whole window: the last one
        is its next input) and how many steps it may take on them."""
        if not new and len(self.prompt) + max_new <= self.context:
            return self.prompt, max_new  # it fits: one window for the whole answer
        count = min(self.step, max_new - len(new))
        return (self.prompt + new)[-(self.context - count):], count


class Family(Protocol):
    """One model family's side of continuous batching."""

    #: Whether a newcomer's admission has a part that can run ahead, elsewhere (the encoder
    #: pass: `tformer.serving.process` runs it in the server's process).
    encodes: bool
    eos_ids: set[int]

    def new_cache(self, capacity: int) -> SlotCache: ...

    def steps(self, texts: list[str], options: dict[str, Any]) -> bool:
        """Whether this family can decode the job step by step (else: ``generate()``)."""
        ...

    def admit(self, cache: SlotCache, jobs: list[Job]) -> Entry:
        """Give the jobs' texts new slots of ``cache``; raises, leaving it as it was, when a
        text cannot be admitted."""
        ...

    def logits(self, cache: SlotCache, last: Tensor, positions: Tensor,
               target_mask: Tensor) -> Tensor:
        """One step: the next-token logits (n, V) of every slot in use, fed ``last`` (n,)."""
        ...

    def slide(self, cache: SlotCache, slots: list[int], windows: list[Window],
              tokens: list[list[int]], max_new: list[int]) -> list[int]:
        """New windows for running ``slots`` whose window is used up; their new rooms."""
        ...

    def text(self, tokens: list[int]) -> str:
        """A row's answer."""
        ...


def family_of(seq2seq) -> Family | None:
    """The family of a `tformer.Seq2Seq` holding one of tformer's own models on the torch
    engine; None for anything else (a Hugging Face model, another engine)."""
    model = getattr(seq2seq, "model", None)
    if getattr(seq2seq, "engine", None) != "torch":
        return None
    if isinstance(model, TformerForConditionalGeneration):
        return EncoderDecoder(model, seq2seq.tokenizer)
    if isinstance(model, TformerForCausalLM):
        return DecoderOnly(model, seq2seq.tokenizer)
    return None


def eos_ids_of(model) -> set[int]:
    """The end-of-sequence ids ``generate()`` stops at: the generation config's, else the
    model config's."""
    eos = model.generation_config.eos_token_id
    eos = eos if eos is not None else model.config.eos_token_id
    return set(eos) if isinstance(eos, list | tuple) else {eos}


def _slot_cache(core: torch.nn.Module, capacity: int, source: SourceSlots | None) -> SlotCache:
    attention = core.decoder.layers[0].self_attn
    return SlotCache(capacity, len(core.decoder.layers), attention.n_kv_heads,
                     attention.head_dim, next(core.parameters()), source)


class EncoderDecoder:
    """tformer's encoder-decoder Transformer, with or without copy attention (whose output
    reads the source ids, kept per slot)."""

    encodes = True

    def __init__(self, model: TformerForConditionalGeneration, tokenizer) -> None:
        generation = model.generation_config
        self.core = model.model  # tformer.model.Transformer
        self.tokenizer = tokenizer
        self.start_id = (generation.decoder_start_token_id
                         if generation.decoder_start_token_id is not None
                         else model.config.decoder_start_token_id)
        self.eos_ids = eos_ids_of(model)
        self.pad_id = model.config.pad_token_id
        embeddings = self.core.tgt_embed
        self.max_positions = embeddings.max_positions if embeddings.learned is not None else None

    def new_cache(self, capacity: int) -> SlotCache:
        return _slot_cache(self.core, capacity, SourceSlots(capacity, len(self.core.decoder.layers)))

    def steps(self, texts: list[str], options: dict[str, Any]) -> bool:
        """Within the position table (learned positions): a request that would overrun it must
        fail alone, so it goes to ``generate()``."""
        n = options.get("max_new_tokens", 0)
        return self.max_positions is None or n <= self.max_positions

    def admit(self, cache: SlotCache, jobs: list[Job]) -> Entry:
        """Encode the texts not encoded already (`encode`) and join them all, with an empty
        history: their first step (from the start token) is the next step of the batch. (The
        jobs not encoded come first: they are encoded together, as one part.)"""
        fresh = [job for job in jobs if job.encoded is None]
        if jobs[: len(fresh)] != fresh:
            raise ValueError("the jobs to encode come before those encoded already")
        parts = [job.encoded for job in jobs if job.encoded is not None]
        if fresh:
            parts.insert(0, self.encode(*self.tokenize(fresh)))
        encoded = parts[0] if len(parts) == 1 else concat_encoded(parts)
        k = encoded[2].size(0)
        cache.join(k, encoded=encoded)  # last: a failure leaves the cache as it was
        first = torch.full((k,), self.start_id, dtype=torch.long, device=cache.lengths.device)
        return Entry(first, [job.options["max_new_tokens"] for job in jobs for _ in job.texts],
                     [None] * k)

    def tokenize(self, jobs: list[Job]) -> tuple[Tensor, Tensor]:
        """The jobs' texts as source ids and mask (k, S)."""
        # one tokenizer call per distinct max_source_length (usually one for all the jobs)
        limits = [job.options.get("max_source_length") for job in jobs for _ in job.texts]
        texts = [text for job in jobs for text in job.texts]
        ids: list[list[int]] = [[] for _ in texts]
        for limit in dict.fromkeys(limits):
            at = [i for i, x in enumerate(limits) if x == limit]
            encoded = self.tokenizer([texts[i] for i in at], truncation=True,
                                     max_length=limit)["input_ids"]
            for i, x in zip(at, encoded):
                ids[i] = x
        width = max(1, max(len(x) for x in ids))
        source = torch.full((len(ids), width), self.pad_id, dtype=torch.long)
        source_mask = torch.zeros(len(ids), width, dtype=torch.bool)
        for i, x in enumerate(ids):
            source[i, : len(x)] = torch.tensor(x, dtype=torch.long)
            source_mask[i, : max(len(x), 1)] = True  # an empty text still has one position
        return source, source_mask

    @torch.inference_mode()
    def encode(self, source: Tensor, source_mask: Tensor) -> Encoded:
        """Cross-attention keys and values, encoder output (k, S, D), source mask and ids of
        the new texts. The keys and values of every layer are stacked into one tensor, as the
        slot cache keeps them (`SourceSlots`) and the batcher's process receives them, so that
        joining them is one copy."""
        device = self.core.src_embed.token.weight.device
        source, source_mask = source.to(device), source_mask.to(device)
        memory = self.core.encode(source, source_mask).hidden
        layers = self.core.decoder.layers
        kv = torch.stack([x for layer in layers for x in layer.cross_attn.memory_kv(memory)])
        return kv.unflatten(0, (len(layers), 2)), memory, source_mask, source

    def logits(self, cache: SlotCache, last: Tensor, positions: Tensor,
               target_mask: Tensor) -> Tensor:
        memory, source_mask = cache.source.begin_step(cache.n)
        hidden = self.core.decode(last[:, None], memory, source_mask, cache, positions=positions,
                                  target_mask=target_mask).hidden
        return self.core.output(hidden, memory, cache.source.ids(cache.n), source_mask)[:, -1]

    def slide(self, cache: SlotCache, slots: list[int], windows: list[Window],
              tokens: list[list[int]], max_new: list[int]) -> list[int]:
        raise RuntimeError("an encoder-decoder row's room is its max_new_tokens: it never slides")

    def text(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True).strip()


class DecoderOnly:
    """tformer's decoder-only Transformer (`tformer.model.DecoderOnlyTransformer`)."""

    encodes = False

    def __init__(self, model: TformerForCausalLM, tokenizer) -> None:
        self.core = model.model  # tformer.model.DecoderOnlyTransformer
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids_of(model)
        self.end_of_text = tokenizer.eos_token_id  # an empty prompt, as continue_prompts
        self.pad_id = (tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                       else self.end_of_text)
        self.limit = max_source_length_of(model, tokenizer)

    def new_cache(self, capacity: int) -> SlotCache:
        return _slot_cache(self.core, capacity, None)

    def steps(self, texts: list[str], options: dict[str, Any]) -> bool:
        return True  # a continuation longer than the context slides (Window)

    def admit(self, cache: SlotCache, jobs: list[Job]) -> Entry:
        """Tokenize the prompts as `tformer.generation.continue_prompts` does, prefill all but
        the last token of each one's first window, and join them."""
        windows, reads, rooms = [], [], []
        for job in jobs:
            context = min(job.options.get("max_source_length") or self.limit, self.limit)
            prompts = self.tokenizer(list(job.texts), add_special_tokens=False,
                                     verbose=False)["input_ids"]
            for ids in prompts:
                window = Window(ids or [self.end_of_text], context, max(1, context // 4))
                read, room = window.next([], job.options["max_new_tokens"])
                windows.append(window)
                reads.append(read)
                rooms.append(room)
        history, lengths = self.prefill([read[:-1] for read in reads])
        cache.join(len(reads), history, lengths)  # last: a failure leaves the cache as it was
        first = torch.tensor([read[-1] for read in reads], device=cache.lengths.device)
        return Entry(first, rooms, windows)

    @torch.inference_mode()
    def prefill(self, histories: list[list[int]]) -> tuple[History | None, list[int]]:
        """The keys and values of ``histories`` (one forward pass, right-padded: a row's
        history fills its first columns, as the slot cache keeps it; the padding after it is
        masked until overwritten) and their lengths. None when every history is empty."""
        lengths = [len(h) for h in histories]
        width = max(lengths)
        if width == 0:
            return None, lengths
        device = self.core.embed.token.weight.device
        ids = torch.full((len(histories), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(histories), width, dtype=torch.long)
        for i, h in enumerate(histories):
            ids[i, : len(h)] = torch.tensor(h, dtype=torch.long)
            mask[i, : len(h)] = 1
        kv = KVCache()
        self.core(ids.to(device), mask.to(device), cache=kv, logits_to_keep=1)
        return kv.self_kv, lengths

    def logits(self, cache: SlotCache, last: Tensor, positions: Tensor,
               target_mask: Tensor) -> Tensor:
        hidden = self.core.decode(last[:, None], cache, positions=positions,
                                  target_mask=target_mask).hidden
        return self.core.project(hidden[:, -1])

    def slide(self, cache: SlotCache, slots: list[int], windows: list[Window],
              tokens: list[list[int]], max_new: list[int]) -> list[int]:
        """Each row's next window (whose last token, the row's last output, is its next input
        already), re-prefilled into its slot."""
        reads, rooms = zip(*(w.next(t, m) for w, t, m in zip(windows, tokens, max_new)))
        history, lengths = self.prefill([read[:-1] for read in reads])
        cache.fill(slots, history, lengths)
        return list(rooms)

    def text(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)
