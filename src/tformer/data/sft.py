"""Instruction tuning data (``data.task: sft``): prompt/response pairs rendered with the
tokenizer's chat template, scored on the response only, several to a packed row.

- `DEFAULT_CHAT_TEMPLATE` and `set_chat_template`: the Jinja template (Hugging Face's
  ``tokenizer.chat_template``) saved with the tokenizer, so ``apply_chat_template`` and the
  server's chat route read the checkpoint as they read any chat model's;
- `encode_dialogues`: each pair as one token sequence, the model's inputs and next-token
  labels, -100 wherever the next token belongs to the prompt or the template around it;
- `pack_rows`: examples packed, whole, into rows of at most ``block_size`` tokens;
- `PackedCollator`: rows to ``input_ids``, ``labels`` and ``document_ids`` (B, T), so that an
  example attends only to itself and its positions restart at 0
  (`tformer.hf.TformerForCausalLM`).

An example longer than the block keeps the end of its prompt (cut from the left, as a chat
model's context keeps the latest turns); a response longer than the block alone is cut from
the right.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tformer.model import IGNORE_INDEX

#: tformer's chat template: a user turn opens with the start token and ends with a newline, an
#: assistant turn ends with the end-of-text token (where generation stops). Roles are written
#: as words: tformer's tokenizers have no role tokens.
DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{{ bos_token + 'System: ' + message['content'] + '\\n' }}"
    "{%- elif message['role'] == 'user' -%}"
    "{{ bos_token + 'User: ' + message['content'] + '\\n' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ 'Assistant: ' + message['content'] + eos_token }}"
    "{%- else -%}{{ raise_exception('unknown role: ' + message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'Assistant: ' }}{%- endif -%}"
)


def set_chat_template(tokenizer, template: str | None) -> None:
    """Give ``tokenizer`` ``template`` (None: keep the one it has, else tformer's default);
    ``save_pretrained`` then writes it to ``tokenizer_config.json``."""
    if template is not None:
        tokenizer.chat_template = template
    elif not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE


def chat_prompts(tokenizer, texts: Sequence[str]) -> list[str]:
    """Each text as a user message followed by the assistant's opening: the text a chat model
    continues with its answer."""
    return [tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                          add_generation_prompt=True) for text in texts]


@dataclass
class EncodedDialogues:
    """Inputs and labels (one list per example, the labels already the next tokens) and how
    many examples were cut to fit the block."""

    inputs: list[list[int]]
    labels: list[list[int]]
    truncated: int


def encode_dialogues(tokenizer, prompts: Sequence[str], responses: Sequence[str],
                     block_size: int) -> EncodedDialogues:
    """Render each (prompt, response) as a user turn and an assistant turn; the model reads
    every token but the last and is scored on the next token where it belongs to the
    response (the assistant's text and its end token), -100 elsewhere.

    The rendered prompt (up to the assistant's opening) and the rest are tokenised apart, so
    the prompt's tokens are those generation sees."""
    prefixes = chat_prompts(tokenizer, prompts)
    rest = []
    for prefix, prompt, response in zip(prefixes, prompts, responses):
        whole = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
            tokenize=False)
        if not whole.startswith(prefix):
            raise ValueError("the chat template renders a conversation that does not start "
                             "with its generation prompt; data.task: sft needs one that does")
        rest.append(whole[len(prefix):])
    encode = lambda texts: tokenizer(list(texts), add_special_tokens=False,  # noqa: E731
                                     verbose=False)["input_ids"]
    out = EncodedDialogues([], [], 0)
    for prompt, answer in zip(encode(prefixes), encode(rest)):
        cut = answer[:block_size]  # leaves at least one prompt token to read
        keep = block_size + 1 - len(cut)
        out.truncated += len(prompt) > keep or len(cut) < len(answer)
        answer = cut
        prompt = prompt[-keep:]
        ids = prompt + answer
        out.inputs.append(ids[:-1])
        out.labels.append([IGNORE_INDEX] * (len(prompt) - 1) + answer)
    return out


OPEN_ROWS = 64


def pack_rows(lengths: Sequence[int], block_size: int, order: Sequence[int]) -> list[list[int]]:
    """Examples (indices, taken in ``order``) packed into rows: each joins the first of the
    last `OPEN_ROWS` rows it fits in (first fit, over a window so that packing stays linear in
    the examples), a row holding at most ``block_size`` tokens."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = lengths[i]
        for r in range(max(0, len(rows) - OPEN_ROWS), len(rows)):
            if n <= room[r]:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(block_size - n)
    return rows


def row_batches(rows: list[list[int]], rows_per_batch: int) -> list[list[tuple[int, ...]]]:
    """Consecutive rows grouped ``rows_per_batch`` to a micro-batch."""
    return [[tuple(row) for row in rows[i : i + rows_per_batch]]
            for i in range(0, len(rows), rows_per_batch)]


class Rows(Sequence):
    """A packed row's examples' token lists, indexed by the row (a tuple of example indices):
    what `tformer.training.validation.collate_batch` reads for ``input_ids`` or ``labels``."""

    def __init__(self, lists: Sequence[Sequence[int]]) -> None:
        self.lists = lists

    def __len__(self) -> int:
        return len(self.lists)

    def __getitem__(self, row: tuple[int, ...]) -> list[Sequence[int]]:
        return [self.lists[i] for i in row]


@dataclass(frozen=True)
class PackedCollator:
    """Rows of examples (each feature's ``input_ids`` and ``labels``: a list of the row's
    examples' lists) into ``input_ids``, ``labels`` and ``document_ids`` (B, T): each row's
    examples one after the other, numbered 0, 1, ... in ``document_ids``, padded on the right
    to the longest row (``pad_token_id``, labels -100, a document of its own)."""

    pad_token_id: int

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("cannot collate an empty batch")
        width = max(sum(len(x) for x in f["input_ids"]) for f in features)
        shape = (len(features), width)
        ids = np.full(shape, self.pad_token_id, dtype=np.int64)
        labels = np.full(shape, IGNORE_INDEX, dtype=np.int64)
        documents = np.empty(shape, dtype=np.int64)
        for b, f in enumerate(features):
            start = 0
            for doc, (x, y) in enumerate(zip(f["input_ids"], f["labels"])):
                ids[b, start : start + len(x)] = x
                labels[b, start : start + len(y)] = y
                documents[b, start : start + len(x)] = doc
                start += len(x)
            documents[b, start:] = len(f["input_ids"])  # the padding: a document of its own
        return {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels),
                "document_ids": torch.from_numpy(documents)}
