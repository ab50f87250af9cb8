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


# --- behaves like every Hugging Face model (issue #27) ---------------------------------------


def tiny(**overrides) -> TformerForConditionalGeneration:
    torch.manual_seed(0)
    values = dict(vocab_size=V, d_model=32, n_heads=4, n_encoder_layers=2, n_decoder_layers=2,
                  d_ff=64, dropout=0.0)
    return TformerForConditionalGeneration(TformerConfig(**{**values, **overrides}))


@pytest.mark.parametrize("tie", [True, False])
def test_resize_token_embeddings_resizes_every_table(tmp_path, batch, tie):
    model = tiny(tie_embeddings=tie, norm_first=not tie).eval()
    ids, mask = batch
    dec = torch.randint(4, V, (3, 5))
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    old = model.get_input_embeddings().weight.detach().clone()
    embeddings = model.resize_token_embeddings(V + 7)
    assert embeddings is model.get_input_embeddings() and embeddings.weight.shape == (V + 7, 32)
    assert torch.equal(embeddings.weight[:V], old)  # the old rows are kept
    assert model.config.vocab_size == model.model.config.vocab_size == V + 7
    core = model.model
    assert core.tgt_embed.token.weight.shape == (V + 7, 32)
    if tie:
        assert core.tgt_embed.token.weight is core.src_embed.token.weight and core.lm_head is None
    else:
        assert core.lm_head.weight.shape == (V + 7, 32)
        assert core.tgt_embed.token.weight is not core.src_embed.token.weight
    with torch.no_grad():
        after = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    assert after.shape == (3, 5, V + 7)
    torch.testing.assert_close(after[..., :V], before)  # new rows change nothing on old ids
    new_ids = torch.full((1, 3), V + 6)
    assert model.generate(input_ids=new_ids, max_new_tokens=3).shape[1] >= 2
    labels = torch.randint(4, V + 7, (3, 4))
    model.train()
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    assert embeddings.weight.grad.shape == (V + 7, 32)
    model.eval().save_pretrained(tmp_path)
    loaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        again = loaded(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    assert torch.equal(again, after)


def test_labels_give_plain_cross_entropy_even_for_old_smoothed_configs(tmp_path, batch):
    """``model(labels=...).loss`` is F.cross_entropy, as T5's and BART's: checkpoints written
    when the config held ``label_smoothing`` still load, and the key is dropped."""
    tiny().save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "label_smoothing": 0.1}))
    model = AutoModelForSeq2SeqLM.from_pretrained(tmp_path).train()  # train: the fused CPU loss
    assert not hasattr(model.config, "label_smoothing")
    ids, mask = batch
    labels = torch.randint(4, V, (3, 6))
    labels[1, 3:] = -100
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    logits = out.logits.detach().reshape(-1, V)
    expected = torch.nn.functional.cross_entropy(logits, labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)
    model.save_pretrained(tmp_path / "again")
    assert "label_smoothing" not in json.loads((tmp_path / "again" / "config.json").read_text())


def test_training_loss_still_smooths_as_the_recipe_says(batch):
    """Label smoothing is the loop's (``train.label_smoothing``), through the one training loss."""
    from tformer.training.validation import forward_loss

    model = tiny().train()
    ids, mask = batch
    labels = torch.randint(4, V, (3, 6))
    labels[2, 2:] = -100
    batch_dict = {"input_ids": ids, "attention_mask": mask, "labels": labels,
                  "decoder_input_ids": model.prepare_decoder_input_ids_from_labels(labels)}
    smoothed = forward_loss(model, batch_dict, 0.1)
    logits = model(input_ids=ids, attention_mask=mask, labels=labels).logits.detach()
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, V), labels.reshape(-1),
                                                 label_smoothing=0.1)
    torch.testing.assert_close(smoothed, expected)
    assert not torch.isclose(smoothed, model(input_ids=ids, attention_mask=mask,
                                             labels=labels).loss)


@pytest.mark.parametrize("norm_first", [False, True])
def test_output_hidden_states_are_embeddings_then_each_layer(batch, norm_first):
    model = tiny(norm_first=norm_first, n_encoder_layers=3).eval()
    core = model.model
    captured: dict[str, list] = {"encoder": [], "decoder": []}
    hooks = []
    for side, embed, stack in (("encoder", core.src_embed, core.encoder),
                               ("decoder", core.tgt_embed, core.decoder)):
        def keep(module, args, output, side=side):
            captured[side].append(output if isinstance(output, torch.Tensor) else output[0])

        hooks += [embed.register_forward_hook(keep)]
        hooks += [layer.register_forward_hook(keep) for layer in stack.layers]
    ids, mask = batch
    dec = torch.randint(4, V, (3, 5))
    try:
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec,
                        output_hidden_states=True)
    finally:
        for hook in hooks:
            hook.remove()
    assert [h.shape for h in out.encoder_hidden_states] == [(3, 7, 32)] * 4
    assert [h.shape for h in out.decoder_hidden_states] == [(3, 5, 32)] * 3
    for side, states, last in (
            ("encoder", out.encoder_hidden_states, out.encoder_last_hidden_state),
            ("decoder", out.decoder_hidden_states, None)):
        expected = captured[side]
        if norm_first:  # the last state is after the stack's final norm (as mBART, T5)
            stack = core.encoder if side == "encoder" else core.decoder
            expected = [*expected[:-1], stack.norm(expected[-1])]
        for got, want in zip(states, expected, strict=True):
            torch.testing.assert_close(got, want)
        if last is not None:
            assert torch.equal(states[-1], last)
    plain = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec)
    assert plain.encoder_hidden_states is None and plain.decoder_hidden_states is None
    gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, min_new_tokens=3,
                         output_hidden_states=True, return_dict_in_generate=True)
    assert len(gen.encoder_hidden_states) == 4 and len(gen.decoder_hidden_states) == 3
    assert gen.decoder_hidden_states[1][0].shape == (3, 1, 32)  # one new position per step


def saved_tensor_bytes(model, **inputs) -> tuple[int, dict[str, torch.Tensor]]:
    """Bytes of the tensors autograd keeps for the backward pass of one training step (unique
    storages, weights excepted), and the gradients."""
    storages: dict[int, int] = {}
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**inputs).loss
    loss.backward()
    return sum(storages.values()), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.filterwarnings("ignore:`.*checkpointing.*` is deprecated:FutureWarning")  # v5 names
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_gradient_checkpointing_same_gradients_less_saved_memory(dropout):
    model = tiny(d_model=64, d_ff=256, n_encoder_layers=4, n_decoder_layers=4,
                 dropout=dropout).train()
    torch.manual_seed(5)
    inputs = dict(input_ids=torch.randint(4, V, (8, 40)), labels=torch.randint(4, V, (8, 30)))
    torch.manual_seed(7)
    plain_bytes, plain = saved_tensor_bytes(model, **inputs)
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing
    assert model.model.encoder.gradient_checkpointing and model.model.decoder.gradient_checkpointing
    torch.manual_seed(7)
    checkpointed_bytes, checkpointed = saved_tensor_bytes(model, **inputs)
    for name, grad in plain.items():  # recomputation is the same arithmetic, same dropout masks
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    # Outside the checkpoints autograd keeps only the embeddings' and the loss's tensors; the
    # layers keep their input (one (B, T, D) tensor each, held by the checkpoint, not counted).
    assert checkpointed_bytes < plain_bytes / 4
    model.gradient_checkpointing_disable()
    assert not model.model.encoder.gradient_checkpointing


def test_saved_models_carry_a_generation_length(tmp_path, batch):
    """A bare ``generate()`` never stops at Hugging Face's default 20 tokens."""
    model = tiny().eval()
    assert model.generation_config.max_new_tokens == 128  # tformer's default, as the CLI's
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "generation_config.json").read_text())
    assert saved["max_new_tokens"] == 128
    loaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path).eval()
    assert loaded.generation_config.max_new_tokens == 128
    ids, mask = batch
    eos = loaded.config.eos_token_id
    out = loaded.generate(input_ids=ids, attention_mask=mask, bad_words_ids=[[eos]])
    assert out.shape[1] == 1 + 128
    # a length asked for in the call wins, whichever its name
    assert loaded.generate(input_ids=ids, max_length=6, bad_words_ids=[[eos]]).shape[1] == 6
    assert loaded.generate(input_ids=ids, max_new_tokens=4, bad_words_ids=[[eos]]).shape[1] == 5
    # checkpoints written before tformer stored a length get the default when loaded
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {k: v for k, v in saved.items() if k != "max_new_tokens"}))
    assert AutoModelForSeq2SeqLM.from_pretrained(tmp_path).generation_config.max_new_tokens == 128


def test_training_checkpoints_carry_the_recipes_length(reference_run):
    for checkpoint in sorted((reference_run / "checkpoints").glob("step-*")):
        saved = json.loads((checkpoint / "generation_config.json").read_text())
        assert saved["max_new_tokens"] == 8  # train.max_new_tokens of tiny_overrides


_WITHOUT_IMPORT = """
import json, sys
from transformers import AutoModelForSeq2SeqLM
path, answers = sys.argv[1], {}
def attempt(name, **kwargs):
    try:
        model = AutoModelForSeq2SeqLM.from_pretrained(path, **kwargs)
        answers[name] = "loaded " + model.config.model_type
    except Exception as error:
        answers[name] = f"{type(error).__name__}: {error}"
assert "tformer" not in sys.modules
attempt("bare")
sys.modules["tformer"] = None  # as where tformer is not installed
attempt("not installed", trust_remote_code=True)
del sys.modules["tformer"]
attempt("trusted", trust_remote_code=True)
print("\\n" + json.dumps(answers))  # after the prompt transformers prints without a newline
"""


def test_loading_without_import_tformer_says_what_to_do(tmp_path):
    """Transformers cannot know model_type "tformer" before ``import tformer``; the checkpoint
    names a module (``auto_map``) that imports the installed tformer, so transformers asks for
    ``trust_remote_code=True`` instead of saying to update itself, and then loads the model, or
    says to install and import tformer where it is missing."""
    import os
    import subprocess
    import sys

    from tformer.hf import SHIM_FILE

    checkpoint = tmp_path / "checkpoint"
    tiny().save_pretrained(checkpoint)
    assert (checkpoint / SHIM_FILE).is_file()
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-c", _WITHOUT_IMPORT, str(checkpoint)], env=env,
                         capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300)
    assert run.returncode == 0, run.stderr
    answers = json.loads(run.stdout.strip().splitlines()[-1])
    assert "custom code" in answers["bare"] and "trust_remote_code=True" in answers["bare"]
    assert "upgrade transformers" not in answers["bare"]
    assert answers["not installed"].startswith("ImportError")
    assert "`import tformer`" in answers["not installed"]
    assert answers["trusted"] == "loaded tformer"
