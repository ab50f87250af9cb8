"""Copy attention's output layer, forward and backward: tformer's `CopyGenerator` (the copy mass
added at the source's words only) against the same mixture built densely over the vocabulary
(the copy distribution scattered into a (B, T, V) tensor, then mixed everywhere, as See et al.
2017 write it), with the plain log-softmax (no copy attention) as the floor.

    .venv/bin/python bench/copy_layer.py [--threads 1] [--compile] [--repeats 7]

The shapes default to a DialogSum training batch of `recipes/dialogsum.yaml` (24 summaries of
40 tokens, dialogues of 300, 8,000 words, d_model 128). Source ids are drawn from a Zipf law
over 3,000 words, so that words repeat as they do in text. The three are timed interleaved,
``--repeats`` times each; the table gives medians and the ratios of the medians. The outputs of
the two copy formulations are compared first (largest difference of log P).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from tformer.model.copy import _FLOOR, CopyGenerator  # noqa: E402


def dense(layer: CopyGenerator, hidden, logits, memory, source_ids, source_mask):
    """The mixture over the whole vocabulary: P = p_gen P_vocab + (1 − p_gen) P_copy, with
    the layer's own attention and gate."""
    attention, gate = layer.weights(hidden, memory, source_mask)
    copied = logits.new_zeros(logits.shape).scatter_add_(
        -1, source_ids[:, None, :].expand_as(attention), attention)
    return torch.logaddexp(F.logsigmoid(gate) + logits.log_softmax(-1),
                           F.logsigmoid(-gate) + copied.clamp_min(_FLOOR).log())


def plain(layer, hidden, logits, memory, source_ids, source_mask):
    return logits.log_softmax(-1)


def tformer_layer(layer, hidden, logits, memory, source_ids, source_mask):
    return layer(hidden, logits, memory, source_ids, source_mask)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--compile", action="store_true", help="time torch.compile'd versions")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch", type=int, default=24)
    parser.add_argument("--target", type=int, default=40)
    parser.add_argument("--source", type=int, default=300)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--d-model", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    b, t, s, v, d = args.batch, args.target, args.source, args.vocab, args.d_model
    layer = CopyGenerator(d)
    hidden = torch.randn(b, t, d, requires_grad=True)
    logits = torch.randn(b, t, v, requires_grad=True)
    memory = torch.randn(b, s, d, requires_grad=True)
    zipf = 1.0 / torch.arange(1, 3001, dtype=torch.float)
    source_ids = 4 + torch.multinomial(zipf, b * s, replacement=True).view(b, s)
    source_mask = torch.arange(s)[None, :] < torch.randint(s // 3, s + 1, (b,))[:, None]
    inputs = (hidden, logits, memory, source_ids, source_mask)

    with torch.no_grad():
        gap = (tformer_layer(layer, *inputs) - dense(layer, *inputs)).abs().max().item()
    repeated = sum(len(x) - len(set(x)) for x in source_ids.tolist()) / b
    print(f"B={b} T={t} S={s} V={v} D={d}, {repeated:.0f} repeated source words per example, "
          f"threads {args.threads}, compile {args.compile}; largest |Δ log P| "
          f"tformer vs dense: {gap:.2e}")

    fns = {"plain log-softmax": plain, "dense mixture": dense, "tformer": tformer_layer}
    if args.compile:
        fns = {name: torch.compile(fn) for name, fn in fns.items()}

    def once(fn) -> float:
        start = time.perf_counter()
        fn(layer, *inputs).mean().backward()
        return time.perf_counter() - start

    for fn in fns.values():  # warm-up (and compilation)
        once(fn), once(fn)
    times = {name: [] for name in fns}
    for _ in range(args.repeats):
        for name, fn in fns.items():
            times[name].append(once(fn))
    ms = {name: 1000 * statistics.median(x) for name, x in times.items()}
    floor = ms["plain log-softmax"]
    print(f"{'forward + backward':<20}{'ms':>9}{'× plain':>9}")
    for name, value in ms.items():
        print(f"{name:<20}{value:>9.1f}{value / floor:>9.2f}")
    print(f"dense / tformer: {ms['dense mixture'] / ms['tformer']:.2f}×; copy's own cost "
          f"(over plain): dense {ms['dense mixture'] - floor:.1f} ms, tformer "
          f"{ms['tformer'] - floor:.1f} ms")


if __name__ == "__main__":
    main()
