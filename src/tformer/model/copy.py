"""Copy attention: a pointer-generator output layer (See et al. 2017, section 2.2), optional.

At each target position the decoder's output ``h`` (B, T, D) either *generates* a word from
the vocabulary or *copies* one from the source:

    a      = softmax((h Wq) (m Wk)ᵀ / √D)               copy attention over the source (B, T, S)
    c      = a m                                        what it reads (B, T, D)
    p_gen  = σ(w · [h; c] + b)                          probability of generating (B, T, 1)
    P(w)   = p_gen P_vocab(w) + (1 − p_gen) Σ_{i: x_i = w} a_i

with ``m`` the encoder output (B, S, D), ``x`` the source ids and P_vocab = softmax(logits)
the plain Transformer's output. Source and target share one tokenizer here (joint BPE), so a
copied token is an ordinary id and no extended vocabulary is needed.

The layer returns log P as the "logits": softmax(log P) = P, so the loss
(``tformer.model.compute_loss``, label smoothing included), greedy, beam search and sampling
all use it unchanged.

Why by hand: neither PyTorch nor ``transformers`` has a pointer-generator for encoder-decoder
models; OpenNMT-py's ``CopyGenerator`` is the reference design, in a framework tformer does not
use.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tformer.model.masks import additive

#: Floor of the copy mass before its log: a source position the attention gives exactly 0
#: (padding, or a weight that underflows) gets 1e-20, which keeps the log finite and its
#: gradient 0.
_FLOOR = 1e-20


class CopyGenerator(nn.Module):
    """The mixture above; one attention head of width D, separate from the decoder's
    cross-attention so that what it attends to is the copy decision alone.

    The keys have no bias: a bias adds q·b to every source position alike, which the softmax
    cancels. Without it the scores are (q Wk) mᵀ, computed from the encoder output ``m``
    directly, so a decoding step costs T·D² + T·S·D instead of projecting the whole source
    again (S·D²) at every step.
    """

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.query = nn.Linear(d_model, d_model)
        self.key = nn.Linear(d_model, d_model, bias=False)
        self.gate = nn.Linear(2 * d_model, 1)

    def weights(self, hidden: Tensor, memory: Tensor,
                source_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """The copy attention a (B, T, S) and the gate's logit (B, T, 1), p_gen = σ(logit),
        both float32: what the mixture uses, and what the attention maps show."""
        # Scaled before the product, as in attention_math: (q / √D) Wk mᵀ = q Wk (m)ᵀ / √D.
        q = self.query(hidden) / math.sqrt(hidden.size(-1))
        scores = ((q @ self.key.weight) @ memory.transpose(1, 2)).float()  # (B, T, S)
        if source_mask is not None:  # -inf added at padding, as in attention_math
            scores = scores + additive(source_mask[:, None, :], scores.dtype)
        attention = scores.softmax(-1)
        context = attention.to(memory.dtype) @ memory  # (B, T, D)
        return attention, self.gate(torch.cat([hidden, context], dim=-1)).float()

    def forward(self, hidden: Tensor, logits: Tensor, memory: Tensor, source_ids: Tensor,
                source_mask: Tensor | None) -> Tensor:
        """hidden (B, T, D), logits (B, T, V), memory (B, S, D), source_ids (B, S), source_mask
        (B, S) True at real tokens -> log P (B, T, V), in float32."""
        if source_ids.shape != memory.shape[:2]:
            raise ValueError(f"copy attention: source ids {tuple(source_ids.shape)} do not match "
                             f"the encoder output {tuple(memory.shape[:2])}")
        attention, gate = self.weights(hidden, memory, source_mask)
        # Words absent from the source: log P = log p_gen + log P_vocab, over the whole
        # vocabulary. The mixture changes only the (at most S) words of the source, so it is
        # computed per source position, (B, T, S), and written there, instead of building the
        # copy distribution over the vocabulary, (B, T, V), and mixing it everywhere (1.4-4.1×
        # slower: `bench/copy_layer.py`, `docs/benchmarks.md`).
        generated = F.logsigmoid(gate) + logits.float().log_softmax(-1)  # (B, T, V)
        # Each source position's word, named by the word's first position: word (B, S). The
        # first position of every vocabulary word is a scatter-min over the source, O(B (V + S)),
        # where comparing every pair of source positions is O(B S²) at every decoding step.
        b, s = source_ids.shape
        position = torch.arange(s, device=source_ids.device)
        first_at = source_ids.new_full((b, logits.size(-1)), s).scatter_reduce(
            1, source_ids, position.expand(b, s), "amin")
        word = first_at.gather(1, source_ids)
        first = (word == position)[:, None, :]  # (B, 1, S)
        by_word = word[:, None, :].expand_as(attention)
        # The attention summed per word, read back at each of its positions. A float32 scatter
        # and gather, not a matmul, which autocast would run in half precision (fp16 rounds the
        # floor to 0, and log 0 makes every gradient NaN).
        mass = torch.zeros_like(attention).scatter_add(-1, by_word, attention).gather(-1, by_word)
        ids = source_ids[:, None, :].expand_as(attention)
        mixed = torch.logaddexp(generated.gather(-1, ids),
                                F.logsigmoid(-gate) + mass.clamp_min(_FLOOR).log())
        # Written, not added as a difference (mixed − generated is -inf + inf = NaN where a
        # logit is -inf): every position of a source word is set to 0, then its first position
        # adds the mixture, once, so a repeated word's gradient is counted once.
        out = generated.scatter(-1, ids, 0.0)
        return out.scatter_add_(-1, ids, torch.where(first, mixed, 0.0))
