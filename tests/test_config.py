"""The configuration system: recipes, dotted overrides, unknown keys and bad values."""

import pytest

from tformer.training.config import ConfigError, load_config
from tformer.training.schedule import lr_factor


def test_defaults_recipe_and_overrides_compose(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  size: tiny\ntrain:\n  lr: 1.0e-3\n  max_steps: 50\n")
    config = load_config(recipe, ["train.lr=3e-4", "model.d_model=64", "data.prefix=summarize: ",
                                  "train.clip_grad_norm=null", "train.adam_betas=[0.9, 0.99]"])
    assert config.model.size == "tiny" and config.model.d_model == 64
    assert config.train.lr == 3e-4 and config.train.max_steps == 50
    assert config.train.clip_grad_norm is None and config.train.adam_betas == (0.9, 0.99)
    assert config.data.prefix == "summarize: "
    assert config.train.warmup_steps == 400  # untouched default
    assert config.model.transformer_config(100, 0).d_model == 64


def test_resolved_config_round_trips(tmp_path):
    config = load_config(None, ["model.size=tiny", "train.max_minutes=2.5"])
    config.save(tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lrr=1", r"train\.lrr.*valid keys"),
        ("optim.lr=1", r"unknown section.*optim"),
        ("train.lr=fast", r"train\.lr expects"),
        ("train.max_steps=0", r"train\.max_steps must be >= 1"),
        ("train.no_repeat_ngram_size=-1", r"train\.no_repeat_ngram_size must be >= 0"),
        ("train.no_repeat_ngram_size=2.5", r"train\.no_repeat_ngram_size expects"),
        ("train.repetition_penalty=0", r"train\.repetition_penalty must be > 0"),
        ("train.repetition_penalty=nan", r"train\.repetition_penalty must be > 0"),
        ("train.schedule=exponential", r"train\.schedule expects .*cosine"),
        ("model.size=huge", r"model\.size must be one of"),
        ("model.d_model=30", r"d_model \(30\) must be divisible"),
        ("data.vocab_size=0", r"data\.vocab_size"),
        ("lr=1", r"section\.key=value"),
    ],
)
def test_bad_keys_and_values_name_the_field(override, message):
    with pytest.raises(ConfigError, match=message):
        config = load_config(None, [override])
        config.model.transformer_config(100, 0)


def test_recipe_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: [1\n")
    with pytest.raises(ConfigError, match="bad.yaml.*not valid YAML"):
        load_config(bad)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("train:\n  epochs: 3\n")
    with pytest.raises(ConfigError, match=r"unknown.yaml.*train\.epochs"):
        load_config(unknown)


def test_recipes_in_the_repository_load():
    from pathlib import Path

    recipes = sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml"))
    # the glob must find the recipes the README and docs name, or this test checks nothing
    assert {"demo.yaml", "multi30k.yaml", "multi30k_moses.yaml", "dialogsum.yaml"} <= {
        r.name for r in recipes}
    for recipe in recipes:
        load_config(recipe)


def test_schedules():
    # warmup is linear and reaches the peak at warmup_steps
    assert lr_factor(0, 10, "inverse_sqrt", 100) == pytest.approx(0.1)
    assert lr_factor(9, 10, "inverse_sqrt", 100) == pytest.approx(1.0)
    # inverse square root: a quarter of the rate at 16x the warmup
    assert lr_factor(159, 10, "inverse_sqrt", 100) == pytest.approx(0.25)
    # cosine reaches the floor at the end
    assert lr_factor(99, 10, "cosine", 100, min_ratio=0.1) == pytest.approx(0.1)
    assert lr_factor(54, 10, "cosine", 100) == pytest.approx(0.5, abs=0.02)
    assert lr_factor(500, 10, "constant", 100) == 1.0


def test_linear_schedule_and_time_horizon():
    # linear: halfway between warmup end and the horizon is half the peak; the end is the floor
    assert lr_factor(54, 10, "linear", 100) == pytest.approx(0.5, abs=0.012)
    assert lr_factor(99, 10, "linear", 100, min_ratio=0.1) == pytest.approx(0.1)
    # a time horizon replaces the step one: the step count no longer matters after warmup
    for step in (20, 500, 5000):
        assert lr_factor(step, 10, "linear", 100, progress=0.25) == pytest.approx(0.75)
        assert lr_factor(step, 10, "cosine", 100, progress=0.5) == pytest.approx(0.5)
    assert lr_factor(3, 10, "linear", 100, progress=0.0) == pytest.approx(0.4)  # warmup ramp
    assert lr_factor(50, 10, "linear", 100, progress=1.7) == 0.0  # past the budget: the floor


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["train.decay_over=time", "train.schedule=linear"], r"needs train\.max_minutes"),
        (["train.decay_over=time", "train.max_minutes=5"], r"cosine or linear, got 'inverse_sqrt'"),
        (["train.decay_over=hours"], r"train\.decay_over"),
    ],
)
def test_time_horizon_config_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)
