"""What the serving tests share: a model whose outputs differ from input to input, its texts,
and a stub engine whose speed the test controls."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import torch


def served_checkpoint(reference_run: Path, out: Path, copy_attention: bool = False) -> Path:
    """A checkpoint with the reference run's config (with copy attention if asked) and
    tokenizer and freshly initialised weights (seed 1, matrices scaled by 3), saved as
    safetensors.

    Why not the trained weights themselves: after 12 steps the model answers every input with
    end-of-sequence at once (empty outputs), so a mix-up between requests in a batch could not
    show. This one gives mostly different outputs of different lengths for different inputs.
    """
    import tformer
    from tformer.hf import TformerForConditionalGeneration

    newest = sorted((reference_run / "checkpoints").glob("step-*"))[-1]
    trained = tformer.load(newest, device="cpu")
    config = trained.model.config
    config.copy_attention = copy_attention
    torch.manual_seed(1)
    model = TformerForConditionalGeneration(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.mul_(3.0)
    model.save_pretrained(out)  # config.json + model.safetensors
    trained.tokenizer.save_pretrained(out)
    return out


def source_texts(data_files: dict[str, Path], n: int = 16) -> list[str]:
    """The first ``n`` sources of the validation file (English Multi30k captions)."""
    lines = data_files["validation"].read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["source"] for line in lines[:n]]


class StubSeq2Seq:
    """An engine with the ``generate`` interface and no PyTorch model or tokenizer: outputs are
    the inputs upper-cased. Calls whose first text is in ``block`` wait for ``release``."""

    tokenizer = None

    def __init__(self, block: tuple[str, ...] = ()) -> None:
        self.block = block
        self.release = threading.Event()
        self.calls: list[list[str]] = []
        self.path = "stub"

    def generate(self, texts, *, max_new_tokens: int, **options) -> list[str]:
        self.calls.append(list(texts))
        if texts and texts[0] in self.block:
            self.release.wait(10)
        return [text.upper() for text in texts]


class TwoArgumentError(Exception):
    """An exception that pickles but does not unpickle (its ``__init__`` takes two arguments,
    its ``args`` hold one), as some libraries' exceptions do."""

    def __init__(self, what: str, code: int) -> None:
        super().__init__(f"{what} (code {code})")


class UpperSeq2Seq:
    """A picklable engine without a PyTorch model (for a batcher in another process): outputs
    are the inputs upper-cased; the text "fail" raises `TwoArgumentError`."""

    tokenizer = None
    path = "upper"

    def generate(self, texts, *, max_new_tokens: int, **options) -> list[str]:
        if "fail" in texts:
            raise TwoArgumentError("cannot generate", 7)
        return [text.upper() for text in texts]
