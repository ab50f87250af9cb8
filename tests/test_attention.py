"""Attention against PyTorch's own modules, and the math path against the fused path."""

import pytest
import torch
from torch import nn

from tformer.model import MultiHeadAttention, attention_fast, attention_math, causal_mask, kernels
from tformer.model.masks import padding_mask

B, T, S, D, H = 3, 7, 9, 32, 4


# MultiHeadAttention takes the formula written out on CPU for short keys and PyTorch's kernel
# otherwise (tformer.model.kernels); the module tests run through both.
PATHS = {"written_out": kernels.written_out_max_keys, "kernel": 0}


@pytest.fixture(params=list(PATHS))
def path(request, monkeypatch) -> str:
    monkeypatch.setattr(kernels, "written_out_max_keys", PATHS[request.param])
    return request.param


def copy_mha(ref: nn.MultiheadAttention) -> MultiHeadAttention:
    ours = MultiHeadAttention(D, H)
    with torch.no_grad():
        ours.in_proj.weight.copy_(ref.in_proj_weight)
        ours.in_proj.bias.copy_(ref.in_proj_bias)
        ours.out_proj.weight.copy_(ref.out_proj.weight)
        ours.out_proj.bias.copy_(ref.out_proj.bias)
    return ours.eval()


@pytest.fixture
def ref(path) -> nn.MultiheadAttention:
    torch.manual_seed(0)
    module = nn.MultiheadAttention(D, H, batch_first=True).eval()
    with torch.no_grad():  # non-zero biases so a mis-copied bias shows
        module.in_proj_bias.normal_()
        module.out_proj.bias.normal_()
    return module


def lengths_mask(lengths: list[int], total: int) -> torch.Tensor:
    return torch.arange(total)[None, :] < torch.tensor(lengths)[:, None]  # (B, total) True = token


@pytest.mark.parametrize("need_weights", [False, True])
def test_self_attention_with_padding_equals_torch(ref, need_weights):
    x = torch.randn(B, T, D)
    keep = lengths_mask([7, 4, 1], T)
    expected, expected_w = ref(x, x, x, key_padding_mask=~keep, average_attn_weights=False)
    got, w = copy_mha(ref)(x, mask=padding_mask(keep), need_weights=need_weights)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    if need_weights:
        torch.testing.assert_close(w, expected_w, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("need_weights", [False, True])
def test_causal_self_attention_equals_torch(ref, need_weights):
    x = torch.randn(B, T, D)
    future = ~causal_mask(T)[0, 0]  # nn.MultiheadAttention: True = may NOT attend
    expected, _ = ref(x, x, x, attn_mask=future)
    got, _ = copy_mha(ref)(x, is_causal=True, need_weights=need_weights)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_causal_and_padding_together_equal_torch(ref):
    x = torch.randn(B, T, D)
    keep = lengths_mask([7, 5, 3], T)
    expected, _ = ref(x, x, x, attn_mask=~causal_mask(T)[0, 0], key_padding_mask=~keep)
    got, _ = copy_mha(ref)(x, mask=padding_mask(keep), is_causal=True)
    valid = keep[:, :, None]  # rows of padded queries are unspecified
    torch.testing.assert_close(got * valid, expected * valid, atol=1e-5, rtol=1e-5)


def test_cross_attention_equals_torch(ref):
    x, memory = torch.randn(B, T, D), torch.randn(B, S, D)
    keep = lengths_mask([9, 2, 5], S)
    expected, expected_w = ref(x, memory, memory, key_padding_mask=~keep, average_attn_weights=False)
    got, w = copy_mha(ref)(x, memory, mask=padding_mask(keep), need_weights=True)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w, expected_w, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("masked", ["none", "padding", "causal"])
def test_math_path_equals_fast_path_and_weights_are_distributions(masked):
    torch.manual_seed(1)
    q, k, v = (torch.randn(B, H, T, D // H) for _ in range(3))
    mask = {
        "none": None,
        "padding": padding_mask(lengths_mask([7, 3, 1], T)),
        "causal": causal_mask(T),
    }[masked]
    out, weights = attention_math(q, k, v, mask)
    torch.testing.assert_close(out, attention_fast(q, k, v, mask), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weights.sum(-1), torch.ones(B, H, T))
    if mask is not None:
        assert (weights.masked_select(~mask.expand_as(weights)) == 0).all()


def test_fast_causal_flag_equals_explicit_mask():
    q, k, v = (torch.randn(B, H, T, D // H) for _ in range(3))
    torch.testing.assert_close(
        attention_fast(q, k, v, is_causal=True), attention_fast(q, k, v, causal_mask(T))
    )


def test_causal_mask_with_cached_prefix_is_bottom_right_aligned():
    mask = causal_mask(2, 5)[0, 0]
    assert mask.tolist() == [[True, True, True, True, False], [True, True, True, True, True]]


def test_head_count_must_divide_width():
    with pytest.raises(ValueError, match="divisible"):
        MultiHeadAttention(30, 4)


@pytest.mark.parametrize(("keys", "queries", "expected"),
                         [(T, T, "written_out"), (80, T, "kernel"), (T, 1, "kernel")])
def test_written_out_path_is_taken_for_short_keys_only(monkeypatch, keys, queries, expected):
    import tformer.model.attention as attention

    taken = []
    for name in ("attention_math", "attention_fast"):
        real = getattr(attention, name)
        monkeypatch.setattr(attention, name, lambda *a, _real=real, _name=name, **k:
                            taken.append(_name) or _real(*a, **k))
    mha = MultiHeadAttention(D, H).eval()
    mha(torch.randn(B, queries, D), torch.randn(B, keys, D))
    assert taken == [{"written_out": "attention_math", "kernel": "attention_fast"}[expected]]


def test_both_paths_give_the_same_gradients(monkeypatch):
    """Training goes through the written-out path on CPU: its gradients equal the kernel's."""
    torch.manual_seed(2)
    x, memory = torch.randn(B, T, D), torch.randn(B, S, D)
    keep = padding_mask(lengths_mask([9, 2, 5], S))
    grads = {}
    for name, max_keys in PATHS.items():
        torch.manual_seed(0)
        mha = MultiHeadAttention(D, H).train()
        monkeypatch.setattr(kernels, "written_out_max_keys", max_keys)
        inputs = (x.clone().requires_grad_(), memory.clone().requires_grad_())
        (mha(inputs[0], is_causal=True).output.square().sum()
         + mha(inputs[0], inputs[1], mask=keep).output.square().sum()).backward()
        grads[name] = [inputs[0].grad, inputs[1].grad] + [p.grad for p in mha.parameters()]
    for ours, theirs in zip(grads["written_out"], grads["kernel"]):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
