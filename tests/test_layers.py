"""Encoder/decoder layers and the whole stack against torch.nn.Transformer* with copied weights."""

import pytest
import torch
from torch import nn

from tformer.model import build_transformer, causal_mask, config_for
from tformer.model.masks import padding_mask

B, S, T, D, H, F = 2, 6, 5, 32, 4, 64


def copy_attention(ours, ref: nn.MultiheadAttention) -> None:
    ours.in_proj.weight.copy_(ref.in_proj_weight)
    ours.in_proj.bias.copy_(ref.in_proj_bias)
    ours.out_proj.weight.copy_(ref.out_proj.weight)
    ours.out_proj.bias.copy_(ref.out_proj.bias)


@torch.no_grad()
def copy_encoder_layer(ours, ref: nn.TransformerEncoderLayer) -> None:
    copy_attention(ours.self_attn, ref.self_attn)
    ours.ffn.w1.load_state_dict(ref.linear1.state_dict())
    ours.ffn.w2.load_state_dict(ref.linear2.state_dict())
    ours.norm1.load_state_dict(ref.norm1.state_dict())
    ours.norm2.load_state_dict(ref.norm2.state_dict())


@torch.no_grad()
def copy_decoder_layer(ours, ref: nn.TransformerDecoderLayer) -> None:
    copy_attention(ours.self_attn, ref.self_attn)
    copy_attention(ours.cross_attn, ref.multihead_attn)
    ours.ffn.w1.load_state_dict(ref.linear1.state_dict())
    ours.ffn.w2.load_state_dict(ref.linear2.state_dict())
    for i in (1, 2, 3):
        getattr(ours, f"norm{i}").load_state_dict(getattr(ref, f"norm{i}").state_dict())


def randomise(module: nn.Module) -> None:
    """Non-trivial biases and norm parameters, so a mis-copied one cannot hide."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(mean=1.0 if name.endswith("weight") else 0.0, std=0.1)


def model(norm_first: bool):
    torch.manual_seed(0)
    cfg = config_for("tiny", 50, d_model=D, n_heads=H, d_ff=F, dropout=0.0, norm_first=norm_first)
    return build_transformer(cfg).eval()


@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_layer_equals_torch(norm_first):
    ref = nn.TransformerEncoderLayer(D, H, F, dropout=0.0, batch_first=True, norm_first=norm_first)
    randomise(ref.eval())
    ours = model(norm_first).encoder.layers[0]
    copy_encoder_layer(ours, ref)
    x = torch.randn(B, S, D)
    keep = torch.tensor([[1] * S, [1] * 3 + [0] * (S - 3)]).bool()
    expected = ref(x, src_key_padding_mask=~keep)
    got = ours(x, padding_mask(keep)).hidden
    valid = keep[:, :, None]
    torch.testing.assert_close(got * valid, expected * valid, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("norm_first", [False, True])
def test_decoder_layer_equals_torch(norm_first):
    ref = nn.TransformerDecoderLayer(D, H, F, dropout=0.0, batch_first=True, norm_first=norm_first)
    randomise(ref.eval())
    ours = model(norm_first).decoder.layers[0]
    copy_decoder_layer(ours, ref)
    x, memory = torch.randn(B, T, D), torch.randn(B, S, D)
    keep = torch.tensor([[1] * S, [1] * 2 + [0] * (S - 2)]).bool()
    expected = ref(x, memory, tgt_mask=~causal_mask(T)[0, 0], memory_key_padding_mask=~keep)
    got = ours(x, memory, padding_mask(keep)).hidden
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_decoder_stack_equals_torch_transformer(norm_first):
    ref = nn.Transformer(
        D, H, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=F, dropout=0.0,
        batch_first=True, norm_first=norm_first,
    ).eval()
    randomise(ref)
    ours = model(norm_first)
    for a, b in zip(ours.encoder.layers, ref.encoder.layers):
        copy_encoder_layer(a, b)
    for a, b in zip(ours.decoder.layers, ref.decoder.layers):
        copy_decoder_layer(a, b)
    if norm_first:  # pre-norm stacks end in a LayerNorm, as nn.Transformer's always do
        with torch.no_grad():
            ours.encoder.norm.load_state_dict(ref.encoder.norm.state_dict())
            ours.decoder.norm.load_state_dict(ref.decoder.norm.state_dict())
    else:  # the paper's post-norm stack has no extra final norm; nn.Transformer adds one
        ref.encoder.norm = None
        ref.decoder.norm = None
    src, tgt = torch.randn(B, S, D), torch.randn(B, T, D)
    keep = torch.tensor([[1] * S, [1] * 4 + [0] * (S - 4)]).bool()
    expected = ref(
        src, tgt, tgt_mask=~causal_mask(T)[0, 0], src_key_padding_mask=~keep,
        memory_key_padding_mask=~keep,
    )
    memory = ours.encoder(src, padding_mask(keep)).hidden
    got = ours.decoder(tgt, memory, padding_mask(keep)).hidden
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


# -- Dropout: tformer's CPU mask against the definition of dropout ----------------------------

def test_cpu_dropout_drops_p_of_every_lane_and_keeps_the_mean():
    """Each element is zeroed with probability p and the rest scaled by 1 / (1 - p). Checked per
    lane of the 64-bit random words (each gives 4 elements) as well as overall: a lane of
    biased bits (e.g. the top bit of torch's default int64 range, always 0) would show there."""
    from tformer.model.layers import Dropout

    torch.manual_seed(0)
    p, n = 0.3, 1 << 20
    x = torch.ones(n // 4, 4, requires_grad=True)
    out = Dropout(p).train()(x)
    dropped = (out == 0).float()
    sigma = (p * (1 - p) / (n // 4)) ** 0.5  # of one lane's fraction
    assert (dropped.mean(0) - p).abs().max() < 5 * sigma, dropped.mean(0)
    kept = out[out != 0]
    torch.testing.assert_close(kept, torch.full_like(kept, 1 / (1 - p)), atol=1e-4, rtol=0)
    assert abs(out.mean().item() - 1.0) < 0.01  # E[dropout(x)] = x
    out.sum().backward()  # the gradient is the same mask, the same scale
    torch.testing.assert_close(x.grad, out.detach())


def test_cpu_dropout_is_seeded_and_off_in_eval_mode():
    from tformer.model.layers import Dropout

    x = torch.randn(64, 33)  # numel not a multiple of 4
    layer = Dropout(0.5).train()
    torch.manual_seed(3)
    first = layer(x)
    torch.manual_seed(3)
    assert torch.equal(layer(x), first)
    assert not torch.equal(layer(x), first)  # the generator moved on
    assert torch.equal(layer.eval()(x), x)
    assert torch.equal(Dropout(0.0).train()(x), x)
    assert torch.equal(Dropout(1.0).train()(x), torch.zeros_like(x))  # as nn.Dropout


def test_cpu_dropout_keeps_the_dtype_and_the_shape():
    from tformer.model.layers import Dropout

    x = torch.randn(3, 5, 7, dtype=torch.bfloat16)
    out = Dropout(0.1).train()(x)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
