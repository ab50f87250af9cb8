"""CTranslate2 export and engine: float32 exports generate the same tokens as PyTorch (own model
in every exportable configuration, a trained own model, a tiny T5 and a tiny Marian), int8 stays
within a stated metric tolerance, unsupported inputs are refused with errors that name them, the
CLI runs export -> generate -> evaluate end to end, and the server serves an export. No network."""

import dataclasses
import json
import random
from pathlib import Path

import pytest
import torch

pytest.importorskip("ctranslate2")

import tformer  # noqa: E402
from tformer import ct2  # noqa: E402
from tformer.ct2.engine import CT2Seq2Seq  # noqa: E402
from tformer.ct2.own_spec import NotExportableError, check_exportable  # noqa: E402
from tformer.metrics import chrf  # noqa: E402
from tformer.model import TransformerConfig  # noqa: E402

from .conftest import build_tiny_t5, save_scaled, tiny_overrides  # noqa: E402
from .synthetic import captions, tokenizer_corpus  # noqa: E402

# Beam search is compared with early_stopping=True: CTranslate2 stops once num_beams
# hypotheses are finished, which is generate(early_stopping=True) (see tformer.ct2.engine).
BEAM = dict(num_beams=4, early_stopping=True)
DECODINGS = {
    "greedy": {},
    "greedy_no_repeat": dict(no_repeat_ngram_size=2),
    "greedy_repetition_penalty": dict(repetition_penalty=1.5),
    "beam4": BEAM,
    "beam4_lp0.6": dict(BEAM, length_penalty=0.6),
    "beam4_lp2": dict(BEAM, length_penalty=2.0),
    "beam2": dict(num_beams=2, early_stopping=True),
}


def multi30k(n: int, start: int = 0) -> list[dict]:
    """``n`` synthetic caption pairs from ``start`` (a Multi30k look-alike, tests/synthetic.py)."""
    return captions(start + n)[start:]


def assert_close_log_probs(seq2seq, engine, texts, max_new_tokens: int, atol: float) -> None:
    """The log-probability of every greedy token, from PyTorch (generate's scores) and from
    CTranslate2 (``score_batch`` of the same tokens), agree within ``atol``."""
    tok = seq2seq.tokenizer
    for text in texts:
        enc = tok([text], return_tensors="pt")
        out = seq2seq.model.generate(**enc, max_new_tokens=max_new_tokens, output_scores=True,
                                     return_dict_in_generate=True)
        ids = out.sequences[0, 1:].tolist()
        expected = [s[0].log_softmax(-1)[t].item() for s, t in zip(out.scores, ids)]
        source = tok.convert_ids_to_tokens(enc["input_ids"][0])
        got = engine.translator.score_batch([source], [tok.convert_ids_to_tokens(ids)])[0]
        assert got.log_probs[: len(ids)] == pytest.approx(expected, abs=atol), text


def assert_same_outputs(a, b, texts, max_new_tokens: int, decodings: dict | None = None) -> None:
    """``a`` and ``b`` give the same outputs for every decoding (default: all of DECODINGS)."""
    for name, options in (decodings or DECODINGS).items():
        expected = a.generate(texts, max_new_tokens=max_new_tokens, **options)
        got = b.generate(texts, max_new_tokens=max_new_tokens, **options)
        mismatches = [(t, e, g) for t, e, g in zip(texts, expected, got) if e != g]
        assert not mismatches, f"{name}: {len(mismatches)} of {len(texts)} differ: {mismatches[:3]}"


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def copy_run(tmp_path_factory) -> dict[str, Path]:
    """An own model (d_model 64) trained 150 steps to copy the first 2-7 words of Multi30k
    sources: it learns to stop, so outputs end at many lengths (greedy and beam), and its chrF
    is far from 0, so the int8 tolerance means something. About 10 s on one core."""
    from tformer.training import load_config, train

    root = tmp_path_factory.mktemp("copy")
    rng = random.Random(0)
    records = multi30k(600)

    def example(record: dict) -> str:
        words = " ".join(record["source"].split()[: rng.randint(2, 7)])
        return json.dumps({"source": words, "target": words})

    (root / "train.jsonl").write_text("\n".join(map(example, records[:560])) + "\n")
    (root / "val.jsonl").write_text("\n".join(map(example, records[560:])) + "\n")
    files = {"train": root / "train.jsonl", "validation": root / "val.jsonl"}
    extra = {"train.max_steps": 150, "train.eval_every": 150, "train.max_tokens": 1200,
             "model.d_model": 64, "model.d_ff": 256}
    result = train(load_config(None, tiny_overrides(files, root / "run", **extra)))
    return {"checkpoint": Path(result.best_checkpoint), "val": files["validation"]}


@pytest.fixture(scope="module")
def copy_texts(copy_run) -> list[str]:
    return [json.loads(x)["source"] for x in copy_run["val"].read_text().splitlines()]


@pytest.fixture(scope="module")
def copy_export(copy_run, tmp_path_factory) -> Path:
    return ct2.export(copy_run["checkpoint"], tmp_path_factory.mktemp("exp") / "f32")


@pytest.fixture(scope="module")
def own_tokenizer():
    from tformer.tokenization import train_tokenizer

    texts = [r[k] for r in multi30k(400) for k in ("source", "target")]
    return train_tokenizer(texts, vocab_size=500)


def random_own_model(directory: Path, tokenizer, **options) -> Path:
    """A random own model saved with ``tokenizer``; weights ×1.5 so outputs vary (at the init
    scale every output is one token repeated). Not more: at ×3 the activations of the gated FFN
    grow so large that float32 rounding alone moves CTranslate2's log-probs by 1e-3 (×2) and
    then a whole token (×3), while the plain FFN stays within 1e-4."""
    from tformer.hf import TformerConfig, TformerForConditionalGeneration

    torch.manual_seed(0)
    config = TformerConfig(vocab_size=len(tokenizer), d_model=32, n_heads=4, n_encoder_layers=2,
                           n_decoder_layers=3, d_ff=64, **options)
    return save_scaled(TformerForConditionalGeneration(config), tokenizer, directory)


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory) -> Path:
    """A random T5 (``build_tiny_t5``), weights ×4 (not the relative attention bias) so outputs
    vary."""
    root = tmp_path_factory.mktemp("t5")
    corpus = tokenizer_corpus(root / "corpus.txt")
    return build_tiny_t5(corpus, root / "model", scale=4.0)


@pytest.fixture(scope="module")
def marian_dir(tmp_path_factory) -> Path:
    """A random Marian (d_model 32) with a MarianTokenizer over one SentencePiece model for both
    sides (vocab.json: its pieces, then <pad>, as Marian checkpoints have it); weights ×3."""
    import shutil

    import sentencepiece
    from transformers import MarianConfig, MarianMTModel, MarianTokenizer

    root = tmp_path_factory.mktemp("marian")
    corpus = tokenizer_corpus(root / "corpus.txt")
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(root / "sp"), vocab_size=400, model_type="unigram",
        pad_id=-1, eos_id=0, unk_id=1, bos_id=-1, num_threads=1, minloglevel=2,
    )
    sp = sentencepiece.SentencePieceProcessor(model_file=str(root / "sp.model"))
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    (root / "vocab.json").write_text(json.dumps({**vocab, "<pad>": len(vocab)}))
    for side in ("source", "target"):
        shutil.copy(root / "sp.model", root / f"{side}.spm")
    tokenizer = MarianTokenizer(vocab=str(root / "vocab.json"), source_spm=str(root / "source.spm"),
                                target_spm=str(root / "target.spm"))
    config = MarianConfig(
        vocab_size=len(tokenizer), d_model=32, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
        decoder_ffn_dim=64, max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id,
        forced_eos_token_id=tokenizer.eos_token_id,
    )
    # The vocabulary follows the docs (tokenizer_corpus), so one seed's random model may give
    # one output for every input (a useless comparison): the first seed whose does not.
    probe = tokenizer([r["source"] for r in multi30k(12, start=600)], return_tensors="pt",
                      padding=True)
    for seed in range(20):
        torch.manual_seed(seed)
        model = MarianMTModel(config).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" not in name and "embed_positions" not in name:  # positions: sinusoids
                    p.mul_(3)
            outputs = model.generate(**probe, max_new_tokens=12)
        if len({tuple(row.tolist()) for row in outputs}) > 1:
            break
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    return root / "model"


# --- exactness -----------------------------------------------------------------------------


def test_trained_own_model_float32_export_generates_the_same_tokens(copy_run, copy_export,
                                                                    copy_texts):
    torch_path = tformer.load(copy_run["checkpoint"], device="cpu")
    engine = tformer.load(copy_export)  # auto-detected
    assert isinstance(engine, CT2Seq2Seq) and engine.engine == "ctranslate2"
    outputs = torch_path.generate(copy_texts, max_new_tokens=32)
    lengths = {len(torch_path.tokenizer(o)["input_ids"]) for o in outputs}
    assert len(lengths) >= 4, f"degenerate outputs, the comparison would prove little: {outputs}"
    # the penalty changes outputs, so that its equality below means something
    assert torch_path.generate(copy_texts, max_new_tokens=32, repetition_penalty=1.5) != outputs
    assert_same_outputs(torch_path, engine, copy_texts, max_new_tokens=32)
    # a short limit: both count the end token the same way
    assert_same_outputs(torch_path, engine, copy_texts, max_new_tokens=3,
                        decodings={"greedy": {}, "beam4": BEAM})


def test_reference_run_checkpoint_exports_exactly(reference_run, tmp_path):
    checkpoint = sorted((reference_run / "checkpoints").glob("step-*"))[-1]
    texts = [r["source"] for r in multi30k(12, start=300)]
    engine = tformer.load(ct2.export(checkpoint, tmp_path / "ct2"))
    assert_same_outputs(tformer.load(checkpoint, device="cpu"), engine, texts, max_new_tokens=12,
                        decodings={"greedy": {}, "beam4": BEAM})


VARIANTS = {
    "post-norm (paper)": {},
    "pre-norm": dict(norm_first=True),
    "gated GELU FFN": dict(gated_ffn=True, activation="gelu"),
    "learned positions": dict(positional="learned", max_positions=64),
    "untied, unscaled, eps 1e-3, pre-norm": dict(tie_embeddings=False, scale_embeddings=False,
                                                  layer_norm_eps=1e-3, norm_first=True),
    "Llama's blocks: RMSNorm, RoPE, SwiGLU, no bias, GQA": dict(
        norm="rmsnorm", norm_first=True, positional="rope", activation="silu", gated_ffn=True,
        bias=False, n_kv_heads=2, rope_theta=500.0, scale_embeddings=False),
    "GPT-2's GELU (tanh), multi-query attention": dict(activation="gelu_tanh", n_kv_heads=1),
}


@pytest.mark.parametrize("options", VARIANTS.values(), ids=VARIANTS.keys())
def test_every_own_model_option_exports_exactly(own_tokenizer, tmp_path, options):
    checkpoint = random_own_model(tmp_path / "model", own_tokenizer, **options)
    texts = [r["source"] for r in multi30k(8, start=500)]
    engine = tformer.load(ct2.export(checkpoint, tmp_path / "ct2"))
    seq2seq = tformer.load(checkpoint, device="cpu")
    assert_close_log_probs(seq2seq, engine, texts, max_new_tokens=10, atol=1e-3)
    assert_same_outputs(seq2seq, engine, texts, max_new_tokens=10,
                        decodings={"greedy": {}, "beam4": BEAM})


@pytest.mark.parametrize("kind", ["t5", "marian"])
def test_tiny_hugging_face_exports_generate_the_same_tokens(request, tmp_path, kind):
    checkpoint = request.getfixturevalue(f"{kind}_dir")
    texts = [r["source"] for r in multi30k(12, start=600)]
    out = ct2.export(checkpoint, tmp_path / "ct2")
    marker = ct2.read_marker(out)
    assert marker["model_type"] == kind
    if kind == "marian":  # generate() forces </s> last: one token less of budget
        assert marker["forced_eos_token_id"] == 0
    seq2seq, engine = tformer.load(checkpoint, device="cpu"), tformer.load(out)
    outputs = seq2seq.generate(texts, max_new_tokens=12)
    assert len(set(outputs)) > 1 and all(outputs), outputs  # not all alike, none empty
    assert_same_outputs(seq2seq, engine, texts, max_new_tokens=12,
                        decodings={"greedy": {}, "beam4": BEAM})


# --- int8 ----------------------------------------------------------------------------------


CHRF_TOLERANCE = 3.0  # points of chrF on 40 sentences, greedy


def test_int8_stays_within_the_stated_tolerance(copy_run, copy_export, copy_texts, tmp_path):
    int8 = ct2.export(copy_run["checkpoint"], tmp_path / "int8", quantization="int8")
    assert (int8 / "model.bin").stat().st_size < 0.6 * (copy_export / "model.bin").stat().st_size
    refs = copy_texts  # the copy task: the reference is the source
    f32_out = tformer.load(copy_export).generate(copy_texts, max_new_tokens=32)
    int8_out = tformer.load(int8).generate(copy_texts, max_new_tokens=32)
    f32, q = chrf(f32_out, refs)["chrf"], chrf(int8_out, refs)["chrf"]
    assert f32 > 20, f"the model did not learn enough for the comparison to mean much: {f32}"
    assert abs(q - f32) <= CHRF_TOLERANCE, (q, f32)


# --- refusals, options, engine ---------------------------------------------------------------


def test_unsupported_inputs_are_refused_naming_them(copy_run, copy_export, tmp_path):
    @dataclasses.dataclass(frozen=True)
    class FutureConfig(TransformerConfig):  # an option added later, not yet mapped
        rotary: bool = True

    with pytest.raises(NotExportableError, match="TransformerConfig.rotary"):
        check_exportable(FutureConfig(vocab_size=100))
    with pytest.raises(NotExportableError, match="copy_attention=True: CTranslate2"):
        check_exportable(TransformerConfig(vocab_size=100, copy_attention=True))
    check_exportable(TransformerConfig(vocab_size=100, gated_ffn=True, positional="learned"))
    check_exportable(TransformerConfig(vocab_size=100, n_encoder_layers=0, norm="rmsnorm",
                                       positional="rope", bias=False, n_kv_heads=2))

    with pytest.raises(ValueError, match="quantization must be one of"):
        ct2.export(copy_run["checkpoint"], tmp_path / "x", quantization="int4")
    with pytest.raises(ValueError, match="already exists"):
        ct2.export(copy_run["checkpoint"], copy_export)
    with pytest.raises(ValueError, match="not a CTranslate2 export"):  # --force spares it
        ct2.export(copy_run["checkpoint"], copy_run["checkpoint"], force=True)
    assert (copy_run["checkpoint"] / "model.safetensors").is_file()

    from transformers import BlenderbotSmallConfig, BlenderbotSmallForConditionalGeneration

    config = BlenderbotSmallConfig(vocab_size=64, d_model=16, encoder_layers=1, decoder_layers=1,
                                   encoder_attention_heads=2, decoder_attention_heads=2,
                                   encoder_ffn_dim=32, decoder_ffn_dim=32)
    BlenderbotSmallForConditionalGeneration(config).save_pretrained(tmp_path / "bb")
    with pytest.raises(ValueError, match="model_type 'blenderbot-small'"):
        ct2.export(tmp_path / "bb", tmp_path / "bb-ct2")
    assert not (tmp_path / "bb-ct2").exists()

    with pytest.raises(ValueError, match="CTranslate2 export"):
        tformer.load(copy_export, engine="torch")
    with pytest.raises(ValueError, match="engine must be one of"):
        tformer.load(copy_export, engine="onnx")
    with pytest.raises(ValueError, match="for engine 'ctranslate2' only"):
        tformer.load(copy_run["checkpoint"], engine="torch", compute_type="int8")


def test_the_engine_has_the_seq2seq_interface(copy_run, copy_export, copy_texts):
    engine = tformer.load(copy_export)
    one = engine.generate(copy_texts[0], max_new_tokens=16)
    assert isinstance(one, str) and one == engine.generate(copy_texts[:1], max_new_tokens=16)[0]
    outputs = engine.generate(copy_texts, max_new_tokens=16, batch_size=3)
    assert outputs == engine.generate(copy_texts, max_new_tokens=16)  # batching changes nothing
    for special in ("<s>", "</s>", "<pad>", "<unk>"):
        assert not any(special in o for o in outputs)
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.generate(copy_texts, max_new_tokens=0)
    with pytest.raises(TypeError):
        engine.generate(copy_texts, max_new_tokens=4, num_beam=2)  # a misspelt option

    # in-memory conversion of the checkpoint gives the export's outputs
    converted = tformer.load(copy_run["checkpoint"], engine="ctranslate2")
    assert converted.generate(copy_texts, max_new_tokens=16) == outputs

    # sampling: reproducible from torch's seed at load, different for another seed
    samples = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        samples.append(tformer.load(copy_export).generate(
            copy_texts, max_new_tokens=16, do_sample=True, top_k=0, temperature=1.5))
    assert samples[0] == samples[1] and samples[0] != samples[2]
    assert samples[0] != outputs


def test_an_end_token_first_gives_an_empty_output_in_both_engines(own_tokenizer, tmp_path):
    """generate() may end at the first step; CTranslate2's default minimum length is 1."""
    from tformer.hf import TformerForConditionalGeneration
    from tformer.tokenization import EOS_ID

    checkpoint = random_own_model(tmp_path / "model", own_tokenizer, tie_embeddings=False)
    model = TformerForConditionalGeneration.from_pretrained(checkpoint)
    with torch.no_grad():  # the last LayerNorm's output leans towards </s>'s output row
        direction = torch.randn(model.config.d_model)
        model.model.decoder.layers[-1].norm3.bias.copy_(2 * direction)
        model.model.lm_head.weight[EOS_ID] = 2 * direction
    model.save_pretrained(checkpoint)
    texts = [r["source"] for r in multi30k(8, start=700)]
    seq2seq = tformer.load(checkpoint, device="cpu")
    engine = tformer.load(ct2.export(checkpoint, tmp_path / "ct2"))
    assert seq2seq.generate(texts, max_new_tokens=8) == [""] * len(texts)
    assert_same_outputs(seq2seq, engine, texts, max_new_tokens=8,
                        decodings={"greedy": {}, "beam4": BEAM})


def test_position_table_bounds_lengths_instead_of_failing(own_tokenizer, tmp_path):
    checkpoint = random_own_model(tmp_path / "model", own_tokenizer, positional="learned",
                                  max_positions=12)
    engine = tformer.load(ct2.export(checkpoint, tmp_path / "ct2"))
    long_text = " ".join(r["source"] for r in multi30k(3))  # > 12 tokens
    out = engine.generate(long_text, max_new_tokens=50)
    ids = own_tokenizer(out, add_special_tokens=False)["input_ids"]
    if own_tokenizer.convert_ids_to_tokens(ids[0]) == "▁":  # the prefix space encoding adds
        ids = ids[1:]
    assert 0 < len(ids) <= 11


# --- command line --------------------------------------------------------------------------


def test_cli_export_generate_evaluate(copy_run, copy_texts, tmp_path, capsys):
    from tformer.cli import main

    checkpoint, data = str(copy_run["checkpoint"]), str(copy_run["val"])
    out = tmp_path / "model-ct2"
    assert main(["export", checkpoint, "--format", "ctranslate2", "--quantization", "float32",
                 "--output", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "model.bin", "shared_vocabulary.json", "tformer_ct2.json", "tokenizer"]
    inputs = tmp_path / "in.txt"
    inputs.write_text("\n".join(copy_texts[:10]) + "\n")
    results = {}
    for name, target, engine in [("torch", checkpoint, "torch"), ("auto", str(out), "auto"),
                                 ("converted", checkpoint, "ctranslate2")]:
        path = tmp_path / f"{name}.txt"
        threads = [] if engine == "torch" else ["--ct2-threads", "1"]
        assert main(["generate", target, "-i", str(inputs), "-o", str(path), "--engine", engine,
                     "--num-beams", "3", "--early-stopping", "--max-new-tokens", "20",
                     *threads]) == 0
        results[name] = path.read_text()
    assert results["torch"] == results["auto"] == results["converted"]

    metrics = {}
    for name, target in [("torch", checkpoint), ("ct2", str(out))]:
        capsys.readouterr()
        assert main(["evaluate", target, "--data", data, "--max-examples", "16",
                     "--output-dir", str(tmp_path / name), "--max-new-tokens", "20"]) == 0
        metrics[name] = json.loads((tmp_path / name / "metrics.json").read_text())
    assert metrics["torch"]["engine"] == "torch" and metrics["ct2"]["engine"] == "ctranslate2"
    assert metrics["ct2"]["bleu"] == metrics["torch"]["bleu"]
    assert metrics["ct2"]["chrf"] == metrics["torch"]["chrf"]

    assert main(["export", checkpoint, "--output", str(out)]) == 2  # exists: one-line error
    assert "already exists" in capsys.readouterr().err


def test_the_server_serves_an_export(copy_export, copy_texts):
    from fastapi.testclient import TestClient

    from tformer.serving.app import create_app

    engine = tformer.load(copy_export)
    with TestClient(create_app(engine)) as client:
        answer = client.post("/v1/generate", json={"inputs": copy_texts[:6], "max_new_tokens": 16,
                                                   "num_beams": 2})
        assert answer.status_code == 200, answer.text
        expected = engine.generate(copy_texts[:6], max_new_tokens=16, num_beams=2)
        assert answer.json()["outputs"] == expected
        assert client.get("/v1/model").json()["engine"] == "ctranslate2"
        assert client.post("/v1/attention", json={"input": copy_texts[0]}).status_code == 501


def test_tformer_works_without_ctranslate2(monkeypatch, copy_export):
    import subprocess
    import sys

    code = ("import sys, tformer, tformer.cli, tformer.evaluation; tformer.cli.build_parser(); "
            "print('ctranslate2' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=True)
    assert done.stdout.strip() == "False"  # imported only when an export or the engine runs

    monkeypatch.setitem(sys.modules, "ctranslate2", None)  # as if not installed
    with pytest.raises(ImportError, match=r"pip install 'tformer\[ct2\]'"):
        tformer.load(copy_export)
