"""PyTorch references of the fused ops (the CPU path and the tests' ground truth). Each one is
the model's own math (furnace/model/layers.py RMSNorm, llama.py SwiGLU / apply_rope,
flamingo.py output_logits + causal_lm_loss), so the Triton kernels are checked against what the
model computes, roundings included.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def add_rms_norm_reference(x, residual, weight, eps: float = 1e-6):
    s = x + residual
    return s, rms_norm_reference(s, weight, eps)


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def rope_cos_sin_4d(cos: torch.Tensor, sin: torch.Tensor):
    """cos/sin as [B|1, 1, L, D]: accepts llama.py's [B, 1, L, D], or [B, L, D], or [L, D]."""
    def fix(t):
        if t.dim() == 2:
            t = t[None]
        if t.dim() == 3:
            t = t[:, None]
        if t.dim() != 4 or t.shape[1] != 1:
            raise ValueError(f"rope: cos/sin must be [B, 1, L, D], [B, L, D] or [L, D]; got {tuple(t.shape)}")
        return t
    return fix(cos), fix(sin)


def apply_rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def rope_reference_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """In place on q and k ([B, H, L, D]); returns (q, k)."""
    cos, sin = rope_cos_sin_4d(cos, sin)
    q.copy_(apply_rope_reference(q, cos, sin))
    k.copy_(apply_rope_reference(k, cos, sin))
    return q, k


def linear_cross_entropy_dense(hidden, weights, labels, ignore_index: int = -100):
    """The materialising oracle (one process): logits = cat([hidden @ W_i^T], -1), fp32
    cross-entropy summed over labelled tokens. Returns (loss_sum, count)."""
    ws = [weights] if torch.is_tensor(weights) else list(weights)
    logits = torch.cat([F.linear(hidden, w) for w in ws], dim=-1).float()
    logits = logits.reshape(-1, logits.shape[-1])
    labels = labels.reshape(-1)
    loss = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
    return loss, (labels != ignore_index).sum()
