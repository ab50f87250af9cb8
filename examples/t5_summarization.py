"""Fine-tune a T5 checkpoint for summarization with plain PyTorch and transformers: the widely
copied tutorial, corrected. (`tformer train model.pretrained=DIR ...` does all of this and more:
batching by length, evaluation, checkpoints, resume; see docs/pretrained.md.)

The copied version loads t5-small, calls ``model(input_ids)``, ``loss.backward()``,
``optimizer.step()`` and ``generate()``, and goes wrong where the comments below say FIX:
it passes no labels (there is no loss), builds no optimizer, lets padding count in the loss,
never switches to eval mode, and ``generate()`` stops at 20 tokens.

    python examples/t5_summarization.py --model t5-small/ --data $TFORMER_DATA_DIR/dialogsum/train.jsonl

``--model`` is a local directory: on a machine with a network, make one with
``hf download google-t5/t5-small --local-dir t5-small``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, get_linear_schedule_with_warmup


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="local model directory (T5, BART, ...)")
    p.add_argument("--data", required=True, help="JSON Lines file with source and target fields")
    p.add_argument("--source-field", default="source")
    p.add_argument("--target-field", default="target")
    p.add_argument("--prefix", default="summarize: ", help="T5's task prefix ('' for BART)")
    p.add_argument("--examples", type=int, default=1000, help="read this many records")
    p.add_argument("--show", type=int, default=3, help="held-out examples to summarise at the end")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--max-source-length", type=int, default=512)
    p.add_argument("--max-target-length", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--num-beams", type=int, default=4)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    # trust_remote_code stays off: no code from the model directory runs. float32 weights
    # whatever the checkpoint's dtype: fp16 T5 overflows, and bf16 weights lose small updates.
    tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=False)
    model = AutoModelForSeq2SeqLM.from_pretrained(args.model, dtype=torch.float32,
                                                  trust_remote_code=False)

    lines = Path(args.data).read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines if line.strip()][: args.examples]
    sources = [args.prefix + r[args.source_field] for r in records]
    targets = [r[args.target_field] for r in records]
    # keep the last --show examples out of training, to look at unseen outputs at the end
    train_sources, train_targets = sources[: -args.show], targets[: -args.show]
    test_sources, test_targets = sources[-args.show :], targets[-args.show :]

    def encode(batch_sources: list[str], batch_targets: list[str]) -> dict[str, torch.Tensor]:
        batch = tokenizer(batch_sources, max_length=args.max_source_length, truncation=True,
                          padding=True, return_tensors="pt")
        # text_target: the target-side tokenizer where a model has one (Marian). T5 appends </s>.
        target = tokenizer(text_target=batch_targets, max_length=args.max_target_length,
                           truncation=True, padding=True, return_tensors="pt")
        # FIX: padding in the labels must be -100, which the loss ignores; left as the pad id,
        # the model learns to predict padding. (The model builds its decoder inputs by shifting
        # these labels right behind decoder_start_token_id: do not shift them yourself.)
        batch["labels"] = target["input_ids"].masked_fill(target["attention_mask"] == 0, -100)
        return batch

    # FIX: an optimizer over the model's parameters, and a schedule (linear warmup, then decay)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    scheduler = get_linear_schedule_with_warmup(
        optimizer, num_warmup_steps=max(1, args.steps // 10), num_training_steps=args.steps
    )
    model.train()  # dropout on while training
    order = torch.randperm(len(train_sources)).tolist()
    for step in range(1, args.steps + 1):
        start = (step - 1) * args.batch_size % len(order)
        indices = (order + order)[start : start + args.batch_size]
        batch = encode([train_sources[i] for i in indices], [train_targets[i] for i in indices])
        # FIX: pass the labels; only then does the model return a loss to minimise
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        print(f"step {step}: loss {loss.item():.4f}, lr {scheduler.get_last_lr()[0]:.2e}")

    model.eval()  # FIX: eval mode before generating (dropout off)
    with torch.no_grad():
        batch = tokenizer(test_sources, max_length=args.max_source_length, truncation=True,
                          padding=True, return_tensors="pt")
        # FIX: an explicit max_new_tokens; generate()'s default length stops at 20 tokens
        ids = model.generate(**batch, max_new_tokens=args.max_new_tokens,
                             num_beams=args.num_beams)
    # skip_special_tokens drops <pad> (T5's decoder start), </s> and <s> from the text
    for source, reference, output in zip(test_sources, test_targets,
                                         tokenizer.batch_decode(ids, skip_special_tokens=True)):
        print(f"\nsource: {source[:300]}")
        print(f"reference: {reference}")
        print(f"model summary: {output.strip()}")


if __name__ == "__main__":
    main()
