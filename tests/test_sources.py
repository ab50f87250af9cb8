"""Named datasets: the Hub source, the local mirror (TFORMER_DATA_DIR), `tformer data`, and every
recipe's data (the last only where a mirror is given)."""

import dataclasses
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from datasets import Dataset

from tformer.cli import main as cli
from tformer.data import DataError, sources
from tformer.training import ConfigError, load_config
from tformer.training.setup import load_texts

from .conftest import MIRROR, needs_mirror
from .synthetic import captions, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def _recipe(path: Path) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _write_mirror(root: Path, name: str = "multi30k") -> dict[str, Path]:
    """A mirror folder for ``name`` holding synthetic captions, one file per split."""
    records = captions(60)
    files = sources.get_source(name).mirror_files(root)
    for path, part in zip(files.values(), (records[:40], records[40:50], records[50:])):
        write_jsonl(path, part)
    return files


@pytest.fixture
def no_mirror(monkeypatch):
    monkeypatch.delenv(sources.DATA_DIR_ENV, raising=False)


@pytest.fixture
def offline(monkeypatch, no_mirror):
    """No mirror and no Hub: the probe answers "unreachable" at once."""
    monkeypatch.setattr("tformer.data.loading.hub_reachable", lambda *a, **k: False)


def test_every_recipe_names_a_known_dataset_and_every_dataset_has_a_recipe():
    assert RECIPES, "no recipes found"
    used = {}
    for path in RECIPES:
        data = _recipe(path).get("data", {})
        assert not any(str(v).startswith("..") for v in data.values()), path
        if "dataset" in data:
            assert data["dataset"] in sources.DATASETS, path
            used.setdefault(data["dataset"], []).append(path.name)
    assert set(used) == set(sources.DATASETS)  # `tformer data list` is what the recipes use


def test_the_mirror_is_read_when_set(tmp_path, monkeypatch):
    files = _write_mirror(tmp_path)
    monkeypatch.setenv(sources.DATA_DIR_ENV, str(tmp_path))
    where = sources.locate("multi30k")
    assert {role: Path(w.path_or_name) for role, w in where.items()} == files
    texts, stats = load_texts(load_config(None, ["data.dataset=multi30k"]))
    assert {k: len(v) for k, v in texts.items()} == {"train": 40, "validation": 10, "test": 10}
    assert texts["train"][0] == {k: captions(1)[0][k] for k in ("source", "target")}
    assert stats["dataset"] == "multi30k"


def test_without_a_mirror_the_hub_split_and_columns_are_used(no_mirror, monkeypatch):
    asked = []

    def load_dataset(name, *config, split):
        asked.append((name, config, split))
        return Dataset.from_dict({"en": ["A dog runs ."], "de": ["Ein Hund läuft ."]})

    monkeypatch.setattr("tformer.data.loading.hub_reachable", lambda *a, **k: True)
    monkeypatch.setattr("datasets.load_dataset", load_dataset)
    texts, _ = load_texts(load_config(None, ["data.dataset=multi30k"]))
    assert asked == [("bentrevett/multi30k", (), s) for s in ("train", "validation", "test")]
    assert texts["test"][0] == {"source": "A dog runs .", "target": "Ein Hund läuft ."}


def test_neither_mirror_nor_hub_names_both_ways_and_the_files(offline):
    with pytest.raises(DataError) as error:
        load_texts(load_config(None, ["data.dataset=dialogsum"]))
    message = str(error.value)
    for part in ("knkarthick/dialogsum", "TFORMER_DATA_DIR", "<dir>/dialogsum/train.jsonl",
                 "<dir>/dialogsum/validation.jsonl", "<dir>/dialogsum/test.jsonl",
                 "tformer data write dialogsum"):
        assert part in message


def test_a_mirror_missing_a_file_names_it(tmp_path, monkeypatch):
    files = _write_mirror(tmp_path)
    files["test"].unlink()
    monkeypatch.setenv(sources.DATA_DIR_ENV, str(tmp_path))
    with pytest.raises(DataError, match=f"has no {files['test']}"):
        sources.locate("multi30k")


def test_config_refuses_unknown_datasets_and_datasets_with_files():
    with pytest.raises(ConfigError, match="data.dataset must be one of multi30k"):
        load_config(None, ["data.dataset=multi31k"])
    with pytest.raises(ConfigError, match="drop data.train"):
        load_config(None, ["data.dataset=multi30k", "data.train=x.jsonl"])


@pytest.fixture
def fake_registry(monkeypatch):
    """One dataset, ``toy``, loaded from a fake Hub whose rows the test knows."""
    rows = {"train": captions(30)[:20], "dev": captions(30)[20:25], "test": captions(30)[25:]}

    def load_dataset(name, *config, split):
        assert (name, config) == ("someone/toy", ("cfg",))
        return Dataset.from_dict({"english": [r["source"] for r in rows[split]],
                                  "german": [r["target"] for r in rows[split]]})

    toy = sources.DatasetSource(
        name="toy", task="test", hub_id="someone/toy", hub_config="cfg", source_column="english",
        target_column="german", license="none",
        splits={"train": sources.Split("train.jsonl", "train", 20, ""),
                "validation": sources.Split("val.jsonl", "dev", 5, ""),
                "test": sources.Split("test.jsonl", "test", 5, "")},
    )
    monkeypatch.setitem(sources.DATASETS, "toy", toy)
    monkeypatch.setattr("tformer.data.loading.hub_reachable", lambda *a, **k: True)
    monkeypatch.setattr("datasets.load_dataset", load_dataset)
    return rows


def _record_checksums(root: Path) -> None:
    """Make the files now under ``root/toy`` the reference the registry records."""
    toy = sources.DATASETS["toy"]
    splits = {role: dataclasses.replace(split, sha256=hashlib.sha256(
        (root / "toy" / split.file).read_bytes()).hexdigest()) for role, split in toy.splits.items()}
    sources.DATASETS["toy"] = dataclasses.replace(toy, splits=splits)


def test_write_then_verify_then_catch_every_kind_of_difference(fake_registry, tmp_path, capsys):
    assert cli(["data", "write", "toy", "--to", str(tmp_path)]) == 0
    lines = (tmp_path / "toy" / "val.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(x)["source"] for x in lines] == [r["source"] for r in fake_registry["dev"]]
    assert not list(tmp_path.rglob("*.partial"))
    _record_checksums(tmp_path)
    assert cli(["data", "verify", "toy", "--dir", str(tmp_path)]) == 0
    assert "all 3 files match" in capsys.readouterr().out

    train = tmp_path / "toy" / "train.jsonl"
    data = bytearray(train.read_bytes())
    data[10] = ord("X") if data[10] != ord("X") else ord("Y")  # same size, other bytes
    train.write_bytes(bytes(data))
    (tmp_path / "toy" / "val.jsonl").write_text("\n".join(lines[:-1]) + "\n", encoding="utf-8")
    (tmp_path / "toy" / "test.jsonl").unlink()
    assert cli(["data", "verify", "toy", "--dir", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert f"CHECKSUM  {train}" in out
    assert f"ROWS      {tmp_path / 'toy' / 'val.jsonl'}: 4 rows, the reference has 5" in out
    assert f"MISSING   {tmp_path / 'toy' / 'test.jsonl'}" in out
    assert "3 of 3 files differ" in out


def test_write_offline_keeps_what_was_there(offline, tmp_path, capsys):
    old = write_jsonl(tmp_path / "multi30k" / "train.jsonl", captions(3))
    before = old.read_bytes()
    assert cli(["data", "write", "multi30k", "--to", str(tmp_path)]) == 2
    assert "bentrevett/multi30k" in capsys.readouterr().err
    assert old.read_bytes() == before


def test_cli_list_and_errors(no_mirror, capsys):
    assert cli(["data", "list"]) == 0
    out = capsys.readouterr().out
    for source in sources.DATASETS.values():
        assert f"Hub: {source.hub_id}" in out
        for split in source.splits.values():
            assert f"mirror {source.name}/{split.file}" in out
    assert cli(["data", "verify"]) == 2  # no directory given, none set
    assert "set TFORMER_DATA_DIR" in capsys.readouterr().err
    assert cli(["data", "verify", "nope", "--dir", "."]) == 2
    assert "unknown dataset 'nope'" in capsys.readouterr().err


# --- with a mirror of the real datasets (TFORMER_DATA_DIR) --------------------------------------


@needs_mirror(*(f"{s.name}/{split.file}" for s in sources.DATASETS.values()
                for split in s.splits.values()))
def test_the_mirror_matches_the_reference_row_counts_and_checksums():
    bad = [str(check) for check in sources.verify_mirror(MIRROR) if not check.ok]
    assert not bad


# Small settings that let any recipe run five steps in seconds; the rest is the recipe's.
SMOKE = ["train.max_steps=5", "train.max_minutes=null", "train.decay_over=steps",
         "train.eval_every=5", "train.eval_max_examples=4", "train.max_new_tokens=4",
         "train.num_beams=1", "train.compile=false", "data.vocab_size=500"]


@pytest.mark.slow
@pytest.mark.mirror
@pytest.mark.parametrize("recipe", [
    p for p in RECIPES if "pretrained" not in _recipe(p)["model"]
    and ("dataset" in _recipe(p)["data"] or p.stem == "multi30k_moses")  # not the demo's corpus
], ids=lambda p: p.stem)
def test_every_own_model_recipe_starts_training(recipe, tmp_path):
    name = _recipe(recipe)["data"].get("dataset", "multi30k")
    if MIRROR is None or not (MIRROR / name).is_dir():
        pytest.skip(f"needs TFORMER_DATA_DIR with {name}/ (a mirror of real datasets)")
    overrides = [*SMOKE, f"train.output_dir={tmp_path / 'run'}"]
    if recipe.stem == "multi30k_moses":  # its data is prepare's output
        subprocess.run([sys.executable, str(ROOT / "recipes" / "multi30k_moses.py"), "prepare",
                        "--out", str(tmp_path / "prepared")], check=True, timeout=600)
        overrides += [f"data.{k}={tmp_path / 'prepared' / f}.jsonl"
                      for k, f in (("train", "train"), ("validation", "val"), ("test", "test2016"))]
    done = subprocess.run([sys.executable, "-m", "tformer.cli", "train", str(recipe), *overrides],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "stopped by: max_steps at step 5" in done.stdout


@pytest.mark.mirror
@pytest.mark.parametrize("recipe", [p for p in RECIPES if "pretrained" in _recipe(p)["model"]
                                    and "dataset" in _recipe(p)["data"]], ids=lambda p: p.stem)
def test_every_pretrained_recipe_finds_its_data(recipe):
    # The model itself needs the Hub (no weights are downloaded in tests): its data is checked.
    name = _recipe(recipe)["data"]["dataset"]
    if MIRROR is None or not (MIRROR / name).is_dir():
        pytest.skip(f"needs TFORMER_DATA_DIR with {name}/ (a mirror of real datasets)")
    texts, _ = load_texts(load_config(str(recipe), []))
    expected = {role: s.rows for role, s in sources.DATASETS[name].splits.items()}
    assert {k: len(v) for k, v in texts.items()} == expected
