"""The command line: errors are one clear line and exit status 2, never a traceback."""

import subprocess
import sys


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tformer.cli", *args], capture_output=True,
                          text=True, timeout=120)


def test_bad_inputs_give_one_line_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"source": "a", "target": "b"}\n{oops\n', encoding="utf-8")
    cases = [
        (["train", f"data.train={tmp_path / 'missing.jsonl'}"], "missing.jsonl: no such file"),
        (["train", f"data.train={bad}"], "bad.jsonl, line 2: not valid JSON"),
        (["train", "train.lrr=3"], "train.lrr"),
        (["train", str(tmp_path / "nope.yaml")], "nope.yaml' not found"),
    ]
    for args, message in cases:
        done = run(*args)
        assert done.returncode == 2, done.stderr
        assert message in done.stderr
        assert "Traceback" not in done.stderr


def test_help_lists_the_verbs():
    done = run("--help")
    assert done.returncode == 0
    assert "train" in done.stdout and "demo" in done.stdout
