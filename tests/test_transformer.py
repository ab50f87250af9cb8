"""Invariances of the whole model, incremental decoding, config validation and learning."""

import copy

import pytest
import torch

from tformer.model import (
    KVCache,
    TransformerConfig,
    build_transformer,
    compute_loss,
    config_for,
)

V, PAD = 40, 0


def tiny(**overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_transformer(config_for("tiny", V, dropout=0.0, **overrides)).eval()


VARIANTS = [
    {},
    {"norm_first": True},
    {"positional": "learned"},
    {"gated_ffn": True, "activation": "gelu"},
    {"tie_embeddings": False, "scale_embeddings": False},
    # the decoder-only family's blocks in the encoder-decoder (docs/model.md section 17)
    {"positional": "rope", "norm": "rmsnorm", "norm_first": True, "n_kv_heads": 2,
     "bias": False, "gated_ffn": True, "activation": "silu"},
]


@pytest.mark.parametrize("overrides", VARIANTS)
def test_future_target_tokens_do_not_change_earlier_outputs(overrides):
    m = tiny(**overrides)
    src = torch.randint(4, V, (2, 6))
    tgt = torch.randint(4, V, (2, 8))
    changed = tgt.clone()
    changed[:, 5:] = torch.randint(4, V, (2, 3))
    a, b = m(src, tgt).logits, m(src, changed).logits
    torch.testing.assert_close(a[:, :5], b[:, :5], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(a[:, 5:], b[:, 5:])  # the test can see a change where there is one


@pytest.mark.parametrize("overrides", VARIANTS)
def test_source_padding_does_not_change_outputs(overrides):
    m = tiny(**overrides)
    src = torch.randint(4, V, (1, 6))
    tgt = torch.randint(4, V, (1, 5))
    padded = torch.cat([src, torch.full((1, 4), PAD)], dim=1)
    keep = padded != PAD
    expected = m(src, tgt).logits
    torch.testing.assert_close(m(padded, tgt, keep).logits, expected, atol=1e-5, rtol=1e-5)
    # Without the mask the padding *does* leak in: the mask is what makes the invariance hold.
    assert not torch.allclose(m(padded, tgt).logits, expected, atol=1e-5)


def test_batch_equals_items_one_at_a_time():
    m = tiny()
    srcs = [torch.randint(4, V, (n,)) for n in (6, 3, 5)]
    tgts = [torch.randint(4, V, (n,)) for n in (4, 7, 2)]
    src = torch.nn.utils.rnn.pad_sequence(srcs, batch_first=True, padding_value=PAD)
    tgt = torch.nn.utils.rnn.pad_sequence(tgts, batch_first=True, padding_value=PAD)
    batched = m(src, tgt, src != PAD).logits
    for i, (s, t) in enumerate(zip(srcs, tgts)):
        alone = m(s[None], t[None]).logits[0]
        torch.testing.assert_close(batched[i, : len(t)], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("overrides", VARIANTS)
def test_cached_incremental_decoding_equals_full_forward_at_every_step(overrides):
    m = tiny(**overrides)
    src = torch.randint(4, V, (2, 6))
    keep = torch.ones_like(src, dtype=torch.bool)
    keep[1, 4:] = False
    tgt = torch.randint(4, V, (2, 7))
    full = m(src, tgt, keep).logits  # (B, T, V)
    memory = m.encode(src, keep).hidden
    cache = KVCache()
    for t in range(tgt.size(1)):
        step = m.project(m.decode(tgt[:, t : t + 1], memory, keep, cache).hidden)  # (B, 1, V)
        torch.testing.assert_close(step[:, 0], full[:, t], atol=1e-5, rtol=1e-5)
    assert cache.seq_length() == tgt.size(1)


def test_cache_with_several_new_positions_at_once():
    m = tiny()
    src, tgt = torch.randint(4, V, (2, 6)), torch.randint(4, V, (2, 7))
    full = m(src, tgt).logits
    memory, cache = m.encode(src).hidden, KVCache()
    first = m.project(m.decode(tgt[:, :3], memory, None, cache).hidden)
    rest = m.project(m.decode(tgt[:, 3:], memory, None, cache).hidden)
    torch.testing.assert_close(torch.cat([first, rest], 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("junk_after", [False, True], ids=["padding-before", "padding-after"])
@pytest.mark.parametrize("overrides", VARIANTS)
@torch.no_grad()
def test_rows_of_different_ages_decode_as_if_alone(overrides, junk_after):
    """Continuous batching's step: two rows whose histories differ in length share one cache,
    the shorter padded with garbage that ``target_mask`` hides (before its history, or between
    its history and its new key, the layout of the serving `SlotCache`), each at its own
    position (``positions``); every row's output equals decoding it alone, without a cache."""
    m = tiny(**overrides)
    srcs = [torch.randint(4, V, (1, n)) for n in (6, 4)]
    tgts = [torch.randint(4, V, (1, n)) for n in (5, 3)]  # histories of 4 and 2, then one step
    caches = []
    for src, tgt in zip(srcs, tgts):
        cache = KVCache()
        m.decode(tgt[:, :-1], m.encode(src).hidden, None, cache)
        caches.append(cache)
    batched = KVCache()
    for layer, (k0, v0) in caches[0].self_kv.items():
        k1, v1 = caches[1].self_kv[layer]
        junk = torch.randn(1, k1.size(1), 2, k1.size(3)) * 100  # the shorter row's padding
        padded = [torch.cat([x, junk] if junk_after else [junk, x], 2) for x in (k1, v1)]
        batched.self_kv[layer] = (torch.cat([k0, padded[0]]), torch.cat([v0, padded[1]]))
        (c0, d0), (c1, d1) = caches[0].cross_kv[layer], caches[1].cross_kv[layer]
        pad = (0, 0, 0, c0.size(2) - c1.size(2))  # sources of 6 and 4 positions
        batched.cross_kv[layer] = (torch.cat([c0, torch.nn.functional.pad(c1, pad)]),
                                   torch.cat([d0, torch.nn.functional.pad(d1, pad)]))
    source_mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    row1 = [True] * 2 + [False] * 2 if junk_after else [False] * 2 + [True] * 2
    target_mask = torch.tensor([[True] * 5, row1 + [True]])  # + the new key, at the end
    memory = torch.zeros(2, 6, m.config.d_model)  # unused: the cross keys are cached
    step = torch.cat([tgts[0][:, -1:], tgts[1][:, -1:]])
    out = m.project(m.decode(step, memory, source_mask, copy.deepcopy(batched),
                             positions=torch.tensor([4, 2]), target_mask=target_mask).hidden)[:, 0]
    for i, (src, tgt) in enumerate(zip(srcs, tgts)):
        torch.testing.assert_close(out[i], m(src, tgt).logits[0, -1], atol=1e-5, rtol=1e-5)
    # Without the mask the junk leaks in: the mask is what makes the invariance hold.
    unmasked = m.project(m.decode(step, memory, source_mask, batched,
                                  positions=torch.tensor([4, 2])).hidden)
    assert not torch.allclose(unmasked[1, 0], out[1], atol=1e-3)


def test_attention_maps_are_distributions_and_zero_on_padding():
    m = tiny()
    src = torch.randint(4, V, (2, 6))
    keep = torch.ones_like(src, dtype=torch.bool)
    keep[0, 3:] = False
    out = m(src, torch.randint(4, V, (2, 5)), keep, need_weights=True)
    for maps in (out.encoder_attentions, out.cross_attentions):
        assert len(maps) == 2
        for w in maps:
            torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:-1]))
            assert (w[0, :, :, 3:] == 0).all()
    for w in out.decoder_attentions:
        assert w.shape == (2, 4, 5, 5)
        assert (w.triu(diagonal=1) == 0).all()  # causal


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("d_model", 30, "d_model"),
        ("dropout", -0.1, "dropout"),
        ("vocab_size", 0, "vocab_size"),
        ("n_heads", 0, "n_heads"),
        ("n_encoder_layers", -1, "n_encoder_layers"),
        ("n_decoder_layers", 0, "n_decoder_layers"),
        ("norm", "batchnorm", "norm"),
        ("n_kv_heads", 3, "n_kv_heads"),
        ("rope_theta", 0.0, "rope_theta"),
        ("bias", 1, "bias"),
        ("activation", "tanh", "activation"),
        ("positional", "rotary", "positional"),
        ("attention_dropout", 1.0, "attention_dropout"),
        ("pad_token_id", 99, "pad_token_id"),
    ],
)
def test_bad_config_names_the_field(field, value, message):
    fields = dict(vocab_size=V, d_model=32, n_heads=4)
    fields[field] = value
    with pytest.raises(ValueError, match=message):
        TransformerConfig(**fields)


def test_unknown_config_key_and_unknown_size_are_errors():
    with pytest.raises(ValueError, match="d_modle"):
        TransformerConfig.from_dict({"vocab_size": 10, "d_modle": 8})
    with pytest.raises(ValueError, match="huge"):
        config_for("huge", 10)


def test_named_sizes():
    base = config_for("base", 37000)
    assert (base.d_model, base.n_heads, base.d_ff, base.n_encoder_layers) == (512, 8, 2048, 6)
    n = sum(p.numel() for p in build_transformer(base).parameters())
    assert 60e6 < n < 66e6  # the paper's base model: 65M with a ~37k shared vocabulary


@pytest.mark.parametrize("overrides", [{}, {"norm_first": True, "tie_embeddings": False}])
def test_tiny_model_overfits_a_copy_batch_and_every_parameter_learns(overrides):
    torch.manual_seed(0)
    m = build_transformer(config_for("tiny", 20, dropout=0.0, positional="learned", **overrides))
    src = torch.randint(4, 20, (8, 6))
    labels = torch.cat([src, torch.full((8, 1), 3)], dim=1)  # copy, then eos (id 3)
    decoder_in = torch.cat([torch.full((8, 1), 2), labels[:, :-1]], dim=1)  # bos (id 2) + shift
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    for step in range(400):
        loss = compute_loss(m(src, decoder_in).logits, labels)
        opt.zero_grad()
        loss.backward()
        if step == 0:
            missing = [n for n, p in m.named_parameters() if p.grad is None or not p.grad.any()]
            assert missing == []
        opt.step()
        if loss.item() < 0.05:
            break
    assert loss.item() < 0.05


def test_loss_ignores_padding_labels_and_smooths():
    logits = torch.randn(2, 3, 7)
    labels = torch.tensor([[1, 2, -100], [4, -100, -100]])
    picked = torch.stack([logits[0, 0], logits[0, 1], logits[1, 0]])
    expected = torch.nn.functional.cross_entropy(picked, torch.tensor([1, 2, 4]))
    torch.testing.assert_close(compute_loss(logits, labels), expected)
    smoothed = torch.nn.functional.cross_entropy(
        picked, torch.tensor([1, 2, 4]), label_smoothing=0.1
    )
    torch.testing.assert_close(compute_loss(logits, labels, 0.1), smoothed)


@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loss_value_and_gradient_equal_torch_cross_entropy(eps, dtype, monkeypatch):
    # compute_loss writes the CPU training loss out by hand (tformer.model.kernels); value and
    # gradient must be PyTorch's, over several chunks of rows (the last one short) and with
    # ignored labels.
    from tformer.model import kernels

    monkeypatch.setattr(kernels, "_CHUNK_ELEMENTS", 64 * 301)  # 64 rows a chunk
    torch.manual_seed(0)
    n, vocab = 600, 301
    base = (torch.randn(n, vocab) * 3).to(dtype)
    labels = torch.randint(0, vocab, (n,))
    labels[::5] = -100
    ours_in = base.clone().requires_grad_()
    ours = compute_loss(ours_in.view(20, 30, vocab), labels.view(20, 30), eps)
    ours.backward()
    ref_in = base.clone().requires_grad_()
    ref = torch.nn.functional.cross_entropy(ref_in.float(), labels, label_smoothing=eps)
    ref.backward()
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(ours_in.grad, ref_in.grad)
    assert ours_in.grad[::5].abs().max() == 0  # ignored rows get no gradient


def test_model_package_imports_only_torch():
    import ast
    import pathlib

    import tformer.model

    root = pathlib.Path(tformer.model.__file__).parent
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                assert top in {"torch", "tformer", "__future__", "math", "dataclasses", "typing"}, (
                    f"{path.name} imports {name}"
                )
                if top == "tformer":
                    assert name.startswith("tformer.model"), f"{path.name} imports {name}"
