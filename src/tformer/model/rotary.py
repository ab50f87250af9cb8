"""Rotary position embedding, RoPE (Su et al. 2021, *RoFormer*, section 3.4), as Llama uses it.

Instead of adding a position vector to the input, RoPE rotates each query and key by an angle
proportional to its position, pair of dimensions by pair of dimensions:

    θ_i = theta^(-2i/Dh),  i = 0 … Dh/2 − 1                     (theta = 10000)
    RoPE(x, pos) = x ⊙ cos(pos θ) + rotate_half(x) ⊙ sin(pos θ)
    rotate_half([x₁; x₂]) = [−x₂; x₁]                              (x₁, x₂ the two halves of x)

Dimension i is paired with dimension i + Dh/2 (Hugging Face Llama's ``rotate_half`` layout,
so Llama's q and k projections copy across without a permutation; the paper pairs 2i with
2i + 1, which is the same rotation of permuted weights). A rotation keeps lengths and
composes by adding angles, so a query at m and a key at n score

    ⟨RoPE(q, m), RoPE(k, n)⟩ = ⟨q, RoPE(k, n − m)⟩:

attention sees only the offset n − m. Dimension names: B batch, H heads, T length, Dh head width.
"""

from __future__ import annotations

import torch
from torch import Tensor


def rotary_cos_sin(positions: Tensor, head_dim: int, theta: float = 10000.0
                   ) -> tuple[Tensor, Tensor]:
    """cos(pos θ) and sin(pos θ) for integer ``positions`` (B, T) -> 2 × (B, 1, T, Dh), in float32
    (the angles of long sequences need its precision), broadcastable over the heads."""
    exponents = torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim
    inv_freq = 1.0 / theta**exponents  # (Dh/2,): θ_i
    angles = positions.float()[..., None] * inv_freq  # (B, T, Dh/2)
    angles = torch.cat([angles, angles], dim=-1)[:, None]  # (B, 1, T, Dh): i and i + Dh/2
    return angles.cos(), angles.sin()


def rotate_half(x: Tensor) -> Tensor:
    """[x₁; x₂] -> [−x₂; x₁] over the last dimension: a quarter turn of every pair (i, i + Dh/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE(x, pos) = x ⊙ cos(pos θ) + rotate_half(x) ⊙ sin(pos θ); x (B, H, T, Dh)."""
    return (x * cos + rotate_half(x) * sin).to(x.dtype)
