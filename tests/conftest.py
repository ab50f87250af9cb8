"""Shared test fixtures: where the real datasets are, and one tiny trained model."""

import os
from pathlib import Path

import pytest

# ../shared/data beside the repository (as on the developers' machines and in CI);
# TFORMER_SHARED_DATA overrides it.
SHARED_DATA = Path(
    os.environ.get("TFORMER_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
)


def tiny_overrides(data_files: dict[str, Path], out: Path, **extra) -> list[str]:
    """A tiny model trained for 12 steps on 300 Multi30k pairs: seconds on a CPU."""
    values = {
        "data.train": data_files["train"], "data.validation": data_files["validation"],
        "data.vocab_size": 400, "model.size": "tiny", "model.dropout": 0.1,
        "train.max_steps": 12, "train.eval_every": 4, "train.log_every": 1,
        "train.max_tokens": 600, "train.warmup_steps": 4, "train.lr": 3e-3,
        "train.max_new_tokens": 8, "train.eval_max_examples": 8, "train.output_dir": out,
        "train.keep_last": 5,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


@pytest.fixture(scope="session")
def data_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    lines = (SHARED_DATA / "multi30k" / "train.jsonl").read_text(encoding="utf-8").splitlines()
    (root / "train.jsonl").write_text("\n".join(lines[:300]) + "\n", encoding="utf-8")
    (root / "val.jsonl").write_text("\n".join(lines[300:340]) + "\n", encoding="utf-8")
    return {"train": root / "train.jsonl", "validation": root / "val.jsonl"}


@pytest.fixture(scope="session")
def reference_run(data_files, tmp_path_factory) -> Path:
    """An uninterrupted tiny run (the reference for resume tests; a model for the rest)."""
    from tformer.training import load_config, train

    out = tmp_path_factory.mktemp("reference") / "run"
    result = train(load_config(None, tiny_overrides(data_files, out)))
    assert result.stopped_by == "max_steps" and result.state.step == 12
    return out
