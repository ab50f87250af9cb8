"""Metrics against the sacreBLEU command line and known values; generate and evaluate end to
end on a tiny trained model."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tformer.data import DataError
from tformer.metrics import all_metrics, bleu, chrf, is_unsegmented, moses_bleu, rouge

HYPS = ["The cat sat on the mat.", "A dog is running in the park today", "Hello world"]
REFS = ["The cat is sitting on the mat.", "A dog runs in the park.", "Hello there world"]
REFS2 = ["There is a cat on the mat.", "The dog is running in a park today", "Hi world"]


def sacrebleu_cli(tmp_path: Path, metric: str, refs: list[list[str]], extra=()) -> float:
    hyp_file = tmp_path / "hyp.txt"
    hyp_file.write_text("\n".join(HYPS) + "\n")
    ref_files = []
    for i, stream in enumerate(refs):
        f = tmp_path / f"ref{i}.txt"
        f.write_text("\n".join(stream) + "\n")
        ref_files.append(str(f))
    out = subprocess.run(
        [sys.executable, "-m", "sacrebleu", *ref_files, "-i", str(hyp_file), "-m", metric,
         "-b", "-w", "6", *extra],
        capture_output=True, text=True, check=True,
    ).stdout
    return float(out.strip())


def test_bleu_and_chrf_equal_the_sacrebleu_command_line(tmp_path):
    assert bleu(HYPS, REFS)["bleu"] == pytest.approx(sacrebleu_cli(tmp_path, "bleu", [REFS]), abs=1e-5)
    assert chrf(HYPS, REFS)["chrf"] == pytest.approx(sacrebleu_cli(tmp_path, "chrf", [REFS]), abs=1e-5)
    multi = [[a, b] for a, b in zip(REFS, REFS2)]
    expected = sacrebleu_cli(tmp_path, "bleu", [REFS, REFS2])
    assert bleu(HYPS, multi)["bleu"] == pytest.approx(expected, abs=1e-5)
    assert bleu(HYPS, multi)["bleu"] > bleu(HYPS, REFS)["bleu"]  # a second reference helps
    zh_h, zh_r = ["我们今天去公园散步。"], ["我们今天在公园里散步。"]
    (tmp_path / "zh_hyp.txt").write_text(zh_h[0] + "\n")
    (tmp_path / "zh_ref.txt").write_text(zh_r[0] + "\n")
    cli = subprocess.run(
        [sys.executable, "-m", "sacrebleu", str(tmp_path / "zh_ref.txt"), "-i",
         str(tmp_path / "zh_hyp.txt"), "-m", "bleu", "-b", "-w", "6", "-tok", "zh"],
        capture_output=True, text=True, check=True).stdout
    assert bleu(zh_h, zh_r, tokenize="zh")["bleu"] == pytest.approx(float(cli), abs=1e-5)
    assert "tok:13a" in bleu(HYPS, REFS)["bleu_signature"]


DE_HYPS = ["Ein Mann fährt mit dem Fahrrad „schnell“ durch die Stadt.",
           "Zwei Hunde spielen im Schnee, während es schneit!", "Eine Frau (mit Hut) lacht."]
DE_REFS = ["Ein Mann fährt \"schnell\" mit seinem Fahrrad durch die Stadt.",
           "Zwei Hunde spielen draußen im Schnee.", "Eine Frau mit einem Hut lacht laut."]


def test_moses_bleu_equals_the_sacremoses_and_sacrebleu_command_lines(tmp_path):
    """The published Multi30k measure, rebuilt from the tools' own command lines:
    sacremoses normalize | sacremoses tokenize, then sacrebleu -tok none -lc."""
    def prepare(lines: list[str], name: str) -> Path:
        raw = tmp_path / f"{name}.txt"
        raw.write_text("\n".join(lines) + "\n", encoding="utf-8")
        out = subprocess.run(
            [str(Path(sys.executable).with_name("sacremoses")), "-q", "-l", "de", "-j", "1",
             "normalize", "tokenize"], stdin=raw.open(encoding="utf-8"),
            capture_output=True, text=True, check=True).stdout
        path = tmp_path / f"{name}.tok"
        path.write_text(out, encoding="utf-8")
        return path

    hyp, ref = prepare(DE_HYPS, "hyp"), prepare(DE_REFS, "ref")
    cli = subprocess.run(
        [sys.executable, "-m", "sacrebleu", str(ref), "-i", str(hyp), "-m", "bleu", "-b",
         "-w", "6", "-tok", "none", "-lc"], capture_output=True, text=True, check=True).stdout
    ours = moses_bleu(DE_HYPS, DE_REFS, "de")
    assert ours["bleu_moses_lc"] == pytest.approx(float(cli), abs=1e-5)
    assert "tok:none" in ours["bleu_moses_lc_signature"]
    # tokenised lowercased BLEU is not detokenised sacreBLEU: the two differ on these pairs
    assert abs(ours["bleu_moses_lc"] - bleu(DE_HYPS, DE_REFS)["bleu"]) > 1
    assert moses_bleu(DE_REFS, DE_REFS, "de")["bleu_moses_lc"] == pytest.approx(100)
    assert "bleu_moses_lc" in all_metrics(DE_HYPS, DE_REFS, moses_lang="de")


def test_rouge_known_values():
    perfect = {k: pytest.approx(100.0) for k in ("rouge1", "rouge2", "rougeL", "rougeLsum")}
    assert rouge(REFS, REFS) == perfect
    # hand-computed: prediction "the cat sat", reference "the cat sat down": unigram
    # P = 3/3, R = 3/4, F1 = 6/7
    assert rouge(["the cat sat"], ["the cat sat down"])["rouge1"] == pytest.approx(100 * 6 / 7)


def test_multi_reference_rouge_takes_the_best_reference():
    # vs "a b c d": P = 2/2, R = 2/4 -> F1 2/3; vs "a b": F1 = 1; the best is kept
    assert rouge(["a b"], [["a b c d", "a b"]])["rouge1"] == pytest.approx(100.0)
    assert rouge(["a b"], [["a b c d", "x y"]])["rouge1"] == pytest.approx(100 * 2 / 3)


def test_chinese_gets_character_rouge_and_zh_bleu():
    hyps, refs = ["我们今天去公园散步。"], ["我们今天在公园里散步。"]
    assert rouge(hyps, refs)["rouge1"] == 0.0  # the pitfall: rouge-score drops CJK characters
    m = all_metrics(hyps, refs)
    assert m["language"] == "zh" and m["rouge1"] > 50
    assert "tok:zh" in m["bleu_signature"] and m["bleu"] > 0
    assert is_unsegmented(["中文标题"]) and not is_unsegmented(["English title"])


def test_bad_metric_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        rouge(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="reference 2 is empty"):
        bleu(["a", "b"], ["a", "  "])


def test_eval_file_errors_name_the_line(tmp_path):
    from tformer.data import load_eval_examples

    f = tmp_path / "e.jsonl"
    f.write_text('{"source": "x", "target": ["a", "b"]}\n{"source": "y", "target": ""}\n')
    with pytest.raises(DataError, match=r"e.jsonl, line 2, field 'target': reference 1 is empty"):
        load_eval_examples(f)
    f.write_text('{"source": "x", "summary": "a"}\n')
    with pytest.raises(DataError, match=r"line 1: no field 'target'"):
        load_eval_examples(f)
    f.write_text('{"source": "x", "target": ["a", 3]}\n')
    with pytest.raises(DataError, match=r"reference 2 is int"):
        load_eval_examples(f)


@pytest.fixture(scope="module")
def checkpoint(reference_run) -> Path:
    return reference_run / "checkpoints" / "step-0000012"


def test_python_api_batched_equals_one_at_a_time(checkpoint, data_files):
    import tformer

    model = tformer.load(checkpoint)
    texts = [json.loads(x)["source"] for x in data_files["validation"].read_text().splitlines()][:9]
    batched = model.generate(texts, max_new_tokens=12, batch_size=4)
    alone = [model.generate(t, max_new_tokens=12) for t in texts]
    assert batched == alone and all(isinstance(x, str) for x in batched)
    beams = model.generate(texts[:3], max_new_tokens=12, num_beams=3, no_repeat_ngram_size=2)
    assert len(beams) == 3


def test_cli_generate_equals_python_api_and_keeps_order_and_ids(checkpoint, data_files, tmp_path):
    import tformer

    out = tmp_path / "out.jsonl"
    done = subprocess.run(
        [sys.executable, "-m", "tformer.cli", "generate", str(checkpoint), "-i",
         str(data_files["validation"]), "-o", str(out), "--max-new-tokens", "12",
         "--batch-size", "5"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    records = [json.loads(x) for x in data_files["validation"].read_text().splitlines()]
    assert [r["id"] for r in rows] == [r["id"] for r in records]
    api = tformer.load(checkpoint).generate([r["source"] for r in records], max_new_tokens=12)
    assert [r["output"] for r in rows] == api


def test_cli_evaluate_writes_metrics_and_predictions(checkpoint, data_files, tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "tformer.cli", "evaluate", str(checkpoint), "--data",
         str(data_files["validation"]), "--output-dir", str(tmp_path), "--max-new-tokens", "12",
         "--num-beams", "2"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["examples"] == 40 and "bleu_signature" in metrics
    for key in ("rouge1", "rouge2", "rougeL", "rougeLsum", "bleu", "chrf"):
        assert 0 <= metrics[key] <= 100
    preds = [json.loads(x) for x in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 40 and preds[0]["references"]
    bad = subprocess.run(
        [sys.executable, "-m", "tformer.cli", "evaluate", str(checkpoint), "--data",
         str(tmp_path / "missing.jsonl")], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "missing.jsonl: no such file" in bad.stderr
