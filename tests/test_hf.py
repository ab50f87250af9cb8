"""The Hugging Face adapter: Auto registration, save/load, generate() and its cache, outputs."""

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForSeq2SeqLM

import tformer  # noqa: F401  (registers model_type "tformer")
from tformer.hf import TformerConfig, TformerForConditionalGeneration

from .conftest import padded_batch

V = 50


@pytest.fixture(scope="module")
def model() -> TformerForConditionalGeneration:
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "tformer", vocab_size=V, d_model=32, n_heads=4, n_encoder_layers=2, n_decoder_layers=2,
        d_ff=64, dropout=0.0,
    )
    return AutoModelForSeq2SeqLM.from_config(config).eval()


@pytest.fixture
def batch():
    return padded_batch(V, [7, 5, 2])


def test_config_registered_and_validated():
    config = AutoConfig.for_model("tformer", vocab_size=10, d_model=16, n_heads=2)
    assert isinstance(config, TformerConfig) and config.hidden_size == 16
    assert config.num_hidden_layers == config.n_decoder_layers
    assert config.num_attention_heads == 2
    with pytest.raises(ValueError, match="n_heads"):
        AutoConfig.for_model("tformer", vocab_size=10, d_model=30, n_heads=4)


@pytest.mark.parametrize("overrides", [{}, {"tie_embeddings": False, "norm_first": True}])
def test_save_and_auto_load_give_identical_logits(tmp_path, batch, overrides):
    torch.manual_seed(0)
    config = TformerConfig(vocab_size=V, d_model=32, n_heads=4, n_encoder_layers=1,
                           n_decoder_layers=1, d_ff=64, **overrides)
    original = TformerForConditionalGeneration(config).eval()
    original.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert not list(tmp_path.glob("*.bin")) and not list(tmp_path.glob("*.pt"))
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "tformer"
    loaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is TformerForConditionalGeneration
    ids, mask = batch
    dec = torch.randint(4, V, (3, 5))
    expected = original(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    got = loaded(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    assert torch.equal(expected, got)
    if config.tie_embeddings:
        assert loaded.model.tgt_embed.token.weight is loaded.model.src_embed.token.weight


GENERATION_MODES = {
    "greedy": dict(do_sample=False),
    "beam": dict(num_beams=4, length_penalty=0.6, no_repeat_ngram_size=2),
}


@pytest.mark.parametrize("mode", sorted(GENERATION_MODES))
def test_generate_with_cache_equals_without(model, batch, mode):
    ids, mask = batch
    options = dict(max_new_tokens=12, **GENERATION_MODES[mode])
    cached = model.generate(input_ids=ids, attention_mask=mask, use_cache=True, **options)
    uncached = model.generate(input_ids=ids, attention_mask=mask, use_cache=False, **options)
    assert torch.equal(cached, uncached)
    assert cached.shape[1] > 2


def test_generate_with_cache_feeds_one_new_token_per_step(model, batch):
    ids, mask = batch
    seen = []
    hook = model.model.tgt_embed.register_forward_hook(lambda m, a, o: seen.append(a[0].shape[1]))
    try:
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6)
    finally:
        hook.remove()
    assert seen == [1] * 6  # the prefix is read from the cache, never recomputed


def test_beam_search_matches_exhaustive_search_on_two_steps(model, batch):
    """With 2 steps and num_beams = V, beam search is exhaustive: it must find the argmax pair."""
    ids, mask = batch[0][:1], batch[1][:1]
    out = model.generate(input_ids=ids, attention_mask=mask, num_beams=V, max_new_tokens=2,
                         min_new_tokens=2, length_penalty=0.0, num_return_sequences=1)
    start = torch.tensor([[model.config.decoder_start_token_id]])
    with torch.no_grad():
        first = model(input_ids=ids, attention_mask=mask, decoder_input_ids=start).logits
        logp1 = first[0, -1].log_softmax(-1)  # (V,)
        dec = torch.cat([start.repeat(V, 1), torch.arange(V)[:, None]], dim=1)
        second = model(input_ids=ids.repeat(V, 1), attention_mask=mask.repeat(V, 1),
                       decoder_input_ids=dec).logits[:, -1].log_softmax(-1)  # (V, V)
    # eos ends a hypothesis at step 1, and min_new_tokens forbids it; mirror that.
    logp1[model.config.eos_token_id] = float("-inf")
    second[:, model.config.eos_token_id] = float("-inf")
    total = logp1[:, None] + second
    best = divmod(int(total.argmax()), V)
    assert out[0, 1:3].tolist() == list(best)


def test_sampling_is_seeded_and_respects_top_k(model, batch):
    ids, mask = batch
    options = dict(do_sample=True, temperature=0.8, top_k=1, max_new_tokens=8)
    greedy = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8)
    assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, **options), greedy)
    options = dict(do_sample=True, temperature=1.5, top_p=0.95, max_new_tokens=8)
    torch.manual_seed(3)
    a = model.generate(input_ids=ids, attention_mask=mask, **options)
    torch.manual_seed(3)
    b = model.generate(input_ids=ids, attention_mask=mask, **options)
    assert torch.equal(a, b)


def test_forward_with_labels_shifts_once_and_ignores_padding(model, batch):
    ids, mask = batch
    labels = torch.randint(4, V, (3, 6))
    labels[0, 4:] = -100
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    dec = model.prepare_decoder_input_ids_from_labels(labels)
    assert dec[0, 0] == model.config.decoder_start_token_id
    assert torch.equal(dec[:, 1:], labels[:, :-1].masked_fill(labels[:, :-1] == -100, 0))
    logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    keep = labels != -100
    expected = torch.nn.functional.cross_entropy(logits[keep], labels[keep])
    torch.testing.assert_close(out.loss, expected)


def test_output_attentions_in_hugging_face_layout(model, batch):
    ids, mask = batch
    dec = torch.randint(4, V, (3, 5))
    out = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, output_attentions=True)
    assert [a.shape for a in out.encoder_attentions] == [(3, 4, 7, 7)] * 2
    assert [a.shape for a in out.decoder_attentions] == [(3, 4, 5, 5)] * 2
    assert [a.shape for a in out.cross_attentions] == [(3, 4, 5, 7)] * 2
    assert (out.cross_attentions[0][2, :, :, 2:] == 0).all()
    gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, min_new_tokens=4,
                         output_attentions=True, return_dict_in_generate=True)
    assert len(gen.cross_attentions) == 4 and gen.cross_attentions[0][0].shape == (3, 4, 1, 7)
