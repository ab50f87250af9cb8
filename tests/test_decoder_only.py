"""The decoder-only Transformer (GPT family): its blocks against references no one here wrote
(``torch.nn.RMSNorm``, ``F.scaled_dot_product_attention``'s grouped-query mode), and the
invariances they cannot see: causality, packed documents, cached decoding, left padding."""

import pytest
import torch
import torch.nn.functional as F

from tformer.model import (
    PRESETS,
    DecoderOnlyTransformer,
    KVCache,
    MultiHeadAttention,
    RMSNorm,
    Transformer,
    TransformerConfig,
    apply_rotary,
    build_transformer,
    config_for,
    rotary_cos_sin,
)
from tformer.training.config import ConfigError, load_config

V = 50


def tiny(preset: str, **overrides) -> DecoderOnlyTransformer:
    torch.manual_seed(0)
    config = config_for("tiny", V, preset, dropout=0.0, **overrides)
    return build_transformer(config).eval()


PRESET_NAMES = sorted(PRESETS)


def test_presets_build_the_decoder_only_family():
    gpt2, llama = tiny("gpt2"), tiny("llama")
    assert isinstance(gpt2, DecoderOnlyTransformer) and isinstance(llama, DecoderOnlyTransformer)
    assert isinstance(build_transformer(config_for("tiny", V)), Transformer)  # the default
    for model in (gpt2, llama):
        for layer in model.decoder.layers:
            assert layer.cross_attn is None and layer.norm2 is None
    c = llama.config
    assert (c.n_encoder_layers, c.n_kv_heads, c.norm, c.positional, c.bias) == (
        0, 2, "rmsnorm", "rope", False)
    assert not any(name.endswith("bias") for name, _ in llama.named_parameters())
    assert gpt2.lm_head is None and llama.lm_head is not None  # tied / untied
    # GPT-2's smallest shape: 124M parameters with its 50,257-token vocabulary
    n = sum(p.numel() for p in build_transformer(config_for("124m", 50257, "gpt2")).parameters())
    assert 124.0e6 < n < 124.9e6


def test_config_errors_name_the_field_and_the_choices():
    with pytest.raises(ValueError, match="unknown model preset 'gpt3'.*'gpt2', 'llama'"):
        config_for("tiny", V, "gpt3")
    with pytest.raises(ValueError, match="TransformerConfig.copy_attention must be false"):
        TransformerConfig(vocab_size=V, n_encoder_layers=0, copy_attention=True)
    with pytest.raises(ValueError, match="TransformerConfig.n_kv_heads must be"):
        TransformerConfig(vocab_size=V, d_model=32, n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match=r"TransformerConfig.activation must be one of \['relu'"):
        TransformerConfig(vocab_size=V, activation="swish")
    with pytest.raises(ConfigError, match=r"model.preset must be one of \['gpt2', 'llama'\]"):
        load_config(None, ["model.preset=gpt3"])
    config = load_config(None, ["model.size=tiny", "model.preset=llama", "model.n_kv_heads=1",
                                "data.task=lm", "data.train=text.txt"])  # a decoder-only task
    built = config.model.transformer_config(V, 0)
    assert built.n_encoder_layers == 0 and built.n_kv_heads == 1 and built.norm == "rmsnorm"


def test_rmsnorm_equals_torch():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16) * 3
    ours, ref = RMSNorm(16, eps=1e-6), torch.nn.RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        ours.weight.normal_()
        ref.weight.copy_(ours.weight)
    torch.testing.assert_close(ours(x), ref(x))


def test_grouped_query_attention_equals_torch_gqa_kernel():
    """H = 4 query heads over Hkv = 2 key/value heads, with rotary positions and a cache,
    against ``F.scaled_dot_product_attention(enable_gqa=True)`` on the same projections."""
    torch.manual_seed(0)
    d, h, hkv, t = 32, 4, 2, 6
    attn = MultiHeadAttention(d, h, bias=False, n_kv_heads=hkv).eval()
    assert attn.in_proj.weight.shape == (d + 2 * hkv * 8, d)
    x = torch.randn(2, t, d)
    cos, sin = rotary_cos_sin(torch.arange(t)[None], 8)
    q, k, v = attn.in_proj(x).split([d, hkv * 8, hkv * 8], dim=-1)
    q = apply_rotary(q.view(2, t, h, 8).transpose(1, 2), cos, sin)
    k = apply_rotary(k.view(2, t, hkv, 8).transpose(1, 2), cos, sin)
    v = v.view(2, t, hkv, 8).transpose(1, 2)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    ref = attn.out_proj(ref.transpose(1, 2).reshape(2, t, d))
    torch.testing.assert_close(attn(x, is_causal=True, rotary=(cos, sin)).output, ref)
    cache = KVCache()  # the cache keeps Hkv heads, rotated
    first = attn(x[:, :4], is_causal=True, cache=cache, rotary=(cos[:, :, :4], sin[:, :, :4]))
    rest = attn(x[:, 4:], is_causal=True, cache=cache, rotary=(cos[:, :, 4:], sin[:, :, 4:]))
    assert cache.self_kv[0][0].shape == (2, hkv, t, 8)
    torch.testing.assert_close(torch.cat([first.output, rest.output], dim=1), ref)


def test_rotary_scores_depend_only_on_the_offset():
    """⟨RoPE(q, m), RoPE(k, n)⟩ is the same for every (m, n) with the same n − m."""
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(m: int, n: int) -> torch.Tensor:
        cq, sq = rotary_cos_sin(torch.tensor([[m]]), 16)
        ck, sk = rotary_cos_sin(torch.tensor([[n]]), 16)
        return (apply_rotary(q, cq, sq) * apply_rotary(k, ck, sk)).sum()

    torch.testing.assert_close(score(3, 7), score(10, 14))
    torch.testing.assert_close(score(0, 0), (q * k).sum())
    assert not torch.isclose(score(3, 7), score(3, 8))


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_future_tokens_do_not_change_earlier_logits(preset):
    model = tiny(preset)
    torch.manual_seed(1)
    ids = torch.randint(0, V, (2, 9))
    changed = ids.clone()
    changed[:, 5:] = torch.randint(0, V, (2, 4))
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :5], b[:, :5])
    assert not torch.allclose(a[:, 5:], b[:, 5:])


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_packed_documents_are_isolated(preset):
    """A row of two packed documents gives each the logits it has alone (positions restart per
    document, by default and given explicitly)."""
    model = tiny(preset)
    torch.manual_seed(2)
    first, second = torch.randint(0, V, (1, 5)), torch.randint(0, V, (1, 4))
    packed = torch.cat([first, second], dim=1)
    documents = torch.tensor([[0] * 5 + [1] * 4])
    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3]])
    with torch.no_grad():
        alone = torch.cat([model(first).logits, model(second).logits], dim=1)
        given = model(packed, document_ids=documents, position_ids=positions).logits
        default = model(packed, document_ids=documents).logits
        unisolated = model(packed, position_ids=positions).logits
    torch.testing.assert_close(given, alone)
    torch.testing.assert_close(default, alone)
    assert not torch.allclose(unisolated[:, 5:], alone[:, 5:])


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_left_padded_batch_equals_rows_alone_and_cached_equals_full(preset):
    model = tiny(preset)
    torch.manual_seed(3)
    lengths, width = [7, 4, 2], 7
    rows = [torch.randint(1, V, (1, n)) for n in lengths]
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - row.size(1):], mask[i, width - row.size(1):] = row, 1
    with torch.no_grad():
        batched = model(ids, attention_mask=mask).logits
        assert not batched.isnan().any()
        for i, row in enumerate(rows):
            torch.testing.assert_close(batched[i, width - row.size(1):], model(row).logits[0])
        # the same batch decoded 4 + 1 + 1 + 1 positions at a time through a cache
        cache, steps = KVCache(), []
        for start, stop in ((0, 4), (4, 5), (5, 6), (6, 7)):
            steps.append(model(ids[:, start:stop], attention_mask=mask[:, :stop],
                               cache=cache).logits)
    real = mask.bool()
    torch.testing.assert_close(torch.cat(steps, dim=1)[real], batched[real])


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_outputs_and_every_parameter_learns(preset):
    model = tiny(preset).train()
    torch.manual_seed(4)
    ids = torch.randint(0, V, (2, 6))
    out = model(ids, need_weights=True, need_hidden=True)
    assert out.logits.shape == (2, 6, V) and len(out.hidden_states) == 3
    assert [w.shape for w in out.attentions] == [(2, 4, 6, 6)] * 2
    assert (out.attentions[0].triu(diagonal=1) == 0).all()
    torch.testing.assert_close(out.hidden_states[-1], out.hidden)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        logits = model(ids).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        if not losses:
            assert all(p.grad is not None and p.grad.abs().sum() > 0
                       for p in model.parameters()), "a parameter gets no gradient"
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 3


def test_learned_positions_compile_as_one_graph():
    """The gpt2 preset's forward traces as one graph: its learned-position range check reads
    the positions back only when not compiling (a read-back breaks the graph, and the compiled
    training step then runs part of the model eagerly)."""
    import torch._dynamo as dynamo

    model = tiny("gpt2")
    ids = torch.randint(0, V, (2, 8))
    explained = dynamo.explain(lambda x: model(x).logits)(ids)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    with pytest.raises(ValueError, match="max_positions"):  # eager: still a clear error
        model(torch.randint(0, V, (1, model.config.max_positions + 1)))
