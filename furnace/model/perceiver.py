"""Perceiver Resampler: a fixed number of learned latents summarise each image (or video)."""
from __future__ import annotations

import torch
import torch.nn as nn

from furnace.config import PerceiverConfig
from furnace_kernels import attention

from .layers import FeedForward, merge_heads, split_heads


class PerceiverAttention(nn.Module):
    """Latents attend to concat(media features, latents)."""

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        self.dim_head = dim_head
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_k = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_v = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim, bias=False)

    def forward(self, media: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        media, latents = self.norm_media(media), self.norm_latents(latents)
        kv_in = torch.cat([media, latents], dim=1)
        q = split_heads(self.to_q(latents), self.dim_head)
        k = split_heads(self.to_k(kv_in), self.dim_head)
        v = split_heads(self.to_v(kv_in), self.dim_head)
        return self.to_out(merge_heads(attention(q, k, v)))


class PerceiverResampler(nn.Module):
    """features [N, F, P, d] (F frames of P patches) -> latents [N, num_latents, d]; `dim` is
    the vision tower's width."""

    def __init__(self, dim: int, cfg: PerceiverConfig):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(cfg.num_latents, dim) * 0.02)
        self.frame_embs = nn.Parameter(torch.randn(cfg.max_frames, dim) * 0.02)  # media-time embeddings
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, cfg.heads, cfg.dim_head), FeedForward(dim, cfg.ff_mult)])
            for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        n, f, p, d = features.shape
        if f > self.frame_embs.shape[0]:
            raise ValueError(f"{f} frames per media exceed model.perceiver.max_frames={self.frame_embs.shape[0]}; "
                             "raise it or sample fewer frames")
        x = (features + self.frame_embs[:f, None, :].to(features.dtype)).reshape(n, f * p, d)
        latents = self.latents.to(x.dtype).expand(n, -1, -1)
        for attn, ff in self.layers:
            latents = latents + attn(x, latents)
            latents = latents + ff(latents)
        return self.norm(latents)
