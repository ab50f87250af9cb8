"""Recipe scripts: `recipes/multi30k_moses.py report`, the published protocol in one command."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[1] / "recipes" / "multi30k_moses.py"


def test_report_averages_evaluates_and_scores_a_run(reference_run, data_files, tmp_path):
    # The tiny reference run stands in for a Multi30k run: five pairs of its validation file
    # are the prepared val and test2016 splits (their targets are the references). A copy: report writes
    # into the run directory, which other tests share.
    run = Path(shutil.copytree(reference_run, tmp_path / "run"))
    lines = data_files["validation"].read_text(encoding="utf-8").splitlines()[:5]
    for split in ("val", "test2016"):
        (tmp_path / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "report", str(run), "--prepared", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    table = [line for line in done.stdout.splitlines() if line.startswith("| avg5 |")
             or line.startswith("| step-")]
    assert len(table) == 4  # average and last checkpoint, on test2016 and val
    assert (run / "avg5" / "model.safetensors").exists()
    for name in ("avg5", "step-0000012"):
        for split in ("test2016", "val"):
            out = run / f"eval-{split}-{name}"
            bleu = json.loads((out / "metrics.json").read_text())["bleu_moses_lc"]
            detok = json.loads((out / "detok_metrics.json").read_text())["detok_bleu_lc"]
            assert f"| {name} | {split} | {bleu:.2f} | {detok:.2f} |" in done.stdout
            assert len((out / "predictions.jsonl").read_text().splitlines()) == 5


def test_report_on_a_directory_without_checkpoints_says_so(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "report", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert f"report: {tmp_path}: no checkpoints under {tmp_path / 'checkpoints'}" in done.stderr
    assert "Traceback" not in done.stderr
