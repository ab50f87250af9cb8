"""Sampling the next token of some rows of a batch, each row with its own settings and its own
random generator (the continuous batcher's sampling step, `tformer.serving.continuous`).

The filters are those of Hugging Face ``generate()``'s sampling, in its order: temperature,
then top-k, then top-p (nucleus), then one draw from what is left. Each row draws from its own
`torch.Generator`, seeded from the request's ``seed`` when it gave one: a row's tokens then
depend on its seed and its own logits only, never on which other rows share the step (one
generator for the batch would hand each row a different part of the random stream whenever the
batch changes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

#: torch.Generator.manual_seed takes seeds in [0, 2**64); a request's seed is any 64-bit integer.
SEED_SPACE = 2**64


@dataclass
class RowSampler:
    """How one row samples: ``top_k`` 0 = off, ``top_p`` 1.0 = off."""

    temperature: float
    top_k: int
    top_p: float
    generator: torch.Generator


def row_sampler(options: dict, row: int, device: torch.device) -> RowSampler | None:
    """The sampler of text ``row`` of a request decoded with ``options`` (None: greedy). With
    ``options["seed"]`` the row's generator is seeded with ``seed + row``, so the ``n`` choices
    of one request differ and each is reproducible; without, from the system's entropy."""
    if not options.get("do_sample", False):
        return None
    generator = torch.Generator(device=device)
    seed = options.get("seed")
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed((seed + row) % SEED_SPACE)
    return RowSampler(float(options.get("temperature", 1.0)), int(options.get("top_k", 0) or 0),
                      float(options.get("top_p", 1.0)), generator)


def filter_logits(logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor) -> Tensor:
    """Logits (k, V) with what each row may not sample set to -inf: divided by the row's
    temperature (k,), then outside its ``top_k`` (k,; 0 = off) largest, then outside the
    smallest set of largest whose probability reaches ``top_p`` (k,; 1.0 = off). The largest
    logit always stays (as ``generate()``'s ``min_tokens_to_keep=1``)."""
    scores = logits.float() / temperature[:, None]
    ordered, order = scores.sort(dim=-1, descending=True)  # (k, V)
    rank = torch.arange(scores.size(-1), device=scores.device)[None, :]
    drop = (top_k[:, None] > 0) & (rank >= top_k[:, None])
    ordered = ordered.masked_fill(drop, float("-inf"))
    probs = ordered.softmax(-1)
    before = probs.cumsum(-1) - probs  # the mass of the larger ones
    drop = (before >= top_p[:, None]) & (rank > 0)
    ordered = ordered.masked_fill(drop, float("-inf"))
    return torch.full_like(scores, float("-inf")).scatter(-1, order, ordered)


def sample(logits: Tensor, samplers: list[RowSampler]) -> Tensor:
    """One token per row of ``logits`` (k, V), row ``i`` drawn as ``samplers[i]`` says: (k,)."""
    device = logits.device
    temperature = torch.tensor([s.temperature for s in samplers], device=device)
    top_k = torch.tensor([s.top_k for s in samplers], device=device)
    top_p = torch.tensor([s.top_p for s in samplers], device=device)
    probs = filter_logits(logits, temperature, top_k, top_p).softmax(-1)
    return torch.cat([torch.multinomial(p, 1, generator=s.generator)
                      for p, s in zip(probs, samplers)])
