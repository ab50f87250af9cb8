"""The one generation entry point, used by the CLI, evaluation, training's validation and the
server. It always goes through Hugging Face ``generate()``: there is no second beam search."""

from __future__ import annotations

from collections.abc import Sequence

import torch


@torch.inference_mode()
def generate_texts(
    model,
    tokenizer,
    texts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int = 32,
    max_source_length: int | None = None,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> list[str]:
    """Generate one output per input text, in input order.

    ``max_new_tokens`` is required: ``generate()``'s default length silently cuts outputs at
    20 tokens. Inputs are sorted by length so each batch pads little; the order is restored.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]), reverse=True)
    outputs: list[str] = [""] * len(texts)
    options = dict(
        max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=do_sample,
        length_penalty=length_penalty, no_repeat_ngram_size=no_repeat_ngram_size,
    )
    if do_sample:
        options.update(temperature=temperature, top_k=top_k, top_p=top_p)
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            enc = tokenizer(
                [texts[i] for i in chunk], return_tensors="pt", padding=True,
                truncation=max_source_length is not None, max_length=max_source_length,
            ).to(device)
            ids = model.generate(
                input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], **options
            )
            for i, text in zip(chunk, tokenizer.batch_decode(ids, skip_special_tokens=True)):
                outputs[i] = text.strip()
    finally:
        model.train(was_training)
    return outputs
