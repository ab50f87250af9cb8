"""tformer's CPU kernels (tformer.model.kernels) against the PyTorch functions they stand for,
and the paper's code calling them."""

import pytest
import torch
import torch.nn.functional as F

from tformer.model import build_transformer, compute_loss, config_for, kernels

# -- dropout: its own mask, checked against the definition of dropout ---------------------------


def test_cpu_dropout_drops_p_of_every_lane_and_keeps_the_mean():
    """Each element is zeroed with probability p and the rest scaled by 1 / (1 - p). Checked per
    lane of the 64-bit random words (each gives 4 elements) as well as overall: a lane of
    biased bits (e.g. the top bit of torch's default int64 range, always 0) would show there."""
    torch.manual_seed(0)
    p, n = 0.3, 1 << 20
    x = torch.ones(n // 4, 4, requires_grad=True)
    out = kernels.dropout(x, p, True)
    dropped = (out == 0).float()
    sigma = (p * (1 - p) / (n // 4)) ** 0.5  # of one lane's fraction
    assert (dropped.mean(0) - p).abs().max() < 5 * sigma, dropped.mean(0)
    kept = out[out != 0]
    torch.testing.assert_close(kept, torch.full_like(kept, 1 / (1 - p)), atol=1e-4, rtol=0)
    assert abs(out.mean().item() - 1.0) < 0.01  # E[dropout(x)] = x
    out.sum().backward()  # the gradient is the same mask, the same scale
    torch.testing.assert_close(x.grad, out.detach())


def test_cpu_dropout_is_seeded_and_off_in_eval_mode():
    x = torch.randn(64, 33)  # numel not a multiple of 4
    torch.manual_seed(3)
    first = kernels.dropout(x, 0.5, True)
    torch.manual_seed(3)
    assert torch.equal(kernels.dropout(x, 0.5, True), first)
    assert not torch.equal(kernels.dropout(x, 0.5, True), first)  # the generator moved on
    assert kernels.dropout(x, 0.5, False) is x
    assert torch.equal(kernels.dropout(x, 0.0, True), x)
    assert torch.equal(kernels.dropout(x, 1.0, True), torch.zeros_like(x))  # as F.dropout


def test_cpu_dropout_keeps_the_dtype_and_the_shape():
    x = torch.randn(3, 5, 7, dtype=torch.bfloat16)
    out = kernels.dropout(x, 0.1, True)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape


def test_disabled_dropout_is_torch_dropout(monkeypatch):
    monkeypatch.setattr(kernels, "enabled", False)
    x = torch.randn(64, 33)
    torch.manual_seed(5)
    ours = kernels.dropout(x, 0.3, True)
    torch.manual_seed(5)
    assert torch.equal(ours, F.dropout(x, 0.3, True))


# -- cross-entropy ----------------------------------------------------------------------------


@pytest.mark.parametrize("ignore_index", [-100, 0])
def test_cross_entropy_equals_torch_for_any_ignore_index(ignore_index):
    torch.manual_seed(0)
    logits = torch.randn(40, 11)
    labels = torch.randint(0, 11, (40,))
    labels[::4] = ignore_index
    ours_in, ref_in = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    ours = kernels.cross_entropy(ours_in, labels, ignore_index=ignore_index, label_smoothing=0.1)
    ref = F.cross_entropy(ref_in, labels, ignore_index=ignore_index, label_smoothing=0.1)
    ours.backward()
    ref.backward()
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(ours_in.grad, ref_in.grad)


# -- the paper's code goes through them, on CPU in eager mode only ------------------------------


def test_the_model_calls_each_kernel(monkeypatch):
    calls = set()

    def counted(name, real):
        def call(*args, **kwargs):
            calls.add(name)
            return real(*args, **kwargs)
        return call

    for name in ("dropout", "written_out_attention_is_faster", "cross_entropy"):
        monkeypatch.setattr(kernels, name, counted(name, getattr(kernels, name)))
    model = build_transformer(config_for("tiny", 50)).train()
    ids = torch.randint(1, 50, (2, 5))
    compute_loss(model(ids, ids).logits, ids, 0.1).backward()
    assert calls == {"dropout", "written_out_attention_is_faster", "cross_entropy"}


def test_kernels_step_aside_when_disabled_or_compiling(monkeypatch):
    x = torch.randn(2, 4, 3, 8)
    assert kernels.applies(x) and kernels.written_out_attention_is_faster(x, x)
    assert not kernels.written_out_attention_is_faster(x[:, :, :1], x)  # one query: the kernel
    assert not kernels.written_out_attention_is_faster(x.bfloat16(), x.bfloat16())
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not kernels.applies(x) and not kernels.written_out_attention_is_faster(x, x)
    monkeypatch.undo()
    monkeypatch.setattr(kernels, "enabled", False)
    assert not kernels.applies(x) and not kernels.written_out_attention_is_faster(x, x)
