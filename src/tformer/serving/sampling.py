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


#: Candidates a row's top-k / top-p is looked for among before sorting the whole vocabulary:
#: sorting (16, 2,000) logits took 3.0 ms on one CPU thread, their 64 largest 0.09 ms.
CANDIDATES = 64


def filter_logits(logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor) -> Tensor:
    """Logits (k, V) with what each row may not sample set to -inf: divided by the row's
    temperature (k,), then outside its ``top_k`` (k,; 0 = off) largest, then outside the
    smallest set of largest whose probability (after top-k) reaches ``top_p`` (k,; 1.0 = off).
    The largest logit always stays (as ``generate()``'s ``min_tokens_to_keep=1``).

    The kept tokens are looked for among the `CANDIDATES` largest of each row; only a row that
    needs more (a larger top-k, or a nucleus wider than them) has its whole vocabulary sorted."""
    scores = logits.float() / temperature[:, None]  # (k, V)
    limited = (top_k > 0) | (top_p < 1.0)
    if not bool(limited.any()):
        return scores
    ordered, order = scores.topk(min(scores.size(-1), CANDIDATES), dim=-1)  # (k, C), descending
    kept, enough = _nucleus(scores, ordered, top_k, top_p)
    filtered = torch.full_like(scores, float("-inf")).scatter(-1, order, kept)
    wide = (limited & ~enough).nonzero()[:, 0]  # the rows that need their whole vocabulary
    if wide.numel():
        ordered, order = scores[wide].sort(dim=-1, descending=True)  # (w, V)
        kept, _ = _nucleus(scores[wide], ordered, top_k[wide], top_p[wide])
        filtered[wide] = torch.full_like(ordered, float("-inf")).scatter(-1, order, kept)
    return torch.where(limited[:, None], filtered, scores)


def _nucleus(scores: Tensor, ordered: Tensor, top_k: Tensor, top_p: Tensor) -> tuple[Tensor,
                                                                                      Tensor]:
    """``ordered`` (k, C: each row's C largest scores, descending) with the dropped set to
    -inf, and whether C was enough for each row (its top-k and nucleus lie within)."""
    rank = torch.arange(ordered.size(-1), device=ordered.device)[None, :]
    cut = (top_k[:, None] > 0) & (rank >= top_k[:, None])
    ordered = ordered.masked_fill(cut, float("-inf"))
    # Probabilities over what top-k kept (the whole row without top-k), as generate() does.
    total = torch.where(top_k > 0, ordered.logsumexp(-1), scores.logsumexp(-1))
    probs = (ordered - total[:, None]).exp()
    before = probs.cumsum(-1) - probs  # the mass of the larger ones
    # (top-p 1.0 is off: in float32 the mass before a far tail token can round up to 1.0)
    nucleus = (top_p[:, None] < 1.0) & (before >= top_p[:, None]) & (rank > 0)
    kept = ordered.masked_fill(nucleus, float("-inf"))
    enough = (top_k <= ordered.size(-1)) & ((top_k > 0) | (probs.sum(-1) >= top_p))
    return kept, enough


def sample(logits: Tensor, samplers: list[RowSampler]) -> Tensor:
    """One token per row of ``logits`` (k, V), row ``i`` drawn as ``samplers[i]`` says: (k,).
    Each row's uniform number comes from its own generator; the token is where it falls in the
    row's cumulative distribution (one batched search: a ``torch.multinomial`` per row cost
    2 ms for 16 rows)."""
    device = logits.device
    temperature = torch.tensor([s.temperature for s in samplers], device=device)
    top_k = torch.tensor([s.top_k for s in samplers], device=device)
    top_p = torch.tensor([s.top_p for s in samplers], device=device)
    cdf = filter_logits(logits, temperature, top_k, top_p).softmax(-1).cumsum(-1)  # (k, V)
    u = torch.cat([torch.rand(1, generator=s.generator, device=device) for s in samplers])
    # right=True: a token of probability 0 (its cdf equal to the one before) is never chosen
    return torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0].clamp_max(
        cdf.size(-1) - 1)
