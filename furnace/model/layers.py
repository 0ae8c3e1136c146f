"""Small building blocks shared by the decoder, the resampler and the xattn blocks."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import furnace_kernels as fk


class RMSNorm(nn.Module):
    fused: frozenset = frozenset()  # model.fused_kernels (furnace/model/fused.py)

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """norm(x); with `residual`, (x + residual, norm(x + residual)) in one fused pass (the
        add inside the norm's own forward, where ZeRO-3 has gathered its weight)."""
        if residual is not None:
            return fk.add_rms_norm(x, residual, self.weight, self.eps)
        if "rms_norm" in self.fused:
            return fk.rms_norm(x, self.weight, self.eps)
        # Normalise in fp32, scale in the input dtype (as HF does, for bit-level parity).
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class HeadNorm(nn.Module):
    """A norm over each attention head's queries or keys ([..., head_dim]), its weights shared by
    every head: LayerNorm (IDEFICS' resampler) or RMSNorm (its xattn blocks). Under tensor
    parallelism each rank holds some of the heads, so `share` (set by `furnace.parallel`) sums the
    weights' gradient over the ranks; alone it is the identity."""

    def __init__(self, kind: str, dim: int, eps: float):
        super().__init__()
        self.kind, self.eps = kind, eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if kind == "layernorm" else None
        self.share = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight, self.bias
        if self.share is not None:
            w, b = self.share(w), None if b is None else self.share(b)
        if self.kind == "layernorm":
            return F.layer_norm(x, x.shape[-1:], w, b, self.eps)
        dtype = x.dtype
        x = x.float()
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)).to(dtype)


ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu}


def make_norm(kind: str, dim: int, eps: float = 1e-6) -> nn.Module:
    """`layernorm` (torch's default eps, as open_flamingo) or `rmsnorm` (with `eps`)."""
    return nn.LayerNorm(dim) if kind == "layernorm" else RMSNorm(dim, eps)


class FeedForward(nn.Module):
    """Pre-norm MLP of the Perceiver Resampler and the gated xattn blocks: GELU (open_flamingo)
    or ReLU (IDEFICS' resampler)."""

    def __init__(self, dim: int, mult: int = 4, act: str = "gelu", hidden: int = 0):
        super().__init__()
        hidden = hidden or dim * mult
        self.act = act
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(ACTIVATIONS[self.act](self.fc1(self.norm(x))))


class GatedFeedForward(nn.Module):
    """Pre-norm SwiGLU MLP with Llama's names (IDEFICS' xattn blocks)."""
    fused: frozenset = frozenset()  # model.fused_kernels (furnace/model/fused.py)

    def __init__(self, dim: int, hidden: int, norm: nn.Module):
        super().__init__()
        self.norm = norm
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x), self.fused))


def swiglu(gate: torch.Tensor, up: torch.Tensor, fused: frozenset) -> torch.Tensor:
    return fk.swiglu(gate, up) if "swiglu" in fused else F.silu(gate) * up


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
