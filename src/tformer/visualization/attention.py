"""Attention maps of one source/target pair, read from the model's explicit attention outputs.

Every seq2seq model tformer loads (its own through ``tformer.hf``, or a Hugging Face T5, BART,
Marian) returns, when called with ``output_attentions=True``, per layer tensors in the Hugging
Face layout (B, H, Tq, Tk): ``encoder_attentions`` (B, H, S, S), ``decoder_attentions``
(B, H, T, T) and ``cross_attentions`` (B, H, T, S). The maps here are exactly those tensors for
one example, with the padding cut off, so any tool reading that layout reads them too.

Teacher forcing, and what the target axis means: the target is tokenised as in training
(``tokenizer(text_target=...)``, with its ``</s>``), giving labels y_1 ... y_T; the decoder
reads ``[start, y_1, ..., y_{T-1}]`` (the training collator's shift) and position t predicts
y_t. ``target_tokens`` labels each decoder position with the token **predicted** there: row t of
a cross or decoder map is where the model looked while producing ``target_tokens[t]``.
``decoder_input_tokens`` labels the same positions with the token **read** there (the start
token, then the target shifted right): the key axis of decoder self-attention is best read with
those (column j of position j holds what the decoder had read at j).

A model with copy attention (`tformer.model.copy`) also gives, per target position, the copy
attention over the source and p_gen, the probability of generating rather than copying
(``copy_attention`` and ``p_gen``; None for other models).

A decoder-only model (tformer's ``gpt2`` / ``llama`` presets, ``GPT2LMHeadModel``,
``LlamaForCausalLM``, ...) has one kind, its causal self-attention, returned as ``attentions``
(B, H, T, T): kept under the kind "decoder" (it is a decoder stack), with no encoder and no
cross maps. There is one sequence, the prompt followed by its continuation (given, or
generated through ``seq2seq.generate``), read whole, so both axes are labelled with the token
**read** at each position (``target_tokens`` and ``decoder_input_tokens`` alike; position t
predicts the token read at t + 1), and ``prompt_length`` says how many leading tokens are the
prompt's. With grouped-query attention every query head has its map (the key/value heads are
shared, the weights are not). Being causal, the map of a sequence's first n tokens is the map of
those n tokens alone: a window of a longer text reads exactly as the text.

Dimension names: B batch, H heads, S source length, T target length.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from tformer.data import Seq2SeqCollator
from tformer.data.encoding import encode_pairs
from tformer.generation import encode_prompts, max_source_length_of
from tformer.visualization.tokens import readable_tokens

log = logging.getLogger(__name__)

KINDS = ("cross", "encoder", "decoder")  # the three kinds of maps, in the order shown


@dataclass
class AttentionMaps:
    """The attention of one example, per layer, heads first (all float32, rows sum to 1).

    Decoder-only (``prompt_length`` set): ``decoder`` alone, over the one sequence, whose
    tokens both label lists hold (see the module docstring); ``encoder`` and ``cross`` empty.
    """

    source_tokens: list[str]  # S readable labels (see tformer.visualization.tokens)
    target_tokens: list[str]  # T labels: the token predicted at each decoder position
    encoder: list[np.ndarray]  # per layer, (H, S, S)
    decoder: list[np.ndarray]  # per layer, (H, T, T), causal
    cross: list[np.ndarray]  # per layer, (H, T, S)
    decoder_input_tokens: list[str] = field(default_factory=list)  # T labels: the token read
    copy_attention: np.ndarray | None = None  # (T, S), for a model with copy attention
    p_gen: np.ndarray | None = None  # (T,) probability of generating (1 − p_gen: copying)
    prompt_length: int | None = None  # decoder-only: leading tokens that are the prompt

    @property
    def family(self) -> str:
        """"causal" for a decoder-only model's maps, else "seq2seq" (as `Seq2Seq.family`)."""
        return "seq2seq" if self.prompt_length is None else "causal"

    def kind(self, name: str) -> list[np.ndarray]:
        """The per-layer maps of ``name``: "cross", "encoder" or "decoder"."""
        if name not in KINDS:
            raise ValueError(f"attention kind must be one of {KINDS}, got {name!r}")
        return getattr(self, name)

    def kinds(self) -> list[str]:
        """The kinds this model has maps of, in the order shown: all three, or for a
        decoder-only model "decoder" alone."""
        return [name for name in KINDS if self.kind(name)]

    def axes(self, name: str) -> tuple[list[str], list[str]]:
        """(query labels, key labels) of the maps of kind ``name``: rows, then columns."""
        keys_read = self.decoder_input_tokens or self.target_tokens
        return {
            "cross": (self.target_tokens, self.source_tokens),
            "encoder": (self.source_tokens, self.source_tokens),
            "decoder": (self.target_tokens, keys_read),
        }[name]

    def counts(self) -> dict[str, dict[str, int]]:
        """{kind: {"layers": L, "heads": H}} for the three kinds."""
        return {name: {"layers": len(maps), "heads": int(maps[0].shape[0]) if maps else 0}
                for name in KINDS for maps in [self.kind(name)]}

    def to_json(self) -> dict:
        """Plain lists, JSON-serialisable: "encoder", "decoder", "cross" as
        [layer][head][query][key] (weights rounded to 4 decimals; [] for a kind the model does
        not have); "source_tokens", "target_tokens", "decoder_input_tokens"; "layers" and
        "heads", ints: the most over the three kinds (they agree for every model tformer loads;
        the lists' own lengths are exact), and "counts": {kind: {"layers", "heads"}};
        "family": "seq2seq" or "causal", and for "causal" "prompt_length"; with copy attention
        also "copy_attention" [query][key] and "p_gen" [query]."""

        def rounded(m: np.ndarray) -> list:
            return np.round(m.astype(np.float64), 4).tolist()

        def plain(maps: list[np.ndarray]) -> list:
            return [rounded(m) for m in maps]

        counts = self.counts()
        return {
            "source_tokens": list(self.source_tokens),
            "target_tokens": list(self.target_tokens),
            "decoder_input_tokens": list(self.decoder_input_tokens),
            "encoder": plain(self.encoder),
            "decoder": plain(self.decoder),
            "cross": plain(self.cross),
            "layers": max(c["layers"] for c in counts.values()),
            "heads": max(c["heads"] for c in counts.values()),
            "counts": counts,
            "family": self.family,
            **({} if self.prompt_length is None else {"prompt_length": self.prompt_length}),
            **({} if self.copy_attention is None else {
                "copy_attention": rounded(self.copy_attention), "p_gen": rounded(self.p_gen)}),
        }


def attention_maps(
    seq2seq,
    source: str,
    target: str | None = None,
    *,
    max_new_tokens: int = 64,
    max_source_length: int | None = None,
    **generation_options,
) -> AttentionMaps:
    """The attention maps of ``seq2seq`` (a :class:`tformer.generation.Seq2Seq`) on ``source``.

    With ``target`` None the target is generated first, through ``seq2seq.generate`` (the one
    generation path; ``max_new_tokens`` and ``generation_options`` such as ``num_beams`` go
    there). Then one teacher-forced forward pass with ``output_attentions=True`` gives the maps
    (see the module docstring for what the target axis means).

    A decoder-only model: ``source`` is the prompt and ``target`` its continuation, and
    ``max_source_length`` the context (by default the model's own, what it was trained on):
    the one it generates in, and the most tokens the maps hold (a longer prompt and
    continuation keep their end, as generation keeps a long prompt's end).
    """
    targets = None if target is None else [target]
    return attention_maps_batch(seq2seq, [source], targets, max_new_tokens=max_new_tokens,
                                max_source_length=max_source_length, **generation_options)[0]


def attention_maps_batch(
    seq2seq,
    sources: Sequence[str],
    targets: Sequence[str] | None = None,
    *,
    max_new_tokens: int = 64,
    max_source_length: int | None = None,
    **generation_options,
) -> list[AttentionMaps]:
    """:func:`attention_maps` for several examples at once (one padded forward pass); each
    result has its own lengths, the padding cut off.

    A generated target is read back from its text, and text does not always give back the
    same tokens (an untrained model's stray bytes come back as several tokens each): the
    target is then cut to ``max_new_tokens`` tokens and its ``</s>``, what generation allowed
    (a decoder-only model's continuation to ``max_new_tokens``).
    """
    if not sources:
        raise ValueError("sources: need at least one text")
    if not isinstance(getattr(seq2seq, "model", None), torch.nn.Module):
        raise ValueError(f"attention maps need a PyTorch model; this one runs on "
                         f"{getattr(seq2seq, 'engine', type(seq2seq).__name__)}")
    if targets is not None and len(targets) != len(sources):
        raise ValueError(f"targets: {len(targets)} texts for {len(sources)} sources")
    if seq2seq.family == "causal":
        return _causal_maps_batch(seq2seq, sources, targets, max_new_tokens, max_source_length,
                                  generation_options)
    max_target_length = None
    if targets is None:
        generated = seq2seq.generate(list(sources), max_new_tokens=max_new_tokens,
                                     max_source_length=max_source_length, **generation_options)
        targets, max_target_length = list(generated), max_new_tokens + 1
    model, tokenizer = seq2seq.model, seq2seq.tokenizer
    batch = collate_pairs(model, tokenizer, sources, targets, max_source_length, max_target_length)
    weights = teacher_forced_attentions(model, batch)
    copy_attention, p_gen = (weights.get(name, [None])[0] for name in ("copy_attention", "p_gen"))
    maps = []
    for b in range(len(sources)):
        s = int(batch["attention_mask"][b].sum())
        t = int((batch["labels"][b] != -100).sum())
        source_ids = batch["input_ids"][b, :s].tolist()
        label_ids = batch["labels"][b, :t].tolist()
        read_ids = batch["decoder_input_ids"][b, :t].tolist()
        maps.append(AttentionMaps(
            source_tokens=readable_tokens(tokenizer, source_ids),
            target_tokens=readable_tokens(tokenizer, label_ids),
            encoder=[_numpy(w[b, :, :s, :s]) for w in weights["encoder"]],
            decoder=[_numpy(w[b, :, :t, :t]) for w in weights["decoder"]],
            cross=[_numpy(w[b, :, :t, :s]) for w in weights["cross"]],
            decoder_input_tokens=readable_tokens(tokenizer, read_ids),
            copy_attention=None if copy_attention is None else _numpy(copy_attention[b, :t, :s]),
            p_gen=None if p_gen is None else _numpy(p_gen[b, :t]),
        ))
    return maps


def collate_pairs(model, tokenizer, sources: Sequence[str], targets: Sequence[str],
                  max_source_length: int | None = None,
                  max_target_length: int | None = None) -> dict[str, Tensor]:
    """Tokenise pairs as training does (`tformer.data.encoding.encode_pairs`) and collate them
    (right padding, labels shifted behind the decoder start token): input_ids, attention_mask
    (B, S); labels, decoder_input_ids (B, T). Sources are truncated as
    :func:`tformer.generation.generate_texts` truncates them (by default to the checkpoint's
    own limit); targets longer than ``max_target_length`` keep their first tokens and their
    last (``</s>``)."""
    if max_source_length is None:  # as generate_texts: the checkpoint's own limit
        max_source_length = max_source_length_of(model, tokenizer)
    source_ids, label_ids = encode_pairs(tokenizer, sources, targets, max_source_length,
                                         max_target_length)
    collate = Seq2SeqCollator(tokenizer.pad_token_id, model.config.decoder_start_token_id)
    return collate([{"input_ids": x, "labels": y} for x, y in zip(source_ids, label_ids)])


def teacher_forced_attentions(model, batch: dict[str, Tensor]) -> dict[str, list[Tensor]]:
    """One forward pass with ``output_attentions=True``: {"encoder": per layer (B, H, S, S),
    "decoder": (B, H, T, T), "cross": (B, H, T, S)}, float32 on the CPU, padding included (a
    padded source position gets weight 0 in every row). For tformer's own model with copy
    attention also "copy_attention": [(B, T, S)] and "p_gen": [(B, T)], read in the same pass
    (a hook on the copy layer)."""
    copy = getattr(getattr(model, "model", None), "copy", None)
    captured: list[tuple[Tensor, Tensor]] = []
    hook = None if copy is None else copy.register_forward_hook(
        lambda layer, args, _: captured.append(layer.weights(args[0], args[2], args[4])))
    try:
        out = _attention_pass(model, input_ids=batch["input_ids"],
                              attention_mask=batch["attention_mask"],
                              decoder_input_ids=batch["decoder_input_ids"])
    finally:
        if hook is not None:
            hook.remove()
    result = {"encoder": out.encoder_attentions, "decoder": out.decoder_attentions,
              "cross": out.cross_attentions}
    if captured:
        attention, gate = captured[-1]
        result.update(copy_attention=[attention], p_gen=[torch.sigmoid(gate[..., 0])])
    return _on_cpu(model, result)


# --- decoder-only models -------------------------------------------------------------------


def causal_attention_maps(model, tokenizer, rows: Sequence[Sequence[int]],
                          prompt_lengths: Sequence[int]) -> list[AttentionMaps]:
    """The causal self-attention maps of a decoder-only ``model`` on token id sequences
    ``rows``, each read whole (cut them to the model's context first), in one right-padded
    forward pass; ``prompt_lengths[i]``: how many leading tokens of row i are its prompt.
    Right padding changes no real position's map: a position sees no later key."""
    if not rows or min(len(row) for row in rows) < 1:
        raise ValueError("rows: need at least one sequence, each of at least one token")
    width = max(len(row) for row in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.tensor([[*row, *[pad] * (width - len(row))] for row in rows])  # (B, T)
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows])
    out = _attention_pass(model, input_ids=ids, attention_mask=mask)
    layers = _on_cpu(model, {"decoder": out.attentions})["decoder"]  # per layer (B, H, T, T)
    maps = []
    for b, (row, prompt_length) in enumerate(zip(rows, prompt_lengths)):
        t = len(row)
        tokens = readable_tokens(tokenizer, row)
        maps.append(AttentionMaps(
            source_tokens=[], target_tokens=tokens, encoder=[],
            decoder=[_numpy(w[b, :, :t, :t]) for w in layers], cross=[],
            decoder_input_tokens=list(tokens), prompt_length=int(prompt_length),
        ))
    return maps


def prompt_and_continuation(tokenizer, prompt: str, continuation: str, context: int,
                            max_new_tokens: int | None = None) -> tuple[list[int], int]:
    """The token ids of ``prompt`` followed by ``continuation``, and how many of them are the
    prompt's. The prompt is encoded as generation encodes it (`encode_prompts`), the
    continuation on its own (the tokens generation appended to the prompt's), cut to
    ``max_new_tokens`` when given: a generated text read back does not always give the same
    tokens. Past ``context`` tokens, the last ``context``."""
    head = encode_prompts(tokenizer, [prompt])[0]
    tail = tokenizer(continuation, add_special_tokens=False, verbose=False)["input_ids"]
    if max_new_tokens is not None:
        tail = tail[:max_new_tokens]
    dropped = max(0, len(head) + len(tail) - context)
    if dropped:
        log.info("prompt and continuation: %d tokens, past the %d-token context; the maps "
                 "show the last %d", len(head) + len(tail), context, context)
    return (head + tail)[dropped:], max(0, len(head) - dropped)


def _causal_maps_batch(seq2seq, prompts: Sequence[str], continuations: Sequence[str] | None,
                       max_new_tokens: int, context: int | None,
                       generation_options: dict) -> list[AttentionMaps]:
    """`attention_maps_batch` for a decoder-only model: ``context`` (None: the model's own)
    is the one the continuations are generated in and the most tokens of each map."""
    model, tokenizer = seq2seq.model, seq2seq.tokenizer
    if context is None:
        context = max_source_length_of(model, tokenizer)
    generated_limit = None
    if continuations is None:
        continuations = seq2seq.generate(list(prompts), max_new_tokens=max_new_tokens,
                                         max_source_length=context, **generation_options)
        generated_limit = max_new_tokens
    pairs = [prompt_and_continuation(tokenizer, p, c, context, generated_limit)
             for p, c in zip(prompts, continuations)]
    return causal_attention_maps(model, tokenizer, [ids for ids, _ in pairs],
                                 [n for _, n in pairs])


# --- one pass ------------------------------------------------------------------------------


@torch.inference_mode()
def _attention_pass(model, **inputs: Tensor):
    """``model(**inputs, output_attentions=True)`` in eval mode, with eager attention (see
    `_eager_attention`) and no cache, on the model's device; its mode is restored after."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with _eager_attention(model):
            return model(**{name: x.to(device) for name, x in inputs.items()},
                         output_attentions=True, use_cache=False, return_dict=True)
    finally:
        model.train(was_training)


def _on_cpu(model, result: dict[str, Sequence[Tensor | None] | None]) -> dict[str, list[Tensor]]:
    """The per-layer weights of ``result`` as float32 CPU tensors; a ValueError naming the
    kind when the model returned none."""
    for name, layers in result.items():
        if not layers or any(w is None for w in layers):
            raise ValueError(
                f"{type(model).__name__} returned no {name} attentions with "
                "output_attentions=True; this model cannot give attention maps"
            )
    return {name: [w.detach().float().cpu() for w in layers] for name, layers in result.items()}


@contextlib.contextmanager
def _eager_attention(model) -> Iterator[None]:
    """Run a Hugging Face model with its "eager" attention for the duration.

    Hugging Face's sdpa and flash kernels never form the (Tq, Tk) weight matrix, so under them
    ``output_attentions=True`` only logs a warning and the attentions come back None (BART
    loads with sdpa by default). The eager implementation computes the same outputs and
    returns the weights; the previous implementation is restored afterwards, so generation
    keeps the fast kernel. tformer's own model returns its weights from its math path
    whatever this setting says, so it is left alone.
    """
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    switch = (getattr(config, "model_type", None) != "tformer"
              and current not in (None, "eager") and hasattr(model, "set_attn_implementation"))
    if switch:
        log.debug("switching %s from %s to eager attention for the maps",
                  type(model).__name__, current)
        model.set_attn_implementation("eager")
    try:
        yield
    finally:
        if switch:
            model.set_attn_implementation(current)


def _numpy(weights: Tensor) -> np.ndarray:
    return weights.numpy().astype(np.float32, copy=True)
