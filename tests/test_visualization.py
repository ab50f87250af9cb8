"""Attention maps (tformer.visualization): rows are distributions, padding gets no weight, the
maps are the model's own ``output_attentions``, the PNGs have the size their layout promises,
Chinese labels have glyphs, Hugging Face T5/BART give maps, a decoder-only model's causal maps
are GPT-2's and Llama's own, the CLI writes everything, and the run report is written (by
``train`` too) even for an interrupted run. (The CLI and the report of decoder-only runs are
tested on the tiny runs of ``tests/test_lm.py`` and ``tests/test_sft.py``.)"""

import json
import logging
import shutil
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import tformer
from tformer.cli import main
from tformer.convert import from_transformers
from tformer.generation import Seq2Seq
from tformer.tokenization import train_tokenizer
from tformer.visualization import attention_maps, attention_maps_batch
from tformer.visualization.attention import collate_pairs, teacher_forced_attentions
from tformer.visualization.tokens import readable_tokens

from .conftest import tiny_overrides
from .serving_helpers import served_checkpoint
from .test_convert import reference
from .test_pretrained import bart_dir, dialogs, t5_dir  # noqa: F401 (fixtures)
from .test_sft import tiny_model

SOURCES = ["A man in a blue shirt is riding a bike down the street.", "Two dogs play."]
TARGETS = ["Ein Mann fährt Fahrrad.", "Zwei Hunde spielen im Schnee auf der Wiese."]


@pytest.fixture(scope="module")
def seq2seq(reference_run):
    checkpoint = sorted((reference_run / "checkpoints").glob("step-*"))[-1]
    return tformer.load(checkpoint, device="cpu")


def test_rows_sum_to_one_and_padded_sources_get_zero_weight(seq2seq):
    batch = collate_pairs(seq2seq.model, seq2seq.tokenizer, SOURCES, TARGETS)
    lengths = batch["attention_mask"].sum(1).tolist()
    assert lengths[1] < lengths[0]  # the second source is padded
    weights = teacher_forced_attentions(seq2seq.model, batch)
    assert len(weights["encoder"]) == len(weights["cross"]) == 2  # tiny: 2 layers
    for kind in ("encoder", "decoder", "cross"):
        for w in weights[kind]:
            assert w.shape[:2] == (2, 4)  # (B, H, Tq, Tk)
            torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:-1]), atol=1e-5, rtol=0)
    short = lengths[1]
    for w in weights["encoder"] + weights["cross"]:
        assert (w[1, :, :, short:] == 0).all()  # not one query looks at padding
        assert (w[1, :, :, :short] > 0).any()

    # cut to its own length, the padded example's maps equal those computed without padding
    batched = attention_maps_batch(seq2seq, SOURCES, TARGETS)
    alone = attention_maps(seq2seq, SOURCES[1], TARGETS[1])
    assert batched[1].source_tokens == alone.source_tokens
    assert batched[1].target_tokens == alone.target_tokens
    for kind in ("encoder", "decoder", "cross"):
        for a, b in zip(batched[1].kind(kind), alone.kind(kind)):
            assert a.shape == b.shape
            np.testing.assert_allclose(a, b, atol=1e-5)


def test_maps_are_the_models_own_output_attentions(seq2seq):
    maps = attention_maps(seq2seq, SOURCES[0], TARGETS[0])
    tok = seq2seq.tokenizer
    source = tok(SOURCES[0], return_tensors="pt")
    labels = tok(text_target=TARGETS[0], return_tensors="pt")["input_ids"]
    start = seq2seq.model.config.decoder_start_token_id
    decoder_input = torch.cat([torch.tensor([[start]]), labels[:, :-1]], dim=1)
    with torch.no_grad():
        out = seq2seq.model(**source, decoder_input_ids=decoder_input, output_attentions=True)
    S, T = source["input_ids"].shape[1], labels.shape[1]
    assert (len(maps.source_tokens), len(maps.target_tokens)) == (S, T)
    assert maps.target_tokens[-1] == "</s>" and maps.decoder_input_tokens[0] == "<s>"
    assert maps.decoder_input_tokens[1:] == maps.target_tokens[:-1]
    for mine, theirs in ((maps.encoder, out.encoder_attentions),
                         (maps.decoder, out.decoder_attentions),
                         (maps.cross, out.cross_attentions)):
        assert len(mine) == len(theirs)
        for a, b in zip(mine, theirs):
            np.testing.assert_allclose(a, b[0].numpy(), atol=1e-6)
    for layer in maps.decoder:  # causal: no position looks ahead
        assert np.triu(layer, k=1).max() == 0

    data = json.loads(json.dumps(maps.to_json()))
    assert data["layers"] == 2 and data["heads"] == 4
    assert data["family"] == "seq2seq" and "prompt_length" not in data
    assert np.asarray(data["cross"]).shape == (2, 4, T, S)
    assert data["cross"][0][0][0][0] == round(float(maps.cross[0][0, 0, 0]), 4)


def spy_on_generate(seq2seq, monkeypatch) -> list[dict]:
    """The options of each ``seq2seq.generate`` call from now on (it still generates)."""
    calls = []
    original = seq2seq.generate

    def spy(texts, **options):
        calls.append(options)
        return original(texts, **options)

    monkeypatch.setattr(seq2seq, "generate", spy)
    return calls


def test_a_missing_target_is_generated_through_seq2seq_generate(seq2seq, monkeypatch):
    original = seq2seq.generate
    calls = spy_on_generate(seq2seq, monkeypatch)
    maps = attention_maps(seq2seq, SOURCES[1], max_new_tokens=5, num_beams=2)
    assert calls and calls[0]["max_new_tokens"] == 5 and calls[0]["num_beams"] == 2
    generated = original(SOURCES[1], max_new_tokens=5, num_beams=2)
    ids = seq2seq.tokenizer(text_target=generated)["input_ids"]
    ids = ids if len(ids) <= 6 else ids[:5] + ids[-1:]  # cut to what generation allowed
    assert maps.target_tokens == readable_tokens(seq2seq.tokenizer, ids)


def test_readable_token_labels(seq2seq, bart_dir):  # noqa: F811
    from transformers import AutoTokenizer

    tok = seq2seq.tokenizer  # Metaspace BPE with byte fallback, vocabulary of 400
    ids = tok("Ein Hund 中")["input_ids"]
    pieces = tok.convert_ids_to_tokens(ids)
    assert any(p.startswith("▁") for p in pieces) and "<0xE4>" in pieces
    labels = readable_tokens(tok, ids)
    assert labels[-1] == "</s>" and not any("▁" in x for x in labels)
    assert labels[-4:-1] == ["中[1/3]", "中[2/3]", "中[3/3]"]
    assert "".join(labels[:-4]).replace("␣", "") == "EinHund"

    bart = AutoTokenizer.from_pretrained(bart_dir)  # byte-level BPE: Ġ for a space
    ids = bart("Hello world 中文")["input_ids"]
    assert any("Ġ" in p for p in bart.convert_ids_to_tokens(ids))
    labels = readable_tokens(bart, ids)
    assert labels[0] == "<s>" and labels[-1] == "</s>"
    assert not any("Ġ" in x for x in labels)
    joined = "".join(x.split("[")[0] if "[" in x else x for x in labels[1:-1])
    assert "world" in joined and "中" in joined and "文" in joined


# --- pictures -------------------------------------------------------------------------


def test_png_size_follows_the_token_count(tmp_path):
    from tformer.visualization.plots import CELL_PX, GRID_CELL_PX, figure_size_px, plot_panels

    rng = np.random.default_rng(0)

    def draw(n_query, n_key, rows=1, cols=1):
        panels = [[rng.dirichlet(np.ones(n_key), n_query) for _ in range(cols)]
                  for _ in range(rows)]
        path = plot_panels(panels, [f"q{i}" for i in range(n_query)],
                           [f"k{j}" for j in range(n_key)],
                           [["t"] * cols for _ in range(rows)], "test",
                           tmp_path / f"{n_query}x{n_key}x{rows}x{cols}.png")
        return Image.open(path).size

    assert draw(3, 5) == figure_size_px(3, 5)
    w, h = draw(3, 6)
    assert (w, h) == (figure_size_px(3, 5)[0] + CELL_PX, figure_size_px(3, 5)[1])
    assert draw(4, 6)[1] == h + CELL_PX
    w2, h2 = draw(3, 5, rows=2, cols=4)
    assert (w2, h2) == figure_size_px(3, 5, 2, 4)
    assert draw(3, 6, rows=2, cols=4)[0] == w2 + 4 * GRID_CELL_PX  # one token, four panels


def _glyph_warnings(draw) -> list[str]:
    """Messages about missing glyphs that ``draw()`` raised (matplotlib logs them, and older
    versions warn)."""
    messages = []

    class Catch(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    handler = Catch(logging.WARNING)
    logging.getLogger("matplotlib").addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            draw()
    finally:
        logging.getLogger("matplotlib").removeHandler(handler)
    return [m for m in messages + [str(w.message) for w in caught] if "missing from" in m
            or "findfont" in m]


def test_chinese_labels_render_with_a_cjk_font(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tformer.visualization.fonts import cjk_family
    from tformer.visualization.plots import plot_panels

    if cjk_family() is None:
        pytest.skip("no CJK font installed (make install adds fonts-wqy-zenhei)")
    labels = ["我", "喜欢", "猫[1/3]", "</s>"]
    maps = [[np.full((4, 4), 0.25)]]

    def ours():
        plot_panels(maps, labels, labels, [["注意力"]], "中文 attention", tmp_path / "zh.png")

    def plain_matplotlib():  # the control: DejaVu Sans alone lacks these glyphs
        with plt.rc_context({"font.family": ["DejaVu Sans"]}):
            fig, ax = plt.subplots()
            ax.set_title("中文")
            fig.savefig(tmp_path / "plain.png")
            plt.close(fig)

    assert _glyph_warnings(plain_matplotlib), "the warning check cannot see missing glyphs"
    assert _glyph_warnings(ours) == []


# --- Hugging Face checkpoints --------------------------------------------------------------


@pytest.mark.parametrize("kind", ["t5", "bart"])
def test_hugging_face_t5_and_bart_give_maps(request, kind):
    model_dir = request.getfixturevalue(f"{kind}_dir")
    s2s = tformer.load(model_dir, device="cpu")
    before = s2s.model.config._attn_implementation
    if kind == "bart":  # loads with sdpa, which returns no weights: switched to eager and back
        assert before == "sdpa"
    maps = attention_maps(s2s, "#Person1#: Hello, how are you? #Person2#: Fine.",
                          "They greet.")
    assert s2s.model.config._attn_implementation == before  # fast attention restored
    assert maps.counts() == {k: {"layers": 2, "heads": 4} for k in ("cross", "encoder", "decoder")}
    S, T = len(maps.source_tokens), len(maps.target_tokens)
    assert maps.cross[0].shape == (4, T, S) and maps.encoder[1].shape == (4, S, S)
    for layer in maps.encoder + maps.decoder + maps.cross:
        np.testing.assert_allclose(layer.sum(-1), 1.0, atol=1e-5)
    assert maps.source_tokens[-1] == "</s>" and "Hello" in "".join(maps.source_tokens)
    generated = attention_maps(s2s, "#Person1#: Hello.", max_new_tokens=3)
    assert 1 <= len(generated.target_tokens) <= 4


# --- decoder-only models -------------------------------------------------------------------

PROMPT, CONTINUATION = "the cat", " sat on the mat"


@pytest.fixture(scope="module")
def char_tokenizer():
    """Characters: a dozen ids, inside the vocabulary of `tests.test_convert.reference`."""
    return train_tokenizer([PROMPT + CONTINUATION], kind="char", append_eos=False)


def char_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_decoder_only_maps_equal_gpt2_and_llama_own(name, char_tokenizer):
    """The maps of tformer's copy (`tformer.convert`) of a GPT2LMHeadModel / LlamaForCausalLM
    are that model's own ``attentions`` (eager, output_attentions=True): one map per query
    head (the Llama has 2 key/value heads for 4), upper triangle exactly 0, rows distributions.
    The Hugging Face model itself, loaded with sdpa, gives them too (switched to eager and
    back)."""
    ref = reference(name)
    ref.set_attn_implementation("eager")
    ours = Seq2Seq(from_transformers(ref), char_tokenizer)
    maps = attention_maps(ours, PROMPT, CONTINUATION)
    ids = char_ids(char_tokenizer, PROMPT + CONTINUATION)
    assert maps.family == "causal" and maps.kinds() == ["decoder"]
    assert maps.prompt_length == len(char_ids(char_tokenizer, PROMPT))
    assert maps.target_tokens == maps.decoder_input_tokens == readable_tokens(char_tokenizer, ids)
    assert maps.source_tokens == [] and maps.encoder == [] and maps.cross == []
    with torch.no_grad():
        expected = ref(input_ids=torch.tensor([ids]), output_attentions=True).attentions
    assert len(maps.decoder) == len(expected) == 2
    for mine, theirs in zip(maps.decoder, expected):
        assert mine.shape == (4, len(ids), len(ids))
        np.testing.assert_allclose(mine, theirs[0].numpy(), atol=1e-5, rtol=0)
        assert np.triu(mine, k=1).max() == 0  # causal: no position sees a later one
        np.testing.assert_allclose(mine.sum(-1), 1.0, atol=1e-5)
    data = json.loads(json.dumps(maps.to_json()))
    assert (data["family"], data["prompt_length"], data["layers"], data["heads"]) == (
        "causal", maps.prompt_length, 2, 4)
    assert data["encoder"] == data["cross"] == [] and data["counts"]["cross"]["layers"] == 0

    ref.set_attn_implementation("sdpa")
    theirs = attention_maps(Seq2Seq(ref, char_tokenizer), PROMPT, CONTINUATION)
    assert ref.config._attn_implementation == "sdpa"
    for a, b in zip(theirs.decoder, maps.decoder):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_decoder_only_batch_equals_one_at_a_time_and_continuations_are_generated(
        char_tokenizer, monkeypatch):
    ours = Seq2Seq(tiny_model(len(char_tokenizer), "llama"), char_tokenizer)  # GQA, RoPE
    prompts, continuations = [PROMPT, "a"], [CONTINUATION, " mat"]
    batched = attention_maps_batch(ours, prompts, continuations)  # the second row padded
    for b in range(2):
        alone = attention_maps(ours, prompts[b], continuations[b])
        assert (batched[b].target_tokens, batched[b].prompt_length) == (
            alone.target_tokens, alone.prompt_length)
        for x, y in zip(batched[b].decoder, alone.decoder):
            np.testing.assert_allclose(x, y, atol=1e-6, rtol=0)

    original = ours.generate
    calls = spy_on_generate(ours, monkeypatch)
    generated = attention_maps(ours, "the", max_new_tokens=5)
    # in the model's own context (max_positions 128: the tokenizer states none)
    assert calls == [{"max_new_tokens": 5, "max_source_length": 128}]
    assert generated.prompt_length == 3 and 3 <= len(generated.target_tokens) <= 3 + 5
    continuation = original("the", max_new_tokens=5)
    ids = char_ids(char_tokenizer, "the") + char_ids(char_tokenizer, continuation)[:5]
    assert generated.target_tokens == readable_tokens(char_tokenizer, ids)
    # past the context, the last tokens (the prompt's count with them)
    full = attention_maps(ours, PROMPT, CONTINUATION)
    cut = attention_maps(ours, PROMPT, CONTINUATION, max_source_length=18)
    dropped = len(full.target_tokens) - 18
    assert cut.target_tokens == full.target_tokens[dropped:]
    assert cut.prompt_length == full.prompt_length - dropped
    empty = attention_maps(ours, "", "the")  # from the start of a document
    assert empty.prompt_length == 1 and len(empty.target_tokens) == 4


# --- command line and report ------------------------------------------------------------


def test_cli_attention_writes_pngs_html_and_json(reference_run, tmp_path, capsys):
    from tformer.visualization.plots import figure_size_px

    checkpoint = sorted((reference_run / "checkpoints").glob("step-*"))[-1]
    out = tmp_path / "maps"
    rc = main(["attention", str(checkpoint), "Ein Hund 中.", "--target", "A dog.",
               "--output-dir", str(out), "--device", "cpu"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert str(out / "attention.html") in printed
    data = json.loads((out / "attention.json").read_text(encoding="utf-8"))
    S, T = len(data["source_tokens"]), len(data["target_tokens"])
    assert "中[1/3]" in data["source_tokens"] and data["target_tokens"][-1] == "</s>"
    for kind in ("cross", "encoder", "decoder"):
        assert (out / f"{kind}_heads.png").is_file() and (out / f"{kind}_mean.png").is_file()
    assert Image.open(out / "cross_heads.png").size == figure_size_px(T, S, 2, 4)
    assert Image.open(out / "cross_mean.png").size == figure_size_px(T, S, 1, 2)
    assert Image.open(out / "encoder_heads.png").size == figure_size_px(S, S, 2, 4)
    assert Image.open(out / "decoder_mean.png").size == figure_size_px(T, T, 1, 2)
    rgb = np.asarray(Image.open(out / "cross_heads.png").convert("RGB")).reshape(-1, 3)
    assert len({tuple(p) for p in rgb[::7]}) > 50  # heatmaps, not a blank page
    assert not (out / "copy.png").exists()  # no copy attention in this model
    page = (out / "attention.html").read_text(encoding="utf-8")
    assert "http://" not in page and "https://" not in page and "<script src" not in page

    assert main(["attention", str(tmp_path / "nope"), "x"]) == 2
    assert "tformer attention: error:" in capsys.readouterr().err


def test_cli_attention_of_a_copy_model_also_draws_its_copy_attention(reference_run, tmp_path):
    from tformer.visualization.plots import copy_labels, figure_size_px

    checkpoint = served_checkpoint(reference_run, tmp_path / "copy", copy_attention=True)
    out = tmp_path / "maps"
    assert main(["attention", str(checkpoint), "Ein Hund läuft.", "--target", "A dog runs.",
                 "--output-dir", str(out), "--device", "cpu"]) == 0
    data = json.loads((out / "attention.json").read_text(encoding="utf-8"))
    S, T = len(data["source_tokens"]), len(data["target_tokens"])
    assert Image.open(out / "copy.png").size == figure_size_px(T, S)
    rgb = np.asarray(Image.open(out / "copy.png").convert("RGB")).reshape(-1, 3)
    assert len({tuple(p) for p in rgb[::7]}) > 20  # a heatmap, not a blank page
    # rows are labelled with P(copy) = 1 - p_gen first, so that cutting a long label keeps it
    labels = copy_labels(data["target_tokens"], np.asarray(data["p_gen"]))
    assert labels[0] == f"{1 - data['p_gen'][0]:.2f} {data['target_tokens'][0]}"


def test_train_writes_the_report(reference_run):
    page = (reference_run / "report.html").read_text(encoding="utf-8")
    for section in ("summary", "config", "data", "curves", "predictions", "attention"):
        assert f'<section id="{section}">' in page
    assert "not available" not in page
    assert page.count('class="tf-viewer"') == 3 and page.count("<svg") >= 6
    assert "http://" not in page and "https://" not in page and " src=" not in page


def test_report_of_an_interrupted_run(reference_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(reference_run, run, ignore=shutil.ignore_patterns("report.html"))
    for name in ("summary.json", "data_stats.json"):
        (run / name).unlink()
    with (run / "metrics.jsonl").open("a") as fh:
        fh.write('{"split": "train", "st')  # killed mid-line
    assert main(["report", str(run), "--device", "cpu"]) == 0
    assert str(run / "report.html") in capsys.readouterr().out
    page = (run / "report.html").read_text(encoding="utf-8")
    assert "summary.json: not available" in page and "data_stats.json: not available" in page
    assert "<polyline" in page  # the curves still drawn
    newest = sorted((run / "checkpoints").glob("step-*"))[-1]
    assert f"Checkpoint {newest}" in page  # attention from the newest complete checkpoint

    shutil.rmtree(run / "checkpoints")
    (run / "metrics.jsonl").unlink()
    assert main(["report", str(run)]) == 0
    page = (run / "report.html").read_text(encoding="utf-8")
    assert "metrics.jsonl: not available" in page and "attention maps: not available" in page
    assert main(["report", str(tmp_path / "missing")]) == 2


def test_a_failing_report_never_fails_training(data_files, tmp_path, monkeypatch, caplog):
    from tformer.recipe import run_recipe
    from tformer.training import load_config
    from tformer.visualization import report

    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(report, "write_report", broken)
    out = tmp_path / "run"
    config = load_config(None, tiny_overrides(data_files, out, **{
        "train.max_steps": 2, "train.eval_every": 2, "train.eval_max_examples": 2}))
    with caplog.at_level(logging.WARNING):
        result = run_recipe(config)
    assert result.stopped_by == "max_steps" and (out / "summary.json").is_file()
    assert not (out / "report.html").exists()
    assert any("disk on fire" in r.getMessage() for r in caplog.records)



def test_read_metrics_skips_only_a_torn_last_line(tmp_path, caplog):
    """The one reader of a run's JSON lines: a last line cut short by a crash is skipped (with a
    warning); a bad line anywhere else, or a line that is not an object, is an error naming it."""
    from tformer.visualization.run import RunFileError, read_metrics

    path = tmp_path / "metrics.jsonl"
    good = '{"split": "train", "step": 1, "loss": 2.0}\n{"split": "train", "step": 2, "loss": 1.5}\n'
    path.write_text(good + '{"split": "train", "st')
    with caplog.at_level(logging.WARNING):
        assert [r["step"] for r in read_metrics(path)] == [1, 2]
    assert "line 3: cut short" in caplog.text
    path.write_text(good + "\n")  # blank lines are nothing
    assert len(read_metrics(path)) == 2
    path.write_text('{"split": "train", "st\n' + good)
    with pytest.raises(RunFileError, match="line 1: not JSON"):
        read_metrics(path)
    path.write_text(good + '{"split": "train", "st\n')  # a whole line written, yet not JSON
    with pytest.raises(RunFileError, match="line 3: not JSON"):
        read_metrics(path)
    path.write_text(good + "[1, 2]\n")
    with pytest.raises(RunFileError, match="line 3: a JSON list"):
        read_metrics(path)
    assert read_metrics(tmp_path / "missing.jsonl") == []
