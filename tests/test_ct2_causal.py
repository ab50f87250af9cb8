"""CTranslate2 for the decoder-only family: a float32 export of the gpt2 and llama presets
continues prompts with the same tokens as Hugging Face ``generate()`` on the torch model (greedy,
batched prompts of different lengths, past the context, beam search), its log-probabilities agree,
int8 runs and its agreement is measured, and both engines have one interface (tformer.load,
generate, streaming, the CLI). Tiny random models, no network."""

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("ctranslate2")

import tformer  # noqa: E402
from tformer import ct2  # noqa: E402
from tformer.ct2.engine import CT2Generator  # noqa: E402
from tformer.generation import Seq2Seq  # noqa: E402

from .conftest import save_scaled  # noqa: E402
from .synthetic import captions  # noqa: E402

PRESETS = ("gpt2", "llama")
CONTEXT = 64  # max_positions: the learned table of gpt2, the context of both
#: Prompts of 1 to 16 tokens, and the empty prompt (the end-of-text token).
PROMPTS = ["A man", "Two dogs run in", "A", "",
           "A woman in a red coat is", "Children play", "The"]


@pytest.fixture(scope="module")
def tokenizer():
    from tformer.tokenization import train_tokenizer

    texts = [r[k] for r in captions(300) for k in ("source", "target")]
    return train_tokenizer(texts, vocab_size=400, kind="bpe")


def causal_checkpoint(directory: Path, tokenizer, preset: str) -> Path:
    """A random ``tiny`` model of ``preset`` (llama: 4 query heads, 2 key/value heads), weights
    ×1.5 so that continuations vary (at the init scale each is one token repeated)."""
    from tformer.hf import TformerConfig, TformerForCausalLM
    from tformer.model import config_for

    torch.manual_seed(0)
    core = config_for("tiny", len(tokenizer), preset, dropout=0.0, max_positions=CONTEXT)
    return save_scaled(TformerForCausalLM(TformerConfig.from_transformer_config(core)), tokenizer,
                       directory)


@pytest.fixture(scope="module", params=PRESETS)
def exported(request, tokenizer, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp(request.param)
    checkpoint = causal_checkpoint(root / "model", tokenizer, request.param)
    return {"preset": request.param, "checkpoint": checkpoint,
            "float32": ct2.export(checkpoint, root / "f32"),
            "torch": tformer.load(checkpoint, device="cpu")}


def until_end(ids: list[int], eos: int) -> list[int]:
    """``ids`` up to and with the first end-of-text token: generate() pads a batch's rows that
    ended, CTranslate2 returns each row as long as it is."""
    return ids[: ids.index(eos) + 1] if eos in ids else ids


def torch_continuations(model, prompts: list[list[int]], count: int, pad: int, eos: int,
                        **options) -> list[list[int]]:
    """The reference: Hugging Face ``generate()`` over the prompts left-padded (written out
    here, not tformer's continue_texts), new tokens only."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=count,
                         pad_token_id=pad, **options)
    return [until_end(row, eos) for row in out[:, width:].tolist()]


def encode(tokenizer, texts: list[str]) -> list[list[int]]:
    return [ids or [tokenizer.eos_token_id]
            for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


# --- exactness -----------------------------------------------------------------------------


def test_export_is_a_generator_with_the_models_settings(exported):
    marker = ct2.read_marker(exported["float32"])
    assert marker["decoder_only"] is True and marker["context"] == CONTEXT
    config = json.loads((exported["float32"] / "config.json").read_text())
    assert config["eos_token"] == "</s>"
    engine = tformer.load(exported["float32"])  # auto-detected
    assert isinstance(engine, CT2Generator) and engine.engine == "ctranslate2"
    assert isinstance(exported["torch"], Seq2Seq)


def test_float32_greedy_equals_torch_token_for_token(exported, tokenizer):
    """A batch of prompts of 1 to 16 tokens, continued 40 tokens (within the context)."""
    engine = tformer.load(exported["float32"], intra_threads=1)
    model = exported["torch"].model
    prompts = encode(tokenizer, PROMPTS)
    assert len({len(p) for p in prompts}) >= 4
    eos = tokenizer.eos_token_id
    expected = torch_continuations(model, prompts, 40, tokenizer.pad_token_id, eos,
                                   do_sample=False)
    got = [until_end(ids, eos) for ids in engine.continue_ids(prompts, 40)]
    assert got == expected
    assert len({t for row in expected for t in row}) >= 20, "degenerate continuations"
    alone = [until_end(engine.continue_ids([p], 40)[0], eos) for p in prompts]
    assert alone == got  # batched = one at a time
    # the public interface: the same texts from both engines
    assert engine.generate(PROMPTS, max_new_tokens=40) == \
        exported["torch"].generate(PROMPTS, max_new_tokens=40)


def test_float32_log_probs_agree(exported, tokenizer):
    """CTranslate2's ``score_batch`` of a greedy continuation against the torch model's
    log-softmax (measured: at most 6e-6 on these models, float32)."""
    engine = tformer.load(exported["float32"], intra_threads=1)
    model = exported["torch"].model
    for prompt in encode(tokenizer, PROMPTS[:3]):
        ids = prompt + engine.continue_ids([prompt], 20)[0]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0]
        expected = logits.log_softmax(-1)[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
        scored = engine.generator.score_batch([tokenizer.convert_ids_to_tokens(ids)])[0]
        assert scored.log_probs == pytest.approx(expected.tolist(), abs=1e-4)


def test_past_the_context_and_beam_search_equal_torch(exported):
    """Continuations longer than the 64-token context slide the same window on both engines;
    beam search equals generate(early_stopping=True), as for the encoder-decoder."""
    engine = tformer.load(exported["float32"], intra_threads=1)
    texts = PROMPTS[:3]
    assert engine.generate(texts, max_new_tokens=100) == \
        exported["torch"].generate(texts, max_new_tokens=100)
    beam = dict(num_beams=4, early_stopping=True, max_new_tokens=16)
    assert engine.generate(PROMPTS, **beam) == exported["torch"].generate(PROMPTS, **beam)


# --- int8 ----------------------------------------------------------------------------------


def test_int8_runs_and_its_agreement_is_measured(exported, tokenizer, tmp_path):
    """int8 weights change the logits, so greedy continuations part from float32's sooner or
    later; on these random tiny models (weights ×1.5, the hardest case: no margin between the
    top tokens) how soon depends on the host's int8 kernels (first token equal for 28-38% of
    the prompts on an AVX2 host, over 50% on an AVX512 one), so those figures are printed. What
    is asserted is that int8 keeps the model: its log-probabilities of float32's own
    continuations (teacher-forced, ``score_batch``) are nearer to float32's than a uniform guess
    is, with a margin (measured on the AVX2 host: mean error 0.28x that distance for gpt2,
    0.48x for llama; a broken quantization, noise or a constant, is at 1x or beyond)."""
    int8_dir = ct2.export(exported["checkpoint"], tmp_path / "int8", quantization="int8")
    size = (int8_dir / "model.bin").stat().st_size
    assert size < 0.6 * (exported["float32"] / "model.bin").stat().st_size
    f32 = tformer.load(exported["float32"], intra_threads=1)
    int8 = tformer.load(int8_dir, intra_threads=1)
    prompts = encode(tokenizer, [r["source"] for r in captions(32)])
    a, b = f32.continue_ids(prompts, 20), int8.continue_ids(prompts, 20)
    same_prefix = [next((i for i, (x, y) in enumerate(zip(p, q)) if x != y), len(p))
                   for p, q in zip(a, b)]
    first = sum(n > 0 for n in same_prefix) / len(prompts)
    whole = sum(p == q for p, q in zip(a, b)) / len(prompts)
    rows = [tokenizer.convert_ids_to_tokens(p + c) for p, c in zip(prompts, a)]
    reference = torch.tensor([x for r in f32.generator.score_batch(rows) for x in r.log_probs])
    quantized = torch.tensor([x for r in int8.generator.score_batch(rows) for x in r.log_probs])
    error = (quantized - reference).abs().mean().item()
    spread = (reference + torch.log(torch.tensor(float(len(tokenizer))))).abs().mean().item()
    print(f"\n{exported['preset']} int8 vs float32, greedy, 32 prompts x 20 tokens: first token "
          f"equal {first:.0%}, whole continuation equal {whole:.0%}, mean equal prefix "
          f"{sum(same_prefix) / len(prompts):.1f} tokens; log-probabilities of float32's "
          f"continuations: mean |int8 - float32| {error:.3f} nats, float32 from uniform "
          f"{spread:.3f}")
    assert all(len(row) >= 1 for row in b)
    assert len(reference) == len(quantized) == sum(len(r) - 1 for r in rows)
    assert error < 0.75 * spread


# --- one interface, two engines ---------------------------------------------------------------


def test_the_generator_has_the_torch_engines_interface(exported):
    engine = tformer.load(exported["float32"], intra_threads=1)
    torch_engine = exported["torch"]
    one = engine.generate(PROMPTS[0], max_new_tokens=8)
    assert isinstance(one, str) and one == engine.generate(PROMPTS[:1], max_new_tokens=8)[0]
    assert engine.generate(PROMPTS, max_new_tokens=8, batch_size=2) == \
        engine.generate(PROMPTS, max_new_tokens=8)
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.generate(PROMPTS, max_new_tokens=0)
    with pytest.raises(TypeError):
        engine.generate(PROMPTS, max_new_tokens=4, num_beam=2)  # a misspelt option
    report: dict = {}
    engine.generate(PROMPTS, max_new_tokens=4, report=report)
    assert report == {"truncated_sources": 0, "max_source_length": CONTEXT}

    # streaming: the same pieces from both engines (greedy)
    pieces: dict[str, list[str]] = {"ct2": [], "torch": []}
    for name, e in (("ct2", engine), ("torch", torch_engine)):
        e.generate(PROMPTS[1], max_new_tokens=20, on_text=pieces[name].append)
    assert pieces["ct2"] == pieces["torch"] and len(pieces["ct2"]) > 1

    # in-memory conversion of the checkpoint gives the export's outputs
    converted = tformer.load(exported["checkpoint"], engine="ctranslate2", intra_threads=1)
    assert isinstance(converted, CT2Generator)
    assert converted.generate(PROMPTS, max_new_tokens=8) == \
        engine.generate(PROMPTS, max_new_tokens=8)

    # sampling: reproducible from torch's seed at load, different for another seed
    samples = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        samples.append(tformer.load(exported["float32"], intra_threads=1).generate(
            PROMPTS, max_new_tokens=16, do_sample=True, top_k=0, temperature=1.5))
    assert samples[0] == samples[1] and samples[0] != samples[2]


def test_cli_exports_and_continues_prompts(exported, tmp_path, capsys):
    from tformer.cli import main

    if exported["preset"] != "gpt2":
        pytest.skip("the command line is the same for both presets")
    out = tmp_path / "lm-ct2"
    assert main(["export", str(exported["checkpoint"]), "--format", "ctranslate2",
                 "--output", str(out)]) == 0
    assert ct2.read_marker(out)["decoder_only"]
    inputs = tmp_path / "prompts.txt"
    inputs.write_text("\n".join(p for p in PROMPTS if p) + "\n")
    results = {}
    for name, target in (("torch", str(exported["checkpoint"])), ("ct2", str(out))):
        path = tmp_path / f"{name}.txt"
        threads = ["--ct2-threads", "1"] if name == "ct2" else []
        assert main(["generate", target, "-i", str(inputs), "-o", str(path),
                     "--max-new-tokens", "12", *threads]) == 0
        results[name] = path.read_text()
    assert results["torch"] == results["ct2"]
    assert len(results["ct2"].splitlines()) == len([p for p in PROMPTS if p])

    streamed = {}
    for name, target in (("torch", str(exported["checkpoint"])), ("ct2", str(out))):
        capsys.readouterr()
        assert main(["generate", target, "--prompt", "A man", "--stream",
                     "--max-new-tokens", "20"]) == 0
        streamed[name] = capsys.readouterr().out
    assert streamed["ct2"] == streamed["torch"]
    assert streamed["ct2"].startswith("A man") and len(streamed["ct2"]) > len("A man\n")

    data = tmp_path / "text.jsonl"
    data.write_text(json.dumps({"text": "A man"}) + "\n")
    assert main(["evaluate", str(out), "--data", str(data)]) == 2  # a one-line error
    assert "needs its PyTorch weights" in capsys.readouterr().err


def test_the_server_continues_prompts_on_the_generator(exported):
    from fastapi.testclient import TestClient

    from tformer.serving.app import create_app

    engine = tformer.load(exported["float32"], intra_threads=1)
    expected = engine.generate(PROMPTS[:3], max_new_tokens=12)
    with TestClient(create_app(engine)) as client:
        answer = client.post("/v1/generate", json={"inputs": PROMPTS[:3], "max_new_tokens": 12})
        assert answer.status_code == 200, answer.text
        assert answer.json()["outputs"] == expected
        completion = client.post("/v1/completions", json={"prompt": PROMPTS[:3],
                                                           "max_tokens": 12, "temperature": 0})
        assert completion.status_code == 200, completion.text
        assert [c["text"] for c in completion.json()["choices"]] == expected
