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
