"""The own model's architecture fields: `TransformerConfig` declares them once; the Hugging Face
config (`TformerConfig`) and the recipe's model section (`ModelSection`) are derived from it, and
this test fails when the three disagree (a field missing from one, another default or type)."""

import dataclasses

import pytest

from tformer.hf import TformerConfig
from tformer.model import TransformerConfig
from tformer.training.config import ConfigError, ModelSection, load_config

#: TransformerConfig fields a recipe does not set: the tokenizer decides them.
FROM_THE_TOKENIZER = {"vocab_size", "pad_token_id"}


def test_the_hf_config_carries_every_architecture_field_with_its_default():
    core = {f.name: f.default for f in dataclasses.fields(TransformerConfig)}
    hf = TformerConfig()
    for name, default in core.items():
        assert hasattr(hf, name), f"TformerConfig lacks TransformerConfig.{name}"
        if name not in FROM_THE_TOKENIZER:
            assert getattr(hf, name) == default, f"TformerConfig.{name}: another default"
    round_trip = TformerConfig.from_transformer_config(TransformerConfig(vocab_size=100))
    assert round_trip.transformer_config() == TransformerConfig(vocab_size=100)


def test_a_recipe_can_set_every_architecture_field():
    core = {f.name for f in dataclasses.fields(TransformerConfig)} - FROM_THE_TOKENIZER
    recipe = set(ModelSection._own_fields())
    assert core == recipe, f"only in TransformerConfig: {core - recipe}; only in the recipe: " \
                           f"{recipe - core}"
    config = load_config(None, ["model.size=tiny", "model.layer_norm_eps=1e-6"])
    assert config.model.transformer_config(100, 0).layer_norm_eps == 1e-6


def test_a_recipe_value_is_checked_against_the_declared_type_and_range():
    with pytest.raises(ConfigError, match=r"model\.activation expects"):
        load_config(None, ["model.activation=tanh"])
    with pytest.raises(ConfigError, match=r"model\.layer_norm_eps must be finite"):
        load_config(None, ["model.layer_norm_eps=inf"])
    with pytest.raises(ConfigError, match=r"model\.d_model \(250\) must be divisible"):
        load_config(None, ["model.size=small", "model.d_model=250", "model.n_heads=4"])
