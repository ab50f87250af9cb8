"""Comparing two runs' weights, for the tests that check one setup equals another (DDP against
gradient accumulation, DeepSpeed against DDP).

Every weight must agree to ``atol`` except the attentions' key biases (the middle third of
``in_proj.bias``: q, k, v). Their true gradient is zero: adding the same number to every score of
a query leaves its softmax unchanged. What they receive is rounding noise (~1e-10), which differs
with the reduction order, and AdamW, dividing by the square root of that noise's own second
moment, turns it into steps about the size of the learning rate. They change no output; they are
held to ``steps x lr``, what AdamW can move a weight at most.
"""

from __future__ import annotations

import torch


def split_key_biases(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weights with every attention's key bias taken out into an entry ``NAME:key``."""
    out = {}
    for name, tensor in weights.items():
        if name.endswith("in_proj.bias"):
            d = tensor.numel() // 3
            out[name] = torch.cat([tensor[:d], tensor[2 * d:]])
            out[f"{name}:key"] = tensor[d:2 * d]
        else:
            out[name] = tensor
    return out


def assert_same_weights(a: dict, b: dict, atol: float = 1e-6,
                        key_bias_atol: float | None = None) -> None:
    """``key_bias_atol`` None: the key biases too are held to ``atol``."""
    a, b = split_key_biases(a), split_key_biases(b)
    assert a.keys() == b.keys()
    for key in a:
        tolerance = key_bias_atol if key.endswith(":key") and key_bias_atol else atol
        torch.testing.assert_close(a[key], b[key], atol=tolerance, rtol=0, msg=key)
