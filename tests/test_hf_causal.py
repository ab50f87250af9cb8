"""The decoder-only model behind Hugging Face's causal-LM interface (``TformerForCausalLM``):
Auto registration, generate() and its cache, left padding, streaming, stop strings, save/load,
and the behaviours every Hugging Face model has."""

import json
import threading

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, TextIteratorStreamer

import tformer  # noqa: F401  (registers model_type "tformer")
from tformer.hf import AUTO_MAP, TformerConfig, TformerForCausalLM
from tformer.model import config_for
from tformer.tokenization import train_tokenizer

V = 60


def causal_lm(preset: str = "llama", vocab_size: int = V, **overrides) -> TformerForCausalLM:
    torch.manual_seed(0)
    core = config_for("tiny", vocab_size, preset, **{"dropout": 0.0, **overrides})
    return TformerForCausalLM(TformerConfig.from_transformer_config(core)).eval()


def left_padded(lengths: list[int], vocab: int = V, seed: int = 1):
    """Seeded random rows (ids 4..vocab-1) padded on the left with 0: (ids, attention_mask)."""
    torch.manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, width - n:] = torch.randint(4, vocab, (n,))
        mask[row, width - n:] = 1
    return ids, mask


@pytest.fixture(scope="module")
def tokenizer():
    texts = ["the cat sat on the mat", "a dog ran in the park", "tformer reads the paper"] * 20
    return train_tokenizer(texts, vocab_size=400, kind="bpe")


def printable_only(tokenizer) -> list[list[int]]:
    """``bad_words_ids`` that keep an untrained model to tokens of printable text: no end of
    text, no lone bytes (which decode to U+FFFD)."""
    return [[i] for i in range(len(tokenizer))
            if i == tokenizer.eos_token_id or not tokenizer.decode([i]).strip()
            or "\ufffd" in tokenizer.decode([i])]


def test_registered_for_causal_lm_with_the_one_config():
    config = TformerConfig.from_transformer_config(config_for("tiny", V, "gpt2"))
    assert not config.is_encoder_decoder and TformerConfig(vocab_size=V).is_encoder_decoder
    model = AutoModelForCausalLM.from_config(config)
    assert type(model) is TformerForCausalLM
    assert AUTO_MAP["AutoModelForCausalLM"] == "modeling_tformer.TformerForCausalLM"
    with pytest.raises(ValueError, match="n_encoder_layers=0; use TformerForCausalLM"):
        AutoModelForSeq2SeqLM.from_config(config)
    with pytest.raises(ValueError, match="n_encoder_layers=6; use TformerForConditionalGeneration"):
        TformerForCausalLM(TformerConfig(vocab_size=V))


@pytest.mark.parametrize("preset", ["gpt2", "llama"])
def test_save_and_auto_load_are_exact_and_carry_a_length(tmp_path, preset):
    original = causal_lm(preset)
    original.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "tformer" and saved["n_encoder_layers"] == 0
    assert saved["auto_map"]["AutoModelForCausalLM"] == "modeling_tformer.TformerForCausalLM"
    assert json.loads((tmp_path / "generation_config.json").read_text())["max_new_tokens"] == 128
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is TformerForCausalLM
    ids, mask = left_padded([6, 3])
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, attention_mask=mask).logits,
                           original(input_ids=ids, attention_mask=mask).logits)
    for (name, a), (_, b) in zip(original.state_dict().items(), loaded.state_dict().items(),
                                 strict=True):
        assert torch.equal(a, b), name
    eos = loaded.config.eos_token_id
    assert loaded.generate(input_ids=ids, attention_mask=mask,
                           bad_words_ids=[[eos]]).shape[1] == 6 + 128


GENERATION_MODES = {
    "greedy": dict(do_sample=False),
    "beam": dict(num_beams=3, length_penalty=0.6, no_repeat_ngram_size=2),
    "sample": dict(do_sample=True, temperature=0.7, top_k=20, top_p=0.9),
    "penalty": dict(do_sample=False, repetition_penalty=1.3),
}


@pytest.mark.parametrize("preset", ["gpt2", "llama"])
@pytest.mark.parametrize("mode", sorted(GENERATION_MODES))
def test_generate_with_cache_equals_without_under_left_padding(preset, mode):
    model = causal_lm(preset)
    ids, mask = left_padded([7, 4, 2])
    options = dict(max_new_tokens=8, min_new_tokens=8, **GENERATION_MODES[mode])
    torch.manual_seed(5)
    cached = model.generate(input_ids=ids, attention_mask=mask, use_cache=True, **options)
    torch.manual_seed(5)
    uncached = model.generate(input_ids=ids, attention_mask=mask, use_cache=False, **options)
    assert torch.equal(cached, uncached)
    assert cached.shape == (3, 7 + 8)


@pytest.mark.parametrize("preset", ["gpt2", "llama"])
def test_batched_left_padded_generate_equals_one_at_a_time(preset):
    model = causal_lm(preset)
    lengths = [7, 4, 2]
    ids, mask = left_padded(lengths)
    options = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    batched = model.generate(input_ids=ids, attention_mask=mask, **options)
    for row, n in enumerate(lengths):
        alone = model.generate(input_ids=ids[row:row + 1, -n:], **options)
        assert torch.equal(batched[row, -(n + 6):], alone[0])


def test_cached_generate_feeds_one_new_token_per_step():
    model = causal_lm()
    ids, mask = left_padded([5, 3])
    seen = []
    hook = model.model.embed.register_forward_hook(lambda m, a, o: seen.append(a[0].shape[1]))
    try:
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, min_new_tokens=4)
    finally:
        hook.remove()
    assert seen == [5, 1, 1, 1]  # the prompt once, then one new token per step


def test_generate_projects_only_the_last_position():
    """generate() passes logits_to_keep=1, as to Hugging Face's own models: the prompt's other
    positions are never projected onto the vocabulary, and the kept logits are the full ones'
    (to rounding: a matmul of another shape)."""
    model = causal_lm()
    ids, mask = left_padded([5, 3])
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits
        last = model(input_ids=ids, attention_mask=mask, logits_to_keep=1).logits
    assert last.shape == (2, 1, V)
    torch.testing.assert_close(last, full[:, -1:], rtol=0, atol=1e-6)
    rows = []
    hook = model.model.register_forward_hook(lambda m, a, o: rows.append(o.logits.shape[1]))
    try:
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, min_new_tokens=3)
    finally:
        hook.remove()
    assert rows == [1, 1, 1]
    with pytest.raises(ValueError, match="logits_to_keep=0"):
        model(input_ids=ids, labels=ids, logits_to_keep=1)


def test_labels_are_shifted_once_and_give_plain_cross_entropy():
    model = causal_lm().train()
    ids, mask = left_padded([6, 4])
    labels = ids.masked_fill(mask == 0, -100)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    logits = out.logits.detach()
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, expected)


def test_document_ids_through_the_adapter():
    model = causal_lm()
    torch.manual_seed(2)
    a, b = torch.randint(4, V, (1, 4)), torch.randint(4, V, (1, 3))
    packed = model(input_ids=torch.cat([a, b], dim=1),
                   document_ids=torch.tensor([[0, 0, 0, 0, 1, 1, 1]])).logits
    alone = torch.cat([model(input_ids=a).logits, model(input_ids=b).logits], dim=1)
    torch.testing.assert_close(packed, alone)


def test_text_iterator_streamer_yields_the_generated_text(tokenizer):
    model = causal_lm(vocab_size=len(tokenizer))
    prompt = tokenizer("the cat", add_special_tokens=False, return_tensors="pt")
    bad = printable_only(tokenizer)
    expected = model.generate(**prompt, max_new_tokens=10, bad_words_ids=bad)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    thread = threading.Thread(target=model.generate, kwargs=dict(
        **prompt, max_new_tokens=10, bad_words_ids=bad, streamer=streamer))
    thread.start()
    pieces = list(streamer)
    thread.join()
    text = tokenizer.decode(expected[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert len(pieces) >= 2 and "".join(pieces).strip() == text.strip() and text.strip()


def test_stop_strings_end_generation(tokenizer):
    model = causal_lm(vocab_size=len(tokenizer))
    prompt = tokenizer("a dog", add_special_tokens=False, return_tensors="pt")
    start = prompt["input_ids"].shape[1]
    bad = printable_only(tokenizer)
    full = model.generate(**prompt, max_new_tokens=12, min_new_tokens=12, bad_words_ids=bad)
    new = full[0, start:].tolist()
    # stop at the text of the 4th to 5th new tokens: generation must end right there
    stop = tokenizer.decode(new[3:5])
    assert stop.strip()
    stopped = model.generate(**prompt, max_new_tokens=12, bad_words_ids=bad,
                             stop_strings=[stop], tokenizer=tokenizer)
    text = tokenizer.decode(stopped[0, start:])
    assert text.endswith(stop) and stopped.shape[1] <= start + 5
    assert torch.equal(stopped[0], full[0, :stopped.shape[1]])


@pytest.mark.parametrize("preset", ["gpt2", "llama"])  # tied, untied
def test_resize_token_embeddings(tmp_path, preset):
    model = causal_lm(preset)
    ids, mask = left_padded([5, 3])
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
    old = model.get_input_embeddings().weight.detach().clone()
    embeddings = model.resize_token_embeddings(V + 5)
    assert embeddings is model.get_input_embeddings() and embeddings.weight.shape == (V + 5, 32)
    assert torch.equal(embeddings.weight[:V], old)
    assert model.config.vocab_size == model.model.config.vocab_size == V + 5
    if preset == "gpt2":
        assert model.model.lm_head is None
    else:
        assert model.model.lm_head.weight.shape == (V + 5, 32)
    with torch.no_grad():
        after = model(input_ids=ids, attention_mask=mask).logits
    assert after.shape == (2, 5, V + 5)
    torch.testing.assert_close(after[..., :V], before)
    assert model.generate(input_ids=torch.full((1, 2), V + 4), max_new_tokens=2).shape == (1, 4)
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()(
            input_ids=ids, attention_mask=mask).logits
    assert torch.equal(again, after)


@pytest.mark.parametrize("preset", ["gpt2", "llama"])
def test_hidden_states_and_attentions(preset):
    model = causal_lm(preset, n_decoder_layers=3)
    core = model.model
    captured = []
    hooks = [core.embed.register_forward_hook(lambda m, a, o: captured.append(o))]
    hooks += [layer.register_forward_hook(lambda m, a, o: captured.append(o[0]))
              for layer in core.decoder.layers]
    ids, mask = left_padded([6, 4])
    try:
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True,
                        output_attentions=True)
    finally:
        for hook in hooks:
            hook.remove()
    expected = [*captured[:-1], core.decoder.norm(captured[-1])]  # the last after the final norm
    assert len(out.hidden_states) == 4
    for got, want in zip(out.hidden_states, expected, strict=True):
        torch.testing.assert_close(got, want)
    assert [a.shape for a in out.attentions] == [(2, 4, 6, 6)] * 3
    assert (out.attentions[0][1, :, 2:, :2] == 0).all()  # real queries never see left padding
    plain = model(input_ids=ids, attention_mask=mask)
    assert plain.hidden_states is None and plain.attentions is None
    gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, min_new_tokens=3,
                         output_hidden_states=True, output_attentions=True,
                         return_dict_in_generate=True)
    assert len(gen.hidden_states) == 3 and gen.hidden_states[1][0].shape == (2, 1, 32)
    assert gen.attentions[2][0].shape == (2, 4, 1, 8)


@pytest.mark.filterwarnings("ignore:`.*checkpointing.*` is deprecated:FutureWarning")  # v5 names
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_gradient_checkpointing_same_gradients(dropout):
    model = causal_lm("llama", n_decoder_layers=3, dropout=dropout).train()
    ids, mask = left_padded([12, 9, 12], seed=6)
    inputs = dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))

    def gradients():
        model.zero_grad(set_to_none=True)
        torch.manual_seed(7)
        model(**inputs).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = gradients()
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing and model.model.decoder.gradient_checkpointing
    checkpointed = gradients()
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    model.gradient_checkpointing_disable()
    assert not model.model.decoder.gradient_checkpointing
