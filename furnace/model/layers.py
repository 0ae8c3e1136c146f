"""Small building blocks shared by the decoder, the resampler and the xattn blocks."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32, scale in the input dtype (as HF does, for bit-level parity).
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class FeedForward(nn.Module):
    """Pre-norm GELU MLP used by the Perceiver Resampler and the gated xattn blocks."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, dim * mult, bias=False)
        self.fc2 = nn.Linear(dim * mult, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(self.norm(x))))


def split_heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """[B, L, n*D] -> [B, n, L, D]. The head count comes from the tensor, so TP-sharded
    projections (fewer local heads) need no change here."""
    b, l, _ = x.shape
    return x.view(b, l, -1, head_dim).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, n, L, D] -> [B, L, n*D]."""
    b, n, l, d = x.shape
    return x.transpose(1, 2).reshape(b, l, n * d)


def run_block(owner: nn.Module, block, *args, cache=None):
    """`block(*args, cache)`, with activation checkpointing decided here, once for every layout:
    when `owner.activation_checkpointing` is set, `owner` is training and gradients are on, the
    block's activations are recomputed in the backward instead of kept (never while decoding
    with a KV cache)."""
    if owner.activation_checkpointing and owner.training and cache is None and torch.is_grad_enabled():
        return checkpoint(block, *args, None, use_reentrant=False)
    return block(*args, cache)
