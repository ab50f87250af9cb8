"""Copy attention (`tformer.model.copy`): a distribution, its gate, padding, generation with and
without the cache, save/load, training from a recipe and serving it (continuous batching), and
the CTranslate2 export, which refuses it."""

import pytest
import torch

import tformer
from tformer.hf import TformerConfig, TformerForConditionalGeneration
from tformer.model import build_transformer, compute_loss, config_for

from .conftest import padded_batch, tiny_overrides

V = 60


@pytest.fixture(scope="module")
def model() -> TformerForConditionalGeneration:
    torch.manual_seed(0)
    config = TformerConfig(vocab_size=V, d_model=32, n_heads=4, n_encoder_layers=2,
                           n_decoder_layers=2, d_ff=64, dropout=0.0, copy_attention=True)
    return TformerForConditionalGeneration(config).eval()


@pytest.fixture
def batch():
    return padded_batch(V, [9, 6, 3])


def copy_reference(attention: torch.Tensor, source_ids: torch.Tensor) -> torch.Tensor:
    """Σ_{i: x_i = w} a_i, summed in a Python loop (not scatter_add): (B, T, S) -> (B, T, V)."""
    b, t, s = attention.shape
    out = torch.zeros(b, t, V)
    for i in range(b):
        for j in range(s):
            out[i, :, source_ids[i, j]] += attention[i, :, j]
    return out


def reference_attention(inner, hidden, memory, mask):
    """softmax(q kᵀ/√D) over the source, with its padding masked, from the layer's own
    projections (d_model 32): the copy attention written out, (B, T, S)."""
    scores = inner.copy.query(hidden) @ inner.copy.key(memory).transpose(1, 2) / 32**0.5
    return scores.masked_fill(~mask.bool()[:, None, :], float("-inf")).softmax(-1)


def decoder_states(inner, ids, mask, dec):
    """The encoder output (B, S, D) and the decoder output (B, T, D), without a cache."""
    memory = inner.encode(ids, mask.bool()).hidden
    return memory, inner.decode(dec, memory, mask.bool()).hidden


@torch.no_grad()
def test_output_is_a_distribution_that_the_gate_splits(model, batch):
    ids, mask = batch
    dec = torch.randint(4, V, (3, 5))
    log_p = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    torch.testing.assert_close(log_p.exp().sum(-1), torch.ones(3, 5), atol=1e-5, rtol=0)

    inner = model.model
    memory, hidden = decoder_states(inner, ids, mask, dec)
    gate = inner.copy.gate
    saved = gate.bias.clone()
    try:
        gate.bias.fill_(40.0)  # p_gen = 1: the plain Transformer's softmax
        torch.testing.assert_close(
            model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits,
            inner.project(hidden).log_softmax(-1), atol=1e-5, rtol=0)
        gate.bias.fill_(-40.0)  # p_gen = 0: all mass on the source's tokens, by attention
        got = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits.exp()
        attention = reference_attention(inner, hidden, memory, mask)
        torch.testing.assert_close(got, copy_reference(attention, ids), atol=1e-5, rtol=0)
        assert got[1, :, ids[1, :6].unique()].sum(-1).allclose(torch.ones(5), atol=1e-5)
    finally:
        gate.bias.copy_(saved)


def test_mixture_with_repeated_source_words_equals_the_formula_with_its_gradient(model, batch):
    """p_gen·softmax(logits) + (1 − p_gen)·Σ_{i: x_i = w} a_i, written out densely over the
    vocabulary (See et al. 2017, eq. 9), against the layer, which adds the copy mass at the
    source words only: same output and same gradients, with a word repeated three times."""
    ids, mask = batch
    ids = ids.clone()
    ids[0, 3] = ids[0, 5] = ids[0, 0]  # one word three times in the first source
    dec = torch.randint(4, V, (3, 5))
    inner = model.model
    memory, hidden = decoder_states(inner, ids, mask, dec)
    logits = inner.project(hidden)
    got = inner.copy(hidden, logits, memory, ids, mask.bool())

    attention = reference_attention(inner, hidden, memory, mask)
    p_gen = torch.sigmoid(inner.copy.gate(torch.cat([hidden, attention @ memory], -1)))
    assert 0.01 < p_gen.min() and p_gen.max() < 0.99  # a real mixture, neither side forced
    want = (p_gen * logits.softmax(-1) + (1 - p_gen) * copy_reference(attention, ids)).log()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

    target = ids[:, :5]  # source words, the repeated one among them
    loss = lambda log_p: compute_loss(log_p, target)  # noqa: E731  (label-smoothed)
    params = [p for p in inner.parameters() if p.requires_grad]
    g_got = torch.autograd.grad(loss(got), params, allow_unused=True, retain_graph=True)
    g_want = torch.autograd.grad(loss(want), params, allow_unused=True)
    for name, a, b in zip([n for n, p in inner.named_parameters() if p.requires_grad],
                          g_got, g_want):
        if a is None or b is None:
            assert a is None and b is None, name
            continue
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mixed_precision_gives_finite_gradients_close_to_float32(model, batch, dtype):
    """Under autocast (fp16: the precision `train.precision=auto` picks on GPUs without bf16)
    the layer still returns float32 log P close to the float32 one, and every gradient is
    finite: the copy mass and its floor stay in float32. (CPU autocast, as on a GPU.)"""
    ids, mask = batch
    dec = torch.randint(4, V, (3, 5))
    inner = model.model
    results = []
    for enabled in (False, True):
        model.zero_grad()
        with torch.autocast("cpu", dtype=dtype, enabled=enabled):
            log_p = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        compute_loss(log_p, dec).backward()
        grads = {n: p.grad.clone() for n, p in inner.named_parameters() if p.grad is not None}
        results.append((log_p.detach(), grads))
    model.zero_grad()
    (full, _), (half, grads) = results
    assert half.dtype == torch.float32
    torch.testing.assert_close(half.exp(), full.exp(), atol=2e-2, rtol=0)
    bad = [name for name, g in grads.items() if not torch.isfinite(g).all()]
    assert not bad and grads["copy.query.weight"].abs().sum() > 0


def test_a_minus_infinity_logit_at_a_source_word_is_still_copied(model, batch):
    """A word the vocabulary side rules out (logit -inf) that occurs in the source keeps its
    copy probability, (1 − p_gen)·mass: finite, never NaN."""
    ids, mask = batch
    inner = model.model
    memory, hidden = decoder_states(inner, ids, mask, torch.randint(4, V, (3, 2)))
    logits = inner.project(hidden).detach()
    logits[..., ids[0, 0]] = float("-inf")
    log_p = inner.copy(hidden, logits, memory, ids, mask.bool())
    assert not log_p.isnan().any()
    assert torch.isfinite(log_p[0, :, ids[0, 0]]).all()
    torch.testing.assert_close(log_p.exp().sum(-1), torch.ones(3, 2), atol=1e-5, rtol=0)


@torch.no_grad()
def test_padding_does_not_change_the_output(model, batch):
    ids, mask = batch
    dec = torch.randint(4, V, (1, 4))
    alone = model(input_ids=ids[2:, :3], attention_mask=mask[2:, :3], decoder_input_ids=dec).logits
    padded = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec.expand(3, -1)).logits
    torch.testing.assert_close(padded[2:], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("options", [dict(do_sample=False), dict(num_beams=3)],
                         ids=["greedy", "beam"])
def test_generate_with_cache_equals_without_and_batched_equals_alone(model, batch, options):
    ids, mask = batch
    cached = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, **options)
    uncached = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10,
                              use_cache=False, **options)
    assert torch.equal(cached, uncached)
    alone = model.generate(input_ids=ids[2:, :3], attention_mask=mask[2:, :3], max_new_tokens=10,
                           **options)
    assert torch.equal(cached[2, : alone.size(1)], alone[0])


def test_sampling_draws_the_same_with_and_without_the_cache(model, batch):
    ids, mask = batch
    options = dict(max_new_tokens=8, do_sample=True, top_k=5, num_return_sequences=2)
    torch.manual_seed(3)
    cached = model.generate(input_ids=ids, attention_mask=mask, **options)
    torch.manual_seed(3)
    uncached = model.generate(input_ids=ids, attention_mask=mask, use_cache=False, **options)
    assert cached.shape[0] == 6 and torch.equal(cached, uncached)


@torch.no_grad()
def test_greedy_generate_equals_argmax_of_the_full_forward(model, batch):
    ids, mask = batch
    got = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                         eos_token_id=None)  # never stop early: every row runs 6 steps
    prefix = torch.full((3, 1), model.config.decoder_start_token_id)
    for _ in range(6):
        log_p = model(input_ids=ids, attention_mask=mask, decoder_input_ids=prefix,
                      use_cache=False).logits
        prefix = torch.cat([prefix, log_p[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(got, prefix)


def test_save_and_load_keep_copy_attention(model, batch, tmp_path):
    model.save_pretrained(tmp_path)
    loaded = TformerForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert loaded.config.copy_attention and loaded.model.copy is not None
    ids, mask = batch
    dec = torch.randint(4, V, (3, 4))
    with torch.no_grad():
        assert torch.equal(
            model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits,
            loaded(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits)


def _copy_task_loss(copy: bool, steps: int = 30, vocab: int = 200) -> float:
    """Training loss after ``steps`` Adam steps of a tiny model whose target is its source."""
    torch.manual_seed(0)
    model = build_transformer(config_for("tiny", vocab, copy_attention=copy, dropout=0.0))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    data = torch.Generator().manual_seed(1)
    for _ in range(steps):
        source = torch.randint(4, vocab, (32, 8), generator=data)
        target = torch.cat([source, torch.full((32, 1), 3)], 1)  # + EOS
        inputs = torch.cat([torch.full((32, 1), 2), target[:, :-1]], 1)  # BOS + shifted
        loss = compute_loss(model(source, inputs, torch.ones_like(source, dtype=torch.bool))
                            .logits, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return loss.item()


def test_copy_attention_learns_to_copy_much_faster():
    # Measured: 4.77 (plain) against 2.05 (copy) after 30 steps; ln(200) = 5.30 at the start.
    plain, copy = _copy_task_loss(False), _copy_task_loss(True)
    assert copy < 0.6 * plain, (plain, copy)


def test_config_checks_and_every_parameter_learns():
    with pytest.raises(ValueError, match="copy_attention must be true or false"):
        config_for("tiny", 50, copy_attention="yes")
    assert build_transformer(config_for("tiny", 50)).copy is None
    torch.manual_seed(0)
    untied = build_transformer(config_for("tiny", 50, copy_attention=True, tie_embeddings=False))
    source, target = torch.randint(4, 50, (2, 6)), torch.randint(4, 50, (2, 5))
    log_p = untied(source, target, torch.ones_like(source, dtype=torch.bool)).logits
    torch.testing.assert_close(log_p.exp().sum(-1), torch.ones(2, 5), atol=1e-5, rtol=0)
    compute_loss(log_p, target).backward()
    dead = [name for name, p in untied.named_parameters() if p.grad is None or not p.grad.any()]
    assert not dead


def test_trained_from_a_recipe_loaded_served_and_refused_by_the_ct2_export(data_files, tmp_path):
    from fastapi.testclient import TestClient

    from tformer.serving import ServeSettings, create_app
    from tformer.training import load_config, train

    out = tmp_path / "run"
    result = train(load_config(None, tiny_overrides(data_files, out,
                                                    **{"model.copy_attention": "true"})))
    assert result.state.step == 12
    loaded = tformer.load(result.last_checkpoint)
    assert loaded.model.model.copy is not None
    texts = ["A man rides a bike.", "Two dogs play in the snow near a tree."]
    together = loaded.generate(texts, max_new_tokens=8)
    assert together == [loaded.generate(t, max_new_tokens=8) for t in texts]
    # After 12 steps the outputs may be empty: this checks the server takes the recipe's model;
    # non-empty continuous outputs are compared in tests/test_serving_continuous.py's [copy] cases.
    app = create_app(loaded, settings=ServeSettings())
    assert app.state.settings.batching == "continuous"  # auto: the per-step batcher takes it
    with TestClient(app) as client:
        served = client.post("/v1/generate", json={"inputs": texts, "max_new_tokens": 8})
    assert served.status_code == 200, served.text
    assert served.json()["outputs"] == together

    pytest.importorskip("ctranslate2")
    from tformer.ct2.own_spec import NotExportableError, check_exportable

    with pytest.raises(NotExportableError, match="copy_attention"):
        check_exportable(loaded.model.model.config)
